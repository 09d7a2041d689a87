"""Supervised fine-tuning on the records' solution text: the paper's SFT baseline, through the same
data, update program, checkpoints and metrics as GRPO.

The SFT loss is one more entry of the GRPO loss registry (`grpo.sft_loss`): the token-mean cross-entropy
of the target completions, `-sum_t m_t lp_t / sum_t m_t`. With it, the GRPO train step (exact gradient
accumulation, micro-batches, sharding, non-finite skips, donated state) is the SFT step: each prompt
has one completion (G = 1), its solution followed by `<|im_end|>`, and there is no reference model,
no advantage and no ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vrft_jax import distributed, grpo
from vrft_jax.grpo_loop import Outcome, RunContext, place
from vrft_jax.progress import Timer
from vrft_jax.train_step import TrainBatch, TrainState


def sft_config() -> grpo.GRPOConfig:
    """The update's GRPO settings in SFT mode: the cross-entropy loss, no KL."""
    return grpo.GRPOConfig(loss="sft", beta=0.0)


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
            raise ValueError(f"SFT target of row {row} has {len(ids)} tokens (with EOS), more than the completion "
                             f"bucket of {length}: raise sampling.max_new_tokens ({solutions[row][:80]!r})")
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    return tokens, mask


def sft_batch(inputs, solutions: Sequence[str], tokenizer, *, length: int, eos_id: int, pad_id: int,
              valid: np.ndarray | None = None) -> TrainBatch:
    """The update's batch for SFT: the prompts, their targets, no advantages (zeros)."""
    tokens, mask = target_tokens(tokenizer, solutions, length, eos_id, pad_id, valid)
    return TrainBatch(inputs, jnp.asarray(tokens), jnp.asarray(mask), jnp.zeros((len(solutions),), jnp.float32))


def iteration(context: RunContext, state: TrainState, batch, timer: Timer, *, log: bool = True
              ) -> tuple[TrainState, Outcome]:
    """One SFT update on the batch's solutions (G = 1, no rollout); the entropy measured when `log`. A target
    too long for the completion bucket stops every process, naming the row, before any enters the update."""
    with timer.timed("update"):
        train_batch = distributed.agreed(
            sft_batch, batch.model_inputs, batch.solution, context.tokenizer, length=context.sampling.max_new_tokens,
            eos_id=context.sampling.eos_token_ids[0], pad_id=context.sampling.pad_token_id,
            valid=batch.meta.get("valid"))
        state, metrics = context.step(state, place(context, train_batch), log)
        jax.block_until_ready(state.step)  # the update's time, not its dispatch's, as a GRPO iteration reports
    return state, Outcome(metrics, {}, [])
