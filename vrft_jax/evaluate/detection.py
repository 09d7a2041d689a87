"""Detection mAP: completions -> COCO results -> faster-coco-eval, with the COCO or the LVIS federated protocol.

    gt = ground_truth(...)                      # COCO-format dict: images (width, height), categories, annotations
    results, counts = to_results(queries, gt, reader="visual_rft", frame="qwen2_vl")
    metrics = evaluate(gt, results, protocol="coco", categories=("bus", "train"))

`evaluate` returns AP, AP50, AP75 (area all; COCO: 100 detections per image and category, pycocotools'
numbers bit for bit; LVIS: `lvis_style=True`, 300 detections per image, detections of a category neither
verified present nor verified absent in an image dropped, unmatched ones of a not-exhaustive category
ignored), `per_category_AP` by name, and the paper's reduction over the recipe's categories (`paper_mAP`, and
`paper_per_category_AP`: each of those categories' AP as the paper's per-class columns compute it):

    COCO: per-class AP = mean of precision[iou, recall, k, area=all, maxDets=100] over its valid entries
          (coco_evaluation's notebook); the mean over the categories
    LVIS: per-class AP = mean of precision[iou, recall, k, every area range, maxDets=300] over its valid entries
          (Visual-RFT's lvis_evaluation notebook averages the four area ranges); the mean over the categories

A category with no ground truth in the evaluated images has no AP: it is listed under `no_ground_truth`
and left out of every mean, never counted as 0. APs are fractions in [0, 1] (the paper prints x100).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.evaluate import inputs
from vrft_jax.evaluate.readers import read_boxes
from vrft_jax.rewards.frames import REL_SCALE, Frame, frame_of

PROTOCOLS = ("coco", "lvis")
LVIS_MAX_DETS = 300  # per image, over all categories (LVISResults' max_dets)
LVIS_FREQUENCIES = ("r", "c", "f")


@dataclasses.dataclass(frozen=True)
class Query:
    """One question put to the model: "detect `category_id` in `image_id`", and its completion.
    `seen_hw` is the (height, width) of the image the model saw: the pixels frame's extent."""

    image_id: int
    category_id: int
    completion: str
    seen_hw: tuple[int, int] | None = None


