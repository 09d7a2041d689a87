"""One GRPO iteration, phase by phase: each phase is a short function the loop times on its own.

    batch -> sampler weights -> rollout -> this process's completion rows -> detokenise -> rewards
          -> [redraws of flat groups (dynamic_sampling)] -> [the groups kept of an oversampled draw]
          -> advantages over whole groups -> reference logprobs (beta > 0) -> old-policy logprobs
          (num_iterations > 1) -> num_iterations updates -> metrics

Values shared by phases come from one place, `RunContext`, built once per run: the sampling temperature
is the scorer's (`ScoringConfig.temperature`), the EOS ids end sampling and the completion mask alike (but
with `grpo.completion_mask="visual_rft"`, Visual-RFT's mask: `grpo.visual_rft_lengths`).

Seams that matter (review M1, M2):
- The sampler's weights are made on the devices from the train state at every iteration, in the
  recipe's compute dtype and the sampling layout, by a jitted cast whose outputs are new buffers:
  they never alias the train state, which the update donates. They are dropped before the update.
- `old_logprobs` come from the policy scorer (the update's own program, in float32), never from
  `Rollout.logprobs` (the decode program's dtype). Those travel in the batch as `sampled_logprobs`: the update
  measures the sampler/trainer mismatch against them on every step (`mismatch/*`), and corrects for it with
  `GRPOConfig.importance_sampling`.
- With `freeze_vision` the vision tower runs once per iteration, in the rollout's prefill: its features
  (the sampler's dtype, which is the recipe's compute dtype) travel in the `TrainBatch` to the reference,
  the old policy and the update, which would each have recomputed the same frozen features.
- With LoRA the sampler's copy is the merged model (`sampling.make_sampler_cast(..., lora=)`), the
  reference logprobs come from the base structure over the state's frozen parameters
  (`RunContext.base_score`), and the adapters' dropout, if any, acts in the update alone.
- Rows with `valid=False` (a finite stream's padding) get a NaN reward, so they stay out of every
  group statistic and get advantage 0, and their completion mask is zeroed: they add nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrft_jax import collapse, distributed, grpo
from vrft_jax.distributed import gather_rows
from vrft_jax.metrics import reward_stats
from vrft_jax.placement import shard_batch
from vrft_jax.progress import Timer
from vrft_jax.rewards.weighted import RewardBreakdown
from vrft_jax.sampling import Rollout, SamplingConfig, detokenize, local_completions, rollout, stopped_rows
from vrft_jax.train_step import TrainBatch, TrainConfig, TrainState, base_params


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every iteration of a run uses, built once (`vrft_jax.run`).

    graphdef:        the model's structure (the train state holds its parameters)
    train:           the update's settings (GRPO loss, optimizer, scoring, iterations)
    sampling:        the rollout's; its temperature must equal the scorer's (`train.scoring.temperature`)
    reward_fn:       `rewards.combine(...)`: texts, solutions, **columns -> RewardBreakdown
    tokenizer:       decodes completions
    step, score:     `train_step.make_train_step` and `scoring.make_score_fn` of this run
    reference:       the reference parameters (None when beta = 0, or with LoRA)
    base_score:      with LoRA (and beta > 0), the scorer of the base structure (`base_graphdef`): the reference
                     is the policy with its adapters disabled, read from the train state's own frozen base
    sampler_graphdef, sampler_cast: the rollout's model structure and the jitted copy of the train
                     state's parameters into it (`sampling.sampler_graphdef`, `sampling.make_sampler_cast`)
    mesh:            None on one device
    reward_columns:  batch meta columns passed to the rewards (e.g. image_hw)
    box_frame, solution_frame: the frame the model writes boxes in, and the one the records' answers are
                     stored in (`vrft_jax.rewards.frames` names); SFT writes its targets in the first
    collapse:        dynamic sampling and the zero-reward stop (`vrft_jax.collapse`)
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
    base_score: Callable | None = None
    reward_columns: tuple[str, ...] = ("image_hw",)
    box_frame: str = "rel1000"
    solution_frame: str = "rel1000"
    collapse: collapse.CollapseConfig = collapse.CollapseConfig()

    def __post_init__(self):
        scorer = self.train.scoring.temperature
        if self.sampling.temperature != scorer and not self.sampling.greedy:
            raise ValueError(f"the sampling temperature {self.sampling.temperature} differs from the scorer's "
                             f"{scorer}: the ratio and the KL would be biased")

    @property
    def group_size(self) -> int:
        return self.sampling.group_size


# ---------------------------------------------------------------------------------------------- phases


def sample(context: RunContext, weights: nnx.State, inputs, key) -> Rollout:
    """G completions of every prompt from the sampler's weights; on a mesh, rows split over the batch axes as
    the prompts are, so each process's devices hold the rows of its own prompts (`local_completions`)."""
    out = rollout(nnx.merge(context.sampler_graphdef, weights), inputs, key, context.sampling,
                  keep_image_features=context.train.freeze_vision, mesh=context.mesh)
    return out if context.mesh is None else distributed.pin_rows(out, context.mesh)


