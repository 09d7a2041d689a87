"""Classification accuracy by the paper's rule and by strict matching, overall and per class.

    substring (Visual-RFT's classification evaluation): the one-line `<answer>...</answer>` must exist; it and
               the class name lose spaces and underscores and are lower-cased; correct when either contains
               the other (so an empty answer or "boeing" for "Boeing 717" counts)
    strict:    the first closed `<answer>` (any lines), NFKC case-folded letters and digits, equal to the
               class name's (`rewards.classification.normalize_class_name`)
A missing answer is wrong under both. Accuracy = correct / examples.
"""

from __future__ import annotations

from collections.abc import Sequence

from vrft_jax.evaluate.readers import class_answer
from vrft_jax.rewards.classification import normalize_class_name


def _paper_key(name: str) -> str:
    return name.replace(" ", "").replace("_", "").lower()


def correct_substring(completion: str, label: str) -> bool:
    answer = class_answer(completion, "visual_rft")
    if answer is None:
        return False
    answer, truth = _paper_key(answer), _paper_key(label)
    return truth in answer or answer in truth


def correct_strict(completion: str, label: str) -> bool:
    answer = class_answer(completion, "strict")
    return answer is not None and normalize_class_name(answer) == normalize_class_name(label) != ""


def accuracy(completions: Sequence[str], labels: Sequence[str]) -> dict:
    """{"accuracy_substring", "accuracy_strict", "examples", "per_class": {label: {...}}}."""
    if len(completions) != len(labels):
        raise ValueError(f"{len(completions)} completions for {len(labels)} labels")
    per_class: dict[str, dict[str, float]] = {}
    totals = {"substring": 0, "strict": 0}
    for completion, label in zip(completions, labels):
        entry = per_class.setdefault(label, {"examples": 0, "substring": 0, "strict": 0})
        entry["examples"] += 1
        for rule, check in (("substring", correct_substring), ("strict", correct_strict)):
            hit = check(completion, label)
            entry[rule] += hit
            totals[rule] += hit
    n = len(labels)
    return {
        "accuracy_substring": totals["substring"] / n if n else None,
        "accuracy_strict": totals["strict"] / n if n else None,
        "examples": n,
        "per_class": {label: {"examples": e["examples"], "accuracy_substring": e["substring"] / e["examples"],
                              "accuracy_strict": e["strict"] / e["examples"]}
                      for label, e in sorted(per_class.items())},
    }
