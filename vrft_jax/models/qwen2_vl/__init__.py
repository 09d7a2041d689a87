"""The Qwen-VL families in Flax NNX (the package keeps the name of the first): Qwen2-VL, Qwen2.5-VL and Qwen3-VL
dense, numerically equal to Hugging Face's `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`
and `Qwen3VLForConditionalGeneration`; `Qwen2VLConfig.family` says which."""

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, UnsupportedConfigError, VisionConfig
from vrft_jax.models.qwen2_vl.inputs import InputError, ModelInputs, pack_example
from vrft_jax.models.qwen2_vl.model import Qwen2VL, forward, forward_hf, random_init, with_config
from vrft_jax.models.qwen2_vl.rope import get_rope_index
from vrft_jax.models.qwen2_vl.text import KVCache

__all__ = [
    "InputError", "KVCache", "ModelInputs", "Qwen2VL", "Qwen2VLConfig", "TextConfig", "UnsupportedConfigError",
    "VisionConfig", "forward", "forward_hf", "get_rope_index", "pack_example", "random_init", "with_config",
]
