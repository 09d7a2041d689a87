"""The pipeline: static shapes, HF parity of tokens / patches / rope ids, bad records, sharding, state."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from sample_data import png_bytes
from transformers import Qwen2VLConfig as HFConfig
from transformers import Qwen2VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vrft_jax import sharding
from vrft_jax.data import prompts, synthetic
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.records import BadRecordError, Record
from vrft_jax.data.storage import InMemorySource
from vrft_jax.models.qwen2_vl import pack_example
from vrft_jax.models.qwen2_vl.processor import CHAT_TEMPLATE, ImageOnlyQwen2VLProcessor
from vrft_jax.models.qwen2_vl.rope import get_rope_index

MAX_PIXELS = 160 * 160  # patch bucket 132: tiny images keep the suite fast
T = 256


def config(**changes) -> DataConfig:
    base = dict(batch_size=2, max_prompt_len=T, max_pixels=MAX_PIXELS, num_workers=0, device_prefetch=0)
    return DataConfig(**{**base, **changes})


def iterator(cfg, model_config, tokenizer, records, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return make_iterator(cfg, model_config, tokenizer=tokenizer, source=InMemorySource(records, "test"), **kwargs)


def mixed_records(n_detection=60, n_classification=25, n_grounding=15) -> list[Record]:
    """Three tasks; image sides 20..400 px, so images are upscaled, kept and downscaled."""
    out = list(synthetic.detection_records(n_detection // 2, seed=1, min_side=20, max_side=400))[:n_detection]
    out += list(synthetic.classification_records(n_classification, seed=2, min_side=20, max_side=400))
    for k in range(n_grounding):
        out.append(Record(id=f"g{k}", image=png_bytes(30 + 25 * k, 300 - 15 * k, seed=k),
                          problem=prompts.grounding_problem(f"the object number {k}"),
                          solution=prompts.grounding_solution([k, k, 500 + k, 600]), task="grounding"))
    return out


def hf_rope_model() -> Qwen2VLModel:
    cfg = HFConfig(text_config=dict(vocab_size=151657, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                     "rope_theta": 1e6}),
                   vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, spatial_merge_size=2),
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
    with torch.device("meta"):  # get_rope_index uses no weights
        return Qwen2VLModel(cfg)


def test_fifty_mixed_batches_have_static_shapes_and_equal_hf(qwen_tokenizer, qwen_config):
    records = mixed_records()
    cfg = config(num_epochs=None, shuffle=True, seed=7)
    processor = ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=MAX_PIXELS),
                                          qwen_tokenizer, chat_template=CHAT_TEMPLATE)
    by_id = {r.id: r for r in records}
    hf_model = hf_rope_model()
    shapes = {"input_ids": (2, T), "attention_mask": (2, T), "positions": (2, T, 3), "rope_deltas": (2,),
              "patches": (2, 132, 1176), "patch_segment_ids": (2, 132), "patch_positions": (2, 132, 2)}
    grids_seen, scales = set(), set()
    it = iterator(cfg, qwen_config, qwen_tokenizer, records)
    for _ in range(50):
        batch = next(it)
        inputs = batch.model_inputs
        assert {k: getattr(inputs, k).shape for k in shapes} == shapes
        assert inputs.patches.dtype == np.float32 and inputs.input_ids.dtype == np.int32
        grids = []
        for row in range(2):
            record = by_id[batch.meta["id"][row]]
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.problem}]}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ref = processor(text=[text], images=[Image.open(io.BytesIO(record.image))], return_tensors="np")
            valid = inputs.attention_mask[row].astype(bool)
            length = int(valid.sum())
            assert valid[T - length:].all() and not valid[:T - length].any()  # left-padded
            np.testing.assert_array_equal(inputs.input_ids[row, T - length:], ref["input_ids"][0])
            assert (inputs.input_ids[row, :T - length] == qwen_tokenizer.pad_token_id).all()
            n = int(ref["image_grid_thw"][0].prod())
            np.testing.assert_array_equal(inputs.patches[row, :n], ref["pixel_values"])
            assert not inputs.patches[row, n:].any()
            np.testing.assert_array_equal(inputs.patch_segment_ids[row], np.arange(132) < n)
            assert tuple(batch.meta["image_hw"][row]) == tuple(ref["image_grid_thw"][0][1:] * 14)
            assert batch.meta["solution"][row] == record.solution and batch.meta["task"][row] == record.task
            grids.append(ref["image_grid_thw"][0])
            grids_seen.add(tuple(ref["image_grid_thw"][0]))
            scales.add(np.sign(np.prod(batch.meta["image_hw"][row]) - np.prod(batch.meta["source_hw"][row])))
            # The row is exactly what the model's own packer makes of the same tokens and patches.
            packed = pack_example(qwen_config, inputs.input_ids[row], [ref["pixel_values"]], [grids[-1]],
                                  attention_mask=inputs.attention_mask[row], patch_bucket=132)
            for name, value in packed.items():
                np.testing.assert_array_equal(getattr(inputs, name)[row], value, err_msg=name)
        grids = np.stack(grids)
        ours, ours_delta = get_rope_index(inputs.input_ids, grids, merge=2, image_token_id=151655,
                                          attention_mask=inputs.attention_mask)
        ids = torch.as_tensor(inputs.input_ids).long()
        hf_pos, hf_delta = hf_model.get_rope_index(ids, (ids == 151655).long(), image_grid_thw=torch.as_tensor(grids),
                                                   attention_mask=torch.as_tensor(inputs.attention_mask))
        hf_pos, hf_delta = hf_pos.numpy(), hf_delta.numpy()
        valid = inputs.attention_mask.astype(bool)
        np.testing.assert_array_equal(inputs.positions.transpose(2, 0, 1)[:, valid], hf_pos[:, valid])
        np.testing.assert_array_equal(inputs.positions.transpose(2, 0, 1), ours)
        np.testing.assert_array_equal(inputs.rope_deltas, hf_delta[:, 0])
        np.testing.assert_array_equal(inputs.rope_deltas, ours_delta[:, 0])
    assert len(grids_seen) > 20  # the sizes really were mixed
    assert {-1, 1} <= scales  # some images were upscaled to min_pixels, some downscaled to max_pixels


BAD = {
    "corrupt": dict(image=png_bytes(40, 40)[:120]),  # the header reads, the pixels are cut off
    "garbage": dict(image=b"definitely not an image"),
    "missing": dict(problem=""),
    "too_long": dict(problem=prompts.detection_problem("thing " * 400)),
    "malformed": dict(solution="<answer>[{'Position': [1, 2, 3]}]</answer>"),
    "not_utf8": dict(problem=b"caf\xe9 is latin-1"),
}
REASON = {"corrupt": "bad_image", "garbage": "bad_image", "missing": "missing_field", "too_long": "prompt_too_long",
          "malformed": "bad_solution", "not_utf8": "bad_text"}


def records_with_bad_ones() -> list[Record]:
    good = list(synthetic.detection_records(8, seed=5))[:10]
    records = []
    for k, (name, change) in enumerate(BAD.items()):
        records.append(good[k])
        records.append(Record(**{**good[k].as_dict(), "id": f"bad_{name}", **change}))
    return records + good[len(BAD):]


@pytest.mark.parametrize("name", list(BAD))
def test_strict_mode_names_the_bad_record(tiny_tokenizer, tiny_config, name):
    records = [Record(**{**r.as_dict(), **BAD[name]}) if k == 3 else r
               for k, r in enumerate(synthetic.detection_records(4, seed=5))]
    it = iterator(config(shuffle=False, num_epochs=1, batch_size=2, device_prefetch=1), tiny_config, tiny_tokenizer,
                  records)
    next(it)  # records 0 and 1: still delivered although the next batch, fetched ahead, failed
    with pytest.raises(BadRecordError) as error:
        next(it)
    assert error.value.reason == REASON[name]
    assert f"id {records[3].id!r} index 3 of test" in str(error.value)


def test_lenient_mode_skips_and_counts_bad_records_across_worker_processes(tiny_tokenizer, tiny_config):
    records = records_with_bad_ones()
    good_ids = [r.id for r in records if not r.id.startswith("bad_")]
    cfg = config(shuffle=False, num_epochs=1, on_bad_record="skip", drop_remainder=False, num_workers=2)
    with iterator(cfg, tiny_config, tiny_tokenizer, records) as it:
        batches = list(it)
        totals = it.skipped
    seen = [i for b in batches for i, v in zip(b.meta["id"], b.meta["valid"]) if v]
    assert sorted(seen) == sorted(good_ids)  # every good record once, no bad one
    expected = {}
    for reason in REASON.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert totals == expected
    per_batch = {}
    for b in batches:
        for reason, n in b.skipped.items():
            per_batch[reason] = per_batch.get(reason, 0) + n
    assert per_batch == expected
    skipped = [line for b in batches for line in b.skipped_records]
    assert any(line.startswith("record id 'bad_too_long' index 7 of test: prompt_too_long") for line in skipped)
    # Strict mode in a worker process: the error crosses the process boundary intact.
    with iterator(config(shuffle=False, num_epochs=1, num_workers=1), tiny_config, tiny_tokenizer, records) as it:
        with pytest.raises(BadRecordError, match="id 'bad_corrupt' index 1 of test: bad_image"):
            list(it)


def test_every_record_bad_stops_instead_of_spinning(tiny_tokenizer, tiny_config):
    records = [Record(id=f"r{k}", image=b"junk", problem="p", solution="<answer>a</answer>", task="classification")
               for k in range(3)]
    it = iterator(config(on_bad_record="skip"), tiny_config, tiny_tokenizer, records)
    with pytest.raises(BadRecordError, match="records in a row were rejected"):
        next(it)


def test_final_partial_batch_is_padded_or_dropped(tiny_tokenizer, tiny_config):
    records = list(synthetic.detection_records(3, seed=0))[:5]
    padded = list(iterator(config(batch_size=4, num_epochs=1, drop_remainder=False), tiny_config, tiny_tokenizer,
                           records))
    assert [b.meta["valid"].tolist() for b in padded] == [[True] * 4, [True, False, False, False]]
    last = padded[-1].model_inputs
    assert not last.attention_mask[1:].any() and not last.patches[1:].any() and not last.patch_segment_ids[1:].any()
    assert padded[-1].meta["id"][1:] == ["", "", ""] and (padded[-1].meta["index"][1:] == -1).all()
    dropped = list(iterator(config(batch_size=4, num_epochs=1), tiny_config, tiny_tokenizer, records))
    assert len(dropped) == 1


def test_epochs_reshuffle_and_cover_every_record(tiny_tokenizer, tiny_config):
    records = list(synthetic.classification_records(8, seed=0))
    batches = list(iterator(config(batch_size=2, num_epochs=2, seed=3), tiny_config, tiny_tokenizer, records))
    order = [i for b in batches for i in b.meta["id"]]
    first, second = order[:8], order[8:]
    assert sorted(first) == sorted(second) == sorted(r.id for r in records)
    assert first != second
    again = [i for b in iterator(config(batch_size=2, num_epochs=2, seed=3), tiny_config, tiny_tokenizer, records)
             for i in b.meta["id"]]
    assert again == order


def test_processes_get_disjoint_shards_that_cover_the_epoch_in_as_many_batches(tiny_tokenizer, tiny_config):
    records = list(synthetic.classification_records(13, seed=0))
    padded, dropped = [], []
    for index in range(2):
        kwargs = dict(process_index=index, process_count=2)
        batches = list(iterator(config(batch_size=3, num_epochs=1, drop_remainder=False), tiny_config,
                                tiny_tokenizer, records, **kwargs))
        padded.append([i for b in batches for i, v in zip(b.meta["id"], b.meta["valid"]) if v])
        assert len(batches) == 3  # 13 records padded to 18 = 2 processes x 3 batches x 3 rows
        dropped.append([i for b in iterator(config(batch_size=3, num_epochs=1), tiny_config, tiny_tokenizer, records,
                                            **kwargs) for i in b.meta["id"]])
    assert not set(padded[0]) & set(padded[1])
    assert sorted(padded[0] + padded[1]) == sorted(r.id for r in records)
    assert len(dropped[0]) == len(dropped[1]) == 6  # 13 cut to 12: two whole global batches of 6
    assert not set(dropped[0]) & set(dropped[1])


def test_throughput_knobs_do_not_change_the_stream(tiny_tokenizer, tiny_config):
    records = list(synthetic.detection_records(6, seed=2))

    def digest(cfg):
        it = iterator(cfg, tiny_config, tiny_tokenizer, records)
        return [(b.meta["id"], b.model_inputs.input_ids.tobytes(), b.model_inputs.patches.tobytes()) for b in
                (next(it) for _ in range(6))]

    assert digest(config(read_threads=1, device_prefetch=0)) == digest(config(read_threads=3, device_prefetch=2))


def test_batches_become_global_arrays_sharded_over_data_and_fsdp(tiny_tokenizer, tiny_config):
    records = list(synthetic.detection_records(8, seed=0))
    for axes, batch_size in (((2, 4, 1), 8), ((2, 2, 2), 4)):
        mesh = sharding.make_mesh(*axes)
        host = next(iterator(config(batch_size=batch_size), tiny_config, tiny_tokenizer, records))
        batch = next(iterator(config(batch_size=batch_size, device_prefetch=1), tiny_config, tiny_tokenizer,
                              records, mesh=mesh))
        for name in ("input_ids", "positions", "patches", "rope_deltas"):
            array = getattr(batch.model_inputs, name)
            assert isinstance(array, jax.Array)
            assert array.sharding == sharding.batch_sharding(mesh, array.ndim)
            assert array.sharding.spec[0] == ("data", "fsdp")
            np.testing.assert_array_equal(np.asarray(array), getattr(host.model_inputs, name))
        assert len({s.index[0].start for s in batch.model_inputs.patches.addressable_shards}) == axes[0] * axes[1]
    with pytest.raises(ValueError, match="batch_size a multiple"):
        next(iterator(config(batch_size=6), tiny_config, tiny_tokenizer, records, mesh=sharding.make_mesh(2, 4, 1)))


def test_bfloat16_patches(tiny_tokenizer, tiny_config):
    import ml_dtypes

    records = list(synthetic.detection_records(2, seed=0))
    f32 = next(iterator(config(), tiny_config, tiny_tokenizer, records)).model_inputs.patches
    bf16 = next(iterator(config(patch_dtype="bfloat16"), tiny_config, tiny_tokenizer, records)).model_inputs.patches
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16.view(np.uint16), f32.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_state_resumes_in_process_and_refuses_another_pipeline(tiny_tokenizer, tiny_config):
    records = list(synthetic.detection_records(5, seed=0))
    cfg = config(device_prefetch=2)
    it = iterator(cfg, tiny_config, tiny_tokenizer, records)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = [next(it).meta["id"] for _ in range(4)]
    resumed = iterator(cfg, tiny_config, tiny_tokenizer, records)
    resumed.set_state(state)
    assert [next(resumed).meta["id"] for _ in range(4)] == expected
    assert resumed.batches == 7
    other = iterator(cfg.replace(seed=1, batch_size=4), tiny_config, tiny_tokenizer, records)
    with pytest.raises(ValueError, match=r"differ in: batch_size=\(2, 4\), seed=\(0, 1\)"):
        other.set_state(state)


def test_data_config_rejects_unknown_keys_and_bad_values():
    assert DataConfig.from_dict({"path": "x", "batch_size": 4}).batch_size == 4
    with pytest.raises(KeyError, match=r"unknown DataConfig key\(s\) \['batchsize'\]"):
        DataConfig.from_dict({"batchsize": 4})
    with pytest.raises(KeyError, match="unknown DataConfig key"):
        DataConfig().replace(workers=3)
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        DataConfig(on_bad_record="ignore")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_pixels 5000 exceeds max_pixels 4000"):
        DataConfig(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="patch_dtype"):
        DataConfig(patch_dtype="float16")
    with pytest.raises(TypeError, match="DataConfig.shuffle must be bool, got 1"):
        DataConfig(shuffle=1)
    with pytest.raises(TypeError, match="DataConfig.batch_size must be int, got 8.0"):
        DataConfig.from_dict({"batch_size": 8.0})


def test_iterator_checkpoints_with_orbax_through_grains_handler(tmp_path, tiny_tokenizer, tiny_config):
    import grain
    import orbax.checkpoint as ocp

    records = list(synthetic.detection_records(5, seed=0))
    it = iterator(config(device_prefetch=1), tiny_config, tiny_tokenizer, records)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it).meta["id"] for _ in range(3)]
    resumed = iterator(config(device_prefetch=1), tiny_config, tiny_tokenizer, records)
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert [next(resumed).meta["id"] for _ in range(3)] == expected
    assert (tmp_path / "2" / "data" / "process_0-of-1.json").exists()


def test_system_prompt_and_evaluation_prefix_reach_the_prompt(qwen_tokenizer, qwen_config):
    from vrft_jax.data.preprocess import ExampleEncoder

    record = next(synthetic.classification_records(1, seed=0))
    cfg = config(system_prompt=prompts.R1_SYSTEM_PROMPT, problem_prefix="<image>\n")
    batch = next(iterator(cfg, qwen_config, qwen_tokenizer, [record] * 2))
    ids = batch.model_inputs.input_ids[0][batch.model_inputs.attention_mask[0].astype(bool)]
    text = qwen_tokenizer.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{prompts.R1_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert f"<|vision_end|><image>\n{record.problem}<|im_end|>\n<|im_start|>assistant\n" in text
    assert batch.meta["problem"][0] == "<image>\n" + record.problem
    # Visual-RFT training: no system turn of ours; the template's default one.
    plain = ExampleEncoder(qwen_tokenizer, qwen_config, min_pixels=3136, max_pixels=MAX_PIXELS, max_prompt_len=T,
                           patch_bucket=132).prompt_ids("hi")
    assert qwen_tokenizer.decode(plain) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
                                            "user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                                            "<|im_start|>assistant\n")
