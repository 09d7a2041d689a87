"""The training loop (issue 10): exact resume across a real SIGTERM, non-finite updates, SFT, the seams of
`grpo_loop` (review M1, M2), and no recompilation after the first step.

Every run uses `tests/train_recipe.py`: the demo recipe shrunk to a 1-layer width-32 model over the real
vocabulary, 4 prompts x G 2, 8 new tokens, and a length reward that a random model's samples already
spread (so GRPO's updates are not zero). The session has 8 fake CPU devices (conftest); the loop's runs
here use one of them, as the child processes do: a mesh over 8 fake devices would triple each step on
2 cores and is tested elsewhere.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compile_count import counting_compiles
from train_recipe import TIMING_KEYS
from vrft_jax import grpo_loop, model_dir, recipe, run, sampling, sft, sharding
from vrft_jax.data import make_iterator
from vrft_jax.data import storage as datasets
from vrft_jax.metrics import read_metrics
from vrft_jax.models.qwen2_vl.model import Qwen2VL, random_init
from vrft_jax.models.qwen2_vl.tokenizer import CHAT_TEMPLATE, ENDOFTEXT_ID, IM_END_ID, load_tokenizer
from vrft_jax.progress import Timer
from vrft_jax.scoring import make_score_fn
from vrft_jax.train_step import NonFiniteUpdatesError, init_state, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "train_recipe.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The recipe's synthetic datasets (16 training images, 8 held-out), written once for the module."""
    directory = str(tmp_path_factory.mktemp("train_data"))
    run.make_synthetic_data(tiny_config(directory))
    return directory


def tiny_config(data: str, overrides=None):
    return recipe.load(RECIPE, {"data.path": os.path.join(data, "train"), "eval.path": os.path.join(data, "heldout"),
                                **(overrides or {})})


def test_a_synthetic_dataset_made_by_other_arguments_is_refused_by_name(data_dir):
    """The demo reuses its datasets: one left by another version of the recipe (here another image
    count) is an error naming the argument and the directory, not silently trained on."""
    config = tiny_config(data_dir)
    run.make_synthetic_data(config)  # made by this recipe's command: reused as it is
    stale = tiny_config(data_dir, {"source.prepare": config.source.prepare.replace("--num-images 16",
                                                                                   "--num-images 17")})
    assert stale.source.prepare != config.source.prepare
    with pytest.raises(recipe.RecipeError, match=r"train dataset at .*train was made with other arguments.*"
                                                r"--num-images 16 \(recipe: 17\).* pass --config.source.prepare=''"):
        run.make_synthetic_data(stale)
    # the user's own set (made from another source) under the demo's data.path is trained on as it is
    mine = os.path.join(data_dir, "mine")
    shutil.copytree(os.path.join(data_dir, "train"), mine)
    metadata = os.path.join(datasets.dataset_dir(mine), datasets.METADATA_FILE)
    with open(metadata) as f:
        made = json.load(f)
    with open(metadata, "w") as f:
        json.dump({**made, "source": {"source": "virft", "json": "mine.json"}}, f)
    run.make_synthetic_data(tiny_config(data_dir, {"data.path": mine}))
    shutil.rmtree(mine)


def test_the_heldout_reward_counts_every_example_once_the_last_partial_batch_included(data_dir, tmp_path, one_device):
    """8 held-out examples in batches of 3: 3 + 3 + 2 and a row of padding only, which the sampler takes
    (review H2) and the reward leaves out. Every example is scored once, before and after."""
    config = tiny_config(data_dir, {"total_steps": 1, "eval_every": 1, "prompts_per_step": 3})
    result = run.train(config, str(tmp_path / "run"))
    assert result.heldout_before[2] == 8 and result.heldout_after[2] == 8
    assert all(np.isfinite(result.heldout_before[:2])) and all(np.isfinite(result.heldout_after[:2]))


