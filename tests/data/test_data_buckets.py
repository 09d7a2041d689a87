"""Buckets sized from the data (`DataConfig.buckets = "data"`): the smallest multiples of 64 that hold
every record within the limits, measured without decoding a pixel, equal to what encoding makes; a
record over a limit stays a bad record and does not widen the buckets."""

from __future__ import annotations

import numpy as np
import pytest
from sample_data import png_bytes

from vrft_jax.data import buckets, prompts, synthetic
from vrft_jax.data.buckets import resolve_patch_bucket
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.preprocess import ExampleEncoder
from vrft_jax.data.records import BadRecordError, Record
from vrft_jax.data.storage import InMemorySource

MAX_PIXELS = 160 * 160  # a limit of 132 patches (33 merged tokens) per image


def config(**changes) -> DataConfig:
    base = dict(batch_size=2, max_prompt_len=1024, max_pixels=MAX_PIXELS, num_workers=0, device_prefetch=0,
                shuffle=False, num_epochs=1, buckets="data")
    return DataConfig(**{**base, **changes})


def records(sides) -> list[Record]:
    return [Record(id=f"r{k}", image=png_bytes(h, w, seed=k), problem=prompts.detection_problem("dog"),
                   solution="<answer>[{'Position': [1, 2, 30, 40], 'Confidence': 1}]</answer>", task="detection")
            for k, (h, w) in enumerate(sides)]


def test_sizes_come_from_headers_and_equal_the_encoded_examples(tiny_tokenizer, tiny_config):
    data = list(synthetic.detection_records(6, seed=3, min_side=20, max_side=400))
    cfg = config()
    encoder = ExampleEncoder(tiny_tokenizer, tiny_config, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                             max_prompt_len=cfg.max_prompt_len, patch_bucket=resolve_patch_bucket(cfg, tiny_config))
    sizes = buckets.measure(cfg, tiny_config, tiny_tokenizer, InMemorySource(data, "test"))
    assert sizes.unmeasured == 0 and len(set(sizes.patches.tolist())) > 1
    for k, record in enumerate(data):
        example = encoder(((k, record.as_dict())))
        assert (sizes.tokens[k], sizes.patches[k]) == (len(example.input_ids), example.pixels.shape[0])


def test_the_buckets_are_the_smallest_multiples_that_hold_every_record(tiny_tokenizer, tiny_config):
    data = records([(28, 28), (56, 84), (112, 140)])  # 16 (min_pixels upscales), 24 and 80 patches
    source = InMemorySource(data, "test")
    sizes = buckets.measure(config(), tiny_config, tiny_tokenizer, source)
    assert sizes.patches.tolist() == [16, 24, 80]
    sized = buckets.size_buckets(config(), tiny_config, tiny_tokenizer, source, "test")
    longest = int(sizes.tokens.max())
    assert sized.buckets == "fixed" and sized.patch_bucket == 128  # 80 up to 128 (the limit is 132)
    assert sized.max_prompt_len == -(-longest // 64) * 64 < 1024
    it = make_iterator(config(), tiny_config, tokenizer=tiny_tokenizer, source=source, process_index=0,
                       process_count=1)
    shapes = {(b.model_inputs.input_ids.shape, b.model_inputs.patches.shape[:2]) for b in it}
    assert shapes == {((2, sized.max_prompt_len), (2, 128))}
    # A fixed config is left as it is.
    assert buckets.size_buckets(config(buckets="fixed"), tiny_config, tiny_tokenizer, source) == config(buckets="fixed")


def test_a_record_over_a_limit_stays_bad_and_does_not_widen_the_buckets(tiny_tokenizer, tiny_config):
    data = records([(28, 28), (56, 56)])
    data.insert(1, Record(**{**data[0].as_dict(), "id": "long", "problem": prompts.detection_problem("dog " * 300)}))
    source = InMemorySource(data, "test")
    strict = config(max_prompt_len=256)
    sized = buckets.size_buckets(strict, tiny_config, tiny_tokenizer, source, "test")
    assert sized.max_prompt_len < 256  # the long prompt (over 300 tokens) is not what sized it
    with pytest.raises(BadRecordError, match="'long' index 1 of test") as error:
        list(make_iterator(strict, tiny_config, tokenizer=tiny_tokenizer, source=source, process_index=0,
                           process_count=1))
    assert error.value.reason == "prompt_too_long"
    lenient = make_iterator(strict.replace(on_bad_record="skip", drop_remainder=False), tiny_config,
                            tokenizer=tiny_tokenizer, source=source, process_index=0, process_count=1)
    batches = list(lenient)
    assert [m for b in batches for m, v in zip(b.meta["id"], b.meta["valid"]) if v] == ["r0", "r1"]
    assert lenient.skipped == {"prompt_too_long": 1}  # counted, as any bad record
    # Nothing fits: said, with the measured sizes, instead of an empty stream.
    with pytest.raises(ValueError, match="no record of test fits max_prompt_len=16"):
        buckets.size_buckets(config(max_prompt_len=16), tiny_config, tiny_tokenizer, source, "test")


def test_a_bad_buckets_value_is_refused():
    with pytest.raises(ValueError, match="buckets must be one of"):
        DataConfig(buckets="auto")
    assert np.lcm(buckets.MULTIPLE, 4) == 64
