"""Recipes: every one loads for 2B and 7B with each of its arguments and builds every setting; each
shared value is one field; the rollout, the reference scoring and the update of every recipe lower
with the real model shapes (abstract arrays, no weights); the command line names an unknown key, a
mistyped value and its type, and exits non-zero."""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from vrft_jax import recipe, sampling, sharding
from vrft_jax.configs import _common, cls_fewshot, coco_ov_base65, lisa_grounding
from vrft_jax.data import prepare
from vrft_jax.data.buckets import resolve_patch_bucket
from vrft_jax.grpo import GRPOConfig
from vrft_jax.models.qwen2_vl import ModelInputs, Qwen2VL, Qwen2VLConfig
from vrft_jax.optimizer import OptimizerConfig, make_optimizer
from vrft_jax.sampling import SamplingConfig
from vrft_jax.scoring import ScoringConfig, make_score_fn
from vrft_jax.train_step import TrainBatch, TrainConfig, TrainState, make_train_step, prepare_model, split_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tests", "recipe_cli.py")

# Every recipe with every value of each of its arguments, for the Qwen2-VL sizes; each other family's preset once
# per recipe, with the recipe's default arguments (their programs differ from Qwen2-VL's by the model alone).
QWEN2_VL = ("2b", "7b")
OTHER_FAMILIES = tuple(model for model in _common.MODELS if model not in QWEN2_VL)
ARGUMENTS = {
    "lvis_fewshot": dict(model=QWEN2_VL),
    "coco_fewshot": dict(model=QWEN2_VL, shots=_common.SHOTS),
    "coco_ov_base65": dict(model=QWEN2_VL, eval=coco_ov_base65.EVAL_SETS),
    "cls_fewshot": dict(model=QWEN2_VL, dataset=tuple(cls_fewshot.DATASETS), shots=_common.SHOTS),
    "lisa_grounding": dict(model=QWEN2_VL, eval=lisa_grounding.EVAL_SETS),
    "demo": {},
}
REPRODUCTIONS = {"lvis_fewshot": ("detection", 200), "coco_fewshot": ("detection", 200),
                 "coco_ov_base65": ("detection", 750), "cls_fewshot": ("classification", 200),
                 "lisa_grounding": ("grounding", 500)}
TASK_REWARDS = {"detection": {"detection_iou", "detection_confidence", "format"},
                "classification": {"classification", "format"}, "grounding": {"grounding_giou", "format"}}


def _specs(name):
    grid = ARGUMENTS[name]
    for values in itertools.product(*grid.values()):
        arg = ",".join(f"{key}={value}" for key, value in zip(grid, values))
        yield f"{name}:{arg}" if arg else name


SPECS = [spec for name in ARGUMENTS for spec in _specs(name)] + [
    f"{name}:model={model}" for name, grid in ARGUMENTS.items() if "model" in grid for model in OTHER_FAMILIES]


def _model(spec: str) -> str:
    """The spec's `model` argument (the recipes' default: 2b)."""
    return next((part.split("=")[1] for part in spec.partition(":")[2].split(",") if part.startswith("model=")), "2b")


def _build(spec, overrides=None):
    config = recipe.load(spec, overrides)
    return config, recipe.build(config, process_count=1, check_paths=False)


def test_every_recipe_is_listed_with_its_arguments():
    assert set(ARGUMENTS) == set(recipe.available_recipes())


