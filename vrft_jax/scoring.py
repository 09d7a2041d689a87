"""Log-probabilities of sampled completions under a model: the policy's (with gradient) and the
frozen reference's, by one function.

Each prompt runs once ([B] rows): the vision tower, the embedding and the decoder, whose keys and
values each layer emits as a scan output (never a carried cache, which the gradient would save once
per layer: memory quadratic in depth). The prompt's G completions share them without copying
(`SharedPrefix`), and only the completions' L tokens run through the decoder ([B*G] rows), attending
to them. Teacher forcing this way is the same computation as a full
forward over prompt + completion, with the prompt's share done once instead of G times (the
gradient sums the G completions' contributions into the shared keys and values).

Only the L positions that predict completion tokens go through the LM head, by `vrft_jax.lm_head`:
a chunk of positions and a block of the vocabulary at a time, with an online logsumexp and a
hand-written backward pass, so neither the `[B*G, T, V]` logits of a full forward (V = 151,657 for
Qwen2-VL) nor a chunk's `[B*G, chunk, V]` ever exist.

`make_score_fn` jits this scoring for a whole `CompletionBatch`: the reference model's logprobs for
the KL term, and the old policy's when one rollout feeds several updates (the update itself scores
with `score_completions` too, under the same `ScoringConfig`, so the three agree exactly).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vrft_jax import sharding
from vrft_jax.lm_head import token_logprobs
from vrft_jax.models.qwen2_vl.inputs import ModelInputs
from vrft_jax.models.qwen2_vl.layers import precision
from vrft_jax.models.qwen2_vl.model import Qwen2VL
from vrft_jax.padding import LeftPaddedBatch, check_left_padded
from vrft_jax.placement import jit_on_mesh, merge_micro_batches, split_micro_batches, tree_shardings


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """How completion tokens are scored, by the update and by the reference / old-policy scorer alike.

    temperature:  logits are divided by it before the log-softmax (TRL's); the sampler's, set once by the recipe
    chunk_size, vocab_block: the LM head's float32 logits exist [rows, chunk_size, vocab_block] at a time
                  (`vrft_jax.lm_head`): completion positions per chunk, vocabulary rows per block
    """

    temperature: float = 1.0
    chunk_size: int = 32
    vocab_block: int = 4096

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"ScoringConfig.temperature={self.temperature} must be > 0")
        for name in ("chunk_size", "vocab_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScoringConfig.{name}={getattr(self, name)} must be >= 1")

    def replace(self, **changes) -> ScoringConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class CompletionBatch:
    """What a scorer reads: B left-padded prompts and G completions of each (row b*G + g is sample g of prompt b).

    inputs:          the prompts with their images, [B, ...] (the rollout's ModelInputs)
    completions:     int32[B*G, L] sampled tokens, padding after the first EOS
    completion_mask: int32[B*G, L] 1 through the first EOS (included), 0 after
    image_features:  [B, P / merge^2, D] the prompts' vision features when already computed (a frozen tower's,
                     from the rollout); None runs the tower
    """

    inputs: ModelInputs
    completions: jax.Array
    completion_mask: jax.Array
    image_features: jax.Array | None = None


@flax.struct.dataclass
class TokenScores:
    """logprobs: float32[B*G, L] log softmax(logits / temperature) at each completion token
    (computed at padding too; mask them). entropy: float32[B*G, L] entropy of that distribution
    (no gradient), or None when not asked for."""

    logprobs: jax.Array
    entropy: jax.Array | None = None


def score_completions(model: Qwen2VL, inputs: ModelInputs, completions_nl, completion_mask_nl, *,
                      temperature: float = 1.0, chunk_size: int = 32, vocab_block: int = 4096,
                      with_entropy: bool | jax.Array = False, image_features=None,
                      entropy_grad: bool = False) -> TokenScores:
    """Teacher-force B*G completions after their B prompts and score every completion token.

    Args:
      inputs: the prompts, [B, T] tokens with their images (the rollout's `ModelInputs`), left-padded
        as the sampler requires: slot T - 1 must be each prompt's last token. A concrete batch whose
        prompt ends in padding raises `InputError` naming the rows; under a trace the mask cannot be
        read, so whoever jits this checks the concrete batch first (`padding.check_left_padded`, as
        `train_step.make_train_step` and `make_score_fn` do).
      completions_nl: int32[B*G, L], row b*G + g a completion of prompt b.
      completion_mask_nl: [B*G, L], 1 for real tokens (through the first EOS), 0 for padding; padding
        is invisible to the real tokens, as in HF with TRL's attention mask.
      temperature: logits are divided by it before the softmax (TRL's `temperature`).
      chunk_size, vocab_block: the LM head's float32 logits exist `[B*G, chunk_size, vocab_block]` at a time.
      with_entropy: also each token's entropy: a Python bool, or a bool scalar array deciding at run time
        (`lm_head.token_logprobs`: zeros when false).
      image_features: the prompts' `model.image_features(inputs)` when already computed (the rollout's,
        `Rollout.image_features`): the vision tower does not run again. Only for a frozen tower: features
        given as an input carry no gradient to it.
      entropy_grad: the entropy carries its gradient (an entropy bonus in the loss); needs with_entropy=True.
    """
    batch = inputs.input_ids.shape[0]
    rows, length = completions_nl.shape
    if rows % batch or completion_mask_nl.shape != completions_nl.shape:
        raise ValueError(f"completions {completions_nl.shape} and mask {completion_mask_nl.shape} must be "
                         f"[B*G, L] for B={batch} prompts")
    group = rows // batch
    if not isinstance(inputs.attention_mask, jax.core.Tracer):
        check_left_padded(inputs, "scoring")

    def repeat(x, axis=0):
        return jnp.repeat(x, group, axis=axis)

    # Prompts: the vision tower, the embedding and the decoder run once per prompt, into a KV cache that
    # the G completions of the prompt share without copying it (causal attention: the prompt never
    # sees its completions), exactly as the sampler decodes them.
    # Each layer's keys and values are the scan's outputs, not a carried cache: under the gradient a carried
    # [layers, ...] cache would be saved at every layer (memory quadratic in depth; `TextDecoder`).
    features = model.image_features(inputs) if image_features is None else image_features
    prompt_x = model.embed(inputs.input_ids, features)
    prompt_hidden, prefix = model.text(prompt_x, inputs.positions, inputs.attention_mask, keep_kv=True,
                                       deepstack=model.deepstack(inputs.input_ids, features))
    # Completions, embedded as plain text: token k sits in slot T + k at M-RoPE position
    # (valid prompt tokens + k + rope delta) on all three axes, as HF's rope index puts it.
    start = jnp.sum(inputs.attention_mask, axis=1) + inputs.rope_deltas
    positions = repeat(start)[:, None] + jnp.arange(length)[None, :]
    positions = jnp.broadcast_to(positions[..., None], (rows, length, 3)).astype(inputs.positions.dtype)
    completion_x = model.text.embed(completions_nl).astype(prompt_x.dtype)
    completion_hidden, _ = model.text(completion_x, positions, completion_mask_nl.astype(inputs.attention_mask.dtype),
                                      prefix=prefix)
    # Completion token 0 is predicted by the last prompt slot (prompts are left-padded), token k by token k - 1.
    hidden = jnp.concatenate([repeat(prompt_hidden[:, -1:]), completion_hidden[:, :-1]], axis=1)
    return chunked_token_logprobs(model, hidden, completions_nl, temperature=temperature, chunk_size=chunk_size,
                                  vocab_block=vocab_block, with_entropy=with_entropy, entropy_grad=entropy_grad)


def chunked_token_logprobs(model: Qwen2VL, hidden_nld, targets_nl, *, temperature: float = 1.0,
                           chunk_size: int = 32, vocab_block: int = 4096,
                           with_entropy: bool | jax.Array = False, entropy_grad: bool = False) -> TokenScores:
    """log softmax(hidden @ head / temperature)[target] for float[N, L, D] final-norm hidden states,
    by `lm_head.token_logprobs`: `chunk_size` positions and `vocab_block` vocabulary rows of float32
    logits at a time, an online logsumexp over the blocks, and a hand-written backward pass."""
    text = model.text
    head = text.embed_tokens[...] if text.lm_head is None else text.lm_head[...].T  # [V, D]
    logprobs, entropy = token_logprobs(hidden_nld, head, targets_nl, temperature=temperature, chunk_size=chunk_size,
                                       vocab_block=vocab_block, with_entropy=with_entropy, dtype=model.config.dtype,
                                       precision=precision(model.config), entropy_grad=entropy_grad)
    return TokenScores(logprobs=logprobs, entropy=entropy)


def make_score_fn(graphdef, params: nnx.State, config: ScoringConfig, *, micro_batches: int = 1, mesh=None,
                  rules=sharding.DEFAULT_RULES):
    """The jitted `(params, CompletionBatch) -> float32[B*G, L]` completion logprobs under `params`: the
    reference's (frozen initial parameters) or the old policy's, with the update's exact scoring
    (`config`, image features once per prompt, or the batch's own `image_features` when it carries them),
    `micro_batches` groups of whole prompts one after another. `params` (concrete or abstract) fixes the
    parameter layout on a mesh. Each call first checks on the host that the batch's prompts are
    left-padded, as the update does."""

    def score(params, batch: CompletionBatch):
        model = nnx.merge(graphdef, params)
        prompts = batch.inputs.input_ids.shape[0]
        micro = split_micro_batches(batch, prompts, micro_batches, mesh, rules)

        def one(part: CompletionBatch):
            return score_completions(model, part.inputs, part.completions, part.completion_mask,
                                     temperature=config.temperature, chunk_size=config.chunk_size,
                                     vocab_block=config.vocab_block, image_features=part.image_features).logprobs

        return merge_micro_batches(jax.lax.map(one, micro), prompts)

    shardings = {}
    if mesh is not None:  # the batch sharding is a prefix: every batch leaf on its axis 0
        batch_layout = sharding.batch_sharding(mesh, 1, rules=rules)
        shardings = dict(in_shardings=(tree_shardings(params, mesh, rules), batch_layout),
                         out_shardings=sharding.batch_sharding(mesh, 2, rules=rules))
    return LeftPaddedBatch(jit_on_mesh(score, mesh, rules, **shardings), "scoring")
