"""`make convert-demo`: the conversion path end to end on a tiny random model of each family (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) with the real tokenizer.

    python launch/convert_demo.py [--out demo_out] [--new-tokens 32] [--family qwen2_vl,qwen2_5_vl,qwen3_vl]

For each family:
1. write a random Hugging Face checkpoint (PyTorch, the hub layout),
2. convert it to Flax with `python -m model_port.hf_to_flax`,
3. greedily decode a Visual-RFT detection prompt about an image (asking for boxes in the family's frame),
   and check HF's `generate` agrees,
4. convert back with `python -m model_port.flax_to_hf` and check every tensor is bit-identical.

It drives `model_port` and needs torch and transformers, so it lives above the library (`make demo`
is the training demo, `python -m vrft_jax.train`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# family -> (HF config class, HF model class, the tiny vision tower)
FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 dict(depth=2, embed_dim=64, num_heads=4, hidden_size=128, mlp_ratio=2)),
    # 56-pixel windows (2 x 2 merged tokens), full attention in the last block
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                   dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=128, intermediate_size=96,
                        window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)),
    # 16-pixel patches, an 8 x 8 position table, DeepStack from both blocks
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                 dict(depth=2, hidden_size=64, num_heads=4, out_hidden_size=128, intermediate_size=96, patch_size=16,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])),
}
# Qwen3's decoder: a head_dim of its own (48, not 128 / 4), no q/k/v bias, interleaved M-RoPE
QWEN3_TEXT = dict(head_dim=48, attention_bias=False,
                  rope_parameters={"rope_type": "default", "mrope_section": [8, 8, 8], "rope_theta": 5e6})


def tiny_hf_config(family: str) -> dict:
    """A 2-layer model of `family` with the real vocabulary and special-token ids."""
    config = dict(
        model_type=family,
        text_config=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=FAMILIES[family][2],
        tie_word_embeddings=True)
    if family == "qwen3_vl":
        config["text_config"] = {**config["text_config"], **QWEN3_TEXT}
    return config


def scene(seed: int = 0) -> tuple[Image.Image, list[int]]:
    """A red square on a grey background, and its box on the 0-1000 scale."""
    rng = np.random.default_rng(seed)
    width, height = 160, 120
    image = Image.new("RGB", (width, height), (120, 120, 120))
    x0, y0 = int(rng.integers(10, 80)), int(rng.integers(10, 50))
    ImageDraw.Draw(image).rectangle([x0, y0, x0 + 50, y0 + 40], fill=(220, 30, 30))
    return image, [round(x0 / width * 1000), round(y0 / height * 1000), round((x0 + 50) / width * 1000),
                   round((y0 + 40) / height * 1000)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="working directory for the checkpoints")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--family", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    failed = [family for family in args.family.split(",") if not demo(family, os.path.join(args.out, family), args)]
    print(f"done in {time.perf_counter() - start:.1f} s")
    if failed:
        raise SystemExit(f"demo check failed for {', '.join(failed)}")


def demo(family: str, out: str, args) -> bool:
    """Steps 1-4 for `family`; True when HF agrees and the round trip is bit-identical."""
    import torch
    import transformers

    from model_port import flax_to_hf, hf_to_flax
    from model_port.safetensors_io import SafetensorsReader
    from vrft_jax import model_dir
    from vrft_jax.data.prompts import detection_problem, in_frame
    from vrft_jax.models import ModelInputs
    from vrft_jax.models.qwen2_vl.processor import ENDOFTEXT_ID, EOS_TOKEN_IDS, load_processor
    from vrft_jax.rewards.frames import Frame, convert_boxes, frame_of
    from vrft_jax.sampling import greedy_generate

    config_class, model_class, _ = (getattr(transformers, n) if i < 2 else n for i, n in enumerate(FAMILIES[family]))
    print(f"== {family}")
    hf_dir, flax_dir, back_dir = (os.path.join(out, n) for n in ("hf_tiny", "flax", "hf_back"))
    torch.manual_seed(0)
    reference = model_class(config_class(**tiny_hf_config(family), attn_implementation="eager")).eval()
    with torch.no_grad():  # randomise norms and biases too: HF's init leaves them at 1 and 0
        for name, p in reference.named_parameters():
            p.add_(0.1 * torch.randn_like(p) if p.ndim == 1 else 0.05 * torch.randn_like(p))
    reference.save_pretrained(hf_dir)
    print(f"[1] random HF {model_class.__name__}: {sum(p.numel() for p in reference.parameters()):,} parameters "
          f"-> {hf_dir}")

    hf_to_flax.main(["hf_to_flax", "--hf", hf_dir, "--out", flax_dir])
    model = model_dir.load_model(flax_dir)
    print(f"[2] loaded the Flax checkpoint back from orbax: family {model.config.family}")

    processor = load_processor(min_pixels=56 * 56, max_pixels=224 * 224, family=family)
    image, box = scene()
    frame = frame_of(family)
    question = in_frame(detection_problem("red square"), frame)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[image], return_tensors="np")
    seen_hw = tuple(int(v) * model.config.vision.patch_size for v in batch["image_grid_thw"][0][1:])
    if frame is Frame.PIXELS:
        box = [round(v) for v in convert_boxes(box, Frame.REL1000, frame, seen_hw)]
    inputs = ModelInputs.from_hf(model.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 batch["image_grid_thw"])
    tick = time.perf_counter()
    tokens = greedy_generate(model, inputs, args.new_tokens, eos_token_ids=EOS_TOKEN_IDS, pad_token_id=ENDOFTEXT_ID)
    seconds = time.perf_counter() - tick
    with torch.no_grad():
        ref = reference.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=args.new_tokens,
                                 do_sample=False, eos_token_id=list(EOS_TOKEN_IDS), pad_token_id=ENDOFTEXT_ID)
    ref = ref[:, batch["input_ids"].shape[1]:].numpy()
    same = ref.shape == tokens.shape and bool((ref == tokens).all())
    print(f"[3] prompt: {batch['input_ids'].shape[1]} tokens ({int(np.prod(batch['image_grid_thw'][0])) // 4} image "
          f"tokens, seen at {seen_hw[0]}x{seen_hw[1]}); ground-truth box in the {frame.value} frame {box}")
    print(f"    greedy ({tokens.shape[1]} tokens, {seconds:.2f} s incl. compile): "
          f"{processor.tokenizer.decode(tokens[0])!r}")
    print(f"    HF generate gives the same tokens: {same}")

    flax_to_hf.main(["flax_to_hf", "--ckpt", flax_dir, "--out", back_dir])
    a, b = SafetensorsReader(hf_dir), SafetensorsReader(back_dir)
    identical = a.names() == b.names() and all(np.array_equal(a.read(n), b.read(n)) for n in a.names())
    print(f"[4] round trip HF -> Flax -> HF: {len(a.names())} tensors, bit-identical: {identical}")
    return same and identical


if __name__ == "__main__":
    main()
