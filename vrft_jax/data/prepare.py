"""Convert a source once into a TFDS ArrayRecord dataset the pipeline streams from.

    python -m vrft_jax.data.prepare <source> --output DATA_DIR --name NAME [options]

sources:
  virft           ViRFT parquet files (--parquet F [F ...]) or a ViRFT JSON (--json F [--image-root D])
  coco, lvis      instances JSON (--annotations F) + image folder (--images D); --shots K --seed S for
                  k-shot subsets; --categories to restrict; --base/--novel for open-vocabulary splits;
                  --queries all|exist:FILE for evaluation sets (absent categories answer No Objects)
  classification  --folder D (a folder per class) or --list F (image<TAB>class) [--image-root D];
                  --noun aircraft|plant|pet|flower|car|shape; --shots K --seed S
  lisa            --input D (LISA's train/, val/ or test/ folder) or --input F (lisa_train.json) [--image-root D];
                  --evaluation: as lisa_evaluation scores val/test (first instruction and box per image, the
                  evaluation prompt, the pixel box as label)
  synthetic       --task detection|classification --num-images N --seed S [--min-side --max-side]
                  [--label shape|colour] [--shape-size mixed|large]

Category lists are comma-separated names or @FILE (one name per line). The dataset lands in
DATA_DIR/NAME/1.0.0 (DATA_DIR may be a gs:// URL: written locally, then uploaded); its metadata.json
holds the conversion report (records written, skipped by reason and which). --on-bad-record error
(default) stops at the first bad record and names it; skip leaves it out and counts it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from vrft_jax.data import classification, coco, lisa, storage, synthetic, virft
from vrft_jax.data import records as rec
from vrft_jax.data.image import load_encoded


def convert(splits: dict[str, Iterable[rec.Candidate]], data_dir: str, name: str, *, on_bad_record: str = "error",
            source: dict[str, Any] | None = None,
            notes: dict[str, Any] | None = None) -> tuple[str, rec.ConversionReport]:
    """Validate candidates and write them; returns (dataset directory, report). The library entry point
    behind the CLI: tests and notebooks call it directly."""
    report = rec.ConversionReport(notes=dict(notes or {}))
    metadata: dict[str, Any] = {"source": source or {}, "report": {}}

    def records(split, candidates):
        yield from rec.validated(candidates, split=split, on_bad_record=on_bad_record, report=report,
                                 read_image=load_encoded)
        if not report.written[split]:  # TFDS cannot write an empty split; say why it is empty
            raise ValueError(f"split {split!r} has no usable records (skipped: {report.skipped})")
        metadata["report"] = report.as_dict()  # complete once the last split is drained

    path = storage.write_dataset(data_dir, name, {split: records(split, c) for split, c in splits.items()},
                                 metadata=metadata, description=json.dumps(source or {}))
    return path, report


def parse_names(value: str | None) -> list[str] | None:
    """"a,b,c" or "@file" (one name per line) -> names; None stays None."""
    if value is None:
        return None
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


def _splits(args) -> tuple[dict[str, Iterable[rec.Candidate]], dict[str, Any]]:
    notes: dict[str, Any] = {}
    if args.evaluation and args.source != "lisa":
        raise SystemExit(f"--evaluation makes LISA evaluation sets; {args.source} sets are made for evaluation by "
                         "their own options")
    if args.source == "virft":
        if bool(args.parquet) == bool(args.json):
            raise SystemExit("virft: give --parquet FILES or --json FILE")
        candidates = (virft.parquet_candidates(args.parquet, task=args.task, image_root=args.image_root) if args.parquet
                      else virft.json_candidates(args.json, task=args.task, image_root=args.image_root))
        return {args.split: candidates}, notes
    if args.source in ("coco", "lvis"):
        instances = coco.load_instances(args.annotations, flavor=args.source)
        notes["dropped_annotations"] = instances.dropped
        if (args.base is None) != (args.novel is None):
            raise SystemExit("give both --base and --novel, or neither")
        if args.base is not None and args.categories is not None:
            raise SystemExit("--categories restricts a single split; with --base/--novel list the categories there")
        if args.base is not None:
            groups = coco.split_categories(instances, parse_names(args.base), parse_names(args.novel))
        else:
            groups = {args.split: parse_names(args.categories)}
        notes["categories"] = {split: names if names is not None else "all" for split, names in groups.items()}
        return {split: coco.detection_candidates(instances, args.images, categories=names, shots=args.shots,
                                                 seed=args.seed, queries=args.queries or "present")
                for split, names in groups.items()}, notes
    if args.source == "classification":
        if bool(args.folder) == bool(args.list):
            raise SystemExit("classification: give --folder DIR or --list FILE")
        entries = classification.folder_entries(args.folder) if args.folder else classification.list_entries(args.list)
        if args.shots:
            entries = classification.k_shot(entries, args.shots, args.seed)
        root = args.folder or args.image_root or "."
        return {args.split: classification.classification_candidates(entries, root, args.noun,
                                                                     source=args.folder or args.list)}, notes
    if args.source == "lisa":
        items = lisa.lisa_folder_items(args.input) if os.path.isdir(args.input) else lisa.lisa_json_items(args.input)
        return {args.split: lisa.grounding_candidates(items, image_root=args.image_root,
                                                      evaluation=bool(args.evaluation))}, notes
    if args.source == "synthetic":
        if args.task == "grounding":
            raise SystemExit("synthetic: --task is detection or classification")
        make = synthetic.detection_records if args.task in (None, "detection") else synthetic.classification_records
        options = {} if make is synthetic.detection_records else {"label": args.label, "shape_size": args.shape_size}
        made = make(args.num_images, seed=args.seed, min_side=args.min_side, max_side=args.max_side,
                    image_format=args.image_format, **options)
        return {args.split: (rec.Candidate(r.id, r.as_dict()) for r in made)}, notes
    raise SystemExit(f"unknown source {args.source!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vrft_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=("virft", "coco", "lvis", "classification", "lisa", "synthetic"))
    p.add_argument("--output", required=True,
                   help="data directory, local or gs://; the dataset goes to OUTPUT/NAME/1.0.0")
    p.add_argument("--name", required=True, help="dataset name (lower-case, digits, underscores)")
    p.add_argument("--split", default="train", help="split name when the source makes one split")
    p.add_argument("--on-bad-record", choices=rec.ON_BAD_RECORD, default="error")
    p.add_argument("--parquet", nargs="+", help="virft: parquet files")
    p.add_argument("--json", help="virft: a JSON list of {image_path, problem, solution}")
    p.add_argument("--image-root", help="where relative image paths start")
    p.add_argument("--task", choices=rec.TASKS, help="virft: force the task (default: from each solution); "
                                                     "synthetic: detection (default) or classification")
    p.add_argument("--annotations", help="coco/lvis: instances JSON")
    p.add_argument("--images", help="coco/lvis: image folder")
    p.add_argument("--categories", help="coco/lvis: only these categories (a,b or @file)")
    p.add_argument("--base", help="coco/lvis: base categories -> split 'base' (a,b or @file)")
    p.add_argument("--novel", help="coco/lvis: novel categories -> split 'novel' (a,b or @file)")
    p.add_argument("--shots", type=int, help="k images per category / class (default: all)")
    p.add_argument("--queries", help="coco/lvis evaluation sets: present (default: the categories each image has), "
                                     "all (every category in every image) or exist:FILE (Visual-RFT's exist map)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", help="classification: a folder per class")
    p.add_argument("--list", help="classification: image<TAB>class list file")
    p.add_argument("--noun", default="aircraft", choices=sorted(classification.prompts.CLASSIFICATION_NOUNS))
    p.add_argument("--input", help="lisa: LISA's train/ (val/, test/) folder or lisa_train.json")
    p.add_argument("--evaluation", action="store_true", default=None,  # absent: not in the dataset's source
                   help="lisa: an evaluation set as lisa_evaluation's: one record per image (its first instruction "
                        "and box), the evaluation prompt, the exact pixel box as the label")
    p.add_argument("--num-images", type=int, default=64, help="synthetic: images to draw")
    p.add_argument("--label", choices=synthetic.LABELS, default="shape",
                   help="synthetic classification: what the answer names")
    p.add_argument("--shape-size", choices=tuple(synthetic.SHAPE_SIZES), default="mixed",
                   help="synthetic classification: sides of 1/6-1/2 (mixed) or 1/2-1 (large) of the image")
    p.add_argument("--min-side", type=int, default=64, help="synthetic: smallest image side (px)")
    p.add_argument("--max-side", type=int, default=160, help="synthetic: largest image side (px)")
    p.add_argument("--image-format", default="PNG", choices=("PNG", "JPEG"), help="synthetic: encoding")
    return p


def _source(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in ("output", "name")}


def source_args(argv: Sequence[str]) -> dict:
    """What a dataset made by `main(argv)` records as its source (`storage.read_metadata(path)["source"]`)."""
    return _source(parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    import tensorflow_datasets as tfds

    args = parser().parse_args(argv)
    tfds.disable_progress_bar()
    splits, notes = _splits(args)
    source = _source(args)
    try:
        path, report = convert(splits, args.output, args.name, on_bad_record=args.on_bad_record, source=source,
                               notes=notes)
    except rec.BadRecordError as e:
        print(f"error: {e}\n(rerun with --on-bad-record skip to leave such records out and count them)",
              file=sys.stderr)
        return 1
    print(json.dumps({"path": path, "written": report.written, "skipped": report.skipped, "notes": report.notes},
                     indent=2))
    for line in report.skipped_records[:20]:
        print(f"skipped {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
