"""The GRPO math of `vrft_jax.grpo` against independent NumPy (float64) transcriptions of its sources:
visual-rft.md §5.4 for the paper loss, TRL 1.16's `_compute_loss` for the others."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrft_jax import grpo

G = 4
BETA = 0.04


def case(seed=0, prompts=3, length=7, empty_row=None, spread=0.3):
    """Random logprobs of a batch: ragged masks (through the first EOS), rewards with ties."""
    rng = np.random.default_rng(seed)
    rows = prompts * G
    logprobs = rng.uniform(-4, -0.05, (rows, length)).astype(np.float32)
    ref = (logprobs + rng.normal(0, spread, logprobs.shape)).astype(np.float32)
    old = (logprobs + rng.uniform(-0.4, 0.4, logprobs.shape)).astype(np.float32)
    lengths = rng.integers(1, length + 1, rows)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    if empty_row is not None:
        mask[empty_row] = 0
    rewards = rng.choice([0.0, 0.5, 1.0, 2.0], rows).astype(np.float32)
    return logprobs, old, ref, rewards, mask


def numpy_advantages(rewards, scale):
    grouped = rewards.astype(np.float64).reshape(-1, G)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.astype(np.float64).std(ddof=1) + 1e-4)
    return centred.reshape(-1)


def numpy_visual_rft_loss(logprobs, ref, advantages, mask, beta=BETA):
    """visual-rft.md §5.4 step 9 / §10.2, line by line."""
    lp, ref, m = (x.astype(np.float64) for x in (logprobs, ref, mask))
    per_token_kl = np.exp(ref - lp) - (ref - lp) - 1
    per_token_loss = -(1.0 * advantages[:, None] - beta * per_token_kl)  # exp(lp - lp.detach()) == 1
    return np.mean((per_token_loss * m).sum(axis=1) / m.sum(axis=1))


def numpy_trl_loss(loss_type, logprobs, old, ref, advantages, mask, epsilon=0.2, epsilon_high=0.28, beta=BETA,
                   bias_correction=True, max_completion_length=None):
    """TRL 1.16 `_compute_loss` (token-level importance sampling), transcribed."""
    lp, old, ref, m = (x.astype(np.float64) for x in (logprobs, old, ref, mask))
    a = advantages.astype(np.float64)[:, None]
    coef_1 = np.exp(lp - old)
    per_token_kl = np.exp(ref - lp) - (ref - lp) - 1
    if bias_correction:
        per_token_kl = per_token_kl * coef_1
    coef_2 = np.clip(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -np.minimum(coef_1 * a, coef_2 * a) + beta * per_token_kl
    if loss_type == "grpo":
        return np.mean((per_token_loss * m).sum(-1) / np.maximum(m.sum(-1), 1.0))
    if loss_type in ("bnpo", "dapo"):  # one process, one micro-batch: both divide by the batch's tokens
        return (per_token_loss * m).sum() / max(m.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.shape[0] * (max_completion_length or m.shape[1]))
    raise ValueError(loss_type)


def loss_of(config, logprobs, old, ref, advantages, mask):
    return grpo.loss_terms(jnp.asarray(logprobs), old, ref, jnp.asarray(advantages, jnp.float32), mask, config)


def test_paper_loss_is_the_visual_rft_formula():
    logprobs, _, ref, rewards, mask = case(seed=1)
    config = grpo.GRPOConfig.visual_rft()
    advantages = grpo.advantages(rewards, G, config)
    # float32 mean and std of 8 rewards against float64: a few roundoffs (6e-8) relative; atol for A ~ 0.
    np.testing.assert_allclose(np.asarray(advantages), numpy_advantages(rewards, "group"), rtol=1e-6, atol=1e-6)
    terms = loss_of(config, logprobs, None, ref, advantages, mask)
    expected = numpy_visual_rft_loss(logprobs, ref, numpy_advantages(rewards, "group"), mask)
    # The advantage terms cancel to ~0 (the sanity check of §10.6: loss ~ beta KL), so compare to the
    # scale of the terms, not of their small sum.
    assert float(terms.loss) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert float(terms.loss_count) == mask.shape[0]


def test_paper_gradient_is_advantage_times_grad_logprob_plus_the_kl_term():
    """d/dlp of -(exp(lp - sg(lp)) A - beta k3) is -A + beta (1 - exp(ref - lp)), weighted 1 / (S n_i)."""
    logprobs, _, ref, rewards, mask = case(seed=2)
    config = grpo.GRPOConfig.visual_rft()
    advantages = np.asarray(grpo.advantages(rewards, G, config))
    grad = jax.grad(lambda lp: loss_of(config, lp, None, ref, advantages, mask).loss)(jnp.asarray(logprobs))
    weight = mask / (mask.shape[0] * mask.sum(axis=1, keepdims=True))
    expected = weight * (-advantages[:, None] + BETA * (1 - np.exp(ref.astype(np.float64) - logprobs)))
    # float32 exp(ref - lp) with |ref - lp| <= ~3 and the 1/(S n_i) weights against float64: ~10 roundoffs.
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_clipped_losses_are_trl_formulas(loss_type, bias_correction):
    logprobs, old, ref, rewards, mask = case(seed=5)
    config = grpo.GRPOConfig.trl(loss_type, beta=BETA, epsilon_high=0.28, use_bias_correction_kl=bias_correction,
                                 max_completion_length=9)
    advantages = np.asarray(grpo.advantages(rewards, G, config))
    terms = loss_of(config, logprobs, old, ref, advantages, mask)
    expected = numpy_trl_loss(loss_type, logprobs, old, ref, advantages, mask, bias_correction=bias_correction,
                              max_completion_length=9)
    assert float(terms.loss) == pytest.approx(expected, rel=1e-6)  # the formula in float32 vs float64
    ratio = np.exp(logprobs.astype(np.float64) - old)
    low = (ratio < 0.8) & (advantages[:, None] < 0)
    high = (ratio > 1.28) & (advantages[:, None] > 0)
    metrics = terms.metrics()
    # Equal integer counts over the same token count: only the float32 division rounds (pytest's rel 1e-6).
    assert float(metrics["clip_low"]) == pytest.approx((low * mask).sum() / mask.sum())
    assert float(metrics["clip_high"]) == pytest.approx((high * mask).sum() / mask.sum())
    assert (low * mask).sum() > 0 and (high * mask).sum() > 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantage_estimators(scale):
    _, _, _, rewards, _ = case(seed=4, prompts=5)
    ours = grpo.advantages(rewards, G, grpo.GRPOConfig(advantage=scale))
    # The batch std sums 40 rewards in float32: a few more roundoffs than the group's 8.
    np.testing.assert_allclose(np.asarray(ours), numpy_advantages(rewards, scale), rtol=1e-5, atol=1e-6)


def test_nan_rewards_are_left_out_of_the_statistics_and_get_zero_advantage():
    rewards = np.array([1.0, np.nan, 3.0, 2.0, np.nan, np.nan, np.nan, np.nan], np.float32)
    ours = np.asarray(grpo.advantages(rewards, G, grpo.GRPOConfig()))
    finite = np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(ours[[0, 2, 3]], (finite - 2.0) / (finite.std(ddof=1) + 1e-4), rtol=1e-6)
    assert ours[1] == 0 and (ours[4:] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_infinite_and_nan_rewards_get_zero_advantage_and_are_left_out_of_the_statistics(scale):
    """+inf, -inf and NaN each in its own group: that row's advantage is exactly 0 (not +-3.4e38), and
    every other row's is what it would be without that row: the group mean (and the group's or the
    batch's unbiased std) taken over the finite rewards only."""
    rewards = np.array([1.0, np.inf, 3.0, 2.0, -np.inf, 0.0, 1.0, 0.5, 2.0, 2.0, np.nan, 5.0], np.float32)
    ours = np.asarray(grpo.advantages(rewards, G, grpo.GRPOConfig(advantage=scale)))
    bad = ~np.isfinite(rewards)
    assert (ours[bad] == 0).all() and np.isfinite(ours).all()
    grouped = np.where(np.isfinite(rewards), rewards, np.nan).astype(np.float64).reshape(-1, G)
    expected = grouped - np.nanmean(grouped, axis=1, keepdims=True)
    if scale == "group":
        expected = expected / (np.nanstd(grouped, axis=1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        expected = expected / (np.nanstd(grouped, ddof=1) + 1e-4)
    np.testing.assert_allclose(ours[~bad], expected.reshape(-1)[~bad], rtol=1e-6, atol=1e-6)
    # The same numbers as the NaN (unscorable) reward gives: all three are "no reward".
    as_nan = np.where(bad, np.nan, rewards).astype(np.float32)
    np.testing.assert_array_equal(ours, np.asarray(grpo.advantages(as_nan, G, grpo.GRPOConfig(advantage=scale))))


def test_a_group_of_equal_rewards_or_of_one_sample_has_zero_advantage():
    config = grpo.GRPOConfig()
    assert (np.asarray(grpo.advantages(np.full(8, 0.7, np.float32), G, config)) == 0).all()
    assert (np.asarray(grpo.advantages(np.array([0.0, 1.0, 5.0], np.float32), 1, config)) == 0).all()


def test_combined_rewards_are_the_weighted_sum_and_nan_only_when_every_function_failed():
    per_function = np.array([[1.0, 0.5], [np.nan, 1.0], [np.nan, np.nan]], np.float32)
    combined = np.asarray(grpo.combine_rewards(per_function, [2.0, 1.0]))
    np.testing.assert_allclose(combined[:2], [2.5, 1.0])
    assert np.isnan(combined[2])
    with pytest.raises(ValueError, match="3 reward weights for 2 reward functions"):
        grpo.combine_rewards(per_function, [1.0, 1.0, 1.0])


def test_kl_estimators_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    rng = np.random.default_rng(5)
    pi = rng.dirichlet(np.ones(6))
    ref = rng.dirichlet(np.ones(6))
    exact = float(np.sum(pi * np.log(pi / ref)))
    samples = rng.choice(6, size=200_000, p=pi)
    lp = jnp.asarray(np.log(pi)[samples], jnp.float32)
    rp = jnp.asarray(np.log(ref)[samples], jnp.float32)
    for name in ("k1", "k3"):
        values = np.asarray(grpo.KL_ESTIMATORS[name](lp, rp), np.float64)
        # A Monte-Carlo mean: 4 standard errors (a fixed seed; a chance failure would be p = 6e-5).
        assert abs(values.mean() - exact) < 4 * values.std() / np.sqrt(values.size), name
    assert (np.asarray(grpo.KL_ESTIMATORS["k3"](lp, rp)) >= 0).all()
    assert (np.asarray(grpo.KL_ESTIMATORS["k2"](lp, rp)) >= 0).all()
    assert float(grpo.KL_ESTIMATORS["k3"](lp, lp).max()) == 0.0


def test_clipping_removes_the_gradient_exactly_where_trl_clips():
    """Tokens pushed past the trust region in their advantage's direction stop learning; the others
    (inside it, or outside it against their advantage: the pessimistic bound) keep A r grad(lp)."""
    config = grpo.GRPOConfig.trl("dapo", epsilon=0.2, epsilon_high=0.28)
    old = np.zeros((4, 1), np.float32)
    logprobs = np.log(np.array([[1.5], [1.5], [0.5], [1.1]], np.float32))
    advantages = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
    mask = np.ones((4, 1), np.float32)
    grad = jax.grad(lambda lp: loss_of(config, lp, old, None, advantages, mask).loss)(jnp.asarray(logprobs))
    ratio = np.exp(logprobs[:, 0])
    expected = np.array([0.0, ratio[1], 0.0, -ratio[3]]) / 4  # -A r / tokens where unclipped
    # One float32 exp and a division by 4 (exact) against float32 NumPy: an ulp or two.
    np.testing.assert_allclose(np.asarray(grad)[:, 0], expected, rtol=1e-6)
    capped = grpo.GRPOConfig.trl("dapo", delta=1.4)
    grad = jax.grad(lambda lp: loss_of(capped, lp, old, None, advantages, mask).loss)(jnp.asarray(logprobs))
    assert float(grad[1, 0]) == 0.0  # the ratio 1.5 is capped at delta: no more gradient pushing it down


@pytest.mark.parametrize("loss", sorted(grpo.LOSSES))
def test_terms_of_any_split_of_the_rows_add_up_to_the_whole(loss):
    logprobs, old, ref, rewards, mask = case(seed=6, prompts=4, empty_row=5)
    config = grpo.GRPOConfig(loss=loss, beta=BETA)
    advantages = np.asarray(grpo.advantages(rewards, G, config))
    whole = loss_of(config, logprobs, old, ref, advantages, mask)
    parts = [slice(0, 3), slice(3, 4), slice(4, 11), slice(11, 16)]
    total = grpo.LossTerms.zeros()
    for part in parts:
        total = total + loss_of(config, logprobs[part], old[part], ref[part], advantages[part], mask[part])
    for field in ("loss_count", "tokens", "sequences", "clip_low_sum", "clip_high_sum"):  # counts: exact
        assert float(getattr(total, field)) == float(getattr(whole, field)), field
    for field in ("loss_sum", "kl_sum"):  # float32 sums of O(1) terms in another order
        assert float(getattr(total, field)) == pytest.approx(float(getattr(whole, field)), rel=1e-5, abs=1e-6), field
    assert float(whole.sequences) == 15  # the empty row is padding, not a sequence


def test_an_empty_row_changes_no_loss():
    logprobs, old, ref, rewards, mask = case(seed=7)
    advantages = np.asarray(grpo.advantages(rewards, G, grpo.GRPOConfig()))
    padded = [np.concatenate([x, x[:1]]) for x in (logprobs, old, ref)]
    padded_mask = np.concatenate([mask, np.zeros_like(mask[:1])])
    for loss in grpo.LOSSES:
        config = grpo.GRPOConfig(loss=loss)
        plain = loss_of(config, logprobs, old, ref, advantages, mask).loss
        extra = loss_of(config, *padded, np.concatenate([advantages, [3.0]]), padded_mask).loss
        # The zero-masked row adds exact zeros; only a normaliser computed in another order may round.
        assert float(extra) == pytest.approx(float(plain), rel=1e-6), loss


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"GRPOConfig.loss='ppo' is not one of \['bnpo', 'dapo', 'dr_grpo'"):
        grpo.GRPOConfig(loss="ppo")
    with pytest.raises(ValueError, match="GRPOConfig.advantage='rloo'"):
        grpo.GRPOConfig(advantage="rloo")
    with pytest.raises(ValueError, match="GRPOConfig.beta=-0.1 must be >= 0"):
        grpo.GRPOConfig(beta=-0.1)
    with pytest.raises(ValueError, match=r"GRPOConfig.delta=1.1 must exceed 1 \+ epsilon_high = 1.28"):
        grpo.GRPOConfig(epsilon_high=0.28, delta=1.1)
    with pytest.raises(ValueError, match="needs reference logprobs"):
        loss_of(grpo.GRPOConfig(beta=0.04), *case()[:2], None, np.zeros(12, np.float32), case()[4])
    with pytest.raises(ValueError, match=r"do not split into groups of 4"):
        grpo.advantages(np.zeros(6, np.float32), G, grpo.GRPOConfig())


def test_registries_take_new_entries_by_name_and_refuse_duplicates():
    @grpo.register_loss("sequence_sum_for_test")
    def sequence_sum(logprobs, old_logprobs, ref_logprobs, advantages, mask, config, sampled_logprobs=None):
        return grpo.LossTerms.zeros().replace(loss_sum=-jnp.sum(advantages[:, None] * logprobs * mask),
                                              loss_count=jnp.float32(1), tokens=jnp.sum(mask),
                                              sequences=jnp.float32(mask.shape[0]))

    try:
        config = grpo.GRPOConfig(loss="sequence_sum_for_test", beta=0.0)
        logprobs, old, _, _, mask = case()
        terms = loss_of(config, logprobs, old, None, np.ones(12, np.float32), mask)
        assert float(terms.loss) == pytest.approx(-float((logprobs * mask).sum()), rel=1e-6)
        with pytest.raises(ValueError, match="loss 'sequence_sum_for_test' is already registered"):
            grpo.register_loss("sequence_sum_for_test")(sequence_sum)
    finally:
        del grpo.LOSSES["sequence_sum_for_test"]


# ------------------------------------------------------------------------------------ Visual-RFT's logging and mask

IM_END, ENDOFTEXT = 151645, 151643  # Qwen2-VL-Instruct's tokenizer EOS and the pad id, its generation's other stop


def numpy_visual_rft_mask(group_rows, eos=IM_END, pad=ENDOFTEXT):
    """Visual-RFT's mask (its `compute_loss`) over what `generate` returns for one prompt: each row cut after
    its first stop of either id and padded with the pad id to the group's longest row; then
    `is_eos = ids == eos_token_id`, `eos_idx` the first or the width, `mask = arange <= eos_idx`."""
    width = max(len(row) for row in group_rows)
    ids = np.array([row + [pad] * (width - len(row)) for row in group_rows])
    is_eos = ids == eos
    eos_idx = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), width)
    return np.arange(width)[None, :] <= eos_idx[:, None]


