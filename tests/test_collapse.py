"""GRPO collapse seen and stopped (`vrft_jax.collapse`): a run whose every reward is 0 saves and stops after
`collapse.max_zero_reward_steps` steps with an error that says what happened and which guards exist, the collapse
signals and the sampler/trainer mismatch are in every step's metrics, and dynamic sampling replaces a batch's
flat groups with the same prompts' next draws without a new shape or a new compiled program of the step."""

import dataclasses
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from compile_count import counting_compiles
from test_train import tiny_config
from vrft_jax import collapse, grpo_loop, recipe, run, sampling
from vrft_jax.data import make_iterator
from vrft_jax.metrics import read_metrics
from vrft_jax.models.qwen2_vl import Qwen2VL
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer
from vrft_jax.progress import Timer
from vrft_jax.rewards import Reward, RewardBreakdown, available_rewards, register
from vrft_jax.scoring import make_score_fn
from vrft_jax.train_step import init_state, make_train_step

ZERO_REWARD = "test_always_zero"

if ZERO_REWARD not in available_rewards():

    @register(ZERO_REWARD)
    def _zero_reward(mode):
        return Reward(ZERO_REWARD, mode, 0.0, 1.0, (),
                      lambda completions, solutions, columns: np.zeros(len(completions)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("collapse_data"))
    run.make_synthetic_data(tiny_config(directory))
    return directory


def test_a_run_whose_rewards_are_all_zero_saves_and_stops_with_the_guards_named(data_dir, tmp_path, one_device):
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir, {"total_steps": 8, "rewards.terms": {ZERO_REWARD: 1.0},
                                    "collapse.max_zero_reward_steps": 3})
    with pytest.raises(collapse.CollapseError) as error:
        run.train(config, workdir)
    message = str(error.value)
    for part in ("GRPO collapsed: every completion's reward was 0 for 3 consecutive steps", "step 3",
                 "100% of the groups flat", "saved step 3 and stopped (collapse.max_zero_reward_steps=3)",
                 "Guards: grpo.beta > 0", "collapse.dynamic_sampling", "answer_format"):
        assert part in message, (part, message)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=str)[-1] == "3"  # saved before stopping
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:  # the collapse signals and the mismatch, on every step
        assert row["reward_nonzero"] == 0 and row["reward_zero_std_groups"] == 1
        assert 0 <= row["no_answer"] <= 1 and 0 <= row["truncated"] <= 1 and math.isfinite(row["entropy"])
        # One float32 model, two programs (decode loop, teacher-forced scorer): a few ulps of logits below 16.
        assert 0 <= row["mismatch/kl"] < 1e-9 and 0 <= row["mismatch/gap_max"] < 1e-4
    # The same command resumes from the saved step and meets the same collapse three steps later.
    with pytest.raises(collapse.CollapseError, match="saved step 6 and stopped"):
        run.train(config, workdir)


def test_the_zero_reward_watch_counts_consecutive_steps_only():
    watch = collapse.ZeroRewardWatch(collapse.CollapseConfig(max_zero_reward_steps=2))
    seen = [watch.observe({"reward_nonzero": v}) for v in (0.0, 0.5, 0.0, float("nan"), 0.0, 0.0)]
    assert seen == [False, False, False, False, False, True]  # a NaN share (no real completion) breaks the streak
    never = collapse.ZeroRewardWatch(collapse.CollapseConfig(max_zero_reward_steps=0))
    assert not any(never.observe({"reward_nonzero": 0.0}) for _ in range(50))
    with pytest.raises(ValueError, match=r"collapse.dynamic_sampling=-1 must be >= 0"):
        collapse.CollapseConfig(dynamic_sampling=-1)


def test_flat_groups_and_completion_shares():
    total = np.array([1, 1, 0, 1, np.nan, np.nan, 2, np.nan], np.float32)  # groups of 2
    valid = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    # [1, 1] flat; [0, 1] not; padding: not a group; [2, unscored]: one scored sample, flat.
    assert collapse.flat_groups(total, 2, valid).tolist() == [True, False, False, True]
    texts = ["<answer>red</answer>", "<answer> </answer>", "no tags", "<answer>blue"]
    assert collapse.answered(texts).tolist() == [True, False, False, False]
    shares = collapse.completion_shares(collapse.answered(texts), np.array([1, 1, 0, 0], bool), np.ones(4, bool))
    assert shares == {"no_answer": 0.75, "truncated": 0.5}


