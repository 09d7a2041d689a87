"""Format reward: re.fullmatch with DOTALL in paper mode, one think and one non-blank answer in strict."""
import re

import pytest
from hypothesis import given

from vrft_jax.rewards import get_reward
from vrft_jax.rewards.tag_format import paper_format_ok, strict_format_ok

from . import visual_rft_oracle as oracle
from .strategies import examples, tag_soup
from .work import Metered, RegexModel, measure

# (behaviour, completion, paper, strict)
TABLE = [
    ("canonical", "<think> a </think> <answer> b </answer>", 1.0, 1.0),
    ("no space between blocks", "<think>a</think><answer>b</answer>", 1.0, 1.0),
    ("newlines (DOTALL)", "<think>\nline\n</think>\n\n<answer>\nb\n</answer>", 1.0, 1.0),
    ("text before", "Sure! <think>a</think><answer>b</answer>", 0.0, 0.0),
    ("text after", "<think>a</think><answer>b</answer> done", 0.0, 0.0),
    ("text between", "<think>a</think> so <answer>b</answer>", 0.0, 0.0),
    ("answer only", "<answer>b</answer>", 0.0, 0.0),
    ("think only", "<think>a</think>", 0.0, 0.0),
    ("swapped", "<answer>b</answer><think>a</think>", 0.0, 0.0),
    ("unclosed answer", "<think>a</think><answer>b", 0.0, 0.0),
    ("empty think", "<think></think><answer>b</answer>", 1.0, 1.0),
    # Strict differences.
    ("trailing newline", "<think>a</think><answer>b</answer>\n", 0.0, 1.0),
    ("leading space", " <think>a</think><answer>b</answer>", 0.0, 1.0),
    ("empty answer", "<think>a</think><answer></answer>", 1.0, 0.0),
    ("blank answer", "<think>a</think><answer> \n </answer>", 1.0, 0.0),
    ("two answers", "<think>a</think><answer>b</answer><answer>c</answer>", 1.0, 0.0),
    ("nested think", "<think><think>a</think></think><answer>b</answer>", 1.0, 0.0),
    ("answer tag in think", "<think>use <answer>x</answer></think><answer>b</answer>", 1.0, 0.0),
]


@pytest.mark.parametrize("name, text, paper, strict", TABLE, ids=[t[0] for t in TABLE])
def test_format_table(name, text, paper, strict):
    assert get_reward("format", "paper")([text], [""])[0] == paper
    assert get_reward("format", "strict")([text], [""])[0] == strict


@examples(2000)
@given(tag_soup)
def test_paper_format_is_the_originals_fullmatch(text):
    assert paper_format_ok(text) == bool(oracle.format_(text))


# The original regex backtracks over every `</think>\s*<answer>` pair: quadratic on the first two.
REPEATED_TAGS = {
    "pairs, no close": "<think>" + "</think><answer>" * 4000 + "x",
    "pairs, one close": "<think>" + "</think><answer>" * 4000 + "</answer> ",
    "think closes": "<think>" + "</think> " * 4000 + "</answer>",
    "think closes, then answers": "<think>" + "</think> " * 4000 + "<answer>" + "</answer> " * 4000 + "</answer>x",
}


@pytest.mark.parametrize("check", [paper_format_ok, strict_format_ok], ids=["paper", "strict"])
@pytest.mark.parametrize("name", list(REPEATED_TAGS))
def test_format_is_linear_on_repeated_tags(name, check):
    # Counted work (tests/rewards/work.py), not seconds: a fixed number of regex steps and of
    # characters scanned or copied per character of the completion, and no loop in Python.
    text = REPEATED_TAGS[name]
    work = measure(lambda: check(Metered(text)))
    assert not check(text)
    assert work.regex_steps <= 8 * len(text) and work.chars <= 8 * len(text) and work.lines <= 10, work


def test_the_originals_format_regex_is_quadratic_in_the_same_units():
    # The bound has teeth: counted the same way, the original's fullmatch takes 4 times the steps for
    # twice the input, already 100 steps per character at 3,200 characters.
    steps = []
    for k in (100, 200):
        model = RegexModel(re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL))
        text = "<think>" + "</think><answer>" * k + "x"
        assert model.match(text, 0, len(text), full=True) is None
        steps.append(model.steps)
    assert steps[1] > 3.9 * steps[0] and steps[1] > 100 * len(text)


@pytest.mark.parametrize("text,ok", [
    ("<answer>green</answer>", True),
    ("  <answer> light green </answer>\n", True),
    ("<answer>green</answer></answer></answer", False),  # the demo's collapse: runs to the token limit
    ("<answer>green</answer> and more", False),
    ("<answer> </answer>", False),
    ("<think>x</think><answer>green</answer>", False),  # the think format is `format`'s
    ("<answer>green", False),
    ("green", False),
])
def test_answer_format_pays_one_answer_block_that_ended_with_eos(text, ok):
    reward = get_reward("answer_format")
    assert reward([text, text], ["", ""], stopped=[True, False]).tolist() == [float(ok), 0.0]
    with pytest.raises(ValueError, match="answer_format needs the column `stopped`"):
        reward([text], [""])
