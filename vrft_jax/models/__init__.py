"""The Qwen-VL models, one interface for every family (`Qwen2VLConfig.family`: Qwen2-VL, Qwen2.5-VL).

    model = model_port.hf_to_flax.load_hf(directory)      # the family from config.json's model_type
    logits = vrft_jax.models.forward_hf(model, **processor(images=..., text=..., return_tensors="np"))
"""

from vrft_jax.models.qwen2_vl import (
    ModelInputs,
    Qwen2VL,
    Qwen2VLConfig,
    forward,
    forward_hf,
    random_init,
    with_config,
)
from vrft_jax.models.qwen2_vl.config import FAMILIES

__all__ = ["FAMILIES", "ModelInputs", "Qwen2VL", "Qwen2VLConfig", "forward", "forward_hf", "random_init",
           "with_config"]
