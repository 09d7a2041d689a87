"""A model directory: the weights of one Qwen2-VL with what it takes to serve or export it, on a local
disk or in a bucket (`gs://...`; every file goes through `vrft_jax.storage`).

    config.json   the HF form of the architecture, so the export back to HF is exact
    params.json   {"params": "params-<n>"}: which parameter checkpoint is the model's, written last
    params-<n>/   an orbax checkpoint of the parameters
    lora.json     only in an adapter directory (`save_adapters`): the adapters' shape (`LoRAConfig`); its
                  parameters are then the adapters alone, to load onto their base model (`load_adapters`)
    hf_assets/    tokenizer, processor, chat template and generation files carried over from the source HF
                  checkpoint (`HF_ASSETS`, whichever it has); what it lacks of the tokenizer and the generation
                  config, a run adds from what it trained with (`add_missing_assets`)

This is a model, not a run: run checkpoints (optimizer state, data position, ...) are `checkpoints.py`.

Saving over an existing model never leaves the directory without a complete set of parameters, on a
disk or in a bucket (which has no directory rename): the new parameters go to a new `params-<n+1>/`,
`config.json` and the assets are replaced (each in one atomic write), and only then does the pointer
`params.json` (one atomic write) name the new checkpoint, after which the old one is deleted. A crash
before the pointer leaves the previous model in force; what it left behind is deleted by the next save.
A directory written before the pointer existed (`params/` alone) still loads. In a multi-process run
every process takes part in the orbax save (each writes its own shards) while process 0 alone writes
the other files and deletes, its failures agreed by every process (`distributed.agreed`).

Conversions from and to Hugging Face run `model_port` in a subprocess on the CPU (`import_hf`,
`export_hf`): the run's process holds the accelerator.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from vrft_jax import cli, distributed, sharding, storage
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.lora import LoRAConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL, with_config

# What a Qwen2-VL hub directory holds beside its config and weights: the files transformers 4.x wrote (the hub's
# Qwen2-VL-*-Instruct: preprocessor_config.json, chat_template.json) and those 5.x writes in their place
# (processor_config.json, chat_template.jinja, video_preprocessor_config.json).
HF_ASSETS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
             "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
CONFIG_FILE, POINTER_FILE, ASSETS_DIR, LORA_FILE = "config.json", "params.json", "hf_assets", "lora.json"
PARAMS_PREFIX = "params-"
LEGACY_PARAMS_DIR = "params"  # the layout before the pointer: loaded, replaced by the next save
_VERSION = re.compile(r"^params-(\d+)(\..*)?$")  # a checkpoint, or orbax's unfinished `params-<n>.orbax-...-tmp-*`
_LEGACY_LEFTOVERS = ("params.pending", "params.old")


def save_model(model: Qwen2VL, directory: str, *, hf_source: str | None = None) -> None:
    """Write `model` (without adapters: save a LoRA model's `merge_lora`, or its adapters with `save_adapters`)
    to `directory`, replacing a model saved there before only once it is fully written.

    `hf_source` (an HF checkpoint directory) supplies the config fields we do not model and the
    tokenizer/processor assets. Every process must call it (the parameters are saved collectively).
    """
    if model.config.lora is not None:
        raise ValueError("save_model saves a model without adapters: merge them (merge_lora) or save_adapters")
    _save(nnx.state(model, nnx.Param), model.config, directory, hf_source)


def save_adapters(model: Qwen2VL, directory: str) -> None:
    """Write a LoRA model's adapters alone (with its architecture's config.json and `lora.json`) to `directory`:
    an adapter directory, which `load_adapters` puts back onto the base and `model_port.peft` converts to and
    from PEFT's format. Replaces an earlier save as `save_model` does; every process must call it."""
    if model.config.lora is None:
        raise ValueError("the model has no adapters (Qwen2VLConfig.lora is None)")
    save_adapter_state(nnx.state(model, nnx.LoRAParam), model.config, directory)


def save_adapter_state(adapters: nnx.State, config: Qwen2VLConfig, directory: str) -> None:
    """`save_adapters` of the adapters' state (`nnx.LoRAParam`s) of a model of `config` (with `config.lora`)."""
    _save(adapters, config, directory, None)


def _save(state: nnx.State, config: Qwen2VLConfig, directory: str, hf_source: str | None) -> None:
    directory = storage.absolute(directory)
    name = distributed.from_primary(_prepare, directory)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.join(directory, name), state)
        checkpointer.wait_until_finished()
    distributed.on_primary(_publish, directory, name, config, hf_source)


