"""Readers of answer tags, box lists and LISA boxes: same matches as the original's regexes, linear work."""
import math
import re

import numpy as np
import pytest
from hypothesis import given

from vrft_jax.rewards import parse

from .strategies import examples, tag_soup
from .work import Metered, RegexModel, measure

ORIGINAL_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def _group(match):
    return match.group(1) if match else None


@examples(1500)
@given(tag_soup)
def test_answer_one_line_is_the_originals_non_dotall_search(text):
    assert parse.answer_one_line(text) == _group(ORIGINAL_ANSWER.search(text))


@examples(800)
@given(tag_soup)
def test_answer_any_lines_is_the_originals_dotall_search(text):
    assert parse.answer_any_lines(text) == _group(re.search(ORIGINAL_ANSWER.pattern, text, re.DOTALL))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>a</answer>", "a"),
        ("<answer>a\nb</answer>", None),  # the newline loses the answer
        ("<answer>a\n<answer>b</answer>", "b"),  # ... but a later one on one line is found
        ("x<answer></answer><answer>c</answer>", ""),
        ("<answer>unclosed", None),
    ],
)
def test_answer_one_line_table(text, expected):
    assert parse.answer_one_line(text) == expected


@pytest.mark.parametrize(
    "text, allow_unclosed, expected",
    [
        ("<answer>a\nb</answer>", False, "a\nb"),
        ("pre <answer> x </answer> <answer>y</answer>", False, " x "),
        ("<answer>[{'Position': [1, 2", True, "[{'Position': [1, 2"),
        ("<answer>[{'Position': [1, 2", False, None),
        ("no tags at all", True, None),
    ],
)
def test_strict_answer_table(text, allow_unclosed, expected):
    assert parse.strict_answer(text, allow_unclosed=allow_unclosed) == expected


# Python's re needs O(n^2) steps on these: every <answer> scans to the end of the line for a close.
ADVERSARIAL_TAGS = {
    "open tags": "<answer>" * 20_000,
    "tag lines": "<answer>\n" * 20_000 + "</answer>",
    "open tags, one close": "<answer>" * 20_000 + "</answer>\n",
}
TAG_READERS = {
    "answer_one_line": parse.answer_one_line,
    "answer_any_lines": parse.answer_any_lines,
    "strict_answer": lambda text: parse.strict_answer(text, allow_unclosed=True),
}


@pytest.mark.parametrize("reader", list(TAG_READERS))
@pytest.mark.parametrize("name", list(ADVERSARIAL_TAGS))
def test_tag_readers_are_linear_on_adversarial_tags(name, reader):
    # Counted work (tests/rewards/work.py), not seconds: each character is scanned at most twice by
    # str.find and copied at most once into the answer, and the reader's loop runs once per line.
    text = ADVERSARIAL_TAGS[name]
    work = measure(lambda: TAG_READERS[reader](Metered(text)))
    assert work.chars <= 3 * len(text)
    assert work.lines <= 10 * (text.count("\n") + 1)
    assert work.regex_steps == 0


def test_the_originals_answer_search_is_quadratic_in_the_same_units():
    # The bound has teeth: counted the same way, the original's regex takes 4 times the steps for
    # twice the input, already 100 steps per character at 1,600 characters.
    steps = []
    for k in (100, 200):
        model, text = RegexModel(ORIGINAL_ANSWER), "<answer>" * k
        assert model.search(text, 0, len(text)) is None
        steps.append(model.steps)
    assert steps[1] > 3.9 * steps[0] and steps[1] > 100 * len(text)


def _boxes(found):
    return np.array(found.xyxy).reshape(-1, 4).tolist(), found.conf


@pytest.mark.parametrize(
    "answer",
    [
        "[{'Position': [1, 2, 30, 40], 'Confidence': 0.9}]",  # Python-literal quoting
        '[{"Position": [1, 2, 30, 40], "Confidence": 0.9}]',  # JSON quoting
        "[{'Confidence': 0.9, 'Position': [1, 2, 30, 40]}]",  # keys reversed
        "[{Position: [1.0, 2., 30, 40], Confidence: .9,}]",  # unquoted keys, trailing comma
        "[[{'Position': [1, 2, 30, 40], 'Confidence': 0.9}]]",
        "[{'Position': [1, 2, 30, 40], 'Confidence': 0.9}, {'Position': [5, 6",  # truncated
    ],
)
def test_strict_predictions_read_both_quotings_and_truncated_lists(answer):
    assert _boxes(parse.strict_predictions(answer, max_boxes=10)) == ([[1, 2, 30, 40]], [0.9])


