"""Every model family end to end: a GRPO step of its tiny model through the train command, in its box frame."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vrft_jax import recipe, run
from vrft_jax.data import make_iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "train_recipe.py")
PIXEL_PHRASE = "(absolute pixel coordinates in the image, integer)"
GRID_PHRASE = "(between 0 and 1000, integer)"


@pytest.fixture(scope="module")
def detection_data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("detection_data"))
    run.make_synthetic_data(_config("qwen2_vl", directory))
    return directory


def _config(family, data, overrides=None):
    return recipe.load(f"{RECIPE}:family={family},task=detection",
                       {"data.path": os.path.join(data, "train"), "eval.path": os.path.join(data, "heldout"),
                        **(overrides or {})})


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_data_asks_for_boxes_in_the_familys_frame(family, detection_data):
    config = _config(family, detection_data)
    settings = recipe.build(config, process_count=1)
    assert settings.model.family == family and recipe.box_frame(config) == family
    batch = next(iter(make_iterator(settings.data, settings.model)))
    assert all((PIXEL_PHRASE if family == "qwen2_5_vl" else GRID_PHRASE) in text for text in batch.meta["problem"])
    seen = np.asarray(batch.meta["image_hw"])
    side = 32 if family == "qwen3_vl" else 28  # patch x merge
    assert (seen % side == 0).all() and (seen[:, 0] * seen[:, 1] <= config.data.max_pixels).all()
    patches = np.asarray(batch.model_inputs.patches)
    assert patches.shape[-1] == 3 * 2 * (side // 2) ** 2
    if family == "qwen3_vl":  # normalised by 0.5 / 0.5: white and black are exactly +-1
        assert patches.max() <= 1.0 and patches.min() >= -1.0 and np.isclose(np.abs(patches).max(), 1.0)


def _check_run(workdir, family, mode):
    [row] = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert row["step"] == 1 and np.isfinite(row["loss"]) and (mode == "sft") != ("reward/detection_iou" in row)
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert saved["model"].get("family", "qwen2_vl") == family and saved["rewards"]["frame"] is None


def test_a_qwen2_5_vl_grpo_step_runs_through_the_train_command(detection_data, tmp_path):
    """The command itself, with the family and the task as recipe arguments (the other runs call `run.train`, which
    the command calls after parsing its flags, in this process)."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "vrft_jax.train", f"--config={RECIPE}:family=qwen2_5_vl,task=detection",
               f"--workdir={workdir}", f"--config.data.path={os.path.join(detection_data, 'train')}",
               f"--config.eval.path={os.path.join(detection_data, 'heldout')}", "--config.total_steps=1",
               "--config.eval_every=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_run(workdir, "qwen2_5_vl", "grpo")


@pytest.mark.parametrize("family,mode", [("qwen2_vl", "grpo"), ("qwen2_5_vl", "sft"), ("qwen3_vl", "grpo"),
                                         ("qwen3_vl", "frozen")])
def test_a_step_of_each_family_trains_in_its_frame(family, mode, detection_data, tmp_path, one_device):
    """GRPO with the IoU reward in the family's frame; SFT on the answers rewritten in it (`sft.targets`); GRPO with
    a frozen vision tower, whose rollout features (Qwen3-VL: with DeepStack's) the scoring and the update reuse."""
    config = _config(family, detection_data, {"total_steps": 1, "eval_every": 0, "sft.max_target_len": 256,
                                              "mode": "grpo" if mode == "frozen" else mode,
                                              "train.freeze_vision": mode == "frozen"})
    workdir = str(tmp_path / "run")
    run.train(config, workdir)
    _check_run(workdir, family, mode)
