"""The update's optimizer, from `TrainConfig`'s optimizer fields: global-norm clipping, then AdamW on
a warmup + linear-decay schedule, with weight decay masked off biases and normalisation weights.

Visual-RFT's defaults (visual-rft.md §10.2) are `TrainConfig`'s: AdamW, no weight decay, clipping at
1, linear decay to 0 without warmup (set `decay_steps`). The schedule is evaluated at the number of
updates applied (`TrainState.step`), which a skipped update does not advance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optax
from flax import nnx

if TYPE_CHECKING:  # only for annotations: train_step imports this module
    from vrft_jax.train_step import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
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


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (weight decay skips biases and norms)."""
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay, mask=weight_decay_mask)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
