"""The jitted GRPO update: exact gradient accumulation, the same numbers on a sharded mesh, one
compilation per run, skipped non-finite updates and batches without a real token, right-padded prompts
refused, a frozen vision tower, fp32 master weights with bf16 compute, and no [B*G, T, V] float32
logits anywhere in the compiled program.

The update under test is TRL's dapo with two iterations per rollout: old-policy logprobs shifted so
ratios get clipped on both sides, a reference model and beta 0.04. Adam's first step is
sign(g) * lr whatever the gradient's size, which would hide gradient differences (and turn a
1e-9 gradient's rounding into a full-size flip); with eps = 1 the step is ~lr * g, so comparing
parameters after one update compares the gradients themselves.
"""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo.conftest import train_batch
from vrft_jax import grpo, sharding
from vrft_jax import train_step as ts
from vrft_jax.models.qwen2_vl import InputError, Qwen2VL
from vrft_jax.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from vrft_jax.placement import shard_batch
from vrft_jax.scoring import ScoringConfig, make_score_fn, score_completions

pytestmark = pytest.mark.parity

G, L = 2, 8
GROUPS_OF_FOUR = 4  # 16 prompts, 32 completions: 2 prompts and 4 completions per device on 8 devices
CONFIG = ts.TrainConfig(grpo=grpo.GRPOConfig.trl("dapo", beta=0.04, epsilon_high=0.28), num_iterations=2,
                        optimizer=OptimizerConfig(learning_rate=0.1, adam_eps=1.0),
                        scoring=ScoringConfig(temperature=0.9, chunk_size=3))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def flat(state: nnx.State) -> dict:
    return {path: np.asarray(v.get_raw_value()) for path, v in nnx.to_flat_state(state)}


