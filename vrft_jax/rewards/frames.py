"""Coordinate frames of boxes, and conversion between them.

Qwen2-VL (and Qwen3-VL) writes a box as integers on a 0-1000 grid relative to the image (`x / W * 1000`);
Qwen2.5-VL writes absolute pixels of the image as the model saw it, i.e. after the processor's
`smart_resize` (the Visual-RFT author in Liuziyu77/Visual-RFT#143, #152). A recipe names the frame
its model writes (`frame="qwen2_vl"`), and the rewards compare boxes in that frame, converting
ground truth stored in another frame (`solution_frame=...`) with the example's image size.

Conventions: a box is `(x1, y1, x2, y2)`; arrays of boxes are float64[..., 4]; an image size is
`(height, width)`, Qwen's order (`smart_resize(height, width)`, `image_grid_thw = (t, h, w)`).
"""
from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence

import numpy as np

# Side of Qwen2-VL's relative grid: coordinates are x / W * 1000 and y / H * 1000.
REL_SCALE = 1000.0


class Frame(str, enum.Enum):
    """Where box coordinates live."""

    REL1000 = "rel1000"  # Qwen2-VL: 0..1000 relative to width and height.
    PIXELS = "pixels"  # Qwen2.5-VL: absolute pixels of the resized image the model saw.


# Names a recipe may use; the model names say which model writes which frame.
FRAME_NAMES: dict[str, Frame] = {
    "rel1000": Frame.REL1000,
    "qwen2_vl": Frame.REL1000,
    "pixels": Frame.PIXELS,
    "qwen2_5_vl": Frame.PIXELS,
    # Qwen3-VL went back to the relative grid (QwenLM/Qwen3-VL#1741). Its upper bound is stated as 1000 there and
    # as 999 in Alibaba Cloud's documentation; we keep Visual-RFT's x / W * 1000, whose largest value is 1000.
    "qwen3_vl": Frame.REL1000,
}


def frame_of(name: str | Frame) -> Frame:
    """The frame called `name` (a `Frame` or one of `FRAME_NAMES`); ValueError otherwise."""
    if isinstance(name, Frame):
        return name
    try:
        return FRAME_NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown box frame {name!r}; known: {sorted(FRAME_NAMES)}") from None


def image_hw_of(value: object, index: int) -> tuple[float, float]:
    """`(height, width)` as two positive finite floats, or ValueError naming example `index`."""
    try:
        height, width = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"image_hw[{index}] must be (height, width), got {value!r}") from None
    if not (np.isfinite(height) and np.isfinite(width) and height > 0 and width > 0):
        raise ValueError(f"image_hw[{index}] must be positive and finite, got {value!r}")
    return height, width


def frame_extent(frame: Frame, image_hw: tuple[float, float] | None = None) -> tuple[float, float]:
    """`(width, height)` of the frame: the largest valid x and y. PIXELS needs the image size."""
    if frame is Frame.REL1000:
        return REL_SCALE, REL_SCALE
    if image_hw is None:
        raise ValueError("boxes in the pixels frame need the image size (column image_hw)")
    height, width = image_hw
    return float(width), float(height)


def convert_boxes(
    boxes: np.ndarray | Sequence[Sequence[float]],
    src: str | Frame,
    dst: str | Frame,
    image_hw: tuple[float, float] | None = None,
) -> np.ndarray:
    """float64[..., 4] boxes from frame `src` to frame `dst` of an image of size `image_hw`.

    No rounding: Qwen writes integers, but a reward compares in floats. Round with `np.rint` (or
    truncate, as LISA's data script does with `int()`) when writing training targets.
    """
    out = np.array(boxes, dtype=np.float64)
    if out.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {out.shape}")
    src, dst = frame_of(src), frame_of(dst)
    if src is dst:
        return out
    if image_hw is None:
        raise ValueError(f"converting boxes from {src.value} to {dst.value} needs image_hw")
    height, width = image_hw
    size_xyxy = np.array([width, height, width, height], dtype=np.float64)
    if src is Frame.REL1000:
        # Visual-RFT's evaluation converts x / 1000 * W (coco_evaluation/Qwen2_VL_coco_infere.py).
        return out / REL_SCALE * size_xyxy
    return out / size_xyxy * REL_SCALE


def size_from_grid_thw(grid_thw: Sequence[int], patch_size: int = 14) -> tuple[int, int]:
    """`(height, width)` of the resized image from Qwen2-VL's `image_grid_thw = (t, h, w)`.

    The image processor cuts the `smart_resize`d image into `patch_size` patches, so the grid
    times the patch size is exactly the size the model saw: the PIXELS frame's extent.
    """
    _, grid_h, grid_w = (int(v) for v in grid_thw)
    return grid_h * patch_size, grid_w * patch_size


# A stored answer's boxes: detection's `'Position': [x1, y1, x2, y2]` and LISA's `(x1,y1),(x2,y2)`.
_POSITION = re.compile(r"('Position':\s*\[)([^\]]*)(\])")
_CORNERS = re.compile(r"\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)")


def answer_in_frame(answer: str, src: str | Frame, dst: str | Frame, image_hw: Sequence[float] | None) -> str:
    """An answer text with every box written in frame `src` rewritten in frame `dst` for an image of size
    `image_hw` = (height, width): integers rounded half up and kept within the frame. Detection's
    `'Position': [...]` and LISA's `(x1,y1),(x2,y2)` are rewritten; other text is left as it is. This is how a
    record's stored answer (`prepare` writes Visual-RFT's 0..1000 grid) becomes what a Qwen2.5-VL model writes.
    """
    src, dst = frame_of(src), frame_of(dst)
    if src is dst:
        return answer
    if image_hw is None:
        raise ValueError(f"rewriting an answer's boxes from {src.value} to {dst.value} needs image_hw")
    height, width = image_hw_of(image_hw, 0)
    extent_x, extent_y = frame_extent(dst, (height, width))

    def converted(values: Sequence[str]) -> list[int]:
        box = convert_boxes([float(v) for v in values], src, dst, (height, width))
        return [min(int(limit), max(0, math.floor(v + 0.5)))
                for v, limit in zip(box, (extent_x, extent_y, extent_x, extent_y))]

    def position(match: re.Match) -> str:
        values = [v for v in match.group(2).split(",") if v.strip()]
        if len(values) != 4:
            return match.group(0)
        return match.group(1) + ", ".join(map(str, converted(values))) + match.group(3)

    def corners(match: re.Match) -> str:
        x1, y1, x2, y2 = converted(match.groups())
        return f"({x1},{y1}),({x2},{y2})"

    return _CORNERS.sub(corners, _POSITION.sub(position, answer))
