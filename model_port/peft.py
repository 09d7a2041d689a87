"""Our LoRA adapters <-> a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`), the
form `peft.PeftModel.from_pretrained(base, DIR)` loads onto a Hugging Face Qwen-VL model.

    python -m model_port.peft export --adapters DIR --out PEFT_DIR [--base NAME_OR_PATH]
    python -m model_port.peft import --peft PEFT_DIR --model DIR --out DIR

`export` reads an adapter directory (`vrft_jax.model_dir.save_adapters`: a run's `adapters/`); `import` writes
one from a PEFT directory, for the architecture of `--model` (an HF checkpoint or a model directory: its
config.json). PEFT keys each adapter by its module's name in transformers' model tree,
`base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight` (lora_A [r, in], lora_B
[out, r], torch Linear layouts); adapters saved with transformers 4's names (`...model.layers.{i}...`) import too.
Only what our adapters are can be imported: LoRA on the language model's projections, every layer, one rank;
anything else (DoRA, biases, the vision tower, `modules_to_save`, per-module ranks) is refused in one line.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from model_port.mapping import canonical_name, in_memory_name, tensor_map
from vrft_jax import cli, model_dir
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.lora import TARGETS, LoRAConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class PeftFormatError(cli.UserError, ValueError):
    """A PEFT directory whose adapters are not ones our model has."""


def projections(config: Qwen2VLConfig) -> dict[str, tuple]:
    """target name -> (the canonical HF weight name with "{i}", our kernel's path, its in and out shapes)."""
    t = config.text
    shapes = {"q_proj": ((t.hidden_size,), (t.num_heads, t.head_dim)),
              "k_proj": ((t.hidden_size,), (t.num_kv_heads, t.head_dim)),
              "v_proj": ((t.hidden_size,), (t.num_kv_heads, t.head_dim)),
              "o_proj": ((t.num_heads, t.head_dim), (t.hidden_size,)),
              "gate_proj": ((t.hidden_size,), (t.intermediate_size,)),
              "up_proj": ((t.hidden_size,), (t.intermediate_size,)),
              "down_proj": ((t.intermediate_size,), (t.hidden_size,))}
    by_target = {}
    for entry in tensor_map(config):
        if entry.num_layers and entry.path[:2] == ("text", "layers") and entry.path[-1].endswith("_kernel"):
            target = entry.hf_name.split(".")[-2]
            by_target[target] = (entry.hf_name, entry.path, *shapes[target])
    assert set(by_target) == set(TARGETS), by_target
    return by_target


def target_regex(targets) -> str:
    """PEFT's `target_modules` as a regex (full match on the module name), anchored on the language model so that
    Qwen2.5-VL's vision MLP (`gate_proj`, ... too) is never a target."""
    return r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"


def to_peft(adapters: dict, config: Qwen2VLConfig, out: str, base: str | None = None) -> None:
    """Write the adapters (our flat state: path -> array, stacked over layers) of `config` (with `config.lora`)."""
    lora, names = config.lora, projections(config)
    tensors = {}
    for target in lora.targets:
        hf_name, path, _, _ = names[target]
        owner = path[:-1] + (path[-1].replace("_kernel", "_lora"),)
        a, b = (np.asarray(jax.device_get(adapters[owner + (part,)]), np.float32) for part in ("a", "b"))
        for i in range(config.text.num_layers):
            module = PREFIX + in_memory_name(hf_name.format(i=i))[:-len(".weight")]
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": lora.rank,
        "lora_alpha": lora.alpha, "use_rslora": lora.rslora, "target_modules": target_regex(lora.targets),
        "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "use_dora": False, "inference_mode": True,
    }
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_config, f, indent=2)