def load_model(directory: str, *, dtype=None, compute_dtype=None, mesh: jax.sharding.Mesh | None = None,
               rules=sharding.DEFAULT_RULES, with_hf_config: bool = False, **runtime):
    """Restore a model saved by `save_model`, each parameter sharded by `rules` over `mesh`.

    mesh: default `sharding.make_mesh()`, FSDP over every device, so that no single device has to
      hold the whole model (on a one-device host that device holds it, as it must).
    dtype: casts the parameters (default: as saved).
    Returns the model, or (model, HF config dict).
    """
    directory = storage.absolute(directory)
    if is_adapter_dir(directory):
        raise ValueError(f"{directory} is an adapter directory (it holds {LORA_FILE}): load its base model, then "
                         "load_adapters onto it")
    hf_config = json.loads(storage.read_text(storage.join(directory, CONFIG_FILE)))
    saved_dtype = jnp.dtype(hf_config.get("dtype") or "float32")
    config = Qwen2VLConfig.from_hf(hf_config, param_dtype=saved_dtype, dtype=compute_dtype or dtype or saved_dtype,
                                   **runtime)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, _restore(directory, state, mesh, rules))
    if dtype is not None and jnp.dtype(dtype) != saved_dtype:
        model = with_config(model, param_dtype=dtype)
    return (model, hf_config) if with_hf_config else model


def load_adapters(directory: str, model: Qwen2VL, *, mesh: jax.sharding.Mesh | None = None,
                  rules=sharding.DEFAULT_RULES) -> Qwen2VL:
    """`model` (without adapters) with the adapters saved in `directory` by `save_adapters`; the base parameters are
    `model`'s own buffers. The adapters are laid out by `rules` over `mesh` (default: the mesh the model's
    parameters are on, or their one device). An adapter directory of another architecture is a ValueError naming
    the differences."""
    directory = storage.absolute(directory)
    if not is_adapter_dir(directory):
        raise FileNotFoundError(f"{directory} is not an adapter directory: it has no {LORA_FILE}")
    if model.config.lora is not None:
        raise ValueError("the model has adapters already (Qwen2VLConfig.lora is set)")
    if mesh is None:
        placed = jax.tree.leaves(nnx.state(model))[0].sharding
        mesh = placed.mesh if isinstance(placed, jax.sharding.NamedSharding) else placed
    saved, adapters = read_adapters(directory, mesh=mesh, rules=rules)
    differ = [f"{k}: {getattr(saved.text, k)} (adapters) vs {getattr(model.config.text, k)} (model)"
              for k in saved.text.__dataclass_fields__ if getattr(saved.text, k) != getattr(model.config.text, k)]
    if saved.family != model.config.family or differ:
        raise ValueError(f"the adapters in {directory} were made for another model: family {saved.family} vs "
                         f"{model.config.family}; " + "; ".join(differ))
    config = model.config.replace(lora=saved.lora)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.merge_state(nnx.state(model), adapters))


def read_adapters(directory: str, *, mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES
                  ) -> tuple[Qwen2VLConfig, nnx.State]:
    """(the model config with its `lora`, the adapters' state) saved in the adapter directory, without a base."""
    directory = storage.absolute(directory)
    hf_config = json.loads(storage.read_text(storage.join(directory, CONFIG_FILE)))
    lora = LoRAConfig.from_dict(json.loads(storage.read_text(storage.join(directory, LORA_FILE))))
    config = Qwen2VLConfig.from_hf(hf_config, param_dtype=hf_config.get("dtype") or "float32", lora=lora)
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))), nnx.LoRAParam)
    return config, _restore(directory, abstract, mesh, rules)


def _restore(directory: str, abstract: nnx.State, mesh, rules) -> nnx.State:
    """The checkpoint in force in `directory`, laid out by `rules` over `mesh` (default: FSDP over every device),
    or on one device when `mesh` is a single-device sharding."""
    if isinstance(mesh, jax.sharding.SingleDeviceSharding):
        placements = jax.tree.map(lambda _: mesh, abstract)
    else:
        placements = sharding.state_shardings(abstract, sharding.make_mesh() if mesh is None else mesh, rules)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, placements)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(params_path(directory), target)


def is_adapter_dir(directory: str) -> bool:
    """Whether `directory` holds adapters saved by `save_adapters`."""
    return storage.isfile(storage.join(directory, LORA_FILE)) and is_model_dir(directory)