@pytest.mark.parametrize("spec", SPECS)
def test_every_recipe_builds_every_setting(spec):
    config, settings = _build(spec)
    assert isinstance(settings.model, Qwen2VLConfig) and isinstance(settings.train, TrainConfig)
    assert isinstance(settings.sampling, SamplingConfig) and isinstance(settings.train.grpo, GRPOConfig)
    assert settings.data.batch_size == recipe.drawn_prompts(config)  # prompts_per_step x collapse.oversample
    assert settings.sampling.temperature == settings.train.scoring.temperature == config.temperature
    assert settings.train.param_dtype == settings.model.param_dtype == jnp.dtype(config.param_dtype)
    assert settings.train.compute_dtype == settings.model.dtype == settings.sampler_dtype
    assert settings.train.remat == settings.model.remat == config.remat
    assert settings.sampling.eos_token_ids == tuple(config.eos_token_ids)
    assert settings.train.optimizer.decay_steps == config.total_steps  # linear decay to 0 over the run
    assert recipe.make_mesh(config).devices.size == len(jax.devices())
    assert config.slice and config.mode == "grpo" and config.train.num_iterations == 1
    if spec.startswith("demo"):  # the demo exports its model (and names where); the reproductions leave it to you
        assert settings.eval_data is not None and settings.eval_data.num_epochs == 1 and config.export_hf
        return
    assert not config.export_hf
    task, steps = REPRODUCTIONS[spec.split(":")[0]]
    model = _common.MODEL_SETTINGS[_model(spec)]
    assert settings.model == getattr(Qwen2VLConfig, model["preset"])(
        param_dtype=jnp.float32, dtype=jnp.bfloat16, remat="block")
    assert config.model.hub_id == model["hub_id"] and config.slice == model["slice"]
    assert {r.name for r, _ in settings.reward_fn.terms} == TASK_REWARDS[task]
    assert all(r.mode == "paper" and weight == 1.0 for r, weight in settings.reward_fn.terms)
    # boxes in the family's frame (Qwen2.5-VL: pixels), the records' answers in Visual-RFT's grid
    assert config.rewards.frame is None and recipe.box_frame(config) == settings.model.family
    assert settings.data.box_frame == settings.model.family and config.rewards.solution_frame == "rel1000"
    assert config.total_steps == steps


