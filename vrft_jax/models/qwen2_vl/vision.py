"""The Qwen2-VL vision tower on static-shape patch buckets.

Each batch row holds the patches of its own images, padded to a fixed bucket `P` (a multiple of
`spatial_merge_size**2`), with per-patch segment ids (k for the k-th image of the row, 0 for
padding) and (row, column) ids for the 2-D rope. Attention is block-diagonal by segment, so it never
crosses images or padding; the shapes depend on the bucket only, never on the image sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vrft_jax.models.qwen2_vl import rope
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.layers import LayerNorm, attention, einsum, param, scan_layers, stacked
from vrft_jax.sharding import constrain


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class PatchEmbed(nnx.Module):
    """HF's Conv3d with kernel = stride = patch, as one matmul over flattened (C, t, p, p) patches."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.config = config
        self.kernel = param(rngs, (v.patch_dim, v.embed_dim), ("vit_patch", "vit_embed"), config)

    def __call__(self, patches_bpc):
        return einsum("BPC,CE->BPE", patches_bpc.astype(self.config.dtype), self.kernel, self.config)


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
        h = quick_gelu(einsum("BPE,EM->BPM", x_bpe, self.fc1_kernel, self.config) + self.fc1_bias[...].astype(dtype))
        return einsum("BPM,ME->BPE", h, self.fc2_kernel, self.config) + self.fc2_bias[...].astype(dtype)


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.norm1 = LayerNorm(v.embed_dim, v.layer_norm_eps, config, rngs=rngs, axis="vit_embed")
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = LayerNorm(v.embed_dim, v.layer_norm_eps, config, rngs=rngs, axis="vit_embed")
        self.mlp = VisionMLP(config, rngs=rngs)

    def __call__(self, x_bpe, cos_bph, sin_bph, mask_bpp):
        x_bpe = constrain(x_bpe, ("batch", "length", "act_embed"))
        x_bpe = x_bpe + self.attn(self.norm1(x_bpe), cos_bph, sin_bph, mask_bpp)
        return x_bpe + self.mlp(self.norm2(x_bpe))


class PatchMerger(nnx.Module):
    """LayerNorm, then fold each `merge x merge` block of consecutive patches into one token: MLP(4E -> D)."""

    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        wide = v.embed_dim * v.merge_tokens
        self.config = config
        self.ln_q = LayerNorm(v.embed_dim, v.layer_norm_eps, config, rngs=rngs, axis="vit_embed")
        self.fc1_kernel = param(rngs, (wide, wide), ("vit_merge", "vit_merge_out"), config)
        self.fc1_bias = param(rngs, (wide,), ("vit_merge_out",), config)
        self.fc2_kernel = param(rngs, (wide, v.out_dim), ("vit_merge_out", "embed"), config)
        self.fc2_bias = param(rngs, (v.out_dim,), ("embed",), config)

    def __call__(self, x_bpe):
        dtype = self.config.dtype
        b, p, e = x_bpe.shape
        x = self.ln_q(x_bpe).reshape(b, p // self.config.vision.merge_tokens, -1)
        h = jax.nn.gelu(einsum("BMW,WZ->BMZ", x, self.fc1_kernel, self.config) + self.fc1_bias[...].astype(dtype),
                        approximate=False)
        return einsum("BMZ,ZD->BMD", h, self.fc2_kernel, self.config) + self.fc2_bias[...].astype(dtype)


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed(config, rngs=rngs)
        self.blocks = stacked(lambda r: VisionBlock(config, rngs=r), config.vision.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, patches_bpc, segment_ids_bp, positions_bp2):
        """Image features of every merged token.

        Args:
          patches_bpc: float[B, P, C*t*p*p] patches, `P` a multiple of merge^2.
          segment_ids_bp: int[B, P], k > 0 for the k-th image of the row, 0 for padding.
          positions_bp2: int[B, P, 2] (row, column) of each patch within its image.
        Returns:
          [B, P / merge^2, D] in the compute dtype; tokens made of padding are garbage but finite.
        """
        v = self.config.vision
        if patches_bpc.shape[1] % v.merge_tokens:
            raise ValueError(f"patch bucket {patches_bpc.shape[1]} is not a multiple of {v.merge_tokens}")
        x = self.patch_embed(patches_bpc)
        cos, sin = rope.vision_cos_sin(positions_bp2, v.head_dim, v.rope_theta)
        mask = (segment_ids_bp[:, :, None] == segment_ids_bp[:, None, :]) & (segment_ids_bp[:, :, None] > 0)

        def body(block, x, _):
            return block(x, cos, sin, mask), None

        x, _ = scan_layers(self.blocks, x, None, body, self.config)
        return self.merger(x)
