"""A LoRA run end to end (the loop's tiny recipe with `lora.rank`): SIGTERM and the same command end bit for bit
where a straight run does, its checkpoints hold the adapters and their optimizer state (no base), it leaves the
merged model, the adapters and their PEFT form, a PEFT directory starts a run, and SFT trains adapters too."""

import functools
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from compile_count import counting_compiles
from test_train import RECIPE, TIMING_KEYS, assert_bitwise_equal, canonical, compiles_per_step
from vrft_jax import model_dir, recipe, run, sft
from vrft_jax.metrics import read_metrics
from vrft_jax.models.qwen2_vl.lora import TARGETS, LoRAConfig

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "train.learning_rate": 1e-3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("lora_data"))
    run.make_synthetic_data(config(directory))
    return directory


def config(data: str, overrides=None):
    return recipe.load(RECIPE, {"data.path": os.path.join(data, "train"), "eval.path": os.path.join(data, "heldout"),
                                **LORA, **(overrides or {})})


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


def adapters_of(directory, mesh):
    return model_dir.read_adapters(directory, mesh=mesh)[1]


def test_sigterm_then_resume_ends_bitwise_where_a_straight_lora_run_does(data_dir, tmp_path, one_device,
                                                                         monkeypatch):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    overrides = {"total_steps": 4, "export_hf": True}
    run.train(config(data_dir, overrides), straight)
    assert sorted(os.listdir(os.path.join(straight, "peft"))) == ["adapter_config.json", "adapter_model.safetensors"]

    real = run.one_step

    def then_sigterm(context, state, *args):  # a real SIGTERM, heard by the run's guard after step 2's update
        result = real(context, state, *args)
        if args[-2] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(run, "one_step", then_sigterm)
    first = run.train(config(data_dir, overrides), resumed)
    assert first.preempted and first.step == 2 and not os.path.exists(os.path.join(resumed, "model"))
    monkeypatch.setattr(run, "one_step", real)
    # The checkpoint holds the adapters and their optimizer state: no parameter of the base.
    checkpoint = os.path.join(resumed, "checkpoints", "2", "state")
    saved = ocp.StandardCheckpointer().metadata(checkpoint).item_metadata
    paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(saved["params"])[0]]
    assert paths and all(any(p.endswith("_lora") for p in path) for path in paths), paths[:5]
    assert len(paths) == 2 * len(TARGETS)

    second = run.train(config(data_dir, overrides), resumed)
    assert second.step == 4 and not second.preempted
    assert canonical(without_timings(read_metrics(resumed))) == canonical(without_timings(read_metrics(straight)))
    rows = read_metrics(straight)
    assert all(r["grad_norm"] > 0 and r["update_skipped"] == 0 for r in rows)
    assert_bitwise_equal(adapters_of(os.path.join(resumed, "adapters"), one_device),
                         adapters_of(os.path.join(straight, "adapters"), one_device))
    load = functools.partial(model_dir.load_model, mesh=one_device)
    assert_bitwise_equal(nnx.state(load(os.path.join(resumed, "model"))),
                         nnx.state(load(os.path.join(straight, "model"))))

    # The PEFT export starts a run: its adapters are the straight run's, bit for bit, on the recipe's base.
    start = config(data_dir, {"lora.init_from": os.path.join(straight, "peft")})
    settings = recipe.build(start)
    base = run.random_init(settings.model.replace(lora=None), start.seed)
    model = run.initial_adapters(start, base, str(tmp_path / "from_peft"))
    assert model.config.lora == LoRAConfig(rank=4, alpha=8.0)
    assert_bitwise_equal(nnx.state(model, nnx.LoRAParam), adapters_of(os.path.join(straight, "adapters"), one_device))
    with pytest.raises(recipe.RecipeError, match="holds adapters of rank 4.*set the lora block to the same"):
        run.initial_adapters(config(data_dir, {"lora.init_from": os.path.join(straight, "peft"), "lora.rank": 8}),
                             base, str(tmp_path / "from_peft"))


def test_sft_trains_the_paper_baselines_lora(data_dir, tmp_path, one_device, monkeypatch):
    """mode=sft is LLaMA-Factory's LoRA by default (rank 8, alpha 16): adapters trained, merged into model/."""
    workdir = str(tmp_path / "sft")
    cfg = config(data_dir, {"mode": "sft", "total_steps": 2, "sft.samples_per_step": 4, "sft.warmup_steps": 0,
                            "lora.rank": 0})
    marks, seen = compiles_per_step(monkeypatch, sft, "iteration")
    with counting_compiles() as names:
        seen["names"] = names
        result = run.train(cfg, workdir)
    # After the first step nothing compiles but the final merge of the adapters into model/ (once, unless an
    # earlier test of the session compiled it for the same shapes).
    assert result.step == 2 and len(marks) == 2 and names[len(marks[1]):] in ([], ["jit(merged_params)"]), names
    lora, adapters = model_dir.read_adapters(os.path.join(workdir, "adapters"), mesh=one_device)
    assert lora.lora == LoRAConfig(rank=8, alpha=16.0)
    assert all(np.abs(np.asarray(v.get_raw_value())).max() > 0 for _, v in nnx.to_flat_state(adapters))
    rows = read_metrics(workdir)
    assert all(r["grad_norm"] > 0 and r["update_skipped"] == 0 for r in rows)
