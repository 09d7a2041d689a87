"""TRL 1.16's GRPOTrainer as the reference, on fixed completions and rewards.

A tiny random Qwen2-VL whose vocabulary is a small trained BPE (its special tokens at the ids the
model's config names), the image-only Qwen2-VL processor, and a GRPOTrainer subclass whose generation
returns our completions. TRL then does everything else its own way: chat template, image
processing, prompt padding, completion masks, reward scaling, the reference model's logprobs and the
loss of each `loss_type`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2TokenizerFast

from hf_reference import Tiny, image, image_processor
from tiny_tokenizer import tiny_bpe_tokenizer
from vrft_jax.models.qwen2_vl.processor import CHAT_TEMPLATE, SPECIAL_TOKENS, ImageOnlyQwen2VLProcessor

_CORPUS = [
    "Where is the cat? The cat sits on the mat, left of the red box.",
    "<think> The plane is a Boeing. </think><answer> Boeing 717 </answer>",
    "Outline the position of each object and output all coordinates in JSON format.",
    '[{"Position": [120, 40, 388, 411], "Confidence": 0.92}]',
]


def tiny_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE of a few hundred tokens, Qwen2-VL's 14 special tokens appended in Qwen's order."""
    tokenizer = tiny_bpe_tokenizer(_CORPUS * 4, 400)
    # TRL pads prompt ids on the left itself but takes `mm_token_type_ids` from the processor: with a
    # right-padding tokenizer the image positions of shorter prompts shift (huggingface/trl#5785).
    tokenizer.padding_side = "left"
    return tokenizer


def processor(tokenizer) -> ImageOnlyQwen2VLProcessor:
    return ImageOnlyQwen2VLProcessor(image_processor(), tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer, vocab_size: int = 512) -> Tiny:
    """A GQA Qwen2-VL whose special-token ids are the tokenizer's."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert max(ids.values()) < vocab_size
    return Tiny("trl_bpe", dict(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=False))


def dataset_rows(questions, image_sizes, group_size: int) -> list[dict]:
    """B*G conversational rows as TRL's repeat sampler feeds them: each prompt G times in a row."""
    rows = []
    for b, (question, (height, width)) in enumerate(zip(questions, image_sizes)):
        for _ in range(group_size):
            content = [{"type": "image"}, {"type": "text", "text": question}]
            rows.append({"prompt": [{"role": "user", "content": content}],
                         "image": image(height, width, seed=b), "row": len(rows)})
    return rows


def random_completions(rng, rows: int, max_length: int, vocab: int, eos: int) -> list[list[int]]:
    """Token lists as TRL's generation leaves them: cut after the first EOS; some stop at the limit."""
    out = []
    for i in range(rows):
        n = int(rng.integers(1, max_length + 1))
        tokens = [int(t) for t in rng.integers(3, vocab, n)]
        if n < max_length or i % 3 == 0:
            tokens[-1] = eos
        out.append(tokens)
    return out


def make_trainer(path, tokenizer, rows, completions, rewards, **config):
    """A GRPOTrainer on the checkpoint at `path` whose generation returns `completions` and whose one
    reward function returns `rewards[row]`."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    class FixedCompletionsTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            assert len(prompt_ids) == len(completions)
            return [list(c) for c in completions], None

    def fixed_reward(completions, row, **kwargs):
        return [float(rewards[r]) for r in row]

    args = GRPOConfig(output_dir=str(path) + "_trl", per_device_train_batch_size=len(rows), report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=0, logging_steps=1, **config)
    trainer = FixedCompletionsTrainer(model=str(path), reward_funcs=[fixed_reward], args=args,
                                      train_dataset=datasets.Dataset.from_list(rows),
                                      processing_class=processor(tokenizer))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call the loss directly
    return trainer


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    with torch.no_grad():
        for (name, p), (other, q) in zip(source.named_parameters(), target.named_parameters(), strict=True):
            assert name == other, (name, other)
            q.copy_(p)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every parameter by `scale` times its own spread: a policy some updates away from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = p.std() if p.numel() > 1 else p.abs()
            p.add_(scale * spread * torch.randn(p.shape, generator=generator))


def prompt_rows(trl_inputs, group_size: int) -> dict:
    """One row per prompt (TRL repeats each G times) in HF processor form, for `ModelInputs.from_hf`."""
    ids = trl_inputs["prompt_ids"].numpy()[::group_size]
    mask = trl_inputs["prompt_mask"].numpy()[::group_size]
    grids = trl_inputs["image_grid_thw"].numpy()
    images = np.split(trl_inputs["pixel_values"].numpy(), np.cumsum(grids.prod(axis=1))[:-1])
    assert trl_inputs["num_images"] == [1] * len(grids)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=np.concatenate(images[::group_size]),
                image_grid_thw=grids[::group_size])
