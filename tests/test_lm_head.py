"""The blocked LM-head log-probabilities: values, entropies and both gradients against the plain
log-softmax in float64, for every way the chunks and blocks can fall (the vocabulary split unevenly,
a block larger than the vocabulary, a chunk that does not divide the length)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vrft_jax.lm_head import token_logprobs

pytestmark = pytest.mark.parity

TEMPERATURE = 0.7

# (rows N, length L, width D, vocabulary V, chunk, block)
CASES = [
    (3, 10, 16, 1000, 4, 128),    # V = 7 x 128 + 104: the last rows of the strided blocks are padding
    (2, 7, 8, 37, 3, 5),          # V prime, L prime: every chunk and block boundary uneven
    (4, 5, 16, 300, 32, 4096),    # one chunk and one block larger than L and V
    (2, 6, 8, 64, 2, 64),         # exact fit
]


def inputs(n, length, width, vocab, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, length, width)).astype(np.float32)
    head = (rng.normal(size=(vocab, width)) * 0.7).astype(np.float32)  # logits of a few units, like a model's
    targets = rng.integers(0, vocab, (n, length)).astype(np.int32)
    upstream = rng.normal(size=(n, length)).astype(np.float32)
    return hidden, head, targets, upstream


def plain(hidden, head, targets, upstream, xp):
    """sum(g * logprob), the logprobs and the entropies by the full log-softmax, in numpy (float64)
    or jnp (float32, autodiff-able)."""
    logits = xp.einsum("nld,vd->nlv", hidden, head) / TEMPERATURE
    top = logits.max(-1, keepdims=True)
    log_z = xp.log(xp.exp(logits - top).sum(-1)) + top[..., 0]
    log_p = logits - log_z[..., None]
    logprobs = xp.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    entropy = -(xp.exp(log_p) * log_p).sum(-1)
    return (upstream * logprobs).sum(), (logprobs, entropy)


def float64_truth(hidden, head, targets, upstream):
    """Values and the analytic gradients d/d hidden, d/d head of sum(g * logprob), in float64."""
    hidden, head, upstream = (np.asarray(x, np.float64) for x in (hidden, head, upstream))
    _, (logprobs, entropy) = plain(hidden, head, targets, upstream, np)
    logits = np.einsum("nld,vd->nlv", hidden, head) / TEMPERATURE
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    d_logits = -upstream[..., None] * probs
    np.put_along_axis(d_logits, targets[..., None], np.take_along_axis(d_logits, targets[..., None], -1)
                      + upstream[..., None], -1)
    d_logits /= TEMPERATURE
    return logprobs, entropy, np.einsum("nlv,vd->nld", d_logits, head), np.einsum("nlv,nld->vd", d_logits, hidden)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_L{}_D{}_V{}_chunk{}_block{}".format(*c))
def test_values_entropies_and_gradients_equal_the_full_log_softmax(case):
    n, length, width, vocab, chunk, block = case
    hidden, head, targets, upstream = inputs(n, length, width, vocab)

    def ours(hidden, head):
        logprobs, entropy = token_logprobs(hidden, head, targets, temperature=TEMPERATURE, chunk_size=chunk,
                                           vocab_block=block, with_entropy=True)
        return jnp.sum(upstream * logprobs), (logprobs, entropy)

    def theirs(hidden, head):
        return plain(hidden, head, targets, upstream, jnp)

    truth = float64_truth(hidden, head, targets, upstream)
    (_, (logprobs, entropy)), grads = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(hidden, head)
    (_, (plain_logprobs, plain_entropy)), plain_grads = jax.jit(jax.value_and_grad(theirs, (0, 1), has_aux=True))(
        hidden, head)
    for name, got, floor_of, exact in zip(("logprobs", "entropy", "d hidden", "d head"),
                                          (logprobs, entropy, *grads), (plain_logprobs, plain_entropy, *plain_grads),
                                          truth):
        # The float32 noise floor is the plain float32 log-softmax's (and its autodiff's) own error against
        # float64, measured here. Ours sums the vocabulary in another order (blocks, an online rescaling),
        # which in float32 moves the result by a few ulps of the largest term: it must stay within 4x
        # that floor plus 4 ulps of the quantity's scale (a floor can be 0 where the plain program happens
        # to round exactly). A wrong block mask, target or transposed gradient is off by O(1).
        floor = np.abs(np.asarray(floor_of, np.float64) - exact).max()
        error = np.abs(np.asarray(got, np.float64) - exact).max()
        scale = np.abs(exact).max()
        assert error <= 4 * floor + 4 * np.finfo(np.float32).eps * scale, (name, error, floor, scale)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "N{}_L{}_D{}_V{}_chunk{}_block{}".format(*c))
def test_entropy_gradient_for_a_bonus_equals_the_full_log_softmax(case):
    """With `entropy_grad`, d/d(hidden, head) of sum(g lp + h H) against float64 and the plain float32 autodiff:
    dH/dz_v = -p_v (log p_v + H), the softmax's own entropy derivative, through the same blocks."""
    n, length, width, vocab, chunk, block = case
    hidden, head, targets, upstream = inputs(n, length, width, vocab)
    entropy_upstream = np.random.default_rng(1).normal(size=targets.shape).astype(np.float32)

    def ours(hidden, head):
        logprobs, entropy = token_logprobs(hidden, head, targets, temperature=TEMPERATURE, chunk_size=chunk,
                                           vocab_block=block, with_entropy=True, entropy_grad=True)
        return jnp.sum(upstream * logprobs + entropy_upstream * entropy)

    def theirs(hidden, head):
        _, (logprobs, entropy) = plain(hidden, head, targets, upstream, jnp)
        return jnp.sum(upstream * logprobs + entropy_upstream * entropy)

    h64, w64, g, e = (np.asarray(x, np.float64) for x in (hidden, head, upstream, entropy_upstream))
    logits = np.einsum("nld,vd->nlv", h64, w64) / TEMPERATURE
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1, keepdims=True)
    d_logits = -g[..., None] * p - e[..., None] * p * (log_p + entropy)
    np.put_along_axis(d_logits, targets[..., None], np.take_along_axis(d_logits, targets[..., None], -1)
                      + g[..., None], -1)
    d_logits /= TEMPERATURE
    exact = (np.einsum("nlv,vd->nld", d_logits, w64), np.einsum("nlv,nld->vd", d_logits, h64))
    grads = jax.jit(jax.grad(ours, (0, 1)))(hidden, head)
    plain_grads = jax.jit(jax.grad(theirs, (0, 1)))(hidden, head)
    for name, got, floor_of, truth in zip(("d hidden", "d head"), grads, plain_grads, exact):
        scale = np.abs(truth).max()
        floor = np.abs(np.asarray(floor_of, np.float64) - truth).max()
        assert floor <= 1e-4 * scale, (name, floor, scale)  # the float64 formula is autodiff's, to float32 noise
        # As above: within 4x the plain float32 program's own error plus 4 ulps of the gradient's scale.
        error = np.abs(np.asarray(got, np.float64) - truth).max()
        assert error <= 4 * floor + 4 * np.finfo(np.float32).eps * scale, (name, error, floor, scale)
    with pytest.raises(ValueError, match="entropy_grad needs with_entropy=True"):
        token_logprobs(hidden, head, targets, entropy_grad=True)


