"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names (`sharding=(...)`); `vrft_jax.sharding` maps them to
mesh axes. Parameters are stored in `config.param_dtype` and cast to `config.dtype` where used.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig

_INIT_STD = 0.02  # HF's initializer_range
INITIALIZERS = ("normal", "ones", "zeros")  # the names `param(init=...)` accepts


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], config: Qwen2VLConfig,
          init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; sharding is applied by the caller's rules, never eagerly.

    init: "normal" (N(0, 0.02^2), as HF), "ones" or "zeros"; any other name is a ValueError.
    """
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), tuple(shape), config.param_dtype)
    elif init == "ones":
        value = jnp.ones(shape, config.param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, config.param_dtype)
    else:
        raise ValueError(f"unknown initializer {init!r} for a parameter of shape {tuple(shape)}; "
                         f"known: {', '.join(map(repr, INITIALIZERS))}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def precision(config: Qwen2VLConfig):
    return None if config.precision is None else jax.lax.Precision[config.precision.upper()]


def einsum(spec: str, x, w: nnx.Param, config: Qwen2VLConfig, adapter=None):
    """`jnp.einsum` of an activation with a parameter cast to the compute dtype, plus `adapter`'s low-rank
    update (`lora.Adapter`) when the projection has one."""
    y = jnp.einsum(spec, x, w[...].astype(config.dtype), precision=precision(config))
    if adapter is None:
        return y
    # The barrier keeps XLA from fusing the base product with the adapter's work (its output into the sum, its
    # input x into a merged wider product), which would round it differently: the base path computes what the
    # base model does, and adapters with B = 0 give its outputs bit for bit.
    y, x = jax.lax.optimization_barrier((y, x))
    return y + adapter(spec, x, config.dtype, precision(config))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, config: Qwen2VLConfig, *, rngs: nnx.Rngs, axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), config, init="ones")

    def __call__(self, x):
        # As HF: normalise in float32, cast back to the input dtype, then scale.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, config: Qwen2VLConfig, *, rngs: nnx.Rngs, axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), config, init="ones")
        self.bias = param(rngs, (dim,), (axis,), config, init="zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def attention(q_btnh, k_bskh, v_bskh, mask_bts, config: Qwen2VLConfig):
    """Softmax attention with grouped key/value heads and a boolean mask (True = attend).

    Scores and softmax run in float32. A query whose every key is masked gets a uniform average
    (finite), never NaN; such rows are padding and their output is unused.
    """
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, kv, n // kv, h) * (h ** -0.5)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_bskh, preferred_element_type=jnp.float32,
                        precision=precision(config))
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh, precision=precision(config))
    return out.reshape(b, t, n, h)


def prefix_attention(q_btnh, k_bskh, v_bskh, mask_bts, k_pskh, v_pskh, valid_ps, config: Qwen2VLConfig):
    """Attention of B = P * G rows over their own keys and over a prefix shared by each group of G
    consecutive rows: one softmax over [prefix keys, own keys], the prefix read once per group."""
    b, t, n, h = q_btnh.shape
    p, kv = k_pskh.shape[0], k_bskh.shape[2]
    g = b // p
    q = q_btnh.reshape(p, g, t, kv, n // kv, h) * (h ** -0.5)
    own_k = k_bskh.reshape(p, g, -1, kv, h)
    own_v = v_bskh.reshape(p, g, -1, kv, h)
    prec = precision(config)
    shared = jnp.einsum("PGTKQH,PSKH->PGKQTS", q, k_pskh, preferred_element_type=jnp.float32, precision=prec)
    own = jnp.einsum("PGTKQH,PGSKH->PGKQTS", q, own_k, preferred_element_type=jnp.float32, precision=prec)
    lowest = jnp.finfo(jnp.float32).min
    shared = jnp.where(valid_ps[:, None, None, None, None, :], shared, lowest)
    own = jnp.where(mask_bts.reshape(p, g, 1, 1, t, -1), own, lowest)
    probs = jax.nn.softmax(jnp.concatenate([shared, own], axis=-1), axis=-1).astype(v_bskh.dtype)
    split = k_pskh.shape[1]
    out = (jnp.einsum("PGKQTS,PSKH->PGTKQH", probs[..., :split], v_pskh, precision=prec)
           + jnp.einsum("PGKQTS,PGSKH->PGTKQH", probs[..., split:], own_v, precision=prec))
    return out.reshape(b, t, n, h)


def remat_policy(config: Qwen2VLConfig):
    """`jax.checkpoint` policy for one scanned layer, or None for no rematerialisation."""
    if config.remat == "block":
        return jax.checkpoint_policies.nothing_saveable
    if config.remat == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def scan_layers(layers: nnx.Module, carry, xs, body, config: Qwen2VLConfig):
    """Run `body(layer, carry, x) -> (carry, y)` over stacked layers with `lax.scan`, remat per config.

    `layers` holds parameters with a leading layer axis (built by `stacked`); `xs` is scanned
    alongside them (e.g. per-layer KV cache slices) and may be None.
    """
    graphdef, state = nnx.split(layers)

    def step(carry, scanned):
        layer_state, x = scanned
        return body(nnx.merge(graphdef, layer_state), carry, x)

    policy = remat_policy(config)
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))


def stacked(make_layer, num_layers: int, rngs: nnx.Rngs):
    """`num_layers` copies of a layer with parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)
