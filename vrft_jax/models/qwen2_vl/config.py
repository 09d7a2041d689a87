"""Qwen2-VL configuration: the architecture (read from / written to a Hugging Face `config.json`)
plus the runtime choices that are ours alone (parameter and compute dtypes, remat, matmul precision).

Hugging Face's own `transformers.Qwen2VLConfig` parses the file, so the nested transformers-5 form,
the hub's legacy flat form (`rope_scaling={"type": "mrope", ...}`, `in_chans`) and every default for
a missing key are exactly what the PyTorch model would use.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from vrft_jax.cli import UserError

SUPPORTED_MODEL_TYPE = "qwen2_vl"
SUPPORTED_ARCHITECTURE = "Qwen2VLForConditionalGeneration"
REMAT_POLICIES = ("none", "block", "save_dots")


class UnsupportedConfigError(UserError, ValueError):
    """The checkpoint describes a model this port does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The ViT: Conv3d patch embedding, `depth` pre-LN blocks with 2-D rotary attention, 2x2 merger."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    out_dim: int  # HF `vision_config.hidden_size`: the merger's output width = the text hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # hard-coded in HF's vision blocks and merger

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, laid out (channel, time, row, column) as HF's processor does."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_tokens(self) -> int:
        """Patches folded into one language-model token by the merger."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The Qwen2 decoder: RMSNorm, GQA with q/k/v bias, SwiGLU, M-RoPE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_ids: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    # Runtime choices, not part of a checkpoint.
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype
    remat: str = "none"  # "none" | "block" (recompute each layer) | "save_dots" (keep matmul outputs)
    precision: str | None = None  # jax.lax.Precision name for matmuls; None = backend default

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "text", dataclasses.replace(
            self.text, mrope_section=tuple(int(s) for s in self.text.mrope_section)))
        _validate(self)

    def replace(self, **changes) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face form

    @classmethod
    def from_hf(cls, hf: Any, **runtime) -> Qwen2VLConfig:
        """From a `config.json` dict, a `transformers.Qwen2VLConfig`, or a checkpoint directory."""
        if isinstance(hf, (str, os.PathLike)):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        if isinstance(hf, dict):
            hf = _parse_hf_dict(hf)
        t, v = hf.text_config, hf.vision_config
        _check_supported(hf)
        rope = dict(t.rope_parameters or {})
        eos = t.eos_token_id
        return cls(
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                num_kv_heads=t.num_key_value_heads,
                rms_norm_eps=t.rms_norm_eps,
                rope_theta=rope["rope_theta"],
                # HF's own fallback when a config names no section (modeling_qwen2_vl.py).
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                max_position_embeddings=t.max_position_embeddings,
            ),
            vision=VisionConfig(
                depth=v.depth,
                embed_dim=v.embed_dim,
                num_heads=v.num_heads,
                mlp_ratio=v.mlp_ratio,
                out_dim=v.hidden_size,
                in_channels=v.in_channels,
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                spatial_merge_size=v.spatial_merge_size,
                rope_theta=(v.rope_parameters or {}).get("rope_theta", 10000.0),
            ),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=hf.vision_end_token_id,
            bos_token_id=t.bos_token_id,
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            pad_token_id=t.pad_token_id,
            **runtime,
        )

    def to_hf_dict(self, base: dict | None = None) -> dict:
        """The transformers-5 nested `config.json` of this architecture.

        `base`, the source checkpoint's `config.json`, is normalised by transformers and then
        overridden by our architecture, so the fields we do not model (`initializer_range`, ...)
        survive a round trip through our format.
        """
        ours = self._architecture_dict()
        if base is None:
            return ours
        import transformers  # only the config class; no torch needed

        merged = transformers.Qwen2VLConfig(**base).to_dict()
        merged.pop("transformers_version", None)
        return _deep_update(merged, ours)

    def _architecture_dict(self) -> dict:
        t, v = self.text, self.vision
        eos = list(self.eos_token_ids)
        return {
            "architectures": [SUPPORTED_ARCHITECTURE],
            "model_type": SUPPORTED_MODEL_TYPE,
            "dtype": self.param_dtype.name,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": list(t.mrope_section),
                    "rope_theta": t.rope_theta,
                },
                "use_sliding_window": False,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": eos[0] if len(eos) == 1 else eos,
                "pad_token_id": self.pad_token_id,
            },
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.out_dim,
                "hidden_act": "quick_gelu",
                "mlp_ratio": v.mlp_ratio,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }

    # ------------------------------------------------------------------ real checkpoints

    @classmethod
    def qwen2_vl_2b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2-VL-2B(-Instruct)."""
        return cls(
            text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                            num_heads=12, num_kv_heads=2, rms_norm_eps=1e-6),
            vision=_real_vit(out_dim=1536),
            tie_word_embeddings=True,
            eos_token_ids=(151645,),
            **runtime,
        )

    @classmethod
    def qwen2_vl_7b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2-VL-7B(-Instruct)."""
        return cls(
            text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6),
            vision=_real_vit(out_dim=3584),
            tie_word_embeddings=False,
            eos_token_ids=(151645,),
            **runtime,
        )

    @classmethod
    def qwen2_vl_72b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2-VL-72B(-Instruct)."""
        return cls(
            text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                            num_heads=64, num_kv_heads=8, rms_norm_eps=1e-6),
            vision=_real_vit(out_dim=8192),
            tie_word_embeddings=False,
            eos_token_ids=(151645,),
            **runtime,
        )


