"""GRPO math in pure jnp: rewards -> advantages, KL estimators, and per-token policy losses.

Three registries hold the swappable pieces, each filled by a decorator:
  ADVANTAGES     `@register_advantage("group")`: rewards float[N] (N = prompts x G) -> advantages float[N]
  KL_ESTIMATORS  `@register_kl("k3")`: (logprobs, ref_logprobs) float[N, L] -> per-token KL estimate
  LOSSES         `@register_loss("paper")`: (logprobs, old_logprobs, ref_logprobs, advantages, mask, config,
                 sampled_logprobs=None) -> LossTerms (a new loss starts from `LossTerms.zeros().replace(...)`)
A loss never returns a mean. It returns `LossTerms`: the sum of its numerator, the count that
normalises it (tokens, sequences, or sequences x max length) and sums for its metrics. Sums and
counts add across micro-batches and devices, so the loss of a batch is `total sum / total count`
however the batch was split: splitting never changes the math. The count never depends on the
parameters, which is why the gradient of a batch is the sum of its micro-batches' gradients of
`loss_sum`, divided once by the global count.

Names follow TRL 1.16's `GRPOTrainer` (`loss_type`, `scale_rewards`, `epsilon`, `epsilon_high`,
`delta`, `beta`); each loss's docstring gives its formula and the TRL code it reproduces.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from vrft_jax.fields import known_fields

ADVANTAGES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
LOSSES: dict[str, Callable] = {}


def _registrar(table: dict[str, Callable], kind: str):
    def register(name: str):
        def decorate(fn):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__qualname__})")
            table[name] = fn
            return fn

        return decorate

    return register


register_advantage = _registrar(ADVANTAGES, "advantage estimator")
register_kl = _registrar(KL_ESTIMATORS, "KL estimator")
register_loss = _registrar(LOSSES, "loss")

COMPLETION_MASKS = ("first_stop", "visual_rft")  # `GRPOConfig.completion_mask`, `completion_lengths`
IMPORTANCE_SAMPLING = (None, "token_truncate")  # `GRPOConfig.importance_sampling`


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """The algorithm's knobs. The defaults are Visual-RFT's (visual-rft.md §5.4) but the completion mask's,
    which `visual_rft()` sets too.

    loss:           a name in LOSSES ("paper", "grpo", "bnpo", "dr_grpo", "dapo")
    advantage:      a name in ADVANTAGES ("group", "batch", "none"); TRL's `scale_rewards`
    advantage_eps:  added to the std before dividing (1e-4 in Visual-RFT and TRL)
    beta:           weight of the per-token KL to the reference policy; 0 needs no reference
    kl:             a name in KL_ESTIMATORS ("k1", "k2", "k3")
    kl_bias_correction: multiply the per-token KL by the ratio r = exp(lp - old) (value 1 on-policy,
                    but its gradient adds KL grad(lp)), which makes the KL gradient the unbiased
                    reverse-KL gradient under samples of the old policy (DeepSeek-V3.2). TRL 1.16's
                    `use_bias_correction_kl`, on by default there; off in Visual-RFT (TRL 0.14)
    epsilon:        lower clip range of the ratio, 1 - epsilon (TRL `epsilon`)
    epsilon_high:   upper clip range, 1 + epsilon_high; None means epsilon (TRL `epsilon_high`)
    delta:          optional upper bound of the unclipped ratio (two-sided clipping; TRL `delta`)
    max_completion_length: dr_grpo's per-sequence normaliser; None means the completion bucket L
    completion_mask: which completion tokens the loss, the KL and the update see, a name in COMPLETION_MASKS:
                    "first_stop" (default) every token through the first of the sampler's stop ids (TRL
                    1.16's `eos_token_ids` rule); "visual_rft" Visual-RFT's `processing_class.eos_token_id`
                    rule, `visual_rft_lengths`
    importance_sampling: the sampler/trainer mismatch correction, None (off) or "token_truncate": each token's
                    policy loss (not its KL term) is multiplied by w = min(exp(old - sampled), cap), old the
                    scorer's logprob (the update's float32 program at the rollout's parameters) and sampled the
                    sampler's (`Rollout.logprobs`: its dtype, its program); truncated importance sampling, TRL 1.16's
                    `vllm_importance_sampling_correction` with `vllm_importance_sampling_mode="token_truncate"`,
                    verl's `rollout_is: token` with `rollout_is_threshold`. The mismatch itself is logged either way
    importance_sampling_cap: the cap on w (TRL `vllm_importance_sampling_clip_max`, 3.0; verl
                    `rollout_is_threshold`, 2.0)
    entropy_coef:   weight of the entropy bonus: the objective is the loss minus entropy_coef x the token mean of
                    the policy's entropy over the batch, whatever the loss's own normaliser (TRL 1.16 `entropy_coef`,
                    its documented `L_policy - coef * H`; verl `actor.entropy_coeff`); 0 (the peers' default) is off
    """

    loss: str = "paper"
    advantage: str = "group"
    advantage_eps: float = 1e-4
    beta: float = 0.04
    kl: str = "k3"
    kl_bias_correction: bool = False
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    max_completion_length: int | None = None
    completion_mask: str = "first_stop"
    importance_sampling: str | None = None
    importance_sampling_cap: float = 3.0
    entropy_coef: float = 0.0

    def __post_init__(self):
        for field, table in (("loss", LOSSES), ("advantage", ADVANTAGES), ("kl", KL_ESTIMATORS),
                             ("completion_mask", COMPLETION_MASKS), ("importance_sampling", IMPORTANCE_SAMPLING)):
            name = getattr(self, field)
            if name not in table:
                raise ValueError(f"GRPOConfig.{field}={name!r} is not one of {sorted(table, key=str)}")
        if self.beta < 0:
            raise ValueError(f"GRPOConfig.beta={self.beta} must be >= 0")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"GRPOConfig.epsilon={self.epsilon} must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"GRPOConfig.epsilon_high={self.epsilon_high} must be >= 0")
        if self.delta is not None and self.delta <= 1 + self.upper_epsilon:
            raise ValueError(f"GRPOConfig.delta={self.delta} must exceed 1 + epsilon_high = {1 + self.upper_epsilon}")
        if self.advantage_eps < 0:
            raise ValueError(f"GRPOConfig.advantage_eps={self.advantage_eps} must be >= 0")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"GRPOConfig.max_completion_length={self.max_completion_length} must be >= 1")
        if not self.importance_sampling_cap >= 1:
            raise ValueError(f"GRPOConfig.importance_sampling_cap={self.importance_sampling_cap} must be >= 1: a cap "
                             "below 1 would shrink every on-policy token's loss")
        if not self.entropy_coef >= 0:
            raise ValueError(f"GRPOConfig.entropy_coef={self.entropy_coef} must be >= 0 (a bonus, not a penalty)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GRPOConfig:
        """From a plain mapping (a recipe's `grpo` block); unknown keys are errors."""
        return cls(**known_fields(cls, values))

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def visual_rft(cls) -> GRPOConfig:
        """Visual-RFT's GRPO update (visual-rft.md §5.4): paper loss, group advantages with unbiased std
        + 1e-4, k3 KL, beta 0.04, and its completion mask (`completion_mask="visual_rft"`: through the first
        <|im_end|>; a row that stopped on <|endoftext|> or at the length limit keeps every token its group's
        `generate` returned, the <|endoftext|> padding included).

        This config is the update's math only. Two settings outside it decide what the update sees, and
        differ from Visual-RFT in a recipe's defaults:
        - the sampler never draws the 4 vision special tokens (TRL 1.16 suppresses <|image_pad|> alone,
          grpo_trainer.py:1170); Visual-RFT suppresses nothing: `sampling.suppressed_token_ids=()`
          (`SamplingConfig.suppressed_token_ids`);
        - the logged `reward_std` and `kl` are TRL 1.16's (batch std; token mean); Visual-RFT logged the
          mean in-group std and the mean over sequences of each one's token mean: `metric_names="visual_rft"`
          logs those under the plain names (`vrft_jax.metrics.METRIC_NAMES`).
        A recipe's `grpo` block defaults to `completion_mask="first_stop"` (the mask ends where sampling
        stopped); `grpo.completion_mask="visual_rft"` makes it this config's. What lies outside the update
        (precision, the rewards' math_verify shortcut, the prompt-truncation bug of visual-rft.md §5.4 step 1)
        is for the recipes and the rewards to state.
        """
        return cls(completion_mask="visual_rft")

    @classmethod
    def trl(cls, loss_type: str = "dapo", scale_rewards: str = "group", beta: float = 0.0, epsilon: float = 0.2,
            epsilon_high: float | None = None, use_bias_correction_kl: bool = True, **changes) -> GRPOConfig:
        """TRL 1.16 `GRPOConfig` semantics under TRL's names, with its defaults (dapo, group scaling, beta 0,
        KL bias correction on)."""
        return cls(loss=loss_type, advantage=scale_rewards, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                   kl_bias_correction=use_bias_correction_kl, **changes)


# ---------------------------------------------------------------------------------------------- rewards


def combine_rewards(rewards_nf, weights_f=None):
    """float32[N]: the weighted sum over reward functions of float[N, F] rewards.

    A NaN reward (a function that could not score the completion) counts as 0, unless every
    function returned NaN: the completion is then unscorable and its reward stays NaN, which the
    advantage estimators turn into advantage 0 (TRL's `sum_then_normalize`).
    """
    rewards = jnp.asarray(rewards_nf, jnp.float32)
    weights = jnp.ones(rewards.shape[1], jnp.float32) if weights_f is None else jnp.asarray(weights_f, jnp.float32)
    if weights.shape != rewards.shape[1:]:
        raise ValueError(f"{weights.shape[0]} reward weights for {rewards.shape[1]} reward functions")
    total = jnp.nansum(rewards * weights, axis=1)
    return jnp.where(jnp.all(jnp.isnan(rewards), axis=1), jnp.nan, total)


@functools.partial(jax.jit, static_argnums=(1, 2))
def advantages(rewards_n, group_size: int, config: GRPOConfig):
    """float32[N] advantages of `rewards_n` (row b*G + g is sample g of prompt b) by `config.advantage`;
    one compiled program per (N, group size, config), not a program per array operation.

    A non-finite reward (NaN: unscorable; +-inf: a custom reward gone wrong) is left out of the
    statistics and gets advantage 0; so does any advantage that overflows. An estimator sees every
    non-finite reward as NaN, and any non-finite advantage it returns becomes 0.
    """
    rewards = jnp.asarray(rewards_n, jnp.float32)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of {group_size}")
    rewards = jnp.where(jnp.isfinite(rewards), rewards, jnp.nan)
    return _finite_or_zero(ADVANTAGES[config.advantage](rewards, group_size, config.advantage_eps))


def _nanstd(x, axis=None, keepdims=False):
    """Unbiased (N-1) std over the finite entries, as torch's default and TRL's `nanstd`; 0 where fewer
    than two entries are finite (TRL uses 0 for a lone sample; the advantage is 0 either way)."""
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    squares = jnp.nansum(jnp.square(x - mean), axis=axis, keepdims=True)
    std = jnp.sqrt(squares / jnp.maximum(count - 1, 1))
    std = jnp.where(count > 1, std, 0.0)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def _centred(rewards, group_size):
    """(rewards [N/G, G] with every non-finite one as NaN, each minus its group's mean over the finite)."""
    grouped = rewards.reshape(-1, group_size)
    grouped = jnp.where(jnp.isfinite(grouped), grouped, jnp.nan)  # an inf would make every mean inf
    return grouped, grouped - jnp.nanmean(grouped, axis=1, keepdims=True)


def _finite_or_zero(advantages):
    """0 where an advantage is NaN (an unscorable reward, or a group without one) or +-inf (overflow).
    Not `nan_to_num`, which would turn +-inf into +-3.4e38."""
    return jnp.where(jnp.isfinite(advantages), advantages, 0.0)


@register_advantage("group")
def group_scaled_advantages(rewards, group_size, eps):
    """(r - mean_G) / (std_G + eps), std unbiased over the G samples of a prompt.

    Visual-RFT (visual-rft.md §5.4 step 8) and TRL `scale_rewards="group"` (its `nanstd` applies
    Bessel's correction too). Non-finite rewards are left out of the statistics and get advantage 0.
    """
    grouped, centred = _centred(rewards, group_size)
    scaled = centred / (_nanstd(grouped, axis=1, keepdims=True) + eps)
    return _finite_or_zero(scaled.reshape(-1))


@register_advantage("batch")
def batch_scaled_advantages(rewards, group_size, eps):
    """(r - mean_G) / (std_batch + eps): the group baseline, one unbiased std over the whole batch
    (TRL `scale_rewards="batch"`, after "Tricks or Traps? A Deep Dive into RL for LLM Reasoning")."""
    grouped, centred = _centred(rewards, group_size)
    scaled = centred.reshape(-1) / (_nanstd(grouped) + eps)
    return _finite_or_zero(scaled)


@register_advantage("none")
def unscaled_advantages(rewards, group_size, eps):
    """r - mean_G, no division (Dr. GRPO, "Understanding R1-Zero-Like Training"; TRL `scale_rewards="none"`)."""
    del eps
    _, centred = _centred(rewards, group_size)
    return _finite_or_zero(centred.reshape(-1))


# ---------------------------------------------------------------------------------------------- KL


@register_kl("k1")
def kl_k1(logprobs, ref_logprobs):
    """log(pi / ref) = lp - ref: unbiased for KL(pi || ref) under samples of pi, high variance, can be < 0."""
    return logprobs - ref_logprobs


@register_kl("k2")
def kl_k2(logprobs, ref_logprobs):
    """(log(pi / ref))^2 / 2: biased, low variance, >= 0 (verl's "mse")."""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


@register_kl("k3")
def kl_k3(logprobs, ref_logprobs):
    """ref/pi - log(ref/pi) - 1, computed from d = ref - lp as exp(d) - d - 1: unbiased, >= 0, low variance
    (Schulman's k3). Visual-RFT's and TRL's `per_token_kl` exactly."""
    d = ref_logprobs - logprobs
    return jnp.exp(d) - d - 1


# ------------------------------------------------------------------------------------ completion masks


def completion_lengths(tokens_nl, lengths_n, group_size: int, config: GRPOConfig, eos_token_id: int):
    """int32[N]: how many leading tokens of each completion the update sees, by `config.completion_mask`.

    tokens_nl: int32[N, L] the rollout's completions, row b*G + g sample g of prompt b, padded after
      their stop; lengths_n: int32[N] tokens through the first stop id (L when none); eos_token_id: the
      tokenizer's EOS (Qwen2-VL-Instruct's <|im_end|>), read by "visual_rft" only.
    """
    if config.completion_mask == "first_stop":
        return jnp.asarray(lengths_n, jnp.int32)
    return visual_rft_lengths(tokens_nl, lengths_n, group_size, eos_token_id)


def visual_rft_lengths(tokens_nl, lengths_n, group_size: int, eos_token_id: int):
    """int32[N]: Visual-RFT's completion mask as lengths (its `Qwen2VLGRPOTrainer.compute_loss`).

    It masks after the first `processing_class.eos_token_id` (<|im_end|>, the tokenizer's EOS) only, while
    `generate` stops on either of the model's EOS ids (<|im_end|>, <|endoftext|>) and pads a stopped row
    with the pad id (<|endoftext|>) to the longest row of its call: one prompt's G samples (one prompt
    per device in every script). So a row that stopped on <|im_end|> keeps its tokens through it, and any
    other (stopped on <|endoftext|>, or cut at the limit) keeps every token up to its group's longest
    row, the <|endoftext|> padding included, which the loss, the KL and the attention then count. Our
    rollout pads with the same id, so the padding scored is the tokens Visual-RFT scored.
    """
    tokens = jnp.asarray(tokens_nl)
    lengths = jnp.asarray(lengths_n, jnp.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1] or lengths.shape[0] % group_size:
        raise ValueError(f"completions {tokens.shape} and lengths {lengths.shape} do not make groups of "
                         f"{group_size} rows")
    last = jnp.take_along_axis(tokens, jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)[:, None], axis=1)[:, 0]
    stopped_on_eos = (lengths > 0) & (last == eos_token_id)
    generated = jnp.repeat(jnp.max(lengths.reshape(-1, group_size), axis=1), group_size)
    return jnp.where(stopped_on_eos, lengths, generated)


# ---------------------------------------------------------------------------------------------- losses


# LossTerms fields that combine by max or min, not by sum (the others add): (combine, identity).
_EXTREMA = {"mismatch_gap_max": (jnp.maximum, 0.0), "is_ratio_min": (jnp.minimum, jnp.inf),
            "is_ratio_max": (jnp.maximum, 0.0)}


@flax.struct.dataclass
class LossTerms:
    """Additive pieces of a loss over some rows: every field is a float32 scalar sum but the extrema of
    `_EXTREMA`, which combine by max or min.

    loss_sum / loss_count is the loss; the metric sums divide by `tokens`, the mismatch ones by `sampled`.
    """

    loss_sum: jax.Array
    loss_count: jax.Array  # tokens, sequences or sequences x max length: never depends on the parameters
    tokens: jax.Array  # masked (real) completion tokens
    sequences: jax.Array  # rows with at least one real token
    kl_sum: jax.Array  # sum over tokens of the per-token KL estimate (0 when no reference is given)
    kl_sequence_sum: jax.Array  # sum over sequences of each one's token mean of the KL estimate
    clip_low_sum: jax.Array  # tokens whose ratio fell below 1 - epsilon with A < 0 (TRL's is_low_clipped)
    clip_high_sum: jax.Array  # tokens whose ratio rose above 1 + epsilon_high with A > 0
    # The sampler/trainer mismatch over the real tokens that carry the sampler's logprob (`sampled` of them), from
    # d = old - sampled: the scorer's logprob minus the sampler's, of the token the sampler drew.
    sampled: jax.Array
    mismatch_kl_sum: jax.Array  # sum of k3 = exp(d) - d - 1: an unbiased, >= 0 estimate of KL(sampler || scorer)
    mismatch_gap_sum: jax.Array  # sum of |d| (TRL's sampling/sampling_logp_difference)
    mismatch_gap_max: jax.Array  # max of |d|
    is_ratio_sum: jax.Array  # the importance weights of `importance_sampling` (1 when it is off)
    is_ratio_min: jax.Array
    is_ratio_max: jax.Array

    def __add__(self, other: LossTerms) -> LossTerms:
        return type(self)(**{f.name: _EXTREMA.get(f.name, (jnp.add,))[0](getattr(self, f.name), getattr(other, f.name))
                             for f in dataclasses.fields(self)})

    @classmethod
    def zeros(cls) -> LossTerms:
        """The identity of `+`: 0 for the sums, the neutral element of each extremum."""
        return cls(**{f.name: jnp.asarray(_EXTREMA.get(f.name, (None, 0.0))[1], jnp.float32)
                      for f in dataclasses.fields(cls)})

    @property
    def loss(self):
        return self.loss_sum / jnp.maximum(self.loss_count, 1.0)

    def metrics(self) -> dict[str, jax.Array]:
        """Token means of the KL and clip indicators (TRL 1.16's `global_masked_mean`, its logged `kl`), and
        `kl_sequence_mean`, the mean over sequences of each one's token-mean KL (Visual-RFT's logged `kl`:
        `((per_token_kl * mask).sum(1) / mask.sum(1)).mean()`), which weighs a short completion's tokens more.
        The sampler/trainer mismatch over the sampled tokens: `mismatch/kl` (the k3 estimate of KL(sampler ||
        scorer)), `mismatch/gap_mean` and `mismatch/gap_max` (TRL's `sampling/sampling_logp_difference/{mean,max}`)
        and the importance weights' `is_ratio/{min,mean,max}` (TRL's `sampling/importance_sampling_ratio/...`,
        1 when the correction is off); NaN when the batch carries no sampler logprobs."""
        tokens = jnp.maximum(self.tokens, 1.0)
        some = self.sampled > 0
        sampled = jnp.where(some, self.sampled, jnp.nan)
        return {"kl": self.kl_sum / tokens, "kl_sequence_mean": self.kl_sequence_sum / jnp.maximum(self.sequences, 1.0),
                "clip_low": self.clip_low_sum / tokens,
                "clip_high": self.clip_high_sum / tokens,
                "clip_region": (self.clip_low_sum + self.clip_high_sum) / tokens,
                "mismatch/kl": self.mismatch_kl_sum / sampled, "mismatch/gap_mean": self.mismatch_gap_sum / sampled,
                "mismatch/gap_max": jnp.where(some, self.mismatch_gap_max, jnp.nan),
                "is_ratio/min": jnp.where(some, self.is_ratio_min, jnp.nan),
                "is_ratio/mean": self.is_ratio_sum / sampled,
                "is_ratio/max": jnp.where(some, self.is_ratio_max, jnp.nan)}


class PerToken(NamedTuple):
    """float32[N, L] per-token pieces of a loss (`_per_token`)."""

    loss: jax.Array  # the policy term (importance-weighted) plus beta x KL
    kl: jax.Array  # the KL estimate to the reference (0 without one)
    low: jax.Array  # 1 where the ratio was clipped below with A < 0
    high: jax.Array  # 1 where it was clipped above with A > 0
    gap: jax.Array  # d = old - sampled (0 where the sampler's logprob is absent)
    sampled: jax.Array  # 1 where the sampler's logprob is present (finite)
    is_ratio: jax.Array  # the importance weight (1 where the correction is off or the logprob absent)

    @classmethod
    def zeros(cls, loss) -> PerToken:
        zero = jnp.zeros_like(loss)
        return cls(loss, zero, zero, zero, zero, zero, jnp.ones_like(loss))


def importance_weights(old_logprobs, sampled_logprobs, config: GRPOConfig):
    """(w, d, present), float32[N, L]: the truncated importance weight w = min(exp(d), cap) of each token under
    `config.importance_sampling` (1 when it is off), d = old - sampled (the scorer's logprob minus the sampler's)
    and 1.0 where the sampler's logprob is finite.

    Where the sampler gave no logprob (NaN: a token the update sees that the sampler did not draw, past its stop
    under `completion_mask="visual_rft"`) d = 0 and w = 1, as TRL does for vLLM's missing logprobs. No gradient
    flows through w: old is a constant of the update (the current logprobs, stopped, with one update per rollout).
    """
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    sampled = sampled_logprobs.astype(jnp.float32)
    present = jnp.isfinite(sampled)
    gap = jnp.where(present, old - jnp.where(present, sampled, 0.0), 0.0)
    if config.importance_sampling == "token_truncate":
        weight = jnp.minimum(jnp.exp(gap), config.importance_sampling_cap)
    else:
        weight = jnp.ones_like(gap)
    return weight, gap, present.astype(jnp.float32)


def _per_token(logprobs, old_logprobs, ref_logprobs, advantages_n, config: GRPOConfig, *, clip: bool,
               sampled_logprobs=None) -> PerToken:
    """The per-token pieces of a loss.

    The surrogate is TRL's token-level `-min(r A, clip(r, 1 - eps, 1 + eps_high) A)` with
    r = exp(lp - old); without `clip` it is `-r A` (r has value 1 when old = sg(lp)). With
    `importance_sampling` it is multiplied by the sampler/trainer weight (`importance_weights` of old against
    `sampled_logprobs`); then the KL term `beta KL_t` (times r with kl_bias_correction) is added, as TRL does.
    """
    logprobs = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(logprobs if old_logprobs is None else old_logprobs.astype(jnp.float32))
    advantage = advantages_n.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logprobs - old)
    if clip:
        clipped = jnp.clip(ratio, 1 - config.epsilon, 1 + config.upper_epsilon)
        unclipped = ratio if config.delta is None else jnp.minimum(ratio, config.delta)
        loss = -jnp.minimum(unclipped * advantage, clipped * advantage)
    else:
        loss = -ratio * advantage
    low = (ratio < 1 - config.epsilon) & (advantage < 0)
    high = (ratio > 1 + config.upper_epsilon) & (advantage > 0)
    if sampled_logprobs is None:
        if config.importance_sampling:
            raise ValueError(f"GRPOConfig.importance_sampling={config.importance_sampling!r} needs the sampler's "
                             "logprobs (TrainBatch.sampled_logprobs), got None")
        weight, gap, present = jnp.ones_like(loss), jnp.zeros_like(loss), jnp.zeros_like(loss)
    else:
        weight, gap, present = importance_weights(old, sampled_logprobs, config)
    if config.importance_sampling:
        loss = loss * weight
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS[config.kl](logprobs, ref_logprobs.astype(jnp.float32))
        if config.kl_bias_correction:
            kl = kl * ratio
    else:
        if config.beta:
            raise ValueError(f"GRPOConfig.beta={config.beta} needs reference logprobs, got None")
        kl = jnp.zeros_like(logprobs)
    if config.beta:
        loss = loss + config.beta * kl
    return PerToken(loss, kl, low.astype(jnp.float32), high.astype(jnp.float32), gap, present, weight)


