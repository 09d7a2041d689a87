"""LISA reasoning segmentation -> Visual-RFT grounding records (reference/visual-rft.md §3.4).

As Visual-RFT's lisa_evaluation/gen_box_ann.py + gen_sft.py: the box of the first polygon only (its
min/max x and y in pixels), one record per instruction, the box written as
`<answer> (x1,y1),(x2,y2) </answer>` with `int(x / W * 1000)` (truncation, as gen_sft.py does).
Inputs: LISA's own `train/` (`val/`, `test/`) folder (one `<name>.json` with `text` and `shapes` next to
`<name>.jpg`), or gen_box_ann.py's `lisa_train.json` (`[{image_path, instruction: [...], boxes: [[x1, y1, x2, y2]]}]`).

Evaluation sets (`evaluation=True`, `prepare lisa --evaluation`) are made as lisa_evaluation scores val and test
(visual-rft.md §7.4): one record per image, its first instruction and first box, the evaluation prompt
(`prompts.grounding_eval_problem`), and the exact pixel box as the record's label (`pixel_box_label`), which the
grounding evaluator scores against instead of the solution's truncated 0..1000 box.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from vrft_jax.data import image as image_lib
from vrft_jax.data import prompts
from vrft_jax.data import records as rec


def lisa_folder_items(folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, {image_path, instruction, boxes}) for each annotation JSON of a LISA folder."""
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".json"):
            continue
        path = os.path.join(folder, file)
        where = f"{path}"
        try:
            with open(path, encoding="utf-8") as f:
                item = json.load(f)
            shapes = item.get("shapes") or []
            points = shapes[0]["points"] if shapes else []
            xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
            boxes = [[min(xs), min(ys), max(xs), max(ys)]] if points else []
            instructions = item.get("text")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            yield where, {"error": f"unreadable annotation ({type(e).__name__}: {e})"}
            continue
        yield where, {"image_path": path[:-len(".json")] + ".jpg", "instruction": instructions, "boxes": boxes}


def lisa_json_items(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, item) for each entry of a lisa_train.json-style list; SourceError for a file that is not one."""
    items = rec.load_json(path, "a LISA JSON list")
    if not isinstance(items, list):
        raise rec.SourceError(f"{path}: expected a JSON list of LISA items, got a JSON {type(items).__name__}")
    return ((f"entry {k} of {path}", item) for k, item in enumerate(items))


def pixel_box_label(box: Sequence[float]) -> str:
    """The label of an evaluation record: its first box in the image's pixels, as JSON `[x1, y1, x2, y2]`."""
    return json.dumps([float(v) for v in box])


def read_pixel_box(label: str) -> list[float] | None:
    """The pixel box `pixel_box_label` wrote, or None for a label that is not one (a training record's "")."""
    try:
        box = json.loads(label) if label.startswith("[") else None
    except ValueError:
        return None
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return None
    return [float(v) for v in box]


def grounding_candidates(items, *, image_root: str | None = None, evaluation: bool = False
                         ) -> Iterator[rec.Candidate]:
    """One candidate per instruction of each item (training); with `evaluation`, one per item: its first
    instruction in the evaluation prompt, labelled with its pixel box. The image header gives W and H for the
    0..1000 box."""
    for where, item in items:
        if "error" in item:
            yield rec.Candidate(where, {}, (rec.MISSING_FIELD, item["error"]))
            continue
        image_path = item.get("image_path") or ""
        if image_root and image_path and not os.path.isabs(image_path):
            image_path = os.path.join(image_root, image_path)
        instructions = item.get("instruction")
        if isinstance(instructions, str):
            instructions = [instructions]
        boxes: Sequence = item.get("boxes") or []
        stem = os.path.splitext(os.path.basename(image_path))[0] or where
        if not image_path or not instructions or not boxes:
            yield rec.Candidate(where, {}, (rec.MISSING_FIELD, "needs image_path, instruction(s) and a box"))
            continue
        try:
            width, height = image_lib.open_image(image_lib.load_encoded(image_path)).size
        except (OSError, ValueError) as e:
            yield rec.Candidate(where, {}, (rec.BAD_IMAGE, str(e)))
            continue
        try:
            box = prompts.box_to_rel1000_truncated(boxes[0], width, height)
            solution = prompts.grounding_solution(box)
        except (TypeError, ValueError) as e:
            yield rec.Candidate(where, {}, (rec.BAD_SOLUTION, f"box {boxes[0]!r}: {e}"))
            continue
        if evaluation:
            fields = {"id": f"lisa:{stem}:0", "image": image_path,
                      "problem": prompts.grounding_eval_problem(str(instructions[0])), "solution": solution,
                      "task": "grounding", "label": pixel_box_label(boxes[0])}
            yield rec.Candidate(f"instruction 0 of {where}", fields)
            continue
        for k, instruction in enumerate(instructions):
            fields = {"id": f"lisa:{stem}:{k}", "image": image_path,
                      "problem": prompts.grounding_problem(str(instruction)),
                      "solution": solution, "task": "grounding", "label": ""}
            yield rec.Candidate(f"instruction {k} of {where}", fields)