def max_difference(a, b) -> float:
    """Largest absolute difference between two trees of the same structure (parameters, optimizer state)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def with_logprobs(score, policy, reference, batch):
    """The batch with the reference's logprobs and the rollout policy's, shifted by up to +-0.4 nats."""
    old = np.asarray(score(nnx.state(policy), batch.scored()))
    old = old + np.random.default_rng(7).uniform(-0.4, 0.4, old.shape).astype(np.float32)
    return batch.replace(ref_logprobs=score(nnx.state(reference), batch.scored()), old_logprobs=old)


@pytest.fixture(scope="module")
def score(policy):
    graphdef, params = nnx.split(policy)
    return make_score_fn(graphdef, params, CONFIG.scoring)


@pytest.fixture(scope="module")
def batch(policy, reference, score):
    return with_logprobs(score, policy, reference, train_batch(policy.config, G, L, groups_of_four=GROUPS_OF_FOUR))


def run(policy, batch, config, mesh=None):
    graphdef, state = ts.init_state(policy, config, mesh=mesh)
    step = ts.make_train_step(graphdef, state, config, mesh=mesh)
    before = host(state)
    placed = batch if mesh is None else shard_batch(batch, mesh)
    after, metrics = step(state, placed)
    return types.SimpleNamespace(graphdef=graphdef, step=step, before=before, state=after, after=host(after),
                                 metrics={k: float(v) for k, v in metrics.items()})


@pytest.fixture(scope="module")
def single(policy, batch):
    return run(policy, batch, CONFIG)


def test_one_update_moves_the_parameters_and_reports_its_metrics(single):
    m = single.metrics
    assert m["update_skipped"] == 0 and m["empty_batch"] == 0 and single.after.step == 1
    assert max_difference(single.after.params, single.before.params) > 1e-3
    assert m["tokens"] > 0 and m["sequences"] == 32 and m["kl"] > 0 and m["entropy"] > 0
    assert 0 < m["clip_low"] < 1 and 0 < m["clip_high"] < 1
    assert m["clip_region"] == pytest.approx(m["clip_low"] + m["clip_high"])
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["learning_rate"] == pytest.approx(0.1)


def test_four_micro_batches_give_the_update_of_one(policy, batch, single):
    four = run(policy, batch, CONFIG.replace(micro_batches=4))
    for name in ("loss", "kl", "entropy", "clip_low", "clip_high", "grad_norm", "tokens", "sequences"):
        # The same float32 per-token terms added as 4 partial sums instead of 1: a few roundoffs (6e-8)
        # relative; abs for the loss, a small sum of O(1) terms of both signs.
        assert four.metrics[name] == pytest.approx(single.metrics[name], rel=1e-6, abs=1e-7), name
    # With eps = 1 a parameter moves by ~lr x g (lr 0.1, |g| < 1): the gradients' reassociation error
    # (~1e-7 of their size) moves parameters by ~1e-8; 1e-6 is also a few ulps of the O(1) parameters.
    assert max_difference(four.after.params, single.after.params) <= 1e-6
    assert max_difference(four.after.opt_state, single.after.opt_state) <= 1e-6


@pytest.mark.parametrize("shape,micro_batches", [((1, 2, 4), 2), ((1, 8, 1), 1)], ids=["fsdp2xtensor4", "fsdp8"])
def test_the_sharded_update_equals_the_single_device_update(policy, reference, score, batch, single, shape,
                                                            micro_batches):
    mesh = sharding.make_mesh(*shape)
    sharded = run(policy, batch, CONFIG.replace(micro_batches=micro_batches), mesh=mesh)
    # The forward's sharded-vs-one-device error (1e-6 relative, test_sharding) compounds through the
    # backward pass, the micro-batches and the scorer's logprobs (|z| < 16: 1e-5 is ~5 ulp(16)), and the
    # update moves parameters by lr x g (lr 0.1): 1e-5 relative on the metrics, absolute on parameters.
    for name in ("loss", "kl", "entropy", "clip_low", "clip_high", "grad_norm", "tokens"):
        assert sharded.metrics[name] == pytest.approx(single.metrics[name], rel=1e-5), name
    assert max_difference(sharded.after.params, single.after.params) <= 1e-5
    # Parameters and Adam moments leave the step in the rules' layout.
    for tree in (sharded.state.params, sharded.state.opt_state[1][0].mu):
        for path, variable in nnx.to_flat_state(tree):
            array = variable.get_raw_value()
            expected = sharding.logical_to_spec(variable.get_metadata()["out_sharding"], array.shape, mesh)
            assert array.sharding.spec == expected, path
    q = nnx.to_flat_state(sharded.state.params)
    assert any(v.get_raw_value().addressable_shards[0].data.size < v.get_raw_value().size for _, v in q)
    # The scoring program shards the same way and gives the same logprobs.
    sharded_score = make_score_fn(sharded.graphdef, sharded.state.params, CONFIG.scoring, mesh=mesh)
    single_score = make_score_fn(single.graphdef, single.state.params, CONFIG.scoring)
    np.testing.assert_allclose(np.asarray(sharded_score(sharded.state.params, shard_batch(batch.scored(), mesh))),
                               np.asarray(single_score(single.state.params, batch.scored())), atol=1e-5)
    # The next rollout's batch runs the same compiled program.
    other = with_logprobs(score, policy, reference, train_batch(policy.config, G, L, groups_of_four=GROUPS_OF_FOUR,
                                                                seed=1))
    state, metrics = sharded.step(sharded.state, shard_batch(other, mesh))
    assert int(state.step) == 2 and float(metrics["update_skipped"]) == 0
    assert sharded.step._cache_size() == 1


def test_the_step_compiles_once_over_a_run_of_changing_batches(policy, reference, score, single):
    """As in a run: each step new prompts (other image sizes), new completions and new logprobs, and the
    entropy measured at logged steps only."""
    _, state = ts.init_state(policy, CONFIG)
    for seed, logged in ((1, True), (2, False), (3, True)):
        batch = with_logprobs(score, policy, reference,
                              train_batch(policy.config, G, L, groups_of_four=GROUPS_OF_FOUR, seed=seed))
        state, metrics = single.step(state, batch, logged)
        assert float(metrics["update_skipped"]) == 0
        assert np.isfinite(float(metrics["entropy"])) == logged
    assert int(state.step) == 3
    assert single.step._cache_size() == 1


def test_an_unlogged_step_skips_the_entropy_and_makes_the_same_update(policy, batch, single):
    _, state = ts.init_state(policy, CONFIG)
    state, metrics = single.step(state, batch, False)
    assert np.isnan(float(metrics["entropy"]))  # not measured: NaN, never a plausible 0
    for name, value in metrics.items():
        if name != "entropy":
            assert float(value) == single.metrics[name], name
    # The entropy is a metric, not part of the loss: the update is the logged step's, bit for bit.
    assert max_difference(host(state), single.after) == 0


def sampled(batch):
    """The batch with the sampler's logprobs: the old policy's moved by up to +-1.5 nats (some weights reach the
    cap of 3), NaN past each completion's mask as the rollout leaves them."""
    noise = np.random.default_rng(9).uniform(-1.5, 1.5, batch.old_logprobs.shape).astype(np.float32)
    logprobs = np.where(np.asarray(batch.completion_mask) > 0, np.asarray(batch.old_logprobs) - noise, np.nan)
    return batch.replace(sampled_logprobs=logprobs.astype(np.float32))


