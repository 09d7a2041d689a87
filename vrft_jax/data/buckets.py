"""Text and patch buckets sized from a run's own data (`DataConfig.buckets = "data"`).

A batch's static shapes are its buckets: T prompt slots per row (image tokens included) and P image
patches per row. Every row pays for them whatever its own size: the vision tower attends over P
patches, the decoder runs T slots per prompt, and the rollout's KV cache and the scorer's keys are T
long. Buckets that must hold any dataset are Visual-RFT's limits (max_prompt_length 1024, and
max_pixels / 14^2 = 2048 patches); a 10-shot LVIS set or a flower classification set needs far less.

With `buckets = "data"` the pipeline measures every record of its split once, before the first batch,
from the record's text and its image's header (no pixel is decoded; `ExampleEncoder.size`), and
takes the smallest multiple of `MULTIPLE` that holds every record within the limits, which stay
`max_prompt_len` and `patch_bucket`: a record over a limit is a bad record as before, reported by
`on_bad_record`. The result is a pure function of the split and the config, so every process of a run,
and a resumed run, sizes the same buckets; the data state's fingerprint records them.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from absl import logging
from tqdm import tqdm

from vrft_jax.data.config import DataConfig
from vrft_jax.data.image import ImageGeometry
from vrft_jax.data.preprocess import ExampleEncoder
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig

MULTIPLE = 64  # bucket sizes are multiples of this (TPU tiles; fewer distinct shapes across recipes)


def resolve_patch_bucket(config: DataConfig, model_config: Qwen2VLConfig) -> int:
    """The patch bucket P: DataConfig.patch_bucket, or max_pixels / patch^2 in whole merged tokens."""
    geometry = ImageGeometry.from_model(model_config, min_pixels=config.min_pixels,
                                        max_pixels=config.max_pixels)
    bucket = geometry.max_patches if config.patch_bucket is None else config.patch_bucket
    if bucket % geometry.merge_tokens:
        raise ValueError(f"DataConfig.patch_bucket {bucket} is not a multiple of {geometry.merge_tokens} "
                         f"(patches merged into one token)")
    return bucket


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Each measured record's prompt tokens (image tokens included) and image patches.

    unmeasured: records that cannot become examples for another reason (missing field, bad image, ...):
    the pipeline reports them by its `on_bad_record` policy."""

    tokens: np.ndarray
    patches: np.ndarray
    unmeasured: int

    def summary(self) -> str:
        def spread(x):
            return f"median {int(np.median(x))}, 99% {int(np.percentile(x, 99))}, max {int(x.max())}"

        return f"prompt tokens {spread(self.tokens)}; image patches {spread(self.patches)}"


def measure(config: DataConfig, model_config: Qwen2VLConfig, tokenizer, source, name: str = "data") -> Sizes:
    """Every record's sizes under `config`'s prompt and image settings (a bar on a terminal)."""
    encoder = ExampleEncoder(tokenizer, model_config, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                             max_prompt_len=config.max_prompt_len,
                             patch_bucket=resolve_patch_bucket(config, model_config), on_bad_record="skip",
                             source=name, system_prompt=config.system_prompt, problem_prefix=config.problem_prefix,
                             box_frame=config.box_frame)
    tokens, patches, unmeasured = [], [], 0
    for index in tqdm(range(len(source)), desc=f"sizing buckets of {name}", unit="record", leave=False,
                      disable=None):
        size = encoder.size(source[index])
        if size is None:
            unmeasured += 1
            continue
        tokens.append(size[0])
        patches.append(size[1])
    return Sizes(np.asarray(tokens, np.int64), np.asarray(patches, np.int64), unmeasured)


def fit(config: DataConfig, sizes: Sizes, patch_limit: int, merge_tokens: int, name: str = "data") -> DataConfig:
    """`config` with `buckets="fixed"` and the smallest buckets that hold every record within the limits
    (`config.max_prompt_len` tokens, `patch_limit` patches)."""
    fits = (sizes.tokens <= config.max_prompt_len) & (sizes.patches <= patch_limit)
    if not fits.any():
        raise ValueError(f"no record of {name} fits max_prompt_len={config.max_prompt_len} tokens and "
                         f"{patch_limit} patches ({sizes.summary() if sizes.tokens.size else 'none measured'})")
    patch_multiple = math.lcm(MULTIPLE, merge_tokens)
    text = min(config.max_prompt_len, _round_up(int(sizes.tokens[fits].max()), MULTIPLE))
    patches = min(patch_limit, _round_up(int(sizes.patches[fits].max()), patch_multiple))
    return config.replace(buckets="fixed", max_prompt_len=text, patch_bucket=patches)


def size_buckets(config: DataConfig, model_config: Qwen2VLConfig, tokenizer, source, name: str = "data"
                 ) -> DataConfig:
    """`config` itself unless `config.buckets == "data"`; then its buckets sized from `source` (logged)."""
    if config.buckets != "data":
        return config
    start = time.perf_counter()
    sizes = measure(config, model_config, tokenizer, source, name)
    limit = resolve_patch_bucket(config, model_config)
    sized = fit(config, sizes, limit, model_config.vision.merge_tokens, name)
    over = int(np.sum((sizes.tokens > config.max_prompt_len) | (sizes.patches > limit)))
    logging.info("buckets of %s from its %d records (%.1f s): %s -> %d prompt slots (limit %d), %d patches "
                 "(limit %d); %d over a limit, %d not measurable", name, len(source), time.perf_counter() - start,
                 sizes.summary(), sized.max_prompt_len, config.max_prompt_len, sized.patch_bucket, limit, over,
                 sizes.unmeasured)
    return sized


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
