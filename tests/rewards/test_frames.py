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


# A stored answer on Visual-RFT's grid, and the same boxes in pixels of a 280 x 560 (height x width) seen image.
STORED = "<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1}, {'Position': [0, 0, 1000, 1000], " \
         "'Confidence': 1}]</answer>"
IN_PIXELS = "<answer>[{'Position': [56, 56, 280, 224], 'Confidence': 1}, {'Position': [0, 0, 560, 280], " \
            "'Confidence': 1}]</answer>"
SEEN_HW = (280, 560)


def test_an_answer_is_rewritten_box_by_box_in_the_models_frame():
    from vrft_jax.rewards.frames import answer_in_frame

    assert answer_in_frame(STORED, "rel1000", "qwen2_5_vl", SEEN_HW) == IN_PIXELS
    assert answer_in_frame(IN_PIXELS, "pixels", "rel1000", SEEN_HW) == STORED
    assert answer_in_frame(STORED, "rel1000", "qwen2_vl", None) == STORED  # same frame: untouched
    # LISA's corners, rounded half up and kept inside the image; text around them is kept
    assert answer_in_frame("<answer> (1,999),(1000,1001) </answer>", "rel1000", "pixels", (100, 300)) == \
        "<answer> (0,100),(300,100) </answer>"
    assert answer_in_frame("<answer>cat</answer>", "rel1000", "pixels", SEEN_HW) == "<answer>cat</answer>"


@pytest.mark.parametrize("model,exact", [("2b", STORED), ("qwen2_5_vl_7b", IN_PIXELS), ("qwen3_vl_4b", STORED)])
def test_an_exactly_right_box_gets_iou_reward_1_in_each_familys_frame(model, exact):
    """The recipe's rewards for `model` (its family's frame, the records' stored grid): the exactly right answer in
    the model's frame scores IoU 1; the same numbers in the other family's frame do not."""
    from vrft_jax import recipe

    reward = recipe.reward_fn(recipe.load(f"lvis_fewshot:model={model}"))
    wrong = IN_PIXELS if exact is STORED else STORED
    scores = reward([exact, wrong], [STORED, STORED], image_hw=[SEEN_HW, SEEN_HW]).per_reward
    assert scores["detection_iou"][0] == 1.0 and scores["detection_iou"][1] < 0.5
    assert scores["detection_confidence"][0] == 1.0
