"""Any output at all: every reward, in both modes, returns a finite value in its range, never raises,
and does work linear in the output's length."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import available_rewards, get_reward, parse

from .strategies import any_text, examples
from .work import Metered, Work, measure

SOLUTIONS = {
    "detection_iou": "<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1},"
                     " {'Position': [0, 0, 10, 10], 'Confidence': 1}]</answer>",
    "detection_confidence": "<answer>[{'Position': [0, 568, 1000, 985], 'Confidence': 1}]</answer>",
    "classification": "<answer>737-200</answer>",
    "grounding_giou": "<answer> (696,300),(999,999) </answer>",
    "format": "",
    "answer_format": "",
}
REWARDS = [get_reward(name, mode) for name in available_rewards() for mode in ("paper", "strict")]


def _columns(reward, n: int) -> dict:
    """The stop column, for the rewards that read it (answer_format): alternating, so both values are scored."""
    return {"stopped": [i % 2 == 0 for i in range(n)]} if "stopped" in reward.columns else {}


def _check(reward, completions):
    out = reward(completions, [SOLUTIONS[reward.name]] * len(completions), **_columns(reward, len(completions)))
    assert out.dtype == np.float32 and out.shape == (len(completions),)
    assert np.isfinite(out).all()
    assert ((reward.low <= out) & (out <= reward.high)).all(), (reward, out)


@examples(1200)
@given(st.lists(any_text, min_size=1, max_size=4))
def test_any_text_scores_finite_and_in_range(completions):
    for reward in REWARDS:
        _check(reward, completions)


_BOX = "{'Position': [1, 364, 98, 649], 'Confidence': 0.9}, "


def _distinct_boxes(k: int) -> str:
    # Distinct boxes near the first gt box: every one is matched against it in paper mode.
    return ", ".join(
        f"{{'Position': [{1 + i % 7}, {364 - i % 5}, {98 + i % 11}, {649 + i // 77}], 'Confidence': 0.{i % 97:02d}}}"
        for i in range(k)
    )


# Adversarial outputs, each made of k repeated units.
FAMILIES = {
    "distinct boxes": lambda k: "<think>t</think><answer>[" + _distinct_boxes(k) + "]</answer>",
    "many boxes": lambda k: "<think>t</think><answer>[" + _BOX * k + "]</answer>",
    "many boxes, unclosed": lambda k: "<answer>[" + _BOX * k,
    "many boxes, no tags": lambda k: "[" + _BOX * k + "]",
    "digits": lambda k: "<answer>[{'Position': [" + "9" * k + ", 1, 2, 3], 'Confidence': 1}]</answer>",
    "NaN boxes": lambda k: "<answer>[" + "{'Position': [NaN, NaN, NaN, NaN], 'Confidence': NaN}, " * k + "]</answer>",
    "open tags": lambda k: "<answer>" * k,
    "open tags, one close": lambda k: "<answer>" * k + "</answer>",
    "tag lines": lambda k: "<answer>\n" * k + "</answer>",
    "think/answer pairs": lambda k: "<think>" + "</think><answer>" * k,
    "brackets": lambda k: "<answer>" + "[" * k + "</answer>",
    "braces": lambda k: "<answer>" + "{" * k + "}" * k + "</answer>",
    "parentheses": lambda k: "<answer>" + "(1,2),(" * k + "</answer>",
    "point pairs": lambda k: "<answer>" + "(1,2),(3,4) " * k + "</answer>",
    "unicode": lambda k: "<think>" + "\u0663\u00df\U0001f600\u200b" * k + "</think><answer>\u0130</answer>",
    "long answer": lambda k: "<think>t</think><answer>" + "737-200 " * k + "</answer>",
}


def _units(name: str, chars: int) -> int:
    """How many of the family's units make about `chars` characters."""
    family = FAMILIES[name]
    return max(1, chars // (len(family(2)) - len(family(1))))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_megabyte_outputs_score_finite_and_in_range(name):
    # How fast: `python benchmarks/rewards.py --adversarial`; that the work is linear: the test below.
    text = FAMILIES[name](_units(name, 1 << 20))
    for reward in REWARDS:
        _check(reward, [text])


SMALL, GROWTH = 500, 16  # characters of the small input's repeated part; how many times more in the large


def _work(reward, text: str) -> Work:
    return measure(lambda: reward([Metered(text)], [SOLUTIONS[reward.name]], **_columns(reward, 1)))


def _grows_linearly(small: Work, large: Work) -> list[str]:
    """The counts of `large` (GROWTH times the input of `small`) that grew faster than the input.

    Linear work a + b*n grows at most GROWTH-fold, within the allowance GROWTH + 1; a quadratic part
    that is a fifteenth of the work at the small size already grows past it.
    """
    return [
        f"{what}: {before} -> {after}"
        for (what, before), (_, after) in zip(small.items(), large.items())
        if after > (GROWTH + 1) * before + 64
    ]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_work_is_linear_in_the_output_length(name):
    # Deterministic counts (tests/rewards/work.py), not seconds: Python lines run in the rewards, the
    # backtracking steps of their regexes, characters their str calls scan or copy.
    k = _units(name, SMALL)
    small, large = FAMILIES[name](k), FAMILIES[name](GROWTH * k)
    for reward in REWARDS:
        reward([""], [SOLUTIONS[reward.name]], **_columns(reward, 1))  # solutions are cached: count only the
        # completion's work
        small_work, large_work = _work(reward, small), _work(reward, large)
        assert not _grows_linearly(small_work, large_work) and large_work.lines > 0, (
            f"{reward.name}/{reward.mode} on {name}: {_grows_linearly(small_work, large_work)}")


def test_the_linearity_check_catches_the_originals_quadratic_answer_search(monkeypatch):
    # The same check, with the tag reader swapped for the original's regex, fails on unclosed tags
    # (on shorter ones than above: the model pays for every quadratic step in Python).
    monkeypatch.setattr(parse, "ORIGINAL_ANSWER", re.compile(r"<answer>(.*?)</answer>"), raising=False)
    monkeypatch.setattr(parse, "answer_one_line", lambda text: _first_group(parse.ORIGINAL_ANSWER.search(text)))
    reward = get_reward("detection_iou", "paper")
    reward([""], [SOLUTIONS[reward.name]])
    small, large = (_work(reward, FAMILIES["open tags"](k)) for k in (8, 8 * GROWTH))
    assert [line.split(":")[0] for line in _grows_linearly(small, large)] == ["regex_steps"]
    assert large.regex_steps > 10 * GROWTH * small.regex_steps


def _first_group(match):
    return match.group(1) if match else None
