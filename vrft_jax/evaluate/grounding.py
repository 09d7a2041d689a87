"""Reasoning grounding (LISA): box mIoU and cIoU; mask gIoU and cIoU only when masks exist.

    mIoU = mean over examples of IoU(predicted box, ground-truth box); no box read counts as IoU 0
           (Visual-RFT's lisa_evaluation/merge_eval.py)
    cIoU = sum of intersections / sum of unions, in the image's pixels (a miss adds the truth's area)

Mask gIoU/cIoU need ground-truth masks and a box-to-mask step (Visual-RFT prompts SAM with the box); without
them they are reported as absent (None, with the reason), never as 0.
"""

from __future__ import annotations

from collections.abc import Sequence


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_metrics(predicted: Sequence[Sequence[float] | None], truth: Sequence[Sequence[float]]) -> dict:
    """{"mIoU", "cIoU", "examples", "no_box"} of boxes in one frame (pixels, for cIoU's weights)."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} ground-truth boxes")
    ious, inter_sum, union_sum, missing = [], 0.0, 0.0, 0
    for pred, gt in zip(predicted, truth):
        if pred is None:
            missing += 1
            ious.append(0.0)
            union_sum += _area(gt)
            continue
        w = max(0.0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
        h = max(0.0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
        inter = w * h
        union = _area(pred) + _area(gt) - inter
        ious.append(inter / union if union > 0 else 0.0)
        inter_sum += inter
        union_sum += union
    n = len(truth)
    return {"mIoU": sum(ious) / n if n else None, "cIoU": inter_sum / union_sum if union_sum > 0 else None,
            "examples": n, "no_box": missing}


MASKS_ABSENT = "absent: the data has no ground-truth masks and no box-to-mask step is configured"


def mask_metrics_absent() -> dict:
    return {"mask_gIoU": None, "mask_cIoU": None, "mask_metrics": MASKS_ABSENT}
