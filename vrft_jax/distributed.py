"""Joining the other processes of a multi-host run (a TPU pod slice, several GPU hosts), and the host <->
global-array plumbing every multi-process phase shares: gathering host values, this process's rows of a
global array, rows pinned to the batch layout, and errors agreed by every process before anyone enters a
collective. On one process each is the plain local operation.

The launchers say which (`launch/tpu_pod.sh`, `launch/gpu.sh`):
  VRFT_DISTRIBUTED=1                   jax.distributed.initialize() finds the others itself (Cloud TPU's
                                       metadata, Slurm, Open MPI, Kubernetes)
  JAX_COORDINATOR_ADDRESS=host:port    with VRFT_NUM_PROCESSES and VRFT_PROCESS_ID: this process's place
                                       in a job of several (GPU hosts, or processes on one machine)
Neither set: one process, which needs no coordinator.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from vrft_jax import sharding

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
        error.vrft_agreed = True
        raise error
    failed = [(i, message) for i, message in enumerate(failures) if message is not None]
    if failed:
        peer = PeerError("; ".join(f"process {i} failed: {message}" for i, message in failed))
        peer.vrft_agreed = True
        raise peer
    return value


def is_agreed(error: BaseException) -> bool:
    """Whether every process raised `error` (or a PeerError for it) at the same point (`agreed`): then they can
    all still meet in a collective, e.g. to finish a checkpoint in flight."""
    return getattr(error, "vrft_agreed", False)


def on_primary(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """`fn(*args, **kwargs)` on process 0 only (a file write, a conversion), its failure agreed by every
    process (`agreed`), which also makes it a barrier: no process goes on before process 0 is done. Process 0
    gets the value, the others None."""
    return agreed(lambda: fn(*args, **kwargs) if jax.process_index() == 0 else None)


# ----------------------------------------------------------------------------------- host <-> global rows


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-row host array, in global row order (a collective; itself on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])


def to_global(mesh, local: np.ndarray) -> jax.Array:
    """A per-row host array of this process's rows as the global array the devices use (rows over the mesh's
    batch axes, each process contributing its block in process order); the array itself without a mesh."""
    if mesh is None:
        return jnp.asarray(local)
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim), local)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array, as NumPy in global order: every row on one process; across
    processes the rows of its addressable shards (each row once, whichever devices replicate it)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)])


def pin_rows(tree, mesh):
    """`tree` (arrays with a leading row axis) with its rows split over the mesh's batch axes, as the batch's
    prompts are: each process's devices then hold the rows of its own prompts (a no-op when they already do).
    One jitted identity per (mesh, tree structure, ranks), compiled once."""
    leaves, treedef = jax.tree.flatten(tree)
    return _row_pinner(mesh, treedef, tuple(x.ndim for x in leaves))(tree)


@functools.cache
def _row_pinner(mesh, treedef, ranks: tuple[int, ...]):
    layouts = jax.tree.unflatten(treedef, [sharding.batch_sharding(mesh, rank) for rank in ranks])
    return jax.jit(lambda tree: tree, out_shardings=layouts)