@pytest.mark.parametrize("spec", [spec for spec in SPECS if not spec.startswith("demo")])
def test_reproduction_recipes_have_visual_rfts_hyperparameters(spec):
    config, s = _build(spec)
    assert s.train.grpo == GRPOConfig(beta=0.04, loss="paper", advantage="group", advantage_eps=1e-4, kl="k3")
    assert config.grpo.beta == 0.04  # explicit in the recipe, not left to a default
    assert (s.train.optimizer.learning_rate, s.train.optimizer.warmup_steps, s.train.optimizer.end_learning_rate) == (
        1e-6, 0, 0.0)
    optimizer = s.train.optimizer
    assert (optimizer.adam_b1, optimizer.adam_b2, optimizer.adam_eps, optimizer.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert optimizer.max_grad_norm == 1.0 and s.train.num_iterations == 1
    assert config.prompts_per_step == 16
    assert s.sampling.group_size == _common.MODEL_SETTINGS[_model(spec)]["group_size"]
    assert (s.sampling.max_new_tokens, s.sampling.top_k, s.sampling.top_p) == (256, 50, 1.0)
    assert s.sampling.temperature == s.train.scoring.temperature == 1.0 and not s.sampling.greedy
    # evaluation: greedy, one answer, Qwen2-VL's shipped repetition penalty, Visual-RFT's evaluation lengths
    length = 128 if spec.startswith("lisa") else 1024  # every reproduction now names its held-out set
    assert recipe.eval_sampling_config(config) == dataclasses.replace(
        s.sampling, greedy=True, group_size=1, repetition_penalty=1.05, max_new_tokens=length)
    side = _common.token_side(_model(spec))  # 512 and 4 tokens' worth of pixels (401408, 3136 for 28-pixel tokens)
    assert (s.data.max_pixels, s.data.min_pixels, s.data.max_prompt_len) == (512 * side**2, 4 * side**2, 1024)
    assert (config.eval.max_pixels, config.eval.min_pixels) == (16384 * side**2, 4 * side**2)
    assert s.data.system_prompt is None and s.data.problem_prefix == ""  # Visual-RFT's training prompts


def test_run_names_and_data_paths_differ_between_recipes():
    configs = [recipe.load(spec) for spec in SPECS]
    assert len({c.name for c in configs}) == len(SPECS)  # one workdir each: no run resumes another's
    assert len({c.data.path for c in configs}) == len({(c.data.path, c.source.prepare) for c in configs})


def test_a_shared_value_is_one_field():
    config = recipe.load("lvis_fewshot", {"sampling.temperature": 0.7, "total_steps": 50, "compute_dtype": "float32",
                                          "train.remat": "save_dots"})
    settings = recipe.build(config, process_count=1, check_paths=False)
    assert settings.train.scoring.temperature == settings.sampling.temperature == 0.7
    assert settings.train.optimizer.decay_steps == 50
    assert settings.train.compute_dtype == settings.model.dtype == settings.sampler_dtype == jnp.float32
    assert settings.model.remat == "save_dots"
    assert recipe.build(recipe.load("lvis_fewshot", {"train.decay_steps": 10}), process_count=1,
                        check_paths=False).train.optimizer.decay_steps == 10


def test_a_recipe_whose_shared_values_disagree_is_refused():
    plain = ml_collections.ConfigDict(recipe.load("lvis_fewshot").to_dict())  # references resolved: no links
    plain.sampling.temperature = 0.7
    with pytest.raises(ValueError, match=r"sampling.temperature=0.7 but temperature=1.0"):
        recipe.build(plain, process_count=1, check_paths=False)


@pytest.mark.parametrize("cls, block", [(SamplingConfig, "sampling"), (GRPOConfig, "grpo")])
def test_from_dict_names_unknown_keys(cls, block):
    values = recipe.load("lvis_fewshot")[block].to_dict()
    assert cls.from_dict(values) is not None
    with pytest.raises(KeyError, match=rf"unknown {cls.__name__} key\(s\) \['no_such_key'\]"):
        cls.from_dict({**values, "no_such_key": 1})


def test_the_flat_train_block_is_split_into_the_leaf_configs_train_config_composes():
    config = recipe.load("lvis_fewshot", {"train.learning_rate": 2e-6, "grpo.loss": "dapo", "grpo.beta": 0.0,
                                          "train.logits_chunk_size": 8, "train.sampler_layout": "sharded",
                                          "temperature": 0.7})
    s = recipe.build(config, process_count=1, check_paths=False)
    assert s.train.grpo.loss == "dapo" and s.train.grpo.beta == 0.0
    assert s.train.optimizer == OptimizerConfig(learning_rate=2e-6, decay_steps=config.total_steps)
    assert s.train.scoring == ScoringConfig(temperature=0.7, chunk_size=8, vocab_block=4096)
    assert s.sampling.layout == "sharded" and s.sampling.temperature == 0.7
    with pytest.raises(KeyError, match="unknown GRPOConfig key"):
        GRPOConfig.from_dict({"betta": 0.0})


def test_visual_rfts_mask_suppression_and_metric_names_are_recipe_flags():
    """Each difference `GRPOConfig.visual_rft()` lists has a flag; metric naming may change on resume."""
    from vrft_jax import run

    config = recipe.load("lvis_fewshot", {"grpo.completion_mask": "visual_rft", "sampling.suppressed_token_ids": (),
                                          "metric_names": "visual_rft"})
    s = recipe.build(config, process_count=1, check_paths=False)
    assert s.train.grpo == GRPOConfig.visual_rft()
    assert s.sampling.resolve(s.model).suppressed_token_ids == ()
    assert "metric_names" in run.RESUMABLE_CHANGES
    default = recipe.build(recipe.load("lvis_fewshot"), process_count=1, check_paths=False)
    assert default.train.grpo.completion_mask == "first_stop" and recipe.load("lvis_fewshot").metric_names == "trl"
    with pytest.raises(ValueError, match=r"metric_names='r1' is not one of \['trl', 'visual_rft'\]"):
        recipe.build(recipe.load("lvis_fewshot", {"metric_names": "r1"}), process_count=1, check_paths=False)


def test_load_names_an_unknown_key_a_wrong_type_a_recipe_and_an_argument():
    with pytest.raises(recipe.RecipeError, match=r"'train.learnin_rate'.*did you mean 'train.learning_rate'"):
        recipe.load("lvis_fewshot", {"train.learnin_rate": 1e-5})
    with pytest.raises(recipe.RecipeError, match=r"total_steps=.abc.: total_steps is int"):
        recipe.load("lvis_fewshot", {"total_steps": "abc"})
    with pytest.raises(recipe.RecipeError, match=r"unknown recipe 'lvis'"):
        recipe.load("lvis")
    with pytest.raises(recipe.RecipeError, match=r"unknown recipe argument 'shot'"):
        recipe.load("coco_fewshot:shot=8")
    with pytest.raises(recipe.RecipeError, match=r"dataset=birds is not one of"):
        recipe.load("cls_fewshot:dataset=birds")
    with pytest.raises(recipe.RecipeError, match=r"model=3b is not one of"):
        recipe.load("lisa_grounding:model=3b")


def test_a_recipe_file_with_an_unknown_block_key_is_refused(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from vrft_jax.configs import _common\n\n"
                    "def get_config(arg=None):\n"
                    "    c = _common.base_config(name='mine', model='2b')\n"
                    "    c.train.learnin_rate = 1e-5\n"
                    "    return c\n")
    with pytest.raises(KeyError, match=r"unknown TrainConfig key\(s\) \['learnin_rate'\]"):
        recipe.build(recipe.load(str(path)), process_count=1, check_paths=False)


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    """The demo's training set, made where a test points the demo by the command its error names."""
    data = str(tmp_path_factory.mktemp("data") / "shapes")
    config = recipe.load("demo", {"data.path": data, "eval.path": ""})
    with pytest.raises(recipe.MissingPathError) as error:
        recipe.check_inputs_exist(config)
    assert prepare.main(recipe.prepare_argv(config)) == 0
    return data, str(error.value)


def test_a_missing_dataset_says_which_prepare_command_makes_it(shapes_dataset):
    data, message = shapes_dataset
    output, name = os.path.split(data)
    assert message == (f"the train dataset {data} is not there; to make it, run: python -m vrft_jax.data.prepare "
                       "synthetic --task classification --label colour --shape-size large --num-images 2048 --seed 0 "
                       f"--output {output} --name {name}")
    recipe.check_inputs_exist(recipe.load("demo", {"data.path": data, "eval.path": ""}))  # that command made it


def test_a_missing_download_or_checkpoint_says_how_to_fetch_it(shapes_dataset, tmp_path):
    with pytest.raises(recipe.MissingPathError, match=r"fetch the source: hf download "
                                                      r"laolao77/ViRFT_LVIS_few_shot .*then run: python -m "
                                                      r"vrft_jax.data.prepare virft --parquet "
                                                      r"sources/ViRFT_LVIS_few_shot/data/\*.parquet"):
        recipe.check_inputs_exist(recipe.load("lvis_fewshot", {"data.path": str(tmp_path / "nothing")}))
    checkpoint = tmp_path / "Qwen2-VL-2B-Instruct"
    config = recipe.load("lvis_fewshot", {"data.path": shapes_dataset[0], "model.checkpoint": str(checkpoint)})
    with pytest.raises(recipe.MissingPathError, match=rf"hf download Qwen/Qwen2-VL-2B-Instruct "
                                                      rf"--local-dir {checkpoint}$"):
        recipe.check_inputs_exist(config)
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(recipe.model_config(recipe.load("lvis_fewshot:model=7b"))
                                                       .to_hf_dict()))
    with pytest.raises(ValueError, match=r"is not a qwen2_vl_2b model"):
        recipe.check_inputs_exist(config)
    (checkpoint / "config.json").write_text(json.dumps(recipe.model_config(config).to_hf_dict()))
    recipe.check_inputs_exist(config)


