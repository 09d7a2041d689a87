"""The update's optimizer: global-norm clipping, then AdamW on a warmup + linear-decay schedule, with
weight decay masked off biases and normalisation weights.

Visual-RFT's defaults (visual-rft.md §10.2) are `OptimizerConfig`'s: AdamW, no weight decay, clipping
at 1, linear decay to 0 without warmup (set `decay_steps`). The schedule is evaluated at the number of
updates applied (`TrainState.step`), which a skipped update does not advance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import optax
from flax import nnx

from vrft_jax.fields import known_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with global-norm clipping on a warmup + linear-decay learning rate.

    decay_steps:      steps of linear decay to `end_learning_rate` after the warmup (HF's
                      `num_training_steps - warmup`); None keeps the rate constant after warmup
    max_grad_norm:    the global norm gradients are clipped to; None does not clip
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    decay_steps: int | None = None
    end_learning_rate: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        errors = []
        if self.warmup_steps < 0:
            errors.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            errors.append(f"decay_steps={self.decay_steps} must be >= 1 or None")
        for name in ("learning_rate", "end_learning_rate", "weight_decay"):
            # NaN or inf would pass a sign check and be applied: the loss and gradient stay finite, so the
            # non-finite guard would only catch the step after the parameters became NaN.
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                errors.append(f"{name}={getattr(self, name)} must be finite and >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            errors.append(f"max_grad_norm={self.max_grad_norm} must be > 0 or None")
        if errors:
            raise ValueError("invalid OptimizerConfig: " + "; ".join(errors))

    def replace(self, **changes) -> OptimizerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimizerConfig:
        """From a plain mapping; unknown keys are errors naming them."""
        return cls(**known_fields(cls, values))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear decay to `end_learning_rate` over `decay_steps` (HF's linear
    schedule) or constant; evaluated at the number of updates applied so far."""
    peak = config.learning_rate
    after = (optax.constant_schedule(peak) if config.decay_steps is None
             else optax.linear_schedule(peak, config.end_learning_rate, config.decay_steps))
    if not config.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def weight_decay_mask(params: nnx.State) -> nnx.State:
    """True where AdamW decays the parameter: as HF's Trainer, not on biases and normalisation weights."""

    def decays(path, variable) -> nnx.Variable:
        name = str(path[-1])
        return variable.replace(not (name.endswith("bias") or any("norm" in str(p) or p == "ln_q" for p in path)))

    return nnx.map_state(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (weight decay skips biases and norms)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
