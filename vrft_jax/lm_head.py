"""log softmax(hidden @ head / T)[target] over a large vocabulary, without ever holding the logits.

Qwen2-VL's head has V = 151,657 rows (151,936 in the released checkpoints). A GRPO batch scores
B*G*L completion tokens: 64 x 128 = 8,192 tokens make 5 GB of float32 logits, and a log-softmax
over them is memory-bound, not compute-bound: on the project's CPU the logsumexp passes over those
logits took longer than the matmul that made them (6.6 s against ~3.4 s, forward only).

So the vocabulary is walked in blocks, as flash attention walks keys. For a chunk of positions a
`lax.scan` over vocabulary blocks computes one block's logits `[N, c, vb]` (small enough to stay in
cache), folds it into a running max and sum of exponentials (online logsumexp), and drops it. The
entropy, when asked, is a second pass of the same blocks given log Z, so the logprobs never depend on
it. The target token's logit is a dot product with its own row of the head (a gather), not a select
over the vocabulary. Forward: one matmul and one exp per
logit; 2.5x faster than the materialised log-softmax on the project's CPU.

The backward pass is written by hand (`jax.custom_vjp`). Autodiff of the scan would store every
block's logits or, rematerialised, recompute the logsumexp. Here the forward saves only the
per-token logsumexp, and the backward recomputes each block's logits once, turns them into
probabilities p = exp(z - logsumexp), and applies d logprob / d z = onehot(target) - p:

    d hidden = g/T * (head[target] - sum_v p_v head[v])
    d head   = scatter_add(target, g/T * hidden) - sum_tokens (g/T * p)^T hidden

with the onehot part again a gather (and a scatter-add), never a vocabulary-sized select. The entropy
H = log Z - sum_v p_v z_v carries no gradient (a metric), unless `entropy_grad` (an entropy bonus in the
loss): then its cotangent h adds, per logit, dH/dz_v = p_v (log Z - z_v - H) (z the logits / T), in the same
pass over the blocks, with H kept from the forward:

    d z_v = (1/T) p_v (-g + h (log Z - z_v - H))  (+ g/T at the target)

Blocks are strided, block j holding rows j, j + nb, j + 2nb, ... of the head: when the head's
vocabulary axis is split over devices ("vocab" -> "tensor"), the split stays on the rows within
each block and the scan walks an unsplit axis; the logsumexp does not care about the order.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vrft_jax.sharding import constrain


def token_logprobs(hidden_nld, head_vd, targets_nl, *, temperature: float = 1.0, chunk_size: int = 32,
                   vocab_block: int = 4096, with_entropy: bool | jax.Array = False, dtype=None, precision=None,
                   entropy_grad: bool = False):
    """(logprobs float32[N, L], entropy float32[N, L] or None) of `targets` under `hidden @ head.T / T`.

    Args:
      hidden_nld: [N, L, D] final-norm hidden states.
      head_vd: [V, D] the LM head (or the tied embedding), vocabulary-major.
      targets_nl: int[N, L] token ids in [0, V).
      temperature: logits are divided by it before the softmax.
      chunk_size: positions per chunk: `N x chunk_size` tokens go through the head at a time.
      vocab_block: vocabulary rows per block: `[N, chunk_size, vocab_block]` float32 logits exist at once.
      with_entropy: False: no entropy (None); True: the entropy too (a second pass over the logits: one
        more matmul and exp per logit); a bool scalar array: one program that computes it only when the
        value is true at run time (a `lax.cond` per chunk: a second pass over the logits), zeros otherwise,
        with the logprobs the same bit for bit either way: the update measures entropy at logged steps only,
        without a second compilation and without changing the update.
      dtype: the matmuls' input dtype (the model's compute dtype; None keeps the inputs'); they accumulate
        in float32, and the softmax is float32.
      precision: `jax.lax.Precision` of the matmuls.
      entropy_grad: the entropy carries its gradient (an entropy bonus); needs `with_entropy=True`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size < 1 or vocab_block < 1:
        raise ValueError(f"chunk_size={chunk_size} and vocab_block={vocab_block} must be >= 1")
    dynamic = isinstance(with_entropy, jax.Array)
    if dynamic and (with_entropy.shape != () or with_entropy.dtype != jnp.bool_):
        raise ValueError(f"with_entropy must be a Python bool or a bool scalar, got {with_entropy.dtype}"
                         f"{list(with_entropy.shape)}")
    wanted = True if dynamic else bool(with_entropy)
    if entropy_grad and (dynamic or not wanted):
        raise ValueError("entropy_grad needs with_entropy=True (a Python bool: the entropy of every call)")
    settings = _Settings(float(temperature), int(chunk_size), int(vocab_block), wanted,
                         None if dtype is None else jnp.dtype(dtype), precision, bool(entropy_grad))
    measure = with_entropy if dynamic else None
    logprobs, entropy = _token_logprobs(settings, hidden_nld, head_vd, targets_nl, measure)
    return logprobs, (entropy if wanted else None)


