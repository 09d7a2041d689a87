"""Reference fixtures: tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL configs with every parameter randomised, in PyTorch,
and the awkward batches that catch porting bugs (mixed image sizes, sides not multiples of 28, left and
right padding, a text-only row, two images in one prompt)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


@dataclasses.dataclass(frozen=True)
class Tiny:
    name: str
    hf: dict

    @property
    def family(self) -> str:
        return self.hf.get("model_type", "qwen2_vl")

    @property
    def eos_token_id(self) -> int:
        """2 in every tiny config (Qwen3-VL's text config has no field for it: its generation config does)."""
        return self.hf["text_config"].get("eos_token_id", 2)

    @property
    def image_token_id(self) -> int:
        return self.hf["image_token_id"]


def _config(name, *, vocab, hidden, inter, layers, heads, kv, section, theta, vdepth, vembed, vheads, vmlp,
            tie, eps, base_id):
    return Tiny(name, dict(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         rms_norm_eps=eps,
                         rope_parameters={"rope_type": "default", "mrope_section": list(section), "rope_theta": theta},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=vdepth, embed_dim=vembed, num_heads=vheads, hidden_size=hidden, mlp_ratio=vmlp,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=base_id, vision_start_token_id=base_id + 1, vision_end_token_id=base_id + 2,
        video_token_id=base_id + 3, tie_word_embeddings=tie))


def _window_config(name, *, window, fullatt, vdepth, vembed, vheads, vinter, **text):
    """A tiny Qwen2.5-VL: Qwen2-VL's decoder, the windowed RMSNorm/SwiGLU vision tower."""
    tiny = _config(name, vdepth=vdepth, vembed=vembed, vheads=vheads, vmlp=2, **text)
    vision = dict(depth=vdepth, hidden_size=vembed, out_hidden_size=text["hidden"], intermediate_size=vinter,
                  num_heads=vheads, hidden_act="silu", window_size=window, fullatt_block_indexes=list(fullatt),
                  tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Tiny(name, {**tiny.hf, "model_type": "qwen2_5_vl", "vision_config": vision})


def _deepstack_config(name, *, deepstack, vdepth, vembed, vheads, vinter, positions, head_dim, tie, **text):
    """A tiny Qwen3-VL: no q/k/v bias, q/k norms, its own head_dim, interleaved M-RoPE, patch 16 with a biased
    patch embedding, a learned position table, tanh-GELU vision MLP, DeepStack."""
    tiny = _config(name, vdepth=vdepth, vembed=vembed, vheads=vheads, vmlp=2, tie=tie, eps=1e-6, **text)
    text_config = {**tiny.hf["text_config"], "head_dim": head_dim, "attention_bias": False}
    for key in ("bos_token_id", "eos_token_id"):
        text_config.pop(key)
    vision = dict(depth=vdepth, hidden_size=vembed, out_hidden_size=text["hidden"], intermediate_size=vinter,
                  num_heads=vheads, hidden_act="gelu_pytorch_tanh", num_position_embeddings=positions,
                  deepstack_visual_indexes=list(deepstack), patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    return Tiny(name, {**tiny.hf, "model_type": "qwen3_vl", "text_config": text_config, "vision_config": vision})


TINY_CONFIGS = (
    # GQA 4:2, untied head, the environment's reference shape.
    _config("gqa", vocab=1024, hidden=64, inter=128, layers=2, heads=4, kv=2, section=(2, 3, 3), theta=1e6,
            vdepth=2, vembed=32, vheads=2, vmlp=2, tie=False, eps=1e-6, base_id=1000),
    # Multi-head (kv = heads), tied embeddings, wider heads, 3 layers.
    _config("tied_mha", vocab=512, hidden=128, inter=160, layers=3, heads=4, kv=4, section=(4, 6, 6), theta=1e4,
            vdepth=3, vembed=64, vheads=4, vmlp=4, tie=True, eps=1e-5, base_id=500),
    # One shared kv head (GQA 6:1), uneven vision heads.
    _config("mqa", vocab=2048, hidden=96, inter=192, layers=2, heads=6, kv=1, section=(2, 3, 3), theta=1e6,
            vdepth=2, vembed=48, vheads=3, vmlp=2, tie=False, eps=1e-6, base_id=1900),
    # Qwen2.5-VL with the released 112-pixel windows (4x4 merged tokens): `mixed_batch`'s merged grids 2x3,
    # 4x5, 2x2 and 3x3 give sides that are (4: HF pads a whole empty window) and are not multiples of the
    # window, two images in a row; full attention in the last block; a SwiGLU width that is no multiple of 32.
    _window_config("window", window=112, fullatt=(2,), vdepth=3, vembed=32, vheads=2, vinter=56, vocab=1024,
                   hidden=64, inter=128, layers=2, heads=4, kv=2, section=(2, 3, 3), theta=1e6, tie=False,
                   eps=1e-6, base_id=1000),
    # 56-pixel windows (2x2 merged tokens), so every image spans several; full attention in the first block,
    # tied embeddings.
    _window_config("window_small", window=56, fullatt=(0,), vdepth=2, vembed=48, vheads=3, vinter=80, vocab=512,
                   hidden=96, inter=160, layers=2, heads=6, kv=2, section=(2, 3, 3), theta=1e6, tie=True,
                   eps=1e-6, base_id=400),
    # Qwen3-VL: head_dim 24 over a 64-wide residual of 4 heads (q is 96 wide), DeepStack at the first and the last
    # vision block into decoder layers 0 and 1 of 3, a 6 x 6 position table that images both under- and over-fill.
    _deepstack_config("deepstack", deepstack=(0, 2), vdepth=3, vembed=32, vheads=2, vinter=56, positions=36,
                      head_dim=24, tie=False, vocab=1024, hidden=64, inter=128, layers=3, heads=4, kv=2,
                      section=(4, 4, 4), theta=5e6, base_id=1000),
    # One DeepStack block in the middle, tied embeddings, GQA 6:2 with head_dim 8 (16 = hidden / heads otherwise).
    _deepstack_config("deepstack_tied", deepstack=(1,), vdepth=3, vembed=48, vheads=3, vinter=64, positions=64,
                      head_dim=8, tie=True, vocab=512, hidden=96, inter=160, layers=2, heads=6, kv=2,
                      section=(2, 1, 1), theta=5e6, base_id=400),
)


HF_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
              "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
              "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}


def random_hf_model(tiny: Tiny, seed: int = 0, dtype=torch.float32) -> transformers.PreTrainedModel:
    """An HF model of the tiny's family with every parameter (norms and biases included) drawn at random."""
    torch.manual_seed(seed)
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[tiny.family])
    model = model_class(config_class(**tiny.hf, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * (1.5 / fan_in ** 0.5 if "embed_tokens" not in name else 1.0))
    return model.to(dtype)


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_processor(family: str = "qwen2_vl") -> Qwen2VLImageProcessorPil:
    """The family's image processor on small images: Qwen3-VL's patches are 16 pixels, normalised by 0.5 / 0.5."""
    if family == "qwen3_vl":
        return Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=160 * 160, patch_size=16,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=140 * 140)


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray

    def torch(self, image_token_id: int) -> dict:
        ids = torch.from_numpy(self.input_ids).long()
        return dict(input_ids=ids, attention_mask=torch.from_numpy(self.attention_mask).long(),
                    pixel_values=torch.from_numpy(self.pixel_values),
                    image_grid_thw=torch.from_numpy(self.image_grid_thw),
                    mm_token_type_ids=(ids == image_token_id).long())

    def numpy(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw)


def mixed_batch(tiny: Tiny, seed: int = 0, image_sizes=((56, 84), (100, 130), (70, 45), (84, 84)), *,
                padding: str = "mixed", length: int | None = None) -> Batch:
    """Four rows: [1 image] [2 images of different sizes] [text only] [1 image].

    padding="mixed": rows 0 and 2 left-padded, row 1 right-padded, row 3 unpadded (filled with text);
    padding="left": every row left-padded, as generation needs. Sides 100, 130, 70 and 45 are not
    multiples of 28. `length` fixes the padded length (default: longest row + 3).
    """
    rng = np.random.default_rng(seed)
    vocab = tiny.hf["text_config"]["vocab_size"]
    img, vs, ve = tiny.image_token_id, tiny.image_token_id + 1, tiny.image_token_id + 2
    processed = image_processor(tiny.family)(images=[image(h, w, seed + i) for i, (h, w) in enumerate(image_sizes)],
                                  return_tensors="np")
    grids = processed["image_grid_thw"]
    tokens_of = [int(np.prod(g)) // 4 for g in grids]

    def text(n):
        return [int(t) for t in rng.integers(3, min(vocab, img) - 1, n)]

    def vision(i):
        return [vs] + [img] * tokens_of[i] + [ve]

    rows = [
        text(3) + vision(0) + text(5),
        text(2) + vision(1) + text(2) + vision(2) + text(4),
        text(9),
        text(4) + vision(3) + text(3),
    ]
    length = length or max(len(r) for r in rows) + 3
    left = (True, False, True, False) if padding == "mixed" else (True,) * 4
    ids = np.zeros((4, length), np.int64)
    mask = np.zeros((4, length), np.int64)
    for b, row in enumerate(rows):
        if padding == "mixed" and b == 3:
            row = row + text(length - len(row))
        if len(row) > length:
            raise ValueError(f"row {b} has {len(row)} tokens, more than length={length}")
        start = length - len(row) if left[b] else 0
        ids[b, start:start + len(row)] = row
        mask[b, start:start + len(row)] = 1
    return Batch(ids, mask, processed["pixel_values"].astype(np.float32), grids.astype(np.int64))


def concat(*batches: Batch) -> Batch:
    """Stack batches of equal length along the batch axis (images keep their row order)."""
    return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in
                   ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")))


def count_vision_calls(monkeypatch) -> list[int]:
    """Record the batch size of every run of the vision tower (at run time, from inside jit)."""
    import jax

    from vrft_jax.models.qwen2_vl.vision import VisionTower

    calls: list[int] = []
    original = VisionTower.__call__

    def counted(self, patches, segments, positions):
        jax.debug.callback(lambda n: calls.append(int(n)), patches.shape[0])
        return original(self, patches, segments, positions)

    monkeypatch.setattr(VisionTower, "__call__", counted)
    return calls