def test_the_visual_rft_completion_mask_is_its_trainer_code_and_first_stop_is_where_sampling_stopped():
    """Group 0's longest row ends on <|im_end|>; group 1's is cut at the limit L. A row that stopped on
    <|endoftext|> keeps its group's padding under Visual-RFT's rule and ends at its stop under ours."""
    L = 6
    groups = [[[5, 6, IM_END], [7, ENDOFTEXT], [8, 9, 10, 11, IM_END], [12, 13, ENDOFTEXT]],
              [[14, ENDOFTEXT], [15, 16, 17, 18, 19, 20], [21, IM_END], [ENDOFTEXT]]]
    rows = [row for group in groups for row in group]
    tokens = np.array([row + [ENDOFTEXT] * (L - len(row)) for row in rows], np.int32)  # the rollout's padding
    lengths = np.array([len(row) for row in rows], np.int32)  # through the first stop of either id
    visual_rft = grpo.GRPOConfig.visual_rft()
    assert visual_rft.completion_mask == "visual_rft" and grpo.GRPOConfig().completion_mask == "first_stop"

    ours = np.asarray(grpo.completion_lengths(tokens, lengths, G, visual_rft, IM_END))
    for g, group in enumerate(groups):
        expected = numpy_visual_rft_mask(group)
        got = np.arange(L)[None, :] < ours[g * G:(g + 1) * G, None]
        np.testing.assert_array_equal(got[:, :expected.shape[1]], expected, err_msg=f"group {g}")
        assert not got[:, expected.shape[1]:].any(), f"group {g} beyond its generated width"
    np.testing.assert_array_equal(ours, [3, 5, 5, 5, 6, 6, 2, 6])
    # The loop's phase: the recipe's rule with the run tokenizer's EOS, read only by the rule that needs it.
    from vrft_jax import grpo_loop, sampling

    out = sampling.Rollout(tokens=jnp.asarray(tokens), logprobs=jnp.zeros(tokens.shape), lengths=jnp.asarray(lengths))
    context = types.SimpleNamespace(train=types.SimpleNamespace(grpo=visual_rft), group_size=G,
                                    tokenizer=types.SimpleNamespace(eos_token_id=IM_END))
    np.testing.assert_array_equal(grpo_loop.completion_lengths(context, out), ours)
    context = types.SimpleNamespace(train=types.SimpleNamespace(grpo=grpo.GRPOConfig()), group_size=G, tokenizer=None)
    np.testing.assert_array_equal(grpo_loop.completion_lengths(context, out), lengths)
    np.testing.assert_array_equal(grpo.completion_lengths(tokens, lengths, G, grpo.GRPOConfig(), IM_END), lengths)
    with pytest.raises(ValueError, match=r"completions \(8, 6\) and lengths \(8,\) do not make groups of 3 rows"):
        grpo.visual_rft_lengths(tokens, lengths, 3, IM_END)
    with pytest.raises(ValueError, match=r"completion_mask='im_end' is not one of"):
        grpo.GRPOConfig(completion_mask="im_end")


