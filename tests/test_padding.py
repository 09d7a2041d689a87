"""The host-side left-padding check shared by the sampler and the scorer."""

import types

import jax
import numpy as np
import pytest

from vrft_jax import padding
from vrft_jax.models.qwen2_vl import InputError


def prompts(mask):
    return types.SimpleNamespace(attention_mask=mask)


def test_rows_that_end_in_padding_are_named_with_the_caller():
    mask = np.ones((5, 6), np.int32)
    mask[[1, 4], -1] = 0
    mask[2, :3] = 0  # left padding is fine
    mask[3] = 0  # so is a row of padding only: a finite stream's filler (valid=False)
    for array in (mask, jax.device_put(mask)):
        with pytest.raises(InputError, match=r"scoring needs left-padded prompts: rows \[1, 4\] end in padding"):
            padding.check_left_padded(prompts(array), "scoring")


def test_a_device_mask_that_passed_is_not_read_again(monkeypatch):
    mask = jax.device_put(np.ones((2, 4), np.int32))
    padding.check_left_padded(prompts(mask))
    reads = []
    monkeypatch.setattr(padding, "np", types.SimpleNamespace(
        asarray=lambda x: reads.append(x) or np.asarray(x), flatnonzero=np.flatnonzero))
    padding.check_left_padded(prompts(mask))
    assert reads == []
    other = jax.device_put(np.ones((2, 4), np.int32))  # an equal but distinct array is read
    padding.check_left_padded(prompts(other))
    assert len(reads) == 1
    host = np.ones((2, 4), np.int32)  # a NumPy mask may change: read every time
    padding.check_left_padded(prompts(host))
    host[0, -1] = 0
    with pytest.raises(InputError, match=r"rows \[0\]"):
        padding.check_left_padded(prompts(host))


def test_a_traced_mask_cannot_be_checked():
    with pytest.raises(TypeError, match="needs a concrete attention mask"):
        jax.jit(lambda m: padding.check_left_padded(prompts(m)))(np.ones((2, 3), np.int32))
