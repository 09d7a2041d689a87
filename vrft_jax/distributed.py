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

import atexit
import functools
import json
import os
import selectors
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vrft_jax import sharding
from vrft_jax.cli import UserError

T = TypeVar("T")


LOST_PEER_EXIT_CODE = 75  # EX_TEMPFAIL: a peer process was lost; the same command resumes the run


def initialize() -> bool:
    """Call `jax.distributed.initialize` as the environment asks (module docstring); whether it did.

    A job of several processes then ends them all when one is lost, instead of leaving the others blocked in a
    collective, in orbax's commit or in JAX's shutdown barrier at exit:
    - A process that dies without exiting through Python (SIGKILL, the OOM killer, a segfault, an abort) closes
      its connection to process 0's peer watch (`_PeerWatch`) at once: every other process prints one line
      naming it ("lost peer: process 1 of 2 ...") and exits with LOST_PEER_EXIT_CODE, within about a second.
    - A host that vanishes without closing its connections is caught by the JAX coordination service, when the
      process has sent no heartbeat for `VRFT_HEARTBEAT_TIMEOUT_S` seconds (unset: JAX's default, 100 s, as
      MaxText's): the service aborts every process with a fatal error naming it ("Task 1 heartbeat timeout").
      That message is JAX's: jaxlib 0.10.2 cannot call a Python `missed_heartbeat_callback` (std::bad_cast).
    """
    options = {}
    if text := os.environ.get("VRFT_HEARTBEAT_TIMEOUT_S"):
        try:
            options["heartbeat_timeout_seconds"] = int(text)
        except ValueError:
            raise ValueError(f"VRFT_HEARTBEAT_TIMEOUT_S={text!r} is not an integer") from None
        if options["heartbeat_timeout_seconds"] <= 0:
            raise ValueError(f"VRFT_HEARTBEAT_TIMEOUT_S={text!r} must be positive (seconds)")
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
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], **values, **options)
    elif os.environ.get("VRFT_DISTRIBUTED") == "1":
        jax.distributed.initialize(**options)
    else:
        return False
    _PeerWatch.start()
    return True


