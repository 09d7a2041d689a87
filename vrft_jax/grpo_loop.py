"""One GRPO iteration, phase by phase: each phase is a short function the loop times on its own.

    batch -> sampler weights -> rollout -> this process's completion rows -> detokenise -> rewards
          -> advantages over whole groups -> reference logprobs (beta > 0) -> old-policy logprobs
          (num_iterations > 1) -> num_iterations updates -> metrics

Values shared by phases come from one place, `Phases`, built once per run: the sampling temperature
is the scorer's (`TrainConfig.temperature`), the EOS ids end sampling and the completion mask alike.

Seams that matter (review M1, M2):
- The sampler's weights are made on the devices from the train state at every iteration, in the
  recipe's compute dtype and the sampling layout, by a jitted cast whose outputs are new buffers:
  they never alias the train state, which the update donates. They are dropped before the update.
- `old_logprobs` come from the policy scorer (the update's own program, in float32), never from
  `Rollout.logprobs` (the decode program's dtype and a top-k-filtered distribution).
- With `freeze_vision` the vision tower runs once per iteration, in the rollout's prefill: its features
  (the sampler's dtype, which is the recipe's compute dtype) travel in the `TrainBatch` to the reference,
  the old policy and the update, which would each have recomputed the same frozen features.
- Rows with `valid=False` (a finite stream's padding) get a NaN reward, so they stay out of every
  group statistic and get advantage 0, and their completion mask is zeroed: they add nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrft_jax import distributed, grpo, sharding
from vrft_jax.metrics import reward_stats
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL
from vrft_jax.progress import Timer
from vrft_jax.rewards.weighted import RewardBreakdown
from vrft_jax.sampling import Rollout, SamplingConfig, rollout
from vrft_jax.train_step import TrainBatch, TrainConfig, TrainState, shard_batch


@dataclasses.dataclass(frozen=True)
class Phases:
    """What every iteration of a run uses, built once (see `vrft_jax.train.build`).

    graphdef:        the model's structure (the train state holds its parameters)
    train:           the update's settings (temperature, dtypes, GRPO loss, iterations)
    sampling:        the rollout's; its temperature must equal `train.temperature`
    reward_fn:       `rewards.combine(...)`: texts, solutions, **columns -> RewardBreakdown
    tokenizer:       decodes completions
    step, score:     `make_train_step` and `make_score_fn` of this run
    reference:       the reference parameters (None when beta = 0)
    sampler_graphdef, sampler_cast: the rollout's model structure and the jitted copy of the train
                     state's parameters into it (`sampler_graphdef`, `make_sampler_cast`)
    mesh:            None on one device
    reward_columns:  batch meta columns passed to the rewards (e.g. image_hw)
    """

    graphdef: Any
    train: TrainConfig
    sampling: SamplingConfig
    reward_fn: Callable[..., RewardBreakdown]
    tokenizer: Any
    step: Callable
    score: Callable
    reference: Any
    sampler_graphdef: Any
    sampler_cast: Callable[[nnx.State], nnx.State]
    mesh: Any = None
    reward_columns: tuple[str, ...] = ("image_hw",)

    def __post_init__(self):
        if self.sampling.temperature != self.train.temperature and not self.sampling.greedy:
            raise ValueError(f"the sampling temperature {self.sampling.temperature} differs from the scorer's "
                             f"{self.train.temperature}: the ratio and the KL would be biased")

    @property
    def group_size(self) -> int:
        return self.sampling.group_size


# ---------------------------------------------------------------------------------------------- phases


def make_sampler_cast(params: nnx.State, dtype, mesh=None, layout: str = "whole") -> Callable[[nnx.State], nnx.State]:
    """A jitted `params -> the rollout's weights`: a fresh copy in `dtype`, on a mesh in the sampling layout
    (`TrainConfig.sampler_layout`): "whole" within each fsdp group (`sharding.SAMPLING_RULES`, so decoding
    does not all-gather the weights at every token), or "sharded" as the train state. The copy is explicit,
    so even when nothing changes (float32 on one device) its outputs are new buffers: the donated train
    step can never invalidate them, nor they it."""
    dtype = jnp.dtype(dtype)
    rules = sharding.SAMPLING_RULES if layout == "whole" else sharding.DEFAULT_RULES
    layout = None if mesh is None else sharding.state_shardings(params, mesh, rules)

    def cast(params):
        return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params)

    return jax.jit(cast, out_shardings=layout)


def sampler_graphdef(config: Qwen2VLConfig, dtype):
    """The model structure that computes in `dtype` over `dtype` parameters: the rollout's."""
    config = config.replace(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    return graphdef


def sample(phases: Phases, weights: nnx.State, inputs, key) -> Rollout:
    """G completions of every prompt from the sampler's weights; on a mesh, rows split over the batch axes as
    the prompts are, so each process's devices hold the rows of its own prompts (`local_rows`)."""
    out = rollout(nnx.merge(phases.sampler_graphdef, weights), inputs, key, phases.sampling,
                  keep_image_features=phases.train.freeze_vision)
    return out if phases.mesh is None else pin_rows(out, phases.mesh)


def pin_rows(out: Rollout, mesh) -> Rollout:
    """`out` with its rows split over the mesh's batch axes (a no-op when they already are)."""
    return _row_pinner(mesh, out.image_features is not None)(out)


@functools.cache
def _row_pinner(mesh, with_features: bool):  # one jitted identity per mesh: compiled once, not at every step
    layouts = Rollout(tokens=sharding.batch_sharding(mesh, 2), logprobs=sharding.batch_sharding(mesh, 2),
                      lengths=sharding.batch_sharding(mesh, 1),
                      image_features=sharding.batch_sharding(mesh, 3) if with_features else None)
    return jax.jit(lambda out: out, out_shardings=layouts)


def to_global(phases: Phases, local: np.ndarray) -> jax.Array:
    """A per-row host array of this process's rows as the global array the devices use (rows over the batch
    axes, each process contributing its block in process order); the array itself without a mesh."""
    if phases.mesh is None:
        return jnp.asarray(local)
    return jax.make_array_from_process_local_data(sharding.batch_sharding(phases.mesh, local.ndim), local)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-row host array, in global row order (a collective; itself on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])


