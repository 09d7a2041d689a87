"""The one table between Hugging Face tensor names and our parameters, used in both directions.

Every entry is a pure reshape/transpose, so conversion is bit-exact in any dtype. Per-layer HF tensors
(`model.layers.{i}...`, `visual.blocks.{i}...`) map to one parameter stacked over layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig

Path = tuple[str, ...]

# transformers >= 5 names parameters in memory `model.visual.*` / `model.language_model.*`; the hub
# layout (what `save_pretrained` writes) is `visual.*` / `model.*`. We read both and write the hub one.
_ALIASES = ((re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model."))


def canonical_name(name: str) -> str:
    for pattern, replacement in _ALIASES:
        name = pattern.sub(replacement, name)
    return name


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str  # with "{i}" for per-layer tensors
    path: Path  # our nnx state path
    hf_shape: tuple[int, ...]  # of one HF tensor
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    num_layers: int | None = None  # stacked over this many layers when set

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]


def _identity(shape):
    return dict(hf_shape=tuple(shape), to_ours=lambda w: w, to_hf=lambda w: w)


def _reshape(ours, hf):
    return dict(hf_shape=tuple(hf), to_ours=lambda w: w.reshape(ours), to_hf=lambda w: w.reshape(hf))


def _linear(in_shape, out_shape, hf_shape=None):
    """torch Linear weight [out, in] (or a conv kernel whose leading dim is `out`) <-> ours [*in, *out]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    hf_shape = tuple(hf_shape or (n_out, n_in))
    return dict(
        hf_shape=hf_shape,
        to_ours=lambda w: w.reshape(n_out, n_in).T.reshape(*in_shape, *out_shape),
        to_hf=lambda w: np.ascontiguousarray(w.reshape(n_in, n_out).T).reshape(hf_shape),
    )


def tensor_map(config: Qwen2VLConfig) -> list[Entry]:
    """Every tensor of `config`'s family, by its canonical name (`visual.*`, `model.*`; `hub_name` gives the one a
    checkpoint of the family is written with)."""
    t, v = config.text, config.vision
    D, N, K, H, F = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    E = v.embed_dim
    L = t.num_layers
    blk, lyr = "visual.blocks.{i}.", "model.layers.{i}."
    vb, tl = ("visual", "blocks"), ("text", "layers")
    qwen3 = config.family == "qwen3_vl"

    entries = [
        Entry("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"),
              **_linear((v.patch_dim,), (E,), (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))),
        *([Entry("visual.patch_embed.proj.bias", ("visual", "patch_embed", "bias"), **_identity((E,))),
           Entry("visual.pos_embed.weight", ("visual", "pos_embed", "table"),
                 **_identity((v.num_position_embeddings, E)))] if qwen3 else []),
        *_vision_block_entries(config, blk, vb),
        *_merger_entries(config, "visual.merger.", ("visual", "merger")),
        *(_merger_entries(config, "visual.deepstack_merger_list.{i}.", ("visual", "deepstack"),
                          len(v.deepstack_visual_indexes)) if v.deepstack_visual_indexes else []),
        Entry("model.embed_tokens.weight", ("text", "embed_tokens"), **_identity((t.vocab_size, D))),
        Entry(lyr + "input_layernorm.weight", tl + ("input_norm", "weight"), **_identity((D,)), num_layers=L),
        Entry(lyr + "self_attn.q_proj.weight", tl + ("attn", "q_kernel"), **_linear((D,), (N, H)), num_layers=L),
        Entry(lyr + "self_attn.k_proj.weight", tl + ("attn", "k_kernel"), **_linear((D,), (K, H)), num_layers=L),
        Entry(lyr + "self_attn.v_proj.weight", tl + ("attn", "v_kernel"), **_linear((D,), (K, H)), num_layers=L),
        Entry(lyr + "self_attn.o_proj.weight", tl + ("attn", "o_kernel"), **_linear((N, H), (D,)), num_layers=L),
        Entry(lyr + "post_attention_layernorm.weight", tl + ("post_attention_norm", "weight"), **_identity((D,)),
              num_layers=L),
        Entry(lyr + "mlp.gate_proj.weight", tl + ("mlp", "gate_kernel"), **_linear((D,), (F,)), num_layers=L),
        Entry(lyr + "mlp.up_proj.weight", tl + ("mlp", "up_kernel"), **_linear((D,), (F,)), num_layers=L),
        Entry(lyr + "mlp.down_proj.weight", tl + ("mlp", "down_kernel"), **_linear((F,), (D,)), num_layers=L),
        Entry("model.norm.weight", ("text", "norm", "weight"), **_identity((D,))),
    ]
    if t.qkv_bias:
        entries += [Entry(lyr + f"self_attn.{x}_proj.bias", tl + ("attn", f"{x}_bias"), **_reshape((n, H), (n * H,)),
                          num_layers=L) for x, n in (("q", N), ("k", K), ("v", K))]
    if t.qk_norm:
        entries += [Entry(lyr + f"self_attn.{x}_norm.weight", tl + ("attn", f"{x}_norm", "weight"), **_identity((H,)),
                          num_layers=L) for x in ("q", "k")]
    if not config.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", ("text", "lm_head"), **_linear((D,), (t.vocab_size,))))
    return entries


