"""The offline Qwen2-VL tokenizer and processor reproduce Qwen2-VL's encodings and chat template."""

import numpy as np
import pytest
from PIL import Image

from vrft_jax.models.qwen2_vl import processor as qp


@pytest.fixture(scope="module")
def tokenizer():
    return qp.load_tokenizer()


@pytest.mark.parametrize("text,ids", [
    ("Hello, world!", [9707, 11, 1879, 0]),
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>",
     [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]),
    # Qwen2-VL has no <think> token: it splits into ordinary BPE pieces.
    ("<think> x </think><answer>", [13708, 766, 29, 856, 690, 26865, 1784, 9217, 29]),
    ("<|vision_start|><|image_pad|><|vision_end|>", [151652, 151655, 151653]),
])
def test_known_encodings(tokenizer, text, ids):
    assert tokenizer(text)["input_ids"] == ids


def test_vocabulary_is_qwen2_vl_sized_with_its_special_tokens(tokenizer):
    assert len(tokenizer) == qp.QWEN2VL_VOCAB == 151657
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>"]) == \
        [qp.ENDOFTEXT_ID, qp.IM_END_ID, qp.IMAGE_PAD_ID, qp.VIDEO_PAD_ID]
    assert tokenizer.eos_token_id == qp.IM_END_ID and tokenizer.pad_token_id == qp.ENDOFTEXT_ID
    assert tokenizer.decode([13708, 766, 29]) == "<think>"


CASES = [
    # A user turn with an image first: the default system turn is inserted, one vision block per image.
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat?"}]}], True,
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
     "<|vision_start|><|image_pad|><|vision_end|>Where is the cat?<|im_end|>\n<|im_start|>assistant\n"),
    # An explicit system message replaces the default; string content; two images; a finished assistant turn.
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]},
      {"role": "assistant", "content": "Same."}], False,
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare <|vision_start|><|image_pad|><|vision_end|>"
     "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n"),
]


@pytest.mark.parametrize("messages,generation,expected", CASES)
def test_chat_template_renders_as_qwen2_vl(tokenizer, messages, generation, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == expected


def test_add_vision_id_numbers_pictures(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text and "Picture 2: <|vision_start|>" in text


def test_processor_expands_image_tokens_without_torchvision():
    proc = qp.load_processor(min_pixels=56 * 56, max_pixels=112 * 112)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat?"}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.fromarray(np.zeros((100, 130, 3), np.uint8))  # sides not multiples of 28
    out = proc(text=[text], images=[image], return_tensors="np")
    grid = out["image_grid_thw"][0]
    assert (out["input_ids"] == qp.IMAGE_PAD_ID).sum() == grid.prod() // 4
    assert out["pixel_values"].shape == (grid.prod(), 1176)
    assert (out["mm_token_type_ids"] == (out["input_ids"] == qp.IMAGE_PAD_ID)).all()


def test_tokenizer_module_does_not_import_torch():
    """Data workers and the trainer load the tokenizer; torch would cost them seconds and memory."""
    import subprocess
    import sys

    code = "import sys; from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
