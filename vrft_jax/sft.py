"""Supervised fine-tuning on the records' solution text: the paper's SFT baseline, through the same
data, update program, checkpoints and metrics as GRPO.

The SFT loss is one more entry of the GRPO loss registry (`grpo.sft_loss`): the token-mean cross-entropy
of the target completions, `-sum_t m_t lp_t / sum_t m_t`. With it, the GRPO train step (exact gradient
accumulation, micro-batches, sharding, non-finite skips, donated state) is the SFT step: each prompt
has one completion (G = 1), its solution followed by `<|im_end|>`, and there is no reference model,
no advantage and no ratio.

The run is the recipe's `sft` block (`run_config`): the paper's baseline had its own optimizer and batch
(LLaMA-Factory: warmup 100, weight decay 0.1, 64 samples per step), which GRPO's (lr 1e-6, 16 prompts) is
not. The target bucket, the completion length of the update, is sized from the training split before
the first step (`target_bucket`), as the prompt buckets are: a record whose target is over
`sft.max_target_len` is named then, not met mid-run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from vrft_jax import distributed, grpo
from vrft_jax.data.buckets import MULTIPLE
from vrft_jax.data.storage import field_text
from vrft_jax.grpo_loop import Outcome, RunContext, place
from vrft_jax.progress import Timer
from vrft_jax.rewards.frames import answer_in_frame, frame_of
from vrft_jax.train_step import TrainBatch, TrainState


def sft_config() -> grpo.GRPOConfig:
    """The update's GRPO settings in SFT mode: the cross-entropy loss, no KL."""
    return grpo.GRPOConfig(loss="sft", beta=0.0)


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The recipe as its SFT run: the `sft` block's optimizer and batch where the run reads them (the `train`
    block, `prompts_per_step`), the learning rate warming up over `sft.warmup_steps` and decaying linearly to
    0 over the rest of `total_steps`, the cross-entropy at temperature 1. What the run saves as its config.json,
    so the numbers it trained with are the ones it shows. Idempotent: the view of a view is itself."""
    if "sft" not in config:
        raise KeyError("mode='sft' reads the recipe's sft block, which it lacks (start from "
                       "vrft_jax.configs._common.base_config)")
    view = ml_collections.ConfigDict(config.to_dict())
    block = view.sft
    view.mode = "sft"
    view.prompts_per_step = block.samples_per_step
    view.train.learning_rate = block.learning_rate
    view.train.warmup_steps = block.warmup_steps
    view.train.decay_steps = max(view.total_steps - block.warmup_steps, 1)  # 1: a run that ends in its warmup
    view.train.weight_decay = block.weight_decay
    view.train.micro_batches = block.micro_batches
    # The cross-entropy of the model's own distribution: the sampler's temperature is GRPO's (a recipe sampling
    # at 0.7 would otherwise train logits / 0.7 on the targets). Every path of the shared value, as the recipe
    # checks that they agree.
    view.temperature = view.sampling.temperature = view.train.temperature = 1.0
    view.lora.rank = block.lora_rank
    view.lora.alpha = block.lora_alpha
    return view


def target_lengths(tokenizer, solutions: Sequence[str]) -> np.ndarray:
    """int64[N]: each solution's target length in tokens, EOS included (what `target_tokens` lays out)."""
    encoded = tokenizer(list(solutions), add_special_tokens=False)["input_ids"]
    return np.asarray([len(ids) + 1 for ids in encoded], np.int64)


def targets(solutions: Sequence[str], frame: str, stored: str, image_hw) -> list[str]:
    """The answers a model writing boxes in `frame` is taught: each stored solution (boxes in `stored`) with its
    boxes rewritten for the image the model sees at image_hw[row] = (height, width) (`frames.answer_in_frame`)."""
    if frame_of(frame) is frame_of(stored):
        return list(solutions)
    return [answer_in_frame(text, stored, frame, hw) for text, hw in zip(solutions, np.asarray(image_hw))]


def largest_side(max_pixels: int) -> int:
    """A bound on either side of a resized image within `max_pixels`: `smart_resize` refuses an aspect ratio
    over 200, so a side is at most sqrt(200 * max_pixels)."""
    return math.isqrt(200 * max_pixels) + 1


