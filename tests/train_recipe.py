"""A recipe file for the loop's tests (`--config=tests/train_recipe.py`, or `recipe.load(PATH, ...)`): the
demo recipe shrunk until a step takes a fraction of a second on one CPU core, and a reward that a random
model's gibberish already spreads.

The demo's reward (the class name) is 0 for every completion of a random model, so every group would be
flat, every advantage 0 and every update a no-op: a resume test would compare parameters that never
moved. `test_completion_length` (a completion's length in characters over 64, at most 1) differs
between the 8-token samples of a random policy, so the advantages, the gradient and the update are not
zero from the first step. It is registered when this file is loaded, in the process that runs the
recipe (a child `python -m vrft_jax.train` too); the guard lets the file be loaded again.

The data paths are relative, like the demo's: tests override `data.path` and `eval.path` to their
tmp_path, where `run.make_synthetic_data` writes the 16 training and 8 held-out images.

Its argument `family=qwen2_5_vl` swaps in the same tiny model of that family (Qwen2.5-VL: the windowed
RMSNorm/SwiGLU vision tower, 56-pixel windows over 112 x 112 images, so each image spans four; `qwen3_vl`:
Qwen3's decoder with q/k norms and a head_dim of its own, 16-pixel patches with a position table, DeepStack
from two vision blocks), and
`task=detection` trains on synthetic detection records with Visual-RFT's IoU and format rewards, in the
family's box frame.
"""

import numpy as np

from vrft_jax.configs import _common, demo
from vrft_jax.rewards import Reward, available_rewards, register

LENGTH_REWARD = "test_completion_length"
# Metric keys (prefixes) that differ between two runs of identical numbers: wall-clock timings.
TIMING_KEYS = ("time/", "rollout_tokens_per_s", "eval/examples_per_s")

if LENGTH_REWARD not in available_rewards():

    @register(LENGTH_REWARD)
    def _length_reward(mode):
        def score(completions, solutions, columns):
            del solutions, columns
            return np.array([min(len(text), 64) / 64 for text in completions], np.float64)

        return Reward(LENGTH_REWARD, mode, 0.0, 1.0, (), score)


def shrink(c):
    """Recipe `c` (unlocked) with the tiny model and the smallest shapes: any recipe's step takes a fraction of
    a second on one CPU core, its data, rewards and evaluation unchanged. float32 on one mesh axis, no remat,
    random initial weights; 56 x 56 images (4 visual tokens); rollouts of G 2 x 8 new tokens."""
    c.sample_every = 0
    c.eval_every = 0
    c.export_hf = False  # the demo exports; the export's own test turns it on
    c.param_dtype = "float32"
    c.compute_dtype = "float32"
    c.remat = "none"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    # The real vocabulary (the real tokenizer's ids), everything else as small as the model allows:
    # head_dim 16 (M-RoPE sections of its 8 frequencies), 56 x 56 images (4 visual tokens).
    c.model.preset = "custom"
    c.model.text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, mrope_section=(2, 3, 3))
    c.model.vision = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, out_dim=32)
    c.model.tie_word_embeddings = True
    c.model.checkpoint = ""
    c.data.max_pixels = 56 * 56
    c.data.num_workers = 0
    c.sampling.max_new_tokens = 8
    c.sampling.group_size = 2
    c.warm_start.sft_steps = 0
    # One rollout of `prompts_per_step` prompts per step at temperature 1, as the loop's tests count and check them
    # (test_collapse turns on redraws and oversampling itself); the demo this shrinks oversamples 3x at 0.7.
    c.collapse.dynamic_sampling = 0
    c.collapse.oversample = 1
    c.temperature = 1.0
    return c


ARGS = {"family": ("qwen2_vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")),
        "task": ("classification", ("classification", "detection"))}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
    c = shrink(demo.get_config())
    c.name = "test_train"
    c.total_steps = 6
    c.log_every = 1
    c.ckpt_every = 100  # the last step (and a preempted one) is saved all the same
    c.keep_checkpoints = 2
    c.prompts_per_step = 4
    c.data.max_prompt_len = 128
    c.data.path = "data/train"
    c.source.prepare = "synthetic --task classification --num-images 16 --seed 0"
    c.eval.path = "data/heldout"
    c.eval.split = "test"
    c.eval.prepare = "synthetic --task classification --num-images 8 --seed 1 --split test"
    c.sampling.top_k = 50
    c.grpo.loss = "paper"
    c.grpo.beta = 0.04
    c.train.num_iterations = 1
    c.train.micro_batches = 1
    c.train.learning_rate = 5e-5
    c.train.max_consecutive_nonfinite = 10
    # `--config.mode=sft` here: the train block's optimizer and batch and the rollout's 8 tokens, as the loop's
    # SFT tests ran before the recipes had an `sft` block; the baseline's values are tested on a real recipe.
    c.sft.learning_rate = c.train.get_oneway_ref("learning_rate")
    c.sft.warmup_steps = 0
    c.sft.weight_decay = 0.0
    c.sft.samples_per_step = c.get_oneway_ref("prompts_per_step")
    c.sft.micro_batches = 1
    c.sft.max_target_len = 8
    c.rewards.mode = "strict"
    c.rewards.terms = {LENGTH_REWARD: 1.0}
    if arg.family == "qwen2_5_vl":
        c.model.family = "qwen2_5_vl"
        c.model.vision = dict(depth=2, embed_dim=32, num_heads=2, out_dim=32, intermediate_size=48, window_size=56,
                              fullatt_block_indexes=(1,))
        c.data.max_pixels = 112 * 112
    if arg.family == "qwen3_vl":
        c.model.family = "qwen3_vl"
        c.model.text = dict(c.model.text.to_dict(), qkv_bias=False, qk_norm=True, mrope_interleaved=True,
                            explicit_head_dim=24, mrope_section=(4, 4, 4), num_layers=2)
        c.model.vision = dict(depth=2, embed_dim=32, num_heads=2, out_dim=32, intermediate_size=48, patch_size=16,
                              num_position_embeddings=16, deepstack_visual_indexes=(0, 1))
        c.data.min_pixels = 64 * 64
        c.data.max_pixels = 64 * 64
    if arg.task == "detection":
        c.source.prepare = "synthetic --task detection --num-images 16 --seed 0"
        c.eval.prepare = "synthetic --task detection --num-images 8 --seed 1 --split test"
        c.rewards.mode = "paper"
        c.rewards.terms = {"detection_iou": 1.0, "format": 1.0}
        c.data.max_prompt_len = 256
    return c
