"""Low-rank adapters (LoRA, Hu et al. 2021) on the language model's projections, as PEFT's `LoraLayer` computes them.

A targeted projection y = x W becomes y = x W + scale * (x A) B, A [in..., r], B [r, out...], scale = alpha / r
(alpha / sqrt(r) with `rslora`). A is drawn as PEFT draws it (Kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)));
B starts at zero, so the first forward is the base model's. The adapters are `nnx.LoRAParam`s in their own dtype
(float32 by default) whatever the base's `param_dtype`, cast to the compute dtype where used, as the base kernels
are; stacked over the decoder's layers like every layer parameter, so the layer scan carries them.

Targets are the language model's projections only, named as in Hugging Face and PEFT (`TARGETS`). Qwen2.5-VL's
vision MLP has projections of the same names (`gate_proj`, ...); a target here never reaches the vision tower,
which no stack that trains Qwen-VL with RL adapts (see the README's LoRA section).

Dropout (PEFT's `lora_dropout`) drops the adapter's input, (dropout(x) A) B, in the model calls traced inside
`dropout_key(key)`, which the train step opens around its forward; everywhere else (scoring, the reference, the
sampler, evaluation) it is off, as PEFT's in eval mode. Each layer of the scan and each projection draws its own
mask from the key (`layer_scope`, the projection's index in TARGETS).

This is the model's half of LoRA: where adapters sit and what they compute. Training only them and the base as
the reference are `vrft_jax.train_step`'s, merging `models.qwen2_vl.model`'s, the PEFT format `model_port.peft`'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The language model's projections by their Hugging Face / PEFT module names.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_AXIS = "lora_rank"  # the logical name of the rank dimension (whole: sharding.py says why)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The adapters' shape; a runtime choice of the model (`Qwen2VLConfig.lora`), not part of a checkpoint.

    rank:        r, the inner dimension of each adapter
    alpha:       the scale's numerator: scale = alpha / rank (PEFT's `lora_alpha`)
    targets:     projections that get an adapter, a subset of TARGETS
    rslora:      scale = alpha / sqrt(rank) (PEFT's `use_rslora`)
    dropout:     the probability of dropping each element of an adapter's input in training (PEFT's
                 `lora_dropout`; the survivors scaled by 1 / (1 - dropout))
    param_dtype: the adapters' storage dtype (float32: an update of lr ~1e-5 would underflow in bfloat16)
    """

    rank: int = 64
    alpha: float = 64.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False
    dropout: float = 0.0
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        errors = []
        if self.rank < 1:
            errors.append(f"rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            errors.append(f"targets {unknown} are not language-model projections; known: {', '.join(TARGETS)} "
                          "(the vision tower takes no adapters)")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            errors.append(f"targets={self.targets} must name each projection once, at least one")
        if errors:
            raise ValueError("invalid LoRAConfig: " + "; ".join(errors))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def replace(self, **changes) -> LoRAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The JSON form (an adapter directory's `lora.json`)."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "rslora": self.rslora,
                "dropout": self.dropout, "param_dtype": self.param_dtype.name}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   rslora=bool(d.get("rslora", False)), dropout=float(d.get("dropout", 0.0)),
                   param_dtype=d.get("param_dtype", "float32"))


_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Adapter dropout on, its masks drawn from `key`, in the model calls traced inside (None: off)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def layer_scope(index: jax.Array):
    """Inside one layer of the decoder's scan: the dropout key folded with the layer's index, so that every layer
    draws its own masks (nothing when dropout is off)."""
    key = _DROPOUT_KEY.get()
    if key is None:
        yield
        return
    with dropout_key(jax.random.fold_in(key, index)):
        yield


class Adapter(nnx.Module):
    """The low-rank update of one projection whose kernel is [*in_shape, *out_shape]: A [*in_shape, r],
    B [r, *out_shape]."""

    def __init__(self, name: str, in_shape: Sequence[int], in_axes: Sequence[str], out_shape: Sequence[int],
                 out_axes: Sequence[str], lora: LoRAConfig, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        self.scale, self.dropout, self.index = lora.scale, lora.dropout, TARGETS.index(name)
        a = jax.random.uniform(rngs.params(), (*in_shape, lora.rank), lora.param_dtype, -bound, bound)
        self.a = nnx.LoRAParam(a, out_sharding=(*in_axes, RANK_AXIS), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((lora.rank, *out_shape), lora.param_dtype),
                               out_sharding=(RANK_AXIS, *out_axes), eager_sharding=False)

    def __call__(self, spec: str, x, dtype, precision=None):
        """scale * (x A) B for the projection `spec` (the base einsum's, e.g. "BTD,DNH->BTNH"), in `dtype`."""
        lhs, rest = spec.split(",")
        kernel, out = rest.split("->")
        contracted = "".join(c for c in kernel if c in lhs)
        produced = "".join(c for c in kernel if c not in lhs)
        kept = "".join(c for c in lhs if c not in contracted)
        key = _DROPOUT_KEY.get()
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
        xa = jnp.einsum(f"{lhs},{contracted}r->{kept}r", x, self.a[...].astype(dtype), precision=precision)
        delta = jnp.einsum(f"{kept}r,r{produced}->{out}", xa, self.b[...].astype(dtype), precision=precision)
        return delta * jnp.asarray(self.scale, dtype)


def adapter(name: str, in_shape, in_axes, out_shape, out_axes, config, *, rngs: nnx.Rngs) -> Adapter | None:
    """The adapter of projection `name` (a TARGETS name) when `config.lora` targets it, else None."""
    lora = config.lora
    if lora is None or name not in lora.targets:
        return None
    return Adapter(name, in_shape, in_axes, out_shape, out_axes, lora, rngs=rngs)
