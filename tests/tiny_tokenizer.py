"""A tiny byte-level BPE trained in milliseconds, with Qwen2-VL's 14 special tokens appended in Qwen's
order (environment.md §3): for tests whose model vocabulary is far smaller than the real 151,657."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

from vrft_jax.models.qwen2_vl.tokenizer import SPECIAL_TOKENS

# Qwen2's pre-tokenizer split.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tiny_bpe_tokenizer(corpus: list[str], bpe_vocab_size: int) -> Qwen2TokenizerFast:
    """A Qwen2 tokenizer whose BPE (at most `bpe_vocab_size` tokens) is trained on `corpus`; the special
    tokens follow it, so their ids are bpe size .. bpe size + 13."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        show_progress=False))
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer
