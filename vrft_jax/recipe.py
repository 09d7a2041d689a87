"""Recipes: find one, load it, override its fields, and build the frozen settings a run uses.

    python -m vrft_jax.train --config=coco_fewshot:model=7b,shots=8 --config.total_steps=400

`--config` names a recipe `vrft_jax/configs/NAME.py` (`NAME`, or `NAME:ARG`, ARG going to its
`get_config(arg)`), or a Python file defining `get_config` (`PATH` or `PATH:ARG`). With no `--config`
the `demo` recipe runs. `--config.a.b=value` overrides a field through ml_collections' `config_flags`
on a locked config, after `parse_flags` has checked every override: an unknown or mistyped key, or a
value of the wrong type, exits non-zero naming the key (and the type it needs).

The loop's `train.py` uses it as:

    recipe.define_flags()                                    # --config, --workdir
    def main(argv):
        config, workdir = recipe.from_flags()                # the locked ConfigDict, runs/NAME by default
        settings = recipe.build(config)                      # TrainConfig, SamplingConfig, DataConfig, ...
    app.run(main, flags_parser=recipe.parse_flags)

and a library or a test as `recipe.load("lisa_grounding:model=7b", {"total_steps": 10})`.

`build` turns each block into its dataclass by `from_dict` (unknown keys are errors naming them), and
checks that every shared value (temperature, EOS ids, dtypes, remat: `configs._common.SHARED`) is the
same wherever it is read. A dataset or checkpoint that is not there is an error saying which command
makes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from vrft_jax import sharding
from vrft_jax import storage as files
from vrft_jax.cli import EXIT_USER_ERROR, UserError
from vrft_jax.collapse import CollapseConfig
from vrft_jax.configs._common import SHARED
from vrft_jax.data import prompts, storage
from vrft_jax.data.config import DataConfig
from vrft_jax.evaluate import evaluators
from vrft_jax.evaluate.settings import EvaluationSettings
from vrft_jax.fields import known_fields
from vrft_jax.grpo import GRPOConfig
from vrft_jax.metrics import METRIC_NAMES
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from vrft_jax.models.qwen2_vl.lora import TARGETS, LoRAConfig
from vrft_jax.optimizer import OptimizerConfig
from vrft_jax.rewards import RewardSpec, WeightedReward, combine, reward_options
from vrft_jax.rewards.frames import frame_of
from vrft_jax.sampling import SamplingConfig
from vrft_jax.scoring import ScoringConfig
from vrft_jax.train_step import TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_RECIPE = "demo"
MODES = ("grpo", "sft")
PRESETS = ("qwen2_vl_2b", "qwen2_vl_7b", "qwen2_vl_72b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b",
           "qwen2_5_vl_72b", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b", "custom")

# A recipe's top-level fields. The blocks that are a dataclass's (data, sampling, grpo, train) are checked by
# its `from_dict`; the others by BLOCK_KEYS.
TOP_LEVEL_KEYS = frozenset({
    "name", "slice", "mode", "seed", "total_steps", "log_every", "ckpt_every", "keep_checkpoints", "sample_every",
    "eval_every", "export_hf", "metric_names", "shared_mount", "prompts_per_step", "categories", "model", "source",
    "data", "eval", "sampling", "grpo", "train", "rewards", "mesh", "warm_start", "sft", "lora", "collapse",
    *SHARED})
OPTIONAL_KEYS = frozenset({"categories"})
BLOCK_KEYS = {
    "model": frozenset({"preset", "checkpoint", "hub_id", "precision", "param_dtype", "dtype", "remat", "text",
                        "vision", "tie_word_embeddings", "family"}),
    "source": frozenset({"download", "prepare"}),
    "eval": frozenset({"path", "split", "prepare", "download", "type", "gt", "protocol", "parse", "max_new_tokens",
                       "repetition_penalty", "min_pixels", "max_pixels", "max_prompt_len", "patch_bucket",
                       "problem_prefix", "system_prompt", "batch_size", "categories"}),
    "rewards": frozenset({"mode", "frame", "solution_frame", "terms"}),
    "mesh": frozenset({"data", "fsdp", "tensor"}),
    "warm_start": frozenset({"sft_steps", "learning_rate"}),
    "sft": frozenset({"learning_rate", "warmup_steps", "weight_decay", "samples_per_step", "micro_batches",
                      "max_target_len", "lora_rank", "lora_alpha"}),
    "lora": frozenset({"rank", "alpha", "targets", "rslora", "dropout", "base_dtype", "init_from"}),
}


class RecipeError(UserError, ValueError):
    """A recipe that cannot be found, loaded or overridden as asked; the message names the culprit."""


class MissingPathError(UserError, FileNotFoundError):
    """A dataset or checkpoint the recipe names is not there; the message says how to make it."""


# ---------------------------------------------------------------------------------------------- loading


def available_recipes() -> tuple[str, ...]:
    """The recipe names under `vrft_jax/configs/`, sorted."""
    return tuple(sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_")))


def resolve(spec: str) -> tuple[str, str | None]:
    """(file, arg) of `NAME`, `NAME:ARG`, `PATH.py` or `PATH.py:ARG`."""
    target, sep, arg = spec.partition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise RecipeError(f"--config={spec}: no recipe file {target}")
        return target, arg if sep else None
    if target not in available_recipes():
        raise RecipeError(f"--config={spec}: unknown recipe {target!r}; recipes: {list(available_recipes())} "
                          "(or give the path of a .py file with get_config)")
    return os.path.join(CONFIG_DIR, f"{target}.py"), arg if sep else None


def load(spec: str = DEFAULT_RECIPE, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The locked ConfigDict of recipe `spec` (see `resolve`), with `overrides` ({"train.learning_rate": 1e-5})
    set as `--config.train.learning_rate=1e-5` would."""
    config = _load_file(*resolve(spec), spec=spec)
    for path, value in (overrides or {}).items():
        _field_type(config, path)
        parent, _, leaf = path.rpartition(".")
        node = _node(config, parent) if parent else config
        try:
            node[leaf] = value
        except TypeError as e:
            raise RecipeError(f"override {path}={value!r}: {path} is {_type_name(config, path)} ({e})") from None
    return config


