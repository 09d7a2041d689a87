"""The record every source is converted to, its validation, and the bad-record policy.

A record is one prompt: an encoded image, the problem text, the ground-truth solution and the task
that says how the solution is scored. Sources (ViRFT, COCO, LVIS, classification folders, LISA,
synthetic) all produce records; `storage` writes them as a TFDS dataset of ArrayRecord files; the
pipeline reads them back. A record that cannot be used is never silently dropped: by the
`on_bad_record` switch it either stops the run with a `BadRecordError` naming it, or is skipped and
counted under one of `REASONS`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from vrft_jax.cli import UserError

TASKS = ("detection", "classification", "grounding")
FIELDS = ("id", "image", "problem", "solution", "task", "label")
REQUIRED = ("image", "problem", "solution", "task")
ON_BAD_RECORD = ("error", "skip")

# Why a record was rejected; the keys of the skip counters.
MISSING_FIELD = "missing_field"
BAD_IMAGE = "bad_image"
BAD_SOLUTION = "bad_solution"
BAD_TASK = "bad_task"
BAD_PROMPT = "bad_prompt"
PROMPT_TOO_LONG = "prompt_too_long"
TOO_MANY_PATCHES = "too_many_patches"
DUPLICATE_ID = "duplicate_id"
BAD_TEXT = "bad_text"
REASONS = (MISSING_FIELD, BAD_IMAGE, BAD_SOLUTION, BAD_TASK, BAD_PROMPT, PROMPT_TOO_LONG, TOO_MANY_PATCHES,
           DUPLICATE_ID, BAD_TEXT)


@dataclasses.dataclass(frozen=True)
class Record:
    """One prompt. `image` holds the encoded file bytes (JPEG, PNG, ...), never decoded pixels.

    id:       unique within the dataset, stable across conversions (e.g. "coco:139:62")
    problem:  the user's text, placed after the image in the chat turn
    solution: the ground truth the rewards score against (e.g. "<answer>737-200</answer>")
    task:     one of TASKS
    label:    the category or class name the record is about ("" when unknown)
    """

    id: str
    image: bytes
    problem: str
    solution: str
    task: str
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SourceError(UserError, ValueError):
    """A source that cannot be converted at all (a file that is not there or not JSON, the wrong structure, an
    unknown category, contradictory options); the message names the file, line or name."""


class UnknownNameError(SourceError, KeyError):
    """A category or class name the source does not have."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


def load_json(path: str, what: str) -> Any:
    """The parsed JSON file at `path` (`what` it should hold, for the messages); SourceError naming the file, and
    the line and column of a syntax error."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SourceError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{e.lineno}:{e.colno}: {what} is not JSON ({e.msg})") from None


class BadRecordError(UserError, ValueError):
    """A record that cannot be used, in strict mode. The message names the record and what is wrong."""

    def __init__(self, where: str, reason: str, detail: str):
        self.where, self.reason, self.detail = where, reason, detail
        super().__init__(f"{where}: {reason}: {detail}")

    def __reduce__(self):  # crosses from Grain worker processes to the trainer intact
        return type(self), (self.where, self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A record skipped in lenient mode; it travels in place of the example so it can be counted."""

    where: str  # names the record, as in BadRecordError
    reason: str  # one of REASONS
    detail: str


class Padding:
    """Stands for a row with no record: finite streams are padded to whole global batches so that every
    process makes the same number of batches (a host with one batch fewer would hang the others)."""

    def __reduce__(self):
        return _padding, ()

    def __repr__(self) -> str:
        return "PADDING"


PADDING = Padding()


def _padding() -> Padding:
    return PADDING


def describe(record_id: str | None, index: int | None, source: str) -> str:
    """How errors name a record: its id, its index in the stored split, and the source."""
    parts = []
    if record_id:
        parts.append(f"id {record_id!r}")
    if index is not None:
        parts.append(f"index {index}")
    return f"record {' '.join(parts) or '?'} of {source}"


def check_policy(on_bad_record: str) -> str:
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    return on_bad_record


def text_field(record: Mapping[str, Any], name: str, errors: str = "strict") -> str:
    """A text field as str (TFDS returns bytes); a missing field reads as "". Bytes that are not UTF-8
    raise UnicodeDecodeError (a BAD_TEXT record) unless `errors="replace"` (for naming a record)."""
    value = record.get(name)
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):  # a numpy scalar from a data source
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors)
    return str(value)


def missing_fields(record: Mapping[str, Any]) -> list[str]:
    """Required fields that are absent, None or empty."""
    missing = []
    for name in REQUIRED:
        value = record.get(name)
        if value is None or (hasattr(value, "__len__") and len(value) == 0):
            missing.append(name)
    return missing


# ---------------------------------------------------------------------------- solutions

_ANSWER = re.compile(r"<answer>(.*)</answer>", re.DOTALL)
_GROUNDING = re.compile(r"^\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")
NO_OBJECTS = "No Objects"