class ScriptedReward:
    """Draw 1: every completion 0 (every group flat). Later draws: prompt 0's group stays flat (0), the others score
    by their sample's index (not flat)."""

    def __init__(self, group_size):
        self.group_size, self.calls = group_size, 0

    def __call__(self, texts, solutions, **columns):
        self.calls += 1
        total = np.zeros(len(texts), np.float32)
        if self.calls > 1:
            total = np.tile(np.arange(self.group_size, dtype=np.float32), len(texts) // self.group_size)
            total[:self.group_size] = 0
        return RewardBreakdown(total, {"scripted": total})


def test_dynamic_sampling_replaces_flat_groups_with_the_same_shapes_and_programs(data_dir, monkeypatch):
    settings = recipe.build(tiny_config(data_dir, {"grpo.beta": 0.0}))
    tokenizer = load_tokenizer()
    graphdef, state = init_state(Qwen2VL(settings.model, rngs=nnx.Rngs(0)), settings.train)
    g = settings.sampling.group_size
    context = grpo_loop.RunContext(
        graphdef=graphdef, train=settings.train, sampling=settings.sampling, reward_fn=settings.reward_fn,
        tokenizer=tokenizer, step=make_train_step(graphdef, state, settings.train),
        score=make_score_fn(graphdef, state.params, settings.train.scoring), reference=None,
        sampler_graphdef=sampling.sampler_graphdef(settings.model, settings.sampler_dtype),
        sampler_cast=sampling.make_sampler_cast(state.params, settings.sampler_dtype))
    data = make_iterator(settings.data, settings.model, tokenizer=tokenizer)
    state, _ = grpo_loop.iteration(context, state, next(data), jax.random.key(1), Timer())  # compiles the step

    draws, batches = [], []
    real_draw, real_batch = grpo_loop.draw, grpo_loop.train_batch
    monkeypatch.setattr(grpo_loop, "draw", lambda *a: draws.append(real_draw(*a)) or draws[-1])
    monkeypatch.setattr(grpo_loop, "train_batch", lambda *a: batches.append(real_batch(*a)) or batches[-1])
    resampling = dataclasses.replace(context, reward_fn=ScriptedReward(g),
                                     collapse=collapse.CollapseConfig(dynamic_sampling=2))
    with counting_compiles() as names:
        state, outcome = grpo_loop.iteration(resampling, state, next(data), jax.random.key(2), Timer())
    # The rollout, the scorer and the update are the first iteration's programs: the only new ones are the rows'
    # selection and the transfer of its bool mask (jnp.asarray's 'stage'), each compiled once.
    assert set(names) <= {"jit(_take_rows)", "jit(stage)"}, names
    assert len(draws) == 3  # the batch, then two more: prompt 0's group stays flat
    host = outcome.host
    assert host["dynamic_sampling/flat_drawn"] == 1.0 and host["dynamic_sampling/rollouts"] == 2
    assert host["dynamic_sampling/replaced"] == 0.75 and host["reward_zero_std_groups"] == 0.25

    first, second, trained = np.asarray(draws[0].out.tokens), np.asarray(draws[1].out.tokens), batches[-1]
    assert trained.completions.shape == first.shape  # static: B*G rows of max_new_tokens
    np.testing.assert_array_equal(np.asarray(trained.completions)[:g], first[:g])  # still flat: the first draw's
    np.testing.assert_array_equal(np.asarray(trained.completions)[g:], second[g:])  # replaced by the second's
    sampled_logprobs = np.asarray(draws[1].out.logprobs)[g:]
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(trained.sampled_logprobs)[g:]),
                                  np.where(np.asarray(draws[1].out.mask)[g:], sampled_logprobs, 0))
    advantages = np.asarray(trained.advantages)
    assert not advantages[:g].any() and advantages[g:].any()  # the replaced groups carry the signal

    with counting_compiles() as names:  # a second resampling step compiles nothing at all
        grpo_loop.iteration(dataclasses.replace(resampling, reward_fn=ScriptedReward(g)), state, next(data),
                            jax.random.key(3), Timer())
    assert names == [], names


def test_kept_groups_takes_the_groups_with_a_signal_first_in_the_order_drawn():
    flat = np.array([1, 0, 1, 0, 0, 1], bool)
    valid = np.array([1, 1, 1, 1, 0, 1], bool)  # group 4 is padding: kept last, even after the flat ones
    assert collapse.kept_groups(flat, valid, 2).tolist() == [1, 3]
    assert collapse.kept_groups(flat, valid, 3).tolist() == [0, 1, 3]  # then the first flat group drawn
    assert collapse.kept_groups(flat, valid, 6).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="cannot keep 7 of 6 groups"):
        collapse.kept_groups(flat, valid, 7)
    with pytest.raises(ValueError, match=r"collapse.oversample=0 must be >= 1"):
        collapse.CollapseConfig(oversample=0)


