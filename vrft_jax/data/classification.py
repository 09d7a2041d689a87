"""Fine-grained classification sets -> Visual-RFT classification records.

Two layouts: a folder per class (`<root>/<class name>/<image>`), or a list file of
`<image path>\t<class name>` lines (paths relative to the image root; `#` starts a comment). The
problem is Visual-RFT's classification prompt for the set's noun (`prompts.CLASSIFICATION_NOUNS`),
the solution `<answer>{class name}</answer>`. k-shot subsets pick k images per class by seed, like
the 4-shot ViRFT_CLS sets.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import numpy as np

from vrft_jax.data import prompts
from vrft_jax.data import records as rec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def folder_entries(root: str) -> list[tuple[str, str]]:
    """(image path relative to root, class name) for `<root>/<class>/<image>`, sorted."""
    if not os.path.isdir(root):
        raise rec.SourceError(f"--folder {root}: no such folder")
    entries = []
    for class_name in sorted(os.listdir(root)):
        folder = os.path.join(root, class_name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                entries.append((os.path.join(class_name, file), class_name))
    if not entries:
        raise rec.SourceError(f"--folder {root}: no images in {root}/<class>/ ({', '.join(IMAGE_EXTENSIONS)})")
    return entries


def list_entries(path: str) -> list[tuple[str, str]]:
    """(image path, class name) from a tab-separated list file; a line without a tab is an error."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" not in line:
                raise rec.SourceError(f"{path}:{number}: expected '<image path>\\t<class name>', got {line!r}")
            image, class_name = line.split("\t", 1)
            entries.append((image.strip(), class_name.strip()))
    return entries


def k_shot(entries: list[tuple[str, str]], shots: int, seed: int) -> list[tuple[str, str]]:
    """`shots` entries of each class (all when fewer), drawn by a generator seeded with (seed, CRC-32 of
    the class name): a class's subset does not change when other classes are added or removed."""
    if shots <= 0:
        raise rec.SourceError(f"--shots must be positive, got {shots}")
    by_class: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        by_class.setdefault(entry[1], []).append(entry)
    chosen = []
    for class_name in sorted(by_class):
        members = sorted(by_class[class_name])
        order = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))]).permutation(len(members))
        chosen.extend(sorted(members[i] for i in order[:shots]))
    return chosen


def classification_candidates(entries: list[tuple[str, str]], image_root: str, noun: str, *,
                              source: str) -> Iterator[rec.Candidate]:
    problem = prompts.classification_problem(noun)
    for k, (image, class_name) in enumerate(entries):
        fields = {"id": f"cls:{image}", "image": image if os.path.isabs(image) else os.path.join(image_root, image),
                  "problem": problem, "solution": prompts.classification_solution(class_name),
                  "task": "classification", "label": class_name}
        yield rec.Candidate(f"entry {k} ({image!r}) of {source}", fields)
