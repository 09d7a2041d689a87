"""`DataConfig`: everything that decides which batches a run sees. Frozen; unknown keys are errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vrft_jax.data.records import check_policy
from vrft_jax.fields import known_fields

PATCH_DTYPES = ("float32", "bfloat16")
BUCKETS = ("fixed", "data")
_KINDS = {"str": (str,), "int": (int,), "bool": (bool,), "int | None": (int, type(None)),
          "str | None": (str, type(None))}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data pipeline of one run.

    Source:
      path:            a dataset written by `python -m vrft_jax.data.prepare` (its directory, or the
                       directory of its versions)
      split:           split name ("train", "base", "novel", ...)
    Batches (per process; the global batch is `batch_size * jax.process_count()`):
      batch_size:      rows per process per batch
      max_prompt_len:  the text bucket T in tokens, image tokens included; prompts are left-padded to it
      patch_bucket:    the patch bucket P; None = max_pixels / 14^2 rounded up to whole merged tokens
                       (2048 for Visual-RFT's max_pixels), which holds any image
      buckets:         "fixed": T and P as given; "data": measured from the split before the first batch,
                       the smallest multiples of 64 that hold every record, with max_prompt_len and
                       patch_bucket as the limits (`vrft_jax.data.buckets`)
      patch_dtype:     "float32" (bit-identical to HF) or "bfloat16" (half the host->device bytes)
      drop_remainder:  drop a final partial batch of a finite run; else pad it with valid=False rows
    Images (Qwen2-VL smart_resize bounds; Visual-RFT trains with 3136..401408):
      min_pixels, max_pixels
    Order:
      seed, shuffle:   the shuffle, reseeded every epoch
      num_epochs:      None repeats forever (training); an int stops after that many passes
    Throughput:
      num_workers:     Grain worker processes (0: everything in this process)
      worker_buffer:   batches each worker prepares ahead
      read_threads:    threads per process that read and encode records
      device_prefetch: batches sent to the devices ahead of the one being used
    Bad records (undecodable image, missing field, malformed solution, prompt over the bucket):
      on_bad_record:   "error" stops with an error naming the record; "skip" skips and counts it
    Prompt:
      tokenizer_path:  a local HF tokenizer directory; None = the tokenizer files of the model checkpoint
                       (`make_iterator(checkpoint_dir=...)`) when it has them, else the packaged Qwen2-VL one
      system_prompt:   None for Visual-RFT training (the template adds "You are a helpful assistant.")
      problem_prefix:  text put before each problem; "<image>\n" reproduces Visual-RFT's evaluation
                       prompts (its eval scripts send '<image>\n' + question), "" its training prompts
      box_frame:       the frame detection prompts ask boxes in (`vrft_jax.rewards.frames` names); None = the
                       model family's (Qwen2-VL's 0..1000 grid, Qwen2.5-VL's pixels of the resized image)
    """

    path: str = ""
    split: str = "train"
    batch_size: int = 8
    max_prompt_len: int = 1024
    patch_bucket: int | None = None
    buckets: str = "fixed"
    patch_dtype: str = "float32"
    drop_remainder: bool = True
    min_pixels: int = 3136
    max_pixels: int = 401408
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_workers: int = 2
    worker_buffer: int = 2
    read_threads: int = 1
    device_prefetch: int = 1
    on_bad_record: str = "error"
    tokenizer_path: str | None = None
    system_prompt: str | None = None
    problem_prefix: str = ""
    box_frame: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _KINDS[f.type]
            # bool is an int to Python; a recipe's `batch_size=True` or `shuffle=1` is still a mistake.
            if not isinstance(value, kinds) or (isinstance(value, bool) != (bool in kinds) and value is not None):
                raise TypeError(f"DataConfig.{f.name} must be {f.type}, got {value!r}")
        check_policy(self.on_bad_record)
        positive = {"batch_size": self.batch_size, "max_prompt_len": self.max_prompt_len,
                    "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "read_threads": self.read_threads,
                    "worker_buffer": self.worker_buffer}
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DataConfig.{key} must be a positive int, got {value!r}")
        for key in ("num_workers", "device_prefetch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataConfig.{key} must be a non-negative int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"DataConfig.min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.patch_bucket is not None and (not isinstance(self.patch_bucket, int) or self.patch_bucket <= 0):
            raise ValueError(f"DataConfig.patch_bucket must be a positive int or None, got {self.patch_bucket!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs <= 0):
            raise ValueError(f"DataConfig.num_epochs must be a positive int or None, got {self.num_epochs!r}")
        if self.buckets not in BUCKETS:
            raise ValueError(f"DataConfig.buckets must be one of {BUCKETS}, got {self.buckets!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"DataConfig.patch_dtype must be one of {PATCH_DTYPES}, got {self.patch_dtype!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """From a plain mapping (e.g. an ml_collections ConfigDict's `to_dict()`); unknown keys are errors."""
        return cls(**known_fields(cls, values))

    def replace(self, **changes) -> DataConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise KeyError(f"unknown DataConfig key(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