def test_entropy_bonus_and_importance_weights_accumulate_exactly(policy, batch):
    """With an entropy bonus and truncated importance sampling, four micro-batches make the update of one; the
    bonus's gradient is -coef x the gradient of the batch's token-mean entropy, whatever the loss's normaliser."""
    # TRL's grpo loss: its normaliser (sequences) is not the bonus's (tokens), which the bonus must not take.
    config = CONFIG.replace(grpo=dataclasses.replace(CONFIG.grpo, loss="grpo", entropy_coef=0.05,
                                                     importance_sampling="token_truncate"))
    batch = sampled(batch)
    one, four = run(policy, batch, config), run(policy, batch, config.replace(micro_batches=4))
    for name in ("loss", "entropy", "grad_norm", "mismatch/kl", "mismatch/gap_mean", "is_ratio/mean"):
        # As test_four_micro_batches_give_the_update_of_one: 4 partial float32 sums instead of 1.
        assert four.metrics[name] == pytest.approx(one.metrics[name], rel=1e-6, abs=1e-7), name
    for name in ("mismatch/gap_max", "is_ratio/min", "is_ratio/max"):  # extrema: exact under any split
        assert four.metrics[name] == one.metrics[name], name
    assert one.metrics["is_ratio/max"] == 3.0 and one.metrics["is_ratio/min"] < 1
    assert max_difference(four.after.params, one.after.params) <= 1e-6  # as the test above

    graphdef, state = ts.init_state(policy, config)
    trainable, frozen = ts.split_params(state.params, config)
    plain = config.replace(grpo=dataclasses.replace(config.grpo, entropy_coef=0.0))
    _, with_bonus, _, _ = ts.loss_and_grads(graphdef, trainable, frozen, batch, config)
    _, without, _, _ = ts.loss_and_grads(graphdef, trainable, frozen, batch, plain)
    mask = np.asarray(batch.completion_mask, np.float32)

    def mean_entropy(trainable):
        scores = score_completions(nnx.merge(graphdef, trainable, frozen), batch.inputs, batch.completions,
                                   batch.completion_mask, temperature=config.scoring.temperature,
                                   chunk_size=config.scoring.chunk_size, with_entropy=True, entropy_grad=True)
        return jnp.sum(scores.entropy * mask) / mask.sum()

    entropy_grads = jax.grad(mean_entropy)(trainable)
    differences = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), with_bonus, without)
    expected = jax.tree.map(lambda g: -0.05 * np.asarray(g, np.float64), entropy_grads)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(without))
    # Three float32 gradients of size `scale`, each element a sum over the batch's ~150 tokens and the vocabulary's
    # blocks: the bonus's terms join the policy's inside one backward pass on one side and stand alone on the
    # other, so the sums round in other groupings, a random walk of ~sqrt(150) ulps of the largest term: 16
    # ulps of `scale` (measured 5). The bonus's own effect is 1000 ulps or more, and a wrong normaliser (the
    # loss's count instead of the tokens) or a missing term would be off by that much.
    eps = np.finfo(np.float32).eps
    assert max_difference(differences, expected) <= 16 * eps * scale
    assert max_difference(expected, jax.tree.map(np.zeros_like, expected)) > 1e3 * eps * scale


