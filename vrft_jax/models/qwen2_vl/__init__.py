"""Qwen2-VL in Flax NNX, numerically equal to Hugging Face's `Qwen2VLForConditionalGeneration`."""

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, UnsupportedConfigError, VisionConfig
from vrft_jax.models.qwen2_vl.inputs import InputError, ModelInputs, pack_example
from vrft_jax.models.qwen2_vl.model import Qwen2VL, forward, forward_hf, random_init, with_config
from vrft_jax.models.qwen2_vl.rope import get_rope_index
from vrft_jax.models.qwen2_vl.text import KVCache

__all__ = [
    "InputError", "KVCache", "ModelInputs", "Qwen2VL", "Qwen2VLConfig", "TextConfig", "UnsupportedConfigError",
    "VisionConfig", "forward", "forward_hf", "get_rope_index", "pack_example", "random_init", "with_config",
]
