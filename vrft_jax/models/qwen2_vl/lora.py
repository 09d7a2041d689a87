"""Low-rank adapters (LoRA, Hu et al. 2021) on the language model's projections, as PEFT's `LoraLayer` computes them.

A targeted projection y = x W becomes y = x W + scale * (x A) B, A [in..., r], B [r, out...], scale = alpha / r
(alpha / sqrt(r) with `rslora`). A is drawn as PEFT draws it (Kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)));
B starts at zero, so the first forward is the base model's. The adapters are `nnx.LoRAParam`s in their own dtype
(float32 by default) whatever the base's `param_dtype`, cast to the compute dtype where used, as the base kernels
are; stacked over the decoder's layers like every layer parameter, so the layer scan carries them.

Targets are the language model's projections only, named as in Hugging Face and PEFT (`TARGETS`). Qwen2.5-VL's
vision MLP has projections of the same names (`gate_proj`, ...); a target here never reaches the vision tower,
which no stack that trains Qwen-VL with RL adapts (see the README's LoRA section).

This is the model's half of LoRA: where adapters sit and what they compute. Training only them, the base as the
reference, merging and the PEFT format are `vrft_jax.lora`'s and `model_port.peft`'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The language model's projections by their Hugging Face / PEFT module names.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_AXIS = "lora_rank"  # the logical name of the rank dimension (replicated by every rule table)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The adapters' shape; a runtime choice of the model (`Qwen2VLConfig.lora`), not part of a checkpoint.

    rank:        r, the inner dimension of each adapter
    alpha:       the scale's numerator: scale = alpha / rank (PEFT's `lora_alpha`)
    targets:     projections that get an adapter, a subset of TARGETS
    rslora:      scale = alpha / sqrt(rank) (PEFT's `use_rslora`)
    param_dtype: the adapters' storage dtype (float32: an update of lr ~1e-5 would underflow in bfloat16)
    """

    rank: int = 64
    alpha: float = 64.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "alpha", float(self.alpha))
        errors = []
        if self.rank < 1:
            errors.append(f"rank={self.rank} must be >= 1")
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
                "param_dtype": self.param_dtype.name}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   rslora=bool(d.get("rslora", False)), param_dtype=d.get("param_dtype", "float32"))


class Adapter(nnx.Module):
    """The low-rank update of one projection whose kernel is [*in_shape, *out_shape]: A [*in_shape, r],
    B [r, *out_shape]."""

    def __init__(self, in_shape: Sequence[int], in_axes: Sequence[str], out_shape: Sequence[int],
                 out_axes: Sequence[str], lora: LoRAConfig, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        self.scale = lora.scale
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
        xa = jnp.einsum(f"{lhs},{contracted}r->{kept}r", x, self.a[...].astype(dtype), precision=precision)
        delta = jnp.einsum(f"{kept}r,r{produced}->{out}", xa, self.b[...].astype(dtype), precision=precision)
        return delta * jnp.asarray(self.scale, dtype)


def adapter(name: str, in_shape, in_axes, out_shape, out_axes, config, *, rngs: nnx.Rngs) -> Adapter | None:
    """The adapter of projection `name` (a TARGETS name) when `config.lora` targets it, else None."""
    lora = config.lora
    if lora is None or name not in lora.targets:
        return None
    return Adapter(in_shape, in_axes, out_shape, out_axes, lora, rngs=rngs)