class _Settings(NamedTuple):
    """The custom VJP's static (hashable) settings."""

    temperature: float
    chunk_size: int
    vocab_block: int
    with_entropy: bool  # the program can compute the entropy (whether it does is the `measure` input)
    dtype: Any
    precision: Any
    entropy_grad: bool = False  # the entropy's cotangent flows back (an entropy bonus)


# ------------------------------------------------------------------------------------------ layouts


def _chunked(settings, x_nl):
    """[N, L, ...] -> [C, N, c, ...]: the positions padded to whole chunks of `chunk_size`."""
    rows, length = x_nl.shape[:2]
    chunk = min(settings.chunk_size, length)
    count = -(-length // chunk)
    pad = [(0, 0), (0, count * chunk - length)] + [(0, 0)] * (x_nl.ndim - 2)
    return jnp.pad(x_nl, pad).reshape(rows, count, chunk, *x_nl.shape[2:]).swapaxes(0, 1)


def _unchunk(x_cnc, length):
    count, rows, chunk = x_cnc.shape[:3]
    return x_cnc.swapaxes(0, 1).reshape(rows, count * chunk, *x_cnc.shape[3:])[:, :length]


def _blocks(settings, head_vd):
    """[nb, vb, D] strided blocks of the head (block j holds rows j, j + nb, ...) and the [nb, vb]
    additive mask that removes the padding rows (-inf) from the softmax."""
    vocab = head_vd.shape[0]
    block = min(settings.vocab_block, vocab)
    count = -(-vocab // block)
    padded = jnp.pad(head_vd, ((0, count * block - vocab), (0, 0)))
    blocks = padded.reshape(block, count, -1).swapaxes(0, 1)
    row = jnp.arange(block)[None, :] * count + jnp.arange(count)[:, None]
    return blocks, jnp.where(row < vocab, 0.0, -jnp.inf).astype(jnp.float32)


def _unblock(blocks_bvd, vocab):
    count, block = blocks_bvd.shape[:2]
    return blocks_bvd.swapaxes(0, 1).reshape(count * block, -1)[:vocab]


def _cast(settings, x):
    return x if settings.dtype is None else x.astype(settings.dtype)


def _logits(settings, hidden_ncd, block_vd, mask_v):
    """float32 [N, c, vb] logits / T of one vocabulary block, the padding rows at -inf (inputs already
    in the compute dtype: the forward and the backward cast once, not per block)."""
    logits = jnp.einsum("NCD,VD->NCV", hidden_ncd, block_vd, preferred_element_type=jnp.float32,
                        precision=settings.precision)
    return constrain(logits / settings.temperature + mask_v, ("batch", "length", "act_vocab"))


def _target_logits(settings, hidden, head_vd, targets):
    """float32 logits / T of the target tokens: each position's dot product with its target's head row."""
    rows = jnp.take(head_vd, targets, axis=0)
    return jnp.einsum("...D,...D->...", hidden, rows, preferred_element_type=jnp.float32,
                      precision=settings.precision) / settings.temperature


# ------------------------------------------------------------------------------------------ forward


def _log_normaliser(settings, hidden_ncd, blocks, mask):
    """Online logsumexp over the vocabulary blocks: log Z [N, c], from the running max m and
    s = sum exp(z - m): log Z = m + log s."""
    shape = hidden_ncd.shape[:2]

    def fold(carry, block):
        top, total = carry
        logits = _logits(settings, hidden_ncd, *block)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[..., None]), axis=-1)
        return (new_top, total), None

    start = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))
    # The first block's max is finite (it holds real rows), so exp(-inf - m) = 0 makes the start inert.
    (top, total), _ = jax.lax.scan(fold, start, (blocks, mask))
    return top + jnp.log(total)


def _entropy(settings, hidden_ncd, blocks, mask, log_z):
    """H = sum_v p_v (log Z - z_v) over the vocabulary blocks given log Z [N, c]: a second pass over the logits,
    every term non-negative (no cancellation)."""

    def fold(total, block):
        logits = _logits(settings, hidden_ncd, *block)
        surprise = log_z[..., None] - logits
        p = jnp.exp(-surprise)
        return total + jnp.sum(jnp.where(p > 0, p * surprise, 0.0), axis=-1), None

    entropy, _ = jax.lax.scan(fold, jnp.zeros(hidden_ncd.shape[:2], jnp.float32), (blocks, mask))
    return entropy


