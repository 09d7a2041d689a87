"""An image-only Qwen-VL processor (tokenizer + image processor + chat template) without torchvision, for each
family: Qwen2-VL's and Qwen2.5-VL's 14-pixel patches with CLIP's normalisation, Qwen3-VL's 16-pixel patches with
0.5 / 0.5 (its preprocessor_config.json names `Qwen2VLImageProcessorFast` with those values).

`Qwen2VLProcessor` needs a video processor, which needs torchvision; the subclass here leaves it out.
The tokenizer and its constants live in the torch-free `tokenizer.py` and are re-exported here.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from vrft_jax.models.qwen2_vl.config import IMAGE_STATS
from vrft_jax.models.qwen2_vl.tokenizer import (  # noqa: F401  (re-exported)
    CHAT_TEMPLATE,
    ENDOFTEXT_ID,
    EOS_TOKEN_IDS,
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    QWEN2VL_VOCAB,
    SPECIAL_TOKENS,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    load_tokenizer,
)

PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
# Visual-RFT's training resolution (max 512 merged tokens per image) and Qwen2-VL's minimum.
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 512 * 28 * 28


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (the video processor needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, *,
                         family: str = "qwen2_vl") -> Qwen2VLImageProcessorPil:
    """The family's image processor: patch size and normalisation from `Qwen2VLConfig`'s tables."""
    mean, std = IMAGE_STATS[family]
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE[family],
                                    image_mean=list(mean), image_std=list(std))


def load_processor(path: str | None = None, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                   family: str = "qwen2_vl") -> ImageOnlyQwen2VLProcessor:
    """Tokenizer + the family's image processor + chat template, as HF's `AutoProcessor` would give."""
    tokenizer = load_tokenizer(path)
    return ImageOnlyQwen2VLProcessor(load_image_processor(min_pixels, max_pixels, family=family), tokenizer,
                                     chat_template=tokenizer.chat_template or CHAT_TEMPLATE)
