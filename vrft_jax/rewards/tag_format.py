"""Format reward: is the completion `<think>...</think> <answer>...</answer>`? (every task; §5.1).

1.0 if so, else 0.0. Completions are decoded without special tokens (`<|im_end|>` removed), as in
the original.

Paper mode is `re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", text, re.DOTALL)`,
computed in linear time (the regex backtracks quadratically on repeated tags). Quirks kept: no
text or whitespace may precede `<think>` or follow `</answer>`; the tags may repeat or nest
inside the two bodies (`<think>a</think><answer>b</answer><answer>c</answer>` passes), and
both bodies may be empty.

Strict mode (our recipes' default) differs:
- Whitespace around the whole completion is allowed (a decoder's trailing newline is not a
  format error).
- Each of the four tags appears exactly once, so a second answer cannot hide behind the first.
- The answer body must not be blank: `<answer></answer>` is not an answer.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.rewards.registry import Reward, register

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")


def paper_format_ok(text: str) -> bool:
    """Whether the original's format regex fullmatches `text`."""
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    # Any `</think>\s*<answer>` that ends before the final `</answer>` completes the match; the
    # leftmost one ends first, so it is the one to test.
    join = _THINK_THEN_ANSWER.search(text, len(THINK_OPEN))
    return join is not None and join.end() <= len(text) - len(ANSWER_CLOSE)


def strict_format_ok(text: str) -> bool:
    """One think block, then (after optional whitespace) one non-blank answer block, nothing else."""
    text = text.strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return False
    think_end = text.find(THINK_CLOSE)
    answer_start = text.find(ANSWER_OPEN)
    if answer_start < think_end or text[think_end + len(THINK_CLOSE) : answer_start].strip():
        return False
    return bool(text[answer_start + len(ANSWER_OPEN) : -len(ANSWER_CLOSE)].strip())


@register("format")
def format_reward(mode: str) -> Reward:
    """1.0 when the completion has the `<think>/<answer>` format of its mode, else 0.0."""
    check = paper_format_ok if mode == "paper" else strict_format_ok

    def score(
        completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> np.ndarray:
        return np.fromiter((check(text) for text in completions), dtype=np.float64, count=len(completions))

    return Reward("format", mode, 0.0, 1.0, (), score)


def answer_only_ok(text: str) -> bool:
    """One non-blank answer block and nothing else but whitespace: `<answer>X</answer>`."""
    text = text.strip()
    if not (text.startswith(ANSWER_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1 or THINK_OPEN in text or THINK_CLOSE in text:
        return False
    return bool(text[len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip())


@register("answer_format")
def answer_format_reward(mode: str) -> Reward:
    """1.0 when the completion is one non-blank `<answer>...</answer>` and nothing else, and it ended on a stop
    token (column `stopped`: not cut at the token limit), else 0.0: the format term of a recipe that answers
    without a `<think>` block (the demo). It pays for ending: a completion that repeats `</answer>` to the token
    limit (`<answer>green</answer></answer></answer`), which the accuracy reward still reads, earns 0 here.
    EasyR1's r1v reward's format half without its think part, with the stop that DAPO's overlong penalty and
    TRL's `mask_truncated_completions` ask for. The same in both modes (Visual-RFT has no such term)."""
    def score(completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]) -> np.ndarray:
        stopped = columns.get("stopped")
        if stopped is None:
            raise ValueError("answer_format needs the column `stopped` (whether each completion ended on a stop "
                             "token): pass stopped=... with the completions")
        return np.fromiter((bool(s) and answer_only_ok(text) for text, s in zip(completions, stopped)),
                           dtype=np.float64, count=len(completions))

    return Reward("answer_format", mode, 0.0, 1.0, ("stopped",), score)