def test_a_non_finite_loss_skips_the_update_and_is_counted(policy, batch, single):
    _, state = ts.init_state(policy, CONFIG)
    before = host(state)
    advantages = np.array(batch.advantages)
    advantages[5] = np.nan
    poisoned = batch.replace(advantages=advantages)
    state, metrics = single.step(state, poisoned)
    assert float(metrics["update_skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert max_difference(state.params, before.params) == 0
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in
               zip(jax.tree.leaves(host(state.opt_state)), jax.tree.leaves(before.opt_state)))
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (0, 1, 1)
    ts.check_nonfinite(state, CONFIG.replace(max_consecutive_nonfinite=2))  # one in a row: tolerated
    state, _ = single.step(state, poisoned)
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (0, 2, 2)
    with pytest.raises(ts.NonFiniteUpdatesError, match="2 updates in a row were skipped .* 0 applied"):
        ts.check_nonfinite(state, CONFIG.replace(max_consecutive_nonfinite=2))
    state, metrics = single.step(state, batch)
    assert float(metrics["update_skipped"]) == 0
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (1, 2, 0)
    assert max_difference(state.params, single.after.params) == 0  # as if the poisoned batches never came


def test_a_batch_without_a_real_token_leaves_the_state_bit_identical(policy, batch, single):
    """All rows padding (loss_count == 0): the gradient is 0, but Adam's momentum from the step before
    would still move the parameters and its count would advance. Nothing moves, and it is reported,
    not counted as a non-finite update."""
    _, state = ts.init_state(policy, CONFIG)
    state, _ = single.step(state, batch)
    empty = batch.replace(completion_mask=np.zeros_like(batch.completion_mask))

    def unchanged_by(batch, state):
        before = host(state)
        state, metrics = single.step(state, batch)
        after = host(state)
        for name in ("params", "opt_state"):
            a, b = getattr(after, name), getattr(before, name)
            assert jax.tree.structure(a) == jax.tree.structure(b)
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), name
        return state, {k: float(v) for k, v in metrics.items()}

    # The momentum is there: without the guard, the zero gradient would still move the parameters.
    assert max(np.abs(m).max() for m in flat(state.opt_state[1][0].mu).values()) > 0
    state, metrics = unchanged_by(empty, state)
    assert metrics["empty_batch"] == 1 and metrics["update_skipped"] == 1
    assert metrics["tokens"] == 0 and metrics["sequences"] == 0 and metrics["loss"] == 0
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (1, 0, 0)
    # Between two non-finite updates an empty batch neither breaks nor extends the streak.
    advantages = np.array(batch.advantages)
    advantages[5] = np.nan
    state, _ = unchanged_by(batch.replace(advantages=advantages), state)
    state, metrics = unchanged_by(empty, state)
    assert metrics["empty_batch"] == 1 and metrics["nonfinite_streak"] == 1
    assert (int(state.step), int(state.nonfinite_total), int(state.nonfinite_streak)) == (1, 1, 1)
    state, metrics = single.step(state, batch)
    assert metrics["empty_batch"] == 0 and int(state.step) == 2 and int(state.nonfinite_streak) == 0


