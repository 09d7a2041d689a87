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

from vrft_jax import cli
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
            inputs = [f"--{key} {' '.join(_as_list(value))}" for key, value in (source or {}).items()
                      if key in _INPUTS and key != "image_root"]
            raise rec.SourceError(f"split {split!r}{' of ' + inputs[0] if inputs else ''} has no usable records "
                                  f"(skipped: {report.skipped})")
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
    if args.source == "virft":
        candidates = (virft.parquet_candidates(args.parquet, task=args.task, image_root=args.image_root) if args.parquet
                      else virft.json_candidates(args.json, task=args.task, image_root=args.image_root))
        return {args.split: candidates}, notes
    if args.source in ("coco", "lvis"):
        instances = coco.load_instances(args.annotations, flavor=args.source)
        notes["dropped_annotations"] = instances.dropped
        if (args.base is None) != (args.novel is None):
            raise cli.UserError(f"{args.source}: give both --base and --novel, or neither")
        if args.base is not None and args.categories is not None:
            raise cli.UserError("--categories restricts a single split; with --base/--novel list the categories there")
        if args.base is not None:
            groups = coco.split_categories(instances, parse_names(args.base), parse_names(args.novel))
        else:
            groups = {args.split: parse_names(args.categories)}
        notes["categories"] = {split: names if names is not None else "all" for split, names in groups.items()}
        return {split: coco.detection_candidates(instances, args.images, categories=names, shots=args.shots,
                                                 seed=args.seed, queries=args.queries or "present")
                for split, names in groups.items()}, notes
    if args.source == "classification":
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
        make = synthetic.detection_records if args.task in (None, "detection") else synthetic.classification_records
        options = {} if make is synthetic.detection_records else {"label": args.label, "shape_size": args.shape_size}
        made = make(args.num_images, seed=args.seed, min_side=args.min_side, max_side=args.max_side,
                    image_format=args.image_format, **options)
        return {args.split: (rec.Candidate(r.id, r.as_dict()) for r in made)}, notes
    raise AssertionError(f"a source without a branch: {args.source}")


SOURCES = ("virft", "coco", "lvis", "classification", "lisa", "synthetic")


def parser() -> argparse.ArgumentParser:
    """The command's parser: a sub-command per source, each with its own options (`prepare SOURCE --help`) and
    the destination's (--output, --name, --split, --on-bad-record)."""
    p = cli.ArgumentParser(prog="python -m vrft_jax.data.prepare", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True,
                        help="data directory, local or gs://; the dataset goes to OUTPUT/NAME/1.0.0")
    common.add_argument("--name", required=True, help="dataset name (lower-case letters, digits, underscores)")
    common.add_argument("--split", default="train", help="split name when the source makes one split")
    common.add_argument("--on-bad-record", choices=rec.ON_BAD_RECORD, default="error",
                        help="error (default): stop at the first bad record and name it; skip: leave it out, counted")
    common.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show an error's traceback as well as its line")
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE", parser_class=cli.ArgumentParser)

    p.source_parsers = {}  # name -> its sub-command's parser (`source_options`)

    def source(name: str, summary: str) -> argparse.ArgumentParser:
        p.source_parsers[name] = sources.add_parser(name, parents=[common], help=summary, description=summary)
        return p.source_parsers[name]

    virft_ = source("virft", "ViRFT parquet files (--parquet) or a ViRFT JSON list (--json)")
    given = virft_.add_mutually_exclusive_group(required=True)
    given.add_argument("--parquet", nargs="+", help="parquet files (ViRFT's hub datasets, data/*.parquet)")
    given.add_argument("--json", help="a JSON list of {image_path, problem, solution}")
    virft_.add_argument("--image-root", help="where relative image paths start (default: the JSON's folder)")
    virft_.add_argument("--task", choices=rec.TASKS, help="force the task (default: from each solution)")
    for flavor in ("coco", "lvis"):
        d = source(flavor, f"{flavor.upper()} instances JSON (--annotations) and its image folder (--images)")
        d.add_argument("--annotations", required=True, help="the instances JSON")
        d.add_argument("--images", required=True, help="the image folder")
        d.add_argument("--categories", help="only these categories (a,b or @file)")
        d.add_argument("--base", help="base categories -> split 'base' (a,b or @file; with --novel)")
        d.add_argument("--novel", help="novel categories -> split 'novel' (a,b or @file; with --base)")
        d.add_argument("--shots", type=int, help="k images per category (default: all)")
        d.add_argument("--queries", help="evaluation sets: present (default: the categories each image has), all "
                                         "(every category in every image) or exist:FILE (Visual-RFT's exist map)")
        d.add_argument("--seed", type=int, default=0, help="the k-shot draw's seed")
    c = source("classification", "a folder per class (--folder) or an image<TAB>class list (--list)")
    given = c.add_mutually_exclusive_group(required=True)
    given.add_argument("--folder", help="a folder per class")
    given.add_argument("--list", help="image<TAB>class list file")
    c.add_argument("--image-root", help="where the list's relative image paths start (default: .)")
    c.add_argument("--noun", default="aircraft", choices=sorted(classification.prompts.CLASSIFICATION_NOUNS),
                   help="what the prompt asks the class of")
    c.add_argument("--shots", type=int, help="k images per class (default: all)")
    c.add_argument("--seed", type=int, default=0, help="the k-shot draw's seed")
    g = source("lisa", "LISA's train/, val/ or test/ folder, or lisa_train.json (--input)")
    g.add_argument("--input", required=True, help="LISA's train/ (val/, test/) folder or lisa_train.json")
    g.add_argument("--image-root", help="where a JSON's relative image paths start")
    g.add_argument("--evaluation", action="store_true", default=None,  # absent: not in the dataset's source
                   help="an evaluation set as lisa_evaluation's: one record per image (its first instruction and "
                        "box), the evaluation prompt, the exact pixel box as the label")
    y = source("synthetic", "shapes drawn on noise, for tests and the demo (nothing to download)")
    y.add_argument("--task", choices=("detection", "classification"), help="detection (default) or classification")
    y.add_argument("--num-images", type=int, default=64, help="images to draw")
    y.add_argument("--label", choices=synthetic.LABELS, default="shape", help="classification: what the answer names")
    y.add_argument("--shape-size", choices=tuple(synthetic.SHAPE_SIZES), default="mixed",
                   help="classification: sides of 1/6-1/2 (mixed) or 1/2-1 (large) of the image")
    y.add_argument("--min-side", type=int, default=64, help="smallest image side (px)")
    y.add_argument("--max-side", type=int, default=160, help="largest image side (px)")
    y.add_argument("--image-format", default="PNG", choices=("PNG", "JPEG"), help="encoding")
    y.add_argument("--seed", type=int, default=0, help="the drawing's seed")
    return p


