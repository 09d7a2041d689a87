"""get_reward, the registry, and weighted sums of rewards."""
import sys

import numpy as np
import pytest

from vrft_jax.rewards import (
    VISUAL_RFT_REWARDS,
    Reward,
    RewardSpec,
    available_rewards,
    combine,
    get_reward,
    register,
    reward_options,
)

DETECTION = "<think>t</think><answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}]</answer>"
GT = "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 1}]</answer>"


def test_rewards_import_no_jax():
    assert "vrft_jax.rewards" in sys.modules
    # The test session may have imported JAX elsewhere; a fresh interpreter must not.
    import subprocess

    code = "import sys, vrft_jax.rewards; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_available_rewards():
    # tests/train_recipe.py registers a test-only reward when a test loads it
    assert tuple(r for r in available_rewards() if not r.startswith("test_")) == (
        "answer_format", "classification", "detection_confidence", "detection_iou", "format", "grounding_giou"
    )


@pytest.mark.parametrize(
    "name", ["answer_format", "classification", "detection_confidence", "detection_iou", "format", "grounding_giou"]
)
@pytest.mark.parametrize("mode", ["paper", "strict"])
def test_every_reward_returns_float32_of_shape_n(name, mode):
    reward = get_reward(name, mode)
    assert isinstance(reward, Reward) and reward.name == name and reward.mode == mode
    solutions = {"classification": "<answer>cat</answer>", "grounding_giou": "<answer>(1,2),(3,4)</answer>"}
    solution = solutions.get(name, GT)
    columns = {"stopped": [True] * 3} if "stopped" in reward.columns else {}
    out = reward(["", "x", DETECTION], [solution] * 3, **columns)
    assert out.dtype == np.float32 and out.shape == (3,)
    assert reward([], [], **{k: [] for k in columns}).shape == (0,)


def test_default_mode_is_strict():
    assert get_reward("format").mode == "strict"


def test_unknown_names_modes_and_options_are_errors():
    with pytest.raises(ValueError, match="unknown reward 'iou'"):
        get_reward("iou")
    with pytest.raises(ValueError, match="unknown reward mode 'exact'"):
        get_reward("format", "exact")
    with pytest.raises(ValueError, match="has no option 'threshold'; options:"):
        get_reward("detection_iou", threshold=0.3)
    with pytest.raises(ValueError, match="strict mode only"):
        get_reward("detection_iou", "paper", iou_threshold=0.3)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        get_reward("detection_iou", iou_threshold=1.5)
    with pytest.raises(ValueError, match="unknown box frame"):
        get_reward("detection_iou", frame="xyxy")


def test_reward_options_lists_settings():
    assert reward_options("detection_iou") == {
        "frame": "qwen2_vl", "solution_frame": None, "iou_threshold": None, "max_boxes": None
    }
    assert reward_options("format") == {}


def test_inputs_are_checked():
    reward = get_reward("detection_iou")
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        reward(["a", "b"], [GT])
    with pytest.raises(TypeError, match=r"completions\[1\] is NoneType"):
        reward(["a", None], [GT, GT])
    with pytest.raises(ValueError, match="column image_hw has 1 rows, expected 2"):
        reward(["a", "b"], [GT, GT], image_hw=[(10, 10)])


def test_unused_columns_are_ignored():
    reward = get_reward("format")
    assert reward(["<think>a</think><answer>b</answer>"], [""], image_hw=[(1, 2)], anything=[3]).tolist() == [1.0]


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("format")(lambda mode: None)


def test_combine_sums_weighted_rewards_and_keeps_each_term():
    recipe = combine([("detection_iou", 2.0), RewardSpec("detection_confidence", 0.5), "format"])
    out = recipe([DETECTION, "nothing"], [GT, GT])
    assert set(out.per_reward) == {"detection_iou", "detection_confidence", "format"}
    np.testing.assert_allclose(out.total, [2.0 * 1.0 + 0.5 * 0.9 + 1.0, 0.0])
    assert out.total.dtype == np.float32
    assert (recipe.low, recipe.high) == (0.0, 3.5)


def test_combine_reads_detection_boxes_once(monkeypatch):
    from vrft_jax.rewards import detection

    calls = []
    real = detection.score_detection
    monkeypatch.setattr(detection, "score_detection", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = combine("detection")([DETECTION], [GT])
    assert len(calls) == 1 and out.total.tolist() == [np.float32(1.0 + 0.9 + 1.0)]
    # Different options are different passes.
    combine([("detection_iou", 1.0), RewardSpec("detection_confidence", 1.0, {"max_boxes": 5})])([DETECTION], [GT])
    assert len(calls) == 3


def test_combine_passes_options_and_mode():
    recipe = combine([RewardSpec("detection_iou", 1.0, {"iou_threshold": 0.995})])
    assert recipe([DETECTION.replace("100]", "99]")], [GT]).total.tolist() == [0.0]
    paper = combine("detection", mode="paper")
    assert [r.mode for r, _ in paper.terms] == ["paper"] * 3
    assert (paper.low, paper.high) == (0.0, 3.0)


def test_visual_rft_recipes_are_the_papers_unweighted_sums():
    assert {task: [n for n, _ in specs] for task, specs in VISUAL_RFT_REWARDS.items()} == {
        "detection": ["detection_iou", "detection_confidence", "format"],
        "classification": ["classification", "format"],
        "grounding": ["grounding_giou", "format"],
    }
    out = combine("detection", "paper")([DETECTION], [GT])
    assert out.total.tolist() == [np.float32(1.0 + 0.9 + 1.0)]


def test_combine_errors():
    with pytest.raises(ValueError, match="unknown task"):
        combine("segmentation")
    with pytest.raises(ValueError, match="appears twice"):
        combine(["format", "format"])
    with pytest.raises(ValueError, match="weight must be finite"):
        combine([("format", float("nan"))])
    with pytest.raises(ValueError, match="at least one"):
        combine([])
