"""A tiny Qwen2-VL built directly in Flax (no torch, no conversion) for tests that only need its
parameters and state: model directories and run checkpoints."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL


def tiny_config(**runtime) -> Qwen2VLConfig:
    """Every sharded dimension divisible by 8, so an 8-device FSDP mesh splits every matrix."""
    return Qwen2VLConfig(
        text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(1, 1, 2)),
        vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, out_dim=32, patch_size=2,
                            temporal_patch_size=1),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63, bos_token_id=None,
        eos_token_ids=(1,), **runtime)


def tiny_model(seed: int = 0, **runtime) -> Qwen2VL:
    """Random parameters drawn on the host: the model's own initialisers run op by op and take seconds."""
    config = tiny_config(**runtime)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jax.numpy.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract)
    return nnx.merge(graphdef, state)
