"""Model checkpoints on disk (orbax).

A model directory holds `config.json` (the HF form of the architecture, so the export back to HF is
exact), `params/` (an orbax checkpoint of the parameters) and `hf_assets/` (tokenizer, processor and
generation files carried over from the source HF checkpoint, so the exported model can be served).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from vrft_jax import sharding
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL, with_config

HF_ASSETS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
             "chat_template.json", "chat_template.jinja")
CONFIG_FILE, PARAMS_DIR, ASSETS_DIR = "config.json", "params", "hf_assets"


def save_model(model: Qwen2VL, directory: str, *, hf_source: str | None = None) -> None:
    """Write `model` to `directory`; `hf_source` (an HF checkpoint directory) supplies the config fields we
    do not model and the tokenizer/processor assets."""
    from model_port.flax_to_hf import hf_config_dict

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    base = None
    if hf_source is not None:
        with open(os.path.join(hf_source, CONFIG_FILE), encoding="utf-8") as f:
            base = json.load(f)
        copy_hf_assets(hf_source, os.path.join(directory, ASSETS_DIR))
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(model, base), f, indent=2, sort_keys=True)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, nnx.state(model, nnx.Param))


def load_model(directory: str, *, dtype=None, compute_dtype=None, mesh=None, rules=sharding.DEFAULT_RULES,
               with_hf_config: bool = False, **runtime):
    """Restore a model saved by `save_model`, sharded by `rules` when a mesh is given.

    `dtype` casts the parameters (default: as saved). Returns the model, or (model, HF config dict).
    """
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        hf_config = json.load(f)
    saved_dtype = jnp.dtype(hf_config.get("dtype") or "float32")
    config = Qwen2VLConfig.from_hf(hf_config, param_dtype=saved_dtype, dtype=compute_dtype or dtype or saved_dtype,
                                   **runtime)
    abstract = nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    placements = (sharding.state_shardings(state, mesh, rules) if mesh is not None else
                  jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, placements)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(directory, PARAMS_DIR), target)
    model = nnx.merge(graphdef, restored)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        model = with_config(model, param_dtype=dtype)
    return (model, hf_config) if with_hf_config else model


def copy_hf_assets(source: str, destination: str) -> list[str]:
    """Copy the tokenizer/processor/generation files present in `source` (or its `hf_assets/`)."""
    for root in (os.path.join(source, ASSETS_DIR), source):
        names = [n for n in HF_ASSETS if os.path.isfile(os.path.join(root, n))]
        if names:
            os.makedirs(destination, exist_ok=True)
            for name in names:
                shutil.copy2(os.path.join(root, name), os.path.join(destination, name))
            return names
    return []
