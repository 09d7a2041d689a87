"""Classification accuracy by both rules and grounding mIoU / cIoU on hand-written cases (issue 11)."""

import pytest

from vrft_jax.evaluate import classification, grounding, readers

# completion, label, correct by the paper's substring rule, correct strictly
CASES = [
    ("<think>wings</think><answer>Boeing 717</answer>", "Boeing 717", True, True),
    ("<think>.</think><answer>boeing</answer>", "Boeing 717", True, False),   # a partial name: substring only
    ("<think>.</think><answer></answer>", "Boeing 717", True, False),         # empty: "" is in every name
    ("<think>.</think><answer>A320 or Boeing 717</answer>", "Boeing 717", True, False),  # a list
    ("<think>.</think><answer>\nBoeing 717</answer>", "Boeing 717", False, True),  # newline: no one-line answer
    ("Boeing 717", "Boeing 717", False, False),                              # no tags: no answer
    ("<think>.</think><answer>pink_primrose</answer>", "pink primrose", True, True),
    ("<think>.</think><answer>rose</answer>", "pink primrose", True, False),
    ("<think>.</think><answer>tulip</answer>", "pink primrose", False, False),
    ("<think>.</think><answer>Pink Primrose", "pink primrose", False, False),  # unclosed
]


def test_accuracy_by_both_rules_overall_and_per_class():
    m = classification.accuracy([c[0] for c in CASES], [c[1] for c in CASES])
    for completion, label, substring, strict in CASES:
        assert classification.correct_substring(completion, label) is substring, completion
        assert classification.correct_strict(completion, label) is strict, completion
    assert m["examples"] == 10
    assert m["accuracy_substring"] == pytest.approx(6 / 10) and m["accuracy_strict"] == pytest.approx(3 / 10)
    assert m["per_class"]["Boeing 717"] == {"examples": 6, "accuracy_substring": 4 / 6, "accuracy_strict": 2 / 6}
    assert m["per_class"]["pink primrose"] == {"examples": 4, "accuracy_substring": 2 / 4,
                                               "accuracy_strict": 1 / 4}


def test_box_miou_and_ciou_by_hand():
    truth = [[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 15, 15], [0, 0, 4, 4]]
    predicted = [
        [0, 0, 10, 10],   # IoU 1: inter 100, union 100
        [10, 10, 30, 30],  # inter 100, union 400 + 400 - 100 = 700: IoU 1/7
        None,              # no box read: IoU 0; the truth's 100 joins the union
        [10, 10, 20, 20],  # disjoint: inter 0, union 16 + 100 = 116
    ]
    m = grounding.box_metrics(predicted, truth)
    assert m["mIoU"] == pytest.approx((1 + 1 / 7 + 0 + 0) / 4, abs=1e-15)
    assert m["cIoU"] == pytest.approx((100 + 100) / (100 + 700 + 100 + 116), abs=1e-15)
    assert m["no_box"] == 1 and m["examples"] == 4


def test_mask_metrics_without_masks_are_absent_not_zero():
    m = grounding.mask_metrics_absent()
    assert m["mask_gIoU"] is None and m["mask_cIoU"] is None and "absent" in m["mask_metrics"]


def test_grounding_readers():
    text = "<think>the cup is (x1,y1) left</think><answer> (120,340),(560,780) </answer>"
    assert readers.grounding_box(text, "visual_rft") == [120, 340, 560, 780]
    assert readers.grounding_box(text, "strict") == [120, 340, 560, 780]
    assert readers.grounding_box("(1,2),(3,4) then <answer>(5,6),(7,8)</answer>", "visual_rft") == [1, 2, 3, 4]
    assert readers.grounding_box("(1,2),(3,4) then <answer>(5,6),(7,8)</answer>", "strict") == [5, 6, 7, 8]
    assert readers.grounding_box("<answer>no box</answer>", "strict") is None