# Qwen3-VL's checkpoints keep transformers 5's in-memory names (`model.visual.*`, `model.language_model.*`); the
# older families' the hub layout (`visual.*`, `model.*`).
_IN_MEMORY_LAYOUT = frozenset({"qwen3_vl"})


def hub_name(name: str, family: str) -> str:
    """The name a checkpoint of `family` stores the canonical tensor `name` under."""
    return in_memory_name(name) if family in _IN_MEMORY_LAYOUT else name


def in_memory_name(name: str) -> str:
    """transformers 5's name in memory (its module tree: what PEFT adapters are keyed by) of a canonical name."""
    if name.startswith("visual."):
        return "model." + name
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def _merger_entries(config: Qwen2VLConfig, prefix: str, path: Path, count: int | None = None) -> list[Entry]:
    """A patch merger (`count` None) or `count` stacked DeepStack mergers: the norm (Qwen2-VL's `ln_q` LayerNorm,
    Qwen2.5-VL's RMSNorm, Qwen3-VL's `norm`, over 4E for DeepStack's) and the two-layer MLP (`mlp.0`/`mlp.2`,
    Qwen3-VL's `linear_fc1`/`linear_fc2`)."""
    v, D = config.vision, config.text.hidden_size
    E = v.embed_dim
    W = E * v.merge_tokens
    qwen3 = config.family == "qwen3_vl"
    norm, fc1, fc2 = ("norm", "linear_fc1", "linear_fc2") if qwen3 else ("ln_q", "mlp.0", "mlp.2")
    width = W if count is not None else E
    parts = ("weight",) if config.family == "qwen2_5_vl" else ("weight", "bias")
    entries = [Entry(f"{prefix}{norm}.{part}", path + ("ln_q", part), **_identity((width,)), num_layers=count)
               for part in parts]
    return entries + [
        Entry(f"{prefix}{fc1}.weight", path + ("fc1_kernel",), **_linear((W,), (W,)), num_layers=count),
        Entry(f"{prefix}{fc1}.bias", path + ("fc1_bias",), **_identity((W,)), num_layers=count),
        Entry(f"{prefix}{fc2}.weight", path + ("fc2_kernel",), **_linear((W,), (D,)), num_layers=count),
        Entry(f"{prefix}{fc2}.bias", path + ("fc2_bias",), **_identity((D,)), num_layers=count),
    ]


def _vision_block_entries(config: Qwen2VLConfig, blk: str, vb: Path) -> list[Entry]:
    """One ViT block's tensors: Qwen2-VL's LayerNorms and fc1/fc2 MLP (Qwen3-VL's: linear_fc1/linear_fc2), or
    Qwen2.5-VL's RMSNorms (weight only) and gate/up/down SwiGLU with biases. These names repeat the language
    model's (`mlp.gate_proj` ...), so every name here is anchored on `visual.blocks.`."""
    v = config.vision
    E, NV, HV, M, LV = v.embed_dim, v.num_heads, v.head_dim, v.mlp_dim, v.depth
    norms = ("weight",) if config.family == "qwen2_5_vl" else ("weight", "bias")
    entries = [Entry(blk + f"{norm}.{part}", vb + (norm, part), **_identity((E,)), num_layers=LV)
               for norm in ("norm1", "norm2") for part in norms]
    entries += [
        Entry(blk + "attn.qkv.weight", vb + ("attn", "qkv_kernel"), **_linear((E,), (3, NV, HV)), num_layers=LV),
        Entry(blk + "attn.qkv.bias", vb + ("attn", "qkv_bias"), **_reshape((3, NV, HV), (3 * E,)), num_layers=LV),
        Entry(blk + "attn.proj.weight", vb + ("attn", "out_kernel"), **_linear((NV, HV), (E,)), num_layers=LV),
        Entry(blk + "attn.proj.bias", vb + ("attn", "out_bias"), **_identity((E,)), num_layers=LV),
    ]
    if config.family == "qwen2_5_vl":
        for hf, ours, (n_in, n_out) in (("gate_proj", "gate", (E, M)), ("up_proj", "up", (E, M)),
                                        ("down_proj", "down", (M, E))):
            entries += [
                Entry(blk + f"mlp.{hf}.weight", vb + ("mlp", f"{ours}_kernel"), **_linear((n_in,), (n_out,)),
                      num_layers=LV),
                Entry(blk + f"mlp.{hf}.bias", vb + ("mlp", f"{ours}_bias"), **_identity((n_out,)), num_layers=LV),
            ]
        return entries
    fc1, fc2 = ("linear_fc1", "linear_fc2") if config.family == "qwen3_vl" else ("fc1", "fc2")
    return entries + [
        Entry(blk + f"mlp.{fc1}.weight", vb + ("mlp", "fc1_kernel"), **_linear((E,), (M,)), num_layers=LV),
        Entry(blk + f"mlp.{fc1}.bias", vb + ("mlp", "fc1_bias"), **_identity((M,)), num_layers=LV),
        Entry(blk + f"mlp.{fc2}.weight", vb + ("mlp", "fc2_kernel"), **_linear((M,), (E,)), num_layers=LV),
        Entry(blk + f"mlp.{fc2}.bias", vb + ("mlp", "fc2_bias"), **_identity((E,)), num_layers=LV),
    ]


TIED_HEAD = "lm_head.weight"  # may appear in a tied checkpoint; must then equal the embeddings