def to_results(queries: Iterable[Query], gt: Mapping[str, Any], *, reader: str = "visual_rft",
               frame: str | Frame = "qwen2_vl", protocol: str = "coco") -> tuple[list[dict], dict[str, int]]:
    """(COCO results [{image_id, category_id, bbox [x, y, w, h] in the image's pixels, score}], counts).

    Boxes go from the model's frame to the ground truth's pixels as Visual-RFT's `trans_bbox` does
    (`x / 1000 * W`; the pixels frame: `x * W / seen_width`). Counts: queries, boxes, queries whose
    completion gave no box, reader errors, dropped boxes, and (LVIS) detections beyond 300 in an image.
    """
    frame = frame_of(frame)
    sizes = {image["id"]: (float(image["height"]), float(image["width"])) for image in gt["images"]}
    results: list[dict] = []
    counts = collections.Counter(queries=0, boxes=0, no_boxes=0, errors=0, dropped_boxes=0)
    for query in queries:
        counts["queries"] += 1
        if query.image_id not in sizes:
            raise ValueError(f"query for image {query.image_id} (category {query.category_id}): the image is not in "
                             "the ground truth")
        height, width = sizes[query.image_id]
        reading = read_boxes(query.completion, reader)
        counts["dropped_boxes"] += reading.dropped
        counts["errors"] += reading.status == "error"
        counts["no_boxes"] += not reading.boxes
        if frame is Frame.REL1000:
            scale_x, scale_y = width / REL_SCALE, height / REL_SCALE
        else:
            if query.seen_hw is None:
                raise ValueError(f"boxes in the pixels frame need the size the model saw (image {query.image_id})")
            scale_x, scale_y = width / query.seen_hw[1], height / query.seen_hw[0]
        for (x1, y1, x2, y2), score in zip(reading.boxes, reading.scores):
            if frame is Frame.REL1000:  # trans_bbox's arithmetic: (x / 1000.0) * W
                x1, x2 = x1 / REL_SCALE * width, x2 / REL_SCALE * width
                y1, y2 = y1 / REL_SCALE * height, y2 / REL_SCALE * height
            else:
                x1, x2, y1, y2 = x1 * scale_x, x2 * scale_x, y1 * scale_y, y2 * scale_y
            results.append({"image_id": query.image_id, "category_id": query.category_id,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if protocol == "lvis":
        results, over = cap_per_image(results, LVIS_MAX_DETS)
        counts["over_max_dets"] = over
    counts["boxes"] = len(results)
    return results, dict(counts)


def cap_per_image(results: Sequence[dict], max_dets: int) -> tuple[list[dict], int]:
    """The `max_dets` highest-scoring results of each image (ties in their given order), as LVISResults keeps
    them; and how many were cut."""
    by_image: dict[Any, list[dict]] = collections.defaultdict(list)
    for result in results:
        by_image[result["image_id"]].append(result)
    kept = []
    for image_results in by_image.values():
        kept.extend(sorted(image_results, key=lambda r: r["score"], reverse=True)[:max_dets])
    return kept, len(results) - len(kept)


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def run_cocoeval(gt: Mapping[str, Any], results: Sequence[dict], protocol: str = "coco"):
    """faster-coco-eval's `COCOeval_faster`, run; LVIS: `lvis_style=True`, maxDets [300]."""
    from faster_coco_eval import COCO, COCOeval_faster

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    inputs.check_ground_truth(gt)
    gt = copy.deepcopy(dict(gt))
    for k, ann in enumerate(gt["annotations"]):  # COCOeval needs ids and areas; the score command's files may lack them
        ann.setdefault("id", k + 1)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    if protocol == "lvis":
        for category in gt["categories"]:
            category.setdefault("frequency", "r")  # faster-coco-eval's frequency groups need one (see evaluate)
    quiet = dict(print_function=lambda *args, **kwargs: None)
    coco_gt = COCO(gt, **quiet)
    coco_dt = coco_gt.loadRes(copy.deepcopy(list(results))) if results else coco_gt.loadRes([])
    evaluation = COCOeval_faster(coco_gt, coco_dt, "bbox", lvis_style=protocol == "lvis", **quiet)
    if protocol == "lvis":
        evaluation.params.maxDets = [LVIS_MAX_DETS]
    evaluation.evaluate()
    evaluation.accumulate()
    return evaluation


def evaluate(gt: Mapping[str, Any], results: Sequence[dict], *, protocol: str = "coco",
             categories: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics of the module docstring; `categories` (names) are the recipe's, for `paper_mAP`
    (default: every category of the ground truth)."""
    evaluation = run_cocoeval(gt, results, protocol)
    precision = np.asarray(evaluation.eval["precision"])  # [iou, recall, category, area, maxDets]
    cat_ids = list(evaluation.params.catIds)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    thresholds = np.asarray(evaluation.params.iouThrs)
    at50, at75 = int(np.argmin(np.abs(thresholds - 0.5))), int(np.argmin(np.abs(thresholds - 0.75)))
    area_all = precision[:, :, :, 0, -1]
    per_category = {names[c]: _mean_valid(area_all[:, :, k]) for k, c in enumerate(cat_ids)}
    if protocol == "lvis":
        paper_class = {names[c]: _mean_valid(precision[:, :, k, :, -1]) for k, c in enumerate(cat_ids)}
    else:
        paper_class = per_category
    by_name = {c["name"]: c for c in gt["categories"]}
    selected = list(categories) if categories else [names[c] for c in cat_ids]
    unknown = [n for n in selected if n not in by_name]
    if unknown:
        raise inputs.InputError(f"categories {unknown} are not in the ground truth (it has e.g. {sorted(by_name)[:5]})")
    scored = [paper_class[n] for n in selected if paper_class[n] is not None]
    metrics: dict[str, Any] = {
        "protocol": protocol,
        "AP": _mean_valid(area_all),
        "AP50": _mean_valid(area_all[at50]),
        "AP75": _mean_valid(area_all[at75]),
        "per_category_AP": per_category,
        "paper_mAP": float(np.mean(scored)) if scored else None,
        "paper_categories": selected,
        "paper_per_category_AP": {n: paper_class[n] for n in selected},  # the per-class columns of its tables
        "no_ground_truth": [n for n in selected if paper_class[n] is None],
        "images": len(evaluation.params.imgIds),
    }
    if protocol == "lvis":
        given = all(c.get("frequency") in LVIS_FREQUENCIES for c in gt["categories"])
        for frequency in LVIS_FREQUENCIES:
            ks = [k for k, c in enumerate(cat_ids) if by_name[names[c]].get("frequency") == frequency]
            metrics[f"AP{frequency}"] = _mean_valid(area_all[:, :, ks]) if given and ks else None
    return metrics


def ground_truth_from_records(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """(COCO-format ground truth, [(image_id, category_id)] per row) from detection records alone.

    Each record is one (image, category) question with every box of the category (or `No Objects`): it
    becomes an image of its own (id: its position), sized as stored (`source_hw`), holding its boxes mapped
    from the 0..1000 grid to those pixels, and listing its category as verified present or absent (LVIS's
    `neg_category_ids`). COCOeval matches per (image, category), so splitting an image per question changes
    no AP. Rows: `index`, `label`, `solution` (records store boxes on the 0..1000 grid), `source_hw`.
    """
    from vrft_jax.rewards.parse import detection_solution

    images, annotations, categories, pairs = [], [], {}, []
    for row in rows:
        image_id = int(row["index"])
        height, width = (int(v) for v in row["source_hw"])
        name = row["label"]
        category_id = categories.setdefault(name, len(categories) + 1)
        boxes, _ = detection_solution(row["solution"])
        scale = np.array([width, height] * 2) / REL_SCALE
        image = {"id": image_id, "width": width, "height": height, "neg_category_ids": [],
                 "not_exhaustive_category_ids": []}
        if len(boxes) == 0:
            image["neg_category_ids"].append(category_id)
        for x1, y1, x2, y2 in boxes * scale:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        images.append(image)
        pairs.append((image_id, category_id))
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": cid, "name": name} for name, cid in categories.items()]}
    return gt, pairs