def solution_error(task: str, solution: str) -> str | None:
    """What is wrong with a ground-truth `solution` for `task`, or None when it is well formed.

    detection:      <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': c}, ...]</answer> with
                    0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000, or <answer>No Objects</answer>
    classification: <answer>name</answer>, name non-empty and on one line
    grounding:      <answer> (x1,y1),(x2,y2) </answer>, integers on the 0..1000 grid
    """
    match = _ANSWER.fullmatch(solution.strip())
    if match is None:
        return f"not wrapped in <answer>...</answer>: {solution[:80]!r}"
    body = match.group(1)
    if task == "classification":
        if not body.strip() or "\n" in body:
            return f"class name must be non-empty and on one line, got {body!r}"
        return None
    if task == "grounding":
        found = _GROUNDING.match(body)
        if found is None:
            return f"expected '(x1,y1),(x2,y2)', got {body!r}"
        return _box_error([int(v) for v in found.groups()])
    if task == "detection":
        if body.strip() == NO_OBJECTS:
            return None
        try:
            boxes = ast.literal_eval(body)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            return f"not a Python list literal ({type(e).__name__}): {body[:80]!r}"
        if not isinstance(boxes, list) or not boxes:
            return f"expected a non-empty list of boxes, got {body[:80]!r}"
        for k, item in enumerate(boxes):
            if not isinstance(item, dict) or "Position" not in item:
                return f"box {k} is not a dict with 'Position': {item!r}"
            error = _box_error(item["Position"])
            if error:
                return f"box {k}: {error}"
            confidence = item.get("Confidence", 1)
            if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
                return f"box {k}: Confidence must be a number in [0, 1], got {confidence!r}"
        return None
    return f"unknown task {task!r}; known: {TASKS}"


def _box_error(box: Any) -> str | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"a box is 4 numbers [x1, y1, x2, y2], got {box!r}"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        return f"box coordinates must be numbers, got {box!r}"
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= 1000 and 0 <= y1 <= y2 <= 1000):
        return f"box {list(box)} is not ordered within the 0..1000 grid"
    return None


def record_error(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) for a record whose fields are unusable, before its image is looked at."""
    missing = missing_fields(record)
    if missing:
        return MISSING_FIELD, f"missing or empty field(s) {missing}"
    for name in ("id", "problem", "solution", "task", "label"):
        try:
            text_field(record, name)
        except UnicodeDecodeError as e:
            return BAD_TEXT, f"field {name!r} is not UTF-8 ({e})"
    task = text_field(record, "task")
    if task not in TASKS:
        return BAD_TASK, f"task {task!r} is not one of {TASKS}"
    error = solution_error(task, text_field(record, "solution"))
    if error:
        return BAD_SOLUTION, error
    return None


# ---------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A record as a source converter found it, before validation.

    where:  names it in the source ("row 17 of train-0.parquet"), for errors
    fields: id, problem, solution, task, label; `image` as bytes or a path to read
    error:  (reason, detail) when the converter already knows it is unusable
    """

    where: str
    fields: Mapping[str, Any]
    error: tuple[str, str] | None = None


@dataclasses.dataclass
class ConversionReport:
    """What a conversion wrote and skipped; stored with the dataset as its metadata."""

    written: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> records
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> records (all of them)
    skipped_records: list[str] = dataclasses.field(default_factory=list)  # "where: reason: detail", the first
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # source-specific counts

    MAX_LISTED = 1000  # keeps metadata.json small for a wholly bad source; `skipped` still counts all

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validated(candidates, *, split: str, on_bad_record: str, report: ConversionReport, read_image):
    """Records of the valid candidates; each bad one raises `BadRecordError` ("error") or is counted
    in `report` ("skip"). `read_image(path_or_bytes) -> bytes` loads and header-checks the image."""
    check_policy(on_bad_record)
    seen: dict[str, str] = {}
    report.written.setdefault(split, 0)
    for candidate in candidates:
        problem = candidate.error or record_error(candidate.fields)
        image = b""
        if problem is None:
            try:
                image = read_image(candidate.fields["image"])
            except (OSError, ValueError) as e:
                problem = (BAD_IMAGE, str(e))
        record_id = text_field(candidate.fields, "id", errors="replace") or candidate.where
        if problem is None and record_id in seen:
            problem = (DUPLICATE_ID, f"id {record_id!r} is already used by {seen[record_id]}")
        if problem is not None:
            reason, detail = problem
            if on_bad_record == "error":
                raise BadRecordError(candidate.where, reason, detail)
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            if len(report.skipped_records) < report.MAX_LISTED:
                report.skipped_records.append(f"{candidate.where}: {reason}: {detail}")
            continue
        seen[record_id] = candidate.where
        report.written[split] += 1
        yield Record(id=record_id, image=image, problem=text_field(candidate.fields, "problem"),
                     solution=text_field(candidate.fields, "solution"), task=text_field(candidate.fields, "task"),
                     label=text_field(candidate.fields, "label"))