def test_entropy_is_a_metric_without_gradient_and_padding_rows_never_win():
    hidden, head, targets, _ = inputs(2, 5, 8, 37)
    grads = jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, targets, chunk_size=2, vocab_block=5,
                                                         with_entropy=True)[1]), (0, 1))(hidden, head)
    assert all(not np.any(np.asarray(g)) for g in grads)
    # Logits in the hundreds: the padding rows (-inf) must neither be taken for the max nor add mass.
    logprobs, _ = token_logprobs(100 * hidden, head, targets, temperature=TEMPERATURE, chunk_size=2, vocab_block=5)
    exact = float64_truth(100 * hidden, head, targets, np.zeros(targets.shape, np.float32))[0]
    scale = np.abs(np.einsum("nld,vd->nlv", 100 * hidden, head)).max() / TEMPERATURE
    # A float32 logit of that scale is off by an ulp or two; the logsumexp and the difference add a few.
    np.testing.assert_allclose(logprobs, exact, rtol=0, atol=16 * np.finfo(np.float32).eps * scale)


def test_a_run_time_entropy_flag_computes_it_only_when_true_in_one_program():
    hidden, head, targets, upstream = inputs(3, 10, 16, 1000)
    settings = dict(temperature=TEMPERATURE, chunk_size=4, vocab_block=128)

    def value_and_grads(hidden, head, with_entropy):
        def loss(h, w):
            logprobs, entropy = token_logprobs(h, w, targets, with_entropy=with_entropy, **settings)
            return jnp.sum(upstream * logprobs), (logprobs, entropy)
        return jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, head)

    expected = jax.jit(lambda hidden, head: value_and_grads(hidden, head, True))(hidden, head)
    flagged = jax.jit(value_and_grads)
    measured, unmeasured = flagged(hidden, head, jnp.asarray(True)), flagged(hidden, head, jnp.asarray(False))
    assert flagged._cache_size() == 1
    # The same operations either way: values, entropies (when measured) and gradients bit-identical.
    for got in (measured, unmeasured):
        (value, (logprobs, _)), grads = got
        (want_value, (want_logprobs, _)), want_grads = expected
        assert float(value) == float(want_value)
        np.testing.assert_array_equal(logprobs, want_logprobs)
        for g, w in zip(grads, want_grads):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(measured[0][1][1], expected[0][1][1])
    assert not np.any(np.asarray(unmeasured[0][1][1]))  # not measured: zeros
    with pytest.raises(ValueError, match="bool scalar"):
        token_logprobs(hidden, head, targets, with_entropy=jnp.ones((2,), bool))


def test_compute_dtype_runs_the_matmuls_and_gradients_keep_the_input_dtypes():
    hidden, head, targets, upstream = inputs(2, 6, 8, 64)

    def loss(hidden, head):
        logprobs, _ = token_logprobs(hidden, head, targets, chunk_size=4, vocab_block=16, dtype=jnp.bfloat16)
        return jnp.sum(upstream * logprobs)

    d_hidden, d_head = jax.grad(loss, (0, 1))(hidden, head)
    assert d_hidden.dtype == jnp.float32 and d_head.dtype == jnp.float32
    _, (logprobs, _) = plain(hidden, head, targets, upstream, np)
    ours = token_logprobs(hidden, head, targets, temperature=TEMPERATURE, dtype=jnp.bfloat16, vocab_block=16)[0]
    # bf16 inputs: 8 mantissa bits, relative 2^-8 per product, logits of a few units: within 0.1.
    np.testing.assert_allclose(ours, logprobs, atol=0.1)


def test_bad_settings_are_refused():
    hidden, head, targets, _ = inputs(1, 2, 4, 8)
    for kwargs in (dict(temperature=0.0), dict(chunk_size=0), dict(vocab_block=0)):
        with pytest.raises(ValueError, match="must be"):
            token_logprobs(hidden, head, targets, **kwargs)