def from_peft(directory: str, config: Qwen2VLConfig, param_dtype=np.float32) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, our flat adapters: path -> array) of the PEFT directory, for the architecture `config`."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise PeftFormatError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    with open(path, encoding="utf-8") as f:
        peft_config = json.load(f)
    refused = {k: peft_config.get(k) for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                                                 "alpha_pattern", "layers_to_transform", "trainable_token_indices")
               if peft_config.get(k)}
    if peft_config.get("peft_type") != "LORA":
        refused["peft_type"] = peft_config.get("peft_type")
    if peft_config.get("bias", "none") != "none" or peft_config.get("lora_bias"):
        refused["bias"] = peft_config.get("bias")
    if refused:
        raise PeftFormatError(f"{path}: {', '.join(f'{k}={v!r}' for k, v in refused.items())}: only plain LoRA "
                              "(one rank, no bias, no DoRA, no extra trained modules) loads into our adapters")
    rank = int(peft_config["r"])
    names = projections(config)
    by_module = {in_memory_name(hf_name.format(i=i))[:-len(".weight")]: (target, i)
                 for target, (hf_name, *_) in names.items() for i in range(config.text.num_layers)}
    found: dict[tuple[str, str], list] = {}
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise PeftFormatError(f"{directory}: no {WEIGHTS_FILE} (an adapter_model.bin is not read: save with "
                              "safe_serialization=True)")
    with safe_open(weights, framework="numpy") as f:
        for key in f.keys():
            match = _KEY.match(key)
            module = match and in_memory_name(canonical_name(match["module"].removeprefix(PREFIX)))
            if module not in by_module:
                raise PeftFormatError(f"{weights}: tensor {key!r} is not a LoRA adapter of a language-model projection "
                                      f"({', '.join(TARGETS)}); the vision tower and other modules take none here")
            target, i = by_module[module]
            found.setdefault((target, match["part"]), [None] * config.text.num_layers)[i] = f.get_tensor(key)
    targets = tuple(t for t in TARGETS if (t, "A") in found)
    adapters = {}
    for target in targets:
        hf_name, path, in_shape, out_shape = names[target]
        a_layers, b_layers = found[(target, "A")], found.get((target, "B"), [None])
        missing = [i for i, (a, b) in enumerate(zip(a_layers, b_layers)) if a is None or b is None]
        if missing or len(b_layers) != len(a_layers):
            raise PeftFormatError(f"{weights}: {target} has no lora_A/lora_B in layer(s) {missing or 'all'}: our "
                                  "adapters cover every layer of a target")
        shapes = {(a.shape, b.shape) for a, b in zip(a_layers, b_layers)}
        expected = ((rank, int(np.prod(in_shape))), (int(np.prod(out_shape)), rank))
        if shapes != {expected}:
            raise PeftFormatError(f"{weights}: {target}'s adapters have shapes {sorted(shapes)}, expected {expected} "
                                  f"(r={rank} in {CONFIG_FILE}, this architecture's projection)")
        owner = path[:-1] + (path[-1].replace("_kernel", "_lora"),)
        adapters[owner + ("a",)] = np.stack([a.T.reshape(*in_shape, rank) for a in a_layers]).astype(param_dtype)
        adapters[owner + ("b",)] = np.stack([b.T.reshape(rank, *out_shape) for b in b_layers]).astype(param_dtype)
    if not targets:
        raise PeftFormatError(f"{weights}: no LoRA adapters in it")
    lora = LoRAConfig(rank=rank, alpha=float(peft_config["lora_alpha"]), targets=targets,
                      rslora=bool(peft_config.get("use_rslora", False)),
                      dropout=float(peft_config.get("lora_dropout") or 0.0))
    return lora, adapters


def import_peft(directory: str, base_config: Qwen2VLConfig, out: str) -> LoRAConfig:
    """Write the PEFT directory's adapters as an adapter directory (`model_dir.save_adapters`) at `out`."""
    from vrft_jax.models.qwen2_vl.model import Qwen2VL

    lora, adapters = from_peft(directory, base_config)
    config = base_config.replace(lora=lora)
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))), nnx.LoRAParam)
    state = nnx.from_flat_state([(path, variable.replace(adapters[path]))
                                 for path, variable in nnx.to_flat_state(abstract)])
    model_dir.save_adapter_state(state, config, out)
    return lora


def main(argv) -> None:
    """The command (argv[0] its name); run through `cli.run`, which makes a UserError one line."""
    parser = cli.ArgumentParser(prog="python -m model_port.peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="an adapter directory -> a PEFT directory")
    export.add_argument("--adapters", required=True, help="adapter directory (a run's adapters/)")
    export.add_argument("--out", required=True, help="output PEFT directory")
    export.add_argument("--base", default=None, help="adapter_config.json's base_model_name_or_path")
    load = commands.add_parser("import", help="a PEFT directory -> an adapter directory")
    load.add_argument("--peft", required=True, help="PEFT adapter directory")
    load.add_argument("--model", required=True, help="the base: an HF checkpoint or a model directory")
    load.add_argument("--out", required=True, help="output adapter directory")
    for sub in (parser, export, load):
        sub.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show an error's traceback as well as its line")
    args = parser.parse_args(argv[1:])
    cli.choose_platform()
    if args.command == "export":
        if not model_dir.is_adapter_dir(args.adapters):
            raise cli.UserError(f"--adapters {args.adapters}: not an adapter directory (it holds no "
                                f"{model_dir.LORA_FILE})")
        config, adapters = model_dir.read_adapters(args.adapters)
        to_peft(dict(nnx.to_flat_state(adapters)), config, args.out, base=args.base)
        print(f"exported {args.adapters} -> {args.out} (PEFT: r={config.lora.rank}, {', '.join(config.lora.targets)})")
        return
    config_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(config_path):
        raise cli.UserError(f"--model {args.model}: no config.json (an HF checkpoint or a model directory)")
    lora = import_peft(args.peft, Qwen2VLConfig.from_hf(config_path), args.out)
    print(f"imported {args.peft} -> {args.out} (r={lora.rank}, {', '.join(lora.targets)})")


if __name__ == "__main__":
    cli.run(main)