def params_path(directory: str) -> str:
    """The parameter checkpoint in force in `directory`: the one `params.json` names (or `params/`, in a
    directory written before the pointer)."""
    name = _current_params(directory)
    if name is None:
        raise FileNotFoundError(f"{directory} holds neither {POINTER_FILE} nor {LEGACY_PARAMS_DIR}/ "
                                "(not a model directory)")
    path = storage.join(directory, name)
    if not storage.isdir(path):
        raise FileNotFoundError(f"{storage.join(directory, POINTER_FILE)} names {name}/, which is missing")
    return path


def is_model_dir(directory: str) -> bool:
    """Whether `directory` holds a model saved by `save_model` (rather than, say, a Hugging Face checkpoint)."""
    return _current_params(directory) is not None


def copy_hf_assets(source: str, destination: str) -> list[str]:
    """Copy the tokenizer/processor/generation files present in `source` (or its `hf_assets/`), each
    replacing its namesake in one atomic write; returns their names."""
    for root in (storage.join(source, ASSETS_DIR), source):
        present = set(storage.listdir(root)) if storage.isdir(root) else set()
        names = [n for n in HF_ASSETS if n in present and storage.isfile(storage.join(root, n))]
        if names:
            for name in names:
                data = storage.read_bytes(storage.join(root, name))
                storage.write_bytes_atomic(storage.join(destination, name), data)
            return names
    return []


def add_missing_assets(directory: str, tokenizer, eos_token_ids, pad_token_id: int) -> list[str]:
    """Give the model in `directory` the tokenizer and generation config a run trained with where its
    `hf_assets/` lacks them (a model from random weights, or from a checkpoint without them), so that its
    export serves as it was trained; returns the names written.

    The tokenizer goes as `tokenizer.save_pretrained` writes it, its chat template included (a run that
    loaded no template renders with the packaged Qwen2-VL one, `tokenizer.CHAT_TEMPLATE`).
    The generation config holds only the rollout's stop ids and pad id, so that `generate` stops where
    training did; its decoding is transformers' default (greedy), not Qwen2-VL's shipped sampling. No
    processor files are invented: load such an export's image processor with the recipe's pixel bounds.
    """
    from vrft_jax.models.qwen2_vl.tokenizer import has_tokenizer_files

    assets = storage.join(directory, ASSETS_DIR)
    written = []
    if not has_tokenizer_files(assets):
        with tempfile.TemporaryDirectory(prefix="vrft-tokenizer-") as local:
            tokenizer.save_pretrained(local)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes_atomic(storage.join(assets, name), f.read())
                written.append(name)
    if not storage.isfile(storage.join(assets, GENERATION_CONFIG)):
        config = {"eos_token_id": [int(i) for i in eos_token_ids], "pad_token_id": int(pad_token_id)}
        storage.write_text_atomic(storage.join(assets, GENERATION_CONFIG), json.dumps(config, indent=2))
        written.append(GENERATION_CONFIG)
    return written


# ------------------------------------------------------------------------------------ the swap


def _current_params(directory: str) -> str | None:
    """The name of the parameter checkpoint in force: the pointer's, else a legacy `params/`, else None."""
    pointer = storage.join(directory, POINTER_FILE)
    if storage.isfile(pointer):
        return json.loads(storage.read_text(pointer))["params"]
    return LEGACY_PARAMS_DIR if storage.isdir(storage.join(directory, LEGACY_PARAMS_DIR)) else None


def _prepare(directory: str) -> str:
    """Delete what earlier unfinished saves left (never the checkpoint in force); the name of the next one."""
    storage.makedirs(directory)
    current = _current_params(directory)
    entries = storage.listdir(directory) if storage.isdir(directory) else []
    numbers = [int(m.group(1)) for m in map(_VERSION.match, entries) if m]
    for entry in entries:
        if _VERSION.match(entry) and entry != current:
            storage.rmtree(storage.join(directory, entry))
    return f"{PARAMS_PREFIX}{max(numbers, default=0) + 1}"


def _publish(directory: str, name: str, config: Qwen2VLConfig, hf_source: str | None) -> None:
    """Once `name` is complete: the config and assets, then the pointer to `name`, then delete the old copy."""
    base = None
    if hf_source is not None:
        base = json.loads(storage.read_text(storage.join(hf_source, CONFIG_FILE)))
        copy_hf_assets(hf_source, storage.join(directory, ASSETS_DIR))
    storage.write_text_atomic(storage.join(directory, CONFIG_FILE),
                              json.dumps(config.to_hf_dict(base), indent=2, sort_keys=True))
    if config.lora is not None:
        storage.write_text_atomic(storage.join(directory, LORA_FILE), json.dumps(config.lora.to_dict(), indent=2))
    previous = _current_params(directory)
    _write_pointer(directory, name)
    for stale in ({previous} - {None, name}) | set(_LEGACY_LEFTOVERS):
        storage.rmtree(storage.join(directory, stale))


