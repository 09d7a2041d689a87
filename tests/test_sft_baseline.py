"""The paper's SFT baseline (issue 19, build item 4): `--config.mode=sft` runs the recipe's `sft` block
(LLaMA-Factory's run of Visual-RFT issue #34, visual-rft.md §6), sizes its targets from the data before the
first step, and evaluates the held-out set in the loop as a GRPO run does.

The run is `coco_ov_base65`'s recipe, whose ViRFT answers reach ~600 tokens (review-3 H2), shrunk to the loop
tests' tiny model (`train_recipe.shrink`) with 2 samples per step instead of 64; every other `sft` value is
the recipe's.
"""

import json
import math
import os

import numpy as np
import pytest

from train_recipe import shrink
from vrft_jax import recipe, run, sft
from vrft_jax.configs import coco_ov_base65
from vrft_jax.data import prompts, synthetic
from vrft_jax.data.records import Record
from vrft_jax.data.storage import read_records, write_dataset
from vrft_jax.metrics import read_metrics
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer

# The values `configs/_common.py` documents for the `sft` block: issue #34's LoRA (LLaMA-Factory's rank 8 and
# alpha 16), warmup, weight decay and 8 GPUs x 1 x 8 accumulation samples per step; the learning rate,
# micro-batches and target limit are its marked guesses.
DOCUMENTED = dict(lora_rank=8, lora_alpha=16.0, learning_rate=1e-4, warmup_steps=100, weight_decay=0.1,
                  samples_per_step=64, micro_batches=1, max_target_len=1024)
RATE = DOCUMENTED["learning_rate"]
GRPO_RATE, GRPO_PROMPTS = 1e-6, 16  # what the SFT mode inherited before it had a block (review-3 H2)


def test_the_sft_block_holds_the_values_the_recipe_documents_and_the_run_uses_them():
    config = recipe.load("coco_ov_base65")
    assert config.sft.to_dict() == DOCUMENTED
    grpo_run = recipe.build(config, check_paths=False, process_count=1)
    sft_run = recipe.build(sft.run_config(config), check_paths=False, process_count=1)
    optimizer = sft_run.train.optimizer
    assert (optimizer.learning_rate, optimizer.warmup_steps, optimizer.weight_decay) == (RATE, 100, 0.1)
    # The baseline trains LoRA adapters of the block's rank and alpha; the GRPO run fine-tunes fully.
    assert sft_run.train.lora and (sft_run.model.lora.rank, sft_run.model.lora.alpha) == (8, 16.0)
    assert not grpo_run.train.lora and grpo_run.model.lora is None
    # Warmup, then linear decay to 0 over the rest of the recipe's 750 steps.
    assert (optimizer.decay_steps, optimizer.end_learning_rate, config.total_steps) == (650, 0.0, 750)
    assert (sft_run.data.batch_size, sft_run.train.micro_batches) == (64, 1)
    # The GRPO run keeps its own optimizer and batch.
    assert (grpo_run.train.optimizer.learning_rate, grpo_run.data.batch_size) == (GRPO_RATE, GRPO_PROMPTS)
    assert sft.run_config(sft.run_config(config)).to_dict() == sft.run_config(config).to_dict()
    # The cross-entropy is the model's own (temperature 1), whatever temperature GRPO samples at.
    warm = recipe.load("coco_ov_base65", {"temperature": 0.7})
    assert recipe.build(warm, check_paths=False, process_count=1).train.scoring.temperature == 0.7
    assert recipe.build(sft.run_config(warm), check_paths=False, process_count=1).train.scoring.temperature == 1.0


def long_answer(tokenizer, tokens: int) -> str:
    """A ViRFT detection answer of about `tokens` tokens: boxes of three-digit corners until it is that long."""
    rng = np.random.default_rng(0)
    boxes = []
    while len(tokenizer(prompts.detection_solution(boxes or [[0, 0, 1, 1]]))["input_ids"]) < tokens:
        x1, y1 = (int(v) for v in rng.integers(100, 500, size=2))
        boxes.append([x1, y1, x1 + int(rng.integers(100, 500)), y1 + int(rng.integers(100, 500))])
    return prompts.detection_solution(boxes)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """(train, held-out) ViRFT-format detection sets: 3 synthetic records and one whose answer is ~600 tokens
    (as COCO base65's longest), and 2 held-out records; written once for the module."""
    tokenizer, directory = load_tokenizer(), str(tmp_path_factory.mktemp("sft_data"))
    short = list(synthetic.detection_records(2, seed=0))[:3]
    first = short[0]
    long = Record(id="long_answer", image=first.image, problem=first.problem, task="detection", label=first.label,
                  solution=long_answer(tokenizer, 600))
    train = write_dataset(directory, "base65_long", {"train": [long, *short]})
    heldout = write_dataset(directory, "base65_heldout",
                            {"val": list(synthetic.detection_records(2, seed=1))[:2]})
    return train, heldout


