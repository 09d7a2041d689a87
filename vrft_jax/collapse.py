"""Seeing GRPO collapse, and the guards against it that act outside the update.

A small model trained by GRPO can collapse: every completion of a prompt earns the same reward (a flat group:
advantage 0, no gradient), the answers vanish, the completions run to the token limit, the entropy falls or
explodes (field-2026-12b §3.1). This module measures what shows it on every step, stops a run whose rewards stayed
zero, and keeps the update fed with non-flat groups:

- `completion_shares`: of the batch's real completions, the share with no readable answer and the share cut at
  the token limit (TRL's `completions/clipped_ratio`); the loop logs them beside `reward_zero_std_groups` (TRL's
  `frac_reward_zero_std`) and the policy's entropy.
- `ZeroRewardWatch`: `CollapseConfig.max_zero_reward_steps` consecutive steps whose every real completion earned
  0 stop the run, after it saves, with an error that says what happened and which guards exist.
- `flat_groups` and `replaced_groups`: dynamic sampling (DAPO's; verl `algorithm.filter_groups`, EasyR1
  `algorithm.online_filtering`): the loop draws the batch's completions again, with the same prompts and shapes
  (the same compiled rollout), and a flat group takes the same prompt's next non-flat group.
- `kept_groups`: oversampling (DAPO's dynamic sampling as verl runs it, `data.gen_batch_size` prompts generated for
  `data.train_batch_size` trained): the step draws `oversample` times its prompts and trains on the groups that are
  not flat first, so the update's batch holds the prompts the policy still gets wrong sometimes.

The update's own guards are `GRPOConfig`'s: clip-higher (`epsilon_high`), the entropy bonus (`entropy_coef`), the
KL (`beta`) and the sampler/trainer correction (`importance_sampling`); the demo's format term is the reward
`answer_format`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax.cli import UserError
from vrft_jax.fields import known_fields
from vrft_jax.rewards import parse

GUARDS = ("grpo.beta > 0 (a KL to the initial policy; EasyR1 and verl's VLM examples use 0.01), a lower "
          "train.learning_rate, grpo.epsilon_high (clip-higher, DAPO's 0.28), grpo.entropy_coef (an entropy bonus), "
          "collapse.dynamic_sampling (redraw flat groups), a format term that rewards ending with EOS "
          "(rewards.terms: answer_format or format), and more sampling.max_new_tokens if completions are cut")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollapseConfig:
    """The recipe's `collapse` block.

    dynamic_sampling:      extra rollouts a step may draw to replace its flat groups (every sample of a prompt
                           scored alike), 0 = off. Each draws the whole batch again (static shapes: the same
                           compiled program) and a flat group takes the first non-flat group of its prompt; groups
                           still flat after the last try stay, counted. DAPO's dynamic sampling: verl
                           `algorithm.filter_groups.enable` with `max_num_gen_batches`, EasyR1
                           `algorithm.online_filtering` with `trainer.max_try_make_batch` (20); both draw new
                           prompts instead: `oversample`
    oversample:            prompts drawn per step, as a multiple of `prompts_per_step` (1 = off): every drawn
                           prompt gets its G completions, and the update takes `prompts_per_step` of the groups,
                           those that are not flat first, in the order drawn (`kept_groups`); the rest are
                           dropped. The shapes stay static (a rollout of oversample x prompts_per_step prompts, an
                           update of prompts_per_step), the data stream is read oversample times as fast, and the
                           rewards logged are the whole draw's (the policy's, not the kept groups'). DAPO's dynamic
                           sampling as verl runs it: `data.gen_batch_size` prompts generated for every
                           `data.train_batch_size` trained, with `algorithm.filter_groups.enable`
    max_zero_reward_steps: this many consecutive steps in which every real completion's reward is 0 stop the run
                           (after saving) with `CollapseError`; 0 = never
    """

    dynamic_sampling: int = 0
    oversample: int = 1
    max_zero_reward_steps: int = 20

    def __post_init__(self):
        for name in ("dynamic_sampling", "max_zero_reward_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"collapse.{name}={getattr(self, name)} must be >= 0")
        if self.oversample < 1:
            raise ValueError(f"collapse.oversample={self.oversample} must be >= 1 (1: no oversampling)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CollapseConfig:
        """From a recipe's `collapse` block; unknown keys are errors."""
        return cls(**known_fields(cls, values))


