"""Model directories (review M3): saving over a model never leaves the directory without a complete
one, whatever the moment of a crash, and a load without a mesh does not put the model on one device.
(The same in a bucket: tests/test_storage.py.)"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tiny_model import tiny_model
from vrft_jax import model_dir


def params_of(model) -> dict:
    return {path: np.asarray(v.get_raw_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(model, expected: dict) -> None:
    got = params_of(model)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def entries(directory) -> set[str]:
    return set(os.listdir(directory))


class Crash(RuntimeError):
    pass


def test_a_save_that_dies_before_the_pointer_keeps_the_old_model(tmp_path, monkeypatch):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    model_dir.save_model(old, str(tmp_path))
    assert entries(tmp_path) == {"params-1", "params.json", "config.json"}
    with monkeypatch.context() as patch:
        patch.setattr(model_dir, "_write_pointer", lambda *args: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            model_dir.save_model(new, str(tmp_path))
    assert entries(tmp_path) == {"params-1", "params-2", "params.json", "config.json"}  # the new copy complete
    assert model_dir.params_path(str(tmp_path)) == str(tmp_path / "params-1")
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(old))
    model_dir.save_model(new, str(tmp_path))  # the next save cleans up and succeeds
    assert entries(tmp_path) == {"params-3", "params.json", "config.json"}
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(new))


def test_a_crash_after_the_pointer_leaves_the_new_model_and_the_next_save_deletes_the_old(tmp_path, monkeypatch):
    old, new, newest = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=3)
    model_dir.save_model(old, str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(model_dir.storage, "rmtree", lambda path: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            model_dir.save_model(new, str(tmp_path))
    assert {"params-1", "params-2"} <= entries(tmp_path)
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(new))
    model_dir.save_model(newest, str(tmp_path))
    assert entries(tmp_path) == {"params-3", "params.json", "config.json"}
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(newest))


def test_an_unfinished_orbax_write_is_never_loaded_and_is_cleaned_up(tmp_path):
    model = tiny_model(seed=1)
    model_dir.save_model(model, str(tmp_path))
    unfinished = tmp_path / "params-7.orbax-checkpoint-tmp-1234"  # what a crash inside orbax leaves
    unfinished.mkdir()
    (unfinished / "junk").write_text("half a shard")
    assert model_dir.params_path(str(tmp_path)) == str(tmp_path / "params-1")
    model_dir.save_model(model, str(tmp_path))
    assert entries(tmp_path) == {"params-8", "params.json", "config.json"}  # never reuses a leftover's name


def test_a_directory_saved_before_the_pointer_loads_and_is_replaced_by_the_next_save(tmp_path):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    model_dir.save_model(old, str(tmp_path))
    os.rename(tmp_path / "params-1", tmp_path / "params")  # the earlier layout: params/ and no pointer
    os.remove(tmp_path / "params.json")
    assert model_dir.is_model_dir(str(tmp_path))
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(old))
    model_dir.save_model(new, str(tmp_path))
    assert entries(tmp_path) == {"params-1", "params.json", "config.json"}
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(new))


def test_a_directory_without_parameters_is_an_error_naming_it(tmp_path):
    assert not model_dir.is_model_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds neither params.json nor params/"):
        model_dir.params_path(str(tmp_path))
    (tmp_path / "params.json").write_text(json.dumps({"params": "params-4"}))
    with pytest.raises(FileNotFoundError, match="params.json names params-4/, which is missing"):
        model_dir.params_path(str(tmp_path))


def test_load_without_a_mesh_spreads_the_model_over_every_device(tmp_path):
    model = tiny_model(seed=1)
    model_dir.save_model(model, str(tmp_path))
    loaded = model_dir.load_model(str(tmp_path))
    arrays = [v.get_raw_value() for _, v in nnx.to_flat_state(nnx.state(loaded))]
    assert all(len(a.sharding.device_set) == jax.device_count() == 8 for a in arrays)
    embed = loaded.text.embed_tokens.get_raw_value()
    assert not embed.sharding.is_fully_replicated  # split (FSDP), not copied to every device
    assert max(s.data.size for s in embed.addressable_shards) == embed.size // 8
    assert_same_params(loaded, params_of(model))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 32 and config["dtype"] == "float32"


def test_assets_of_the_source_are_carried_and_only_what_it_lacks_is_added(tmp_path):
    """Every Qwen2-VL asset name of either transformers generation travels from the HF source to `hf_assets/`;
    `add_missing_assets` then adds nothing. A model without a source gets the run's tokenizer, template and stop
    ids (item 5 of issue 19)."""
    from vrft_jax.models.qwen2_vl.tokenizer import CHAT_TEMPLATE, load_tokenizer

    source = tmp_path / "hub"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(tiny_model(seed=1).config.to_hf_dict()))
    for name in model_dir.HF_ASSETS:
        (source / name).write_text(f"{name} of the source")
    (source / "model.safetensors").write_text("weights are no asset")
    model_dir.save_model(tiny_model(seed=1), str(tmp_path / "sourced"), hf_source=str(source))
    assets = tmp_path / "sourced" / model_dir.ASSETS_DIR
    assert entries(assets) == set(model_dir.HF_ASSETS)
    assert {"video_preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= entries(assets)
    tokenizer = load_tokenizer()
    assert model_dir.add_missing_assets(str(tmp_path / "sourced"), tokenizer, (7, 8), 9) == []
    assert all((assets / name).read_text() == f"{name} of the source" for name in model_dir.HF_ASSETS)

    model_dir.save_model(tiny_model(seed=1), str(tmp_path / "random"))
    written = model_dir.add_missing_assets(str(tmp_path / "random"), tokenizer, (151645, 151643), 151643)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(written)
    assets = tmp_path / "random" / model_dir.ASSETS_DIR
    assert json.loads((assets / "generation_config.json").read_text()) == {"eos_token_id": [151645, 151643],
                                                                           "pad_token_id": 151643}
    assert load_tokenizer(str(assets)).chat_template == CHAT_TEMPLATE
