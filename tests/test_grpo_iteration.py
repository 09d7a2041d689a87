"""One whole GRPO iteration through every component on the 8-device mesh, as a trainer wires them:
data pipeline -> rollout -> detokenize -> rewards -> advantages -> reference scoring -> update.

The pieces are each proven elsewhere; this checks that they fit: shapes and layouts agree, the
sampler's logprobs are the trainer's, and the first update of a fresh policy is sane.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrft_jax import grpo, sampling, sharding
from vrft_jax.data import DataConfig, InMemorySource, make_iterator
from vrft_jax.data.synthetic import detection_records
from vrft_jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, TextConfig, VisionConfig
from vrft_jax.models.qwen2_vl.tokenizer import ENDOFTEXT_ID, EOS_TOKEN_IDS, load_tokenizer
from vrft_jax.optimizer import OptimizerConfig
from vrft_jax.placement import shard_batch
from vrft_jax.rewards import combine
from vrft_jax.scoring import make_score_fn, score_completions
from vrft_jax.train_step import TrainBatch, TrainConfig, init_state, make_train_step, reference_weights

pytestmark = pytest.mark.parity

PROMPTS, GROUP, NEW_TOKENS = 4, 2, 12


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer()
    config = Qwen2VLConfig(  # tiny, with the real vocabulary so the real tokenizer decodes its samples
        text=TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, out_dim=64),
        tie_word_embeddings=True)
    model = Qwen2VL(config, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    data = DataConfig(batch_size=PROMPTS, max_prompt_len=256, min_pixels=56 * 56, max_pixels=112 * 112,
                      num_workers=0, seed=3)
    batches = make_iterator(data, config, mesh=mesh, tokenizer=tokenizer,
                            source=InMemorySource(list(detection_records(6, seed=1))))
    return tokenizer, model, mesh, batches


def test_one_grpo_iteration_end_to_end(setup):
    tokenizer, model, mesh, batches = setup
    batch = next(batches)
    prompts = batch.model_inputs
    assert prompts.input_ids.shape == (PROMPTS, 256) and prompts.patches.shape[:2] == (PROMPTS, 64)
    assert prompts.input_ids.sharding.spec[0] is not None  # the prompts arrive split over the mesh

    # Rollout: the sampler's own weight layout, G samples of each prompt.
    sampler_config = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=GROUP, top_k=50,
                                             eos_token_ids=EOS_TOKEN_IDS, pad_token_id=ENDOFTEXT_ID)
    out = sampling.rollout(sampling.reshard(model, mesh), prompts, jax.random.key(0), sampler_config, mesh=mesh)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens.shape == (PROMPTS * GROUP, NEW_TOKENS)

    # Rewards on the host: Visual-RFT's detection sum against each prompt's solution, repeated G times.
    texts = tokenizer.batch_decode(np.where(mask, tokens, ENDOFTEXT_ID), skip_special_tokens=True)
    solutions = [s for s in batch.solution for _ in range(GROUP)]
    rewards = combine("detection", mode="strict")(texts, solutions).total
    assert rewards.shape == (PROMPTS * GROUP,) and np.isfinite(rewards).all()
    # A random policy scores 0 on detection; a small bonus for likely samples makes the group's
    # rewards differ, so the advantages (and the update) are not all zero.
    rewards = rewards + 0.01 * np.asarray(out.logprobs).sum(axis=1)
    advantages = grpo.advantages(jnp.asarray(rewards), GROUP, grpo.GRPOConfig.visual_rft())
    assert np.abs(np.asarray(advantages)).max() > 0

    # The trainer's recomputation of the sampled tokens' logprobs is what the sampler reported.
    train_config = TrainConfig()
    graphdef, state = init_state(model, train_config, mesh=mesh)
    train_batch = shard_batch(TrainBatch(prompts, out.tokens, out.mask.astype(jnp.int32), advantages), mesh)
    score = make_score_fn(graphdef, state.params, train_config.scoring, mesh=mesh)
    reference = score(state.params, train_batch.scored())
    # Logprobs of one model from two float32 programs (decode loop, teacher-forced scorer): a few
    # ulps of the logits' size, which stays below 16 for this tiny random model (ulp 1.9e-6).
    assert np.abs(np.asarray(out.logprobs)[mask]).max() < 16
    np.testing.assert_allclose(np.asarray(reference)[mask], np.asarray(out.logprobs)[mask], atol=1e-5)
    direct = score_completions(model, jax.device_get(prompts), tokens, mask.astype(np.int32)).logprobs
    np.testing.assert_allclose(np.asarray(direct)[mask], np.asarray(reference)[mask], atol=1e-5)

    # The update: against the initial policy as reference the KL is 0, so the paper loss of the first
    # step is -mean(A) (each sequence's token mean of -A x ratio 1), 0 up to float rounding; the
    # parameters move by Adam's first step: learning rate x sign of the gradient.
    step = make_train_step(graphdef, state, train_config, mesh=mesh)
    before = jax.device_get(state.params)
    state, metrics = step(state, train_batch.replace(ref_logprobs=reference))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert all(np.isfinite(v) for v in metrics.values())
    # k3 of two float32 recomputations d <= 1e-5 apart is ~d^2 / 2 <= 5e-11: 1e-6 is generous.
    assert abs(metrics["kl"]) < 1e-6
    # The loss is a float32 mean of 32 advantages |A| < 3, each times a ratio of exactly 1: summation
    # rounding is a random walk of ~sqrt(32) x 3 x 6e-8 = 1e-6 (measured 1.5e-8 on every instruction set).
    assert metrics["loss"] == pytest.approx(-float(np.mean(np.asarray(advantages, np.float64))), abs=1e-6)
    assert metrics["update_skipped"] == 0 and int(state.step) == 1
    after = jax.device_get(state.params)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # p - lr x g / (|g| + eps) is rounded to float32 (the difference read back is exact, Sterbenz): the
    # largest move is lr up to half a float32 spacing of the largest parameter.
    largest = max(float(np.abs(b).max()) for b in jax.tree.leaves(before))
    assert moved == pytest.approx(train_config.optimizer.learning_rate, abs=float(np.spacing(np.float32(largest))) / 2)


def test_a_frozen_vision_tower_runs_once_per_iteration(setup):
    """With freeze_vision the rollout's image features feed the reference, the old policy and the update,
    which then run no vision tower: the same logprobs and update, fewer FLOPs."""
    tokenizer, model, mesh, batches = setup
    prompts = next(batches).model_inputs
    sampler_config = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=GROUP, top_k=50,
                                             eos_token_ids=EOS_TOKEN_IDS, pad_token_id=ENDOFTEXT_ID)
    out = sampling.rollout(sampling.reshard(model, mesh), prompts, jax.random.key(1), sampler_config,
                           keep_image_features=True, mesh=mesh)
    features = np.asarray(out.image_features)
    # The prefill program's features against the tower alone: float32 programs of the same ops, a few ulps.
    direct = np.asarray(jax.jit(lambda m, x: m.image_features(x))(model, jax.device_get(prompts)))
    np.testing.assert_allclose(features, direct, rtol=0, atol=1e-6 * np.abs(direct).max())

    # Adam with eps = 1 moves each parameter by ~lr x g, so comparing parameters compares gradients.
    train_config = TrainConfig(freeze_vision=True, optimizer=OptimizerConfig(adam_eps=1.0, learning_rate=0.1))
    advantages = jnp.asarray(np.random.default_rng(0).normal(size=PROMPTS * GROUP).astype(np.float32))
    plain = shard_batch(TrainBatch(prompts, out.tokens, out.mask.astype(jnp.int32), advantages), mesh)
    reused = shard_batch(plain.replace(image_features=out.image_features), mesh)
    graphdef, state = init_state(model, train_config, mesh=mesh)
    score = make_score_fn(graphdef, state.params, train_config.scoring, mesh=mesh)
    mask = np.asarray(out.mask)
    # Logits below 16 (ulp 1.9e-6): features a few ulps apart move logprobs by a few ulps of the logits.
    ref_plain, ref_reused = score(state.params, plain.scored()), score(state.params, reused.scored())
    np.testing.assert_allclose(np.asarray(ref_reused)[mask], np.asarray(ref_plain)[mask], atol=1e-5)
    plain, reused = plain.replace(ref_logprobs=ref_plain), reused.replace(ref_logprobs=ref_reused)

    # The update no longer runs the tower's forward (a frozen tower has no backward either way). On one
    # device: a mesh's FLOP counts are per device, split by the batch's layout.
    one_graphdef, one_state = init_state(model, train_config)
    one_step = make_train_step(one_graphdef, one_state, train_config)
    updates = {name: one_step.lower(one_state, jax.device_get(b)).compile()
               for name, b in (("plain", plain), ("reused", reused))}
    flops = {name: update.cost_analysis()["flops"] for name, update in updates.items()}
    tower = jax.jit(lambda m, x: m.image_features(x)).lower(model, jax.device_get(prompts)).compile()
    print(f"update FLOPs {flops}, the vision tower's forward {tower.cost_analysis()['flops']}")
    assert flops["plain"] - flops["reused"] >= 0.9 * tower.cost_analysis()["flops"] > 0, flops

    after = {}
    for name, b in (("plain", plain), ("reused", reused)):
        _, fresh = init_state(model, train_config)
        after[name] = updates[name](fresh, jax.device_get(b), np.True_)
    assert float(after["reused"][1]["loss"]) == pytest.approx(float(after["plain"][1]["loss"]), rel=1e-5, abs=1e-7)
    # lr x (a gradient difference of a few ulps of O(1) gradients): far below 1e-6.
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(jax.device_get(after["plain"][0].params)),
                                jax.tree.leaves(jax.device_get(after["reused"][0].params))))
    assert moved <= 1e-6

    # Features carry no gradient: with a vision tower that trains they are refused.
    trains_vision = TrainConfig()
    graphdef, state = init_state(model, trains_vision, mesh=mesh)
    with pytest.raises(ValueError, match="freeze_vision"):
        make_train_step(graphdef, state, trains_vision, mesh=mesh)(state, reused)


def test_the_reference_in_the_compute_dtype_scores_as_a_float32_copy(setup):
    """`train.reference_dtype` (review-3 M1): by default the reference keeps its matrices in the compute dtype,
    which every matmul casts its weights to anyway. With bfloat16 compute its logprobs are a float32 copy's bit
    for bit, at about half the memory; a bf16 copy under float32 compute differs by the weights' rounding."""
    tokenizer, model, mesh, batches = setup
    prompts = next(batches).model_inputs
    sampler_config = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=GROUP, top_k=50,
                                             eos_token_ids=EOS_TOKEN_IDS, pad_token_id=ENDOFTEXT_ID)
    out = sampling.rollout(sampling.reshard(model, mesh), prompts, jax.random.key(2), sampler_config, mesh=mesh)
    mask = np.asarray(out.mask)
    batch = shard_batch(TrainBatch(prompts, out.tokens, out.mask.astype(jnp.int32),
                                   jnp.zeros(PROMPTS * GROUP)), mesh).scored()

    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    gaps = {}
    for compute, stored in (("bfloat16", None), ("float32", "bfloat16")):
        config = TrainConfig(compute_dtype=compute, reference_dtype=stored)
        graphdef, state = init_state(model, config, mesh=mesh)
        full = reference_weights(state.params, config.replace(reference_dtype="float32"), mesh=mesh)
        small = reference_weights(state.params, config, mesh=mesh)
        matrices = [x for x in jax.tree.leaves(small) if x.ndim >= 2]
        vectors = [x for x in jax.tree.leaves(small) if x.ndim < 2]
        assert {x.dtype for x in matrices} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in vectors} == {jnp.dtype(jnp.float32)}  # norm scales and biases as stored
        assert nbytes(small) < 0.51 * nbytes(full)
        assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(small), jax.tree.leaves(full)))
        score = make_score_fn(graphdef, state.params, config.scoring, mesh=mesh)
        expected, got = np.asarray(score(full, batch))[mask], np.asarray(score(small, batch))[mask]
        gaps[compute] = float(np.abs(got - expected).max())
    print(f"max |logprob(bf16 reference) - logprob(float32 reference)| per compute dtype: {gaps}")
    assert gaps["bfloat16"] == 0.0  # the same bf16 matmul inputs: the same program values
    assert gaps["float32"] > 0.0  # float32 compute reads the rounded weights: the storage is in effect
