"""Completion text -> what an evaluation scores: detection boxes with scores, a class name, a grounding box.

Two readers per task. `visual_rft` reads as Visual-RFT's evaluation scripts do, so our numbers compare with
the paper's; `strict` reads what the prompt asks for and nothing else (our rewards' strict mode).

Detection, `visual_rft` (coco_evaluation/Qwen2_VL_coco_infere.py, also its LVIS twin), step by step:
  1. string fixes: `[[` -> `[`, `]]` -> `]`, newlines and `", ..."` removed;
  2. the answer is group 1 of `re.search(r'<answer>(.*?)</answer>')`, stripped; with no match, the whole
     stripped text; either way re-wrapped in answer tags;
  3. `extract_bbox`: the text between the first `<answer>` and the first `</answer>`; one not ending in `]`
     is taken as cut off: kept up to its last `},` and closed with `}]`; `'` -> `"`; `json.loads`;
  4. no list, or a list whose first item is a string: no boxes. An empty list, or any non-list: an error
     (no boxes, counted);
  5. `remove_duplicates` on `tuple(Position)` (first kept): an entry it cannot read is an error (no boxes);
  6. each box in order: `Position` unpacked as x1, y1, x2, y2 and scaled, then `Confidence` read; the first
     box that fails ends the list, the boxes before it are kept (the script appended them already).
  So an answer cut off before `</answer>` yields no box: step 3 then reads from the *wrapping* tag, and the
  `<think>` text in front makes it invalid JSON.
  Beyond the script, which would crash COCOeval or feed it NaN: a box with a score that is not a finite
  number, or a coordinate that is not finite, is dropped and counted.

Detection, `strict`: the text of the first `<answer>` (to its `</answer>`, or to the end when cut off), every
complete `{'Position': [...], 'Confidence': c}` object in it (`rewards.parse.strict_predictions`), each box with
finite numbers kept as written (the rest dropped and counted). A box with x2 <= x1 or y2 <= y1 is kept, as
the `visual_rft` reading keeps it: both hand COCOeval the same detections of the same answer, so both score it
as faster-coco-eval does (a ranked detection that matches no ground truth: a false positive, whichever axis is
inverted); dropping it would score a malformed answer above the paper's reading of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from vrft_jax.rewards import parse

READERS = ("visual_rft", "strict")
MAX_STRICT_BOXES = 300  # LVIS's detections per image


@dataclasses.dataclass(frozen=True)
class BoxReading:
    """Boxes read from one completion, in the frame the model wrote them.

    boxes:   [[x1, y1, x2, y2], ...] as floats
    scores:  one confidence per box
    status:  "boxes", "no_boxes" (an answer with none: `No Objects`, an abstention, or nothing readable) or
             "error" (the reader failed where Visual-RFT's script raises)
    dropped: boxes read but left out (a non-finite score or coordinate)
    """

    boxes: list[list[float]]
    scores: list[float]
    status: str
    dropped: int = 0


def check_reader(name: str) -> str:
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; known: {READERS}")
    return name


def read_boxes(completion: str, reader: str = "visual_rft") -> BoxReading:
    """The detection boxes of `completion` by `reader` (module docstring)."""
    if check_reader(reader) == "visual_rft":
        return _visual_rft_boxes(completion)
    return _strict_boxes(completion)


def _is_number(value) -> bool:
    return type(value) in (int, float, bool)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _visual_rft_boxes(completion: str) -> BoxReading:
    text = completion.replace("[[", "[").replace("]]", "]").replace("\n", "").replace(", ...", "")
    answer = parse.answer_one_line(text)  # no newline is left, so this is re.search without DOTALL
    wrapped = parse.ANSWER_OPEN + (text if answer is None else answer).strip() + parse.ANSWER_CLOSE
    body = wrapped[len(parse.ANSWER_OPEN):wrapped.find(parse.ANSWER_CLOSE)]
    if not body.endswith("]"):
        body = body.rsplit("},", 1)[0] + "}]"
    try:
        value = json.loads(body.replace("'", '"'))
    except ValueError:  # extract_bbox catches JSONDecodeError: no boxes
        return BoxReading([], [], "no_boxes")
    except RecursionError:  # which it does not catch
        return BoxReading([], [], "error")
    if type(value) is not list:
        # `value[0]` on a dict, number, bool or null raises in the script (a string is indexable: pass)
        return BoxReading([], [], "no_boxes" if type(value) is str else "error")
    if not value:
        return BoxReading([], [], "error")  # `bbox_list[0]` of an empty list raises
    if type(value[0]) is str:
        return BoxReading([], [], "no_boxes")
    unique, seen = [], set()
    try:
        for entry in value:
            key = tuple(entry["Position"])
            if key not in seen:
                seen.add(key)
                unique.append(entry)
    except (TypeError, KeyError, IndexError):
        return BoxReading([], [], "error")
    boxes, scores, dropped = [], [], 0
    for entry in unique:
        position = entry["Position"]
        if not (len(position) == 4 and all(map(_is_number, position))) or "Confidence" not in entry:
            return BoxReading(boxes, scores, "error", dropped)  # the script raises here; earlier boxes stay
        score = entry["Confidence"]
        coords = [float(v) for v in position]
        if not (_is_number(score) and _finite(score) and all(map(_finite, coords))):
            dropped += 1
            continue
        boxes.append(coords)
        scores.append(float(score))
    return BoxReading(boxes, scores, "boxes" if boxes else "no_boxes", dropped)


def _strict_boxes(completion: str) -> BoxReading:
    answer = parse.strict_answer(completion, allow_unclosed=True)
    if answer is None:
        return BoxReading([], [], "no_boxes")
    found = parse.strict_predictions(answer, MAX_STRICT_BOXES)
    if found is None:
        return BoxReading([], [], "no_boxes")
    boxes, scores, dropped = [], [], 0
    for k, score in enumerate(found.conf):
        x1, y1, x2, y2 = found.xyxy[4 * k:4 * k + 4]
        if not (_finite(score) and all(map(_finite, (x1, y1, x2, y2)))):
            dropped += 1
            continue
        boxes.append([x1, y1, x2, y2])
        scores.append(float(score))
    return BoxReading(boxes, scores, "boxes" if boxes else "no_boxes", dropped)


# --- classification ---------------------------------------------------------------------------


def class_answer(completion: str, reader: str = "visual_rft") -> str | None:
    """The class a completion names: the one-line `<answer>` (Visual-RFT's evaluation: no match is no
    answer), or strictly the first closed `<answer>` of any lines; None when there is none."""
    if check_reader(reader) == "visual_rft":
        answer = parse.answer_one_line(completion)
    else:
        answer = parse.strict_answer(completion, allow_unclosed=False)
    return None if answer is None else answer.strip()


# --- grounding --------------------------------------------------------------------------------

_POINT_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", re.ASCII)


def grounding_box(completion: str, reader: str = "visual_rft") -> list[float] | None:
    """The box of a grounding answer in the model's frame, or None: the first integer `(x1,y1),(x2,y2)`
    anywhere in the completion (Visual-RFT's lisa_evaluation), or strictly the first box inside the answer."""
    if check_reader(reader) == "visual_rft":
        found = _POINT_PAIR.search(completion)
        return None if found is None else [float(v) for v in found.groups()]
    answer = parse.strict_answer(completion, allow_unclosed=False)
    boxes = None if answer is None else parse.strict_point_boxes(answer, max_boxes=1)
    return None if boxes is None else [float(v) for v in boxes[0]]
