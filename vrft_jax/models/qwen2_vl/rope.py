"""Rotary position embeddings of Qwen2-VL.

Host side (NumPy, run once per example in the data pipeline): the 3-D M-RoPE position ids of a token
sequence (a port of HF `Qwen2VLModel.get_rope_index`) and the (row, column) of every vision patch.
Device side (jnp): the cos/sin tables and their application, for the text decoder (M-RoPE with
`mrope_section`) and the vision tower (2-D axial rope).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


class RopeIndexError(ValueError):
    pass


# ---------------------------------------------------------------------------- host: position ids


def vision_grid_positions(grid_thw, merge: int, start: int) -> np.ndarray:
    """int64[3, t*h*w/merge^2]: (time, row, column) M-RoPE ids of one image's merged tokens, from `start`."""
    t, h, w = (int(x) for x in grid_thw)
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def rope_positions(input_ids, grids_thw, *, merge: int, image_token_id: int, attention_mask=None,
                   token_types=None, video_token_id: int | None = None, row: int | None = None):
    """M-RoPE ids of one sequence.

    Args:
      input_ids: int[T].
      grids_thw: int[n, 3], the (t, h, w) patch grid of each image in the order its tokens appear.
      attention_mask: int[T] or None; positions of padding stay 0, as in HF.
      token_types: int[T] or None (HF `mm_token_type_ids`: 0 text, 1 image, 2 video); derived from
        `input_ids` when None.
    Returns:
      (int64[3, T] positions, int delta) where delta = max position + 1 - number of valid tokens, so
      the token at valid index n continues at position n + delta.
    """
    input_ids = np.asarray(input_ids)
    where = f"row {row}: " if row is not None else ""
    valid = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if token_types is None:
        token_types = np.where(input_ids == image_token_id, IMAGE, TEXT)
        if video_token_id is not None:
            token_types = np.where(input_ids == video_token_id, VIDEO, token_types)
    types = np.asarray(token_types)[valid]
    grids = iter(np.asarray(grids_thw).reshape(-1, 3))
    chunks, current = [], 0
    for kind, run in itertools.groupby(types.tolist()):
        length = len(list(run))
        if kind == TEXT:
            chunks.append(np.broadcast_to(np.arange(length) + current, (3, length)))
            current += length
            continue
        grid = next(grids, None)
        if grid is None:
            raise RopeIndexError(f"{where}more image-token runs than image grids ({len(grids_thw)} given)")
        ids = vision_grid_positions(grid, merge, current)
        if ids.shape[1] != length:
            raise RopeIndexError(
                f"{where}an image-token run of {length} tokens does not match its grid {tuple(int(x) for x in grid)},"
                f" which merges to {ids.shape[1]} tokens")
        chunks.append(ids)
        current += max(int(grid[1]), int(grid[2])) // merge
    if next(grids, None) is not None:
        raise RopeIndexError(f"{where}fewer image-token runs than image grids ({len(grids_thw)} given)")
    positions = np.zeros((3, input_ids.shape[0]), np.int64)
    if not chunks:  # an all-padding row: HF cannot score it; ours is defined as zeros
        return positions, 0
    flat = np.concatenate(chunks, axis=1)
    positions[:, valid] = flat
    return positions, int(flat.max()) + 1 - int(valid.sum())


def get_rope_index(input_ids, image_grid_thw, *, merge: int, image_token_id: int, attention_mask=None,
                   mm_token_type_ids=None):
    """Port of HF `Qwen2VLModel.get_rope_index` for image inputs.

    Images are consumed in order over the flattened batch, as HF does.
    Returns (int64[3, B, T] position ids, int64[B, 1] rope deltas), equal to HF's outputs.
    """
    input_ids = np.asarray(input_ids)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    used = 0
    for b in range(batch):
        mask = None if attention_mask is None else np.asarray(attention_mask)[b]
        types = None if mm_token_type_ids is None else np.asarray(mm_token_type_ids)[b]
        n = count_images(input_ids[b], image_token_id, mask, types)
        positions[:, b], deltas[b, 0] = rope_positions(
            input_ids[b], grids[used:used + n], merge=merge, image_token_id=image_token_id,
            attention_mask=mask, token_types=types, row=b)
        used += n
    if used != len(grids):
        raise RopeIndexError(f"the batch has {used} image-token runs but {len(grids)} image grids")
    return positions, deltas


