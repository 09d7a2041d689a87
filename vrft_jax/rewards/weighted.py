"""A recipe's reward: a weighted sum of named rewards, with each term kept for logging.

    total = combine([("detection_iou", 1.0), ("detection_confidence", 1.0), ("format", 1.0)])
    out = total(completions, solutions, **batch_columns)  # out.total: float32[N]; out.per_reward
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.rewards.registry import Mode, Reward, get_reward

# Visual-RFT's reward functions per task, summed without weights (grpo*.py `main`).
VISUAL_RFT_REWARDS: dict[str, tuple[tuple[str, float], ...]] = {
    "detection": (("detection_iou", 1.0), ("detection_confidence", 1.0), ("format", 1.0)),
    "classification": (("classification", 1.0), ("format", 1.0)),
    "grounding": (("grounding_giou", 1.0), ("format", 1.0)),
}


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One term of a recipe's reward: a registered name, its weight and its options."""

    name: str
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardBreakdown:
    """total: float32[N], the weighted sum; per_reward: name -> float32[N], unweighted."""

    total: np.ndarray
    per_reward: dict[str, np.ndarray]


class WeightedReward:
    """`sum_k weight_k * reward_k(completions, solutions, **columns)`; see `combine`."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        self.terms = tuple(terms)
        self.low = sum(w * (r.low if w >= 0 else r.high) for r, w in self.terms)
        self.high = sum(w * (r.high if w >= 0 else r.low) for r, w in self.terms)

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[str], **columns: Any
    ) -> RewardBreakdown:
        completions, solutions = list(completions), list(solutions)
        total = np.zeros(len(completions), dtype=np.float64)
        per_reward = {}
        shared: dict = {}  # Rewards that read the same structures (detection) read them once.
        for reward, weight in self.terms:
            values = reward.score_batch(completions, solutions, columns, shared)
            per_reward[reward.name] = values
            total += weight * values.astype(np.float64)
        return RewardBreakdown(total.astype(np.float32), per_reward)

    def __repr__(self) -> str:
        terms = ", ".join(f"{w:g} * {r.name}" for r, w in self.terms)
        return f"WeightedReward({terms})"


def combine(
    specs: Iterable[RewardSpec | tuple[str, float] | str] | str, mode: Mode = "strict"
) -> WeightedReward:
    """The weighted sum of rewards named by `specs`, all in `mode`.

    specs: RewardSpecs, `(name, weight)` pairs or names (weight 1), or a task of
    `VISUAL_RFT_REWARDS` ("detection", "classification", "grounding") for the paper's sum.
    """
    if isinstance(specs, str):
        if specs not in VISUAL_RFT_REWARDS:
            raise ValueError(f"unknown task {specs!r}; tasks: {sorted(VISUAL_RFT_REWARDS)}")
        specs = VISUAL_RFT_REWARDS[specs]
    terms = []
    for spec in specs:
        if isinstance(spec, str):
            spec = RewardSpec(spec)
        elif not isinstance(spec, RewardSpec):
            spec = RewardSpec(*spec)
        weight = float(spec.weight)
        if not math.isfinite(weight):
            raise ValueError(f"reward {spec.name!r}: weight must be finite, got {spec.weight!r}")
        if any(r.name == spec.name for r, _ in terms):
            raise ValueError(f"reward {spec.name!r} appears twice")
        terms.append((get_reward(spec.name, mode, **dict(spec.options)), weight))
    if not terms:
        raise ValueError("combine needs at least one reward")
    return WeightedReward(terms)
