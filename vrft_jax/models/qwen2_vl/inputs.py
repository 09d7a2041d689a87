"""Static-shape model inputs, built on the host with NumPy.

A batch is a `ModelInputs` of fixed shapes: text padded to `T` tokens, each row's image patches
padded to a bucket of `P` patches. `pack_example` builds one row (the data pipeline calls it per
example); `ModelInputs.from_hf` turns exactly what HF's processor returns into a batch, so the model
can be called like `Qwen2VLForConditionalGeneration`.
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np

from vrft_jax.models.qwen2_vl import rope
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig


class InputError(ValueError):
    pass


@flax.struct.dataclass
class ModelInputs:
    """One static-shape batch.

    input_ids:          int32[B, T]
    attention_mask:     int32[B, T], 1 for real tokens (left or right padding both allowed)
    positions:          int32[B, T, 3] M-RoPE (time, row, column) ids; 0 on padding
    rope_deltas:        int32[B], generated token n (0-based, counting valid tokens) sits at n + delta
    patches:            float[B, P, C*t*p*p] each row's image patches, zero-padded to the bucket P
    patch_segment_ids:  int32[B, P], k for the k-th image of the row (1-based), 0 for padding
    patch_positions:    int32[B, P, 2] (row, column) of each patch within its image
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    positions: jax.Array
    rope_deltas: jax.Array
    patches: jax.Array
    patch_segment_ids: jax.Array
    patch_positions: jax.Array

    @classmethod
    def from_hf(cls, config: Qwen2VLConfig, input_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, *, patch_bucket: int | None = None, mm_token_type_ids=None,
                patch_dtype=np.float32) -> ModelInputs:
        """From HF processor outputs (NumPy or torch): images are taken in order over the batch rows."""
        input_ids = _numpy(input_ids).astype(np.int32)
        batch, length = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else _numpy(attention_mask)
        grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else _numpy(image_grid_thw).reshape(-1, 3)
        pixel_values = None if pixel_values is None else _numpy(pixel_values)
        token_types = None if mm_token_type_ids is None else _numpy(mm_token_type_ids)
        sizes = grids.prod(axis=1)
        if pixel_values is not None and pixel_values.shape[0] != sizes.sum():
            raise InputError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw implies {sizes.sum()}")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        rows, used = [], 0
        for b in range(batch):
            types = None if token_types is None else token_types[b]
            n = rope.count_images(input_ids[b], config.image_token_id, attention_mask[b], types)
            images = [pixel_values[starts[i]:starts[i + 1]] for i in range(used, used + n)]
            rows.append((images, grids[used:used + n], types))
            used += n
        if used != len(grids):
            raise InputError(f"input_ids hold {used} images but image_grid_thw lists {len(grids)}")
        needed = max([sum(int(g.prod()) for g in r[1]) for r in rows] + [config.vision.merge_tokens])
        bucket = patch_bucket or default_patch_bucket(needed)
        examples = [pack_example(config, input_ids[b], rows[b][0], rows[b][1], attention_mask=attention_mask[b],
                                 patch_bucket=bucket, token_types=rows[b][2], patch_dtype=patch_dtype, row=b)
                    for b in range(batch)]
        return cls(**{k: np.stack([e[k] for e in examples]) for k in examples[0]})


def default_patch_bucket(num_patches: int) -> int:
    """Smallest power of two holding `num_patches` (a multiple of merge^2 for any merge <= 2^k)."""
    return 1 << max(2, int(num_patches - 1).bit_length())


def pack_example(config: Qwen2VLConfig, input_ids, images, grids_thw, *, attention_mask=None, patch_bucket: int,
                 token_types=None, patch_dtype=np.float32, row=None) -> dict[str, np.ndarray]:
    """The arrays of one row: its tokens (already padded to the text bucket) and its images' patches
    (each `float[t*h*w, C*t*p*p]`, in processor order) padded to `patch_bucket`."""
    v = config.vision
    where = f"row {row}: " if row is not None else ""
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    grids_thw = np.asarray(grids_thw, np.int64).reshape(-1, 3)
    if len(images) != len(grids_thw):
        raise InputError(f"{where}{len(images)} images but {len(grids_thw)} grids")
    positions, delta = rope.rope_positions(input_ids, grids_thw, merge=v.spatial_merge_size,
                                           image_token_id=config.image_token_id, attention_mask=attention_mask,
                                           token_types=token_types, row=row)
    total = int(sum(int(g.prod()) for g in grids_thw))
    if total > patch_bucket:
        raise InputError(f"{where}its images have {total} patches, more than the patch bucket of {patch_bucket}")
    if patch_bucket % v.merge_tokens:
        raise InputError(f"patch bucket {patch_bucket} is not a multiple of {v.merge_tokens}")
    patches = np.zeros((patch_bucket, v.patch_dim), patch_dtype)
    segments = np.zeros((patch_bucket,), np.int32)
    patch_pos = np.zeros((patch_bucket, 2), np.int32)
    start = 0
    for k, (image, grid) in enumerate(zip(images, grids_thw), start=1):
        n = int(grid.prod())
        if image.shape != (n, v.patch_dim):
            raise InputError(f"{where}image {k} has patches of shape {image.shape}, expected {(n, v.patch_dim)}")
        patches[start:start + n] = image
        segments[start:start + n] = k
        patch_pos[start:start + n] = rope.vision_patch_positions(grid, v.spatial_merge_size)
        start += n
    return dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions.T.astype(np.int32),
                rope_deltas=np.int32(delta), patches=patches, patch_segment_ids=segments, patch_positions=patch_pos)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)
