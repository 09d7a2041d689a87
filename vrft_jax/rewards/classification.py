"""Classification reward: is the answer the image's class (Visual-RFT `grpo_classification.py`; §5.2)?

1.0 for a correct answer, else 0.0.

Paper mode reproduces `accuracy_reward` except the `math_verify` shortcut. Quirks kept:
- Answers are `re.search(r'<answer>(.*?)</answer>')` without DOTALL, stripped; with no match (no
  tags, or a newline inside) the whole completion is the answer, so a completion that names the
  class anywhere, tags or not, is correct.
- Both names lose spaces and underscores and are lower-cased; then the answer is correct when
  either contains the other: an empty `<answer></answer>` is correct (Liuziyu77/Visual-RFT#176),
  and so are partial names ("boeing" for "Boeing 717") and lists ("A or B or C", #79).

Strict mode (our recipes' default) differs:
- The answer is the text inside the first `<answer>...</answer>` (newlines allowed); no closed
  answer tag scores 0; the rest of the completion is never read.
- The normalised answer must equal the normalised class name, or one of its synonyms: an empty
  answer, a partial name or several names score 0.
- Normalisation: Unicode NFKC, case-folded, every character that is not a letter or digit removed
  ("F/A-18", "f a 18" and "FA18" are one name).
- Synonyms: the option `synonyms={"class name": ["other name", ...]}` (names interchangeable in
  every example) and the per-example column `synonyms` (names accepted for that example).
- An answer longer than `max_answer_chars` (default 1024) scores 0 without being normalised.

Ground truth: the class name, in answer tags or bare; one that is empty after normalisation (in
either mode) raises ValueError, since the original would pay every answer for it.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.rewards import parse
from vrft_jax.rewards.registry import Reward, register, strict_only

DEFAULT_MAX_ANSWER_CHARS = 1024
_NOT_ALNUM = re.compile(r"[\W_]+")


def normalize_class_name(name: str) -> str:
    """Strict mode's comparison key: NFKC, case-folded, letters and digits only."""
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", name).casefold())


def _paper_normalize(name: str) -> str:
    return name.replace(" ", "").replace("_", "").lower()


def _paper_answer(text: str) -> str:
    answer = parse.answer_one_line(text)
    return (text if answer is None else answer).strip()


@functools.lru_cache(maxsize=1 << 14)
def _paper_solution(text: str) -> str:
    name = _paper_normalize(_paper_answer(text))
    if not name:
        raise ValueError("empty class name")
    return name


@functools.lru_cache(maxsize=1 << 14)
def _strict_solution(text: str) -> str:
    answer = parse.strict_answer(text, allow_unclosed=False)
    name = normalize_class_name(text if answer is None else answer)
    if not name:
        raise ValueError("empty class name")
    return name


def _synonym_groups(synonyms: Mapping[str, Iterable[str]] | None) -> dict[str, frozenset[str]]:
    """Normalised name -> every normalised name interchangeable with it."""
    groups: dict[str, set[str]] = {}
    for name, others in (synonyms or {}).items():
        if isinstance(others, str):
            raise ValueError(f"synonyms[{name!r}] must be a list of names, not the string {others!r}")
        members = {normalize_class_name(n) for n in (name, *others)} - {""}
        for member in members:
            groups.setdefault(member, set()).update(members)
    return {name: frozenset(group) for name, group in groups.items()}


def _read_solutions(solutions: Sequence[str], read: Any) -> list[str]:
    names = []
    for i, text in enumerate(solutions):
        try:
            names.append(read(text))
        except ValueError as error:
            raise ValueError(f"solutions[{i}]: {error}: {text[:200]!r}") from None
    return names


@register("classification")
def classification(
    mode: str,
    synonyms: Mapping[str, Iterable[str]] | None = None,
    max_answer_chars: int | None = None,
) -> Reward:
    """Correctness of the class name in [0, 1] (module docstring for both modes)."""
    strict_only(mode, "classification", synonyms=synonyms, max_answer_chars=max_answer_chars)
    if mode == "paper":

        def score_paper(
            completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
        ) -> np.ndarray:
            truths = _read_solutions(solutions, _paper_solution)
            out = np.zeros(len(completions))
            for i, (text, truth) in enumerate(zip(completions, truths)):
                answer = _paper_normalize(_paper_answer(text))
                out[i] = truth in answer or answer in truth
            return out

        return Reward("classification", mode, 0.0, 1.0, (), score_paper)

    groups = _synonym_groups(synonyms)
    limit = DEFAULT_MAX_ANSWER_CHARS if max_answer_chars is None else int(max_answer_chars)

    def score_strict(
        completions: list[str], solutions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> np.ndarray:
        truths = _read_solutions(solutions, _strict_solution)
        per_example = columns.get("synonyms")
        out = np.zeros(len(completions))
        for i, (text, truth) in enumerate(zip(completions, truths)):
            answer = parse.strict_answer(text, allow_unclosed=False)
            if answer is None or len(answer) > limit:
                continue
            name = normalize_class_name(answer)
            if not name:
                continue
            accepted = groups.get(truth, frozenset((truth,)))
            if name in accepted:
                out[i] = 1.0
            elif per_example is not None and per_example[i]:
                extra = per_example[i]
                extra = [extra] if isinstance(extra, str) else extra
                out[i] = name in {normalize_class_name(n) for n in extra} - {""}
        return out

    return Reward("classification", mode, 0.0, 1.0, ("synonyms",), score_strict)
