"""The configuration of a Qwen-VL family model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense): the architecture (read from /
written to a Hugging Face `config.json`) plus the runtime choices that are ours alone (parameter and
compute dtypes, remat, matmul precision, LoRA adapters).

Hugging Face's own config class of the family (`transformers.Qwen2VLConfig`, `Qwen2_5_VLConfig`, `Qwen3VLConfig`) parses
the file, so the nested transformers-5 form, the hub's legacy flat form (`rope_scaling={"type": "mrope",
...}`, `in_chans`) and every default for a missing key are exactly what the PyTorch model would use. The
class defaults of those configs are not the released models' (Qwen2.5-VL's `tokens_per_second` is 4 in
the class, 2 in every checkpoint): a preset here is written from the checkpoints, and a real run reads
the checkpoint's own `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from vrft_jax.cli import UserError
from vrft_jax.models.qwen2_vl.lora import LoRAConfig

# model_type -> (the HF architecture, the HF config class): the families this port implements.
FAMILIES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
}
# The processor's per-channel normalisation (preprocessor_config.json's image_mean, image_std): CLIP's for Qwen2-VL
# and Qwen2.5-VL (transformers' OPENAI_CLIP_MEAN/STD), 0.5 / 0.5 for Qwen3-VL.
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGE_STATS = {"qwen2_vl": CLIP_STATS, "qwen2_5_vl": CLIP_STATS, "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# HF's M-RoPE sections when a config names none (each family's modeling file).
DEFAULT_MROPE_SECTION = {"qwen2_vl": (16, 24, 24), "qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}
VISION_ACT = {"qwen2_vl": "quick_gelu", "qwen2_5_vl": "silu", "qwen3_vl": "gelu_pytorch_tanh"}
REMAT_POLICIES = ("none", "block", "save_dots")


class UnsupportedConfigError(UserError, ValueError):
    """The checkpoint describes a model this port does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The ViT: Conv3d patch embedding, `depth` pre-norm blocks with 2-D rotary attention, 2x2 merger.

    Qwen2-VL's blocks use LayerNorm and a QuickGELU MLP `embed_dim * mlp_ratio` wide, with full attention
    over each image; Qwen2.5-VL's RMSNorm and a SwiGLU MLP `intermediate_size` wide, with attention within
    windows of `window_size` input pixels except in the blocks `fullatt_block_indexes`.
    """

    depth: int
    embed_dim: int  # HF Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`: the ViT width
    num_heads: int
    out_dim: int  # HF Qwen2-VL `hidden_size`, Qwen2.5-VL `out_hidden_size`: the merger's output = the LM width
    mlp_ratio: float = 4.0  # Qwen2-VL
    intermediate_size: int | None = None  # Qwen2.5-VL's SwiGLU width (replaces mlp_ratio)
    window_size: int | None = None  # Qwen2.5-VL: a window's side in input pixels
    fullatt_block_indexes: tuple[int, ...] = ()  # Qwen2.5-VL: blocks attending over the whole image
    tokens_per_second: int | None = None  # Qwen2.5-VL video's time scale; kept for export, images never use it
    num_position_embeddings: int | None = None  # Qwen3-VL: the learned square position table's size
    deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL: blocks whose merged output feeds LM layer k
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
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def window_patches(self) -> int | None:
        """A window's side in patches (a whole number of merged tokens, as HF rounds it), None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size * self.spatial_merge_size

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
    """The decoder: RMSNorm, GQA, SwiGLU, M-RoPE. Qwen2's (Qwen2-VL, Qwen2.5-VL) has q/k/v biases and M-RoPE's
    frequencies in chunks of `mrope_section`; Qwen3's (Qwen3-VL) none, an RMSNorm of each head's q and k before
    the rotation, a head width of its own (`head_dim`, not hidden/heads) and the sections interleaved."""

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
    qkv_bias: bool = True  # Qwen2
    qk_norm: bool = False  # Qwen3
    mrope_interleaved: bool = False  # Qwen3: frequency j on axis (T, H, W)[j % 3] within 3 x the H/W sections
    explicit_head_dim: int | None = None  # Qwen3's `head_dim`; None: hidden_size / num_heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2VLConfig:
    """A Qwen-VL family model: `family` is the HF `model_type` (a key of FAMILIES), which fixes the vision
    blocks, the `config.json` and tensor layout, and the box frame the model writes."""

    text: TextConfig
    vision: VisionConfig
    family: str = "qwen2_vl"
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
    lora: LoRAConfig | None = None  # low-rank adapters on the language model's projections (`lora.py`)

    def __post_init__(self):
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "text", dataclasses.replace(
            self.text, mrope_section=tuple(int(s) for s in self.text.mrope_section)))
        object.__setattr__(self, "vision", dataclasses.replace(
            self.vision, fullatt_block_indexes=tuple(int(i) for i in self.vision.fullatt_block_indexes),
            deepstack_visual_indexes=tuple(int(i) for i in self.vision.deepstack_visual_indexes)))
        _validate(self)

    def replace(self, **changes) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)

    @property
    def image_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per RGB channel the family's processor normalises pixels with."""
        return IMAGE_STATS[self.family]

    # ------------------------------------------------------------------ Hugging Face form

    @classmethod
    def from_hf(cls, hf: Any, **runtime) -> Qwen2VLConfig:
        """From a `config.json` dict, a transformers config of a family, or a checkpoint directory."""
        if isinstance(hf, (str, os.PathLike)):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        if isinstance(hf, dict):
            hf = _parse_hf_dict(hf)
        family = hf.model_type
        t, v = hf.text_config, hf.vision_config
        _check_supported(hf)
        rope = dict(t.rope_parameters or {})
        # Qwen3-VL's text config holds no bos/eos (its generation_config.json does): the Qwen tokenizer's, the defaults.
        special = {} if family == "qwen3_vl" else dict(bos_token_id=t.bos_token_id, eos_token_ids=_ids(t.eos_token_id))
        text = {}
        if family == "qwen2_5_vl":
            vision = dict(embed_dim=v.hidden_size, out_dim=v.out_hidden_size, intermediate_size=v.intermediate_size,
                          window_size=v.window_size, fullatt_block_indexes=tuple(v.fullatt_block_indexes),
                          tokens_per_second=v.tokens_per_second)
        elif family == "qwen3_vl":
            vision = dict(embed_dim=v.hidden_size, out_dim=v.out_hidden_size, intermediate_size=v.intermediate_size,
                          num_position_embeddings=v.num_position_embeddings,
                          deepstack_visual_indexes=tuple(v.deepstack_visual_indexes))
            # HF interleaves Qwen3-VL's sections whatever `mrope_interleaved` says (field-2026-12b.md 1.2).
            text = dict(qkv_bias=False, qk_norm=True, mrope_interleaved=True, explicit_head_dim=t.head_dim)
        else:
            vision = dict(embed_dim=v.embed_dim, out_dim=v.hidden_size, mlp_ratio=v.mlp_ratio)
        return cls(
            family=family,
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                num_kv_heads=t.num_key_value_heads,
                rms_norm_eps=t.rms_norm_eps,
                rope_theta=rope["rope_theta"],
                mrope_section=tuple(rope.get("mrope_section", DEFAULT_MROPE_SECTION[family])),
                max_position_embeddings=t.max_position_embeddings,
                **text,
            ),
            vision=VisionConfig(
                depth=v.depth,
                num_heads=v.num_heads,
                in_channels=v.in_channels,
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                spatial_merge_size=v.spatial_merge_size,
                rope_theta=(v.rope_parameters or {}).get("rope_theta", 10000.0),
                **vision,
            ),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=hf.vision_end_token_id,
            pad_token_id=t.pad_token_id,
            **special,
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
        merged = _hf_config_class(self.family)(**base).to_dict()
        merged.pop("transformers_version", None)
        return _deep_update(merged, ours)

    def _architecture_dict(self) -> dict:
        t, v = self.text, self.vision
        eos = list(self.eos_token_ids)
        common_vision = {
            "depth": v.depth,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        text = {"bos_token_id": self.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
        if self.family == "qwen2_5_vl":
            vision = {"hidden_size": v.embed_dim, "out_hidden_size": v.out_dim, "hidden_act": "silu",
                      "intermediate_size": v.mlp_dim, "window_size": v.window_size,
                      "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second}
        elif self.family == "qwen3_vl":
            vision = {"hidden_size": v.embed_dim, "out_hidden_size": v.out_dim, "hidden_act": "gelu_pytorch_tanh",
                      "intermediate_size": v.mlp_dim, "num_position_embeddings": v.num_position_embeddings,
                      "deepstack_visual_indexes": list(v.deepstack_visual_indexes)}
            text = {"head_dim": t.head_dim, "attention_bias": False}  # no bos/eos: the class has no such fields
        else:
            vision = {"embed_dim": v.embed_dim, "hidden_size": v.out_dim, "hidden_act": "quick_gelu",
                      "mlp_ratio": v.mlp_ratio}
        return {
            "architectures": [FAMILIES[self.family][0]],
            "model_type": self.family,
            "dtype": self.param_dtype.name,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": f"{self.family}_text",
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
                    "rope_theta": t.rope_theta,  # Qwen3-VL's `mrope_interleaved` flag: HF ignores it
                },
                **({} if self.family == "qwen3_vl" else {"use_sliding_window": False}),
                "pad_token_id": self.pad_token_id,
                **text,
            },
            "vision_config": {"model_type": f"{self.family}_vision", **common_vision, **vision},
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


    @classmethod
    def qwen2_5_vl_3b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2.5-VL-3B-Instruct."""
        return cls(family="qwen2_5_vl", text=_qwen2_5_text(151936, 2048, 11008, 36, 16, 2),
                   vision=_window_vit(out_dim=2048), tie_word_embeddings=True, **runtime)

    @classmethod
    def qwen2_5_vl_7b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2.5-VL-7B-Instruct."""
        return cls(family="qwen2_5_vl", text=_qwen2_5_text(152064, 3584, 18944, 28, 28, 4),
                   vision=_window_vit(out_dim=3584), tie_word_embeddings=False, **runtime)

    @classmethod
    def qwen2_5_vl_32b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2.5-VL-32B-Instruct."""
        return cls(family="qwen2_5_vl", text=_qwen2_5_text(152064, 5120, 27648, 64, 40, 8),
                   vision=_window_vit(out_dim=5120), tie_word_embeddings=False, **runtime)

    @classmethod
    def qwen2_5_vl_72b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen2.5-VL-72B-Instruct."""
        return cls(family="qwen2_5_vl", text=_qwen2_5_text(152064, 8192, 29568, 80, 64, 8),
                   vision=_window_vit(out_dim=8192), tie_word_embeddings=False, **runtime)

    @classmethod
    def qwen3_vl_2b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen3-VL-2B-Instruct."""
        return cls(family="qwen3_vl", text=_qwen3_text(2048, 6144, 28, 16), vision=_deepstack_vit(2048, small=True),
                   tie_word_embeddings=True, **runtime)

    @classmethod
    def qwen3_vl_4b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen3-VL-4B-Instruct: 32 heads of 128, so q is 4096 wide over a 2560 residual."""
        return cls(family="qwen3_vl", text=_qwen3_text(2560, 9728, 36, 32), vision=_deepstack_vit(2560, small=True),
                   tie_word_embeddings=True, **runtime)

    @classmethod
    def qwen3_vl_8b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen3-VL-8B-Instruct."""
        return cls(family="qwen3_vl", text=_qwen3_text(4096, 12288, 36, 32), vision=_deepstack_vit(4096, small=False),
                   tie_word_embeddings=False, **runtime)

    @classmethod
    def qwen3_vl_32b(cls, **runtime) -> Qwen2VLConfig:
        """Qwen/Qwen3-VL-32B-Instruct: the LM is Qwen3-32B's (untied); field-2026-12b.md marks this row unverified
        against the hub's config, and a run compares the checkpoint's config.json with the preset."""
        return cls(family="qwen3_vl", text=_qwen3_text(5120, 25600, 64, 64), vision=_deepstack_vit(5120, small=False),
                   tie_word_embeddings=False, **runtime)


def _qwen2_5_text(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> TextConfig:
    # Qwen2's decoder as every Qwen2.5-VL checkpoint configures it (the class defaults' rms_norm_eps is 1e-5).
    return TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, rms_norm_eps=1e-6, max_position_embeddings=128000)


def _qwen3_text(hidden: int, ffn: int, layers: int, heads: int) -> TextConfig:
    # Every dense Qwen3-VL: 8 KV heads of 128, the 151936 vocabulary, interleaved M-RoPE 24/20/20 at theta 5e6.
    return TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                      num_kv_heads=8, rms_norm_eps=1e-6, rope_theta=5_000_000.0, mrope_section=(24, 20, 20),
                      max_position_embeddings=262144, qkv_bias=False, qk_norm=True, mrope_interleaved=True,
                      explicit_head_dim=128)


def _deepstack_vit(out_dim: int, *, small: bool) -> VisionConfig:
    # SigLIP2-Large-like (2B, 4B) or SO400M-like (8B, 32B); patch 16, a 48 x 48 position table, DeepStack at
    # three blocks.
    width, depth, mlp, deepstack = (1024, 24, 4096, (5, 11, 17)) if small else (1152, 27, 4304, (8, 16, 24))
    return VisionConfig(depth=depth, embed_dim=width, num_heads=16, intermediate_size=mlp, out_dim=out_dim,
                        patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=deepstack)


def _ids(value) -> tuple[int, ...]:
    return () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_update(out[key], value) if nested else value
    return out


def _real_vit(out_dim: int) -> VisionConfig:
    # The same 675M-parameter ViT serves every Qwen2-VL size; only the merger's output width changes.
    return VisionConfig(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, out_dim=out_dim)


def _window_vit(out_dim: int) -> VisionConfig:
    # Every Qwen2.5-VL size: 112-pixel windows (4x4 merged tokens), full attention in every eighth block.
    return VisionConfig(depth=32, embed_dim=1280, num_heads=16, intermediate_size=3420, out_dim=out_dim,
                        window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)


def _hf_config_class(family: str):
    import transformers  # only the config classes; no torch needed

    return getattr(transformers, FAMILIES[family][1])


def _parse_hf_dict(d: dict):
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type not in FAMILIES:
        known = ", ".join(f"{family} ({arch})" for family, (arch, _) in FAMILIES.items())
        raise UnsupportedConfigError(
            f"unsupported architecture: config.json has model_type={model_type!r}, architectures={archs}; "
            f"vrft_jax ports {known}")
    if archs and FAMILIES[model_type][0] not in archs:
        raise UnsupportedConfigError(
            f"unsupported architecture {archs}: a {model_type} checkpoint converts as {FAMILIES[model_type][0]}")
    return _hf_config_class(model_type)(**d)


def _check_supported(hf) -> None:
    t, v = hf.text_config, hf.vision_config
    vision_act = VISION_ACT[hf.model_type]
    problems = []
    if getattr(t, "use_sliding_window", False):
        problems.append("text_config.use_sliding_window=True (sliding-window attention is not implemented)")
    if t.hidden_act != "silu":
        problems.append(f"text_config.hidden_act={t.hidden_act!r} (expected 'silu')")
    if v.hidden_act != vision_act:
        problems.append(f"vision_config.hidden_act={v.hidden_act!r} (expected {vision_act!r})")
    rope_type = (t.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in ("default", "mrope"):
        problems.append(f"text_config.rope_parameters.rope_type={rope_type!r} (only M-RoPE without scaling)")
    derived_head_dim = t.hidden_size // t.num_attention_heads
    if hf.model_type != "qwen3_vl" and getattr(t, "head_dim", None) not in (None, derived_head_dim):
        problems.append(f"text_config.head_dim={t.head_dim} differs from hidden_size/num_attention_heads")
    if hf.model_type == "qwen3_vl" and getattr(t, "attention_bias", False):
        problems.append("text_config.attention_bias=True (Qwen3-VL's released models have none)")
    if problems:
        raise UnsupportedConfigError(f"unsupported {hf.model_type} variant: " + "; ".join(problems))


def _validate(c: Qwen2VLConfig) -> None:
    t, v = c.text, c.vision
    errors = []
    if t.explicit_head_dim is None and t.hidden_size % t.num_heads:
        errors.append(f"text.hidden_size={t.hidden_size} is not divisible by text.num_heads={t.num_heads}")
    if t.num_heads % t.num_kv_heads:
        errors.append(f"text.num_heads={t.num_heads} is not divisible by text.num_kv_heads={t.num_kv_heads}")
    if t.head_dim % 2 or sum(t.mrope_section) != t.head_dim // 2:
        errors.append(f"text.mrope_section={t.mrope_section} must sum to head_dim/2={t.head_dim // 2}")
    if v.embed_dim % v.num_heads or v.head_dim % 4:
        errors.append(f"vision.embed_dim={v.embed_dim}/num_heads={v.num_heads} must give a head_dim divisible by 4")
    if v.out_dim != t.hidden_size:
        errors.append(f"vision.out_dim={v.out_dim} must equal text.hidden_size={t.hidden_size}")
    if c.family not in FAMILIES:
        errors.append(f"family={c.family!r} is not one of {tuple(FAMILIES)}")
    windowed = c.family == "qwen2_5_vl"
    if windowed and not (v.intermediate_size and v.window_size and v.window_patches):
        errors.append(f"a qwen2_5_vl vision tower needs intermediate_size and a window_size of at least "
                      f"{v.spatial_merge_size * v.patch_size} pixels (got {v.intermediate_size}, {v.window_size})")
    if c.family == "qwen2_vl" and v.intermediate_size:
        errors.append("intermediate_size is not qwen2_vl's (its MLP is embed_dim * mlp_ratio wide)")
    if not windowed and (v.window_size or v.fullatt_block_indexes):
        errors.append(f"window_size and fullatt_block_indexes are qwen2_5_vl's, not {c.family}'s")
    deep = c.family == "qwen3_vl"
    if deep != bool(v.num_position_embeddings and v.intermediate_size) or (not deep and v.deepstack_visual_indexes):
        errors.append("num_position_embeddings and deepstack_visual_indexes are qwen3_vl's (which needs "
                      f"num_position_embeddings and intermediate_size), not {c.family}'s")
    if v.num_position_embeddings and int(v.num_position_embeddings ** 0.5) ** 2 != v.num_position_embeddings:
        errors.append(f"vision.num_position_embeddings={v.num_position_embeddings} is not a square")
    if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)) or any(
            not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
        errors.append(f"vision.deepstack_visual_indexes={v.deepstack_visual_indexes} must increase within [0, depth)")
    if len(v.deepstack_visual_indexes) > t.num_layers:
        errors.append(f"{len(v.deepstack_visual_indexes)} DeepStack features but only {t.num_layers} decoder layers")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
        errors.append(f"vision.fullatt_block_indexes={v.fullatt_block_indexes} must lie in [0, depth={v.depth})")
    if c.remat not in REMAT_POLICIES:
        errors.append(f"remat={c.remat!r} is not one of {REMAT_POLICIES}")
    if errors:
        raise ValueError("invalid Qwen2VLConfig: " + "; ".join(errors))