def test_kl_is_the_token_mean_and_kl_sequence_mean_visual_rfts_mean_of_sequence_means():
    """TRL 1.16 logs `global_masked_mean(per_token_kl)`; Visual-RFT logs
    `((per_token_kl * mask).sum(1) / mask.sum(1)).mean()`. Ragged rows make the two differ."""
    logprobs, _, ref, rewards, mask = case(seed=8)
    config = grpo.GRPOConfig.visual_rft()
    metrics = loss_of(config, logprobs, None, ref, np.asarray(grpo.advantages(rewards, G, config)), mask).metrics()
    d = ref.astype(np.float64) - logprobs
    kl = np.exp(d) - d - 1
    token_mean = (kl * mask).sum() / mask.sum()
    sequence_mean = ((kl * mask).sum(1) / mask.sum(1)).mean()
    assert abs(token_mean - sequence_mean) > 1e-3 * token_mean  # the case tells them apart
    # float32 sums of a few dozen O(0.05) terms against float64: a few ulp, well inside 1e-5 relative.
    assert float(metrics["kl"]) == pytest.approx(token_mean, rel=1e-5)
    assert float(metrics["kl_sequence_mean"]) == pytest.approx(sequence_mean, rel=1e-5)


# ------------------------------------------------------------------------- sampler/trainer mismatch

