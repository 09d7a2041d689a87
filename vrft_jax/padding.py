"""The host-side check that prompts are left-padded, shared by the sampler, the scorer and the update.

Each reads each prompt's last token from slot T - 1 (the sampler continues it, the scorer and the
update predict the first completion token from it), so a prompt whose last slot is padding would be
continued, or scored, from a pad token: wrong numbers, no error. None can check inside its compiled
program without a host round trip per call, so the check runs on the host before dispatch
(`LeftPaddedBatch` wraps a jitted batch program with it).

A row of padding only (a finite stream's filler at its end, `valid=False`) is not an error: nothing is
continued or scored from it that anyone reads. The model computes finite values for it (a query
whose every key is masked attends uniformly), the real rows never see it, and the loop keeps its
tokens out of rewards, metrics and the update (review H2).

A device mask is read once: a `jax.Array` is immutable, so one that passed is remembered (weakly,
by identity) and the rollout, the scoring and the updates of the same prompts pay for one read
between them (review L6). A NumPy mask is read every time (no device sync, and it may be mutated).
"""

from __future__ import annotations

import weakref

import jax
import numpy as np

from vrft_jax import distributed
from vrft_jax.models.qwen2_vl.inputs import InputError, ModelInputs

# id -> a device mask that passed; an entry goes when its array does, so a reused id never matches.
_PASSED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def check_left_padded(inputs: ModelInputs, what: str = "generation") -> None:
    """InputError naming the rows that hold tokens but end in padding (`what` names the caller in the
    message); rows of padding only pass.

    Each process reads only its own shards of the mask (the layouts never split the length axis: a shard
    holds whole rows); on several processes the rows found are gathered, so every process raises the same
    error naming them, before any enters the program's collectives.
    Needs a concrete mask: under a trace, check the concrete batch before calling the jitted function.
    """
    mask = inputs.attention_mask
    if isinstance(mask, jax.core.Tracer):
        raise TypeError(f"check_left_padded needs a concrete attention mask, got a tracer {mask}")
    device = isinstance(mask, jax.Array)
    bad = []
    if not (device and _PASSED.get(id(mask)) is mask):
        if device:
            pieces = [(shard.index[0].start or 0, np.asarray(shard.data)) for shard in mask.addressable_shards
                      if shard.index[1].stop in (None, mask.shape[1])]
        else:
            pieces = [(0, np.asarray(mask))]
        bad = sorted({start + int(i) for start, rows in pieces
                      for i in np.flatnonzero((rows[:, -1] == 0) & rows.any(axis=1))})
    if jax.process_count() > 1:
        # Agreed by every process, every call (a cache hit on one process alone must not skip the collective):
        # a process that found bad rows must not stop while the others enter the program's collectives.
        bad = sorted({row for rows in distributed.gather_objects(bad) for row in rows})
    if bad:
        raise InputError(f"{what} needs left-padded prompts: rows {bad} end in padding")
    if device:
        _PASSED[id(mask)] = mask


class LeftPaddedBatch:
    """A jitted `(x, batch, ...) -> ...` (the update's or the scorer's; `batch.inputs` the prompts) that checks,
    on the host and before dispatch, that the batch's prompts are left-padded: inside the program the
    mask is a tracer. Attributes (`lower`, `trace`, `_cache_size`, ...) are the jitted function's, and
    do not check."""

    def __init__(self, jitted, what: str):
        self.jitted = jitted
        self.what = what

    def __call__(self, first, batch, *rest):
        check_left_padded(batch.inputs, self.what)
        return self.jitted(first, batch, *rest)

    def __getattr__(self, name):  # only for names the instance lacks
        if name == "jitted":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.jitted, name)