def _terms(loss_sum, loss_count, mask, t: PerToken) -> LossTerms:
    sampled = mask * t.sampled
    seen = sampled > 0
    gap = jax.lax.stop_gradient(t.gap)
    return LossTerms(loss_sum=loss_sum, loss_count=jnp.asarray(loss_count, jnp.float32), tokens=jnp.sum(mask),
                     sequences=_sequences(mask), kl_sum=jnp.sum(t.kl * mask),
                     kl_sequence_sum=_sequence_mean_sum(t.kl, mask),
                     clip_low_sum=jnp.sum(t.low * mask), clip_high_sum=jnp.sum(t.high * mask),
                     sampled=jnp.sum(sampled), mismatch_kl_sum=jnp.sum(KL_ESTIMATORS["k3"](-gap, 0.0) * sampled),
                     mismatch_gap_sum=jnp.sum(jnp.abs(gap) * sampled),
                     mismatch_gap_max=jnp.max(jnp.where(seen, jnp.abs(gap), 0.0)),
                     is_ratio_sum=jnp.sum(t.is_ratio * sampled),
                     is_ratio_min=jnp.min(jnp.where(seen, t.is_ratio, jnp.inf)),
                     is_ratio_max=jnp.max(jnp.where(seen, t.is_ratio, 0.0)))


