"""The GRPO update: one jitted program from (TrainState, TrainBatch) to (TrainState, metrics).

On a ("data", "fsdp", "tensor") mesh the parameters and the optimizer state are placed by the
logical-axis rules (`vrft_jax.placement`), the batch is split over data x fsdp on its prompt axis,
and the state is donated. Inside, the batch is cut into `micro_batches` groups of whole prompts;
a `lax.scan` sums each micro-batch's gradient of its loss numerator, its `grpo.LossTerms` and its
entropy, and one division by the batch's count gives the loss and gradient of the whole batch,
so the update does not depend on the split. The optimizer (`vrft_jax.optimizer`: global-norm
clipping, AdamW on a warmup + linear-decay schedule) follows. Two kinds of batch skip the update,
leaving parameters and optimizer state (Adam's moments and count) bit-identical and
`TrainState.step` (the schedule's count) where it was: a non-finite loss or gradient (counted, see
`check_nonfinite`), and a batch without a real completion token (`loss_count == 0`: its zero
gradient would still move the parameters through Adam's momentum; reported as `empty_batch`, not
counted as non-finite).

The compiled programs read the prompts' last slot as each prompt's last token, so the callables
that `make_train_step` and `scoring.make_score_fn` return check on the host, before dispatch, that
the batch's prompts are left-padded (`padding.LeftPaddedBatch`: an `InputError` naming the rows
otherwise; a device mask that passed, e.g. the rollout's, is not read again).

Frozen parameters (the vision tower, with `freeze_vision`) are never differentiated and have no
optimizer state. Parameters are kept in `param_dtype` (float32 master weights) and cast to
`compute_dtype` where the model uses them. With `lora` the trained parameters are the model's
adapters alone (`nnx.LoRAParam`, float32), the whole base is frozen in `frozen_dtype`, the reference
is that base under the structure without adapters (`base_params`, `models.qwen2_vl.model.base_graphdef`:
nothing copied), and a checkpoint holds the adapters and their moments (`checkpointed`, `restored`).

The reference model's logprobs, and the old policy's when `num_iterations > 1`, come from the policy
scorer (`scoring.make_score_fn`, the update's own scoring code in float32), computed once per rollout
and carried in the batch. `old_logprobs` are never the sampler's `Rollout.logprobs`: those come from
another program in the sampler's dtype, from a top-k-filtered distribution (review M2). The sampler
does not decode from the train state's float32 training-layout parameters either: each iteration
makes a fresh copy in the compute dtype and the sampling layout (`sampling.make_sampler_cast`),
dropped before the update donates the state (review M1). One step of a run, as
`vrft_jax.grpo_loop.iteration` does it (`vrft_jax.run` builds everything once):

    graphdef, state = init_state(model, config, mesh=mesh)          # once
    step = make_train_step(graphdef, state, config, mesh=mesh)      # once
    score = scoring.make_score_fn(graphdef, reference_params, config.scoring,
                                  micro_batches=config.micro_batches, mesh=mesh)
    cast = sampling.make_sampler_cast(state.params, compute_dtype, mesh)
    ...
    weights = cast(state.params)                                    # the sampler's copy
    out = sampling.rollout(nnx.merge(sampler_graphdef, weights), prompts, key, sampling_config)
    del weights
    rewards = ...                                                   # host, per completion
    batch = placement.shard_batch(TrainBatch(prompts, out.tokens, out.mask.astype(jnp.int32),
                                             grpo.advantages(rewards, G, config.grpo),
                                             sampled_logprobs=grpo_loop.sampler_logprobs(out)), mesh)
    batch = batch.replace(ref_logprobs=score(reference_params, batch.scored()))
    if config.num_iterations > 1:
        batch = batch.replace(old_logprobs=score(state.params, batch.scored()))
    for _ in range(config.num_iterations):
        state, metrics = step(state, batch)
    check_nonfinite(state, config)                                  # at log steps: it syncs the host
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vrft_jax import grpo, sharding
from vrft_jax.models.qwen2_vl import lora
from vrft_jax.models.qwen2_vl.config import REMAT_POLICIES
from vrft_jax.models.qwen2_vl.inputs import ModelInputs
from vrft_jax.models.qwen2_vl.model import Qwen2VL, with_config
from vrft_jax.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from vrft_jax.padding import LeftPaddedBatch
from vrft_jax.placement import jit_on_mesh, placements, split_micro_batches, tree_shardings
from vrft_jax.scoring import CompletionBatch, ScoringConfig, score_completions


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One GRPO update's settings, composed of the leaf configs of the modules it drives.

    grpo:             the loss, advantages and KL (`vrft_jax.grpo`)
    optimizer:        clipping, AdamW and the learning-rate schedule (`vrft_jax.optimizer`); Visual-RFT's
                      defaults (visual-rft.md §10.2)
    scoring:          how completion tokens are scored (`vrft_jax.scoring`): the temperature and the LM
                      head's chunking, shared with the reference and old-policy scorer
    micro_batches:    groups of whole prompts run one after another (gradient accumulation); must
                      divide the prompts of a batch
    num_iterations:   updates per rollout (TRL's mu); above 1 the batch must carry `old_logprobs`
    compute_dtype:    activations' dtype; None means param_dtype (bfloat16 over float32 parameters
                      gives float32 master weights with bf16 compute)
    remat:            the model's rematerialisation policy per layer: "none", "block", "save_dots"
    freeze_vision:    train the language model only; the vision tower gets no gradient and no
                      optimizer state, and runs once per rollout (its features travel in the batch);
                      implied by `lora` (set to True with it: the vision tower has no adapters)
    max_consecutive_nonfinite: this many updates skipped in a row stop the run: the step only
                      counts them (`TrainState.nonfinite_streak`), `check_nonfinite` raises
    lora:             train the model's low-rank adapters (`Qwen2VLConfig.lora`) only: the gradient, the optimizer
                      state and the run's checkpoints hold them alone; the base is frozen, stored in
                      `frozen_dtype`, and is the reference (the model with its adapters disabled: no copy)
    frozen_dtype:     with `lora`, the frozen base's storage dtype; None means param_dtype (the adapters keep
                      their own, `LoRAConfig.param_dtype`)
    seed:             with `lora`, the adapters' dropout masks (`LoRAConfig.dropout`) are drawn from key(seed)
                      folded with the state's step and the micro-batch: a resumed run draws the same ones
    reference_dtype:  the KL term's frozen reference copy stores its matrices (embeddings, kernels) in this
                      dtype, its vectors (norm scales, biases) as the parameters (`reference_weights`).
                      None: the compute dtype, which every matmul casts its weights to anyway, so the
                      reference logprobs are the full-precision copy's bit for bit at a fraction of its
                      memory (half with bfloat16 compute); "float32" over bf16 compute keeps a full copy
    """

    grpo: grpo.GRPOConfig = grpo.GRPOConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scoring: ScoringConfig = ScoringConfig()
    micro_batches: int = 1
    num_iterations: int = 1
    param_dtype: Any = jnp.float32
    compute_dtype: Any = None
    remat: str = "none"
    freeze_vision: bool = False
    max_consecutive_nonfinite: int = 10
    lora: bool = False
    frozen_dtype: Any = None
    seed: int = 0
    reference_dtype: Any = None

    def __post_init__(self):
        errors = []
        for name in ("micro_batches", "num_iterations", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.frozen_dtype is not None and not self.lora:
            errors.append("frozen_dtype is the frozen base's dtype under LoRA: set lora=True or leave it None")
        if self.remat not in REMAT_POLICIES:
            errors.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.grpo.loss == "paper" and self.num_iterations != 1:
            errors.append(f"num_iterations={self.num_iterations}: the paper loss makes one update per rollout; "
                          "use grpo.loss='grpo' for clipped multi-iteration updates")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.lora:
            object.__setattr__(self, "freeze_vision", True)
        for name in ("compute_dtype", "frozen_dtype", "reference_dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, jnp.dtype(getattr(self, name)))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class TrainBatch:
    """One update's data: B prompts and G completions of each (row b*G + g is sample g of prompt b).

    inputs:          the left-padded prompts with their images, [B, ...] (the rollout's ModelInputs)
    completions:     int32[B*G, L] sampled tokens, padding after the first EOS
    completion_mask: int32[B*G, L] 1 through the first EOS (included), 0 after
    advantages:      float32[B*G] (`grpo.advantages` of the rewards)
    old_logprobs:    float32[B*G, L] the policy's logprobs at rollout time, needed when num_iterations > 1:
                     `make_score_fn`'s under the rollout's parameters, never the sampler's `Rollout.logprobs`
    ref_logprobs:    float32[B*G, L] the reference's logprobs; needed when beta > 0, and gives the
                     `kl` metric whenever present
    image_features:  [B, P / merge^2, D] the prompts' vision features, only with `freeze_vision`: the
                     rollout's (`Rollout.image_features`), so the reference, the old policy and the update
                     embed them instead of running the frozen tower three more times; None runs the tower
    sampled_logprobs: float32[B*G, L] the sampler's own logprobs of the completions (`Rollout.logprobs`, NaN past
                     where it stopped): the sampler/trainer mismatch metrics and `GRPOConfig.importance_sampling`
                     read them; None (SFT) measures no mismatch
    """

    inputs: ModelInputs
    completions: jax.Array
    completion_mask: jax.Array
    advantages: jax.Array
    old_logprobs: jax.Array | None = None
    ref_logprobs: jax.Array | None = None
    image_features: jax.Array | None = None
    sampled_logprobs: jax.Array | None = None

    def scored(self) -> CompletionBatch:
        """What the reference and old-policy scorer read: one pytree structure whichever logprobs the
        batch carries already, so both share one compiled scorer."""
        return CompletionBatch(self.inputs, self.completions, self.completion_mask, self.image_features)


@flax.struct.dataclass
class TrainState:
    """params: every parameter (nnx.State) in param_dtype; opt_state: optax state of the trainable ones;
    step: updates applied (the schedule's count; a skipped update does not advance it);
    nonfinite_total / nonfinite_streak: updates skipped for a non-finite loss or gradient, in all and
    in a row (an empty batch changes neither)."""

    params: nnx.State
    opt_state: Any
    step: jax.Array
    nonfinite_total: jax.Array
    nonfinite_streak: jax.Array


class NonFiniteUpdatesError(RuntimeError):
    """Too many updates in a row were skipped for a non-finite loss or gradient."""


def check_nonfinite(state: TrainState, config: TrainConfig) -> None:
    """Raise NonFiniteUpdatesError once `config.max_consecutive_nonfinite` updates in a row were skipped.
    It reads two scalars from the device (a host sync), so the loop calls it at log steps only."""
    streak = int(state.nonfinite_streak)
    if streak >= config.max_consecutive_nonfinite:
        raise NonFiniteUpdatesError(
            f"{streak} updates in a row were skipped for a non-finite loss or gradient ({int(state.nonfinite_total)} "
            f"in all, {int(state.step)} applied); TrainConfig.max_consecutive_nonfinite="
            f"{config.max_consecutive_nonfinite}")


# ---------------------------------------------------------------------------------------------- pieces


def trainable_filter(config: TrainConfig):
    """The nnx filter of the parameters that get gradients and optimizer state."""
    if config.lora:
        return nnx.LoRAParam
    if config.freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    return nnx.Param


def split_params(params: nnx.State, config: TrainConfig) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parts of `params`."""
    return nnx.split_state(params, trainable_filter(config), ...)


def prepare_model(model: Qwen2VL, config: TrainConfig) -> Qwen2VL:
    """The model under the training dtypes and remat policy (parameters cast to param_dtype; with LoRA the base
    to `frozen_dtype`, the adapters kept in theirs)."""
    if config.lora != (model.config.lora is not None):
        raise ValueError(f"TrainConfig.lora={config.lora} but the model has {'' if model.config.lora else 'no '}"
                         "adapters (Qwen2VLConfig.lora; `with_lora` adds them)")
    param_dtype = (config.frozen_dtype or config.param_dtype) if config.lora else config.param_dtype
    return with_config(model, param_dtype=param_dtype, dtype=config.compute_dtype or config.param_dtype,
                       remat=config.remat)


def checkpointed(state: TrainState, config: TrainConfig) -> TrainState:
    """What a run checkpoint holds of `state`: all of it, or with LoRA all but the frozen base (which the run
    rebuilds from its source: the checkpoint holds the adapters and their optimizer state)."""
    return state.replace(params=split_params(state.params, config)[0]) if config.lora else state


def restored(state: TrainState, saved: TrainState, config: TrainConfig) -> TrainState:
    """`state` (a fresh one, whose frozen base is the run's) with the restored `checkpointed` part."""
    if not config.lora:
        return saved
    return saved.replace(params=nnx.merge_state(split_params(state.params, config)[1], saved.params))


def base_params(params: nnx.State) -> nnx.State:
    """A LoRA model's base parameters (the adapters left out): with `models.qwen2_vl.model.base_graphdef` the
    model with its adapters disabled, i.e. the reference, held once with the policy."""
    return nnx.filter_state(params, nnx.Not(nnx.LoRAParam))


# ---------------------------------------------------------------------------------------------- objective


def _check_batch(batch: TrainBatch, config: TrainConfig) -> None:
    if config.grpo.beta and batch.ref_logprobs is None:
        raise ValueError(f"GRPOConfig.beta={config.grpo.beta} needs TrainBatch.ref_logprobs: score the completions "
                         "with the reference parameters (make_score_fn), or set beta=0")
    if batch.image_features is not None and not config.freeze_vision:
        raise ValueError("TrainBatch.image_features are given but the vision tower trains (freeze_vision=False): "
                         "features computed outside the update carry no gradient to it; leave them None")
    if config.num_iterations > 1 and batch.old_logprobs is None:
        raise ValueError(f"TrainConfig.num_iterations={config.num_iterations} needs TrainBatch.old_logprobs: the "
                         "policy's logprobs at rollout time (make_score_fn with the rollout's parameters)")


def micro_batch_terms(model: Qwen2VL, batch: TrainBatch, config: TrainConfig, measure_entropy: bool | jax.Array = True):
    """(LossTerms, entropy sum over real tokens) of one micro-batch under `model`; the entropy is measured
    where `measure_entropy` is true (a bool, or a bool scalar read at run time), 0 elsewhere. With an entropy
    bonus (`GRPOConfig.entropy_coef`) it is always measured, and carries its gradient."""
    scoring = config.scoring
    bonus = config.grpo.entropy_coef > 0
    scores = score_completions(model, batch.inputs, batch.completions, batch.completion_mask,
                               temperature=scoring.temperature, chunk_size=scoring.chunk_size,
                               vocab_block=scoring.vocab_block, with_entropy=True if bonus else measure_entropy,
                               image_features=batch.image_features, entropy_grad=bonus)
    mask = batch.completion_mask.astype(jnp.float32)
    # With one update per rollout the old policy is the current one: ratio exp(lp - sg(lp)) (TRL does the same).
    old = batch.old_logprobs if config.num_iterations > 1 else None
    terms = grpo.loss_terms(scores.logprobs, old, batch.ref_logprobs, batch.advantages, mask, config.grpo,
                            sampled_logprobs=batch.sampled_logprobs)
    return terms, jnp.sum(scores.entropy * mask)


def loss_and_grads(graphdef, trainable: nnx.State, frozen: nnx.State, batch: TrainBatch, config: TrainConfig,
                   mesh=None, rules=sharding.DEFAULT_RULES, measure_entropy: bool | jax.Array = True,
                   dropout_key: jax.Array | None = None):
    """The batch's loss, its gradient w.r.t. `trainable`, its summed LossTerms and entropy sum (0 unless
    `measure_entropy`). With `dropout_key` the adapters' dropout is on, each micro-batch's masks its own.

    Gradients of each micro-batch's `loss_sum` are summed over a `lax.scan`, then divided once by the
    batch's `loss_count` (which does not depend on the parameters): exact gradient accumulation. An entropy
    bonus (`GRPOConfig.entropy_coef` c) makes the objective loss - c x (entropy sum / tokens), the token mean
    over the whole batch whatever the loss's normaliser (TRL's): each micro-batch's numerator subtracts
    c x (loss_count / tokens) x its entropy sum, both counts the batch's, read from its mask up front.
    """
    _check_batch(batch, config)
    coef = config.grpo.entropy_coef
    if coef:
        mask = batch.completion_mask.astype(jnp.float32)
        bonus_scale = coef * grpo.loss_count(mask, config.grpo) / jnp.maximum(jnp.sum(mask), 1.0)

    def numerator(trainable, micro_batch, index):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        with lora.dropout_key(key):
            terms, entropy_sum = micro_batch_terms(nnx.merge(graphdef, trainable, frozen), micro_batch, config,
                                                   measure_entropy)
        objective = terms.loss_sum - bonus_scale * entropy_sum if coef else terms.loss_sum
        return objective, (terms, entropy_sum)

    gradient = jax.value_and_grad(numerator, has_aux=True)
    if config.micro_batches == 1:  # no accumulator: one gradient-sized buffer fewer
        (_, (terms, entropy_sum)), grads = gradient(trainable, batch, 0)
    else:
        def accumulate(carry, scanned):
            grads, terms, entropy_sum = carry
            micro_batch, index = scanned
            (_, (new_terms, new_entropy)), new_grads = gradient(trainable, micro_batch, index)
            return (jax.tree.map(jnp.add, grads, new_grads), terms + new_terms, entropy_sum + new_entropy), None

        micro = split_micro_batches(batch, batch.inputs.input_ids.shape[0], config.micro_batches, mesh, rules)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, terms, entropy_sum), _ = jax.lax.scan(
            accumulate, (zeros, grpo.LossTerms.zeros(), jnp.zeros((), jnp.float32)),
            (micro, jnp.arange(config.micro_batches)))
    count = jnp.maximum(terms.loss_count, 1.0)
    grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
    return terms.loss_sum / count, grads, terms, jax.lax.stop_gradient(entropy_sum)


# ---------------------------------------------------------------------------------------------- programs


def init_state(model: Qwen2VL, config: TrainConfig, *, mesh=None, rules=sharding.DEFAULT_RULES):
    """(graphdef, TrainState): the model under the training dtypes, its parameters placed by the rules
    on `mesh` (or the default device), and a fresh optimizer state born with the same layout.

    The state owns a copy of the parameters (the step donates it): `model`, and a reference taken
    from it, stay valid.
    """
    graphdef, params = nnx.split(prepare_model(model, config))
    tx = make_optimizer(config.optimizer)

    def placement(tree):
        return placements(tree, mesh, rules)  # the default device without a mesh

    # Every array is committed to its layout (a later call with committed arrays would otherwise
    # compile the step again) and owned by the state: a device_put alone may alias `model`'s buffers.
    params = jax.device_put(params, placement(params))
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=placement(params))(params)
    trainable, _ = split_params(params, config)
    opt_state = jax.jit(tx.init, out_shardings=placement(jax.eval_shape(tx.init, trainable)))(trainable)
    counters = jax.device_put([jnp.zeros((), jnp.int32) for _ in range(3)], placement(jnp.zeros(())))
    return graphdef, TrainState(params=params, opt_state=opt_state, step=counters[0], nonfinite_total=counters[1],
                                nonfinite_streak=counters[2])


def reference_dtypes(params: nnx.State, config: TrainConfig) -> nnx.State:
    """The dtype of each leaf of the reference copy (`TrainConfig.reference_dtype`): matrices in the reference
    dtype (by default the compute dtype), vectors (norm scales, biases: some are read in float32) unchanged."""
    dtype = config.reference_dtype or config.compute_dtype or config.param_dtype
    return jax.tree.map(lambda x: jnp.dtype(dtype) if x.ndim >= 2 else x.dtype, params)


def reference_weights(params: nnx.State, config: TrainConfig, *, mesh=None, rules=sharding.DEFAULT_RULES
                      ) -> nnx.State:
    """The KL term's frozen reference: a copy of the initial `params` that the donated update never sees, in
    `reference_dtypes`, laid out as the parameters."""
    dtypes = reference_dtypes(params, config)
    copy = lambda p: jax.tree.map(lambda x, d: jnp.array(x, dtype=d, copy=True), p, dtypes)  # noqa: E731
    return jax.jit(copy, out_shardings=placements(params, mesh, rules))(params)


def make_train_step(graphdef, state: TrainState, config: TrainConfig, *, mesh=None,
                    rules=sharding.DEFAULT_RULES):
    """The jitted update `(TrainState, TrainBatch[, measure_entropy]) -> (TrainState, metrics)`; the state is donated.

    `state` (concrete or abstract) fixes the parameter layout. With a mesh, the state keeps the
    rules' layout in and out and the batch is split over the mesh's batch axes on its first axis
    (B and B*G must be divisible by data x fsdp). Each call first checks on the host that the
    batch's prompts are left-padded (`InputError` naming the rows); the returned callable forwards
    everything else (`lower`, ...) to the jitted function `(state, batch, measure_entropy)`, unchecked.

    `step(state, batch, measure_entropy=True)`: the policy's entropy is a metric only, and measuring it
    costs a third more elementwise work in the LM head's forward, so the loop asks for it at logged steps.
    The flag is a run-time input (a `lax.cond` in the head): both kinds of step run one compiled program,
    and the update itself is the same either way. Metrics are float32 scalars:
    loss, kl (when the batch carries ref_logprobs), entropy (NaN when not measured), clip_low / clip_high / clip_region
    (token fractions), grad_norm (before clipping), learning_rate, tokens, sequences,
    update_skipped (1 when the state was left as it was: a non-finite loss or gradient, or an
    empty batch), empty_batch (1 when no completion token was real: loss_count == 0),
    nonfinite_streak, nonfinite_total; with the sampler's logprobs in the batch, the mismatch `mismatch/kl`,
    `mismatch/gap_mean`, `mismatch/gap_max`, and with `grpo.importance_sampling` the weights' `is_ratio/{min,mean,max}`
    (`grpo.LossTerms.metrics`). With `grpo.entropy_coef` the entropy is measured at every step (the bonus needs it).
    """
    tx = make_optimizer(config.optimizer)
    schedule = learning_rate_schedule(config.optimizer)

    def step(state: TrainState, batch: TrainBatch, measure_entropy: jax.Array):
        trainable, frozen = split_params(state.params, config)
        dropout = jax.random.fold_in(jax.random.key(config.seed), state.step) if config.lora else None
        loss, grads, terms, entropy_sum = loss_and_grads(graphdef, trainable, frozen, batch, config, mesh, rules,
                                                         measure_entropy, dropout)
        grad_norm = optax.tree.norm(grads)
        # No real token: the zero gradient would still move the parameters through Adam's momentum, and
        # advance its count. Empty takes precedence: padding's NaN is not counted as a non-finite update.
        empty = terms.loss_count == 0
        nonfinite = ~empty & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        apply = ~empty & ~nonfinite
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        updated = optax.apply_updates(trainable, updates)

        def keep_unless_applied(new, old):
            return jnp.where(apply, new, old)

        trainable = jax.tree.map(keep_unless_applied, updated, trainable)
        opt_state = jax.tree.map(keep_unless_applied, opt_state, state.opt_state)
        skipped = nonfinite.astype(jnp.int32)
        # An empty batch leaves the streak as it was: it is neither a failed nor a successful update.
        streak = jnp.where(empty, state.nonfinite_streak, (state.nonfinite_streak + 1) * skipped)
        new_state = TrainState(params=nnx.merge_state(trainable, frozen), opt_state=opt_state,
                               step=state.step + apply.astype(jnp.int32),
                               nonfinite_total=state.nonfinite_total + skipped, nonfinite_streak=streak)
        tokens = jnp.maximum(terms.tokens, 1.0)
        measured = True if config.grpo.entropy_coef else measure_entropy  # a bonus measures it every step
        entropy = jnp.where(measured, entropy_sum / tokens, jnp.nan)
        metrics = {"loss": loss, "entropy": entropy, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "tokens": terms.tokens,
                   "sequences": terms.sequences, "update_skipped": (~apply).astype(jnp.float32),
                   "empty_batch": empty.astype(jnp.float32),
                   "nonfinite_streak": new_state.nonfinite_streak.astype(jnp.float32),
                   "nonfinite_total": new_state.nonfinite_total.astype(jnp.float32), **terms.metrics()}
        if batch.ref_logprobs is None:
            del metrics["kl"], metrics["kl_sequence_mean"]
        if batch.sampled_logprobs is None:  # SFT: no sampler
            metrics = {k: v for k, v in metrics.items() if not k.startswith(("mismatch/", "is_ratio/"))}
        elif not config.grpo.importance_sampling:  # the weights are 1: TRL logs them with the correction only
            metrics = {k: v for k, v in metrics.items() if not k.startswith("is_ratio/")}
        return new_state, metrics

    shardings = {}
    if mesh is not None:  # the batch sharding is a prefix: every batch leaf on its axis 0
        state_shardings, replicated = tree_shardings(state, mesh, rules), NamedSharding(mesh, PartitionSpec())
        shardings = dict(in_shardings=(state_shardings, sharding.batch_sharding(mesh, 1, rules=rules), replicated),
                         out_shardings=(state_shardings, replicated))
    return TrainStep(jit_on_mesh(step, mesh, rules, donate_argnums=0, **shardings), "training")


class TrainStep(LeftPaddedBatch):
    """`make_train_step`'s callable: `(state, batch, measure_entropy=True) -> (state, metrics)`."""

    def __call__(self, state: TrainState, batch: TrainBatch, measure_entropy: bool = True):
        # A host value: on many processes jit reads it as the same replicated value on every device.
        return super().__call__(state, batch, np.asarray(measure_entropy, np.bool_))

    def lower(self, state, batch, measure_entropy: bool = True):
        """The jitted update lowered for these (concrete or abstract) arguments: the program every step runs."""
        return self.jitted.lower(state, batch, np.asarray(measure_entropy, np.bool_))
