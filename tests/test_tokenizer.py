"""Provenance of the Qwen2-VL tokenizer: the packaged file is pinned, its ids match an independent source,
and a checkpoint's or directory's own tokenizer files are preferred over it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata

import pytest

from vrft_jax.models.qwen2_vl import tokenizer as qt

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "qwen2_vl_tokenizer_golden.json")


@pytest.fixture(scope="module")
def tokenizer():
    return qt.load_tokenizer()


@pytest.fixture(scope="module")
def golden() -> dict:
    """Ids made by tests/golden/make_tokenizer_golden.py: tiktoken over the Qwen BPE ranks that Alibaba's
    `dashscope` SDK ships (qwen.tiktoken), not from the packaged tokenizer.json."""
    with open(GOLDEN, encoding="ascii") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ the pinned file

def test_packaged_file_has_the_pinned_hash():
    with open(qt.packaged_tokenizer_file(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == qt.PACKAGED_TOKENIZER_SHA256


def test_a_one_byte_change_to_the_packaged_file_is_refused(tmp_path):
    copy = tmp_path / "tokenizer.json"
    shutil.copyfile(qt.packaged_tokenizer_file(), copy)
    assert qt.read_pinned(str(copy), qt.PACKAGED_TOKENIZER_SHA256)  # an exact copy passes
    data = bytearray(copy.read_bytes())
    at = data.index(b'"Hello"')  # still valid JSON afterwards: only the hash can tell
    data[at + 1] = ord("J")
    copy.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(RuntimeError) as error:
        qt._packaged_tokenizer(str(copy))
    message = str(error.value)
    assert str(copy) in message and qt.PACKAGED_TOKENIZER_SHA256 in message and actual in message


# ------------------------------------------------------------------------------------------ the golden ids

def test_golden_table_is_independent_and_broad(golden):
    source = golden["source"]
    assert source["ranks"].startswith("dashscope==") and source["encoder"].startswith("tiktoken==")
    texts = [case["text"] for case in golden["cases"]]
    assert len(texts) >= 300 and len(set(texts)) == len(texts)
    for token, token_id in zip(qt.SPECIAL_TOKENS, range(qt.ENDOFTEXT_ID, qt.QWEN2VL_VOCAB)):
        assert {"text": token, "ids": [token_id]} in golden["cases"]
    assert any(unicodedata.normalize("NFC", t) != t for t in texts)  # decomposed accents are in the table


def test_ids_equal_the_independent_golden_table(tokenizer, golden):
    texts = [case["text"] for case in golden["cases"]]
    expected = [case["ids"] for case in golden["cases"]]
    got = tokenizer(texts)["input_ids"]
    # The path the data pipeline takes (`ExampleEncoder.prompt_ids`): the Rust tokenizer directly.
    backend = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    wrong = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not wrong, f"{len(wrong)} strings differ, e.g. {wrong[:3]}"
    assert backend == expected


def test_golden_ids_decode_to_the_nfc_text(tokenizer, golden):
    for case in golden["cases"]:
        assert tokenizer.decode(case["ids"]) == unicodedata.normalize("NFC", case["text"]), case["text"]


# -------------------------------------------------------------------------------------- local directories

def write_variant_directory(tokenizer, directory) -> None:
    """An HF hub layout (tokenizer.json, tokenizer_config.json, chat_template.jinja) that differs from the
    packaged tokenizer where it shows: `<think>`/`</think>` as special tokens 151657/151658 (as in later
    Qwen releases), `<|endoftext|>` as the end of sequence and another default system prompt."""
    tokenizer.save_pretrained(directory)
    spec_path = os.path.join(directory, "tokenizer.json")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    for token_id, content in ((151657, "<think>"), (151658, "</think>")):
        spec["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["eos_token"] = "<|endoftext|>"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(qt.CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are a test."))


def test_each_load_is_a_tokenizer_of_its_own(golden):
    """The packaged tokenizer is built once per process and copied: a caller's change stays with its copy."""
    first, second = qt.load_tokenizer(), qt.load_tokenizer()
    first.padding_side, first.chat_template = "left", None
    assert second.padding_side == "right" and second.chat_template == qt.CHAT_TEMPLATE
    assert qt.load_tokenizer().chat_template == qt.CHAT_TEMPLATE
    for case in golden["cases"][:20]:
        assert first.encode(case["text"]) == second.encode(case["text"]) == case["ids"]


def test_a_local_directory_is_loaded_instead_of_the_packaged_tokenizer(tokenizer, golden, tmp_path):
    write_variant_directory(tokenizer, tmp_path)
    local = qt.load_tokenizer(str(tmp_path))
    assert len(local) == qt.QWEN2VL_VOCAB + 2
    assert local("<think> x </think>")["input_ids"] == [151657, 856, 220, 151658]
    assert tokenizer("<think> x </think>")["input_ids"] == [13708, 766, 29, 856, 690, 26865, 29]
    assert local.eos_token_id == qt.ENDOFTEXT_ID and tokenizer.eos_token_id == qt.IM_END_ID
    rendered = local.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a test.<|im_end|>")
    # Elsewhere the directory's vocabulary gives the independent ids.
    plain = [c for c in golden["cases"] if "think>" not in c["text"]]
    assert local([c["text"] for c in plain])["input_ids"] == [c["ids"] for c in plain]


# ------------------------------------------------------------------------------- which tokenizer a run uses

def tokenizer_files(directory, names=("tokenizer.json", "tokenizer_config.json")) -> str:
    os.makedirs(directory, exist_ok=True)
    for name in names:
        with open(os.path.join(directory, name), "w") as f:
            f.write("{}")
    return str(directory)


def test_a_checkpoints_tokenizer_files_are_preferred(tmp_path):
    ours = tmp_path / "ours"  # a vrft_jax.model_dir directory: the files are in hf_assets/
    tokenizer_files(ours / "hf_assets")
    hf = tmp_path / "hf"  # an HF checkpoint: the files are at the top, here the slow pair only
    tokenizer_files(hf, ("vocab.json", "merges.txt"))
    assert qt.resolve_tokenizer_path(checkpoint_dir=str(ours)) == str(ours / "hf_assets")
    assert qt.resolve_tokenizer_path(checkpoint_dir=str(hf)) == str(hf)


def test_an_explicit_tokenizer_wins_and_the_packaged_one_is_the_last_resort(tmp_path):
    checkpoint = tokenizer_files(tmp_path / "model")
    explicit = tokenizer_files(tmp_path / "tokenizer")
    bare = tmp_path / "random_init"  # saved without an HF source: no tokenizer files
    tokenizer_files(bare, ("config.json",))
    tokenizer_files(bare / "hf_assets", ("merges.txt",))  # half of the slow pair is not a tokenizer
    assert qt.resolve_tokenizer_path(explicit, checkpoint) == explicit
    assert qt.resolve_tokenizer_path(checkpoint_dir=str(bare)) is None
    assert qt.resolve_tokenizer_path() is None


def test_model_dir_assets_directory_is_the_model_dirs():
    from vrft_jax import model_dir

    assert qt.MODEL_DIR_ASSETS_DIR == model_dir.ASSETS_DIR
    assert {name for names in qt.TOKENIZER_FILES for name in names} <= set(model_dir.HF_ASSETS)
