"""Small inputs of the data tests: encoded images, a tiny Qwen2-VL-like tokenizer, matching model configs.

(A module of its own, not conftest.py, so that tests and the subprocesses they start can import it.)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vrft_jax.data import prompts
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.tokenizer import SPECIAL_TOKENS


def save_tiny_tokenizer(directory: str) -> str:
    """A 1000-token byte-level BPE with Qwen2-VL's special tokens, saved as an HF tokenizer directory
    (loads in milliseconds, so subprocess tests do not pay for the real vocabulary)."""
    from tiny_tokenizer import tiny_bpe_tokenizer

    corpus = [prompts.detection_problem("red circle"), prompts.classification_problem("aircraft"),
              prompts.grounding_problem("the thing on the left"), "You are a helpful assistant.",
              "system user assistant 0123456789 green blue yellow purple orange square triangle"] * 4
    tokenizer = tiny_bpe_tokenizer(corpus, 1000 - len(SPECIAL_TOKENS))
    tokenizer.save_pretrained(directory)
    return directory


def config_for(tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL-2B's vision geometry with the tokenizer's image token."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig.qwen2_vl_2b().replace(**ids)


def png_bytes(height: int, width: int, seed: int = 0, mode: str = "RGB", image_format: str = "PNG") -> bytes:
    """Random pixels of the given size and PIL mode ("RGB", "RGBA", "L"), encoded."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()
