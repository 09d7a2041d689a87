"""Grounding reward: grpo_lisa.py's GIoU + 1 in paper mode, every box matched in strict mode."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import get_reward

from . import visual_rft_oracle as oracle
from .strategies import examples, grounding_completion, point_pair

GT = "<answer> (0,0),(100,100) </answer>"


def score(mode, content, sol=GT, **columns):
    return float(get_reward("grounding_giou", mode)([content], [sol], **columns)[0])


# (behaviour, completion, solution, paper, strict)
TABLE = [
    ("same box", "<think>t</think><answer>(0,0),(100,100)</answer>", GT, 2.0, 2.0),
    ("half overlap", "<answer>(0,0),(100,200)</answer>", GT, 1.5, 1.5),
    ("disjoint: giou < 0", "<answer>(200,0),(300,100)</answer>", GT, 1 - 1 / 3, 1 - 1 / 3),
    ("spaces in the box", "<answer>( 0 , 0 ) , ( 100 , 100 )</answer>", GT, 2.0, 2.0),
    ("no box", "<answer>the dog on the left</answer>", GT, 0.0, 0.0),
    # Prediction read with DOTALL: newlines inside the tags are fine.
    ("newlines in answer", "<answer>\n(0,0),(100,100)\n</answer>", GT, 2.0, 2.0),
    # Two boxes: the original compares the first two top-left corners, (0,0)-(500,500).
    ("two boxes", "<answer>(0,0),(100,100) (500,500),(600,600)</answer>", GT, 1.04, 1.0),
    # Corner-swapped copy of the gt: negative area scores the paper maximum.
    ("swapped corners", "<answer>(100,100),(0,0)</answer>", GT, 2.0, 0.0),
    # Both axes inverted, off to the side: a positive "area" larger than the enclosing box pushes the
    # original's GIoU above 1 without bound (5.995 here; 4996 for (999,150),(0,100) against a
    # 0.1-wide gt at the far corner): a reward hack of grpo_lisa.py that strict mode closes.
    ("inverted box, unbounded", "<answer>(999,150),(0,100)</answer>", GT, 5.995, 0.0),
    # One inverted axis: negative union, so GIoU falls far below -1.
    ("inverted x", "<answer>(1000,0),(0,1000)</answer>", "<answer>(0,0),(10,10)</answer>", 1 - 100.99, 0.0),
    ("decimals", "<answer>(10.5,0),(100,100)</answer>", GT, 0.0, 1 + 89.5 / 100),
    ("no tags", "(0,0),(100,100)", "<answer>(0,0),(100,100)</answer>", 2.0, 0.0),
    ("unclosed", "<answer>(0,0),(100,100)", GT, 2.0, 0.0),
    ("out of frame", "<answer>(0,0),(1001,100)</answer>", "<answer>(0,0),(1000,100)</answer>", 1 + 1000 / 1001, 0.0),
    # Exact-match bonus: equal strings score 2 even for a zero-width box, whose GIoU + 1 is 1.
    ("bonus: equal strings", "<answer>(10,10),(10,100)</answer>", "<answer>(10,10),(10,100)</answer>", 2.0, 0.0),
    ("bonus: unequal strings", "<answer>(10,10),( 10,100)</answer>", "<answer>(10,10),(10,100)</answer>", 1.0, 0.0),
]


@pytest.mark.parametrize("name, content, sol, paper, strict", TABLE, ids=[t[0] for t in TABLE])
def test_grounding_table(name, content, sol, paper, strict):
    assert score("paper", content, sol) == pytest.approx(paper, rel=1e-6)
    assert score("strict", content, sol) == pytest.approx(strict, rel=1e-6)


def test_strict_scores_every_box_and_extra_boxes_cost():
    boxes = "(0,0),(100,100) (500,500),(600,600) (0,0),(100,200)"
    assert score("strict", f"<answer>{boxes}</answer>") == pytest.approx(2 / 3)
    two_gt = "<answer>(0,0),(100,100) (500,500),(600,600)</answer>"
    # Matched by GIoU, not by order: both boxes are found.
    assert score("strict", "<answer>(500,500),(600,600), (0,0),(100,100)</answer>", two_gt) == 2.0
    assert score("strict", "<answer>(0,0),(100,100)</answer>", two_gt) == 1.0


def test_strict_max_boxes():
    many = "<answer>" + " ".join(["(0,0),(100,100)"] * 11) + "</answer>"
    assert score("strict", many) == 0.0
    assert float(get_reward("grounding_giou", max_boxes=11)([many], [GT])[0]) == pytest.approx(2 / 11)


def test_pixels_frame():
    reward = get_reward("grounding_giou", frame="qwen2_5_vl", solution_frame="qwen2_vl")
    # gt (0,0)-(500,500) per mille of a 400 x 600 (h x w) image is (0,0)-(300,200) in pixels.
    out = reward(["<answer>(0,0),(300,200)</answer>", "<answer>(0,0),(601,200)</answer>"], [
        "<answer>(0,0),(500,500)</answer>"
    ] * 2, image_hw=[(400, 600)] * 2)
    assert out.tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="image_hw"):
        reward(["<answer>(0,0),(300,200)</answer>"], ["<answer>(0,0),(500,500)</answer>"])


@pytest.mark.parametrize("mode", ["paper", "strict"])
def test_solution_without_a_box_raises(mode):
    with pytest.raises(ValueError, match=r"solutions\[0\]: no \(x1,y1\),\(x2,y2\) box"):
        get_reward("grounding_giou", mode)(["x"], ["<answer>left</answer>"])


def test_strict_solution_with_inverted_box_raises():
    with pytest.raises(ValueError, match="box 0"):
        get_reward("grounding_giou")(["x"], ["<answer>(10,10),(0,0)</answer>"])


def _oracle_f32(value):
    value = np.float32(value)
    return value if np.isfinite(value) else np.float32(0.0)


@st.composite
def _pair(draw):
    truth = draw(point_pair().filter(lambda t: len(t) < 100))
    return draw(grounding_completion()), f"<answer> {truth} </answer>"


@examples(1000)
@given(st.lists(_pair(), min_size=1, max_size=5))
def test_paper_mode_equals_the_original(pairs):
    contents, sols = zip(*pairs)
    got = get_reward("grounding_giou", "paper")(contents, sols)
    np.testing.assert_array_equal(got, [_oracle_f32(oracle.grounding(c, s)) for c, s in pairs])


def test_paper_mode_reads_a_stored_grid_answer_in_the_pixels_frame():
    """Qwen2.5-VL's frame over records on Visual-RFT's grid: the paper's raw-number comparison is made on the answer
    rewritten in pixels of the seen image, so the exactly right pixel answer gets the paper's 2 (exact text)."""
    from vrft_jax.data.prompts import grounding_solution
    from vrft_jax.rewards import get_reward

    reward = get_reward("grounding_giou", "paper", frame="qwen2_5_vl", solution_frame="rel1000")
    assert reward.columns == ("image_hw",)
    solution = grounding_solution([100, 200, 500, 800])
    scores = reward.score(["<answer> (56,56),(280,224) </answer>", "<answer> (100,200),(500,800) </answer>"],
                          [solution, solution], {"image_hw": [(280, 560), (280, 560)]})
    assert scores[0] == 2.0 and scores[1] < 1.0