def _deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_update(out[key], value) if nested else value
    return out


def _real_vit(out_dim: int) -> VisionConfig:
    # The same 675M-parameter ViT serves every Qwen2-VL size; only the merger's output width changes.
    return VisionConfig(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, out_dim=out_dim)


def _parse_hf_dict(d: dict):
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != SUPPORTED_MODEL_TYPE:
        raise UnsupportedConfigError(
            f"unsupported architecture: config.json has model_type={model_type!r}, architectures={archs}; "
            f"vrft_jax ports Qwen2-VL only (model_type {SUPPORTED_MODEL_TYPE!r}, {SUPPORTED_ARCHITECTURE}). "
            "Qwen2.5-VL differs (window attention, RMSNorm/SwiGLU vision blocks) and is not implemented.")
    if archs and SUPPORTED_ARCHITECTURE not in archs:
        raise UnsupportedConfigError(
            f"unsupported architecture {archs}: only {SUPPORTED_ARCHITECTURE} checkpoints are converted")
    import transformers  # only the config parser; no torch needed

    return transformers.Qwen2VLConfig(**d)


def _check_supported(hf) -> None:
    t, v = hf.text_config, hf.vision_config
    problems = []
    if getattr(t, "use_sliding_window", False):
        problems.append("text_config.use_sliding_window=True (sliding-window attention is not implemented)")
    if t.hidden_act != "silu":
        problems.append(f"text_config.hidden_act={t.hidden_act!r} (expected 'silu')")
    if v.hidden_act != "quick_gelu":
        problems.append(f"vision_config.hidden_act={v.hidden_act!r} (expected 'quick_gelu')")
    rope_type = (t.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "mrope"):
        problems.append(f"text_config.rope_parameters.rope_type={rope_type!r} (only M-RoPE without scaling)")
    if getattr(t, "head_dim", None) not in (None, t.hidden_size // t.num_attention_heads):
        problems.append(f"text_config.head_dim={t.head_dim} differs from hidden_size/num_attention_heads")
    if problems:
        raise UnsupportedConfigError("unsupported Qwen2-VL variant: " + "; ".join(problems))


def _validate(c: Qwen2VLConfig) -> None:
    t, v = c.text, c.vision
    errors = []
    if t.hidden_size % t.num_heads:
        errors.append(f"text.hidden_size={t.hidden_size} is not divisible by text.num_heads={t.num_heads}")
    if t.num_heads % t.num_kv_heads:
        errors.append(f"text.num_heads={t.num_heads} is not divisible by text.num_kv_heads={t.num_kv_heads}")
    if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2:
        errors.append(f"text.mrope_section={t.mrope_section} must sum to head_dim/2={t.head_dim // 2}")
    if v.embed_dim % v.num_heads or v.head_dim % 4:
        errors.append(f"vision.embed_dim={v.embed_dim}/num_heads={v.num_heads} must give a head_dim divisible by 4")
    if v.out_dim != t.hidden_size:
        errors.append(f"vision.out_dim={v.out_dim} must equal text.hidden_size={t.hidden_size}")
    if c.remat not in REMAT_POLICIES:
        errors.append(f"remat={c.remat!r} is not one of {REMAT_POLICIES}")
    if errors:
        raise ValueError("invalid Qwen2VLConfig: " + "; ".join(errors))