def test_strict_predictions_keep_answer_order_and_drop_duplicates():
    answer = (
        "[{'Position': [0, 0, 1, 1], 'Confidence': 0.2}, {'Position': [0, 0, 2, 2], 'Confidence': 0.8},"
        " {'Position': [0, 0, 3, 3], 'Confidence': 0.2}, {'Position': [0.0, 0, 2, 2], 'Confidence': 0.99}]"
    )
    boxes, conf = _boxes(parse.strict_predictions(answer, max_boxes=10))
    assert boxes == [[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]]
    assert conf == [0.2, 0.8, 0.2]


def test_strict_predictions_count_unreadable_objects_as_nan_boxes():
    answer = ("[{'Position': [1, 2, 3], 'Confidence': 0.5}, {'Position': [1, 2, 3, 4], 'Confidence': NaN},"
              " {'Position': [1, 2, 3, 4], 'Confidence': 0.5}]")
    boxes, conf = _boxes(parse.strict_predictions(answer, max_boxes=10))
    assert boxes[2] == [1, 2, 3, 4] and conf[2] == 0.5
    assert all(math.isnan(v) for v in boxes[0] + boxes[1] + conf[:2])


@pytest.mark.parametrize("answer", ["No Objects", " no objects. ", "'No Objects'", "[]", "[ ]"])
def test_strict_predictions_read_an_abstention_as_no_boxes(answer):
    assert parse.strict_predictions(answer, max_boxes=10) == parse.NO_PREDICTIONS


@pytest.mark.parametrize("answer", ["", "I see a dog", "[1, 2, 3, 4]", "None"])
def test_strict_predictions_reject_answers_without_boxes(answer):
    assert parse.strict_predictions(answer, max_boxes=10) is None


def test_strict_predictions_reject_more_than_max_boxes():
    box = "{'Position': [1, 2, 3, 4], 'Confidence': 0.5}"
    assert parse.strict_predictions(", ".join([box] * 3), max_boxes=3) is not None
    assert parse.strict_predictions(", ".join([box] * 4), max_boxes=3) is None
    assert parse.strict_predictions(box * 200_000, max_boxes=100) is None  # stops early


def test_strict_numbers_are_bounded_in_length():
    answer = "[{'Position': [1, 2, 3, " + "9" * 100_000 + "], 'Confidence': 0.5}]"
    boxes, _ = _boxes(parse.strict_predictions(answer, max_boxes=10))
    assert math.isnan(boxes[0][0])


@pytest.mark.parametrize(
    "content, expected",
    [
        # The newline is removed after extraction; an answer with a newline inside is lost.
        ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.5}]</answer>", ([1.0, 2, 3, 4], [0.5], [True])),
        ("[{'Position': [1, 2, 3, 4], 'Confidence': 0.5}]", ([1.0, 2, 3, 4], [0.5], [True])),  # no tags
        ("<think>t</think><answer>\n[{'Position': [1, 2, 3, 4], 'Confidence': 0.5}]</answer>", None),
        ("<answer>[[{'Position': [1, 2, 3, 4], 'Confidence': 0.5}]]</answer>", ([1.0, 2, 3, 4], [0.5], [True])),
        # Truncation repair drops the last box, even a complete one.
        (
            "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.5},"
            " {'Position': [5, 6, 7, 8], 'Confidence': 0.4}] .</answer>",
            ([1.0, 2, 3, 4], [0.5], [True]),
        ),
        ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.5},]</answer>", None),  # not JSON
        ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': True}]</answer>", None),  # Python literal
        ("<answer>[]</answer>", None),
        ("<answer>[5, {'Position': [1, 2, 3, 4], 'Confidence': 0.5}]</answer>", None),
        ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': '0.5'}]</answer>", None),
        ("<answer>[{'Position': [1, 2, 3, 4]}]</answer>", None),
        ("<answer>[{'Position': [1, 2, [3], 4], 'Confidence': 0.5}]</answer>", None),  # unhashable
        ("<answer>[{'Position': 'abcd', 'Confidence': 0.5}]</answer>", ([math.nan] * 4, [0.5], [False])),
        ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': true}]</answer>", ([1.0, 2, 3, 4], [1.0], [True])),
        (
            "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.5},"
            " {'Position': [1.0, 2.0, 3, 4], 'Confidence': 0.9}]</answer>",
            ([1.0, 2, 3, 4], [0.5], [True]),
        ),
    ],
)
def test_paper_predictions_table(content, expected):
    found = parse.paper_predictions(content)
    if expected is None:
        assert found is None
    else:
        np.testing.assert_equal(tuple(found), expected)


