"""Any output at all: every reward, in both modes, returns a finite value in its range and never raises."""
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import available_rewards, get_reward

from .strategies import any_text, examples

SOLUTIONS = {
    "detection_iou": "<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1}, {'Position': [0, 0, 10, 10], 'Confidence': 1}]</answer>",
    "detection_confidence": "<answer>[{'Position': [0, 568, 1000, 985], 'Confidence': 1}]</answer>",
    "classification": "<answer>737-200</answer>",
    "grounding_giou": "<answer> (696,300),(999,999) </answer>",
    "format": "",
}
REWARDS = [get_reward(name, mode) for name in available_rewards() for mode in ("paper", "strict")]


def _check(reward, completions):
    out = reward(completions, [SOLUTIONS[reward.name]] * len(completions))
    assert out.dtype == np.float32 and out.shape == (len(completions),)
    assert np.isfinite(out).all()
    assert ((reward.low <= out) & (out <= reward.high)).all(), (reward, out)


@examples(1200)
@given(st.lists(any_text, min_size=1, max_size=4))
def test_any_text_scores_finite_and_in_range(completions):
    for reward in REWARDS:
        _check(reward, completions)


_BOX = "{'Position': [1, 364, 98, 649], 'Confidence': 0.9}, "
MEGABYTE = 1 << 20
# 20,000 distinct boxes near the first gt box: every one is matched against it in paper mode.
_DISTINCT = ", ".join(
    f"{{'Position': [{1 + k % 7}, {364 - k % 5}, {98 + k % 11}, {649 + k // 77}], 'Confidence': 0.{k % 97:02d}}}"
    for k in range(20_000)
)
HUGE = {
    "distinct boxes": "<think>t</think><answer>[" + _DISTINCT + "]</answer>",
    "many boxes": "<think>t</think><answer>[" + _BOX * (MEGABYTE // len(_BOX)) + "]</answer>",
    "many boxes, unclosed": "<answer>[" + _BOX * (MEGABYTE // len(_BOX)),
    "many boxes, no tags": "[" + _BOX * (MEGABYTE // len(_BOX)) + "]",
    "digits": "<answer>[{'Position': [" + "9" * MEGABYTE + ", 1, 2, 3], 'Confidence': 1}]</answer>",
    "NaN boxes": "<answer>[" + "{'Position': [NaN, NaN, NaN, NaN], 'Confidence': NaN}, " * 20_000 + "]</answer>",
    "open tags": "<answer>" * (MEGABYTE // 8),
    "open tags, one close": "<answer>" * (MEGABYTE // 8) + "</answer>",
    "tag lines": "<answer>\n" * (MEGABYTE // 9) + "</answer>",
    "think/answer pairs": "<think>" + "</think><answer>" * (MEGABYTE // 16),
    "brackets": "<answer>" + "[" * MEGABYTE + "</answer>",
    "braces": "<answer>" + "{" * MEGABYTE + "}" * MEGABYTE + "</answer>",
    "parentheses": "<answer>" + "(1,2),(" * (MEGABYTE // 7) + "</answer>",
    "point pairs": "<answer>" + "(1,2),(3,4) " * (MEGABYTE // 12) + "</answer>",
    "unicode": "<think>" + "\u0663\u00df\U0001f600\u200b" * (MEGABYTE // 4) + "</think><answer>\u0130</answer>",
    "long answer": "<think>t</think><answer>" + "737-200 " * (MEGABYTE // 8) + "</answer>",
}


@pytest.mark.parametrize("name", list(HUGE))
def test_megabyte_outputs_are_scored_quickly(name):
    text = HUGE[name]
    for reward in REWARDS:
        start = time.perf_counter()
        _check(reward, [text])
        elapsed = time.perf_counter() - start
        assert elapsed < 3.0, f"{reward.name}/{reward.mode} took {elapsed:.1f}s on {name}"
