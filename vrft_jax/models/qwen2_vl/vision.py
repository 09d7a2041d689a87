"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers on static-shape patch buckets.

Each batch row holds the patches of its own images, padded to a fixed bucket `P` (a multiple of
`spatial_merge_size**2`), with per-patch segment ids (k for the k-th image of the row, 0 for
padding) and (row, column) ids for the 2-D rope. Attention is block-diagonal by segment, so it never
crosses images or padding; the shapes depend on the bucket only, never on the image sizes.

Qwen2.5-VL's window attention is the same mask narrowed to the patches of one window: a patch at
(row, column) lies in window (row // w, column // w) of its image, w = `vision.window_patches`, which is
the partition HF's `get_vision_window_index` makes (windows start at the image's top-left corner; the
last ones of a side are cut short). HF reorders the patches so that each window is contiguous for its
variable-length kernels, and restores the order after the merger; a mask needs no reordering, and
attention over a set of keys does not depend on their order, so the features are HF's in HF's order.

Qwen3-VL adds a learned position table resampled to each image (each image's size read from its own patches'
positions, so nothing new is passed in) and DeepStack: the blocks run in scans that end at each DeepStack block,
whose output a merger of its own folds into the features the decoder adds after its first layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrft_jax.models.qwen2_vl import rope
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.layers import LayerNorm, RMSNorm, attention, einsum, param, scan_layers, stacked
from vrft_jax.sharding import constrain


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x):
    """HF's `gelu_pytorch_tanh` (Qwen3-VL's vision MLP); the mergers' GELU stays exact."""
    return jax.nn.gelu(x, approximate=True)


