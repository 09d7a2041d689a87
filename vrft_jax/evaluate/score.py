"""`python -m vrft_jax.evaluate score --gt GT.json --predictions P.jsonl`: detection mAP of saved completions.

GT.json is COCO format (images with width and height, categories with names, annotations; LVIS files add
`frequency`, `neg_category_ids` and `not_exhaustive_category_ids`). Each line of P.jsonl is
`{"image_id": int, "category_id": int, "completion": str}`: a model's raw answer to "detect this category in
this image", any model's. Boxes are read as Visual-RFT's evaluation reads them (`--parse visual_rft`, the
default; `strict` for ours) on the 0..1000 grid (`--frame qwen2_vl`; `pixels` for Qwen2.5-VL, which writes
pixels of the image resized by smart_resize within --min-pixels..--max-pixels, Qwen's evaluation defaults).
Prints one JSON object: AP, AP50, AP75, per_category_AP by name, the paper's mean over --categories, counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

from vrft_jax.evaluate import detection, readers
from vrft_jax.rewards.frames import FRAME_NAMES, Frame, frame_of

# qwen_vl_utils' defaults, which Visual-RFT's evaluation used (visual-rft.md §7.1)
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28


def read_predictions(path: str) -> Iterator[tuple[int, int, str]]:
    """(image_id, category_id, completion) of each line; ValueError naming the first bad line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected an object, got {type(row).__name__}")
            image_id, category_id, completion = row.get("image_id"), row.get("category_id"), row.get("completion")
            if type(image_id) is not int or type(category_id) is not int or not isinstance(completion, str):
                raise ValueError(f"{path}:{number}: needs int image_id, int category_id and str completion, got "
                                 f"{ {k: row.get(k) for k in ('image_id', 'category_id', 'completion')} }")
            yield image_id, category_id, completion


def score(gt: dict, predictions: Sequence[tuple[int, int, str]], *, reader: str = "visual_rft",
          frame: str = "qwen2_vl", protocol: str | None = None, categories: Sequence[str] | None = None,
          min_pixels: int = EVAL_MIN_PIXELS, max_pixels: int = EVAL_MAX_PIXELS) -> dict:
    """The metrics of `predictions` against `gt` (`detection.evaluate`), with the reading counts."""
    from vrft_jax.data.image import ImageGeometry

    detection.check_ground_truth(gt)
    if protocol is None:  # LVIS files carry category frequencies
        protocol = "lvis" if gt["categories"] and all("frequency" in c for c in gt["categories"]) else "coco"
    known_categories = {c["id"] for c in gt["categories"]}
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    geometry = ImageGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    queries = []
    for image_id, category_id, completion in predictions:
        if image_id not in sizes or category_id not in known_categories:
            raise ValueError(f"prediction for image {image_id}, category {category_id}: not in the ground truth")
        seen = geometry.resized_hw(*sizes[image_id]) if frame_of(frame) is Frame.PIXELS else None
        queries.append(detection.Query(image_id, category_id, completion, seen))
    results, counts = detection.to_results(queries, gt, reader=reader, frame=frame, protocol=protocol)
    metrics = detection.evaluate(gt, results, protocol=protocol, categories=categories)
    return {**metrics, "reader": reader, "frame": frame, "counts": counts}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vrft_jax.evaluate score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, help="COCO-format ground truth JSON (COCO or LVIS)")
    p.add_argument("--predictions", required=True, help="JSONL of {image_id, category_id, completion}")
    p.add_argument("--parse", choices=readers.READERS, default="visual_rft", help="how boxes are read")
    p.add_argument("--frame", choices=sorted(FRAME_NAMES), default="qwen2_vl", help="the frame boxes are written in")
    p.add_argument("--protocol", choices=detection.PROTOCOLS, help="default: lvis when categories have a frequency")
    p.add_argument("--categories", help="names (a,b,c) for the paper's mean AP; default: every category")
    p.add_argument("--min-pixels", type=int, default=EVAL_MIN_PIXELS, help="pixels frame: smart_resize bound")
    p.add_argument("--max-pixels", type=int, default=EVAL_MAX_PIXELS, help="pixels frame: smart_resize bound")
    args = p.parse_args(argv)
    try:
        with open(args.gt, encoding="utf-8") as f:
            gt = json.load(f)
        categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
        result = score(gt, list(read_predictions(args.predictions)), reader=args.parse, frame=args.frame,
                       protocol=args.protocol, categories=categories, min_pixels=args.min_pixels,
                       max_pixels=args.max_pixels)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