def _module(path: str):
    module_name = "vrft_jax_recipe_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _load_file(path: str, arg: str | None, *, spec: str) -> ml_collections.ConfigDict:
    module = _module(path)
    if not callable(getattr(module, "get_config", None)):
        raise RecipeError(f"--config={spec}: {path} defines no get_config")
    try:  # as config_flags calls it: no argument unless one was given
        config = module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:
        raise RecipeError(f"--config={spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise RecipeError(f"--config={spec}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


def _node(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _field_type(config: ml_collections.ConfigDict, path: str) -> type:
    """The declared type of the field at dotted `path`; RecipeError naming the first missing key."""
    node, walked = config, []
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise RecipeError(f"unknown config key {path!r}: {'.'.join(walked)} is a value, not a block")
        if part not in node:
            where = ".".join(walked) or "the top level"
            close = suggest(config, path)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise RecipeError(f"unknown config key {path!r}: no {part!r} at {where}{hint} "
                              f"(keys there: {sorted(node.keys())})")
        parent, node = node, node[part]
        walked.append(part)
    return parent.get_type(walked[-1])


COMMON_BLOCKS = ("train", "sampling", "grpo", "data", "eval")


def suggest(config: ml_collections.ConfigDict, path: str, n: int = 3) -> list[str]:
    """The recipe's keys closest to a misspelled `path`, in any block: `lr` -> `train.learning_rate` (its words'
    initials), `learnin_rate` -> `train.learning_rate` (spelling), `temperature` -> `sampling.temperature` and
    `eval.temperature`... (the leaf wherever it is)."""
    keys = list(flat_config(config.to_dict()))
    keys += [prefix for key in keys for prefix in _prefixes(key)]  # blocks, so that `trian.x` finds `train.x`
    wanted = path.split(".")[-1].lower()

    def score(key: str) -> float:
        leaf = key.split(".")[-1].lower()
        initials = "".join(word[0] for word in leaf.split("_") if word)
        if key.lower() == path.lower():
            return 0.0
        exact = 1.0 if leaf == wanted else 0.95 if initials == wanted and len(wanted) > 1 else 0.0
        return max(exact, difflib.SequenceMatcher(None, path.lower(), key.lower()).ratio(),
                   0.9 * difflib.SequenceMatcher(None, wanted, leaf).ratio())

    def rank(key: str) -> tuple:  # ties: the blocks a user sets most often first, then the spelling of the path
        block = key.split(".")[0]
        return (-round(score(key), 2), COMMON_BLOCKS.index(block) if block in COMMON_BLOCKS else len(COMMON_BLOCKS),
                -difflib.SequenceMatcher(None, path.lower(), key.lower()).ratio())

    ranked = sorted(set(keys), key=rank)
    return [key for key in ranked[:n] if score(key) >= 0.75]


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _type_name(config: ml_collections.ConfigDict, path: str) -> str:
    kind = _field_type(config, path)
    return "a block" if issubclass(kind, ml_collections.ConfigDict) else kind.__name__


# ---------------------------------------------------------------------------------------------- flags


def define_flags() -> None:
    """Define `--config` (ml_collections' config file flag, locked) and `--workdir`. Parse them with
    `app.run(main, flags_parser=parse_flags)`, which resolves recipe names and checks the overrides."""
    config_flags.DEFINE_config_file(
        "config", None, f"a recipe NAME[:ARG] ({', '.join(available_recipes())}) or PATH.py[:ARG]; "
        f"default {DEFAULT_RECIPE}", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events, samples "
                        "(default: runs/<the recipe's name>)")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl `flags_parser` for `app.run`: resolve `--config` (default `demo`) to its file, check every
    `--config.*` override against the recipe, then parse with absl. A bad recipe or override prints
    one line naming it and exits 1 (as absl does for any flag error)."""
    argv = list(argv)
    index, spec = _config_argument(argv)
    if any(arg in HELP_FLAGS for arg in argv[1:argv.index("--") if "--" in argv else len(argv)]):
        try:
            print(usage(spec), flush=True)
        except RecipeError as e:
            _exit_with(str(e))
        sys.exit(0)
    try:
        if index is None:
            spec, index = DEFAULT_RECIPE, 1
            argv.insert(index, "")
        path, arg = resolve(spec)
        check_overrides(_load_file(path, arg, spec=spec), argv)
    except RecipeError as e:
        _exit_with(str(e))
    if argv[index] in ("--config", "-config"):
        del argv[index + 1]  # the two-word form
    argv[index] = f"--config={path}" + ("" if arg is None else f":{arg}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(str(e))


def _config_argument(argv: Sequence[str]) -> tuple[int | None, str | None]:
    """(index, value) of the last `--config=SPEC` or `--config SPEC` in argv; (None, None) without one."""
    found = (None, None)
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        match = re.fullmatch(r"--?config=(.*)", arg, re.S)
        if match:
            found = (i, match.group(1))
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            found = (i, argv[i + 1])
    return found


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], name: str = "config") -> None:
    """RecipeError for the first `--NAME.key=value` in argv whose key the config lacks, or whose value
    does not parse as the field's type."""
    pattern = re.compile(rf"--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?", re.S)
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        match = pattern.fullmatch(arg)
        if not match:
            continue
        negated, path, text = match.groups()
        kind = _field_type(config, path)
        if kind is type(None):
            raise RecipeError(f"--{name}.{path}: the recipe sets it to None without a type; declare it with "
                              "ml_collections.config_dict.placeholder(type)")
        if kind is bool and (negated or text is None):
            continue
        if negated:
            raise RecipeError(f"--no{name}.{path}: only a bool field takes the --no form; {path} is {kind.__name__}")
        if text is None:
            if i + 1 >= len(argv):
                raise RecipeError(f"--{name}.{path} needs a value ({kind.__name__})")
            text = argv[i + 1]
        if not _parses_as(text, kind):
            raise RecipeError(f"--{name}.{path}={text}: {path} must be {kind.__name__}, got {text!r}")


def _parses_as(text: str, kind: type) -> bool:
    """Whether absl's parser for `kind` takes `text` (str, tuples and blocks: config_flags' own parsers decide)."""
    if kind is bool:
        return text.lower() in ("true", "false", "t", "f", "1", "0")
    parse = {int: _int, float: float}.get(kind, str)
    try:
        parse(text)
    except ValueError:
        return False
    return True


def _int(text: str) -> int:
    return int(text, 16) if text.lower().lstrip("+-").startswith("0x") else int(text)


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


HELP_FLAGS = frozenset({"-h", "-help", "--help", "--helpshort", "--helpfull", "-?"})


def usage(spec: str | None = None) -> str:
    """The command's help: its docstring, the recipes with their arguments, its flags; with `spec`, that recipe's
    fields and values (what `--config.KEY=VALUE` may set)."""
    main = sys.modules.get("__main__")
    parts = [(getattr(main, "__doc__", None) or "").strip(), recipe_table()]
    command_flags = [f"  --{flag.name}: {' '.join(flag.help.split())}"
                     for module, defined in flags.FLAGS.flags_by_module_dict().items()
                     if _ours(module) for flag in defined]
    parts.append("flags:\n" + "\n".join([
        *command_flags,
        "  --config.KEY=VALUE: any field of the recipe, e.g. --config.train.learning_rate=1e-5 "
        "(--config=NAME --help lists NAME's fields)",
        "  --verbose: show the traceback of an error as well as its one line"]))
    if spec:
        config = _load_file(*resolve(spec), spec=spec)
        fields = [f"  {key} = {value!r}" for key, value in flat_config(config.to_dict()).items()]
        parts.append(f"fields of {spec} (--config.KEY=VALUE):\n" + "\n".join(fields))
    return "\n\n".join(part for part in parts if part)


def recipe_table() -> str:
    """Each recipe of vrft_jax/configs: its arguments (default first) and the first line of its docstring."""
    lines = [f"recipes (--config=NAME or NAME:ARG=VALUE,...; default {DEFAULT_RECIPE}; or PATH.py[:ARG]):"]
    for name in available_recipes():
        module = _module(os.path.join(CONFIG_DIR, f"{name}.py"))
        arguments = "  ".join(
            f"{arg}={'|'.join(str(v) for v in _default_first(default, allowed))}"
            for arg, (default, allowed) in getattr(module, "ARGS", {}).items()) or "(no arguments)"
        summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        summary = re.sub(r"; visual-rft\.md[^)]*\)", ")", summary)  # the project's notes are not in a clone
        summary = re.sub(r" \(visual-rft\.md[^)]*\)", "", summary)
        lines += [f"  {name:<16}{arguments}", f"  {'':<16}{summary}"]
    return "\n".join(lines)


def _default_first(default, allowed) -> list:
    return [default, *(v for v in allowed if v != default)] if allowed is not None else [default, "..."]


def flat_config(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"block.key": value} of a nested config dict; lists become tuples, so a config read back from JSON
    compares equal to the ConfigDict it was written from."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _ours(module: str) -> bool:
    """A flag-defining module of this project (the command's own, or the recipe's), not a library's (grain,
    orbax and array_record define flags of their own on import)."""
    return module.startswith("vrft_jax") or module == "__main__" or (
        module.endswith(".py") and os.path.dirname(os.path.abspath(module)).startswith(os.path.dirname(CONFIG_DIR)))


def from_flags() -> tuple[ml_collections.ConfigDict, str]:
    """(the parsed, locked config; the workdir, default `runs/<config.name>`) after `parse_flags`.
    A config whose blocks do not build raises RecipeError naming the field."""
    config = flags.FLAGS.config
    try:
        build(config, check_paths=False, process_count=1)
    except (KeyError, TypeError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
        raise RecipeError(f"recipe {config.get('name', '?')}: {message}") from e  # --verbose: where it came from
    return config, flags.FLAGS.workdir or default_workdir(config)


def default_workdir(config: ml_collections.ConfigDict) -> str:
    return os.path.join("runs", config.name)


# ---------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a recipe builds: the frozen settings of every component of a run.

    model:      the architecture with the run's parameter dtype, compute dtype and remat
    train:      the update (its `grpo` is the GRPO loss); the temperature is the sampler's
    sampling:   the rollout
    data:       the training batches; batch_size is this process's share of prompts_per_step
    eval_data:  a finite, unshuffled pass over the held-out set, or None
    reward_fn:  texts, solutions, **columns -> RewardBreakdown
    sampler_dtype: the rollout's parameter and compute dtype (the recipe's compute dtype)
    collapse:   dynamic sampling and the zero-reward stop (`vrft_jax.collapse`)
    """

    model: Qwen2VLConfig
    train: TrainConfig
    sampling: SamplingConfig
    data: DataConfig
    eval_data: DataConfig | None
    reward_fn: WeightedReward
    sampler_dtype: Any
    collapse: CollapseConfig = CollapseConfig()


def build(config: ml_collections.ConfigDict, *, process_count: int | None = None,
          check_paths: bool = True) -> Settings:
    """Every setting of the run `config` describes; with `check_paths`, MissingPathError if its
    dataset or checkpoint is not there (the message says which command makes it)."""
    check_structure(config)
    settings = Settings(model=model_config(config), train=train_config(config), sampling=sampling_config(config),
                        data=data_config(config, process_count), eval_data=eval_data_config(config, process_count),
                        reward_fn=reward_fn(config), sampler_dtype=jnp.dtype(config.compute_dtype),
                        collapse=CollapseConfig.from_dict(config.collapse.to_dict()))
    eval_settings(config)  # an unknown eval.type, protocol, reader or frame is an error naming it
    if config.prompts_per_step % settings.train.micro_batches:
        raise ValueError(f"train.micro_batches={settings.train.micro_batches} does not divide prompts_per_step="
                         f"{config.prompts_per_step}")
    if check_paths:
        check_inputs_exist(config)
    return settings


def check_structure(config: ml_collections.ConfigDict) -> None:
    """Unknown top-level or block keys, shared values that disagree, and out-of-range run settings are
    errors naming them."""
    _reject_unknown("the top level", config.keys(), TOP_LEVEL_KEYS)
    missing = sorted(TOP_LEVEL_KEYS - OPTIONAL_KEYS - set(config.keys()))
    if missing:
        raise KeyError(f"the recipe lacks {missing} (start from vrft_jax.configs._common.base_config)")
    for block, known in BLOCK_KEYS.items():
        _reject_unknown(block, config[block].keys(), known)
    for name, paths in SHARED.items():
        for path in paths:
            value = _node(config, path)
            if value != config[name]:
                raise ValueError(f"{path}={value!r} but {name}={config[name]!r}: a shared value is set once, at the "
                                 f"top level ({name}), and every block reads it")
    if config.mode not in MODES:
        raise ValueError(f"mode={config.mode!r} is not one of {list(MODES)}")
    if config.metric_names not in METRIC_NAMES:
        raise ValueError(f"metric_names={config.metric_names!r} is not one of {list(METRIC_NAMES)}")
    for key in ("total_steps", "log_every", "ckpt_every", "keep_checkpoints", "prompts_per_step"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be >= 1")
    for key in ("sample_every", "eval_every"):
        if config[key] < 0:
            raise ValueError(f"{key}={config[key]} must be >= 0 (0: never)")


def _reject_unknown(where: str, keys, known) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise KeyError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")


def model_config(config: ml_collections.ConfigDict) -> Qwen2VLConfig:
    """The recipe's architecture (a preset, or "custom" from its `text` and `vision` blocks) with the
    shared dtypes and remat."""
    block = config.model
    runtime = dict(param_dtype=block.param_dtype, dtype=block.dtype, remat=block.remat, precision=block.precision,
                   lora=lora_config(config))
    if block.preset not in PRESETS:
        raise ValueError(f"model.preset={block.preset!r} is not one of {list(PRESETS)}")
    if block.preset != "custom":
        return getattr(Qwen2VLConfig, block.preset)(**runtime)
    for part, cls in (("text", TextConfig), ("vision", VisionConfig)):
        if part not in block:
            raise ValueError(f"model.preset='custom' needs a model.{part} block ({cls.__name__}'s fields)")
        _reject_unknown(f"model.{part}", block[part].keys(), {f.name for f in dataclasses.fields(cls)})
    vision = block.vision.to_dict()
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        vision[key] = tuple(vision.get(key, ()))
    return Qwen2VLConfig(text=TextConfig(**block.text.to_dict()), vision=VisionConfig(**vision),
                         tie_word_embeddings=block.get("tie_word_embeddings", False),
                         family=block.get("family", "qwen2_vl"), **runtime)


def lora_config(config: ml_collections.ConfigDict) -> LoRAConfig | None:
    """The `lora` block's adapters, or None for full fine-tuning (rank 0)."""
    block = config.lora
    if block.rank < 0:
        raise ValueError(f"lora.rank={block.rank} must be >= 0 (0: full fine-tuning)")
    if not block.rank:
        return None
    names = TARGETS if block.targets == "all" else tuple(t.strip() for t in block.targets.split(",") if t.strip())
    try:
        return LoRAConfig(rank=block.rank, alpha=block.alpha, targets=names, rslora=block.rslora, dropout=block.dropout)
    except ValueError as error:
        raise ValueError(f"the lora block: {error} (lora.targets: 'all' or a comma-separated subset)") from None


# The recipe's flat `train` block, split into the leaf configs TrainConfig composes: {recipe key: (leaf, field)}.
# `sampler_layout` is the sampler's (SamplingConfig.layout); every other key is TrainConfig's own.
_TRAIN_BLOCK_LEAVES = {
    **{f.name: ("optimizer", f.name) for f in dataclasses.fields(OptimizerConfig)},
    "temperature": ("scoring", "temperature"),
    "logits_chunk_size": ("scoring", "chunk_size"),
    "logits_vocab_block": ("scoring", "vocab_block"),
    "sampler_layout": ("sampling", "layout"),
}


def _split_train_block(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """{"train": TrainConfig's own keys, "optimizer": ..., "scoring": ..., "sampling": ...} of the `train` block."""
    parts: dict[str, dict[str, Any]] = {"train": {}, "optimizer": {}, "scoring": {}, "sampling": {}}
    for key, value in config.train.to_dict().items():
        leaf, field = _TRAIN_BLOCK_LEAVES.get(key, ("train", key))
        parts[leaf][field] = value
    return parts


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    """The update's settings from the `train` and `grpo` blocks (an unknown key is an error naming it)."""
    parts = _split_train_block(config)
    values = known_fields(TrainConfig, parts["train"])
    if config.lora.rank:
        values.update(lora=True, frozen_dtype=config.lora.base_dtype or config.compute_dtype, seed=config.seed)
    return TrainConfig(**values, grpo=GRPOConfig.from_dict(config.grpo.to_dict()),
                       optimizer=OptimizerConfig.from_dict(parts["optimizer"]),
                       scoring=ScoringConfig(**parts["scoring"]))


def sampling_config(config: ml_collections.ConfigDict) -> SamplingConfig:
    """The rollout's settings: the `sampling` block, with the sampler's weight layout (`train.sampler_layout`)."""
    return SamplingConfig.from_dict({**config.sampling.to_dict(), **_split_train_block(config)["sampling"]})


def eval_sampling_config(config: ml_collections.ConfigDict) -> SamplingConfig:
    """Greedy, one completion per prompt, with the `eval` block's repetition penalty and length (None: the
    rollout's), otherwise the rollout's (EOS set, suppressed tokens)."""
    block = config.eval
    length = config.sampling.max_new_tokens if block.max_new_tokens is None else block.max_new_tokens
    return dataclasses.replace(sampling_config(config), greedy=True, group_size=1, max_new_tokens=length,
                               repetition_penalty=block.repetition_penalty)


def eval_settings(config: ml_collections.ConfigDict) -> EvaluationSettings:
    """What the `eval` block tells an evaluator beyond its data and decoding; its categories are
    `eval.categories`, or the recipe's when that is None."""
    block = config.eval
    categories = config.get("categories", ()) if block.categories is None else block.categories
    return EvaluationSettings(type=block.type, gt=block.gt, protocol=block.protocol, parse=block.parse,
                              categories=tuple(categories), frame=box_frame(config))


def evaluator(config: ml_collections.ConfigDict, settings: Settings, *, tokenizer, sampler_graphdef,
              mesh=None) -> evaluators.Evaluator | None:
    """The recipe's evaluator (`eval.type` over `eval.path`), or None when it has no held-out set."""
    if settings.eval_data is None:
        return None
    return evaluators.build(data=settings.eval_data, model_config=settings.model,
                            sampling=eval_sampling_config(config), reward_fn=settings.reward_fn, tokenizer=tokenizer,
                            sampler_graphdef=sampler_graphdef, settings=eval_settings(config), mesh=mesh)


def data_config(config: ml_collections.ConfigDict, process_count: int | None = None) -> DataConfig:
    """The training pipeline: the `data` block, each process reading its share of `drawn_prompts` rows."""
    if "batch_size" in config.data:
        raise KeyError("data.batch_size is set by prompts_per_step (global prompts per step), not in the data block")
    _per_process(config.prompts_per_step, "prompts_per_step", process_count)  # the update's share, too
    batch_size = _per_process(drawn_prompts(config), "prompts_per_step x collapse.oversample", process_count)
    return DataConfig.from_dict({**config.data.to_dict(), "batch_size": batch_size, "box_frame": box_frame(config)})


def drawn_prompts(config: ml_collections.ConfigDict) -> int:
    """The prompts a step draws: GRPO's `prompts_per_step` times `collapse.oversample` (the update trains on
    `prompts_per_step` of them, `vrft_jax.collapse.kept_groups`); SFT's `prompts_per_step`."""
    return config.prompts_per_step * (config.collapse.oversample if config.mode == "grpo" else 1)


def _per_process(global_batch: int, key: str, process_count: int | None) -> int:
    """Each process's share of a global batch; ValueError naming `key` when the processes do not split it."""
    processes = jax.process_count() if process_count is None else process_count
    if global_batch < 1 or global_batch % processes:
        raise ValueError(f"{key}={global_batch} does not split over {processes} processes")
    return global_batch // processes


# `eval` keys that replace the training value of the DataConfig field of the same name (None keeps it).
EVAL_DATA_KEYS = ("min_pixels", "max_pixels", "max_prompt_len", "patch_bucket", "problem_prefix")


def eval_data_config(config: ml_collections.ConfigDict, process_count: int | None = None) -> DataConfig | None:
    """The held-out set (`eval.path`, `eval.split`) read once in stored order, a partial last batch
    padded with valid=False rows, shown as the `eval` block says (`EVAL_DATA_KEYS`, the system prompt by
    name, the global `batch_size`; each None: training's); None when `eval.path` is empty."""
    block = config.eval
    if not block.path:
        return None
    changes = {key: block[key] for key in EVAL_DATA_KEYS if block[key] is not None}
    if block.system_prompt is not None:
        try:
            changes["system_prompt"] = prompts.system_prompt(block.system_prompt)
        except ValueError as e:
            raise ValueError(f"eval.system_prompt: {e}") from None
    if block.batch_size is not None:
        changes["batch_size"] = _per_process(block.batch_size, "eval.batch_size", process_count)
    return data_config(config, process_count).replace(path=block.path, split=block.split, num_epochs=1,
                                                      drop_remainder=False, shuffle=False, **changes)


def box_frame(config: ml_collections.ConfigDict) -> str:
    """The frame the model writes boxes in: `rewards.frame`, or (None) the model family's."""
    frame = config.rewards.frame or model_config(config).family
    frame_of(frame)  # an unknown name is a ValueError naming the known ones
    return frame


def reward_fn(config: ml_collections.ConfigDict) -> WeightedReward:
    """`rewards.combine` of `rewards.terms` ({name: weight}) in `rewards.mode`; every reward that reads
    boxes gets the model's frame (`box_frame`) and the records' (`rewards.solution_frame`)."""
    block = config.rewards
    frames = {"frame": box_frame(config), "solution_frame": block.solution_frame}
    specs = [RewardSpec(name, weight, {k: v for k, v in frames.items() if k in reward_options(name)})
             for name, weight in block.terms.items()]
    return combine(specs, mode=block.mode)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence | None = None):
    """The recipe's ("data", "fsdp", "tensor") mesh over `devices` (default: all)."""
    return sharding.make_mesh(**config.mesh.to_dict(), devices=devices)


# ---------------------------------------------------------------------------------------------- inputs


def _prepare_parts(config: ml_collections.ConfigDict, which: str) -> tuple[str, list[str]]:
    """(the source's arguments as shell text, ["--output", DIR, "--name", NAME]) of the training or "eval" set."""
    tail, path = (config.source.prepare, config.data.path) if which == "train" else (config.eval.prepare,
                                                                                      config.eval.path)
    if not tail:
        raise ValueError(f"the recipe names no command that makes its {which} dataset {path}")
    if files.is_url(path):  # os.path would make gs://b/x gs:/b/x
        output, _, name = path.rstrip("/").rpartition("/")
    else:
        output, name = os.path.split(os.path.normpath(path))
    return tail, ["--output", output or ".", "--name", name]


def prepare_command(config: ml_collections.ConfigDict, which: str = "train") -> str:
    """The shell command that writes the training (or "eval") dataset where the recipe reads it."""
    tail, destination = _prepare_parts(config, which)
    return f"python -m vrft_jax.data.prepare {tail} {shlex.join(destination)}"


def prepare_argv(config: ml_collections.ConfigDict, which: str = "train") -> list[str]:
    """`prepare_command`'s arguments, file patterns expanded as a shell would: `prepare.main(prepare_argv(c))`."""
    tail, destination = _prepare_parts(config, which)
    argv = []
    for word in shlex.split(tail):
        matches = sorted(glob.glob(word)) if any(ch in word for ch in "*?[") else []
        argv.extend(matches or [word])
    return argv + destination


def how_to_make(config: ml_collections.ConfigDict, which: str = "train") -> str:
    """What makes the training (or "eval") dataset: the sources to fetch, then the `prepare` command."""
    block = config.source if which == "train" else config.eval
    download = block.get("download", "")
    steps = ([f"fetch the source{'' if which == 'train' else 's'}: {download}"] if download else []) + (
        [f"run: {prepare_command(config, which)}"] if block.get("prepare") else
        ["make it with `python -m vrft_jax.data.prepare SOURCE ...` (prepare --help lists the sources)"])
    return "to make it, " + "; then ".join(steps)


def check_inputs_exist(config: ml_collections.ConfigDict) -> None:
    """MissingPathError naming the command that makes the first missing input: the training dataset,
    the held-out one, the initial checkpoint (a Hugging Face directory), or the adapters to start from."""
    adapters = config.lora.init_from
    if config.lora.rank and adapters and not (files.isfile(files.join(adapters, "adapter_config.json"))
                                              or files.isfile(files.join(adapters, "lora.json"))):
        raise MissingPathError(f"lora.init_from={adapters} is not an adapter directory: it holds neither a PEFT "
                               "adapter_config.json nor our lora.json")
    for which, path in (("train", config.data.path), ("eval", config.eval.path)):
        if which == "eval" and not (path and config.eval_every):  # `evaluate` checks its own set
            continue
        try:
            storage.dataset_dir(path)
        except FileNotFoundError:
            raise MissingPathError(f"the {which} dataset {path} is not there; {how_to_make(config, which)}") from None
    checkpoint = config.model.checkpoint
    if not checkpoint:
        return
    config_file = files.join(checkpoint, "config.json")
    if not files.isfile(config_file):
        raise MissingPathError(f"the initial checkpoint {checkpoint} is not there (no config.json); fetch it with: "
                               f"hf download {config.model.hub_id} --local-dir {checkpoint}")
    found, expected = Qwen2VLConfig.from_hf(json.loads(files.read_text(config_file))), model_config(config)
    if (found.text, found.vision) != (expected.text, expected.vision):
        raise RecipeError(f"the checkpoint {checkpoint} is not a {config.model.preset} model: its text model is "
                         f"{found.text}, the recipe's {expected.text}")
