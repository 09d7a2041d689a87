"""The published ViRFT datasets: Hugging Face parquet (`image` as {bytes, path}, `problem`, `solution`)
and Visual-RFT's JSON (`[{image_path, problem, solution}]`, dataset/build_dataset.ipynb's input)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from vrft_jax.data import records as rec

_CATEGORY = re.compile(r"category '(.+?)' in the image")
_GROUNDING = re.compile(r"<answer>\s*\(\s*\d+\s*,\s*\d+\s*\)\s*,\s*\(\s*\d+\s*,\s*\d+\s*\)\s*</answer>")


def infer_task(solution: str) -> str:
    """detection for box lists (or "No Objects"), grounding for "(x1,y1),(x2,y2)", else classification."""
    if "'Position'" in solution or '"Position"' in solution or rec.NO_OBJECTS in solution:
        return "detection"
    if _GROUNDING.search(solution):
        return "grounding"
    return "classification"


def infer_label(task: str, problem: str, solution: str) -> str:
    """The category (detection, from the prompt) or class (classification, from the answer); "" otherwise."""
    if task == "detection":
        found = _CATEGORY.search(problem)
        return found.group(1) if found else ""
    if task == "classification":
        found = re.fullmatch(r"\s*<answer>(.*)</answer>\s*", solution, re.DOTALL)
        return found.group(1).strip() if found else ""
    return ""


def _candidate(where: str, record_id: str, image: Any, problem: Any, solution: Any, task: str | None) -> rec.Candidate:
    problem = "" if problem is None else str(problem)
    solution = "" if solution is None else str(solution)
    task = task or infer_task(solution)
    fields = {"id": record_id, "image": image, "problem": problem, "solution": solution, "task": task,
              "label": infer_label(task, problem, solution)}
    return rec.Candidate(where, fields)


def parquet_candidates(paths: Sequence[str], *, task: str | None = None,
                       image_root: str | None = None) -> Iterator[rec.Candidate]:
    """Rows of ViRFT parquet files, streamed by row group (a 6k-image file never sits in memory whole).

    `image` is the `datasets` Image struct: its `bytes`, or when those are null its `path` (relative to
    `image_root`, default the parquet file's directory). Ids are "<file name>:<row>".
    """
    import pyarrow
    import pyarrow.parquet as pq

    for path in paths:
        name = os.path.basename(path)
        try:
            parquet = pq.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as e:
            raise rec.SourceError(f"--parquet {path}: not a parquet file ({e})") from None
        columns = set(parquet.schema_arrow.names)
        missing = {"image", "problem", "solution"} - columns
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=sorted(columns & {"image", "problem", "solution"})):
            table = batch.to_pydict()
            for k in range(batch.num_rows):
                where = f"row {row} of {path}"
                image = table["image"][k] if "image" in table else None
                if isinstance(image, dict):  # {bytes, path}
                    data, image_path = image.get("bytes"), image.get("path")
                    image = data if data else (_resolve(image_path, image_root or os.path.dirname(path))
                                               if image_path else None)
                candidate = _candidate(where, f"{name}:{row}", image, table.get("problem", [None] * batch.num_rows)[k],
                                       table.get("solution", [None] * batch.num_rows)[k], task)
                if missing:
                    candidate = rec.Candidate(where, candidate.fields, (rec.MISSING_FIELD, f"file has no column(s) "
                                                                                           f"{sorted(missing)}"))
                yield candidate
                row += 1


def json_candidates(path: str, *, task: str | None = None, image_root: str | None = None) -> Iterator[rec.Candidate]:
    """Entries of a ViRFT JSON list; relative `image_path`s are resolved against `image_root` (default:
    the JSON file's directory). Ids are "<file name>:<position>"."""
    entries = rec.load_json(path, "a ViRFT JSON list")
    if not isinstance(entries, list):
        raise rec.SourceError(f"{path}: expected a JSON list of {{image_path, problem, solution}}, got a JSON "
                              f"{'object' if isinstance(entries, dict) else type(entries).__name__}")
    return _json_entries(path, entries, task=task, image_root=image_root)


def _json_entries(path: str, entries: list, *, task: str | None, image_root: str | None) -> Iterator[rec.Candidate]:
    name = os.path.basename(path)
    root = image_root or os.path.dirname(os.path.abspath(path))
    for k, entry in enumerate(entries):
        where = f"entry {k} of {path}"
        if not isinstance(entry, dict):
            yield rec.Candidate(where, {}, (rec.MISSING_FIELD, f"entry is a {type(entry).__name__}, not an object"))
            continue
        image_path = entry.get("image_path")
        image = _resolve(image_path, root) if image_path else None
        yield _candidate(where, f"{name}:{k}", image, entry.get("problem"), entry.get("solution"), task)


def _resolve(path: str, root: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)
