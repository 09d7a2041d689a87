"""Detection rewards: hand-derived values for each behaviour of the original, and each strict difference."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import get_reward, score_detection

from . import visual_rft_oracle as oracle
from .strategies import detection_pair, examples


def box(x1, y1, x2, y2, conf, quote="'"):
    q = quote
    return f"{{{q}Position{q}: [{x1}, {y1}, {x2}, {y2}], {q}Confidence{q}: {conf}}}"


def completion(*boxes, think="<think> looking </think> "):
    return f"{think}<answer>[{', '.join(boxes)}]</answer>"


def solution(*positions):
    return "<answer>[" + ", ".join(box(*p, 1) for p in positions) + "]</answer>"


def scores(mode, content, sol, **kwargs):
    out = score_detection([content], [sol], mode=mode, **kwargs)
    return float(out.iou[0]), float(out.confidence[0])


GT = solution((0, 0, 100, 100))

# (behaviour, completion, solution, (iou, confidence)) with the same value in both modes.
BOTH_MODES = [
    # IoU exactly 0.5 is not a match (strict >): unmatched, so confidence scores 1 - c.
    ("threshold: iou 0.5 fails", completion(box(0, 0, 100, 200, 0.9)), GT, (0.0, 0.1)),
    ("threshold: iou 100/199 passes", completion(box(0, 0, 100, 199, 0.9)), GT, (100 / 199, 0.9)),
    # Greedy in confidence order: the 0.8 box (iou 0.6) takes the gt before the 0.3 box (iou 0.9).
    (
        "greedy by confidence",
        completion(box(0, 0, 100, 90, 0.3), box(0, 0, 100, 60, 0.8)),
        GT,
        (0.6 / 2, (0.8 + 0.7) / 2),
    ),
    # Equal confidences keep the answer's order (a stable sort): the first box takes the gt.
    (
        "ties keep answer order",
        completion(box(0, 0, 100, 60, 0.5), box(0, 0, 100, 90, 0.5)),
        GT,
        (0.6 / 2, 0.5),
    ),
    # One gt box per prediction: the second prediction finds none left.
    ("one-to-one", completion(box(0, 0, 100, 100, 0.9), box(0, 0, 100, 99, 0.8)), GT, (1 / 2, (0.9 + 0.2) / 2)),
    ("duplicates removed", completion(box(0, 0, 100, 100, 0.9), box(0, 0, 100, 100, 0.5)), GT, (1.0, 0.9)),
    ("duplicates: 1 == 1.0", completion(box(0, 0, 100, 100, 0.9), box(0.0, 0, 100.0, 100, 0.5)), GT, (1.0, 0.9)),
    # Divided by max(#gt, #pred): a missed gt box and an extra prediction both cost.
    (
        "missed gt",
        completion(box(0, 0, 100, 100, 1)),
        solution((0, 0, 100, 100), (200, 200, 300, 300)),
        (0.5, 1.0),
    ),
    (
        "extra predictions",
        completion(
            box(0, 0, 100, 100, 1), box(500, 500, 600, 600, 0.2), box(700, 0, 800, 50, 0), box(0, 700, 10, 800, 0.5)
        ),
        GT,
        (1 / 4, (1 + 0.8 + 1 + 0.5) / 4),
    ),
    (
        "two matches",
        completion(box(0, 0, 100, 100, 0.6), box(200, 200, 300, 290, 0.7)),
        solution((0, 0, 100, 100), (200, 200, 300, 300)),
        ((1 + 0.9) / 2, (0.6 + 0.7) / 2),
    ),
    (
        "keys reversed, JSON quotes",
        '<answer>[{"Confidence": 0.9, "Position": [0, 0, 100, 100]}]</answer>',
        GT,
        (1.0, 0.9),
    ),
    ("empty list", completion(), GT, (0.0, 0.0)),
    ("no boxes", "<think>hm</think><answer>a dog</answer>", GT, (0.0, 0.0)),
    # A gt with no boxes: every prediction is a false positive, with confidence scored 1 - c.
    ("gt []: false positive", completion(box(0, 0, 10, 10, 0.25)), "<answer>[]</answer>", (0.0, 0.75)),
]


@pytest.mark.parametrize("mode", ["paper", "strict"])
@pytest.mark.parametrize("name, content, sol, expected", BOTH_MODES, ids=[c[0] for c in BOTH_MODES])
def test_detection_table_both_modes(mode, name, content, sol, expected):
    assert scores(mode, content, sol) == pytest.approx(expected, abs=1e-12)


# (behaviour, completion, solution, paper (iou, conf), strict (iou, conf)).
DIFFERENCES = [
    ("NaN confidence", completion(box(0, 0, 100, 100, "NaN")), GT, (1.0, 0.0), (0.0, 0.0)),
    ("infinite confidence", completion(box(0, 0, 100, 100, "Infinity")), GT, (1.0, 1.0), (0.0, 0.0)),
    ("confidence above 1, capped", completion(box(0, 0, 100, 100, 1.5)), GT, (1.0, 1.0), (0.0, 0.0)),
    ("confidence below 0, capped", completion(box(500, 500, 600, 600, -0.5)), GT, (0.0, 1.0), (0.0, 0.0)),
    (
        "an invalid box counts as a prediction",
        completion(box(0, 0, 100, 100, 0.9), box(0, 0, 50, 50, "NaN")),
        GT,
        (0.5, 0.0),  # paper: NaN makes the confidence sum NaN, reported as 0
        (0.5, 0.45),  # strict: the NaN box adds 0 to the confidence sum and 1 to #pred
    ),
    ("degenerate box", completion(box(50, 50, 50, 80, 0.25)), GT, (0.0, 0.75), (0.0, 0.0)),
    (
        "out of frame",
        completion(box(0, 0, 1001, 100, 0.5)),
        solution((0, 0, 1000, 100)),
        (1000 / 1001, 0.5),
        (0.0, 0.0),
    ),
    ("negative coordinate", completion(box(-1, 0, 100, 100, 0.5)), GT, (100 / 101, 0.5), (0.0, 0.0)),
    # The original reads a bare list without tags; strict wants an answer tag.
    ("no answer tag", f"[{box(0, 0, 100, 100, 0.9)}]", GT, (1.0, 0.9), (0.0, 0.0)),
    # Non-DOTALL: a newline inside the answer makes the whole completion the answer, which is not JSON.
    (
        "newline in answer",
        f"<think>t</think><answer>\n[{box(0, 0, 100, 100, 0.9)}]\n</answer>",
        GT,
        (0.0, 0.0),
        (1.0, 0.9),
    ),
    # Cut off by the token limit: the original sees no answer; strict keeps the complete boxes.
    (
        "truncated completion",
        f"<think>t</think><answer>[{box(0, 0, 100, 100, 0.9)}, {{'Position': [3",
        GT,
        (0.0, 0.0),
        (1.0, 0.9),
    ),
    # Truncation repair: an answer not ending in `]` loses its last box, complete or not.
    (
        "truncation repair drops a box",
        f"<answer>[{box(500, 500, 600, 600, 0.5)}, {box(0, 0, 100, 100, 0.9)}] </answer>".replace("] <", "]. <"),
        GT,
        (0.0, 0.5),
        (0.5, 0.7),
    ),
    ("Python literal True", completion(box(0, 0, 100, 100, "True")), GT, (0.0, 0.0), (0.0, 0.0)),
    ("trailing comma", f"<answer>[{box(0, 0, 100, 100, 0.9)},]</answer>", GT, (0.0, 0.0), (1.0, 0.9)),
    ("string confidence", completion(box(0, 0, 100, 100, "'0.9'")), GT, (0.0, 0.0), (0.0, 0.0)),
    # A Position that is not four numbers raises only if it meets an unmatched gt box.
    (
        "bad Position after all gt matched",
        completion(box(0, 0, 100, 100, 0.9), "{'Position': [1, 2, 3], 'Confidence': 0.2}"),
        GT,
        (0.5, 0.85),
        (0.5, 0.45),
    ),
    (
        "bad Position first",
        completion(box(0, 0, 100, 100, 0.1), "{'Position': [1, 2, 3], 'Confidence': 0.2}"),
        GT,
        (0.0, 0.0),
        (0.5, 0.05),
    ),
    ("abstain, gt has boxes", "<answer>No Objects</answer>", GT, (0.0, 0.0), (0.0, 0.0)),
    ("abstain, gt []", "<answer>No Objects</answer>", "<answer>[]</answer>", (0.0, 0.0), (1.0, 1.0)),
    ("abstain [], gt No Objects", "<answer>[]</answer>", "<answer>No Objects</answer>", (0.0, 0.0), (1.0, 1.0)),
    (
        "gt No Objects, a box",
        completion(box(0, 0, 10, 10, 0.25)),
        "<answer>No Objects</answer>",
        (0.0, 0.0),
        (0.0, 0.75),
    ),
]


@pytest.mark.parametrize(
    "name, content, sol, paper, strict", DIFFERENCES, ids=[c[0] for c in DIFFERENCES]
)
def test_detection_strict_differences(name, content, sol, paper, strict):
    assert scores("paper", content, sol) == pytest.approx(paper, abs=1e-12)
    assert scores("strict", content, sol) == pytest.approx(strict, abs=1e-12)


def test_detection_paper_nan_is_what_the_original_computes_for_iou():
    content = completion(box(0, 0, 100, 100, "NaN"))
    assert oracle.detection(content, GT)[0] == 1.0 and math.isnan(oracle.detection(content, GT)[1])


def test_strict_max_boxes():
    spam = completion(*[box(10 * k, 0, 10 * k + 5, 5, 0.1) for k in range(101)], box(0, 0, 100, 100, 0.9))
    assert scores("strict", spam, GT) == (0.0, 0.0)
    assert scores("strict", spam, GT, max_boxes=200)[0] == pytest.approx(1 / 102)
    # Never below the number of gt boxes.
    many = [(10 * k, 0, 10 * k + 5, 5) for k in range(3)]
    exact = completion(*[box(*p, 1) for p in many])
    assert scores("strict", exact, solution(*many), max_boxes=1) == (1.0, 1.0)


def test_strict_iou_threshold_option():
    content = completion(box(0, 0, 100, 250, 0.9))  # iou 0.4
    assert scores("strict", content, GT, iou_threshold=0.3) == pytest.approx((0.4, 0.9))
    assert scores("strict", content, GT) == pytest.approx((0.0, 0.1))


def test_pixels_frame_bounds_come_from_image_size():
    content = completion(box(0, 0, 600, 400, 0.9))
    sol = solution((0, 0, 600, 400))
    out = score_detection([content] * 2, [sol] * 2, frame="qwen2_5_vl", image_hw=[(400, 600), (392, 600)])
    assert out.iou.tolist() == [1.0, 0.0]  # y2 = 400 is outside a 392-pixel-high image
    with pytest.raises(ValueError, match="image_hw"):
        score_detection([content], [sol], frame="qwen2_5_vl")


def test_ground_truth_is_converted_to_the_models_frame():
    # Stored in 0-1000 (ViRFT), written by Qwen2.5-VL in pixels of a 560 x 840 (h x w) image.
    sol = solution((0, 0, 500, 500))
    content = completion(box(0, 0, 420, 280, 0.9))
    out = score_detection([content], [sol], frame="pixels", solution_frame="qwen2_vl", image_hw=[(560, 840)])
    assert (out.iou[0], out.confidence[0]) == (1.0, 0.9)


def test_batch_equals_one_at_a_time():
    contents = [c for _, c, _, _ in BOTH_MODES] + [c for _, c, _, _, _ in DIFFERENCES]
    sols = [s for _, _, s, _ in BOTH_MODES] + [s for _, _, s, _, _ in DIFFERENCES]
    for mode in ("paper", "strict"):
        batch = score_detection(contents, sols, mode=mode)
        for i, (c, s) in enumerate(zip(contents, sols)):
            assert (batch.iou[i], batch.confidence[i]) == scores(mode, c, s)


def test_ill_formed_solution_raises_naming_its_index():
    reward = get_reward("detection_iou")
    with pytest.raises(ValueError, match=r"solutions\[1\]: not a box list"):
        reward(["<answer>[]</answer>"] * 2, [GT, "<answer>a dog</answer>"])


def _oracle_f32(value):
    value = np.float32(value)
    return value if np.isfinite(value) else np.float32(0.0)


@examples(1500)
@given(st.lists(detection_pair(), min_size=1, max_size=6))
def test_paper_mode_equals_the_original(pairs):
    contents, sols = zip(*pairs)
    iou = get_reward("detection_iou", "paper")(contents, sols)
    conf = get_reward("detection_confidence", "paper")(contents, sols)
    for i, (content, sol) in enumerate(pairs):
        want_iou, want_conf = oracle.detection(content, sol)
        assert iou[i] == _oracle_f32(want_iou), content
        assert conf[i] == _oracle_f32(want_conf), content


@st.composite
def clean_pair(draw):
    """Well-formed output in frame, with predictions near the gt boxes: strict and paper agree."""
    positions = []
    for _ in range(draw(st.integers(0, 4))):
        x1, y1 = draw(st.integers(0, 900)), draw(st.integers(0, 900))
        positions.append((x1, y1, draw(st.integers(x1 + 1, 1000)), draw(st.integers(y1 + 1, 1000))))
    boxes = []
    for _ in range(draw(st.integers(1, 6))):
        if positions and draw(st.booleans()):
            x1, y1, x2, y2 = (min(max(v + draw(st.integers(-15, 15)), 0), 1000)
                              for v in draw(st.sampled_from(positions)))
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        else:
            x1, y1 = draw(st.integers(0, 900)), draw(st.integers(0, 900))
            x2, y2 = draw(st.integers(x1 + 1, 1000)), draw(st.integers(y1 + 1, 1000))
        boxes.append(box(x1, y1, x2, y2, draw(st.sampled_from(["0.1", "0.5", "0.87", "1", "0", "0.33"]))))
    return completion(*boxes), solution(*positions)


@examples(600)
@given(st.lists(clean_pair(), min_size=1, max_size=8))
def test_strict_equals_paper_equals_the_original_on_clean_output(pairs):
    contents, sols = zip(*pairs)
    expected = np.array([oracle.detection(c, s) for c, s in pairs], dtype=np.float32)
    for k, name in enumerate(("detection_iou", "detection_confidence")):
        for mode in ("paper", "strict"):
            np.testing.assert_array_equal(get_reward(name, mode)(contents, sols), expected[:, k])
