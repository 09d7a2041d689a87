"""Reasoning-grounding reward: GIoU of `(x1,y1),(x2,y2)` boxes (Visual-RFT `grpo_lisa.py`; §5.3).

Paper mode reproduces `accuracy_reward` of grpo_lisa.py except the `math_verify` shortcut:
`GIoU + 1` of the predicted and the ground-truth box, or 2.0 when the answer equals the ground
truth as a string. Quirks kept:
- The prediction's answer is read with DOTALL, the ground truth's without; each falls back to
  the whole text when it has no answer tags; both stripped.
- Boxes are integers only (any Unicode digits), divided by 1000; the original lists all top-left
  corners, then all bottom-right ones, and compares items 0 and 1: with two or more boxes the
  "box" is the first two top-left corners (Liuziyu77/Visual-RFT, §5.3). No box scores 0.
- The exact-match bonus: 2.0 when the stripped answer equals the stripped ground truth.
- Boxes are not checked: an inverted prediction is scored by the same formulas. With one axis
  inverted its area is negative and the value falls far below 0; with both inverted its "area" is
  positive and can exceed the enclosing box's, which pushes GIoU above 1 without bound (e.g.
  `(999,150),(0,100)` against a ground truth of `(0,0),(100,100)` scores 5.995): a reward hack the
  original leaves open, closed in strict mode. Values that overflow are reported as 0.
Range: finite, unbounded in both directions.

Strict mode (our recipes' default) scores every predicted box correctly:
- The answer is the text inside the first `<answer>...</answer>`; no closed answer tag scores 0.
- Every `(x1,y1),(x2,y2)` box in it is read (decimals allowed); invalid ones (degenerate, x2 <= x1
  or y2 <= y1, or outside the frame) score 0. More than `max_boxes` (default 10) scores 0.
- Predicted and ground-truth boxes are matched one-to-one, highest GIoU first; each pair scores
  GIoU + 1, and the sum is divided by max(#gt, #pred), so extra boxes cost and cannot help.
- No exact-match bonus: equal boxes already score GIoU + 1 = 2.
Range: [0, 2].

Ground truth: at least one box (strict: each with x1 <= x2, y1 <= y2), else ValueError.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.rewards import parse
from vrft_jax.rewards.boxes import pairwise_giou
from vrft_jax.rewards.frames import Frame, answer_in_frame, convert_boxes, frame_extent, frame_of, image_hw_of
from vrft_jax.rewards.registry import Reward, register, strict_only

DEFAULT_MAX_BOXES = 10
Point = tuple[float, float]


def paper_giou_plus_one(truth: tuple[Point, Point], pred: tuple[Point, Point]) -> float:
    """grpo_lisa.py's `compute_giou`: GIoU + 1, same arithmetic, no checks on the boxes."""
    (gx1, gy1), (gx2, gy2) = truth
    (px1, py1), (px2, py2) = pred
    inter = max(0, min(gx2, px2) - max(gx1, px1)) * max(0, min(gy2, py2) - max(gy1, py1))
    union = (gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter
    iou = inter / union if union > 0 else 0
    enclosing = (max(gx2, px2) - min(gx1, px1)) * (max(gy2, py2) - min(gy1, py1))
    giou = iou - (enclosing - union) / enclosing if enclosing > 0 else iou
    return giou + 1


def _paper_truth(text: str) -> str:
    answer = parse.answer_one_line(text)
    return (text if answer is None else answer).strip()


@functools.lru_cache(maxsize=1 << 14)
def _paper_solution(text: str) -> tuple[str, tuple[Point, Point]]:
    truth = _paper_truth(text)
    pair = parse.paper_point_pair(truth)
    if pair is None:
        raise ValueError("no (x1,y1),(x2,y2) box")
    return truth, pair


@functools.lru_cache(maxsize=1 << 14)
def _strict_solution(text: str) -> np.ndarray:
    answer = parse.strict_answer(text, allow_unclosed=False)
    boxes = parse.strict_point_boxes(text if answer is None else answer, max_boxes=1 << 30)
    if boxes is None:
        raise ValueError("no (x1,y1),(x2,y2) box")
    parse.check_solution_boxes(boxes)
    boxes.setflags(write=False)
    return boxes


def strict_grounding_score(pred: np.ndarray, truth: np.ndarray, width: float, height: float) -> float:
    """Strict reward in [0, 2] of predicted boxes float64[P, 4] against gt boxes float64[G, 4]."""
    x1, y1, x2, y2 = pred.T
    valid = (0 <= x1) & (x1 < x2) & (x2 <= width) & (0 <= y1) & (y1 < y2) & (y2 <= height)
    giou = np.where(valid[:, None], pairwise_giou(pred, truth), -np.inf)
    total = 0.0
    for _ in range(min(len(pred), len(truth))):
        k, g = np.unravel_index(np.argmax(giou), giou.shape)
        if giou[k, g] == -np.inf:
            break
        total += giou[k, g] + 1.0
        giou[k, :] = -np.inf
        giou[:, g] = -np.inf
    return total / max(len(pred), len(truth))


@register("grounding_giou")
def grounding_giou(
    mode: str,
    frame: str = "qwen2_vl",
    solution_frame: str | None = None,
    max_boxes: int | None = None,
) -> Reward:
    """GIoU + 1 of the predicted box(es) and the ground truth (module docstring for both modes)."""
    strict_only(mode, "grounding_giou", max_boxes=max_boxes)
    frame_value = frame_of(frame)
    solution_value = frame_value if solution_frame is None else frame_of(solution_frame)
    if mode == "paper":
        # The paper compares raw numbers: a stored answer in another frame is first written in the model's
        # (`answer_in_frame`), so "the same answer" keeps its meaning (its exact-text bonus included).
        convert = solution_value is not frame_value

        def score_paper(
            completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
        ) -> np.ndarray:
            out = np.zeros(len(completions))
            image_hw = columns.get("image_hw")
            if convert and image_hw is None:
                raise ValueError(f"grounding_giou with frame {frame_value.value} and solution_frame "
                                 f"{solution_value.value} needs the column image_hw: (height, width) per example")
            for i, (text, solution) in enumerate(zip(completions, solutions)):
                if convert:
                    solution = answer_in_frame(solution, solution_value, frame_value, image_hw_of(image_hw[i], i))
                try:
                    truth, truth_pair = _paper_solution(solution)
                except ValueError as error:
                    raise ValueError(f"solutions[{i}]: {error}: {solution[:200]!r}") from None
                answer = parse.answer_any_lines(text)
                answer = (text if answer is None else answer).strip()
                pair = parse.paper_point_pair(answer)
                out[i] = 0.0 if pair is None else paper_giou_plus_one(truth_pair, pair)
                if answer == truth:
                    out[i] = 2.0
            return out

        return Reward("grounding_giou", mode, -np.inf, np.inf, ("image_hw",) if convert else (), score_paper)

    cap = DEFAULT_MAX_BOXES if max_boxes is None else int(max_boxes)
    if cap < 1:
        raise ValueError(f"grounding_giou: max_boxes must be at least 1, got {max_boxes!r}")
    needs_size = frame_value is Frame.PIXELS or solution_value is not frame_value

    def score_strict(
        completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> np.ndarray:
        image_hw = columns.get("image_hw")
        if needs_size and image_hw is None:
            raise ValueError(
                f"grounding_giou with frame {frame_value.value} and solution_frame "
                f"{solution_value.value} needs the column image_hw: (height, width) per example"
            )
        out = np.zeros(len(completions))
        for i, (text, solution) in enumerate(zip(completions, solutions)):
            try:
                truth = _strict_solution(solution)
            except ValueError as error:
                raise ValueError(f"solutions[{i}]: {error}: {solution[:200]!r}") from None
            size = image_hw_of(image_hw[i], i) if needs_size else None
            if solution_value is not frame_value:
                truth = convert_boxes(truth, solution_value, frame_value, size)
            answer = parse.strict_answer(text, allow_unclosed=False)
            pred = None if answer is None else parse.strict_point_boxes(answer, cap)
            if pred is not None:
                out[i] = strict_grounding_score(pred, truth, *frame_extent(frame_value, size))
        return out

    return Reward("grounding_giou", mode, 0.0, 2.0, ("image_hw",), score_strict)