def test_recipes_import_neither_jax_nor_numpy():
    code = ("import sys\nfrom vrft_jax import configs\nimport importlib\n"
            f"for name in {sorted(ARGUMENTS)!r}:\n"
            "    importlib.import_module('vrft_jax.configs.' + name).get_config()\n"
            "assert 'jax' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------------------------------- command line


def _cli(*args):
    result = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None
    return result, out


def test_cli_overrides_the_recipe_named_with_its_argument():
    result, out = _cli("--config=coco_fewshot:model=7b,shots=8", "--config.total_steps=5",
                       "--config.sampling.temperature=0.7", "--config.export_hf")
    assert result.returncode == 0, result.stderr
    config = out["config"]
    assert out["workdir"] == os.path.join("runs", "coco_fewshot_7b_8shot")
    assert (config["total_steps"], config["train"]["decay_steps"], config["sampling"]["group_size"]) == (5, 5, 4)
    assert config["temperature"] == config["train"]["temperature"] == config["sampling"]["temperature"] == 0.7
    assert config["export_hf"] is True and config["data"]["path"] == "data/coco_8cate_8shot"


def test_cli_without_config_runs_the_demo_and_takes_a_recipe_file(tmp_path):
    result, out = _cli("--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert out["config"]["name"] == "demo" and out["workdir"] == str(tmp_path)
    path = tmp_path / "mine.py"
    path.write_text("from vrft_jax.configs import lisa_grounding\n\n"
                    "def get_config(arg=None):\n"
                    "    c = lisa_grounding.get_config(arg)\n"
                    "    c.name = 'mine'\n"
                    "    return c\n")
    result, out = _cli(f"--config={path}:model=7b", "--config.total_steps=3")
    assert result.returncode == 0, result.stderr
    assert (out["workdir"], out["config"]["total_steps"], out["config"]["sampling"]["group_size"]) == (
        os.path.join("runs", "mine"), 3, 4)


_PLATFORM = """
import sys
import jax
from jax._src import hardware_utils
from vrft_jax import cli, recipe
# a host without accelerators, whatever this one has: the decision is what is tested
hardware_utils.num_available_tpu_chips_and_device_id = lambda: (0, None)
hardware_utils.has_visible_nvidia_gpu = lambda: False
cli.choose_platform(cpu_recipe=recipe.load(sys.argv[1]).slice == "cpu")
print(jax.config.jax_platforms, jax.devices()[0].platform)
"""


@pytest.mark.parametrize("name", ["demo", "lvis_fewshot"])
def test_every_recipe_chooses_its_platform_before_jax_probes_for_a_tpu(name):
    """The test extra installs libtpu, which logs TPU_WORKER_HOSTNAMES errors when JAX probes it on a machine
    without a TPU: the platform is chosen from the hardware (here: none, so the CPU) before any backend starts,
    for a TPU recipe as for the demo, and said in one line."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", _PLATFORM, name], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "cpu"]
    assert "TPU_WORKER" not in result.stderr and "libtpu" not in result.stderr, result.stderr
    assert re.search(r"^platform: cpu \(", result.stderr, re.M), result.stderr


@pytest.mark.parametrize("args, message", [
    (["--config.no_such_key=1"], r"unknown config key 'no_such_key'"),
    (["--config=lvis_fewshot", "--config.train.learnin_rate=1e-5"], r"did you mean 'train.learning_rate'"),
    (["--config.total_steps=abc"], r"--config.total_steps=abc: total_steps must be int"),
    (["--config.sampling.temperature", "hot"], r"sampling.temperature must be float"),
    (["--config=coco_fewshot:shot=8"], r"unknown recipe argument 'shot'"),
    (["--config=lvis_fewshot", "--config.rewards.mode=lax"], r"unknown reward mode 'lax'"),
])
def test_cli_names_what_is_wrong_and_exits_non_zero(args, message):
    result, _ = _cli(*args)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr


# ---------------------------------------------------------------------------------------------- lowering


def _lowering_groups():
    """Specs whose programs are the same (the model, the shapes, every setting the programs read but the
    learning-rate schedule's length) share one lowering."""
    groups = {}
    for spec in SPECS:
        config, s = _build(spec)
        schedule_free = s.train.replace(optimizer=s.train.optimizer.replace(decay_steps=None))
        key = (s.model, s.sampling, schedule_free, s.data.batch_size, s.data.max_prompt_len,
               resolve_patch_bucket(s.data, s.model), s.data.patch_dtype, s.sampler_dtype,
               tuple(config.mesh.to_dict().items()))
        groups.setdefault(key, []).append(spec)
    return list(groups.values())


LOWERING_GROUPS = _lowering_groups()


def _abstract_inputs(data, model_config, mesh):
    """The ModelInputs of one global batch as the data pipeline shapes it, split over the batch axes."""
    b, t = data.batch_size, data.max_prompt_len
    p = resolve_patch_bucket(data, model_config)
    shapes = dict(input_ids=((b, t), jnp.int32), attention_mask=((b, t), jnp.int32),
                  positions=((b, t, 3), jnp.int32), rope_deltas=((b,), jnp.int32),
                  patches=((b, p, model_config.vision.patch_dim), jnp.dtype(data.patch_dtype)),
                  patch_segment_ids=((b, p), jnp.int32), patch_positions=((b, p, 2), jnp.int32))
    return ModelInputs(**{name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
                          for name, (shape, dtype) in shapes.items()})


@pytest.mark.parametrize("specs", LOWERING_GROUPS, ids=lambda specs: f"{specs[0]}+{len(specs) - 1}")
def test_rollout_scoring_and_update_lower_with_the_real_shapes(specs):
    start = time.perf_counter()
    config, s = _build(specs[0])
    mesh = recipe.make_mesh(config)
    sds = jax.ShapeDtypeStruct
    inputs = _abstract_inputs(s.data, s.model, mesh)
    prompts, group, length = s.data.batch_size, s.sampling.group_size, s.sampling.max_new_tokens
    rows = prompts * group

    # The update and the reference scorer: float32 master weights, the optimizer state, no array.
    graphdef, params = nnx.split(nnx.eval_shape(lambda: prepare_model(Qwen2VL(s.model, rngs=nnx.Rngs(0)), s.train)))
    trainable, _ = split_params(params, s.train)
    counter = sds((), jnp.int32)
    state = TrainState(params=params, opt_state=jax.eval_shape(make_optimizer(s.train.optimizer).init, trainable),
                       step=counter, nonfinite_total=counter, nonfinite_streak=counter)
    batch = TrainBatch(inputs=inputs, completions=sds((rows, length), jnp.int32),
                       completion_mask=sds((rows, length), jnp.int32), advantages=sds((rows,), jnp.float32),
                       ref_logprobs=sds((rows, length), jnp.float32) if s.train.grpo.beta else None)
    update = make_train_step(graphdef, state, s.train, mesh=mesh).lower(state, batch)
    new_state, metrics = update.out_info
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert {"loss", "grad_norm", "learning_rate"} <= set(metrics)
    assert ("kl" in metrics) == (s.train.grpo.beta > 0)  # no reference, no KL metric
    scores = make_score_fn(graphdef, params, s.train.scoring, mesh=mesh).lower(params, batch.scored()).out_info
    assert (scores.shape, scores.dtype) == ((rows, length), jnp.float32)

    # The rollout's two programs, on the sampler's weights: the compute dtype, the sampling layout.
    sampler_model = s.model.replace(param_dtype=s.sampler_dtype, dtype=s.sampler_dtype)
    sampler_graphdef, sampler_params = nnx.split(nnx.eval_shape(lambda: Qwen2VL(sampler_model, rngs=nnx.Rngs(0))))
    layout = sharding.state_shardings(sampler_params, mesh, sharding.SAMPLING_RULES)
    sampler_params = jax.tree.map(lambda x, where: sds(x.shape, x.dtype, sharding=where), sampler_params, layout)
    sampler_config = s.sampling.resolve(s.model)
    with jax.set_mesh(mesh):
        prefill = sampling.prefill.lower(sampler_graphdef, sampler_params, inputs, sampler_config)
        prefilled = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=sharding.batch_sharding(
            mesh, x.ndim, batch_axis=1 if x.ndim == 5 else 0) if x.ndim else None), prefill.out_info)
        key = jax.eval_shape(lambda: jax.random.key(0))
        rollout = sampling.decode.lower(sampler_graphdef, sampler_params, prefilled, key, sampler_config).out_info
    assert (rollout.tokens.shape, rollout.logprobs.shape, rollout.lengths.shape) == ((rows, length),) * 2 + ((rows,),)
    assert prefill.out_info.cache.k.dtype == s.sampler_dtype
    print(f"lowered {specs[0]} (and {len(specs) - 1} recipes of the same programs) in "
          f"{time.perf_counter() - start:.1f} s")
