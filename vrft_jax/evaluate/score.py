"""`python -m vrft_jax.evaluate score --gt GT.json --predictions P.jsonl`: detection mAP of saved completions.

GT.json is COCO format (images with width and height, categories with names, annotations; LVIS files add
`frequency`, `neg_category_ids` and `not_exhaustive_category_ids`). Each line of P.jsonl is
`{"image_id": int, "category_id": int, "completion": str}`: a model's raw answer to "detect this category in
this image", any model's. Boxes are read as Visual-RFT's evaluation reads them (`--parse visual_rft`, the
default; `strict` for ours) on the 0..1000 grid (`--frame qwen2_vl`; `pixels` for Qwen2.5-VL, which writes
pixels of the image resized by smart_resize within --min-pixels..--max-pixels, Qwen's evaluation defaults).
Prints one JSON object: AP, AP50, AP75, per_category_AP by name, the paper's mean over --categories, counts,
warnings. Both files are checked first (`evaluate.inputs`): a file that would make a number wrong is one line
naming it and the line or annotation, exit code 2; ground truth no prediction asks about, repeated lines and the
like are counted warnings, printed on stderr and in the output's `warnings`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

from vrft_jax import cli
from vrft_jax.evaluate import detection, inputs, readers
from vrft_jax.rewards.frames import FRAME_NAMES, Frame, frame_of

# qwen_vl_utils' defaults, which Visual-RFT's evaluation used (visual-rft.md §7.1)
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28


def score(gt: dict, predictions: Sequence[inputs.Prediction | tuple[int, int, str]], *, reader: str = "visual_rft",
          frame: str = "qwen2_vl", protocol: str | None = None, categories: Sequence[str] | None = None,
          min_pixels: int = EVAL_MIN_PIXELS, max_pixels: int = EVAL_MAX_PIXELS,
          source: str = "the ground truth", warnings: Mapping[str, int] | None = None) -> dict:
    """The metrics of `predictions` against `gt` (`detection.evaluate`), with the reading counts and the warnings
    (`inputs`: those given, the ground truth's, coverage and protocol)."""
    from vrft_jax.data.image import ImageGeometry

    warnings = {**(warnings or {}), **inputs.check_ground_truth(gt, source)}
    if protocol is None:  # LVIS files carry category frequencies
        protocol = "lvis" if gt["categories"] and all("frequency" in c for c in gt["categories"]) else "coco"
    warnings |= inputs.check_protocol(gt, protocol, source)
    predictions = [p if isinstance(p, inputs.Prediction) else inputs.Prediction(k + 1, *p)
                   for k, p in enumerate(predictions)]
    known_categories = {c["id"] for c in gt["categories"]}
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    for p in predictions:
        if p.image_id not in sizes or p.category_id not in known_categories:
            raise inputs.InputError(f"prediction {p.line} (image {p.image_id}, category {p.category_id}): "
                                    "not in the ground truth")
    warnings |= inputs.coverage(gt, predictions)
    geometry = ImageGeometry(min_pixels=min_pixels, max_pixels=max_pixels)
    queries = [detection.Query(p.image_id, p.category_id, p.completion,
                               geometry.resized_hw(*sizes[p.image_id]) if frame_of(frame) is Frame.PIXELS else None)
               for p in predictions]
    results, counts = detection.to_results(queries, gt, reader=reader, frame=frame, protocol=protocol)
    metrics = detection.evaluate(gt, results, protocol=protocol, categories=categories)
    return {**metrics, "reader": reader, "frame": frame, "counts": counts, "warnings": warnings}


def main(argv: Sequence[str]) -> int:
    """The command, argv[0] being its name; run it through `cli.run`, which makes its InputErrors one line."""
    p = cli.ArgumentParser(prog="python -m vrft_jax.evaluate score", description=__doc__)
    p.add_argument("--gt", required=True, help="COCO-format ground truth JSON (COCO or LVIS)")
    p.add_argument("--predictions", required=True, help="JSONL of {image_id, category_id, completion}")
    p.add_argument("--parse", choices=readers.READERS, default="visual_rft", help="how boxes are read")
    p.add_argument("--frame", choices=sorted(FRAME_NAMES), default="qwen2_vl", help="the frame boxes are written in")
    p.add_argument("--protocol", choices=detection.PROTOCOLS, help="default: lvis when categories have a frequency")
    p.add_argument("--categories", help="names (a,b,c) for the paper's mean AP; default: every category")
    p.add_argument("--min-pixels", type=int, default=EVAL_MIN_PIXELS, help="pixels frame: smart_resize bound")
    p.add_argument("--max-pixels", type=int, default=EVAL_MAX_PIXELS, help="pixels frame: smart_resize bound")
    p.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show an error's traceback as well as its one line")
    args = p.parse_args(argv[1:])
    gt, warnings = inputs.load_ground_truth(args.gt)
    predictions, read_warnings = inputs.read_predictions(args.predictions, gt)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    result = score(gt, predictions, reader=args.parse, frame=args.frame, protocol=args.protocol,
                   categories=categories, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                   source=args.gt, warnings=warnings | read_warnings)
    totals = {"images_without_predictions": len(gt["images"]), "zero_size_gt_boxes": len(gt["annotations"]),
              "duplicate_lines": len(predictions) + read_warnings.get("duplicate_lines", 0)}
    for line in inputs.describe(result["warnings"], totals):
        print(line, file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
