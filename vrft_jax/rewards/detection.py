"""Detection rewards: IoU and confidence of predicted boxes (Visual-RFT `grpo.py`; visual-rft.md §5.1).

Both rewards come from one reading and one matching of the boxes (`score_detection`), done
once per batch when `combine` sums them. Predictions, sorted by confidence (highest first),
are matched greedily one-to-one to the ground-truth boxes; a pair counts when its IoU is
strictly above 0.5.

    detection_iou         = min(1, sum of matched IoUs / max(#gt, #pred))             in [0, 1]
    detection_confidence  = clip(mean over predictions of (c if matched else 1 - c), 0, 1)   in [0, 1]

Paper mode reproduces `accuracy_reward_iou` and `accuracy_reward_confidence` except the
`math_verify` shortcut (left out: a spurious symbolic match paid 1.0 with no box check). Quirks kept:
- The answer is `re.search(r'<answer>(.*?)</answer>')` without DOTALL: a newline inside the
  answer loses it, and then the whole completion is read as the answer (so a bare box list with
  no tags scores).
- Text fixes before reading: `[[` -> `[`, `]]` -> `]`, newlines removed; an answer not ending in `]`
  is "repaired" by cutting after the last `},` and closing with `}]` (which drops its last box);
  `'` -> `"`; then `json.loads`, so the whole answer must be valid JSON after those fixes.
- Any failure scores 0: unreadable list, empty list, first element not a dict, an element without
  Position, a Confidence missing or not a number (then both rewards are 0), a Position that is not
  four numbers when it reaches the IoU step (a box after every gt box is matched never does).
- Duplicate Positions are dropped (first kept; 1 == 1.0; NaN equals NaN, json shares one NaN).
- Confidences are not checked: NaN sorts as Python's sort leaves it; a confidence of inf or
  above 1 can raise the confidence reward, which is then clipped to [0, 1].
- Ground truth "No Objects" scores 0 whatever the prediction (the original cannot read it).
The original returns NaN for the confidence reward when a confidence is NaN (the crash of
Liuziyu77/Visual-RFT#39); paper mode returns 0 there, the value of every other unusable answer.

Strict mode (our recipes' default) differs:
- The answer is the text between the first `<answer>` and the next `</answer>` (newlines
  allowed), or to the end when the completion was cut off; no answer tag scores 0.
- Boxes are read in JSON or Python quoting without the text fixes; a truncated list keeps its
  complete boxes; any other `{...}` object counts as an invalid box.
- Invalid boxes (NaN, infinite or out-of-range [0, 1] confidence; degenerate x2 <= x1 or y2 <= y1;
  outside the frame [0, W] x [0, H]) never match, add 0 to the confidence sum, and count in #pred.
- More than `max_boxes` (default 100, at least #gt) objects scores 0 (bounded work, box spam).
- "No Objects" (or `[]`) is an abstention: 1 for both rewards when the gt has no box, else 0.
- `iou_threshold` may be set (paper mode: 0.5).

Ground truth (both modes): `[{'Position': [x1, y1, x2, y2], ...}, ...]` in answer tags, "No Objects",
or `[]`; a solution that is none of these, or has a non-finite or inverted box, raises ValueError.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from vrft_jax.rewards import parse
from vrft_jax.rewards.boxes import greedy_match, pad_ragged, pairwise_iou
from vrft_jax.rewards.frames import Frame, convert_boxes, frame_extent, frame_of, image_hw_of
from vrft_jax.rewards.registry import Reward, SharedPass, register, strict_only

PAPER_IOU_THRESHOLD = 0.5
DEFAULT_MAX_BOXES = 100
# Elements of one padded [chunk, P, G] IoU block: bounds memory, keeps NumPy calls large.
_BLOCK_ELEMENTS = 1 << 19


class DetectionScores(NamedTuple):
    """Both detection rewards of a batch: iou float64[N] and confidence float64[N], in [0, 1]."""

    iou: np.ndarray
    confidence: np.ndarray


@functools.lru_cache(maxsize=1 << 14)
def _solution(text: str) -> tuple[np.ndarray, bool]:
    # A batch repeats each solution once per sample of its group, so reading it once pays.
    xyxy, no_objects = parse.detection_solution(text)
    xyxy.setflags(write=False)
    return xyxy, no_objects


def _pow2_at_least(values: np.ndarray) -> np.ndarray:
    return 1 << np.ceil(np.log2(np.maximum(values, 1))).astype(np.int64)


def score_detection(
    completions: Sequence[str],
    solutions: Sequence[str],
    *,
    mode: str = "strict",
    frame: str | Frame = Frame.REL1000,
    solution_frame: str | Frame | None = None,
    iou_threshold: float = PAPER_IOU_THRESHOLD,
    max_boxes: int = DEFAULT_MAX_BOXES,
    image_hw: Sequence[Sequence[float]] | None = None,
) -> DetectionScores:
    """IoU and confidence rewards of N completions against their N solutions (module docstring).

    frame: the frame the model writes boxes in; solution_frame: the one the solutions are stored
    in (default: the same). image_hw: per example, (height, width) of the image the model saw;
    needed for the pixels frame in strict mode (frame bounds) and to convert between frames.
    """
    paper = mode == "paper"
    frame = frame_of(frame)
    solution_frame = frame if solution_frame is None else frame_of(solution_frame)
    n = len(completions)
    hw = None
    if (frame is Frame.PIXELS and not paper) or solution_frame is not frame:
        if image_hw is None:
            raise ValueError(
                f"detection with frame {frame.value} and solution_frame {solution_frame.value} "
                "needs the column image_hw: (height, width) per example"
            )
        hw = [image_hw_of(v, i) for i, v in enumerate(image_hw)]

    gt_flat: list[np.ndarray] = []
    gt_count = np.zeros(n, dtype=np.int64)
    gt_no_objects = np.zeros(n, dtype=bool)
    for i, text in enumerate(solutions):
        try:
            xyxy, gt_no_objects[i] = _solution(text)
        except ValueError as error:
            raise ValueError(f"solutions[{i}]: {error}: {text[:200]!r}") from None
        if solution_frame is not frame:
            xyxy = convert_boxes(xyxy, solution_frame, frame, hw[i])
        gt_flat.append(xyxy)
        gt_count[i] = len(xyxy)

    pred_xyxy: list[float] = []
    pred_conf: list[float] = []
    pred_readable: list[bool] = []
    pred_count = np.zeros(n, dtype=np.int64)
    unreadable = np.zeros(n, dtype=bool)
    for i, text in enumerate(completions):
        if paper:
            found = parse.paper_predictions(text)
        else:
            answer = parse.strict_answer(text, allow_unclosed=True)
            cap = max(max_boxes, int(gt_count[i]))
            found = None if answer is None else parse.strict_predictions(answer, cap)
        if found is None:
            unreadable[i] = True
            continue
        pred_xyxy.extend(found.xyxy)
        pred_conf.extend(found.conf)
        pred_readable.extend(found.readable)
        pred_count[i] = len(found.conf)

    box = parse.as_float64(pred_xyxy).reshape(-1, 4)
    conf = parse.as_float64(pred_conf)
    if paper:
        may_match = np.array(pred_readable, dtype=bool)
    else:
        # Matching order: by confidence, highest first, stably, each example's boxes together;
        # unreadable (NaN) boxes last. Paper mode's reader sorted with Python's sort already.
        owner = np.repeat(np.arange(n), pred_count)
        order = np.argsort(np.where(np.isnan(conf), np.inf, -conf), kind="stable")
        order = order[np.argsort(owner[order], kind="stable")]
        box, conf = box[order], conf[order]
        if hw is None:
            width, height = frame_extent(frame)
        else:
            extent = np.array([frame_extent(frame, size) for size in hw]).reshape(n, 2)
            width, height = extent[owner, 0], extent[owner, 1]
        x1, y1, x2, y2 = box.T
        # Comparisons with NaN are False, so these also reject non-finite values.
        may_match = (
            (0 <= conf) & (conf <= 1)
            & (0 <= x1) & (x1 < x2) & (x2 <= width)
            & (0 <= y1) & (y1 < y2) & (y2 <= height)
        )

    iou_sum, conf_sum, raised = _match_and_sum(
        box, conf, may_match, pred_count, gt_flat, gt_count, iou_threshold, paper
    )
    with np.errstate(all="ignore"):
        iou = np.minimum(iou_sum / np.maximum(np.maximum(gt_count, pred_count), 1), 1.0)
        confidence = np.clip(conf_sum / np.maximum(pred_count, 1), 0.0, 1.0)
    confidence = np.where(np.isnan(confidence), 0.0, confidence)
    failed = unreadable | raised
    if paper:
        failed |= gt_no_objects
    else:
        abstained = ~unreadable & (pred_count == 0)
        iou = np.where(abstained, (gt_count == 0).astype(np.float64), iou)
        confidence = np.where(abstained, (gt_count == 0).astype(np.float64), confidence)
    return DetectionScores(np.where(failed, 0.0, iou), np.where(failed, 0.0, confidence))


def _match_and_sum(
    box: np.ndarray,
    conf: np.ndarray,
    may_match: np.ndarray,
    pred_count: np.ndarray,
    gt_flat: list[np.ndarray],
    gt_count: np.ndarray,
    threshold: float,
    paper: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: sum of matched IoUs, sum of confidence terms, and (paper) whether it raised.

    Sums run over predictions in matching order, one at a time, as the original's loop adds
    them, so paper mode's float64 values are the original's. Examples are grouped by padded
    sizes (powers of two) and scored a block at a time.
    """
    n = len(pred_count)
    iou_sum, conf_sum = np.zeros(n), np.zeros(n)
    raised = np.zeros(n, dtype=bool)
    gt_box = np.concatenate([np.zeros((0, 4)), *gt_flat])
    pred_start = np.cumsum(pred_count) - pred_count
    gt_start = np.cumsum(gt_count) - gt_count
    active = np.flatnonzero(pred_count > 0)
    pred_width = _pow2_at_least(pred_count[active])
    gt_width = _pow2_at_least(gt_count[active])
    for width_p, width_g in sorted(set(zip(pred_width.tolist(), gt_width.tolist()))):
        members = active[(pred_width == width_p) & (gt_width == width_g)]
        block = max(1, _BLOCK_ELEMENTS // (width_p * width_g))
        for lo in range(0, len(members), block):
            rows = members[lo : lo + block]
            count = pred_count[rows]
            pred = pad_ragged(box, pred_start[rows], count, width_p, np.nan)
            gt = pad_ragged(gt_box, gt_start[rows], gt_count[rows], width_g, np.nan)
            real = np.arange(width_p)[None, :] < count[:, None]
            ok = pad_ragged(may_match, pred_start[rows], count, width_p, False)
            gt_real = np.arange(width_g)[None, :] < gt_count[rows][:, None]
            matched, gt_left = greedy_match(pairwise_iou(pred, gt), ok, gt_real, threshold)
            c = pad_ragged(conf, pred_start[rows], count, width_p, 0.0)
            # The original's (1 - iou) * (1 - c) for an unmatched box (iou 0) and c for a matched one.
            with np.errstate(all="ignore"):
                term = np.where(matched > 0, c, 1.0 - c)
            term = np.where(real & (ok | paper), term, 0.0)
            # cumsum adds left to right, like the original's loop (np.sum would add pairwise).
            with np.errstate(all="ignore"):  # inf - inf: paper mode's NaN, reported as 0
                iou_sum[rows] = np.cumsum(matched, axis=1)[:, -1]
                conf_sum[rows] = np.cumsum(term, axis=1)[:, -1]
            if paper:
                # calculate_iou unpacks Position only for predictions that meet an unmatched gt box.
                raised[rows] = (real & ~ok & gt_left).any(-1)
    return iou_sum, conf_sum, raised


def _detection_reward(
    name: str,
    field: str,
    mode: str,
    frame: str,
    solution_frame: str | None,
    iou_threshold: float | None,
    max_boxes: int | None,
) -> Reward:
    strict_only(mode, name, iou_threshold=iou_threshold, max_boxes=max_boxes)
    frame_value = frame_of(frame)
    solution_value = None if solution_frame is None else frame_of(solution_frame)
    threshold = PAPER_IOU_THRESHOLD if iou_threshold is None else float(iou_threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{name}: iou_threshold must be in [0, 1), got {iou_threshold!r}")
    cap = DEFAULT_MAX_BOXES if max_boxes is None else int(max_boxes)
    if cap < 1:
        raise ValueError(f"{name}: max_boxes must be at least 1, got {max_boxes!r}")

    def score_both(
        completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> DetectionScores:
        return score_detection(
            completions,
            solutions,
            mode=mode,
            frame=frame_value,
            solution_frame=solution_value,
            iou_threshold=threshold,
            max_boxes=cap,
            image_hw=columns.get("image_hw"),
        )

    key = ("detection", mode, frame_value, solution_value, threshold, cap)
    return Reward(name, mode, 0.0, 1.0, ("image_hw",), SharedPass(key, score_both, field))


@register("detection_iou")
def detection_iou(
    mode: str,
    frame: str = "qwen2_vl",
    solution_frame: str | None = None,
    iou_threshold: float | None = None,
    max_boxes: int | None = None,
) -> Reward:
    """IoU reward in [0, 1]: matched IoUs summed over max(#gt, #pred), capped at 1."""
    return _detection_reward(
        "detection_iou", "iou", mode, frame, solution_frame, iou_threshold, max_boxes
    )


@register("detection_confidence")
def detection_confidence(
    mode: str,
    frame: str = "qwen2_vl",
    solution_frame: str | None = None,
    iou_threshold: float | None = None,
    max_boxes: int | None = None,
) -> Reward:
    """Confidence reward in [0, 1]: mean of c over matched and 1 - c over unmatched predictions."""
    return _detection_reward(
        "detection_confidence", "confidence", mode, frame, solution_frame, iou_threshold, max_boxes
    )
