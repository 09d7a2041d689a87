"""Rollout throughput: our group sampler against transformers `generate` on the same model and prompts.

    python benchmarks/rollout.py [--prompts 8] [--group 8] [--new-tokens 128] [--repeats 2]

A tiny Qwen2-VL with the real vocabulary (hidden 256, 4 layers, vocab 151,657) and random weights,
8 Visual-RFT detection prompts with 224x224 images, G = 8 samples each, 128 new tokens, Visual-RFT's
sampling (temperature 1, top-k 50, stop on <|im_end|> / <|endoftext|>). Both run on this machine's
CPU; ours after a warm-up compile, HF after a warm-up call. Prints tokens/s of both, the ratio and
our prefill/decode split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hf_config(vocab: int) -> dict:
    return dict(
        text_config=dict(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(depth=4, embed_dim=128, num_heads=4, hidden_size=256, mlp_ratio=4),
        tie_word_embeddings=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151657)
    args = parser.parse_args(argv)

    import jax
    import torch
    from flax import nnx
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration

    from model_port.hf_to_flax import load_hf
    from vrft_jax import sampling
    from vrft_jax.data.prompts import detection_problem
    from vrft_jax.data.synthetic import render
    from vrft_jax.models.qwen2_vl import ModelInputs
    from vrft_jax.models.qwen2_vl.processor import ENDOFTEXT_ID, EOS_TOKEN_IDS, load_processor

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    reference = Qwen2VLForConditionalGeneration(HFConfig(**hf_config(args.vocab))).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        ours = load_hf(path)

    processor = load_processor(min_pixels=224 * 224, max_pixels=224 * 224)
    categories = ["red square", "dog", "bus", "stop sign", "cat", "train", "bed", "toilet"]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": detection_problem(
        categories[i % len(categories)])}]}] for i in range(args.prompts)]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    images = [render(np.random.default_rng(i), 224, 224, 2)[0] for i in range(args.prompts)]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="np", padding=True)
    inputs = ModelInputs.from_hf(ours.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 batch["image_grid_thw"])
    config = sampling.SamplingConfig(max_new_tokens=args.new_tokens, group_size=args.group, temperature=1.0,
                                     top_k=50, eos_token_ids=EOS_TOKEN_IDS,
                                     pad_token_id=ENDOFTEXT_ID).resolve(ours.config)
    graphdef, state = nnx.split(ours)

    def ours_once(seed):
        t0 = time.perf_counter()
        prefilled = sampling.prefill(graphdef, state, inputs, config)
        jax.block_until_ready(prefilled)
        t1 = time.perf_counter()
        out = sampling.decode(graphdef, state, prefilled, jax.random.key(seed), config)
        lengths = np.asarray(out.lengths)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, int(lengths.sum())

    tick = time.perf_counter()
    ours_once(0)
    compile_seconds = time.perf_counter() - tick
    runs = [ours_once(seed + 1) for seed in range(args.repeats)]
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    ours_tokens = int(statistics.median(r[2] for r in runs))
    ours_tps = ours_tokens / (prefill_s + decode_s)

    torch_inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    prompt_len = batch["input_ids"].shape[1]

    def hf_once(seed):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = reference.generate(**torch_inputs, do_sample=True, num_return_sequences=args.group,
                                     max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, top_p=1.0,
                                     eos_token_id=list(EOS_TOKEN_IDS), pad_token_id=ENDOFTEXT_ID)
        seconds = time.perf_counter() - t0
        completion = out[:, prompt_len:].numpy()
        ended = np.isin(completion, EOS_TOKEN_IDS)
        first = np.where(ended.any(1), ended.argmax(1) + 1, completion.shape[1])
        return seconds, int(first.sum())

    hf_once(0)
    hf_runs = [hf_once(seed + 1) for seed in range(args.repeats)]
    hf_s = statistics.median(r[0] for r in hf_runs)
    hf_tokens = int(statistics.median(r[1] for r in hf_runs))
    hf_tps = hf_tokens / hf_s

    rows = args.prompts * args.group
    print(f"model: hidden 256, 4 layers, vocab {args.vocab:,}; {args.prompts} prompts x G={args.group} = {rows} "
          f"samples; prompt {prompt_len} tokens ({int(np.prod(batch['image_grid_thw'][0])) // 4} image tokens, "
          f"224x224); {args.new_tokens} new tokens; top-k 50, T=1; {os.cpu_count()} CPU cores; median of "
          f"{args.repeats}")
    print(f"{'':24s}{'tokens':>10s}{'seconds':>10s}{'tokens/s':>12s}")
    print(f"{'transformers generate':24s}{hf_tokens:>10d}{hf_s:>10.2f}{hf_tps:>12.1f}")
    print(f"{'vrft_jax rollout':24s}{ours_tokens:>10d}{prefill_s + decode_s:>10.2f}{ours_tps:>12.1f}")
    print(f"ratio (ours / HF tokens per second): {ours_tps / hf_tps:.2f}x")
    print(f"our split: prefill {prefill_s * 1000:.0f} ms (once per prompt: {args.prompts} prompts), decode "
          f"{decode_s * 1000:.0f} ms ({decode_s / args.new_tokens * 1000:.1f} ms per step for {rows} rows); "
          f"first call incl. compile {compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
