"""Shared fixtures of the GRPO tests: a tiny converted Qwen2-VL and rollout-shaped batches for it."""

import numpy as np
import pytest

from grpo.trl_reference import perturbed
from hf_reference import TINY_CONFIGS, concat, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax import grpo
from vrft_jax.models.qwen2_vl import ModelInputs
from vrft_jax.train_step import TrainBatch

TINY = TINY_CONFIGS[0]  # GQA 4:2, untied head, vocabulary 1024
EOS = TINY.eos_token_id
PROMPT_LENGTH, PATCH_BUCKET = 60, 128
IMAGE_SETS = (((56, 84), (100, 130), (70, 45), (84, 84)), ((84, 56), (60, 150), (45, 70), (112, 84)),
              ((28, 140), (90, 90), (56, 56), (130, 100)), ((140, 28), (75, 75), (100, 60), (56, 112)))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """(policy, reference) checkpoint directories: the policy is the reference, slightly moved."""
    reference = tmp_path_factory.mktemp("grpo_reference")
    policy = tmp_path_factory.mktemp("grpo_policy")
    model = random_hf_model(TINY, seed=21)
    model.save_pretrained(reference)
    perturbed(model, 0.1, seed=22)
    model.save_pretrained(policy)
    return str(policy), str(reference)


@pytest.fixture(scope="session")
def policy(checkpoints):
    return load_hf(checkpoints[0])


@pytest.fixture(scope="session")
def reference(checkpoints):
    return load_hf(checkpoints[1])


def prompts(config, groups_of_four: int = 1, seed: int = 0) -> ModelInputs:
    """4 * groups_of_four left-padded prompts of mixed_batch's kinds (0, 1 or 2 images of many sizes)."""
    batches = [mixed_batch(TINY, seed=seed + i, image_sizes=IMAGE_SETS[(seed + i) % len(IMAGE_SETS)],
                           padding="left", length=PROMPT_LENGTH) for i in range(groups_of_four)]
    return ModelInputs.from_hf(config, **concat(*batches).numpy(), patch_bucket=PATCH_BUCKET)


def completions(rows: int, length: int, seed: int = 0, vocab: int = 1000):
    """(int32[rows, L] tokens, int32[rows, L] mask) as the sampler returns them: random text, an EOS
    ending most rows at a random length, padding (0) after it, some rows running to the limit."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    tokens[tokens == EOS] = 3
    lengths = rng.integers(1, length + 1, rows)
    for row, n in enumerate(lengths):
        if row % 3:
            tokens[row, n - 1] = EOS
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask, tokens, 0).astype(np.int32), mask


def train_batch(config, group_size: int, length: int, *, groups_of_four: int = 1, seed: int = 0) -> TrainBatch:
    """A TrainBatch of random completions and rewards; the caller adds ref/old logprobs."""
    inputs = prompts(config, groups_of_four, seed)
    rows = inputs.input_ids.shape[0] * group_size
    tokens, mask = completions(rows, length, seed)
    rewards = np.random.default_rng(seed + 100).choice([0.0, 0.5, 1.0, 2.0], rows).astype(np.float32)
    advantages = np.asarray(grpo.advantages(rewards, group_size, grpo.GRPOConfig()))
    return TrainBatch(inputs=inputs, completions=tokens, completion_mask=mask, advantages=advantages)
