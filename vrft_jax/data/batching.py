"""Static-shape batches: encoded examples padded into the config's buckets, with bad records counted.

Every batch has the same shapes, so one compiled step serves them all:

  input_ids          int32[B, T]      prompts LEFT-padded with the pad token (the sampler continues
  attention_mask     int32[B, T]      from the last slot); 1 on real tokens
  positions          int32[B, T, 3]   M-RoPE ids, 0 on padding
  rope_deltas        int32[B]
  patches            dtype[B, P, D]   each row's image patches, zero-padded to the patch bucket
  patch_segment_ids  int32[B, P]      1 on the row's image patches, 0 on padding
  patch_positions    int32[B, P, 2]   (row, column) of each patch in its image

These are exactly `vrft_jax.models.qwen2_vl.pack_example`'s arrays (a test checks it); they are built
here directly into the batch (in shared memory when the batch leaves a worker process) because the
patch tensor is tens of MB per batch and every copy of it costs throughput.

`StaticBatchDataset` is the Grain transform: it draws examples until it has B good ones, counting the
`Rejected` markers it meets on the way; their counts ride in the batch, so they are exact however
many worker processes made the batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import grain.multiprocessing
import numpy as np

from vrft_jax.data import records as rec
from vrft_jax.data.image import CLIP_MEAN, CLIP_STD, write_patches
from vrft_jax.data.preprocess import Example
from vrft_jax.models.qwen2_vl import rope

# list[str] in `meta`; `problem` is the text as sent to the model (after DataConfig.problem_prefix).
TEXT_COLUMNS = ("id", "task", "label", "problem", "solution")
# Numeric meta columns: index int64[B] (position in the stored split), image_hw int32[B, 2] (height and
# width of the resized image the model sees: the PIXELS box frame), source_hw int32[B, 2] (the stored
# image), prompt_len int32[B] (real tokens), valid bool[B] (False on the padding rows of a final partial batch).
META_COLUMNS = TEXT_COLUMNS + ("index", "image_hw", "source_hw", "prompt_len", "valid")
INPUT_NAMES = ("input_ids", "attention_mask", "positions", "rope_deltas", "patches", "patch_segment_ids",
               "patch_positions")


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The static shapes: `batch_size` rows of `text_len` tokens and `patch_bucket` patches of `patch_dim`."""

    batch_size: int
    text_len: int
    patch_bucket: int
    patch_dim: int
    merge_size: int
    pad_id: int
    temporal_patch_size: int = 2
    patch_dtype: Any = np.float32
    image_stats: tuple = (CLIP_MEAN, CLIP_STD)  # the family's normalisation (`Qwen2VLConfig.image_stats`)

    def assemble(self, examples: Sequence[Example], rejected: Sequence[rec.Rejected] = (),
                 allocate=np.zeros) -> dict[str, Any]:
        """A host batch: {"inputs": arrays above, "meta": host columns, "skipped": counts}.

        Fewer than `batch_size` examples (the end of a finite stream) leave padding rows, valid=False:
        pad token, attention 0, zero patches, id "", index -1.
        `allocate(shape, dtype)` makes the zero-filled patch tensor (a shared-memory array inside workers).
        """
        b, t, p = self.batch_size, self.text_len, self.patch_bucket
        if len(examples) > b:
            raise ValueError(f"a batch holds at most {b} examples, got {len(examples)}")
        input_ids = np.full((b, t), self.pad_id, np.int32)
        attention_mask = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t, 3), np.int32)
        rope_deltas = np.zeros((b,), np.int32)
        patches = allocate((b, p, self.patch_dim), np.dtype(self.patch_dtype))
        segment_ids = np.zeros((b, p), np.int32)
        patch_positions = np.zeros((b, p, 2), np.int32)
        meta: dict[str, Any] = {name: [""] * b for name in TEXT_COLUMNS}
        meta.update(index=np.full((b,), -1, np.int64), image_hw=np.zeros((b, 2), np.int32),
                    source_hw=np.zeros((b, 2), np.int32), prompt_len=np.zeros((b,), np.int32),
                    valid=np.zeros((b,), bool))
        for row, example in enumerate(examples):
            length, n = len(example.input_ids), len(example.pixels)
            if length > t or n > p:  # the encoder rejects these; reaching here is a bug, not bad data
                raise AssertionError(f"example {example.meta['id']!r} ({length} tokens, {n} patches) "
                                     f"exceeds the buckets ({t}, {p})")
            input_ids[row, t - length:] = example.input_ids
            attention_mask[row, t - length:] = 1
            positions[row, t - length:] = example.positions
            rope_deltas[row] = example.rope_delta
            write_patches(example.pixels, patches[row, :n], self.temporal_patch_size, self.image_stats)
            segment_ids[row, :n] = 1
            patch_positions[row, :n] = rope.vision_patch_positions(example.grid_thw, self.merge_size)
            for name in TEXT_COLUMNS:
                meta[name][row] = example.meta[name]
            meta["index"][row] = example.meta["index"]
            meta["image_hw"][row] = example.meta["image_hw"]
            meta["source_hw"][row] = example.meta["source_hw"]
            meta["prompt_len"][row] = length
            meta["valid"][row] = True
        skipped: dict[str, int] = {}
        for r in rejected:
            skipped[r.reason] = skipped.get(r.reason, 0) + 1
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                      rope_deltas=rope_deltas, patches=patches, patch_segment_ids=segment_ids,
                      patch_positions=patch_positions)
        return {"inputs": inputs, "meta": meta, "skipped": skipped,
                "skipped_records": [f"{r.where}: {r.reason}: {r.detail}" for r in rejected]}


