"""Qwen2VLConfig reads both HF config forms of each family, knows the real shapes, and refuses what it cannot run."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import HF_CLASSES, TINY_CONFIGS
from vrft_jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, UnsupportedConfigError

# The hub's legacy flat config.json of a Qwen2-VL-2B-shaped model (rope_scaling, in_chans).
LEGACY_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
    "intermediate_size": 8960, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "vocab_size": 151936,
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "torch_dtype": "bfloat16",
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def parameter_count(config: Qwen2VLConfig) -> int:
    abstract = nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def hf_config(family: str, d: dict):
    return getattr(transformers, HF_CLASSES[family][0])(**d)


def hf_parameter_count(config: Qwen2VLConfig) -> int:
    with torch.device("meta"):
        model = getattr(transformers, HF_CLASSES[config.family][1])(hf_config(config.family, config.to_hf_dict()))
    return sum(p.numel() for p in model.parameters())


def test_legacy_flat_hub_config_reads_as_the_2b_preset():
    assert Qwen2VLConfig.from_hf(LEGACY_2B) == Qwen2VLConfig.qwen2_vl_2b()


@pytest.mark.parametrize("tiny", TINY_CONFIGS, ids=lambda t: t.name)
def test_nested_transformers5_config_round_trips(tiny):
    original = hf_config(tiny.family, tiny.hf).to_dict()
    config = Qwen2VLConfig.from_hf(original)
    assert config.family == tiny.family
    assert config.text.mrope_section == tuple(tiny.hf["text_config"]["rope_parameters"]["mrope_section"])
    assert config.tie_word_embeddings == tiny.hf["tie_word_embeddings"]
    assert Qwen2VLConfig.from_hf(config.to_hf_dict()) == config
    again = hf_config(tiny.family, config.to_hf_dict()).to_dict()
    for key in ("text_config", "vision_config"):
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "rope_parameters", "depth", "embed_dim", "num_heads", "mlp_ratio",
                      "out_hidden_size", "window_size", "fullatt_block_indexes", "tokens_per_second", "hidden_act"):
            assert again[key].get(field) == original[key].get(field), (key, field)


def test_qwen2_5_vl_presets_carry_the_checkpoints_values_not_the_class_defaults():
    """transformers' Qwen2_5_VLVisionConfig defaults tokens_per_second to 4 and hidden_size to 3584; the released
    checkpoints say 2 and 1280 (field-2026-12b.md 1.1). A preset's export must say what the checkpoints say."""
    vision = Qwen2VLConfig.qwen2_5_vl_7b().to_hf_dict()["vision_config"]
    assert (vision["tokens_per_second"], vision["hidden_size"], vision["out_hidden_size"]) == (2, 1280, 3584)
    assert (vision["window_size"], vision["fullatt_block_indexes"], vision["intermediate_size"]) == \
        (112, [7, 15, 23, 31], 3420)
    assert Qwen2VLConfig.qwen2_5_vl_7b().vision.window_patches == 8  # 4x4 merged tokens of 2x2 patches


@pytest.mark.parametrize("preset,expected", [("qwen2_vl_2b", 2_208_985_600), ("qwen2_vl_7b", 8_291_375_616)])
def test_real_presets_have_exactly_the_hf_parameter_count(preset, expected):
    config = getattr(Qwen2VLConfig, preset)()
    ours = parameter_count(config)
    assert ours == hf_parameter_count(config)
    assert ours == expected  # the counts published for Qwen2-VL-2B/7B-Instruct


@pytest.mark.parametrize("preset", ["qwen2_vl_72b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b",
                                    "qwen2_5_vl_72b"])
def test_presets_match_hf_count(preset):
    config = getattr(Qwen2VLConfig, preset)()
    assert parameter_count(config) == hf_parameter_count(config)


def test_bad_configs_name_the_field():
    seven = Qwen2VLConfig.qwen2_vl_7b()
    with pytest.raises(ValueError, match=r"mrope_section=\(16, 24, 20\) must sum to head_dim/2=64"):
        seven.replace(text=dataclasses.replace(seven.text, mrope_section=(16, 24, 20)))
    with pytest.raises(ValueError, match="remat='sometimes'"):
        Qwen2VLConfig.qwen2_vl_2b(remat="sometimes")
    with pytest.raises(UnsupportedConfigError, match="model_type='llava'"):
        Qwen2VLConfig.from_hf({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu'"):
        Qwen2VLConfig.from_hf({**LEGACY_2B, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedConfigError, match="a qwen2_5_vl checkpoint converts as Qwen2_5_VLForCond"):
        Qwen2VLConfig.from_hf({**LEGACY_2B, "model_type": "qwen2_5_vl"})
    with pytest.raises(ValueError, match="window_size of at least 28 pixels"):
        seven = Qwen2VLConfig.qwen2_5_vl_7b()
        seven.replace(vision=dataclasses.replace(seven.vision, window_size=20))
    with pytest.raises(ValueError, match=r"fullatt_block_indexes=\(32,\) must lie in \[0, depth=32\)"):
        seven.replace(vision=dataclasses.replace(seven.vision, fullatt_block_indexes=(32,)))
    with pytest.raises(ValueError, match="are qwen2_5_vl's, not qwen2_vl's"):
        Qwen2VLConfig.qwen2_vl_2b().replace(vision=dataclasses.replace(Qwen2VLConfig.qwen2_vl_2b().vision,
                                                                         window_size=112))


def test_runtime_dtypes_are_separate():
    config = Qwen2VLConfig.qwen2_vl_2b(param_dtype="float32", dtype="bfloat16")
    assert config.param_dtype == np.float32 and config.dtype == jax.numpy.bfloat16