def _forward(settings, hidden_nld, head_vd, targets_nl, measure):
    head_vd = _cast(settings, head_vd)
    hidden, targets = _chunked(settings, _cast(settings, hidden_nld)), _chunked(settings, targets_nl)
    blocks, mask = _blocks(settings, head_vd)

    def normaliser(hidden_ncd):
        # log Z by one pass whether or not the entropy is measured, so the logprobs and the update are the same
        # bit for bit either way (a fused pass that also summed the entropy could round log Z otherwise); the
        # entropy, when asked (at trace time, or at run time by `measure`), by a second pass over the logits.
        log_z = _log_normaliser(settings, hidden_ncd, blocks, mask)
        if not settings.with_entropy:
            return log_z, None
        if measure is None:
            return log_z, _entropy(settings, hidden_ncd, blocks, mask, log_z)
        return log_z, jax.lax.cond(measure, lambda h: _entropy(settings, h, blocks, mask, log_z),
                                   lambda h: jnp.zeros_like(log_z), hidden_ncd)

    def one_chunk(chunk):
        hidden_ncd, targets_nc = chunk
        log_z, entropy = normaliser(hidden_ncd)
        logprobs = _target_logits(settings, hidden_ncd, head_vd, targets_nc) - log_z
        return logprobs, log_z, (log_z if entropy is None else entropy)

    logprobs, log_z, entropy = jax.lax.map(one_chunk, (hidden, targets))
    length = hidden_nld.shape[1]
    return _unchunk(logprobs, length), _unchunk(log_z, length), _unchunk(entropy, length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_logprobs(settings, hidden_nld, head_vd, targets_nl, measure):
    logprobs, _, entropy = _forward(settings, hidden_nld, head_vd, targets_nl, measure)
    return logprobs, (entropy if settings.entropy_grad else jax.lax.stop_gradient(entropy))


def _token_logprobs_fwd(settings, hidden_nld, head_vd, targets_nl, measure):
    logprobs, log_z, entropy = _forward(settings, hidden_nld, head_vd, targets_nl, measure)
    kept = entropy if settings.entropy_grad else None
    return (logprobs, entropy), (hidden_nld, head_vd, targets_nl, log_z, kept)


# ------------------------------------------------------------------------------------------ backward


def _token_logprobs_bwd(settings, residuals, cotangents):
    hidden_nld, head_vd, targets_nl, log_z_nl, entropy_nl = residuals
    scale_nl = cotangents[0].astype(jnp.float32) / settings.temperature  # g / T
    compute_hidden, compute_head = _cast(settings, hidden_nld), _cast(settings, head_vd)
    if settings.entropy_grad:  # h / T, and log Z - H: d z_v = p_v (-g/T + h/T (log Z - H - z_v))
        entropy_scale_nl = cotangents[1].astype(jnp.float32) / settings.temperature
        shift_nl = log_z_nl - entropy_nl
    else:  # the entropy has no gradient: no second cotangent to carry
        entropy_scale_nl = shift_nl = jnp.zeros((), jnp.float32)
    chunked = [_chunked(settings, x) for x in (compute_hidden, scale_nl, log_z_nl)]
    if settings.entropy_grad:
        chunked += [_chunked(settings, x) for x in (entropy_scale_nl, shift_nl)]
    blocks, mask = _blocks(settings, compute_head)

    def one_chunk(d_blocks, chunk):
        hidden_ncd, scale_nc, log_z_nc = chunk[:3]

        def one_block(d_hidden, block):
            block_vd, mask_v, d_block_dv = block
            logits = _logits(settings, hidden_ncd, block_vd, mask_v)
            p = jnp.exp(logits - log_z_nc[..., None])
            # -(g/T) p for every token and vocabulary row of the block: the softmax part of d logprob / d z.
            d_logits = -scale_nc[..., None] * p
            if settings.entropy_grad:
                entropy_scale_nc, shift_nc = chunk[3:]
                # (h/T) p (log Z - H - z), 0 on the padding rows (p = 0 where z = -inf: no inf x 0).
                d_logits += jnp.where(p > 0, entropy_scale_nc[..., None] * p * (shift_nc[..., None] - logits), 0.0)
            d_logits = _cast(settings, d_logits)
            d_hidden += jnp.einsum("NCV,VD->NCD", d_logits, block_vd,
                                   preferred_element_type=jnp.float32, precision=settings.precision)
            # [D, vb], not [vb, D]: the matmul then transposes the chunk's small hidden states, not the
            # block's large d_logits (a copy that cost as much as the matmuls on the CPU).
            d_block_dv += jnp.einsum("NCD,NCV->DV", hidden_ncd, d_logits, preferred_element_type=jnp.float32,
                                     precision=settings.precision)
            return d_hidden, d_block_dv

        d_hidden, d_blocks = jax.lax.scan(one_block, jnp.zeros(hidden_ncd.shape, jnp.float32),
                                          (blocks, mask, d_blocks))
        return d_blocks, d_hidden

    count, block, width = blocks.shape
    d_blocks, d_hidden = jax.lax.scan(one_chunk, jnp.zeros((count, width, block), jnp.float32), tuple(chunked))
    d_hidden = _unchunk(d_hidden, hidden_nld.shape[1])
    # The onehot part, (g/T) at each target: a gather into d hidden, a scatter-add into d head, both of
    # the compute-dtype values the forward multiplied.
    target_rows = jnp.take(compute_head, targets_nl, axis=0).astype(jnp.float32)
    d_hidden = d_hidden + scale_nl[..., None] * target_rows
    d_head = _unblock(d_blocks.swapaxes(1, 2), head_vd.shape[0]).at[targets_nl.reshape(-1)].add(
        (scale_nl[..., None] * compute_hidden.astype(jnp.float32)).reshape(-1, hidden_nld.shape[-1]))
    return d_hidden.astype(hidden_nld.dtype), d_head.astype(head_vd.dtype), None, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)
