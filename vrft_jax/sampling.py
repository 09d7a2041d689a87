"""Decoding from the KV cache: jitted prefill and one-token decode steps.

`greedy_generate` drives them from a plain host loop; it is the reference the group sampler is
checked against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrft_jax.models.qwen2_vl.inputs import InputError, ModelInputs
from vrft_jax.models.qwen2_vl.model import Qwen2VL
from vrft_jax.models.qwen2_vl.text import KVCache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill(graphdef, state, inputs: ModelInputs, cache: KVCache):
    return nnx.merge(graphdef, state).prefill(inputs, cache)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode(graphdef, state, tokens_b, positions_b3, cache: KVCache):
    return nnx.merge(graphdef, state).decode(tokens_b, positions_b3, cache)


def greedy_generate(model: Qwen2VL, inputs: ModelInputs, max_new_tokens: int, *,
                    eos_token_ids=None, pad_token_id: int = 0) -> np.ndarray:
    """int32[B, <= max_new_tokens] greedy continuations of left-padded prompts, as HF
    `generate(do_sample=False)`: after a row's EOS it emits `pad_token_id`; stops when every row is done."""
    if not np.all(np.asarray(inputs.attention_mask)[:, -1]):
        raise InputError("generation needs left-padded prompts: some rows end in padding")
    eos = np.asarray(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids, np.int32)
    graphdef, state = nnx.split(model)
    batch, length = inputs.input_ids.shape
    cache = KVCache.zeros(model.config, batch, length + max_new_tokens)
    logits, cache = _prefill(graphdef, state, inputs, cache)
    # The n-th generated token of a row (0-based) continues M-RoPE at (prompt tokens + n + rope delta).
    next_position = np.asarray(inputs.attention_mask).sum(axis=1) + np.asarray(inputs.rope_deltas)
    done = np.zeros(batch, bool)
    out = []
    for step in range(max_new_tokens):
        token = np.where(done, pad_token_id, np.asarray(jnp.argmax(logits, axis=-1))).astype(np.int32)
        out.append(token)
        done |= np.isin(token, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        positions = np.repeat((next_position + step)[:, None], 3, axis=1).astype(np.int32)
        logits, cache = _decode(graphdef, state, token, positions, cache)
    return np.stack(out, axis=1)
