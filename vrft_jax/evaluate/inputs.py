"""The files `evaluate score` reads, checked before anything is scored: a COCO-format ground truth and a JSONL of
completions. What would make a number wrong is an `InputError` naming the file and the line, annotation or
field; what is legal but worth knowing is a counted warning that the command prints and reports.

    gt, gt_warnings = load_ground_truth("gt.json")
    predictions, warnings = read_predictions("p.jsonl", gt)
    warnings |= coverage(gt, predictions) | check_protocol(gt, "lvis", "gt.json") | gt_warnings

Ground truth: an object with `images` (unique int ids, positive width and height), `categories` (unique int ids,
names) and `annotations` (a known image and category, `bbox` four finite numbers `[x, y, w, h]`, w and h not
negative; a zero-sized box, which real COCO files have, is counted: it can never be matched). LVIS files add
`frequency` to categories and `neg_category_ids`/`not_exhaustive_category_ids` (known categories) to images.

Predictions: one `{"image_id": int, "category_id": int, "completion": str}` per line, UTF-8, of a known image and
category. A line repeating an earlier one exactly is counted and skipped; a second, different completion for the
same (image, category) is an error, since one of them would be scored as extra detections.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from vrft_jax.cli import UserError
from vrft_jax.data import records

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


class InputError(UserError, ValueError):
    """A ground-truth or predictions file that cannot be scored; the message names the file and where in it."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    line: int
    image_id: int
    category_id: int
    completion: str


# ---------------------------------------------------------------------------------------------- ground truth


