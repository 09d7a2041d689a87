"""HF <-> Flax conversion: bit-exact round trips, sharded checkpoints, streaming, and errors that name tensors."""

import gc
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoConfig, AutoModelForImageTextToText

from hf_reference import TINY_CONFIGS, Tiny, mixed_batch, random_hf_model
from model_port import flax_to_hf, hf_to_flax
from model_port.hf_to_flax import CheckpointMismatchError, load_hf
from model_port.safetensors_io import INDEX_FILE, SafetensorsReader
from vrft_jax.models.qwen2_vl import UnsupportedConfigError

GQA, TIED = TINY_CONFIGS[0], TINY_CONFIGS[1]
WINDOW = next(t for t in TINY_CONFIGS if t.family == "qwen2_5_vl")
DEEPSTACK = next(t for t in TINY_CONFIGS if t.family == "qwen3_vl")


def tensors(path) -> dict[str, np.ndarray]:
    reader = SafetensorsReader(str(path))
    return {name: reader.read(name) for name in reader.names()}


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), f"{name} differs"


def hf_config(path) -> dict:
    config = AutoConfig.from_pretrained(path).to_dict()
    for where_from in ("transformers_version", "_name_or_path"):
        config.pop(where_from, None)
    return config


@pytest.mark.parametrize("tiny", [GQA, TIED, WINDOW, DEEPSTACK], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_identical_and_reloads_in_transformers(tiny, dtype, tmp_path):
    source, exported = tmp_path / "hf", tmp_path / "back"
    hf = random_hf_model(tiny, seed=2, dtype=dtype)
    hf.save_pretrained(source)
    model = load_hf(str(source))
    assert model.config.param_dtype.name == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    flax_to_hf.save_hf(model, str(exported), hf_config=json.loads((source / "config.json").read_text()))

    assert_bit_identical(tensors(source), tensors(exported))
    assert hf_config(exported) == hf_config(source)
    # Both directories through from_pretrained: a model cast in memory with .to(bf16) also casts its
    # rotary buffers, which a loaded one keeps in float32, so only loaded models compare exactly.
    original, reloaded = (AutoModelForImageTextToText.from_pretrained(p, attn_implementation="eager").eval()
                          for p in (source, exported))
    assert type(reloaded).__name__ == type(hf).__name__
    batch = mixed_batch(tiny, seed=7).torch(tiny.image_token_id)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, original(**batch).logits)


def test_command_line_round_trip_through_orbax(tmp_path):
    source, ckpt, exported = tmp_path / "hf", tmp_path / "flax", tmp_path / "back"
    random_hf_model(GQA, seed=3).save_pretrained(source)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "pad_token_id": 0}))
    hf_to_flax.main(["hf_to_flax", "--hf", str(source), "--out", str(ckpt)])
    flax_to_hf.main(["flax_to_hf", "--ckpt", str(ckpt), "--out", str(exported)])
    assert_bit_identical(tensors(source), tensors(exported))
    assert hf_config(exported) == hf_config(source)
    assert json.loads((exported / "generation_config.json").read_text()) == {"eos_token_id": [2], "pad_token_id": 0}


