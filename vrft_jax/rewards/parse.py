"""Text to structures: answer tags, ViRFT box lists, LISA `(x1,y1),(x2,y2)` boxes. No `eval`.

Each structure has a `paper_*` reader, which reproduces the steps of Visual-RFT's reward code
(`grpo.py`, `grpo_lisa.py`; visual-rft.md §5) with the same results, and a `strict_*` reader,
which reads the values the prompt asks for and marks everything else invalid.

Readers of model output never raise, and their work is linear in the input: the original's
`re.search(r'<answer>(.*?)</answer>')` is quadratic on strings with many unclosed tags, so the
tag readers below find the same match with `str.find`. Readers of ground truth (`*_solution`)
raise ValueError, since a solution that cannot be read is a bug in our data, not a bad rollout.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from typing import NamedTuple

import numpy as np

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_NUMBER_TYPES = frozenset((int, float, bool))  # What the original's arithmetic accepts.
_NAN_BOX = (math.nan,) * 4


# --- Answer tags -----------------------------------------------------------------------------


def answer_one_line(text: str) -> str | None:
    """Group 1 of `re.search(r'<answer>(.*?)</answer>', text)`, or None; in linear time.

    Without DOTALL the match cannot cross a newline: the first `<answer>` whose first
    `</answer>` follows on the same line. Detection and classification read answers this way
    (and ground truth in grounding), so a newline inside the answer loses it.
    """
    start, close = 0, -1
    while True:
        i = text.find(ANSWER_OPEN, start)
        if i < 0:
            return None
        body = i + len(ANSWER_OPEN)
        if close < body:  # The first close after this body; reused while still ahead of it.
            close = text.find(ANSWER_CLOSE, body)
            if close < 0:
                return None
        newline = text.find("\n", body, close)
        if newline < 0:
            return text[body:close]
        # Every `<answer>` before the newline has it inside its body, so resume after it.
        start = newline + 1


def answer_any_lines(text: str) -> str | None:
    """Group 1 of `re.search(r'<answer>(.*?)</answer>', text, re.DOTALL)`, or None."""
    i = text.find(ANSWER_OPEN)
    if i < 0:
        return None
    body = i + len(ANSWER_OPEN)
    close = text.find(ANSWER_CLOSE, body)
    return None if close < 0 else text[body:close]


def strict_answer(text: str, *, allow_unclosed: bool) -> str | None:
    """The text between the first `<answer>` and the next `</answer>`, newlines included.

    With `allow_unclosed`, an answer cut off before its closing tag (the completion ran out of
    tokens) runs to the end of the text; otherwise it is no answer. Never the whole completion:
    text outside the tags is not an answer.
    """
    i = text.find(ANSWER_OPEN)
    if i < 0:
        return None
    body = i + len(ANSWER_OPEN)
    close = text.find(ANSWER_CLOSE, body)
    if close < 0:
        return text[body:] if allow_unclosed else None
    return text[body:close]


# --- ViRFT detection box lists -----------------------------------------------------------------


class Predictions(NamedTuple):
    """Predicted boxes of one completion.

    xyxy: flat list of numbers, 4 per box (NaN for a box that is not four numbers). conf: one
    number per box. readable: per box, whether its Position is four numbers (paper mode: a box
    that is not raises in the original's IoU step). Numbers are Python ints, floats or bools;
    `as_float64` converts a batch of them at once.
    """

    xyxy: list
    conf: list
    readable: list[bool]


NO_PREDICTIONS = Predictions([], [], [])


def as_float64(values: list) -> np.ndarray:
    """float64[len(values)] of Python numbers; integers beyond float64 become +-inf."""
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:  # Python would keep such an integer exact; float64 cannot.
        return np.array([_as_float(v) for v in values], dtype=np.float64)


def _as_float(value: int | float | bool) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _paper_box_list(content: str) -> object | None:
    """The JSON value Visual-RFT reads from a detection completion, or None when it reads none.

    Its steps: the non-DOTALL answer (else the whole completion), stripped, re-wrapped in answer
    tags; `[[` -> `[`, `]]` -> `]`, newlines removed; the text up to the first `</answer>`; if that
    does not end with `]` it is taken as truncated: cut after the last `},` and closed with `}]`;
    `'` -> `"`; `json.loads`, which accepts NaN and Infinity.
    """
    answer = answer_one_line(content)
    wrapped = ANSWER_OPEN + (content if answer is None else answer).strip() + ANSWER_CLOSE
    wrapped = wrapped.replace("[[", "[").replace("]]", "]").replace("\n", "")
    body = wrapped[len(ANSWER_OPEN) : wrapped.find(ANSWER_CLOSE)]
    if not body.endswith("]"):
        body = body.rsplit("},", 1)[0] + "}]"
    try:
        return json.loads(body.replace("'", '"'))
    except (ValueError, RecursionError):
        # JSONDecodeError (a ValueError), integers over 4300 digits, nesting too deep: the
        # original's try/except turns all of them into a reward of 0.
        return None


def paper_predictions(content: str) -> Predictions | None:
    """Boxes as Visual-RFT's detection rewards use them, or None where they score 0.

    None reproduces every path on which the original raises (and catches) before matching: no
    list, an empty list, a first element that is not a dict, an element without `Position`, a
    `Position` that cannot be hashed, a `Confidence` that is missing or not a number. Exact
    duplicates of `Position` are dropped (first kept), and boxes are sorted by confidence with
    Python's stable sort on the raw values, NaN included. A box whose Position is not four
    numbers is kept as unreadable: the original raises only if it reaches the IoU step.
    """
    value = _paper_box_list(content)
    if type(value) is not list or not value or type(value[0]) is not dict:
        return None
    seen: set[tuple] = set()
    kept: list[dict] = []
    try:
        for entry in value:
            if type(entry) is not dict:
                return None
            key = tuple(entry["Position"])
            if key not in seen:  # Tuple equality: 1 == 1.0, and json's NaN is one shared object.
                seen.add(key)
                kept.append(entry)
    except (KeyError, TypeError):
        return None
    raw_conf = [entry.get("Confidence") for entry in kept]
    if not all(map(_NUMBER_TYPES.__contains__, map(type, raw_conf))):
        return None
    order = sorted(range(len(kept)), key=raw_conf.__getitem__, reverse=True)
    xyxy: list = []
    readable: list[bool] = []
    for i in order:
        position = kept[i]["Position"]
        if (
            type(position) is list
            and len(position) == 4
            and all(map(_NUMBER_TYPES.__contains__, map(type, position)))
        ):
            xyxy.extend(position)
            readable.append(True)
        else:
            xyxy.extend(_NAN_BOX)
            readable.append(False)
    return Predictions(xyxy, [raw_conf[i] for i in order], readable)


# A number as a model writes one: bounded length, so a megabyte of digits cannot reach float().
_NUM = r"[-+]?(?:\d{1,24}(?:\.\d{0,24})?|\.\d{1,24})(?:[eE][-+]?\d{1,4})?"
_POSITION = rf"""['"]?Position['"]?\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"""
_CONFIDENCE = rf"""['"]?Confidence['"]?\s*:\s*({_NUM})"""
# One complete object: {Position, Confidence} in either order (groups 1-5 or 6-10), or any other
# flat {...}, which is an invalid box. Brackets, commas and text between objects are ignored.
_OBJECT = re.compile(
    rf"\{{\s*(?:{_POSITION}\s*,\s*{_CONFIDENCE}|{_CONFIDENCE}\s*,\s*{_POSITION})\s*,?\s*\}}"
    r"|\{[^{}]*\}",
    re.ASCII,
)
_NO_OBJECTS = re.compile(r"""\s*(?:\[\s*\]|['"]?no\s+objects?['"]?\.?)\s*""", re.IGNORECASE)


def strict_predictions(answer: str, max_boxes: int) -> Predictions | None:
    """Boxes of a detection answer read strictly, in answer order, or None for a non-answer.

    Every complete `{...}` object in the answer is one prediction; `{'Position': [x1, y1, x2, y2],
    'Confidence': c}` in JSON or Python quoting (keys in either order) is read, any other object
    is an all-NaN (invalid) box. An unclosed last object is dropped, so a truncated list keeps
    its complete boxes. `No Objects` or `[]` is an abstention (no boxes). More than `max_boxes`
    objects, or no object and no abstention, is None. Exact duplicate positions are dropped
    (first kept).
    """
    if answer.count("}") <= max_boxes:  # Each object ends with its own `}`.
        found = _OBJECT.findall(answer)
    else:
        found = [m.groups() for m in itertools.islice(_OBJECT.finditer(answer), max_boxes + 1)]
    if not found:
        return NO_PREDICTIONS if _NO_OBJECTS.fullmatch(answer) else None
    if len(found) > max_boxes:
        return None
    xyxy: list[float] = []
    conf: list[float] = []
    seen: set[tuple[float, ...]] = set()
    for groups in found:
        if groups[0]:
            position, c = groups[0:4], groups[4]
        elif groups[5]:
            position, c = groups[6:10], groups[5]
        else:
            xyxy.extend(_NAN_BOX)
            conf.append(math.nan)
            continue
        position = tuple(map(float, position))
        if position not in seen:
            seen.add(position)
            xyxy.extend(position)
            conf.append(float(c))
    return Predictions(xyxy, conf, [True] * len(conf))


def detection_solution(text: str) -> tuple[np.ndarray, bool]:
    """Ground-truth boxes float64[G, 4] of a detection solution, and whether it said `No Objects`.

    Reads `<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>` (tags optional,
    JSON or Python quoting). `No Objects` and `[]` give no boxes. ValueError when the solution is
    not such a list, or a box is not four finite numbers with x1 <= x2 and y1 <= y2.
    """
    answer = strict_answer(text, allow_unclosed=False)
    body = (text if answer is None else answer).strip()
    if _NO_OBJECTS.fullmatch(body):
        return np.zeros((0, 4)), not body.lstrip().startswith("[")
    try:
        value = json.loads(body.replace("'", '"'))
    except (ValueError, RecursionError):
        raise ValueError("not a box list [{'Position': [x1, y1, x2, y2], ...}, ...]") from None
    if type(value) is not list:
        raise ValueError("not a box list [{'Position': [x1, y1, x2, y2], ...}, ...]")
    boxes = []
    for k, entry in enumerate(value):
        position = entry.get("Position") if type(entry) is dict else None
        if (
            type(position) is not list
            or len(position) != 4
            or any(type(v) not in (int, float) for v in position)
        ):
            raise ValueError(f"box {k}: expected 'Position': [x1, y1, x2, y2], got {entry!r}")
        boxes.append([_as_float(v) for v in position])
    xyxy = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    check_solution_boxes(xyxy)
    return xyxy, False


def check_solution_boxes(xyxy: np.ndarray) -> None:
    """ValueError naming the first ground-truth box that is non-finite or inverted."""
    bad = ~np.isfinite(xyxy).all(-1) | (xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"box {k} {xyxy[k].tolist()} is not finite with x1 <= x2, y1 <= y2")


# --- LISA grounding boxes `(x1,y1),(x2,y2)` -----------------------------------------------------

# The original's pattern: integers only, and `\d` is any Unicode decimal digit (int() reads them).
_PAPER_POINT_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")
# An integer this long may overflow `int / 1000` (or exceed int()'s 4300 digits): only then do the
# digits of every match need converting, as the original converts them all.
_LONG_DIGITS = re.compile(r"\d{300}")


def _paper_scaled(digits: str) -> float:
    return int(digits) / 1000


def paper_point_pair(text: str) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The two points Visual-RFT's grounding reward compares, in 0-1 units, or None.

    The original builds `[top-left of every box] + [bottom-right of every box]` and uses items 0
    and 1: with one box its corners, with two or more the top-lefts of the first two boxes (a
    bug kept in paper mode). None when no box matches or a number cannot be converted.
    """
    first_two = [m.groups() for m in itertools.islice(_PAPER_POINT_PAIR.finditer(text), 2)]
    if not first_two:
        return None
    try:
        if _LONG_DIGITS.search(text) is not None:
            for groups in _PAPER_POINT_PAIR.findall(text):
                for digits in groups:
                    _paper_scaled(digits)
        x1, y1, x2, y2 = (_paper_scaled(d) for d in first_two[0])
        if len(first_two) > 1:
            x2, y2 = _paper_scaled(first_two[1][0]), _paper_scaled(first_two[1][1])
    except (ValueError, OverflowError):
        return None
    return (x1, y1), (x2, y2)


_STRICT_NUM = r"\d{1,12}(?:\.\d{1,12})?"
_STRICT_POINT_PAIR = re.compile(
    rf"\(\s*({_STRICT_NUM})\s*,\s*({_STRICT_NUM})\s*\)\s*,\s*\(\s*({_STRICT_NUM})\s*,\s*({_STRICT_NUM})\s*\)",
    re.ASCII,
)


def strict_point_boxes(answer: str, max_boxes: int) -> np.ndarray | None:
    """Every `(x1,y1),(x2,y2)` box of an answer as float64[P, 4], or None (none, or > max_boxes).

    Decimal and ASCII digits only; other text in the answer is ignored.
    """
    if answer.count("(") <= 2 * max_boxes:
        found = _STRICT_POINT_PAIR.findall(answer)
    else:
        found = [
            m.groups()
            for m in itertools.islice(_STRICT_POINT_PAIR.finditer(answer), max_boxes + 1)
        ]
    if not found or len(found) > max_boxes:
        return None
    return np.array(found, dtype=np.float64)