def compiles_per_step(monkeypatch, module, name):
    """Wrap `module.name` (the loop's per-step function) to note the compilations seen so far at the
    start of each call; use inside `counting_compiles`. Returns (that list, the compile list setter)."""
    marks, state = [], {"names": None}
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        marks.append(list(state["names"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return marks, state


def without_timings(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)}


def split_rows(rows):
    """(training rows, evaluation rows): with eval_every the held-out evaluation adds rows of `eval/` keys."""
    rows = list(rows)
    evaluation = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return [r for r in rows if r not in evaluation], evaluation


def canonical(rows):
    """Rows as JSON text: NaN equals NaN, and a difference prints readably."""
    return [json.dumps(row, sort_keys=True) for row in rows]


def params_of(directory, mesh):
    return nnx.state(model_dir.load_model(directory, mesh=mesh), nnx.Param)


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f"{jax.tree_util.keystr(path)} differs"


# ------------------------------------------------------------------------------------------------ resume


def _child_env():
    """One CPU device (the conftest's 8 fake ones dropped); the session's compilation cache (conftest), so the three
    runs compile the tiny model's programs once."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(JAX_PLATFORMS="cpu")
    return env


def _command(workdir, data):
    return [sys.executable, "-m", "vrft_jax.train", f"--config={RECIPE}", f"--workdir={workdir}",
            f"--config.data.path={os.path.join(data, 'train')}", f"--config.eval.path={os.path.join(data, 'heldout')}",
            "--config.total_steps=6", "--config.eval_every=1"]


def _heldout_summary(log):
    """The run's last line: the held-out reward before and after GRPO."""
    [line] = [line for line in log.splitlines() if line.startswith("held-out reward: ")]
    return line


def _run(command, env, log):
    with open(log, "w") as out:
        done = subprocess.run(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = open(log).read()
    assert done.returncode == 0, text[-3000:]
    return text


def _rows_so_far(workdir):
    return read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


def _checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_then_the_same_command_ends_bitwise_where_a_straight_run_does(data_dir, tmp_path, one_device):
    env = _child_env()
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    log = _run(_command(straight, data_dir), env, tmp_path / "straight.log")
    assert "finished test_train: 6 steps" in log

    # The same command, stopped by a real SIGTERM once the step-3 row is on disk. The loop writes a
    # step's row, then asks the guard: the signal is seen at step 3, or at step 4 if it lands after that
    # check (a step takes ~0.5 s here, so it cannot miss both).
    with open(tmp_path / "preempted.log", "w") as out:
        proc = subprocess.Popen(_command(resumed, data_dir), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not any(row["step"] >= 3 for row in _rows_so_far(resumed)):
            assert proc.poll() is None, open(tmp_path / "preempted.log").read()[-3000:]
            assert time.monotonic() < deadline, "no step-3 row within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    log = open(tmp_path / "preempted.log").read()
    assert returncode == 0, log[-3000:]  # SIGTERM saves and exits 0
    stopped = _checkpoint_steps(resumed)[-1]
    assert 3 <= stopped < 6, f"stopped at step {stopped}"
    assert "finished" not in log and not os.path.exists(os.path.join(resumed, "model"))
    first_rows, first_evals = split_rows(read_metrics(resumed))
    assert [row["step"] for row in first_rows] == list(range(1, stopped + 1))
    # eval_every=1, and step 0; the stopped step's evaluation is left for the resumed run: the preemption flag is
    # read before it (a TPU's notice does not wait for an evaluation)
    assert [row["step"] for row in first_evals] == list(range(0, stopped))

    log = _run(_command(resumed, data_dir), env, tmp_path / "resumed.log")
    assert "finished test_train: 6 steps" in log
    # The held-out reward of the initial weights, measured by the first process, is reported by the
    # second one as well (from the workdir), and the after-GRPO one is the straight run's.
    assert _heldout_summary(log) == _heldout_summary(open(tmp_path / "straight.log").read())

    (rows_straight, evals_straight), (rows_resumed, evals_resumed) = (split_rows(read_metrics(straight)),
                                                                      split_rows(read_metrics(resumed)))
    assert [row["step"] for row in rows_resumed] == list(range(1, 7))
    # The steps before the preemption are the first process's rows, timings and all: the second one
    # resumed from the checkpoint rather than starting over (which would rewrite them).
    assert canonical(rows_resumed[:stopped]) == canonical(first_rows)
    assert canonical(evals_resumed[:stopped]) == canonical(first_evals)
    assert canonical(map(without_timings, rows_resumed)) == canonical(map(without_timings, rows_straight))
    # and the held-out evaluation of every step, the resumed run's included, is the straight run's
    assert [row["step"] for row in evals_resumed] == list(range(0, 7))
    assert canonical(map(without_timings, evals_resumed)) == canonical(map(without_timings, evals_straight))
    # Each step really moved the parameters: a gradient, a learning rate, nothing skipped.
    assert all(r["grad_norm"] > 0 and r["learning_rate"] > 0 and r["update_skipped"] == 0 for r in rows_straight)
    assert_bitwise_equal(params_of(os.path.join(resumed, "model"), one_device),
                         params_of(os.path.join(straight, "model"), one_device))


# ------------------------------------------------------------------------------------------ non-finite


def test_nonfinite_updates_are_skipped_counted_and_n_in_a_row_stop_the_run(data_dir, tmp_path, one_device,
                                                                         monkeypatch):
    # NaN advantages at steps 2, 4 and 5 make the loss and the gradient NaN inside the real update.
    poisoned, calls = {2, 4, 5}, []
    real = grpo_loop.group_advantages

    def advantages(context, total):
        calls.append(None)
        values = real(context, total)
        return np.full_like(values, np.nan) if len(calls) in poisoned else values

    monkeypatch.setattr(grpo_loop, "group_advantages", advantages)
    marks, seen = compiles_per_step(monkeypatch, grpo_loop, "iteration")
    config = tiny_config(data_dir, {"total_steps": 6, "train.max_consecutive_nonfinite": 2})
    with counting_compiles() as names, pytest.raises(NonFiniteUpdatesError) as error:
        seen["names"] = names
        run.train(config, str(tmp_path / "run"))
    message = str(error.value)
    assert "2 updates in a row were skipped for a non-finite loss or gradient" in message
    assert "3 in all" in message and "max_consecutive_nonfinite=2" in message

    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # stopped at step 5, its row written first
    assert [r["update_skipped"] for r in rows] == [0, 1, 0, 1, 1]
    assert [r["nonfinite_total"] for r in rows] == [0, 1, 1, 2, 3]
    assert [r["nonfinite_streak"] for r in rows] == [0, 1, 0, 1, 2]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[2]["loss"])
    # A skipped update does not advance the schedule: step 3 runs at step 2's learning rate.
    assert rows[2]["learning_rate"] == rows[1]["learning_rate"] > rows[3]["learning_rate"]
    # The loop compiled everything in its first step; NaNs change no shape.
    assert len(marks) == 5 and names[len(marks[1]):] == [], names[len(marks[1]):]


# ------------------------------------------------------------------------------------------------- SFT


def heldout_cross_entropy(settings, params, tokenizer, score) -> tuple[float, int]:
    """(mean token NLL of the held-out solutions + EOS under `params`, tokens): SFT's own targets."""
    nll = tokens = 0.0
    for batch in make_iterator(settings.eval_data, settings.model, tokenizer=tokenizer):
        targets = sft.sft_batch(batch.model_inputs, batch.solution, tokenizer, length=settings.sampling.max_new_tokens,
                                eos_id=settings.sampling.eos_token_ids[0], pad_id=settings.sampling.pad_token_id,
                                valid=batch.meta["valid"])
        mask = np.asarray(targets.completion_mask, np.float64)
        nll -= float((np.asarray(score(params, targets.scored()), np.float64) * mask).sum())
        tokens += mask.sum()
    return nll / tokens, int(tokens)


def test_sft_lowers_the_heldout_cross_entropy(data_dir, tmp_path, one_device, monkeypatch):
    # Full fine-tuning (the sft block's LoRA default is tests/test_lora_run.py's).
    config = tiny_config(data_dir, {"mode": "sft", "total_steps": 8, "sft.learning_rate": 3e-2, "sft.lora_rank": 0})
    marks, seen = compiles_per_step(monkeypatch, sft, "iteration")
    with counting_compiles() as names:
        seen["names"] = names
        result = run.train(config, str(tmp_path / "sft"))
    assert len(marks) == 8 and names[len(marks[1]):] == [], names[len(marks[1]):]
    rows = read_metrics(str(tmp_path / "sft"))
    assert rows[-1]["loss"] < rows[0]["loss"]  # the training cross-entropy

    settings = recipe.build(config)
    tokenizer = load_tokenizer()
    initial = random_init(settings.model, config.seed)  # the run's initial weights (no checkpoint)
    graphdef, before_params = nnx.split(initial)
    _, after_params = nnx.split(model_dir.load_model(result.model_dir, mesh=one_device))
    score = make_score_fn(graphdef, before_params, settings.train.scoring)
    before, tokens = heldout_cross_entropy(settings, before_params, tokenizer, score)
    after, _ = heldout_cross_entropy(settings, after_params, tokenizer, score)
    # 8 held-out records x 8 target tokens: `<answer>CLASS</answer>` is 7 tokens, then EOS.
    assert tokens == 64
    # A random init predicts nearly uniformly: ln(151,936) = 11.93 nats per token (measured 11.86). 7 of
    # the 8 target tokens are the same in every record, so the floor is ln(3) / 8 = 0.14 (the class at
    # chance). 8 steps at lr 3e-2 measured 3.98; a drop of 4 nats is half of that, and far outside the
    # run-to-run change of an untrained model (0: same seed, same weights).
    assert abs(before - math.log(151936)) < 0.5, before
    assert after < before - 4.0, (before, after)


# ------------------------------------------------------------------------------------------- grpo_loop


@pytest.fixture(scope="module")
def loop(data_dir):
    """A run's context on one device (mesh None) with the clipped GRPO loss and two updates per rollout, so
    every phase runs: sampler weights, rollout, rewards, reference and old-policy scoring, the updates."""
    config = tiny_config(data_dir, {"grpo.loss": "grpo", "train.num_iterations": 2})
    settings = recipe.build(config)
    assert settings.train.num_iterations == 2 and settings.train.grpo.beta > 0
    assert jnp.dtype(settings.sampler_dtype) == jnp.float32  # the sampler's dtype is the train state's
    tokenizer = load_tokenizer()
    graphdef, state = init_state(Qwen2VL(settings.model, rngs=nnx.Rngs(0)), settings.train)
    context = grpo_loop.RunContext(
        graphdef=graphdef, train=settings.train, sampling=settings.sampling, reward_fn=settings.reward_fn,
        tokenizer=tokenizer, step=make_train_step(graphdef, state, settings.train),
        score=make_score_fn(graphdef, state.params, settings.train.scoring),
        reference=jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state.params),
        sampler_graphdef=sampling.sampler_graphdef(settings.model, settings.sampler_dtype),
        sampler_cast=sampling.make_sampler_cast(state.params, settings.sampler_dtype))
    data = make_iterator(settings.data, settings.model, tokenizer=tokenizer)
    return {"context": context, "state": state, "data": data, "step": 0}


def run_iteration(loop, **kwargs):
    loop["step"] += 1
    loop["state"], outcome = grpo_loop.iteration(loop["context"], loop["state"], next(loop["data"]),
                                                 jax.random.key(loop["step"]), Timer(), **kwargs)
    return outcome


def pointers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


def test_sampler_weights_never_alias_the_train_state_and_survive_a_donated_step(loop):
    context, params = loop["context"], loop["state"].params
    weights = context.sampler_cast(params)  # float32 on one device: nothing to convert, still a copy
    assert [x.dtype for x in jax.tree.leaves(weights)] == [x.dtype for x in jax.tree.leaves(params)]
    theirs = set(pointers(params))
    assert not theirs & set(pointers(weights))
    snapshot = [np.array(x) for x in jax.tree.leaves(weights)]

    run_iteration(loop)  # donates the train state the weights were made from
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # the donation happened
    leaves = jax.tree.leaves(weights)
    assert not any(x.is_deleted() for x in leaves)
    for x, y in zip(leaves, snapshot):
        assert np.array_equal(np.asarray(x), y)
    # The sampler can still decode from them.
    batch = next(loop["data"])
    out = grpo_loop.sample(context, weights, batch.model_inputs, jax.random.key(0))
    assert out.tokens.shape == (4 * 2, 8)

    # Other dtypes, and a mesh whose sampling layout is already the parameters': still new buffers.
    params = loop["state"].params
    cast = sampling.make_sampler_cast(params, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(cast(params))} == {jnp.dtype(jnp.bfloat16)}
    assert not set(pointers(params)) & set(pointers(cast(params)))
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    placed = jax.device_put(params, sharding.state_shardings(params, mesh, sharding.SAMPLING_RULES))
    on_mesh = sampling.make_sampler_cast(placed, jnp.float32, mesh)(placed)
    shards = {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(placed) for s in x.addressable_shards}
    assert not shards & {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(on_mesh) for s in x.addressable_shards}


def test_padding_rows_get_nan_reward_zero_advantage_and_no_tokens(loop):
    seen = []
    real = loop["context"].reward_fn

    def reward_fn(texts, solutions, **columns):
        seen.append(list(texts))
        return real(texts, solutions, **columns)

    context = dataclasses.replace(loop["context"], reward_fn=reward_fn)
    g, rows = context.group_size, 8
    texts = ["a" * (3 + 5 * i) for i in range(rows)]  # lengths differ within every group
    valid_prompts = np.array([True, False, True, True])
    meta = {"solution": ["<answer>circle</answer>"] * 4, "valid": valid_prompts,
            "image_hw": np.full((4, 2), 56)}
    rewards, valid = grpo_loop.score_rewards(context, texts, meta)
    padding = np.repeat(~valid_prompts, g)
    assert np.array_equal(valid, ~padding)
    assert seen == [[t for t, p in zip(texts, padding) if not p]]  # the rewards never see padding
    assert np.isnan(rewards.total[padding]).all() and np.isfinite(rewards.total[~padding]).all()
    assert all(np.isnan(v[padding]).all() for v in rewards.per_reward.values())

    advantages = grpo_loop.group_advantages(context, rewards.total)
    assert np.array_equal(advantages[padding], np.zeros(2, np.float32))
    assert np.all(advantages[~padding] != 0)

    out = sampling.Rollout(tokens=jnp.full((rows, 8), 7, jnp.int32), logprobs=jnp.zeros((rows, 8)),
                           lengths=jnp.array([8, 5, 8, 8, 3, 8, 1, 8], jnp.int32))
    inputs = next(loop["data"]).model_inputs
    batch = grpo_loop.train_batch(context, inputs, out, advantages, valid)
    mask = np.asarray(batch.completion_mask)
    assert not mask[padding].any()
    assert np.array_equal(mask[~padding], np.asarray(out.mask)[~padding].astype(mask.dtype))


def test_the_context_refuses_a_sampling_temperature_other_than_the_scorers(loop):
    context = loop["context"]
    assert context.train.scoring.temperature == context.sampling.temperature == 1.0
    with pytest.raises(ValueError, match="sampling temperature 0.7 differs from the scorer's 1.0"):
        dataclasses.replace(context, sampling=dataclasses.replace(context.sampling, temperature=0.7))
    # Greedy decoding samples nothing, so its temperature is not used.
    dataclasses.replace(context, sampling=dataclasses.replace(context.sampling, temperature=0.7, greedy=True))


def test_old_logprobs_come_from_the_policy_scorer_not_the_rollout(loop, monkeypatch):
    context = loop["context"]
    sentinel = -7.0
    real_sample = grpo_loop.sample

    def sample(*args):  # the rollout's logprobs replaced by a value no scorer gives
        out = real_sample(*args)
        return out.replace(logprobs=jnp.where(out.mask, sentinel, 0.0).astype(jnp.float32))

    calls = []
    real_step = context.step

    def step(state, batch, measure_entropy=True):
        if not calls:  # the state before the first update: the rollout's policy
            scored = batch.scored()
            calls.append((np.asarray(context.score(state.params, scored)),
                          np.asarray(context.score(context.reference, scored))))
        calls.append(tuple(np.asarray(x) for x in (batch.old_logprobs, batch.ref_logprobs, batch.completion_mask)))
        return real_step(state, batch, measure_entropy)

    monkeypatch.setattr(grpo_loop, "sample", sample)
    loop["context"] = dataclasses.replace(context, step=step)
    try:
        run_iteration(loop)
    finally:
        loop["context"] = context
    (old_expected, ref_expected), first, second = calls
    assert len(calls) == 3  # num_iterations = 2 updates on the one rollout
    mask = first[2].astype(bool)
    assert mask.any()
    for old, ref, _ in (first, second):  # both updates get the same, scorer-made, old logprobs
        assert np.array_equal(old, old_expected) and np.array_equal(ref, ref_expected)
        assert not np.isclose(old[mask], sentinel).any()


def test_three_iterations_compile_each_program_once(loop):
    run_iteration(loop)  # whatever an earlier test left uncompiled
    with counting_compiles() as names:
        prefill, decode = sampling.prefill._cache_size(), sampling.decode._cache_size()
        for _ in range(3):
            outcome = run_iteration(loop, samples=2)
            jax.block_until_ready(outcome.device)
    assert names == [], names
    assert (sampling.prefill._cache_size(), sampling.decode._cache_size()) == (prefill, decode)
    context = loop["context"]
    # The update, the scorer (reference and old policy alike) and the sampler's cast: one program each.
    assert context.step._cache_size() == 1
    assert context.score._cache_size() == 1
    assert context.sampler_cast._cache_size() == 1


def test_export_hf_writes_a_checkpoint_transformers_loads_with_the_trained_weights(data_dir, tmp_path, one_device):
    """`--config.export_hf=True`: the final model directory, converted by model_port in its own process, is
    an HF checkpoint whose weights are the trained ones (converted back, bit for bit)."""
    from transformers import Qwen2VLForConditionalGeneration

    from model_port.hf_to_flax import load_hf

    workdir = str(tmp_path / "run")
    result = run.train(tiny_config(data_dir, {"total_steps": 1, "export_hf": True}), workdir)
    exported = os.path.join(workdir, "hf")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(exported)
    assert sum(p.numel() for p in hf.parameters()) > 0
    assert_bitwise_equal(nnx.state(load_hf(exported, mesh=one_device), nnx.Param),
                         params_of(result.model_dir, one_device))
    # From random weights the export carries what the run trained with: the packaged tokenizer, its chat
    # template, and a generation config of the rollout's stop ids (no processor files: none was given).
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(
        os.listdir(exported))
    assert not {"preprocessor_config.json", "processor_config.json"} & set(os.listdir(exported))
    assert hf.generation_config.eos_token_id == [IM_END_ID, ENDOFTEXT_ID]
    assert hf.generation_config.pad_token_id == ENDOFTEXT_ID
    exported_tokenizer, packaged = load_tokenizer(exported), load_tokenizer()
    assert exported_tokenizer.chat_template == packaged.chat_template == CHAT_TEMPLATE
    text = "<|im_start|>user\n<think> Boeing 717 </think><|im_end|>"
    assert exported_tokenizer(text).input_ids == packaged(text).input_ids


# Sentinels no default has: each must reach the export and act there.
SENTINEL_GENERATION = {"bos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID,
                       "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "do_sample": False, "max_new_tokens": 3,
                       "repetition_penalty": 1.0123}
SENTINEL_MIN_PIXELS, SENTINEL_MAX_PIXELS = 3136, 12544
SENTINEL_SYSTEM = "You are a sentinel assistant."


def hub_checkpoint(directory: str, config) -> list[str]:
    """A Qwen2-VL checkpoint in the hub's layout (Qwen2-VL-2B-Instruct's files: config.json, safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
    preprocessor_config.json, chat_template.json) for the recipe's model, with the real tokenizer and sentinel
    generation, pixel and chat-template values; returns the asset names."""
    import shutil

    from model_port.flax_to_hf import save_hf
    from vrft_jax.models.qwen2_vl.tokenizer import packaged_tokenizer_file

    save_hf(Qwen2VL(config, rngs=nnx.Rngs(7)), directory)
    tokenizer = load_tokenizer()
    tokenizer.chat_template = None  # the hub keeps it in chat_template.json
    tokenizer.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(os.path.dirname(packaged_tokenizer_file()), name), directory)
    files = {"generation_config.json": SENTINEL_GENERATION,
             "chat_template.json": {"chat_template": CHAT_TEMPLATE.replace("You are a helpful assistant.",
                                                                           SENTINEL_SYSTEM)},
             "preprocessor_config.json": {
                 "min_pixels": SENTINEL_MIN_PIXELS, "max_pixels": SENTINEL_MAX_PIXELS, "patch_size": 14,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                 "processor_class": "Qwen2VLProcessor"}}
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    return sorted(set(os.listdir(directory)) & set(model_dir.HF_ASSETS))


def test_a_run_from_an_hf_checkpoint_exports_its_tokenizer_processor_template_and_generation_config(
        data_dir, tmp_path, one_device):
    """Issue 19 acceptance: `model/` and `hf/` carry the initial checkpoint's assets byte for byte; transformers
    loads the export's processor and model, and `generate` follows the shipped generation config (its sentinel
    max_new_tokens bounds the output). transformers' AutoProcessor needs torchvision for Qwen2-VL's video
    processor, which this environment lacks (reference/environment.md): that failure is asserted, and the
    processor is loaded as `vrft_jax.models.qwen2_vl.processor` does, image-only, from the same files."""
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen2VLForConditionalGeneration

    from hf_reference import image
    from vrft_jax.models.qwen2_vl.processor import ImageOnlyQwen2VLProcessor

    hub = str(tmp_path / "hub")
    config = tiny_config(data_dir, {"total_steps": 1, "export_hf": True})
    assets = hub_checkpoint(hub, recipe.build(config, check_paths=False).model)
    assert set(assets) == {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                           "merges.txt", "preprocessor_config.json", "chat_template.json"}
    workdir = str(tmp_path / "run")
    result = run.train(tiny_config(data_dir, {"total_steps": 1, "export_hf": True, "model.checkpoint": hub}),
                       workdir)
    exported = os.path.join(workdir, "hf")
    for where in (os.path.join(result.model_dir, model_dir.ASSETS_DIR), exported):
        assert set(os.listdir(where)) & set(model_dir.HF_ASSETS) == set(assets), where
        for name in assets:
            with open(os.path.join(hub, name), "rb") as a, open(os.path.join(where, name), "rb") as b:
                assert a.read() == b.read(), f"{where}/{name} differs from the checkpoint's"

    with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
        AutoProcessor.from_pretrained(exported)
    processor = ImageOnlyQwen2VLProcessor.from_pretrained(exported)
    assert processor.image_processor.size.longest_edge == SENTINEL_MAX_PIXELS
    assert processor.image_processor.size.shortest_edge == SENTINEL_MIN_PIXELS
    assert processor.tokenizer.eos_token == "<|im_end|>" and len(processor.tokenizer) == 151657
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{SENTINEL_SYSTEM}<|im_end|>")

    model = Qwen2VLForConditionalGeneration.from_pretrained(exported).eval()
    shipped = GenerationConfig.from_pretrained(exported)
    assert (shipped.max_new_tokens, shipped.repetition_penalty) == (3, 1.0123)
    assert model.generation_config.max_new_tokens == 3 and model.generation_config.repetition_penalty == 1.0123
    inputs = processor(text=[text], images=[image(56, 56, seed=0)], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs)  # no decoding argument: the shipped config decides
    # Greedy, deterministic: 3 new tokens (a stop id would end it sooner), where transformers' own default
    # (max_length 20) would allow none after this longer prompt.
    assert inputs["input_ids"].shape[1] > 20
    assert generated.shape[1] - inputs["input_ids"].shape[1] == 3


# ------------------------------------------------------------------------------------------ resume config


def test_a_resume_with_a_changed_learning_rate_is_refused_naming_the_key(data_dir, tmp_path, one_device):
    workdir = str(tmp_path / "run")
    run.train(tiny_config(data_dir, {"total_steps": 2, "eval_every": 0}), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        first = f.read()
    changed = tiny_config(data_dir, {"total_steps": 2, "eval_every": 0, "train.learning_rate": 2e-2})
    # The tiny recipe's sft.learning_rate follows train.learning_rate (tests/train_recipe.py): both are named.
    with pytest.raises(run.ConfigChangedError, match=r"2 key\(s\) a resume may not change: sft.learning_rate: "
                                                      r"5e-05 -> 0.02; train.learning_rate: 5e-05 -> 0.02"):
        run.train(changed, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == first  # the refused start wrote nothing
    # Cadence and evaluation may change: the run resumes (at its end, so only the held-out evaluation runs), and
    # each start keeps its config.
    result = run.train(tiny_config(data_dir, {"total_steps": 2, "eval_every": 1, "log_every": 2}), workdir)
    assert result.step == 2 and result.heldout_after is not None
    assert sorted(f for f in os.listdir(workdir) if f.startswith("config.")) == ["config.0.json", "config.2.json",
                                                                                 "config.json"]


def test_the_resume_check_allows_cadence_and_evaluation_and_total_steps_only_under_the_same_schedule():
    saved = {"total_steps": 10, "eval_every": 5, "eval": {"path": "a"}, "seed": 0,
             "train": {"learning_rate": 1e-6, "decay_steps": 10}, "grpo": {"beta": 0.04}}

    def changed(**edits):
        config = json.loads(json.dumps(saved))
        for key, value in edits.items():
            node = config
            *parents, leaf = key.split("__")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return config

    run.check_resume_config(saved, changed(eval_every=1, eval__path="b"))
    run.check_resume_config(saved, changed(total_steps=20))  # decay_steps set on its own: the schedule is the same
    with pytest.raises(run.ConfigChangedError, match=r"total_steps \(train.decay_steps follows it"):
        run.check_resume_config(saved, changed(total_steps=20, train__decay_steps=20))
    with pytest.raises(run.ConfigChangedError, match=r"2 key\(s\).*grpo.beta: 0.04 -> 0.0; seed: 0 -> 1"):
        run.check_resume_config(saved, changed(grpo__beta=0.0, seed=1))
    with pytest.raises(run.ConfigChangedError, match=r"train.warmup_steps: '<absent>' -> 3"):
        run.check_resume_config(saved, changed(train__warmup_steps=3))
