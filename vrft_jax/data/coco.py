"""COCO and LVIS instance annotations -> Visual-RFT detection records, k-shot subsets, base/novel splits.

One record per (image, category) present in it, listing every box of that category in the image as
`<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>` on the 0..1000 grid
(`prompts.box_to_rel1000`: `x * 1000 / W`, rounded half up, clipped). Crowd annotations (COCO
`iscrowd=1`) and boxes without area are left out and counted in the report. LVIS names keep their
underscores ("kitchen_table"), as in ViRFT_LVIS_few_shot.

k-shot: for each category, k images drawn from those that contain it, by a generator seeded with
(seed, category id), so a category's subset does not change when other categories are added or removed.
LVIS's negative and not-exhaustive category lists are not used: Visual-RFT's records are positives only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.data import prompts
from vrft_jax.data import records as rec


@dataclasses.dataclass
class Instances:
    """An instance-annotation file, indexed.

    images:     image id -> the file's image entry (file_name or coco_url, width, height)
    categories: category id -> name
    boxes:      (image id, category id) -> pixel boxes [x1, y1, x2, y2]
    dropped:    annotations left out, by reason ("crowd", "empty_box", "unknown_image", "unknown_category")
    flavor:     "coco" or "lvis"
    """

    images: dict[int, dict[str, Any]]
    categories: dict[int, str]
    boxes: dict[tuple[int, int], list[list[float]]]
    dropped: dict[str, int]
    flavor: str
    by_category: dict[int, list[int]] = dataclasses.field(init=False)

    def __post_init__(self):
        by_category: dict[int, list[int]] = {cid: [] for cid in self.categories}
        for image_id, category_id in self.boxes:
            by_category[category_id].append(image_id)
        self.by_category = {cid: sorted(ids) for cid, ids in by_category.items()}

    def images_of(self, category_id: int) -> list[int]:
        """Sorted ids of the images with at least one kept box of the category."""
        return self.by_category[category_id]

    def category_ids(self, names: Iterable[str] | None = None) -> list[int]:
        """Ids of the named categories (all when None); unknown names are an error listing them."""
        by_name = {name: cid for cid, name in self.categories.items()}
        if names is None:
            return sorted(self.categories)
        names = list(names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise rec.UnknownNameError(f"categories {unknown} are not in this {self.flavor} file "
                           f"(it has {len(by_name)}, e.g. {sorted(by_name)[:5]})")
        return [by_name[n] for n in names]


def load_instances(annotations: str | Mapping[str, Any], flavor: str | None = None) -> Instances:
    """Index a COCO or LVIS instances file (path or parsed dict); `flavor` None detects it (LVIS
    categories carry a `frequency`)."""
    where = "the instances" if isinstance(annotations, Mapping) else annotations
    if not isinstance(annotations, Mapping):
        annotations = rec.load_json(annotations, "an instances file")
    if not isinstance(annotations, Mapping):
        raise rec.SourceError(f"{where}: an instances file is an object with images, annotations and categories, "
                              f"not a JSON {type(annotations).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(annotations.get(key), list):
            raise rec.SourceError(f"{where}: no {key!r} list (keys: {sorted(annotations)})")
    if flavor is None:
        flavor = "lvis" if any("frequency" in c for c in annotations["categories"]) else "coco"
    if flavor not in ("coco", "lvis"):
        raise ValueError(f"flavor must be 'coco' or 'lvis', got {flavor!r}")
    images = {int(image["id"]): image for image in annotations["images"]}
    categories = {int(c["id"]): str(c["name"]) for c in annotations["categories"]}
    boxes: dict[tuple[int, int], list[list[float]]] = {}
    dropped: dict[str, int] = {}
    for ann in annotations["annotations"]:
        image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
        x, y, w, h = (float(v) for v in ann["bbox"])
        reason = ("unknown_image" if image_id not in images else "unknown_category" if category_id not in categories
                  else "crowd" if ann.get("iscrowd", 0) else "empty_box" if w <= 0 or h <= 0 else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        boxes.setdefault((image_id, category_id), []).append([x, y, x + w, y + h])
    return Instances(images, categories, boxes, dropped, flavor)


def k_shot(instances: Instances, shots: int, seed: int, category_ids: Sequence[int]) -> dict[int, list[int]]:
    """category id -> the sorted ids of `shots` images containing it (all of them when fewer)."""
    if shots <= 0:
        raise rec.SourceError(f"--shots must be positive, got {shots}")
    chosen = {}
    for category_id in category_ids:
        candidates = instances.images_of(category_id)
        order = np.random.default_rng([seed, category_id]).permutation(len(candidates))
        chosen[category_id] = sorted(candidates[i] for i in order[:shots])
    return chosen


def image_path(image: Mapping[str, Any], image_root: str) -> str:
    """Where an image entry's file is under `image_root`: COCO's `file_name`; for LVIS (which has only
    `coco_url`) `<root>/<split>/<file>` when present, else `<root>/<file>`."""
    if image.get("file_name"):
        return os.path.join(image_root, image["file_name"])
    url = image.get("coco_url") or image.get("flickr_url") or ""
    parts = url.rstrip("/").split("/")
    if len(parts) >= 2:
        nested = os.path.join(image_root, parts[-2], parts[-1])
        return nested if os.path.exists(nested) else os.path.join(image_root, parts[-1])
    return os.path.join(image_root, str(image.get("id")))


QUERIES = ("present", "all", "exist:FILE")


def query_pairs(instances: Instances, category_ids: Sequence[int], queries: str) -> Iterator[tuple[int, int]]:
    """(image id, category id) questions of an evaluation set, by protocol:

    present      every image with a box of the category (training's records: the answer is never empty)
    all          every category in every image of the file (the full protocol: absent ones answer No Objects)
    exist:FILE   Visual-RFT's: the categories FILE ({image id: [names]}, its exist_map_*.json) lists for each
                 image, of the chosen ones; names the file lists that the annotations lack are an error
    """
    if queries == "present":
        for category_id in category_ids:
            for image_id in instances.images_of(category_id):
                yield image_id, category_id
    elif queries == "all":
        for image_id in sorted(instances.images):
            for category_id in category_ids:
                yield image_id, category_id
    elif queries.startswith("exist:"):
        listed = rec.load_json(queries[len("exist:"):], "an exist map ({image id: [category names]})")
        if not isinstance(listed, Mapping):
            raise rec.SourceError(f"{queries}: an exist map is an object {{image id: [category names]}}")
        by_name = {instances.categories[c]: c for c in category_ids}
        known = set(instances.categories.values())
        for image_id in sorted(instances.images):
            names = listed.get(str(image_id), [])
            unknown = sorted(set(names) - known)
            if unknown:
                raise rec.SourceError(f"{queries}: image {image_id} lists categories {unknown} the annotations lack")
            for name in dict.fromkeys(names):  # in the file's order, once each
                if name in by_name:
                    yield image_id, by_name[name]
    else:
        raise rec.SourceError(f"--queries must be one of {QUERIES}, got {queries!r}")


def detection_candidates(instances: Instances, image_root: str, *, categories: Iterable[str] | None = None,
                         shots: int | None = None, seed: int = 0, queries: str = "present") -> Iterator[rec.Candidate]:
    """Records of the chosen categories (all by default): the `queries` questions (`query_pairs`), or k-shot
    images. A question about a category the image does not have answers `No Objects`."""
    category_ids = instances.category_ids(categories)
    if shots is None:
        pairs = query_pairs(instances, category_ids, queries)
    else:
        if queries != "present":
            raise rec.SourceError("k-shot subsets are training records: --shots takes no --queries")
        chosen = k_shot(instances, shots, seed, category_ids)
        pairs = ((image_id, cid) for cid in category_ids for image_id in chosen[cid])
    for image_id, category_id in pairs:
        name = instances.categories[category_id]
        image = instances.images[image_id]
        where = f"image {image_id} category {category_id} ({name!r}) of the {instances.flavor} annotations"
        width, height = image.get("width"), image.get("height")
        if not width or not height:
            yield rec.Candidate(where, {}, (rec.MISSING_FIELD, "image entry has no width/height"))
            continue
        boxes = [prompts.box_to_rel1000(box, width, height) for box in instances.boxes.get((image_id, category_id), [])]
        solution = prompts.detection_solution(boxes) if boxes else f"<answer>{rec.NO_OBJECTS}</answer>"
        fields = {"id": f"{instances.flavor}:{image_id}:{category_id}", "image": image_path(image, image_root),
                  "problem": prompts.detection_problem(name), "solution": solution, "task": "detection",
                  "label": name}
        yield rec.Candidate(where, fields)


def split_categories(instances: Instances, base: Sequence[str], novel: Sequence[str]) -> dict[str, list[str]]:
    """{"base": names, "novel": names} for open-vocabulary training and testing; names must exist and
    the two lists must not overlap."""
    instances.category_ids(list(base) + list(novel))
    overlap = sorted(set(base) & set(novel))
    if overlap:
        raise rec.SourceError(f"categories {overlap} are listed as both base and novel")
    return {"base": list(base), "novel": list(novel)}