class StaticBatchDataset(grain.IterDataset):
    """Grain transform: a stream of `Example | Rejected | PADDING` -> a stream of static-shape host batches.

    `PADDING` items become valid=False rows. `drop_remainder` drops a final partial batch (and so loses
    the count of records skipped in it); otherwise the final batch is padded with valid=False rows.
    `give_up_after` consecutive rejections (e.g. the dataset size: every record was bad) stop the stream
    with an error rather than spinning forever on an infinitely repeated, wholly bad dataset.
    """

    def __init__(self, parent: grain.IterDataset, layout: BatchLayout, *, drop_remainder: bool = True,
                 give_up_after: int = 100_000):
        super().__init__(parent)
        self._layout, self._drop_remainder, self._give_up_after = layout, drop_remainder, give_up_after
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by `mp_prefetch`: build the patch tensor straight into shared memory (no extra copy)."""
        self._shared_memory = True

    def __iter__(self) -> _StaticBatchIterator:
        return _StaticBatchIterator(self._parent.__iter__(), self._layout, self._drop_remainder,
                                    self._give_up_after, self._shared_memory)

    def __str__(self) -> str:
        return f"StaticBatchDataset(layout={self._layout}, drop_remainder={self._drop_remainder})"


class _StaticBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, layout: BatchLayout, drop_remainder: bool, give_up_after: int, shared_memory: bool):
        super().__init__(parent)
        self._layout, self._drop_remainder, self._give_up_after = layout, drop_remainder, give_up_after
        # Fresh shared memory is zero-filled, like np.zeros.
        self._allocate = grain.multiprocessing.SharedMemoryArray if shared_memory else np.zeros

    def __next__(self) -> dict[str, Any]:
        examples: list[Example] = []
        rejected: list[rec.Rejected] = []
        in_a_row = padding = 0
        while len(examples) + padding < self._layout.batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                break
            if isinstance(item, rec.Padding):  # only at the end of a finite stream
                padding += 1
            elif isinstance(item, rec.Rejected):
                rejected.append(item)
                in_a_row += 1
                if in_a_row >= self._give_up_after:
                    raise rec.BadRecordError(item.where, item.reason, f"{in_a_row} records in a row were rejected "
                                             f"(is every record bad?); the last: {item.detail}")
            else:
                examples.append(item)
                in_a_row = 0
        drawn = len(examples) + padding
        if not drawn or (self._drop_remainder and drawn < self._layout.batch_size):
            raise StopIteration
        return self._layout.assemble(examples, rejected, allocate=self._allocate)

    # The batch consumes exactly the elements it reports, so the parent's position is this iterator's.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)