class _PeerWatch:
    """One TCP connection from every other process to process 0, watched by a daemon thread on each side: a
    process that dies without exiting through Python closes it without saying "bye" (its kernel closes the
    socket), which the other end sees at once. Process 0 then tells every other process which one was lost, and
    each prints one line naming it and leaves with `os._exit(LOST_PEER_EXIT_CODE)`: from a collective that will
    never complete, from orbax's commit (the step in flight stays unlisted, so the previous one is the latest)
    and from JAX's shutdown barrier, without waiting for the coordination service's heartbeat timeout.

    A clean exit (an error included: every exit through Python's atexit) says "bye" first and is never a loss;
    what a failure that one process raises alone does to the others is `agreed`'s business. When the watch
    cannot be set up (a firewall between the hosts), the run goes on with the heartbeat timeout alone."""

    KEY = "vrft_jax/peer_watch_port"
    CONNECT_TIMEOUT_S = 30  # for process 0 to publish its port, and to connect to it

    def __init__(self, rank: int, count: int):
        self.rank, self.count = rank, count
        self.server: socket.socket | None = None
        self.peers: dict[int, socket.socket] = {}  # process 0: every process connected; the others: {0: its}
        self.orderly: set[int] = set()  # processes that said "bye"

    @classmethod
    def start(cls) -> _PeerWatch | None:
        from jax._src import distributed as jax_distributed  # the client orbax uses too

        state = jax_distributed.global_state
        if state.client is None or state.num_processes < 2:
            return None
        watch = cls(state.process_id, state.num_processes)
        try:
            if watch.rank == 0:
                try:
                    watch.server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
                except OSError:
                    watch.server = socket.create_server(("", 0))
                state.client.key_value_set(cls.KEY, str(watch.server.getsockname()[1]))
            else:
                port = int(state.client.blocking_key_value_get(cls.KEY, cls.CONNECT_TIMEOUT_S * 1000))
                host = state.coordinator_address.rsplit(":", 1)[0].strip("[]")
                connection = socket.create_connection((host, port), timeout=cls.CONNECT_TIMEOUT_S)
                connection.settimeout(None)
                connection.sendall(f"{watch.rank}\n".encode())
                watch.peers[0] = connection
        except Exception as e:  # noqa: BLE001 - the run goes on, with the coordination service's heartbeat alone
            logging.warning("no peer watch (%s: %s): a lost process is noticed by the JAX coordination service's "
                            "heartbeat timeout instead (VRFT_HEARTBEAT_TIMEOUT_S)", type(e).__name__, e)
            return None
        threading.Thread(target=watch._watch, name="vrft-peer-watch", daemon=True).start()
        atexit.register(watch._goodbye)  # after JAX's own atexit, so it runs before JAX's shutdown barrier
        os.register_at_fork(after_in_child=watch._forget)
        return watch

    def _watch(self) -> None:
        selector = selectors.DefaultSelector()
        if self.server is not None:
            selector.register(self.server, selectors.EVENT_READ)
        for rank, connection in self.peers.items():
            selector.register(connection, selectors.EVENT_READ, rank)
        pending: dict[socket.socket, bytes] = {}
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.server:
                    try:
                        connection, _ = self.server.accept()
                    except OSError:
                        continue
                    selector.register(connection, selectors.EVENT_READ, None)  # its rank comes first
                    continue
                connection, rank = key.fileobj, key.data
                try:
                    data = connection.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(connection)
                    if rank is not None and rank not in self.orderly:
                        self._lost(rank)
                    continue
                *lines, pending[connection] = (pending.get(connection, b"") + data).split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace").strip()
                    if rank is None:  # a process joining process 0's watch names itself
                        if not text.isdigit():
                            break
                        rank = int(text)
                        self.peers[rank] = connection
                        selector.modify(connection, selectors.EVENT_READ, rank)
                    elif text == "bye":
                        self.orderly.add(rank)
                    elif text.startswith("lost ") and text[5:].isdigit():
                        self._lost(int(text[5:]), reported_by=rank)

    def _lost(self, rank: int, reported_by: int | None = None) -> None:
        if self.rank == 0:
            for other, connection in list(self.peers.items()):
                if other != rank and other not in self.orderly:
                    try:
                        connection.sendall(f"lost {rank}\n".encode())
                    except OSError:
                        pass
        if reported_by is not None:
            how = f"reported by process {reported_by}"
        else:
            how = "it ended without a clean exit: killed, crashed or its host lost"
            if rank == 0:
                how += "; process 0 also ran the JAX coordination service"
        message = (f"vrft_jax: lost peer: process {rank} of {self.count} stopped ({how}). Process {self.rank} stops "
                   f"too (exit {LOST_PEER_EXIT_CODE}) instead of waiting for it; the same command resumes the run from "
                   f"its last complete checkpoint.\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        os.write(2, message.encode())
        os._exit(LOST_PEER_EXIT_CODE)

    def _goodbye(self) -> None:
        """At a clean exit: tell the other end(s) that this process's end is no loss."""
        for connection in list(self.peers.values()):
            try:
                connection.sendall(b"bye\n")
            except OSError:
                pass

    def _forget(self) -> None:
        """In a forked child: drop the connections, whose copies would otherwise outlive the parent."""
        for connection in [*self.peers.values(), *([self.server] if self.server else [])]:
            try:
                connection.close()
            except OSError:
                pass
        self.peers.clear()


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


class PeerError(UserError, RuntimeError):
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


def from_primary(fn: Callable[..., T], *args, **kwargs) -> T:
    """`on_primary`, and every process gets process 0's value (which `gather_objects` must carry: JSON-able)."""
    value = on_primary(fn, *args, **kwargs)
    return gather_objects(value)[0] if jax.process_count() > 1 else value


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
