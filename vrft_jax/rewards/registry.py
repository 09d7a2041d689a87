"""Rewards by name: `@register("detection_iou")` on a factory, `get_reward(name, mode, **options)`.

A factory takes the mode and the reward's options (a recipe's config) and returns a `Reward`, the
callable a trainer uses: `reward(completions, solutions, **columns) -> float32[N]`. The trainer
may pass every column of its batch by name; a reward reads the ones it names in `columns` and
ignores the rest, so `reward(completions, solutions)` stays valid whenever none is required.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Mode = Literal["paper", "strict"]
MODES: tuple[str, ...] = ("paper", "strict")

# (completions, solutions, columns) -> float64[N]; columns holds only the names the reward reads.
ScoreFn = Callable[[list[str], list[str], Mapping[str, Sequence[Any]]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SharedPass:
    """One pass over a batch that scores several rewards (IoU and confidence read the same boxes).

    Rewards with equal `key` (same pass, same options) are computed once per batch by a
    `WeightedReward`; `compute(completions, solutions, columns)` returns an object with one
    float64[N] attribute per reward, and `field` names this reward's.
    """

    key: Hashable
    compute: Callable[[list[str], list[str], Mapping[str, Sequence[Any]]], Any]
    field: str


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward bound to its mode and options.

    Call it as `reward(completions, solutions, **columns)`: two equally long sequences of str
    (completions decoded without special tokens; solutions as stored in the dataset) and
    optional per-example columns. Returns float32[N], finite, in [low, high].

    Never raises on a completion's content. Raises ValueError for our own mistakes: lengths that
    differ, a solution that cannot be read (the message names its index), a required column missing.
    """

    name: str
    mode: str
    low: float
    high: float
    columns: tuple[str, ...]
    score: ScoreFn | SharedPass = dataclasses.field(repr=False)

    def __call__(
        self, completions: Sequence[str], solutions: Sequence[str], **columns: Any
    ) -> np.ndarray:
        return self.score_batch(completions, solutions, columns, shared={})

    def score_batch(
        self,
        completions: Sequence[str],
        solutions: Sequence[str],
        columns: Mapping[str, Any],
        shared: dict[Hashable, Any],
    ) -> np.ndarray:
        """`self(completions, solutions, **columns)`, reusing and filling `shared` passes."""
        completions, solutions = list(completions), list(solutions)
        n = len(completions)
        if len(solutions) != n:
            raise ValueError(f"{self.name}: {n} completions but {len(solutions)} solutions")
        for what, texts in (("completions", completions), ("solutions", solutions)):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"{self.name}: {what}[{i}] is {type(text).__name__}, not str")
        used = {}
        for column in self.columns:
            value = columns.get(column)
            if value is None:
                continue
            if len(value) != n:
                raise ValueError(f"{self.name}: column {column} has {len(value)} rows, expected {n}")
            used[column] = value
        if isinstance(self.score, SharedPass):
            if self.score.key not in shared:
                shared[self.score.key] = self.score.compute(completions, solutions, used)
            scores = getattr(shared[self.score.key], self.score.field)
        else:
            scores = self.score(completions, solutions, used)
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (n,):
            raise AssertionError(f"{self.name} scored shape {scores.shape}, expected ({n},)")
        scores = scores.astype(np.float32)
        # Paper mode keeps the original's arithmetic, which can end in NaN or overflow (NaN
        # confidences, absurd coordinates); such a value is reported as 0, like any unusable answer.
        return np.where(np.isfinite(scores), scores, np.float32(0.0))


_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: makes the factory `f(mode, **options) -> Reward` available as `name`."""

    def add(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return add


def available_rewards() -> tuple[str, ...]:
    """Names `get_reward` accepts, sorted."""
    return tuple(sorted(_FACTORIES))


def reward_options(name: str) -> dict[str, Any]:
    """The options of reward `name` and their defaults (None: the mode's default)."""
    factory = _factory(name)
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name: p.default for p in params}


def get_reward(name: str, mode: Mode = "strict", **options: Any) -> Reward:
    """The reward `name` in `mode` ("strict", the default of our recipes, or "paper").

    `options` are the reward's settings (see `reward_options(name)`); an unknown one is an error.
    """
    factory = _factory(name)
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; modes: {list(MODES)}")
    known = reward_options(name)
    for option in options:
        if option not in known:
            raise ValueError(f"reward {name!r} has no option {option!r}; options: {sorted(known)}")
    return factory(mode, **options)


def strict_only(mode: str, name: str, **options: Any) -> None:
    """ValueError if an option that only strict mode has was set for a paper-mode reward."""
    if mode == "paper":
        for option, value in options.items():
            if value is not None:
                raise ValueError(
                    f"{name}: option {option} changes the original's values; strict mode only"
                )


def _factory(name: str) -> Callable[..., Reward]:
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; rewards: {list(available_rewards())}") from None