def count_images(input_ids, image_token_id: int, attention_mask=None, token_types=None) -> int:
    """Number of runs of image tokens (one run per image) among the valid tokens of a sequence."""
    is_image = (np.asarray(input_ids) == image_token_id) if token_types is None else (np.asarray(token_types) == IMAGE)
    if attention_mask is not None:
        is_image = is_image[np.asarray(attention_mask).astype(bool)]
    return int(np.sum(is_image[1:] & ~is_image[:-1]) + (is_image[:1].sum() if is_image.size else 0))


def vision_patch_positions(grid_thw, merge: int) -> np.ndarray:
    """int32[t*h*w, 2]: (row, column) of each patch of one image in the processor's patch order.

    The processor emits patches grouped in `merge x merge` blocks (so the merger can fold 4
    consecutive patches into one token); the ids follow the same block-major order.
    """
    t, h, w = (int(x) for x in grid_thw)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(block).transpose(0, 2, 1, 3).ravel()
    ww = ww.reshape(block).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hh, ww], axis=-1), (t, 1)).astype(np.int32)


# ---------------------------------------------------------------------------- device: cos / sin


def _inverse_frequencies(dim: int, theta: float) -> jnp.ndarray:
    """float32[dim/2]: 1 / theta^(2i/dim), computed in float32 as HF does."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_axes(section, interleaved: bool = False) -> np.ndarray:
    """int[head_dim/2]: which position id (0 time, 1 row, 2 column) each frequency of the half head reads.

    Chunked (Qwen2-VL, Qwen2.5-VL): the first section[0] frequencies read time, the next section[1] rows, the
    rest columns. Interleaved (Qwen3-VL, HF's `recomposition_frequencies`): frequency j < 3 * section[d] with
    j % 3 == d reads axis d (d = 1, 2); every other frequency reads time.
    """
    half = int(sum(section))
    if not interleaved:
        return np.repeat(np.arange(3), section)
    axes = np.zeros(half, np.int64)
    for axis in (1, 2):
        axes[axis:3 * int(section[axis]):3] = axis
    return axes


def mrope_cos_sin(positions_bt3, head_dim: int, theta: float, section,
                  interleaved: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32[B, T, head_dim] cos and sin of M-RoPE.

    Frequency j of the half head uses the time, row or column id that `mrope_axes` assigns it; the half is then
    repeated, as in HF's rotate-half layout.
    """
    inv = _inverse_frequencies(head_dim, theta)
    axis_of_freq = mrope_axes(section, interleaved)  # static, length head_dim/2
    pos = jnp.take(positions_bt3.astype(jnp.float32), jnp.asarray(axis_of_freq), axis=-1)  # [B, T, H/2]
    freqs = pos * inv
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def vision_cos_sin(patch_positions_bp2, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32[B, P, head_dim] cos and sin of the 2-D axial rope: rows on the first quarter, columns on the second."""
    inv = _inverse_frequencies(head_dim // 2, theta)  # [head_dim/4]
    pos = patch_positions_bp2.astype(jnp.float32)
    freqs = jnp.concatenate([pos[..., 0:1] * inv, pos[..., 1:2] * inv], axis=-1)  # [B, P, head_dim/2]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_btnh, cos_bth, sin_bth):
    """Rotate heads: x * cos + rotate_half(x) * sin, broadcasting the tables over heads."""
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return x_btnh * cos + rotate_half(x_btnh) * sin