def _sequence_mean_sum(per_token, mask):
    """Sum over rows of each row's token mean; an empty row adds 0."""
    return jnp.sum(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))


def _sequences(mask):
    return jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)


@register_loss("paper")
def paper_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """Visual-RFT's loss (visual-rft.md §5.4 step 9; TRL 0.14 `compute_loss`):

        l_t = -( exp(lp_t - sg(lp_t)) A - beta KL_t ),   KL_t = k3 by default
        L   = mean over sequences of ( sum_t m_t l_t / sum_t m_t )

    One update per rollout: `old_logprobs` is ignored and the ratio is exp(lp - sg(lp)), value 1,
    gradient A grad(lp). Equals TRL 1.16 `loss_type="grpo"` with `num_iterations=1` and
    `use_bias_correction_kl=False`.
    Terms: loss_sum = sum over sequences of their token mean; loss_count = sequences.
    """
    del old_logprobs
    mask = mask.astype(jnp.float32)
    t = _per_token(logprobs, None, ref_logprobs, advantages_n, config, clip=False, sampled_logprobs=sampled_logprobs)
    return _terms(_sequence_mean_sum(t.loss, mask), _sequences(mask), mask, t)


@register_loss("grpo")
def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """TRL 1.16 `loss_type="grpo"`: the clipped surrogate, sequence token-mean, then batch mean.

        r_t = exp(lp_t - old_t)        (old = sg(lp) when old_logprobs is None: num_iterations = 1)
        l_t = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t
        L   = mean over sequences of ( sum_t m_t l_t / sum_t m_t )

    TRL: `((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()`. Its mean counts
    every row; ours counts rows holding a token, so static-shape padding rows change nothing
    (a sampled completion always holds at least one token, so real batches agree).
    """
    mask = mask.astype(jnp.float32)
    t = _per_token(logprobs, old_logprobs, ref_logprobs, advantages_n, config, clip=True,
                   sampled_logprobs=sampled_logprobs)
    return _terms(_sequence_mean_sum(t.loss, mask), _sequences(mask), mask, t)