def local_rows(out: Rollout) -> tuple[np.ndarray, np.ndarray]:
    """This process's completion rows (tokens, bool mask) as NumPy, in the order of its batch meta.
    On one process that is every row; across processes, the rows of this process's addressable
    shards in global order: the data pipeline gives each process a contiguous block of prompts, and
    `sample` splits the rows over the devices as it splits the prompts."""
    if jax.process_count() == 1:
        return np.asarray(out.tokens), np.asarray(out.mask)
    tokens = _addressable_rows(out.tokens)
    lengths = _addressable_rows(out.lengths)
    return tokens, np.arange(tokens.shape[1])[None, :] < lengths[:, None]


def _addressable_rows(array: jax.Array) -> np.ndarray:
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)])


def detokenize(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each completion's text up to and including its EOS, special tokens dropped (as TRL decodes)."""
    pad = tokenizer.pad_token_id
    return tokenizer.batch_decode(np.where(mask, tokens, pad).tolist(), skip_special_tokens=True)


def score_rewards(phases: Phases, texts: list[str], meta: Mapping[str, Any]) -> tuple[RewardBreakdown, np.ndarray]:
    """(rewards of every completion, bool[B*G] valid rows): each prompt's columns repeated G times;
    rows of padding prompts (`valid=False`) are not scored and get NaN."""
    g = phases.group_size
    valid = np.repeat(np.asarray(meta.get("valid", np.ones(len(texts) // g, bool)), bool), g)
    solutions = [s for s in meta["solution"] for _ in range(g)]
    columns = {name: _repeat(meta[name], g) for name in phases.reward_columns if name in meta}
    rows = np.flatnonzero(valid)
    scored = phases.reward_fn([texts[i] for i in rows], [solutions[i] for i in rows],
                              **{k: _take(v, rows) for k, v in columns.items()})
    total = np.full(len(texts), np.nan, np.float32)
    total[rows] = scored.total
    per_reward = {}
    for name, values in scored.per_reward.items():
        per_reward[name] = np.full(len(texts), np.nan, np.float32)
        per_reward[name][rows] = values
    return RewardBreakdown(total, per_reward), valid


def _repeat(column, g):
    if isinstance(column, np.ndarray):
        return np.repeat(column, g, axis=0)
    return [x for x in column for _ in range(g)]


def _take(column, rows):
    return column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows]


def group_advantages(phases: Phases, total: np.ndarray) -> np.ndarray:
    """float32[B*G] advantages over whole groups; NaN rewards (padding rows) give 0 and stay out of the
    statistics. `advantage="batch"` scales by the std of this call's rows: `iteration` passes the global
    batch's (every process's rewards, gathered)."""
    return np.asarray(grpo.advantages(jnp.asarray(total), phases.group_size, phases.train.grpo))


def train_batch(phases: Phases, inputs, out: Rollout, advantages: np.ndarray, valid: np.ndarray) -> TrainBatch:
    """The update's batch on the devices from this process's rows' advantages and validity: padding rows'
    completion masks zeroed; with a frozen vision tower, the rollout's image features, which the
    reference, the old policy and the update then reuse."""
    mask = out.mask.astype(jnp.int32) * to_global(phases, np.asarray(valid, np.int32))[:, None]
    return place(phases, TrainBatch(inputs, out.tokens, mask, to_global(phases, np.asarray(advantages, np.float32)),
                                    image_features=out.image_features))


def place(phases: Phases, batch: TrainBatch) -> TrainBatch:
    """`batch` split over the run's mesh on its prompt axis (as it is on one device)."""
    return batch if phases.mesh is None else shard_batch(batch, phases.mesh)


def reference_logprobs(phases: Phases, batch: TrainBatch) -> TrainBatch:
    """The reference model's logprobs for the KL term; skipped when beta = 0."""
    if phases.train.grpo.beta == 0:
        return batch
    if phases.reference is None:
        raise ValueError(f"GRPOConfig.beta={phases.train.grpo.beta} needs reference parameters")
    return batch.replace(ref_logprobs=phases.score(phases.reference, scored_part(batch)))


def old_logprobs(phases: Phases, state: TrainState, batch: TrainBatch) -> TrainBatch:
    """The rollout policy's logprobs from the policy scorer (review M2), needed when one rollout feeds
    several updates; with one update the ratio is exp(lp - stop_gradient(lp)) and they are not needed."""
    if phases.train.num_iterations == 1:
        return batch
    return batch.replace(old_logprobs=phases.score(state.params, scored_part(batch)))


def scored_part(batch: TrainBatch) -> TrainBatch:
    """The batch without the logprobs it carries: what the scorer reads, in one pytree structure whichever
    logprobs were filled already, so the reference and the old policy share one compiled scorer."""
    return batch.replace(old_logprobs=None, ref_logprobs=None)


def update(phases: Phases, state: TrainState, batch: TrainBatch, *, log: bool = True
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_iterations` updates on the same rollout; the last one's metrics. The entropy, a metric only, is
    measured in the last update of a logged step (`log`)."""
    metrics = {}
    for i in range(phases.train.num_iterations):
        state, metrics = phases.step(state, batch, log and i == phases.train.num_iterations - 1)
    return state, metrics


# ----------------------------------------------------------------------------------------- iteration


@dataclasses.dataclass
class Outcome:
    """What one iteration leaves for the loop's logging: device metrics (read at log steps only),
    host metrics, and a few samples."""

    device: dict[str, jax.Array]
    host: dict[str, float]
    samples: list[dict]


def iteration(phases: Phases, state: TrainState, batch, key, timer: Timer, *, samples: int = 0, log: bool = True
              ) -> tuple[TrainState, Outcome]:
    """One GRPO iteration on one data batch (`vrft_jax.data.Batch`); every phase timed on `timer`. `log`: the
    loop logs this step's metrics (device metrics that only logging reads, the entropy, are measured then)."""
    inputs = batch.model_inputs
    with timer.timed("sampler_weights"):
        weights = jax.block_until_ready(phases.sampler_cast(state.params))
    with timer.timed("rollout"):
        out = jax.block_until_ready(sample(phases, weights, inputs, key))
    del weights  # freed before the update: the sampler copy never coexists with the update's buffers
    with timer.timed("rewards"):
        tokens, mask = local_rows(out)
        texts = detokenize(phases.tokenizer, tokens, mask)
        # A reward that raises on one process stops every process (not one, leaving the rest in a collective).
        rewards, valid = distributed.agreed(score_rewards, phases, texts, batch.meta)
        # Statistics over the global batch: every process's rewards, in global row order. Groups never
        # straddle processes (a prompt's G rows are its process's), so this process's advantages are its slice.
        everyone = RewardBreakdown(gather_rows(rewards.total),
                                   {k: gather_rows(v) for k, v in rewards.per_reward.items()})
        all_valid, all_lengths = gather_rows(valid), gather_rows(mask.sum(axis=1))
        start = jax.process_index() * len(valid) if jax.process_count() > 1 else 0
        all_advantages = group_advantages(phases, everyone.total)
        advantages = all_advantages[start:start + len(valid)]
    with timer.timed("reference"):
        train = reference_logprobs(phases, train_batch(phases, inputs, out, advantages, valid))
        train = jax.block_until_ready(old_logprobs(phases, state, train))
    with timer.timed("update"):
        state, device_metrics = update(phases, state, train, log=log)
        jax.block_until_ready(state.step)
    rollout_seconds = timer.seconds.get("rollout", 0.0)
    host = {**reward_stats(everyone.total, everyone.per_reward, phases.group_size, all_valid),
            "completion_length": float(all_lengths[all_valid].mean()) if all_valid.any() else 0.0,
            "rollout_tokens_per_s": float(all_lengths.sum() / max(rollout_seconds, 1e-9)),
            "advantage_abs": float(np.abs(all_advantages[all_valid]).mean()) if all_valid.any() else 0.0}
    picked = []  # the first completion of each of the first `samples` real prompts
    real_prompts = [i for i in range(len(texts) // phases.group_size) if valid[i * phases.group_size]]
    for i in real_prompts[:samples]:
        row = i * phases.group_size
        picked.append({"completion": texts[row], "solution": batch.meta["solution"][i],
                       "rewards": {"total": float(rewards.total[row]),
                                   **{k: float(v[row]) for k, v in rewards.per_reward.items()}}})
    return state, Outcome(device_metrics, host, picked)