def _source(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in ("output", "name", "verbose")}


def source_args(argv: Sequence[str]) -> dict:
    """What a dataset made by `main(argv)` records as its source (`storage.read_metadata(path)["source"]`)."""
    return _source(parser().parse_args(argv))


def source_options(source: str) -> set[str]:
    """The names under which a dataset of `source` records its options (the sub-command's, less the
    destination's): what two datasets of that source are compared on."""
    options = parser().source_parsers[source]._actions
    return {action.dest for action in options if action.dest not in ("help", "output", "name", "verbose")} | {
        "source"}


# the options that name an input, and whether it is a file or a folder
_INPUTS = {"parquet": "file", "json": "file", "annotations": "file", "images": "folder", "folder": "folder",
           "list": "file", "input": "file or folder", "image_root": "folder"}


def check_inputs(args: argparse.Namespace) -> None:
    """UserError naming the first input option whose file or folder is not there (and `--queries exist:FILE`,
    and a `@FILE` category list), before anything is read or written."""
    given = [(f"--{key.replace('_', '-')}", path, kind) for key, kind in _INPUTS.items()
             for path in _as_list(getattr(args, key, None))]
    queries = getattr(args, "queries", None) or ""
    if queries.startswith("exist:"):
        given.append(("--queries exist:", queries[len("exist:"):], "file"))
    for key in ("categories", "base", "novel"):
        value = getattr(args, key, None) or ""
        if value.startswith("@"):
            given.append((f"--{key} @", value[1:], "file"))
    for option, path, kind in given:
        exists = os.path.isdir(path) if kind == "folder" else os.path.isfile(path) if kind == "file" else (
            os.path.exists(path))
        if not exists:
            there = " (it is a folder)" if kind == "file" and os.path.isdir(path) else ""
            raise cli.UserError(f"{option.rstrip()}{'' if option.endswith((':', '@')) else ' '}{path}: no such "
                                f"{kind}{there}")


def _as_list(value) -> list[str]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    """The command: the dataset written and its report printed (0); a UserError names what is wrong, and nothing
    is left where the dataset would have gone."""
    import tensorflow_datasets as tfds

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and not set(argv) & {"-h", "--help"}:
        raise cli.UserError(f"the source comes first: python -m vrft_jax.data.prepare SOURCE {' '.join(argv)} "
                            f"(SOURCE one of {', '.join(SOURCES)})")
    args = parser().parse_args(argv)
    tfds.disable_progress_bar()
    check_inputs(args)
    storage.check_new_dataset(args.output, args.name)
    splits, notes = _splits(args)
    source = _source(args)
    try:
        path, report = convert(splits, args.output, args.name, on_bad_record=args.on_bad_record, source=source,
                               notes=notes)
    except rec.BadRecordError as e:
        raise rec.BadRecordError(e.where, e.reason, f"{e.detail}; rerun with --on-bad-record skip to leave such "
                                 "records out and count them") from None
    print(json.dumps({"path": path, "written": report.written, "skipped": report.skipped, "notes": report.notes},
                     indent=2))
    for line in report.skipped_records[:20]:
        print(f"skipped {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(lambda argv: main(argv[1:]))