def target_bucket(tokenizer, source, limit: int, name: str = "data", *, frame: str = "rel1000",
                  stored: str = "rel1000", max_pixels: int = 401408) -> int:
    """The target bucket L of an SFT run over `source` (records with a `solution`): the smallest multiple of
    `MULTIPLE` that holds every record's solution and EOS, at most `limit`. Measured once, before the first
    batch, as `data.buckets` sizes the prompt buckets; a record over the limit is an error naming it (index,
    id, tokens), since a truncated answer would teach the model to stop mid-answer. An error whatever
    `data.on_bad_record` says: the pipeline does not know the bucket, so it cannot skip such a record.

    A target in another frame than the stored answers' (Qwen2.5-VL's pixels) is measured with its boxes written
    for the largest image the pixel budget allows (`largest_side`): the longest its numbers can be."""
    if limit < 1:
        raise ValueError(f"sft.max_target_len={limit} must be >= 1")
    if len(source) == 0:
        raise ValueError(f"{name} has no records")
    start = time.perf_counter()
    solutions = [str(field_text(source[index]["solution"])) for index in range(len(source))]
    side = largest_side(max_pixels)
    lengths = target_lengths(tokenizer, targets(solutions, frame, stored, [(side, side)] * len(solutions)))
    over = np.flatnonzero(lengths > limit)
    if over.size:
        named = ", ".join(f"record {i} (id {str(field_text(source[int(i)].get('id', '?')))!r}) {lengths[i]} tokens"
                          for i in over[:10])
        raise ValueError(f"{over.size} record(s) of {name} have SFT targets (solution + EOS) over "
                         f"sft.max_target_len={limit} tokens: {named}{' ...' if over.size > 10 else ''}; raise "
                         f"sft.max_target_len or remove them from the dataset")
    bucket = min(limit, -(-int(lengths.max()) // MULTIPLE) * MULTIPLE)
    logging.info("SFT target bucket of %s from its %d records (%.1f s): median %d, max %d tokens -> %d (limit %d)",
                 name, len(lengths), time.perf_counter() - start, int(np.median(lengths)), int(lengths.max()),
                 bucket, limit)
    return bucket


def target_tokens(tokenizer, solutions: Sequence[str], length: int, eos_id: int, pad_id: int,
                  valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int32[B, L] tokens, int32[B, L] mask): each solution's tokens then `eos_id`, padded with `pad_id`.
    Rows with `valid=False` (padding) get an empty mask. A target longer than `length` is an error
    naming the row: a truncated answer would teach the model to stop mid-answer."""
    rows = len(solutions)
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    encoded = tokenizer(list(solutions), add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(encoded):
        if valid is not None and not valid[row]:
            continue
        ids = list(ids) + [eos_id]
        if len(ids) > length:
            raise ValueError(f"SFT target of row {row} has {len(ids)} tokens (with EOS), more than the target "
                             f"bucket of {length} ({solutions[row][:80]!r})")
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    return tokens, mask


def sft_batch(inputs, solutions: Sequence[str], tokenizer, *, length: int, eos_id: int, pad_id: int,
              valid: np.ndarray | None = None, mesh=None) -> TrainBatch:
    """The update's batch for SFT: the prompts, their targets, no advantages (zeros). `solutions` are this
    process's rows; on a mesh the targets are global arrays whose rows every process contributes, as the
    prompts are (`distributed.to_global`)."""
    tokens, mask = target_tokens(tokenizer, solutions, length, eos_id, pad_id, valid)
    advantages = np.zeros((len(solutions),), np.float32)
    return TrainBatch(inputs, *(distributed.to_global(mesh, x) for x in (tokens, mask, advantages)))


def iteration(context: RunContext, state: TrainState, batch, timer: Timer, *, length: int, log: bool = True
              ) -> tuple[TrainState, Outcome]:
    """One SFT update on the batch's solutions (G = 1, no rollout), their targets `length` tokens long
    (`target_bucket`); the entropy measured when `log`. A target that does not fit (a dataset changed under
    a run) stops every process, naming the row, before any enters the update."""
    with timer.timed("update"):
        train_batch = distributed.agreed(
            sft_batch, batch.model_inputs,
            targets(batch.solution, context.box_frame, context.solution_frame, batch.meta["image_hw"]),
            context.tokenizer, length=length,
            eos_id=context.sampling.eos_token_ids[0], pad_id=context.sampling.pad_token_id,
            valid=batch.meta.get("valid"), mesh=context.mesh)
        state, metrics = context.step(state, place(context, train_batch), log)
        jax.block_until_ready(state.step)  # the update's time, not its dispatch's, as a GRPO iteration reports
    return state, Outcome(metrics, {}, [])