@register_loss("bnpo")
def bnpo_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """TRL 1.16 `loss_type="bnpo"`: the clipped surrogate (as grpo), averaged over the batch's tokens.

        L = sum_{i,t} m_it l_it / sum_{i,t} m_it

    TRL normalises by the tokens of each local micro-batch (`mask.sum()`), so its value depends on
    how the batch is split over devices and accumulation steps; ours divides by the tokens of the
    whole batch. With one process and one micro-batch the two agree (and bnpo equals dapo).
    """
    mask = mask.astype(jnp.float32)
    t = _per_token(logprobs, old_logprobs, ref_logprobs, advantages_n, config, clip=True,
                   sampled_logprobs=sampled_logprobs)
    return _terms(jnp.sum(t.loss * mask), jnp.sum(mask), mask, t)


@register_loss("dr_grpo")
def dr_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """TRL 1.16 `loss_type="dr_grpo"` (Dr. GRPO): the clipped surrogate over a constant normaliser.

        L = sum_{i,t} m_it l_it / (sequences x max_completion_length)

    TRL: `(per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)`.
    The normaliser is free of the completions' lengths, which removes GRPO's length bias.
    """
    mask = mask.astype(jnp.float32)
    t = _per_token(logprobs, old_logprobs, ref_logprobs, advantages_n, config, clip=True,
                   sampled_logprobs=sampled_logprobs)
    length = config.max_completion_length or mask.shape[1]
    return _terms(jnp.sum(t.loss * mask), _sequences(mask) * length, mask, t)


