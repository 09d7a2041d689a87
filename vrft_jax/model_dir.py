"""A model directory on disk: the weights of one Qwen2-VL with what it takes to serve or export it.

    config.json   the HF form of the architecture, so the export back to HF is exact
    params/       an orbax checkpoint of the parameters
    hf_assets/    tokenizer, processor and generation files carried over from the source HF checkpoint

This is a model, not a run: run checkpoints (optimizer state, data position, ...) are `checkpoints.py`.

Saving over an existing directory never leaves it without a complete set of parameters: the new ones
are written to `params.pending/` (orbax itself writes to a temporary name and renames it when the
save is complete), and only then swapped in for `params/` by two renames, the old copy becoming
`params.old/` until the new one is in place. `load_model` and the next `save_model` recover from a
crash anywhere in between. `config.json` and the assets follow the parameters, each replaced by one
rename. Renames make this safe on local (and mounted) filesystems. In a multi-process run every
process takes part in the orbax save (each writes its own shards) while process 0 alone writes the
metadata, swaps and deletes.
"""

from __future__ import annotations

import glob
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
PENDING_DIR, OLD_DIR = PARAMS_DIR + ".pending", PARAMS_DIR + ".old"


def save_model(model: Qwen2VL, directory: str, *, hf_source: str | None = None) -> None:
    """Write `model` to `directory`, replacing a model saved there before only once it is fully written.

    `hf_source` (an HF checkpoint directory) supplies the config fields we do not model and the
    tokenizer/processor assets. Every process must call it (the parameters are saved collectively).
    """
    directory = os.path.abspath(directory)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(directory, exist_ok=True)
        _recover(directory)
        # Never the only complete copy once `_recover` ran; orbax's temporary dirs are unfinished saves.
        stale = [os.path.join(directory, n) for n in (PENDING_DIR, OLD_DIR)]
        for path in stale + glob.glob(os.path.join(glob.escape(directory), PENDING_DIR + ".*")):
            shutil.rmtree(path, ignore_errors=True)
    _sync_processes("vrft_jax.model_dir.save_model:prepared")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, PENDING_DIR), nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
    _sync_processes("vrft_jax.model_dir.save_model:written")
    if primary:
        _swap_in_pending(directory)
        base = None
        if hf_source is not None:
            with open(os.path.join(hf_source, CONFIG_FILE), encoding="utf-8") as f:
                base = json.load(f)
            copy_hf_assets(hf_source, os.path.join(directory, ASSETS_DIR))
        _write_atomically(os.path.join(directory, CONFIG_FILE),
                          json.dumps(model.config.to_hf_dict(base), indent=2, sort_keys=True))
    _sync_processes("vrft_jax.model_dir.save_model:done")


def load_model(directory: str, *, dtype=None, compute_dtype=None, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.DEFAULT_RULES, with_hf_config: bool = False, **runtime):
    """Restore a model saved by `save_model`, each parameter sharded by `rules` over `mesh`.

    mesh: default `sharding.make_mesh()`, FSDP over every device, so that no single device has to
      hold the whole model (on a one-device host that device holds it, as it must).
    dtype: casts the parameters (default: as saved).
    Returns the model, or (model, HF config dict).
    """
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        hf_config = json.load(f)
    saved_dtype = jnp.dtype(hf_config.get("dtype") or "float32")
    config = Qwen2VLConfig.from_hf(hf_config, param_dtype=saved_dtype, dtype=compute_dtype or dtype or saved_dtype,
                                   **runtime)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    placements = sharding.state_shardings(state, sharding.make_mesh() if mesh is None else mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, placements)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(params_path(directory), target)
    model = nnx.merge(graphdef, restored)
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        model = with_config(model, param_dtype=dtype)
    return (model, hf_config) if with_hf_config else model


def params_path(directory: str) -> str:
    """The complete parameter checkpoint of `directory`: `params/`, or after a crash mid-swap the new
    (`params.pending/`, finalized by orbax) or else the old (`params.old/`) copy."""
    for name in (PARAMS_DIR, PENDING_DIR, OLD_DIR):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"{directory} holds no {PARAMS_DIR}/ checkpoint (not a model directory)")


def copy_hf_assets(source: str, destination: str) -> list[str]:
    """Copy the tokenizer/processor/generation files present in `source` (or its `hf_assets/`), each
    replacing its namesake in one rename."""
    for root in (os.path.join(source, ASSETS_DIR), source):
        names = [n for n in HF_ASSETS if os.path.isfile(os.path.join(root, n))]
        if names:
            os.makedirs(destination, exist_ok=True)
            for name in names:
                temporary = os.path.join(destination, f".{name}.tmp")
                shutil.copy2(os.path.join(root, name), temporary)
                os.replace(temporary, os.path.join(destination, name))
            return names
    return []


def _recover(directory: str) -> None:
    """After a crash between the two renames of a swap, make `params/` the complete copy again."""
    if os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        return
    for name in (PENDING_DIR, OLD_DIR):  # the newer complete copy first
        if os.path.isdir(os.path.join(directory, name)):
            os.rename(os.path.join(directory, name), os.path.join(directory, PARAMS_DIR))
            return


def _swap_in_pending(directory: str) -> None:
    params, pending, old = (os.path.join(directory, n) for n in (PARAMS_DIR, PENDING_DIR, OLD_DIR))
    if os.path.isdir(params):
        os.rename(params, old)  # a directory cannot be renamed over a non-empty one
    os.rename(pending, params)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