def test_prompts_that_end_in_padding_are_refused_by_row_before_dispatch(policy, batch, single, score):
    """The update and the scoring programs read each prompt's last token from its last slot (review M8):
    every entry that scores a batch checks it on the host first (before the step donates the state)."""
    mask = np.array(batch.inputs.attention_mask)
    mask[[3, 9], -1] = 0
    right = batch.replace(inputs=batch.inputs.replace(attention_mask=mask))
    for inputs in (right.inputs, jax.device_put(right.inputs)):  # called eagerly: NumPy or device mask
        with pytest.raises(InputError, match=r"scoring needs left-padded prompts: rows \[3, 9\] end in padding"):
            score_completions(policy, inputs, right.completions, right.completion_mask)
    _, state = ts.init_state(policy, CONFIG)
    with pytest.raises(InputError, match=r"training needs left-padded prompts: rows \[3, 9\] end in padding"):
        single.step(state, right)
    assert not state.step.is_deleted()  # not donated: the step never ran
    with pytest.raises(InputError, match=r"scoring needs left-padded prompts: rows \[3, 9\] end in padding"):
        score(nnx.state(policy), right.scored())
    mesh = sharding.make_mesh(1, 8, 1)
    params = nnx.state(policy)
    sharded_score = make_score_fn(single.graphdef, params, CONFIG.scoring, mesh=mesh)
    with pytest.raises(InputError, match=r"scoring needs left-padded prompts: rows \[3, 9\] end in padding"):
        sharded_score(params, shard_batch(right.scored(), mesh))


@pytest.fixture(scope="module")
def frozen_bf16(policy, batch):
    config = CONFIG.replace(freeze_vision=True, compute_dtype=jnp.bfloat16, remat="block")
    return run(policy, batch, config)


def test_a_frozen_vision_tower_gets_no_update_and_no_optimizer_state(frozen_bf16):
    before, after = flat(frozen_bf16.before.params), flat(frozen_bf16.after.params)
    vision = [path for path in before if path[0] == "visual"]
    text = [path for path in before if path[0] == "text"]
    assert vision and all(np.array_equal(before[p], after[p]) for p in vision)
    assert all(not np.array_equal(before[p], after[p]) for p in text if "lm_head" in p or "layers" in p)
    moments = flat(frozen_bf16.state.opt_state[1][0].mu)
    assert moments and all(path[0] == "text" for path in moments)
    assert sum(x.size for x in moments.values()) == sum(before[p].size for p in text)


def test_bf16_compute_keeps_float32_master_weights_and_the_loss(frozen_bf16, single):
    assert all(x.dtype == np.float32 for x in flat(frozen_bf16.after.params).values())
    assert all(x.dtype == np.float32 for x in flat(frozen_bf16.after.opt_state[1][0].nu).values())
    # A sanity bound for bf16 compute (unit roundoff 2^-9 = 0.2%, a few dozen roundings per logprob), not
    # parity: the loss within 5% (abs for its O(0.1) size); KL, a small difference of logprobs, within 10%.
    assert frozen_bf16.metrics["loss"] == pytest.approx(single.metrics["loss"], rel=0.05, abs=0.01)
    assert frozen_bf16.metrics["kl"] == pytest.approx(single.metrics["kl"], rel=0.1)