@register_loss("dapo")
def dapo_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """TRL 1.16 `loss_type="dapo"` (its default; DAPO's token-level loss): the clipped surrogate over
    the tokens of the whole generation batch.

        L = sum_{i,t} m_it l_it / sum over all devices and micro-batches of m_it

    TRL: `(per_token_loss * mask).sum() / num_items_in_batch`, the global token count. Use it with
    `epsilon_high` (DAPO's clip-higher, e.g. 0.28).
    """
    mask = mask.astype(jnp.float32)
    t = _per_token(logprobs, old_logprobs, ref_logprobs, advantages_n, config, clip=True,
                   sampled_logprobs=sampled_logprobs)
    return _terms(jnp.sum(t.loss * mask), jnp.sum(mask), mask, t)


@register_loss("sft")
def sft_loss(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """Supervised fine-tuning's token-level cross-entropy of the completions (the solutions, `vrft_jax.sft`):
    loss_sum = -sum m lp, loss_count = tokens. Advantages, old and reference logprobs are ignored."""
    del old_logprobs, ref_logprobs, advantages_n, config, sampled_logprobs
    mask = mask.astype(jnp.float32)
    return _terms(-jnp.sum(logprobs.astype(jnp.float32) * mask), jnp.sum(mask), mask, PerToken.zeros(mask))


def loss_count(mask, config: GRPOConfig):
    """The normaliser `config.loss` divides its sum by for a batch of [N, L] `mask` (tokens, sequences, or sequences
    x max length): a function of the mask alone, read before the logprobs exist."""
    zeros = jnp.zeros(mask.shape, jnp.float32)
    plain = dataclasses.replace(config, beta=0.0, importance_sampling=None)
    return LOSSES[config.loss](zeros, None, None, zeros[:, 0], mask, plain).loss_count


def loss_terms(logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config: GRPOConfig,
              sampled_logprobs=None) -> LossTerms:
    """`config.loss`'s terms for float32[N, L] logprobs (old and ref may be None), float32[N]
    advantages and an [N, L] mask of the real completion tokens; `sampled_logprobs` float[N, L], the sampler's
    logprobs of the same tokens (NaN where it drew none), give the mismatch metrics and the importance weights."""
    if logprobs.shape != mask.shape or advantages_n.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs {logprobs.shape}, mask {mask.shape} and advantages {advantages_n.shape} "
                         "must be [N, L], [N, L] and [N]")
    return LOSSES[config.loss](logprobs, old_logprobs, ref_logprobs, advantages_n, mask, config,
                               sampled_logprobs=sampled_logprobs)