class FlatGroups:
    """Every group scores by its sample's index, except the groups `flat`, which score 0 throughout."""

    def __init__(self, group_size, flat):
        self.group_size, self.flat = group_size, flat

    def __call__(self, texts, solutions, **columns):
        total = np.tile(np.arange(self.group_size, dtype=np.float32), len(texts) // self.group_size)
        for group in self.flat:
            total[group * self.group_size:(group + 1) * self.group_size] = 0
        return RewardBreakdown(total, {"scripted": total})


def test_oversampling_trains_on_the_groups_with_a_signal_with_static_shapes(data_dir, monkeypatch):
    """collapse.oversample=2: the step draws 8 prompts (the data batch), samples G of each, and the update takes
    the 4 non-flat groups first in the order drawn, with their own prompts, completions and sampled logprobs. The
    logged rewards are the whole draw's; a second step compiles nothing."""
    config = tiny_config(data_dir, {"grpo.beta": 0.0, "collapse.oversample": 2})
    settings = recipe.build(config)
    assert settings.data.batch_size == 2 * config.prompts_per_step == 8
    warm_start = run.warm_start_config(tiny_config(data_dir, {"collapse.oversample": 2, "warm_start.sft_steps": 2}))
    assert warm_start.collapse.oversample == 1 and recipe.build(warm_start).data.batch_size == 4  # SFT: no oversampling
    tokenizer = load_tokenizer()
    graphdef, state = init_state(Qwen2VL(settings.model, rngs=nnx.Rngs(0)), settings.train)
    g = settings.sampling.group_size
    context = grpo_loop.RunContext(
        graphdef=graphdef, train=settings.train, sampling=settings.sampling, reward_fn=FlatGroups(g, (0, 3, 4)),
        tokenizer=tokenizer, step=make_train_step(graphdef, state, settings.train),
        score=make_score_fn(graphdef, state.params, settings.train.scoring), reference=None,
        sampler_graphdef=sampling.sampler_graphdef(settings.model, settings.sampler_dtype),
        sampler_cast=sampling.make_sampler_cast(state.params, settings.sampler_dtype), collapse=settings.collapse)
    data = make_iterator(settings.data, settings.model, tokenizer=tokenizer)
    state, _ = grpo_loop.iteration(context, state, next(data), jax.random.key(1), Timer())  # compiles the step

    draws, batches = [], []
    real_draw, real_batch = grpo_loop.draw, grpo_loop.train_batch
    monkeypatch.setattr(grpo_loop, "draw", lambda *a: draws.append((a[2], real_draw(*a))) or draws[-1][1])
    monkeypatch.setattr(grpo_loop, "train_batch", lambda *a: batches.append(real_batch(*a)) or batches[-1])
    with counting_compiles() as names:
        state, outcome = grpo_loop.iteration(context, state, next(data), jax.random.key(2), Timer(), samples=3)
    assert names == [], names
    (batch, drawn), = draws
    trained = batches[-1]
    kept = [1, 2, 5, 6]  # groups 0, 3 and 4 are flat; 7 has a signal but comes after the first four
    rows = [k * g + i for k in kept for i in range(g)]
    assert trained.completions.shape == (4 * g, settings.sampling.max_new_tokens)
    np.testing.assert_array_equal(np.asarray(trained.completions), np.asarray(drawn.out.tokens)[rows])
    np.testing.assert_array_equal(np.asarray(trained.inputs.input_ids), np.asarray(batch.model_inputs.input_ids)[kept])
    np.testing.assert_array_equal(np.asarray(trained.inputs.patches), np.asarray(batch.model_inputs.patches)[kept])
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(trained.sampled_logprobs)),
                                  np.where(np.asarray(drawn.out.mask)[rows], np.asarray(drawn.out.logprobs)[rows], 0))
    assert np.abs(np.asarray(trained.advantages)).min() > 0  # every kept group carries a signal
    host = outcome.host
    assert host["oversample/signal_drawn"] == 5 / 8 and host["oversample/flat_kept"] == 0
    assert host["reward_zero_std_groups"] == 3 / 8  # the whole draw's rewards: the policy's, not the kept ones'
    assert host["reward"] == np.mean(drawn.everyone.total)
    assert [s["solution"] for s in outcome.samples] == batch.meta["solution"][:3]  # the draw's first prompts
