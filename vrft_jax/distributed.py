"""Joining the other processes of a multi-host run (a TPU pod slice, several GPU hosts), or nothing on one host.

The launchers say which (`launch/tpu_pod.sh`, `launch/gpu.sh`):
  VRFT_DISTRIBUTED=1                   jax.distributed.initialize() finds the others itself (Cloud TPU's
                                       metadata, Slurm, Open MPI, Kubernetes)
  JAX_COORDINATOR_ADDRESS=host:port    with VRFT_NUM_PROCESSES and VRFT_PROCESS_ID: this process's place
                                       in a job of several (GPU hosts, or processes on one machine)
Neither set: one process, which needs no coordinator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def initialize() -> bool:
    """Call `jax.distributed.initialize` as the environment asks (module docstring); whether it did."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        values = {}
        for name, key in (("num_processes", "VRFT_NUM_PROCESSES"), ("process_id", "VRFT_PROCESS_ID")):
            text = os.environ.get(key)
            if text is None:
                raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {key} is not: every process needs its "
                                 "place in the job (launch/gpu.sh sets both)")
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"{key}={text!r} is not an integer") from None
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], **values)
        return True
    if os.environ.get("VRFT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


# ------------------------------------------------------------------------------------- across processes


def gather_objects(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)]


class PeerError(RuntimeError):
    """Another process of the run failed; its error is in the message. This one stops too, instead of waiting
    forever in a collective the failed process will never join."""


def agreed(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on every process, with its failure agreed by all: when any process's call raises,
    every process raises, that one its own error and the others a PeerError naming it. A collective (every
    process must call it at the same point); on one process it is the plain call."""
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    error, value = None, None
    try:
        value = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
        error = e
    failures = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(i, message) for i, message in enumerate(failures) if message is not None]
    if failed:
        raise PeerError("; ".join(f"process {i} failed: {message}" for i, message in failed))
    return value