def _write_pointer(directory: str, name: str) -> None:
    storage.write_text_atomic(storage.join(directory, POINTER_FILE), json.dumps({"params": name}))


# ------------------------------------------------------------------------- Hugging Face conversions


def import_hf(checkpoint: str, converted: str) -> str:
    """The model directory of `checkpoint`: itself when it is one, else `converted`, into which the Hugging
    Face checkpoint is converted once (kept for later runs). A collective: process 0 converts, on the CPU,
    staging a `gs://` checkpoint locally first, while the others wait; a failure raises on every process."""
    if is_model_dir(checkpoint):
        return checkpoint

    def convert():
        if jax.process_index() != 0 or is_model_dir(converted):
            return
        with tempfile.TemporaryDirectory(prefix="vrft-hf-") as staging:
            source = storage.local_copy(checkpoint, staging)
            _run_model_port("hf_to_flax", "--hf", source, "--out", storage.absolute(converted))

    distributed.agreed(convert)
    return converted


def export_hf(directory: str, out: str) -> None:
    """The model directory as a Hugging Face checkpoint in `out` (local or `gs://`). A collective: process 0
    converts, on the CPU, from the saved directory (no process holds the model whole), into a local
    temporary directory that it uploads for a URL (`config.json` last); a failure raises on every process."""

    def export():
        if jax.process_index() != 0:
            return
        if not storage.is_url(out):
            _run_model_port("flax_to_hf", "--ckpt", storage.absolute(directory), "--out", out)
            return
        with tempfile.TemporaryDirectory(prefix="vrft-hf-export-") as local:
            _run_model_port("flax_to_hf", "--ckpt", storage.absolute(directory), "--out", local)
            storage.copy_tree(local, out, last=(CONFIG_FILE,))

    distributed.agreed(export)


def import_peft(source: str, converted: str, config: Qwen2VLConfig) -> str:
    """The adapter directory of `source`: itself when it is one, else `converted`, into which the PEFT adapter
    directory is converted once (`model_port.peft`) for the architecture `config`. A collective, as `import_hf`."""
    if is_adapter_dir(source):
        return source

    def convert():
        if jax.process_index() != 0 or is_adapter_dir(converted):
            return
        with tempfile.TemporaryDirectory(prefix="vrft-peft-") as staging:
            peft_dir = storage.local_copy(source, os.path.join(staging, "peft"))
            base = os.path.join(staging, "base")
            os.makedirs(base)
            with open(os.path.join(base, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(config.replace(lora=None).to_hf_dict(), f)
            _run_model_port("peft", "import", "--peft", peft_dir, "--model", base, "--out",
                            storage.absolute(converted))

    distributed.agreed(convert)
    return converted


def export_peft(adapters: str, out: str, base: str | None = None) -> None:
    """The adapter directory as a PEFT adapter directory in `out` (local or `gs://`), `base` its
    `base_model_name_or_path`. A collective, as `export_hf`."""

    def export():
        if jax.process_index() != 0:
            return
        with tempfile.TemporaryDirectory(prefix="vrft-peft-export-") as local:
            target = out if not storage.is_url(out) else local
            _run_model_port("peft", "export", "--adapters", storage.absolute(adapters), "--out", target,
                            *(("--base", base) if base else ()))
            if storage.is_url(out):
                storage.copy_tree(local, out, last=("adapter_config.json",))

    distributed.agreed(export)


class ConversionError(cli.UserError, RuntimeError):
    """A checkpoint model_port could not convert, for a reason in the input (its one-line error)."""


def _run_model_port(command: str, *args: str) -> None:
    """`python -m model_port.<command> ARGS` on the host's CPU (the run's process holds the accelerator, and
    libtpu, probed on a machine without a TPU, logs errors); its error output is in the exception."""
    argv = [sys.executable, "-m", f"model_port.{command}", *args]
    done = subprocess.run(argv, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if done.returncode == cli.EXIT_USER_ERROR and errors:  # the checkpoint's fault, said in the child's one line
        raise ConversionError(f"{' '.join(argv[1:])} failed with exit code {done.returncode}: "
                              f"{errors[-1][len('error: '):]}")
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[1:])} failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
