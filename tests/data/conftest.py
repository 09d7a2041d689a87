"""Fixtures of the data tests: the real Qwen2-VL tokenizer (loaded once), a tiny BPE with the same
special tokens (for subprocess tests), and model configs that match them."""

from __future__ import annotations

import pytest
from sample_data import config_for, save_tiny_tokenizer

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2-VL tokenizer (2-5 s to load: once per session)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def qwen_config() -> Qwen2VLConfig:
    return Qwen2VLConfig.qwen2_vl_2b()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    return save_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer) -> Qwen2VLConfig:
    return config_for(tiny_tokenizer)
