"""A deterministic synthetic source: coloured shapes on varied backgrounds, with exact boxes.

Detection records follow the ViRFT format (one record per (image, category), all boxes of the
category, 0..1000 integer boxes) with categories like "red circle"; classification records show one
shape and ask for its kind with the classification prompt (noun "shape"). The same (seed, index)
always gives the same bytes, so tests, the demo and benchmarks need no downloaded data.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from vrft_jax.data import prompts
from vrft_jax.data.records import Record

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "gradient", "noise")


SHAPE_SIZES = {"mixed": (6, 2), "large": (2, 1)}  # a shape's side: from short // a to short // b (exclusive)


def render(rng: np.random.Generator, height: int, width: int, num_shapes: int, shape_size: str = "mixed"):
    """(RGB image, [(category, pixel box [x1, y1, x2, y2])]) with non-overlapping shapes. `shape_size`
    "mixed": sides from 1/6 to 1/2 of the image's shorter side; "large": from 1/2 to all of it."""
    if shape_size not in SHAPE_SIZES:
        raise ValueError(f"unknown shape_size {shape_size!r}; known: {tuple(SHAPE_SIZES)}")
    low, high = (min(height, width) // d for d in SHAPE_SIZES[shape_size])
    image = _background(rng, height, width)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[str, list[int]]] = []
    for _ in range(num_shapes):
        for _attempt in range(20):  # rejection sampling: shapes never overlap, so every box is exact
            side = int(rng.integers(max(8, low), max(9, high)))
            x1, y1 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            box = [x1, y1, x1 + side, y1 + side]
            if all(_disjoint(box, other) for _, other in placed):
                break
        else:
            continue
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw(draw, shape, box, COLORS[color])
        placed.append((f"{color} {shape}", box))
    return image, placed


def detection_records(num_images: int, *, seed: int = 0, min_side: int = 64, max_side: int = 160,
                      max_shapes: int = 3, image_format: str = "PNG") -> Iterator[Record]:
    """ViRFT-format detection records of `num_images` images (each gives one record per category in it)."""
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image, placed = render(rng, height, width, int(rng.integers(1, max_shapes + 1)))
        data = _encode(image, image_format)
        by_category: dict[str, list[list[int]]] = {}
        for category, box in placed:
            by_category.setdefault(category, []).append(prompts.box_to_rel1000(box, width, height))
        for category in sorted(by_category):
            yield Record(id=f"synthetic:{seed}:{i}:{category.replace(' ', '_')}", image=data,
                         problem=prompts.detection_problem(category),
                         solution=prompts.detection_solution(by_category[category]),
                         task="detection", label=category)


LABELS = ("shape", "colour")


def classification_records(num_images: int, *, seed: int = 0, min_side: int = 64, max_side: int = 160,
                           image_format: str = "PNG", label: str = "shape",
                           shape_size: str = "mixed") -> Iterator[Record]:
    """One shape per image; the answer is its kind ("circle", "square", "triangle"), or with
    label="colour" its colour ("red", ..., "orange"). With shape_size="large" the shape covers a
    quarter to all of the image: `make demo`'s task, which a tiny model learns in minutes."""
    if label not in LABELS:
        raise ValueError(f"unknown synthetic classification label {label!r}; known: {LABELS}")
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image, placed = render(rng, height, width, 1, shape_size)
        colour, kind = placed[0][0].split()
        answer = kind if label == "shape" else colour
        problem = prompts.classification_problem("shape", None if label == "shape" else "colour")
        yield Record(id=f"synthetic_cls:{seed}:{i}", image=_encode(image, image_format), problem=problem,
                     solution=prompts.classification_solution(answer), task="classification", label=answer)


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = rng.integers(90, 200, size=3)  # mid tones, so every named colour stands out
    if kind == "plain":
        pixels = np.broadcast_to(base, (height, width, 3))
    elif kind == "gradient":
        ramp = np.linspace(-40, 40, width)[None, :, None]
        pixels = np.broadcast_to(base + ramp, (height, width, 3))
    else:
        pixels = base + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[int], color) -> None:
    x1, y1, x2, y2 = box
    # PIL's shapes include their last pixel row/column; the box's x2/y2 are exclusive edges.
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=color)


def _disjoint(a: list[int], b: list[int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format.upper() == "JPEG" else {}))
    return buffer.getvalue()