def test_sharded_checkpoints_are_read_and_written_with_an_index(tmp_path):
    single, sharded, exported = tmp_path / "single", tmp_path / "sharded", tmp_path / "back"
    hf = random_hf_model(GQA, seed=4)
    hf.save_pretrained(single)
    hf.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_hf(str(sharded))
    files = flax_to_hf.save_hf(model, str(exported), max_shard_bytes=150_000)
    assert len(files) > 1 and (exported / INDEX_FILE).exists()
    assert_bit_identical(tensors(single), tensors(exported))
    reloaded = AutoModelForImageTextToText.from_pretrained(exported).eval()
    for (name, a), (_, b) in zip(hf.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_tensors_stream_one_at_a_time(tmp_path):
    """Host memory in flight while loading stays within a few HF tensors, never the model's size."""
    text = {**GQA.hf["text_config"], "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}
    vision = {**GQA.hf["vision_config"], "hidden_size": 256}
    wide = Tiny("wide", {**GQA.hf, "text_config": text, "vision_config": vision})
    random_hf_model(wide).save_pretrained(tmp_path)
    reader = SafetensorsReader(str(tmp_path))
    sizes = [int(np.prod(reader.shape(n))) * 4 for n in reader.names()]
    largest_tensor, total = max(sizes), sum(sizes)
    load_hf(str(tmp_path))  # warm up: compiled programs are not the model's memory
    gc.collect()
    tracemalloc.start()
    model = load_hf(str(tmp_path))
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # On the CPU backend a device array may alias the host buffer it was made from: that memory is
    # the loaded model itself (`retained`), not memory in flight.
    in_flight = peak - retained
    print(f"in flight {in_flight}, largest tensor {largest_tensor}, checkpoint {total}")
    assert in_flight < 2 * largest_tensor, (in_flight, largest_tensor)
    assert in_flight < 0.1 * total, (in_flight, total)
    del model


def _write(path, tensors_: dict, config: dict):
    os.makedirs(path, exist_ok=True)
    save_file(tensors_, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    random_hf_model(GQA).save_pretrained(path)
    return tensors(path), json.loads((path / "config.json").read_text())


def test_missing_tensor_is_named(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    weights = dict(weights)
    del weights["model.layers.1.self_attn.k_proj.bias"]
    _write(tmp_path, weights, config)
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing tensors \(1\): model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(str(tmp_path))


def test_unexpected_tensor_is_named(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    weights = {**weights, "model.layers.0.self_attn.rotary.inv_freq": np.ones(8, np.float32)}
    _write(tmp_path, weights, config)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.rotary"):
        load_hf(str(tmp_path))


def test_mis_shaped_tensor_is_named_with_both_shapes(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    weights = {**weights, "visual.blocks.1.mlp.fc1.weight": np.zeros((65, 32), np.float32)}
    _write(tmp_path, weights, config)
    with pytest.raises(CheckpointMismatchError,
                       match=r"visual\.blocks\.1\.mlp\.fc1\.weight: expected \(64, 32\), found \(65, 32\)"):
        load_hf(str(tmp_path))


def test_all_problems_are_listed_at_once(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    weights = dict(weights)
    del weights["lm_head.weight"]
    weights["extra.weight"] = np.zeros(3, np.float32)
    _write(tmp_path, weights, config)
    with pytest.raises(CheckpointMismatchError) as error:
        load_hf(str(tmp_path))
    assert "lm_head.weight" in str(error.value) and "extra.weight" in str(error.value)


def test_transformers_5_in_memory_names_are_accepted(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    renamed = {name.replace("visual.", "model.visual.", 1) if name.startswith("visual.")
               else name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name: w
               for name, w in weights.items()}
    _write(tmp_path, renamed, config)
    model = load_hf(str(tmp_path))
    assert model.config.text.num_layers == 2


def test_unsupported_architecture_stops_with_a_clear_message(good_checkpoint, tmp_path):
    weights, config = good_checkpoint
    _write(tmp_path, weights,
           {**config, "model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"]})
    with pytest.raises(UnsupportedConfigError, match="model_type='qwen3_vl_moe'.*ports qwen2_vl"):
        load_hf(str(tmp_path))
    _write(tmp_path, weights, {**config, "model_type": "qwen2_5_vl"})  # Qwen2-VL's tensors under the wrong family
    with pytest.raises(UnsupportedConfigError, match="a qwen2_5_vl checkpoint converts as Qwen2_5_VL"):
        load_hf(str(tmp_path))
    _write(tmp_path, weights, {**config, "text_config": {**config["text_config"], "use_sliding_window": True}})
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        load_hf(str(tmp_path))


def test_make_convert_demo_converts_and_decodes_every_family(tmp_path):
    """`make convert-demo`'s script: each family's tiny random checkpoint through hf_to_flax, greedy decoding equal
    to HF's generate, and flax_to_hf back bit-identical (it exits non-zero otherwise)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "launch", "convert_demo.py"), "--out", str(tmp_path),
                           "--new-tokens", "8"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert f"== {family}" in done.stdout
    assert done.stdout.count("HF generate gives the same tokens: True") == 3
    assert done.stdout.count("bit-identical: True") == 3