def load_ground_truth(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """(the ground truth of the JSON file at `path`, its warning counts); InputError naming what is wrong."""
    try:
        gt = records.load_json(path, "the ground truth")
    except records.SourceError as e:
        raise InputError(str(e)) from None
    return gt, check_ground_truth(gt, path)


def check_ground_truth(gt: Any, source: str = "the ground truth") -> dict[str, int]:
    """InputError naming the first thing a COCO-format ground truth gets wrong (module docstring); else the
    counted warnings: `zero_size_gt_boxes`."""
    if not isinstance(gt, Mapping):
        raise InputError(f"{source}: expected a COCO object with images, categories and annotations, "
                         f"got a JSON {_json_type(gt)}")
    for key in ("images", "categories", "annotations"):
        if not isinstance(gt.get(key), list):
            raise InputError(f"{source}: no {key!r} list (keys: {sorted(gt)})")
    categories = _unique_ids(gt["categories"], "category", source)
    for category in gt["categories"]:
        if not isinstance(category.get("name"), str):
            raise InputError(f"{source}: category {category['id']} has no name: {_short(category)}")
    images = _unique_ids(gt["images"], "image", source)
    for image in gt["images"]:
        for key in ("width", "height"):
            if not (_number(image.get(key)) and image[key] > 0):
                raise InputError(f"{source}: image {image['id']} needs a positive {key}, has {image.get(key)!r}")
        for key in LVIS_IMAGE_FIELDS:
            ids = image.get(key, [])
            if not isinstance(ids, list) or any(i not in categories for i in ids):
                raise InputError(f"{source}: image {image['id']}'s {key} must list known category ids, has {ids!r}")
    zero_size = 0
    for k, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotation {k} (id {ann.get('id')!r})" if isinstance(ann, Mapping) else None
        if where is None:
            raise InputError(f"{source}: annotation {k} is a JSON {_json_type(ann)}, not an object")
        if ann.get("image_id") not in images:
            raise InputError(f"{where} names image {ann.get('image_id')!r}, which is not in images")
        if ann.get("category_id") not in categories:
            raise InputError(f"{where} names category {ann.get('category_id')!r}, which is not in categories")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) and math.isfinite(v) for v in bbox)):
            raise InputError(f"{where} needs a bbox of four finite numbers [x, y, w, h], has {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise InputError(f"{where} has a negative width or height: bbox {bbox} is [x, y, w, h], not corners")
        zero_size += bbox[2] == 0 or bbox[3] == 0
    return {"zero_size_gt_boxes": zero_size} if zero_size else {}


def is_lvis(gt: Mapping[str, Any]) -> bool:
    """An LVIS file: its categories carry frequencies or its images their verified-absent categories."""
    return (bool(gt["categories"]) and all("frequency" in c for c in gt["categories"])) or any(
        "neg_category_ids" in image for image in gt["images"])


def check_protocol(gt: Mapping[str, Any], protocol: str, source: str) -> dict[str, int]:
    """InputError for `--protocol lvis` on a file without LVIS's fields (every detection of a category an image
    does not list would be dropped unseen); a counted warning for COCO's protocol on an LVIS file."""
    if protocol == "lvis" and not is_lvis(gt):
        raise InputError(f"--protocol lvis: {source} is not an LVIS file (no category has a frequency, no image "
                         "lists neg_category_ids); score it with --protocol coco")
    return {"coco_protocol_on_lvis_file": 1} if protocol == "coco" and is_lvis(gt) else {}


# ---------------------------------------------------------------------------------------------- predictions


def read_predictions(path: str, gt: Mapping[str, Any] | None = None) -> tuple[list[Prediction], dict[str, int]]:
    """(the predictions of the JSONL file at `path`, warning counts: `duplicate_lines`); InputError naming the
    line of the first bad one. With `gt`, each must name one of its images and categories."""
    images = {image["id"] for image in gt["images"]} if gt is not None else None
    categories = {c["id"] for c in gt["categories"]} if gt is not None else None
    predictions, first_line, duplicates = [], {}, 0
    try:
        with open(path, "rb") as f:
            lines = list(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read the predictions ({e.strerror})") from None
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected an object, got a JSON {_json_type(row)}")
        image_id, category_id, completion = row.get("image_id"), row.get("category_id"), row.get("completion")
        if type(image_id) is not int or type(category_id) is not int or not isinstance(completion, str):
            raise InputError(f"{path}:{number}: needs int image_id, int category_id and str completion, got "
                             f"{ {k: row.get(k) for k in ('image_id', 'category_id', 'completion')} }")
        if images is not None and image_id not in images:
            raise InputError(f"{path}:{number}: image {image_id} is not in the ground truth")
        if categories is not None and category_id not in categories:
            raise InputError(f"{path}:{number}: category {category_id} is not in the ground truth")
        key = (image_id, category_id)
        if key in first_line:
            earlier = predictions[first_line[key]]
            if earlier.completion != completion:
                raise InputError(f"{path}:{number}: a second, different completion for image {image_id}, category "
                                 f"{category_id} (line {earlier.line} has the first); keep one per pair")
            duplicates += 1
            continue
        first_line[key] = len(predictions)
        predictions.append(Prediction(number, image_id, category_id, completion))
    if not predictions:
        raise InputError(f"{path}: no predictions (the file is empty)")
    return predictions, {"duplicate_lines": duplicates} if duplicates else {}


def coverage(gt: Mapping[str, Any], predictions: Sequence[Prediction]) -> dict[str, int]:
    """Counted warnings for ground truth no prediction asks about, which scores as missed: images without any
    prediction, and (image, category) pairs with boxes that no prediction asks for."""
    asked = {(p.image_id, p.category_id) for p in predictions}
    asked_images = {image_id for image_id, _ in asked}
    counts = collections.Counter()
    counts["images_without_predictions"] = sum(image["id"] not in asked_images for image in gt["images"])
    counts["gt_pairs_not_asked"] = len({(a["image_id"], a["category_id"]) for a in gt["annotations"]} - asked)
    return {key: value for key, value in counts.items() if value}


WARNINGS = {
    "zero_size_gt_boxes": "ground-truth boxes with zero width or height, which no detection can match",
    "coco_protocol_on_lvis_file": "an LVIS file scored with the COCO protocol: detections of categories an image "
                                  "does not verify count as false positives (--protocol lvis is LVIS's own)",
    "duplicate_lines": "prediction lines repeating an earlier line exactly, skipped",
    "images_without_predictions": "ground-truth images no prediction asks about: their boxes count as missed",
    "gt_pairs_not_asked": "(image, category) pairs with ground-truth boxes no prediction asks about: missed",
}


def describe(warnings: Mapping[str, int], totals: Mapping[str, int]) -> list[str]:
    """One printed line per warning: its count (of its total, where `totals` has one) and what it means."""
    lines = []
    for key, count in warnings.items():
        of = f" of {totals[key]}" if key in totals else ""
        lines.append(f"warning: {count}{of} {WARNINGS[key]}")
    return lines


def _unique_ids(items: list, kind: str, source: str) -> set[int]:
    ids = set()
    for k, item in enumerate(items):
        if not isinstance(item, Mapping) or not _integer(item.get("id")):
            raise InputError(f"{source}: {kind} {k} needs an int id: {_short(item)}")
        if item["id"] in ids:
            raise InputError(f"{source}: {kind} id {item['id']} appears twice")
        ids.add(item["id"])
    return ids


def _number(value: Any) -> bool:
    """A real number, a NumPy one included (a ground truth built in memory), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