def score_rewards(context: RunContext, texts: list[str], meta: Mapping[str, Any], stopped: np.ndarray | None = None
                  ) -> tuple[RewardBreakdown, np.ndarray]:
    """(rewards of every completion, bool[B*G] valid rows): each prompt's columns repeated G times, and
    `stopped` (bool[B*G]: the completion ended on a stop id, not at the token limit) for the rewards that read it;
    rows of padding prompts (`valid=False`) are not scored and get NaN."""
    g = context.group_size
    valid = np.repeat(np.asarray(meta.get("valid", np.ones(len(texts) // g, bool)), bool), g)
    solutions = [s for s in meta["solution"] for _ in range(g)]
    columns = {name: _repeat(meta[name], g) for name in context.reward_columns if name in meta}
    if stopped is not None:
        columns["stopped"] = np.asarray(stopped, bool)
    rows = np.flatnonzero(valid)
    scored = context.reward_fn([texts[i] for i in rows], [solutions[i] for i in rows],
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


@dataclasses.dataclass
class Drawn:
    """One rollout of a batch with its rewards: the device rows, and this process's texts, rewards, validity and
    stops (host, in its rows' order), with `everyone`, the rewards of every process's rows (global order)."""

    out: Rollout
    texts: list[str]
    rewards: RewardBreakdown
    valid: np.ndarray
    stopped: np.ndarray
    lengths: np.ndarray
    everyone: RewardBreakdown


def draw(context: RunContext, weights: nnx.State, batch, key, timer: Timer) -> Drawn:
    """The batch's completions from the sampler's weights, decoded and scored."""
    with timer.timed("rollout"):
        out = jax.block_until_ready(sample(context, weights, batch.model_inputs, key))
    with timer.timed("rewards"):
        tokens, mask = local_completions(out)
        texts = detokenize(context.tokenizer, tokens, mask)
        stopped = stopped_rows(tokens, mask, context.sampling.eos_token_ids)
        # A reward that raises on one process stops every process (not one, leaving the rest in a collective).
        rewards, valid = distributed.agreed(score_rewards, context, texts, batch.meta, stopped)
        # Statistics over the global batch: every process's rewards, in global row order. Groups never
        # straddle processes (a prompt's G rows are its process's), so this process's advantages are its slice.
        everyone = RewardBreakdown(gather_rows(rewards.total),
                                   {k: gather_rows(v) for k, v in rewards.per_reward.items()})
    return Drawn(out, texts, rewards, valid, stopped, mask.sum(axis=1), everyone)


def resample_flat_groups(context: RunContext, weights: nnx.State, batch, key, drawn: Drawn, timer: Timer
                         ) -> tuple[Drawn, dict[str, float]]:
    """Dynamic sampling (`CollapseConfig.dynamic_sampling`): up to that many more draws of the whole batch (the same
    prompts and shapes: the same compiled rollout), a flat group taking its prompt's first non-flat group. Every
    process decides from the gathered rewards, so they draw the same number of times. Returns the batch and
    `dynamic_sampling/{flat_drawn, replaced, rollouts}`: the share of groups flat in the first draw, the share
    replaced, and the extra draws made."""
    g, tries = context.group_size, context.collapse.dynamic_sampling
    all_valid = gather_rows(drawn.valid)
    valid_groups = all_valid.reshape(-1, g).any(axis=1)
    flat = collapse.flat_groups(drawn.everyone.total, g, all_valid)
    first_flat, replaced, rollouts = flat.copy(), np.zeros_like(flat), 0
    while flat.any() and rollouts < tries:
        rollouts += 1
        candidate = draw(context, weights, batch, jax.random.fold_in(key, rollouts), timer)
        take = collapse.replaced_groups(flat, collapse.flat_groups(candidate.everyone.total, g, all_valid),
                                        valid_groups)
        if take.any():
            drawn = _take_groups(context, drawn, candidate, take)
            flat, replaced = flat & ~take, replaced | take
    groups = max(int(valid_groups.sum()), 1)
    return drawn, {"dynamic_sampling/flat_drawn": float(first_flat.sum() / groups),
                   "dynamic_sampling/replaced": float(replaced.sum() / groups),
                   "dynamic_sampling/rollouts": float(rollouts)}


def _take_groups(context: RunContext, drawn: Drawn, candidate: Drawn, take_groups: np.ndarray) -> Drawn:
    """`drawn` with the groups `take_groups` (bool[global prompts]) from `candidate`: on the devices (tokens,
    logprobs, lengths) and on the host (this process's texts, rewards, stops), and `everyone` for all rows."""
    g = context.group_size
    rows = np.repeat(take_groups, g)
    local = own_rows(rows, len(drawn.valid))
    out = _take_rows(distributed.to_global(context.mesh, local), candidate.out, drawn.out)
    if context.mesh is not None:
        out = distributed.pin_rows(out, context.mesh)

    def mix(new, old, where):
        return np.where(where, new, old)

    rewards = RewardBreakdown(mix(candidate.rewards.total, drawn.rewards.total, local),
                              {k: mix(candidate.rewards.per_reward[k], v, local)
                               for k, v in drawn.rewards.per_reward.items()})
    everyone = RewardBreakdown(mix(candidate.everyone.total, drawn.everyone.total, rows),
                               {k: mix(candidate.everyone.per_reward[k], v, rows)
                                for k, v in drawn.everyone.per_reward.items()})
    texts = [new if chosen else old for new, old, chosen in zip(candidate.texts, drawn.texts, local)]
    return Drawn(out, texts, rewards, drawn.valid, mix(candidate.stopped, drawn.stopped, local),
                 mix(candidate.lengths, drawn.lengths, local), everyone)


@dataclasses.dataclass
class Kept:
    """The groups of an oversampled draw the update trains on (`keep_groups`): their prompts' model inputs and
    completions on the devices (rows in the order kept, split over the processes as a drawn batch is), their
    rewards and validity over every process's rows (global order)."""

    inputs: Any
    out: Rollout
    everyone: RewardBreakdown
    valid: np.ndarray


def keep_groups(context: RunContext, inputs, drawn: Drawn, all_valid: np.ndarray) -> tuple[Kept, dict[str, float]]:
    """Oversampling (`CollapseConfig.oversample`): the global batch's `prompts_per_step` groups the update trains on
    (`collapse.kept_groups`: those that are not flat first, in the order drawn), chosen by every process alike from
    the gathered rewards, so the step does what one process would; a kept prompt drawn on another process moves to
    the process whose rows it fills (one gather on the devices). Returns them and `oversample/{signal_drawn,
    flat_kept}`: the share of the drawn groups that are not flat, and of the kept groups that are."""
    g = context.group_size
    valid_groups = all_valid.reshape(-1, g).any(axis=1)
    flat = collapse.flat_groups(drawn.everyone.total, g, all_valid)
    kept = collapse.kept_groups(flat, valid_groups, len(flat) // context.collapse.oversample)
    rows = np.repeat(kept * g, g) + np.tile(np.arange(g), len(kept))
    if context.mesh is None:
        inputs = jax.tree.map(lambda x: x[kept], inputs)  # on the host (NumPy) until the update's transfer
        out = _take_prompts(kept, rows, drawn.out)
    else:  # global indices (NumPy: the same on every process)
        inputs = distributed.pin_rows(_take_leading(kept, inputs), context.mesh)
        out = distributed.pin_rows(_take_prompts(kept, rows, drawn.out), context.mesh)
    everyone = RewardBreakdown(drawn.everyone.total[rows], {k: v[rows] for k, v in drawn.everyone.per_reward.items()})
    stats = {"oversample/signal_drawn": float((valid_groups & ~flat).sum() / max(int(valid_groups.sum()), 1)),
             "oversample/flat_kept": float((valid_groups & flat)[kept].sum() / max(int(valid_groups[kept].sum()), 1))}
    return Kept(inputs, out, everyone, all_valid[rows]), stats


@jax.jit
def _take_leading(indices, tree):
    """`tree` with the rows `indices` of every leaf's leading axis."""
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), tree)


@jax.jit
def _take_prompts(prompts, rows, out: Rollout) -> Rollout:
    """The completions of the kept prompts: rows `rows` of the per-completion arrays, `prompts` of the
    per-prompt image features."""
    features = None if out.image_features is None else jnp.take(out.image_features, prompts, axis=0)
    return out.replace(tokens=jnp.take(out.tokens, rows, axis=0), logprobs=jnp.take(out.logprobs, rows, axis=0),
                       lengths=jnp.take(out.lengths, rows, axis=0), image_features=features)


def own_rows(everyone: np.ndarray, count: int) -> np.ndarray:
    """This process's `count` rows of a gathered per-row array (`gather_rows`' global order)."""
    start = jax.process_index() * count if jax.process_count() > 1 else 0
    return everyone[start:start + count]


@jax.jit
def _take_rows(take, new: Rollout, old: Rollout) -> Rollout:
    """`old` with the rows where bool[B*G] `take` is true from `new` (one small program per rollout shape)."""
    def pick(n, o):
        return jnp.where(take.reshape(take.shape + (1,) * (o.ndim - 1)), n, o)

    return old.replace(tokens=pick(new.tokens, old.tokens), logprobs=pick(new.logprobs, old.logprobs),
                       lengths=pick(new.lengths, old.lengths))


def group_advantages(context: RunContext, total: np.ndarray) -> np.ndarray:
    """float32[B*G] advantages over whole groups; NaN rewards (padding rows) give 0 and stay out of the
    statistics. `advantage="batch"` scales by the std of this call's rows: `iteration` passes the global
    batch's (every process's rewards, gathered)."""
    return np.asarray(grpo.advantages(jnp.asarray(total), context.group_size, context.train.grpo))


def train_batch(context: RunContext, inputs, out: Rollout, advantages: np.ndarray, valid: np.ndarray) -> TrainBatch:
    """The update's batch on the devices from this process's rows' advantages and validity: the completion
    mask by `GRPOConfig.completion_mask`, padding rows' zeroed; with a frozen vision tower, the rollout's
    image features, which the reference, the old policy and the update then reuse."""
    seen = jnp.arange(out.tokens.shape[1])[None, :] < completion_lengths(context, out)[:, None]
    mask = seen.astype(jnp.int32) * distributed.to_global(context.mesh, np.asarray(valid, np.int32))[:, None]
    advantages = distributed.to_global(context.mesh, np.asarray(advantages, np.float32))
    return place(context, TrainBatch(inputs, out.tokens, mask, advantages, image_features=out.image_features,
                                     sampled_logprobs=sampler_logprobs(out)))


def sampler_logprobs(out: Rollout) -> jax.Array:
    """float32[B*G, L]: the sampler's logprobs of the tokens it drew (its dtype and program: `Rollout.logprobs`,
    the full softmax at the temperature, before top-k/top-p), NaN past each row's stop, where it drew none."""
    return jnp.where(out.mask, out.logprobs.astype(jnp.float32), jnp.nan)


def completion_lengths(context: RunContext, out: Rollout) -> jax.Array:
    """int32[B*G]: the tokens of each completion the update sees (`grpo.completion_lengths`); the tokenizer's
    EOS is read only by the rule that needs it."""
    config = context.train.grpo
    eos = context.tokenizer.eos_token_id if config.completion_mask == "visual_rft" else -1
    return grpo.completion_lengths(out.tokens, out.lengths, context.group_size, config, eos)


def place(context: RunContext, batch: TrainBatch) -> TrainBatch:
    """`batch` split over the run's mesh on its prompt axis (as it is on one device)."""
    return batch if context.mesh is None else shard_batch(batch, context.mesh)


def reference_logprobs(context: RunContext, state: TrainState, batch: TrainBatch) -> TrainBatch:
    """The reference model's logprobs for the KL term; skipped when beta = 0. With LoRA the reference is the
    base model: the state's frozen parameters under the base structure (adapters disabled, nothing copied)."""
    if context.train.grpo.beta == 0:
        return batch
    if context.train.lora:
        if context.base_score is None:
            raise ValueError("a LoRA run with beta > 0 needs RunContext.base_score (the base structure's scorer)")
        return batch.replace(ref_logprobs=context.base_score(base_params(state.params), batch.scored()))
    if context.reference is None:
        raise ValueError(f"GRPOConfig.beta={context.train.grpo.beta} needs reference parameters")
    return batch.replace(ref_logprobs=context.score(context.reference, batch.scored()))


def old_logprobs(context: RunContext, state: TrainState, batch: TrainBatch) -> TrainBatch:
    """The rollout policy's logprobs from the policy scorer (review M2), needed when one rollout feeds
    several updates; with one update the ratio is exp(lp - stop_gradient(lp)) and they are not needed."""
    if context.train.num_iterations == 1:
        return batch
    return batch.replace(old_logprobs=context.score(state.params, batch.scored()))


def update(context: RunContext, state: TrainState, batch: TrainBatch, *, log: bool = True
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_iterations` updates on the same rollout; the last one's metrics. The entropy, a metric only, is
    measured in the last update of a logged step (`log`)."""
    metrics = {}
    for i in range(context.train.num_iterations):
        state, metrics = context.step(state, batch, log and i == context.train.num_iterations - 1)
    return state, metrics


# ----------------------------------------------------------------------------------------- iteration


@dataclasses.dataclass
class Outcome:
    """What one iteration leaves for the loop's logging: device metrics (read at log steps only),
    host metrics, and a few samples."""

    device: dict[str, jax.Array]
    host: dict[str, float]
    samples: list[dict]


def iteration(context: RunContext, state: TrainState, batch, key, timer: Timer, *, samples: int = 0, log: bool = True
              ) -> tuple[TrainState, Outcome]:
    """One GRPO iteration on one data batch (`vrft_jax.data.Batch`); every phase timed on `timer`. `log`: the
    loop logs this step's metrics (device metrics that only logging reads, the entropy, are measured then)."""
    inputs = batch.model_inputs
    with timer.timed("sampler_weights"):
        weights = jax.block_until_ready(context.sampler_cast(state.params))
    drawn = draw(context, weights, batch, key, timer)
    resampling = {}
    if context.collapse.dynamic_sampling:
        drawn, resampling = resample_flat_groups(context, weights, batch, key, drawn, timer)
    del weights  # freed before the update: the sampler copy never coexists with the update's buffers
    with timer.timed("rewards"):
        # What the policy drew (every drawn group, before oversampling keeps some): the rewards, the collapse
        # signals over every process's rows (`vrft_jax.collapse`), the samples.
        all_valid, all_lengths = gather_rows(drawn.valid), gather_rows(drawn.lengths)
        shares = collapse.completion_shares(gather_rows(collapse.answered(drawn.texts)), gather_rows(drawn.stopped),
                                            all_valid)
        policy = {**reward_stats(drawn.everyone.total, drawn.everyone.per_reward, context.group_size, all_valid),
                  "completion_length": float(all_lengths[all_valid].mean()) if all_valid.any() else 0.0}
        real = drawn.everyone.total[all_valid]
        policy["reward_nonzero"] = float(np.mean(real != 0)) if real.size else float("nan")
        picked = picked_samples(context, batch, drawn, samples)
        kept = Kept(inputs, drawn.out, drawn.everyone, all_valid)
        if context.collapse.oversample > 1:
            kept, oversampling = keep_groups(context, inputs, drawn, all_valid)
            resampling = {**resampling, **oversampling}
        all_advantages = group_advantages(context, kept.everyone.total)
        rows = len(kept.valid) // jax.process_count()  # this process's rows of the update
        advantages, valid = own_rows(all_advantages, rows), own_rows(kept.valid, rows)
    with timer.timed("reference"):
        train = reference_logprobs(context, state, train_batch(context, kept.inputs, kept.out, advantages, valid))
        train = jax.block_until_ready(old_logprobs(context, state, train))
    with timer.timed("update"):
        state, device_metrics = update(context, state, train, log=log)
        jax.block_until_ready(state.step)
    rollout_seconds = timer.seconds.get("rollout", 0.0)
    host = {**policy, **shares, **resampling,
            "rollout_tokens_per_s": float(all_lengths.sum() / max(rollout_seconds, 1e-9)),
            "advantage_abs": float(np.abs(all_advantages[kept.valid]).mean()) if kept.valid.any() else 0.0}
    return state, Outcome(device_metrics, host, picked)


def picked_samples(context: RunContext, batch, drawn: Drawn, samples: int) -> list[dict]:
    """The first completion of each of this process's first `samples` real prompts, with its solution and
    rewards (what the policy drew: before oversampling keeps some)."""
    g, texts, rewards = context.group_size, drawn.texts, drawn.rewards
    real_prompts = [i for i in range(len(texts) // g) if drawn.valid[i * g]]
    return [{"completion": texts[i * g], "solution": batch.meta["solution"][i],
             "rewards": {"total": float(rewards.total[i * g]),
                         **{k: float(v[i * g]) for k, v in rewards.per_reward.items()}}}
            for i in real_prompts[:samples]]
