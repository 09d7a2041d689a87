"""Coordinate frames: Qwen2-VL's 0-1000 grid and Qwen2.5-VL's pixels of the resized image."""
import numpy as np
import pytest

from vrft_jax.rewards import Frame, convert_boxes, frame_of, size_from_grid_thw
from vrft_jax.rewards.frames import frame_extent, image_hw_of


def test_frame_names():
    assert frame_of("qwen2_vl") is Frame.REL1000 and frame_of("rel1000") is Frame.REL1000
    assert frame_of("qwen2_5_vl") is Frame.PIXELS and frame_of(Frame.PIXELS) is Frame.PIXELS
    with pytest.raises(ValueError, match="unknown box frame 'qwen3'"):
        frame_of("qwen3")


def test_rel1000_to_pixels_is_the_evaluation_conversion():
    # coco_evaluation: x1 / 1000 * W, y1 / 1000 * H; image_hw is (height, width).
    boxes = convert_boxes([[1, 364, 98, 649]], "qwen2_vl", "qwen2_5_vl", image_hw=(480, 640))
    np.testing.assert_allclose(boxes, [[0.64, 174.72, 62.72, 311.52]])


def test_round_trip_and_identity():
    boxes = np.array([[[0, 0, 1000, 1000], [12.5, 40, 700, 999]]])
    pixels = convert_boxes(boxes, Frame.REL1000, Frame.PIXELS, image_hw=(476, 644))
    np.testing.assert_allclose(pixels[0, 0], [0, 0, 644, 476])
    np.testing.assert_allclose(convert_boxes(pixels, "pixels", "rel1000", image_hw=(476, 644)), boxes)
    assert convert_boxes(boxes, "qwen2_vl", "rel1000").tolist() == boxes.tolist()


def test_conversion_errors():
    with pytest.raises(ValueError, match="needs image_hw"):
        convert_boxes([[0, 0, 1, 1]], "rel1000", "pixels")
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 4\]"):
        convert_boxes([[0, 0, 1]], "rel1000", "rel1000")


def test_extent_and_image_size():
    assert frame_extent(Frame.REL1000) == (1000.0, 1000.0)
    assert frame_extent(Frame.PIXELS, (476, 644)) == (644.0, 476.0)
    with pytest.raises(ValueError, match="image_hw"):
        frame_extent(Frame.PIXELS)
    with pytest.raises(ValueError, match=r"image_hw\[3\] must be positive"):
        image_hw_of((0, 10), 3)
    with pytest.raises(ValueError, match=r"image_hw\[2\] must be \(height, width\)"):
        image_hw_of(640, 2)


def test_size_from_grid_thw():
    # A 476 x 644 resized image is a 34 x 46 grid of 14-pixel patches.
    assert size_from_grid_thw((1, 34, 46)) == (476, 644)