class PatchEmbed(nnx.Module):
    """HF's Conv3d with kernel = stride = patch, as one matmul over flattened (C, t, p, p) patches."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.kernel = param(rngs, (v.patch_dim, v.embed_dim), ("vit_patch", "vit_embed"), config)
        if config.family == "qwen3_vl":
            self.bias = param(rngs, (v.embed_dim,), ("vit_embed",), config)

    def __call__(self, patches_bpc):
        out = einsum("BPC,CE->BPE", patches_bpc.astype(self.config.dtype), self.kernel, self.config)
        return out + self.bias[...].astype(out.dtype) if self.config.family == "qwen3_vl" else out


class PositionTable(nnx.Module):
    """Qwen3-VL's learned absolute positions: a square table of `num_position_embeddings` entries, resampled to
    each image's (h, w) patch grid bilinearly with aligned corners (`F.interpolate`'s, as HF's
    `get_vision_interpolation_indices_and_weights` writes it: per axis src = i * (side - 1) / max(n - 1, 1), taps
    floor(src) and floor(src) + 1 clamped to the table, weights 1 - |src - tap|)."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.side = int(v.num_position_embeddings ** 0.5)
        self.table = param(rngs, (v.num_position_embeddings, v.embed_dim), (None, "vit_embed"), config)

    def __call__(self, segment_ids_bp, positions_bp2):
        """float[B, P, E]: each patch's resampled position embedding; an image's size is read from its patches."""
        segments = segment_ids_bp.shape[1] // self.config.vision.merge_tokens + 1  # an image has >= merge^2 patches
        largest = jax.vmap(lambda pos, seg: jax.ops.segment_max(pos, seg, num_segments=segments))(
            positions_bp2, segment_ids_bp)  # [B, images + 1, 2]: each image's last (row, column)
        grid = jnp.take_along_axis(largest, segment_ids_bp[..., None], axis=1) + 1  # [B, P, 2]: its image's (h, w)
        src = positions_bp2.astype(jnp.float32) * (self.side - 1) / jnp.maximum(grid - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        offsets = jnp.arange(2, dtype=jnp.float32)
        taps = jnp.clip(floor[..., None].astype(jnp.int32) + offsets.astype(jnp.int32), 0, self.side - 1)
        weights = jnp.maximum(1 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0)  # [B, P, 2 axes, 2 taps]
        index = (taps[..., 0, :, None] * self.side + taps[..., 1, None, :]).reshape(*taps.shape[:2], 4)
        weight = (weights[..., 0, :, None] * weights[..., 1, None, :]).reshape(*taps.shape[:2], 4)
        table = self.table[...].astype(self.config.dtype)
        return jnp.sum(jnp.take(table, index, axis=0) * weight[..., None].astype(table.dtype), axis=2)


class VisionAttention(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.qkv_kernel = param(rngs, (v.embed_dim, 3, v.num_heads, v.head_dim),
                                ("vit_embed", None, "vit_heads", "head_dim"), config)
        self.qkv_bias = param(rngs, (3, v.num_heads, v.head_dim), (None, "vit_heads", "head_dim"), config)
        self.out_kernel = param(rngs, (v.num_heads, v.head_dim, v.embed_dim),
                                ("vit_heads", "head_dim", "vit_embed"), config)
        self.out_bias = param(rngs, (v.embed_dim,), ("vit_embed",), config)

    def __call__(self, x_bpe, cos_bph, sin_bph, mask_bpp):
        dtype = self.config.dtype
        qkv = einsum("BPE,EJNH->JBPNH", x_bpe, self.qkv_kernel, self.config)
        qkv = qkv + self.qkv_bias[...].astype(dtype)[:, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        # HF rotates the vision q/k in float32 whatever the compute dtype.
        q = rope.apply_rope(q.astype(jnp.float32), cos_bph, sin_bph).astype(dtype)
        k = rope.apply_rope(k.astype(jnp.float32), cos_bph, sin_bph).astype(dtype)
        out = attention(q, k, v, mask_bpp, self.config)
        return einsum("BPNH,NHE->BPE", out, self.out_kernel, self.config) + self.out_bias[...].astype(dtype)


class VisionMLP(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.fc1_kernel = param(rngs, (v.embed_dim, v.mlp_dim), ("vit_embed", "vit_mlp"), config)
        self.fc1_bias = param(rngs, (v.mlp_dim,), ("vit_mlp",), config)
        self.fc2_kernel = param(rngs, (v.mlp_dim, v.embed_dim), ("vit_mlp", "vit_embed"), config)
        self.fc2_bias = param(rngs, (v.embed_dim,), ("vit_embed",), config)

    def __call__(self, x_bpe):
        dtype = self.config.dtype
        act = gelu_tanh if self.config.family == "qwen3_vl" else quick_gelu
        h = act(einsum("BPE,EM->BPM", x_bpe, self.fc1_kernel, self.config) + self.fc1_bias[...].astype(dtype))
        return einsum("BPM,ME->BPE", h, self.fc2_kernel, self.config) + self.fc2_bias[...].astype(dtype)


class VisionSwiGLU(nnx.Module):
    """Qwen2.5-VL's vision MLP: down(silu(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.gate_kernel = param(rngs, (v.embed_dim, v.mlp_dim), ("vit_embed", "vit_mlp"), config)
        self.gate_bias = param(rngs, (v.mlp_dim,), ("vit_mlp",), config)
        self.up_kernel = param(rngs, (v.embed_dim, v.mlp_dim), ("vit_embed", "vit_mlp"), config)
        self.up_bias = param(rngs, (v.mlp_dim,), ("vit_mlp",), config)
        self.down_kernel = param(rngs, (v.mlp_dim, v.embed_dim), ("vit_mlp", "vit_embed"), config)
        self.down_bias = param(rngs, (v.embed_dim,), ("vit_embed",), config)

    def __call__(self, x_bpe):
        dtype = self.config.dtype
        gate = einsum("BPE,EM->BPM", x_bpe, self.gate_kernel, self.config) + self.gate_bias[...].astype(dtype)
        up = einsum("BPE,EM->BPM", x_bpe, self.up_kernel, self.config) + self.up_bias[...].astype(dtype)
        return einsum("BPM,ME->BPE", jax.nn.silu(gate) * up, self.down_kernel, self.config) \
            + self.down_bias[...].astype(dtype)


def _norm(config: Qwen2VLConfig, *, rngs: nnx.Rngs):
    """The family's vision norm: Qwen2-VL's LayerNorm, Qwen2.5-VL's RMSNorm (both eps 1e-6, float32 inside)."""
    v = config.vision
    norm = RMSNorm if config.family == "qwen2_5_vl" else LayerNorm
    return norm(v.embed_dim, v.layer_norm_eps, config, rngs=rngs, axis="vit_embed")


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(config, rngs=rngs)
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = _norm(config, rngs=rngs)
        self.mlp = VisionSwiGLU(config, rngs=rngs) if config.family == "qwen2_5_vl" else VisionMLP(config, rngs=rngs)

    def __call__(self, x_bpe, cos_bph, sin_bph, mask_bpp):
        x_bpe = constrain(x_bpe, ("batch", "length", "act_embed"))
        x_bpe = x_bpe + self.attn(self.norm1(x_bpe), cos_bph, sin_bph, mask_bpp)
        return x_bpe + self.mlp(self.norm2(x_bpe))


class PatchMerger(nnx.Module):
    """The vision norm, then fold each `merge x merge` block of consecutive patches into one token: MLP(4E -> D).
    `postshuffle` (Qwen3-VL's DeepStack mergers): the LayerNorm runs over the folded 4E instead."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs, postshuffle: bool = False):
        v = config.vision
        wide = v.embed_dim * v.merge_tokens
        self.config = config
        self.postshuffle = postshuffle
        self.ln_q = (LayerNorm(wide, v.layer_norm_eps, config, rngs=rngs, axis="vit_merge") if postshuffle
                     else _norm(config, rngs=rngs))
        self.fc1_kernel = param(rngs, (wide, wide), ("vit_merge", "vit_merge_out"), config)
        self.fc1_bias = param(rngs, (wide,), ("vit_merge_out",), config)
        self.fc2_kernel = param(rngs, (wide, v.out_dim), ("vit_merge_out", "embed"), config)
        self.fc2_bias = param(rngs, (v.out_dim,), ("embed",), config)

    def __call__(self, x_bpe):
        dtype = self.config.dtype
        b, p, e = x_bpe.shape
        if self.postshuffle:
            x = self.ln_q(x_bpe.reshape(b, p // self.config.vision.merge_tokens, -1))
        else:
            x = self.ln_q(x_bpe).reshape(b, p // self.config.vision.merge_tokens, -1)
        h = jax.nn.gelu(einsum("BMW,WZ->BMZ", x, self.fc1_kernel, self.config) + self.fc1_bias[...].astype(dtype),
                        approximate=False)
        return einsum("BMZ,ZD->BMD", h, self.fc2_kernel, self.config) + self.fc2_bias[...].astype(dtype)


def attention_mask(segment_ids_bp, positions_bp2, window_patches: int | None = None):
    """bool[B, P, P]: True where patch i attends to patch j, both of the same image (segment > 0) and, with
    `window_patches`, of the same window: (row // window_patches, column // window_patches)."""
    mask = (segment_ids_bp[:, :, None] == segment_ids_bp[:, None, :]) & (segment_ids_bp[:, :, None] > 0)
    if window_patches is None:
        return mask
    window = positions_bp2 // window_patches
    return mask & jnp.all(window[:, :, None, :] == window[:, None, :, :], axis=-1)


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        if v.num_position_embeddings:
            self.pos_embed = PositionTable(config, rngs=rngs)
        self.blocks = stacked(lambda r: VisionBlock(config, rngs=r), v.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs)
        if v.deepstack_visual_indexes:  # Qwen3-VL: one post-shuffle merger per DeepStack block, stacked
            self.deepstack = stacked(lambda r: PatchMerger(config, rngs=r, postshuffle=True),
                                     len(v.deepstack_visual_indexes), rngs)

    def __call__(self, patches_bpc, segment_ids_bp, positions_bp2):
        """Image features of every merged token.

        Args:
          patches_bpc: float[B, P, C*t*p*p] patches, `P` a multiple of merge^2.
          segment_ids_bp: int[B, P], k > 0 for the k-th image of the row, 0 for padding.
          positions_bp2: int[B, P, 2] (row, column) of each patch within its image.
        Returns:
          [B, P / merge^2, D] in the compute dtype; tokens made of padding are garbage but finite. With DeepStack
          (Qwen3-VL), a pair: those and [B, K, P / merge^2, D], the k-th DeepStack block's merged features.
        """
        v = self.config.vision
        if patches_bpc.shape[1] % v.merge_tokens:
            raise ValueError(f"patch bucket {patches_bpc.shape[1]} is not a multiple of {v.merge_tokens}")
        x = self.patch_embed(patches_bpc)
        if v.num_position_embeddings:
            x = x + self.pos_embed(segment_ids_bp, positions_bp2).astype(x.dtype)
        cos, sin = rope.vision_cos_sin(positions_bp2, v.head_dim, v.rope_theta)
        image_mask = attention_mask(segment_ids_bp, positions_bp2)
        if v.window_patches is None:
            def body(block, x, _):
                return block(x, cos, sin, image_mask), None

            if not v.deepstack_visual_indexes:
                x, _ = scan_layers(self.blocks, x, None, body, self.config)
                return self.merger(x)
            # The blocks run in segments that end at each DeepStack block, whose output its merger folds.
            deepstack, start = [], 0
            for k, stop in enumerate(v.deepstack_visual_indexes):
                x, _ = scan_layers(_layer_range(self.blocks, start, stop + 1), x, None, body, self.config)
                deepstack.append(_layer_range(self.deepstack, k, k + 1, squeeze=True)(x))
                start = stop + 1
            if start < v.depth:
                x, _ = scan_layers(_layer_range(self.blocks, start, v.depth), x, None, body, self.config)
            return self.merger(x), jnp.stack(deepstack, axis=1)
        window_mask = attention_mask(segment_ids_bp, positions_bp2, v.window_patches)
        full = jnp.asarray(np.isin(np.arange(v.depth), v.fullatt_block_indexes))

        def windowed_body(block, x, full_attention):
            return block(x, cos, sin, jnp.where(full_attention, image_mask, window_mask)), None

        x, _ = scan_layers(self.blocks, x, full, windowed_body, self.config)
        return self.merger(x)


def _layer_range(layers: nnx.Module, start: int, stop: int, squeeze: bool = False) -> nnx.Module:
    """Layers [start, stop) of a stacked module (a view of its parameters' slices); `squeeze`: the one layer."""
    graphdef, state = nnx.split(layers)
    cut = (lambda p: p[start]) if squeeze else (lambda p: p[start:stop])
    return nnx.merge(graphdef, jax.tree.map(cut, state))
