"""Runtime options leave the math alone: remat policies, and fp32 parameters with bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import TINY_CONFIGS, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models.qwen2_vl import ModelInputs, with_config

pytestmark = pytest.mark.parity

TINY = TINY_CONFIGS[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("options")
    random_hf_model(TINY, seed=9).save_pretrained(path)
    model = load_hf(str(path))
    return model, ModelInputs.from_hf(model.config, **mixed_batch(TINY, seed=9).numpy())


def loss_and_grad(model, inputs):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(inputs).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * inputs.attention_mask)

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("policy", ["block", "save_dots"])
def test_remat_gives_the_same_loss_and_gradients(setup, policy):
    model, inputs = setup
    value, grads = loss_and_grad(model, inputs)
    value_r, grads_r = loss_and_grad(with_config(model, remat=policy), inputs)
    # The same float32 operations, recomputed and possibly fused in another order: a few units of
    # roundoff (6e-8) in the loss, a mean of O(10) log-sum-exps: rel 1e-6 is ~16 of them.
    assert float(value_r) == pytest.approx(float(value), rel=1e-6)
    # Gradients are sums over up to B*T = O(100) terms each: sqrt(100) x a few roundoffs ~ 1e-6 of the
    # tensor's largest entry; 1e-5 leaves 10x for fusions that reorder the backward pass.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_bf16_compute_over_fp32_parameters(setup):
    model, inputs = setup
    reference = np.asarray(model(inputs))
    mixed = with_config(model, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(mixed)))  # master weights stay fp32
    logits = mixed(inputs)
    assert logits.dtype == jnp.bfloat16
    valid = np.asarray(inputs.attention_mask).astype(bool)
    error = np.abs(np.asarray(logits, np.float32) - reference)[valid].max() / np.abs(reference[valid]).max()
    # bf16's unit roundoff is 2^-9 = 0.2%; about 25 roundings lie between the input and a logit in
    # these 2 layers and the head, so <= 5% of the logit scale even if every one adds up. A sanity
    # bound for mixed precision, not parity: the argmax agrees on most positions.
    assert error < 0.05, error
    assert (np.argmax(np.asarray(logits, np.float32), -1) == np.argmax(reference, -1))[valid].mean() > 0.8


def test_bf16_parameters_halve_the_memory(setup):
    model, _ = setup
    half = with_config(model, param_dtype=jnp.bfloat16)

    def size(m):
        return sum(x.nbytes for x in jax.tree.leaves(nnx.state(m)))

    assert size(half) * 2 == size(model)