def test_paper_predictions_sort_nan_confidences_like_pythons_sort():
    content = "[" + ", ".join(
        f"{{'Position': [{k}, 0, 10, 10], 'Confidence': {c}}}" for k, c in enumerate(["0.1", "NaN", "0.7", "0.3"])
    ) + "]"
    found = parse.paper_predictions(content)
    expected = sorted([0.1, math.nan, 0.7, 0.3], reverse=True)
    np.testing.assert_equal(found.conf, expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(10,20),(30,40)", ((0.01, 0.02), (0.03, 0.04))),
        ("( 10 , 20 ) , ( 30 , 40 )", ((0.01, 0.02), (0.03, 0.04))),
        # Two boxes: the original compares the top-left corners of both.
        ("(10,20),(30,40) (50,60),(70,80)", ((0.01, 0.02), (0.05, 0.06))),
        ("(1.5,2),(3,4)", None),
        ("(٣,2),(3,4)", ((0.003, 0.002), (0.003, 0.004))),  # \d and int() read any digits
        ("(1,2),(3,4) (" + "1" * 4400 + ",1),(1,1)", None),  # int() refuses > 4300 digits
        ("(1,2),(3,4) (" + "9" * 320 + ",1),(1,1)", None),  # int / 1000 overflows
        ("no box", None),
    ],
)
def test_paper_point_pair_table(text, expected):
    assert parse.paper_point_pair(text) == expected


def test_strict_point_boxes_read_every_box():
    boxes = parse.strict_point_boxes("(10,20),(30,40) and (50.5, 60),(70,80)", max_boxes=10)
    assert boxes.tolist() == [[10, 20, 30, 40], [50.5, 60, 70, 80]]
    assert parse.strict_point_boxes("(1,2),(3,4)" * 3, max_boxes=2) is None
    assert parse.strict_point_boxes("(1,2)", max_boxes=2) is None


@pytest.mark.parametrize(
    "text, boxes, no_objects",
    [
        ("<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1}]</answer>", [[1, 364, 98, 649]], False),
        ('[{"Position": [0, 0, 10, 10]}, {"Position": [5, 5, 5, 9]}]', [[0, 0, 10, 10], [5, 5, 5, 9]], False),
        ("<answer>No Objects</answer>", [], True),
        ("<answer>[]</answer>", [], False),
    ],
)
def test_detection_solution_table(text, boxes, no_objects):
    xyxy, says_none = parse.detection_solution(text)
    assert xyxy.tolist() == boxes and says_none == no_objects


@pytest.mark.parametrize(
    "text, message",
    [
        ("<answer>a dog</answer>", "not a box list"),
        ("<answer>{'Position': [0, 0, 1, 1]}</answer>", "not a box list"),
        ("<answer>[{'Position': [0, 0, 1]}]</answer>", "box 0"),
        ("<answer>[{'Position': [0, 0, 1, 1]}, {'Position': [9, 0, 1, 1]}]</answer>", "box 1"),
        ("<answer>[{'Position': [0, 0, NaN, 1]}]</answer>", "box 0"),
        ("<answer>[{'Position': [0, 0, true, 1]}]</answer>", "box 0"),
    ],
)
def test_detection_solution_rejects_ill_formed_ground_truth(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse.detection_solution(text)