@pytest.mark.slow  # the 640-token update compiles for about a minute on a busy CI core
def test_sft_on_coco_base65_trains_a_600_token_answer_whole_and_evaluates_in_the_loop(datasets, tmp_path,
                                                                                      one_device):
    train, heldout = datasets
    tokenizer = load_tokenizer()
    records = sorted(read_records(train, "train"), key=lambda r: r.id != "long_answer")  # the long one first
    targets = sft.target_lengths(tokenizer, [r.solution for r in records])  # solution + EOS
    assert records[0].id == "long_answer" and 580 <= targets[0] <= 640, targets  # > 256, the old completion bucket
    assert targets.size == 4 and targets[1:].max() < 64

    c = shrink(coco_ov_base65.get_config())
    c.mode = "sft"
    c.total_steps = 2  # 2 x 2 samples: one epoch, the long answer in one of the two batches
    c.sft.samples_per_step = 2
    c.data.path, c.eval.path, c.eval.split = train, heldout, "val"
    c.eval.type = "rewards"  # the recipe's detection rewards on the held-out answers
    c.eval.max_new_tokens = 4
    c.eval_every = 1
    workdir = str(tmp_path / "sft")
    result = run.train(c, workdir)

    assert result.step == 2 and not result.preempted
    rows = {}
    for row in read_metrics(workdir):  # a step's training and evaluation scalars are rows of their own
        rows.setdefault(row["step"], {}).update(row)
    # Every target token of the epoch was trained on: the long answer whole, in the 640-token target bucket.
    assert rows[1]["tokens"] + rows[2]["tokens"] == targets.sum()
    # The baseline's optimizer, not GRPO's: the recipe's peak and its 100-step warmup from 0.
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert {k: saved["train"][k] for k in ("learning_rate", "warmup_steps", "weight_decay")} == dict(
        learning_rate=RATE, warmup_steps=100, weight_decay=0.1)
    assert saved["prompts_per_step"] == 2
    for step in (1, 2):
        assert math.isclose(rows[step]["learning_rate"], RATE * (step - 1) / 100, rel_tol=1e-5, abs_tol=1e-12)
    # The in-loop evaluation, as a GRPO run's: before training and after each step, with greedy answers.
    for step in (0, 1, 2):
        metrics = json.load(open(os.path.join(workdir, "eval", f"step_{step}.json")))
        assert metrics["examples"] == 2 and np.isfinite(metrics["reward"])
    assert all(np.isfinite(rows[step]["eval/reward"]) for step in (1, 2))
    assert result.heldout_before[2] == result.heldout_after[2] == 2


def test_a_target_over_the_limit_is_named_before_the_first_step(datasets, tmp_path, one_device):
    train, _ = datasets
    c = shrink(coco_ov_base65.get_config())
    c.mode = "sft"
    c.data.path = train
    c.sft.max_target_len = 512
    with pytest.raises(ValueError, match=r"1 record\(s\) of .* over sft.max_target_len=512 tokens: record \d "
                                         r"\(id 'long_answer'\) 6\d\d tokens; raise sft.max_target_len"):
        run.train(c, str(tmp_path / "over"))
    assert not os.path.exists(os.path.join(tmp_path, "over", "metrics.jsonl"))


def test_qwen2_5_vl_is_taught_its_answers_in_pixels_and_their_bucket_holds_the_longest_image():
    """A Qwen2.5-VL SFT target is the stored grid answer rewritten in pixels of the image the model sees; the bucket
    is measured with the boxes of the largest image the pixel budget allows (4-digit sides), never too short."""
    stored = prompts.detection_solution([[100, 200, 500, 800], [0, 0, 1000, 1000]])
    [target] = sft.targets([stored], "qwen2_5_vl", "rel1000", [(280, 560)])
    assert "'Position': [56, 56, 280, 224]" in target and "'Position': [0, 0, 560, 280]" in target
    assert sft.targets([stored], "qwen2_vl", "rel1000", [(280, 560)]) == [stored]
    side = sft.largest_side(401408)
    assert 1000 <= side < 10000  # a pixel coordinate has at most as many digits as the bound's
    tokenizer = load_tokenizer()
    source = [{"solution": stored, "id": "a"}]
    grid = sft.target_bucket(tokenizer, source, 1024)
    pixels = sft.target_bucket(tokenizer, source, 1024, frame="qwen2_5_vl", stored="rel1000", max_pixels=401408)
    longest = int(sft.target_lengths(tokenizer, sft.targets([stored], "qwen2_5_vl", "rel1000", [(side, side)]))[0])
    assert pixels >= longest >= int(sft.target_lengths(tokenizer, [target])[0]) and grid <= pixels