def test_the_compiled_step_holds_no_float32_logits_of_the_whole_sequence(policy):
    """Qwen2-VL's real vocabulary (151,657) on the tiny model, 16 completions of 64 tokens after
    60-token prompts: the full forward's logits [B*G, T+L, V] would be 1.2 GB and the completion
    positions' alone [B*G, L, V] 621 MB. The program's largest vocabulary-sized buffers are one
    chunk's [B*G, chunk, V] and the [V, D] head and embedding (and their gradients)."""
    vocab = 151_657
    config = policy.config.replace(text=dataclasses.replace(policy.config.text, vocab_size=vocab))
    model = Qwen2VL(config, rngs=nnx.Rngs(0))
    length, chunk = 64, 4
    train = CONFIG.replace(scoring=CONFIG.scoring.replace(chunk_size=chunk))
    batch = train_batch(config, G, length, groups_of_four=2)
    rows, prompt_length = batch.completions.shape[0], batch.inputs.input_ids.shape[1]
    batch = batch.replace(ref_logprobs=np.zeros((rows, length), np.float32),
                          old_logprobs=np.zeros((rows, length), np.float32))
    graphdef, state = ts.init_state(model, train)
    compiled = ts.make_train_step(graphdef, state, train).lower(state, batch).compile()
    full_logits = rows * (prompt_length + length) * vocab * 4
    completion_logits = rows * length * vocab * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"temp {temp / 2**20:.1f} MiB; [B*G, T+L, V] f32 {full_logits / 2**20:.1f} MiB; "
          f"[B*G, L, V] f32 {completion_logits / 2**20:.1f} MiB")
    assert temp < completion_logits < full_logits
    shapes = [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", compiled.as_text())]
    with_vocab = [s for s in shapes if vocab in s]
    assert with_vocab  # the check below looks at the real head buffers
    assert max(int(np.prod(s)) for s in with_vocab) <= max(rows * chunk, config.text.hidden_size) * vocab
    assert (rows, prompt_length + length, vocab) not in shapes and (rows, length, vocab) not in shapes


def test_learning_rate_schedule_is_hf_linear_with_warmup():
    import torch
    from transformers import get_linear_schedule_with_warmup

    config = OptimizerConfig(learning_rate=3e-4, warmup_steps=5, decay_steps=15)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    hf = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=20)
    schedule = learning_rate_schedule(config)
    for step in range(22):
        assert float(schedule(step)) == pytest.approx(hf.get_last_lr()[0], rel=1e-6, abs=1e-12), step
        optimizer.step()
        hf.step()


def test_weight_decay_skips_biases_and_norm_weights(policy):
    config = OptimizerConfig(weight_decay=0.1, max_grad_norm=None)
    _, params = nnx.split(policy)
    tx = make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
    decayed = {path for path, value in flat(updates).items() if np.abs(value).max() > 0}
    names = {path: "/".join(map(str, path)) for path in flat(updates)}
    assert decayed == {p for p, n in names.items() if not n.endswith("bias") and "norm" not in n and "ln_q" not in n}
    assert ("text", "layers", "attn", "q_kernel") in decayed and ("visual", "merger", "ln_q", "weight") not in decayed


def test_batches_and_configs_that_cannot_work_are_refused_by_name(policy, batch, single):
    with pytest.raises(ValueError, match="num_iterations=2: the paper loss makes one update per rollout"):
        ts.TrainConfig(num_iterations=2)
    with pytest.raises(ValueError, match="invalid TrainConfig: micro_batches=0 must be >= 1"):
        ts.TrainConfig(micro_batches=0)
    with pytest.raises(ValueError, match="remat='blocks' is not one of"):
        ts.TrainConfig(remat="blocks")
    for bad in (float("nan"), float("inf"), -1e-6):  # a NaN rate keeps loss and gradient finite: no guard sees it
        with pytest.raises(ValueError, match=f"invalid OptimizerConfig: learning_rate={bad} must be finite and >= 0"):
            OptimizerConfig(learning_rate=bad)
    _, state = ts.init_state(policy, CONFIG)
    with pytest.raises(ValueError, match="beta=0.04 needs TrainBatch.ref_logprobs"):
        single.step(state, batch.replace(ref_logprobs=None))
    with pytest.raises(ValueError, match="num_iterations=2 needs TrainBatch.old_logprobs"):
        single.step(state, batch.replace(old_logprobs=None))
    three = CONFIG.replace(micro_batches=3)
    step = ts.make_train_step(single.graphdef, state, three)
    with pytest.raises(ValueError, match="micro_batches=3 does not divide the batch's 16 prompts"):
        step(state, batch)