CAP = 3.0


def mismatch_case():
    """Two rows of four tokens by hand: the scorer's logprobs (old = current: one update per rollout), the
    sampler's, whose gaps d = old - sampled are 0, 0.5, -0.7, 2.0 (exp 7.39: above the cap) in row 0, and in
    row 1 0.1, -1.5, then a token the sampler did not draw (NaN, past its stop) and a masked one."""
    logprobs = np.array([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.1, -0.9, -4.0]], np.float32)
    sampled = np.array([[-1.0, -2.5, 0.2, -5.0], [-0.3, 0.4, np.nan, -1.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    ref = logprobs + np.array([[0.1, -0.2, 0.3, 0.0], [0.05, 0.0, -0.1, 0.2]], np.float32)
    return logprobs, sampled, ref, np.array([1.5, -0.5], np.float32), mask


def test_truncated_importance_sampling_is_the_formula():
    """TRL 1.16's token_truncate correction, transcribed: w = min(exp(old - sampled), cap) (1 where the sampler
    gave no logprob) multiplies each token's clipped surrogate, then beta KL is added, then the dapo mean."""
    logprobs, sampled, ref, advantages, mask = mismatch_case()
    config = grpo.GRPOConfig.trl(loss_type="dapo", beta=BETA, importance_sampling="token_truncate",
                                 importance_sampling_cap=CAP)
    d = np.nan_to_num(logprobs.astype(np.float64) - sampled, nan=0.0)
    w = np.minimum(np.exp(d), CAP)
    assert w[0, 3] == CAP and w[1, 2] == 1.0  # the cases the formula is about: capped, and absent
    lp, r, m = logprobs.astype(np.float64), ref.astype(np.float64), mask.astype(np.float64)
    kl = (np.exp(r - lp) - (r - lp) - 1) * 1.0  # bias correction: times the ratio, 1 on-policy
    per_token = -advantages[:, None] * 1.0 * w + BETA * kl  # ratio 1: no clipping on-policy
    expected = (per_token * m).sum() / m.sum()

    def loss(lp_):
        return grpo.loss_terms(lp_, None, jnp.asarray(ref), jnp.asarray(advantages), jnp.asarray(mask), config,
                               sampled_logprobs=jnp.asarray(sampled))

    terms = loss(jnp.asarray(logprobs))
    # float32 sums of 7 terms of size ~5: a few ulps of 5 (5 x 2^-23 ~ 6e-7) relative to the sum.
    assert float(terms.loss) == pytest.approx(expected, rel=2e-6)
    # The weight is a constant of the update: d loss / d lp_t = (-A w + beta d KL / d lp) m / tokens.
    grads = jax.grad(lambda x: loss(x).loss)(jnp.asarray(logprobs))
    kl_grad = (1 - np.exp(r - lp)) + kl  # d/d lp of r(lp) * k3(lp) with r = exp(lp - sg(lp)) (value 1)
    np.testing.assert_allclose(np.asarray(grads), (-advantages[:, None] * w + BETA * kl_grad) * m / m.sum(),
                               rtol=2e-6, atol=1e-7)
    # Off: the same loss as without the sampler's logprobs, the mismatch still measured.
    off = dataclasses.replace(config, importance_sampling=None)
    plain = grpo.loss_terms(jnp.asarray(logprobs), None, jnp.asarray(ref), jnp.asarray(advantages),
                            jnp.asarray(mask), off)
    with_sampled = grpo.loss_terms(jnp.asarray(logprobs), None, jnp.asarray(ref), jnp.asarray(advantages),
                                   jnp.asarray(mask), off, sampled_logprobs=jnp.asarray(sampled))
    assert float(with_sampled.loss) == float(plain.loss)
    assert float(with_sampled.is_ratio_max) == 1.0 and float(with_sampled.mismatch_gap_max) == pytest.approx(2.0)


def test_mismatch_metrics_are_the_formulas_over_the_sampled_tokens():
    """mismatch/kl: the mean of k3 = exp(d) - d - 1 (d = old - sampled, KL(sampler || scorer) under the sampler's
    draws); gap mean and max of |d|; the weights' min, mean and max: over the real tokens with a sampler logprob."""
    logprobs, sampled, ref, advantages, mask = mismatch_case()
    config = grpo.GRPOConfig.trl(importance_sampling="token_truncate", importance_sampling_cap=CAP)
    terms = grpo.loss_terms(jnp.asarray(logprobs), None, None, jnp.asarray(advantages), jnp.asarray(mask), config,
                            sampled_logprobs=jnp.asarray(sampled))
    d = logprobs.astype(np.float64) - sampled
    seen = (mask > 0) & np.isfinite(sampled)
    assert seen.sum() == 6
    d = d[seen]
    w = np.minimum(np.exp(d), CAP)
    metrics = {k: float(v) for k, v in terms.metrics().items()}
    assert metrics["mismatch/kl"] == pytest.approx(np.mean(np.exp(d) - d - 1), rel=1e-6)
    assert metrics["mismatch/gap_mean"] == pytest.approx(np.mean(np.abs(d)), rel=1e-6)
    assert metrics["mismatch/gap_max"] == pytest.approx(2.0, rel=1e-6)
    assert (metrics["is_ratio/min"], metrics["is_ratio/max"]) == (pytest.approx(w.min(), rel=1e-6), CAP)
    assert metrics["is_ratio/mean"] == pytest.approx(w.mean(), rel=1e-6)
    # Split into two micro-batches (a row each), the terms add to the whole batch's: sums add, extrema combine.
    halves = [grpo.loss_terms(jnp.asarray(logprobs[i:i + 1]), None, None, jnp.asarray(advantages[i:i + 1]),
                              jnp.asarray(mask[i:i + 1]), config, sampled_logprobs=jnp.asarray(sampled[i:i + 1]))
              for i in range(2)]
    combined = grpo.LossTerms.zeros() + halves[0] + halves[1]
    for name, value in combined.metrics().items():
        assert float(value) == pytest.approx(metrics[name], rel=1e-6, nan_ok=True), name
    with pytest.raises(ValueError, match="needs the sampler's logprobs"):
        grpo.loss_terms(jnp.asarray(logprobs), None, None, jnp.asarray(advantages), jnp.asarray(mask), config)
    with pytest.raises(ValueError, match="importance_sampling_cap=0.5 must be >= 1"):
        grpo.GRPOConfig(importance_sampling="token_truncate", importance_sampling_cap=0.5)
