"""Box geometry on NumPy arrays: IoU, GIoU and greedy one-to-one matching, batched.

Boxes are float64[..., 4] as (x1, y1, x2, y2), in any one frame (IoU and GIoU do not depend on it).
`pairwise_iou` does Visual-RFT's `calculate_iou` arithmetic in the same order, so in float64 its
values equal the original's Python floats bit for bit.
"""
from __future__ import annotations

import numpy as np


def pairwise_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """float64[..., P, G]: IoU of every predicted box float64[..., P, 4] with every gt float64[..., G, 4].

    Visual-RFT's formula: 0 when the intersection is empty (`xi2 <= xi1 or yi2 <= yi1`), else
    `inter / (area_gt + area_pred - inter)`, with no +1 pixel convention. Boxes with NaN or
    infinite coordinates, or inverted ones, get 0 (the original never matches them either).
    """
    p = pred[..., :, None, :]
    g = gt[..., None, :, :]
    with np.errstate(all="ignore"):
        xi1 = np.maximum(g[..., 0], p[..., 0])
        yi1 = np.maximum(g[..., 1], p[..., 1])
        xi2 = np.minimum(g[..., 2], p[..., 2])
        yi2 = np.minimum(g[..., 3], p[..., 3])
        inter = (xi2 - xi1) * (yi2 - yi1)
        area_gt = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
        area_pred = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
        iou = inter / (area_gt + area_pred - inter)
    overlap = (xi2 > xi1) & (yi2 > yi1) & (iou > 0)  # False for NaN: never a match.
    return np.where(overlap, iou, 0.0)


def pairwise_giou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """float64[..., P, G] in [-1, 1]: generalised IoU, `iou - (enclosing - union) / enclosing`.

    For boxes with positive area; callers mask the others.
    """
    p = pred[..., :, None, :]
    g = gt[..., None, :, :]
    with np.errstate(all="ignore"):
        inter = np.clip(np.minimum(g[..., 2], p[..., 2]) - np.maximum(g[..., 0], p[..., 0]), 0, None)
        inter = inter * np.clip(
            np.minimum(g[..., 3], p[..., 3]) - np.maximum(g[..., 1], p[..., 1]), 0, None
        )
        area_gt = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
        area_pred = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
        union = area_gt + area_pred - inter
        enclosing = (np.maximum(g[..., 2], p[..., 2]) - np.minimum(g[..., 0], p[..., 0])) * (
            np.maximum(g[..., 3], p[..., 3]) - np.minimum(g[..., 1], p[..., 1])
        )
        giou = inter / union - (enclosing - union) / enclosing
    return np.where(np.isfinite(giou), np.clip(giou, -1.0, 1.0), -1.0)


def greedy_match(
    iou: np.ndarray, pred_ok: np.ndarray, gt_ok: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Visual-RFT's greedy one-to-one matching, for B examples at once.

    iou: float64[B, P, G], predictions already in matching order (highest confidence first).
    pred_ok: bool[B, P], predictions that may match. gt_ok: bool[B, G], real (unpadded) gt boxes.
    In turn, each prediction takes the not-yet-matched gt box of highest IoU (the first on ties);
    the pair counts if that IoU is strictly above `threshold`, and only then is the gt box used.

    Returns matched: float64[B, P], the IoU of each prediction's match, 0 when unmatched; and
    gt_left: bool[B, P], whether any gt box was still unmatched at that prediction's turn.
    """
    batch, num_pred, _ = iou.shape
    available = gt_ok.copy()
    matched = np.zeros((batch, num_pred))
    gt_left = np.zeros((batch, num_pred), dtype=bool)
    rows = np.arange(batch)
    for k in range(num_pred):
        gt_left[:, k] = available.any(-1)
        candidates = np.where(available, iou[:, k, :], 0.0)
        best_gt = candidates.argmax(-1)
        best = candidates[rows, best_gt]
        hit = pred_ok[:, k] & (best > threshold)
        available[rows[hit], best_gt[hit]] = False
        matched[:, k] = np.where(hit, best, 0.0)
    return matched, gt_left


def pad_ragged(
    flat: np.ndarray, start: np.ndarray, count: np.ndarray, width: int, fill: float | bool
) -> np.ndarray:
    """[B, width, ...] from B runs `flat[start[b] : start[b] + count[b]]`, padded with `fill`."""
    out = np.full((len(start), width) + flat.shape[1:], fill, dtype=flat.dtype)
    slot = np.arange(width)
    real = slot[None, :] < count[:, None]
    out[real] = flat[(start[:, None] + slot[None, :])[real]]
    return out