class CollapseError(UserError, RuntimeError):
    """The run's rewards stayed zero for `max_zero_reward_steps` steps; it saved its last step and stopped. Every
    process reaches it at the same step from the same gathered rewards, so they stop together."""

    vrft_agreed = True  # `distributed.is_agreed`: the checkpoint in flight can be finished by every process


# ------------------------------------------------------------------------------------------- measuring


def answered(texts: Sequence[str]) -> np.ndarray:
    """bool[rows]: the completions with a closed, non-blank `<answer>` (what a reward can read)."""
    return np.array([bool((a := parse.strict_answer(t, allow_unclosed=False)) and a.strip()) for t in texts], bool)


def completion_shares(has_answer: np.ndarray, stopped: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Of the real (`valid`) completions: `no_answer`, the share without a readable answer (`answered`), and
    `truncated`, the share cut at the token limit (not `stopped` by a stop id); NaN without a real one."""
    valid = np.asarray(valid, bool)
    if not valid.any():
        return {"no_answer": float("nan"), "truncated": float("nan")}
    return {"no_answer": 1.0 - float(np.mean(np.asarray(has_answer, bool)[valid])),
            "truncated": 1.0 - float(np.mean(np.asarray(stopped, bool)[valid]))}


def flat_groups(total: np.ndarray, group_size: int, valid: np.ndarray) -> np.ndarray:
    """bool[prompts]: the groups whose real samples all scored alike (no learning signal), padding groups not
    counted (they have no real sample). Non-finite rewards count as unscored, as the advantages leave them out."""
    rewards = np.where(np.asarray(valid, bool) & np.isfinite(total), np.asarray(total, np.float64), np.nan)
    grouped = rewards.reshape(-1, group_size)
    scored = ~np.isnan(grouped)
    low = np.where(scored, grouped, np.inf).min(axis=1)
    high = np.where(scored, grouped, -np.inf).max(axis=1)
    return scored.any(axis=1) & (low == high)


def replaced_groups(flat: np.ndarray, candidate_flat: np.ndarray, valid_groups: np.ndarray) -> np.ndarray:
    """bool[prompts]: the flat groups a new draw replaces, those whose new group is not flat."""
    return np.asarray(flat, bool) & ~np.asarray(candidate_flat, bool) & np.asarray(valid_groups, bool)


def kept_groups(flat: np.ndarray, valid_groups: np.ndarray, keep: int) -> np.ndarray:
    """int[keep]: the groups (indices into bool[groups] `flat`) an oversampled step trains on, in the order drawn:
    the real groups that are not flat first, then flat ones, then padding groups (`valid_groups` False), each kind
    in the order drawn, until `keep` are taken."""
    flat, valid_groups = np.asarray(flat, bool), np.asarray(valid_groups, bool)
    if not 0 < keep <= len(flat):
        raise ValueError(f"cannot keep {keep} of {len(flat)} groups")
    rank = np.where(valid_groups, flat.astype(np.int64), 2)  # 0: signal, 1: flat, 2: padding
    return np.sort(np.argsort(rank, kind="stable")[:keep])


class ZeroRewardWatch:
    """Counts consecutive steps whose every real completion earned reward 0; `observe` raises `CollapseError`
    once `config.max_zero_reward_steps` of them are in a row (the loop saves first: `stopping`). The count starts
    at 0 when a run resumes."""

    def __init__(self, config: CollapseConfig):
        self.limit = config.max_zero_reward_steps
        self.streak = 0

    def observe(self, host: Mapping[str, float]) -> bool:
        """Whether this step ends the run: `host` is the step's host metrics (`reward_nonzero` is the share of
        real completions with a non-zero reward)."""
        self.streak = self.streak + 1 if host.get("reward_nonzero") == 0 else 0
        return bool(self.limit) and self.streak >= self.limit

    def error(self, step: int, host: Mapping[str, float]) -> CollapseError:
        def share(name):
            value = host.get(name)
            return "?" if value is None else f"{value:.0%}"

        return CollapseError(
            f"GRPO collapsed: every completion's reward was 0 for {self.streak} consecutive steps (the last, step "
            f"{step}: {share('no_answer')} without a readable answer, {share('truncated')} cut at the token limit, "
            f"{share('reward_zero_std_groups')} of the groups flat), so no advantage is left to learn from; the run "
            f"saved step {step} and stopped (collapse.max_zero_reward_steps={self.limit}). Guards: {GUARDS}.")
