"""Format reward: re.fullmatch with DOTALL in paper mode, one think and one non-blank answer in strict."""
import time

import pytest
from hypothesis import given

from vrft_jax.rewards import get_reward
from vrft_jax.rewards.tag_format import paper_format_ok, strict_format_ok

from . import visual_rft_oracle as oracle
from .strategies import examples, tag_soup

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


def test_format_is_linear_on_repeated_tags():
    # The original regex backtracks over every `</think>\s*<answer>` pair: quadratic here.
    texts = ["<think>" + "</think><answer>" * 60_000 + "x", "<think>" + "</think> " * 100_000 + "</answer>"]
    start = time.perf_counter()
    for text in texts:
        assert not paper_format_ok(text) and not strict_format_ok(text)
    assert time.perf_counter() - start < 0.5
