"""Completion logprobs: equal to the log-softmax of a plain full forward pass, image features computed
once per prompt, padding invisible, chunking invisible."""

import jax
import numpy as np
import pytest

from grpo.conftest import PATCH_BUCKET, PROMPT_LENGTH, completions, prompts
from hf_reference import TINY_CONFIGS, count_vision_calls, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models.qwen2_vl import ModelInputs, forward
from vrft_jax.scoring import score_completions

G, L = 3, 10
TEMPERATURE = 0.7


def score(model, inputs, tokens, mask, **kw):
    return jax.jit(lambda m, i, t, k: score_completions(m, i, t, k, temperature=TEMPERATURE, **kw))(
        model, inputs, tokens, mask)


def full_forward_logprobs(model, tiny, seed, tokens, mask):
    """Independent reference: prompt + completion as one HF-style batch (pixel values repeated per
    sample, as TRL and Visual-RFT feed them), the model's ordinary logits, log-softmax in float64."""
    batch = mixed_batch(tiny, seed=seed, padding="left", length=PROMPT_LENGTH)
    grids = batch.image_grid_thw
    per_image = np.split(batch.pixel_values, np.cumsum(grids.prod(axis=1))[:-1])
    images_of_row = [[0], [1, 2], [], [3]]  # mixed_batch's rows hold 1, 2, 0 and 1 images
    order = [i for row in range(4) for _ in range(G) for i in images_of_row[row]]
    full = ModelInputs.from_hf(model.config, np.concatenate([np.repeat(batch.input_ids, G, 0), tokens], 1),
                               np.concatenate([np.repeat(batch.attention_mask, G, 0), mask], 1),
                               np.concatenate([per_image[i] for i in order]), grids[order], patch_bucket=PATCH_BUCKET)
    logits = np.asarray(forward(model, full), np.float64)[:, PROMPT_LENGTH - 1:PROMPT_LENGTH - 1 + L] / TEMPERATURE
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    logprobs = np.take_along_axis(logits, tokens[..., None], -1)[..., 0] - log_z
    probs = np.exp(logits - log_z[..., None])
    return logprobs, log_z - (probs * logits).sum(-1), np.abs(logits).max()


@pytest.mark.parametrize("tiny", TINY_CONFIGS[:2], ids=lambda t: t.name)
def test_logprobs_and_entropy_equal_the_log_softmax_of_a_full_forward(tiny, tmp_path):
    """Untied and tied LM heads; a chunk size (4) that does not divide L (10)."""
    random_hf_model(tiny, seed=31).save_pretrained(tmp_path)
    model = load_hf(str(tmp_path))
    tokens, mask = completions(4 * G, L, seed=1, vocab=min(tiny.image_token_id, 1000))
    out = score(model, prompts(model.config, seed=0) if tiny is TINY_CONFIGS[0] else
                ModelInputs.from_hf(model.config, **mixed_batch(tiny, seed=0, padding="left",
                                                                length=PROMPT_LENGTH).numpy(),
                                    patch_bucket=PATCH_BUCKET),
                tokens, mask, chunk_size=4, with_entropy=True)
    logprobs, entropy, logit_scale = full_forward_logprobs(model, tiny, 0, tokens, mask)
    real = mask.astype(bool)
    assert out.logprobs.dtype == np.float32 and out.logprobs.shape == (4 * G, L)
    # A logprob is a difference of logits: float32 rounds it to a few ulps of the logits' size (up to
    # ~100 for the tied model, ulp 8e-6), whichever order the two programs add in.
    tolerance = max(1e-5, 1e-6 * logit_scale)
    np.testing.assert_allclose(np.asarray(out.logprobs)[real], logprobs[real], atol=tolerance, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy)[real], entropy[real], atol=tolerance, rtol=0)


def test_chunk_size_does_not_change_the_numbers(policy):
    inputs = prompts(policy.config)
    tokens, mask = completions(4 * G, L, seed=2)
    one = np.asarray(score(policy, inputs, tokens, mask, chunk_size=L).logprobs)
    chunked = np.asarray(score(policy, inputs, tokens, mask, chunk_size=3).logprobs)
    np.testing.assert_allclose(chunked, one, atol=1e-6, rtol=1e-6)  # other matmul shapes round differently


def test_tokens_after_the_eos_are_invisible_to_the_real_ones(policy):
    inputs = prompts(policy.config)
    tokens, mask = completions(4 * G, L, seed=3)
    other = np.where(mask, tokens, np.random.default_rng(4).integers(3, 1000, tokens.shape)).astype(np.int32)
    a = np.asarray(score(policy, inputs, tokens, mask).logprobs)
    b = np.asarray(score(policy, inputs, other, mask).logprobs)
    real = mask.astype(bool)
    np.testing.assert_array_equal(a[real], b[real])
    assert not np.array_equal(a[~real], b[~real])


def test_the_vision_tower_runs_once_per_prompt_not_per_completion(policy, monkeypatch):
    inputs = prompts(policy.config)
    tokens, mask = completions(4 * 8, L, seed=5)
    calls = count_vision_calls(monkeypatch)
    score(policy, inputs, tokens, mask).logprobs.block_until_ready()
    assert calls == [4]  # one run over the 4 prompts, for their 32 completions


def test_completion_rows_must_be_a_multiple_of_the_prompts(policy):
    inputs = prompts(policy.config)
    tokens, mask = completions(7, L)
    with pytest.raises(ValueError, match=r"completions \(7, 10\) and mask \(7, 10\) must be \[B\*G, L\] for B=4"):
        score_completions(policy, inputs, tokens, mask)
