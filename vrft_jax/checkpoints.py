"""Run checkpoints: what a stopped run needs to continue bit for bit, kept by orbax's CheckpointManager.

Each saved step holds three items:

    state    the train state pytree, e.g. {"train": TrainState, "rng": key}: parameters, optimizer state
             (whose count drives the learning-rate schedule: resuming from parameters alone would
             restart the schedule and Adam's moments), update and non-finite counters, the PRNG key.
             Any pytree of arrays; typed PRNG keys are saved as their key data and come back typed.
    data     the Grain iterator's position (`grain.checkpoint.CheckpointSave`), one JSON file per
             process, as each process reads its own shard
    config   the resolved run config (JSON)

Properties of orbax 0.12 that this relies on (read in its sources, proven in tests/test_checkpoints.py):

- Atomic: a step is written under `<step>.orbax-checkpoint-tmp-<time>` and renamed to `<step>` only once
  every item of every process is complete (in a `gs://` bucket, which has no rename, it is written
  under `<step>` and counts only once process 0 has written its `commit_success.txt`). An unfinished
  step is never listed, so a crash mid-save leaves the previous step the latest; a manager opened on
  the directory deletes such leftovers in the background, finished before its first save (orbax
  awaits the clean-up there).
- Async: `save` returns once the arrays are copied off the devices (the next step may donate them) and
  the data position is read; the files are written by a background thread. Call `wait_until_finished()`
  (or `close()`) before the process exits.
- `max_to_keep` older steps are deleted only after a newer one is finalized.
- Multi-process: every process calls `save` and `restore_latest` (they are collective); process 0 alone
  writes the metadata (the manager's, the config's JSON), renames and deletes; each process writes its
  own array shards and its own data file.

Preemption: `PreemptionGuard` turns SIGTERM into a flag the loop reads at a step boundary.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vrft_jax import distributed, storage

STATE, DATA, CONFIG = "state", "data", "config"


def make_manager(directory: str, *, save_interval_steps: int = 1, max_to_keep: int | None = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The run's CheckpointManager on `directory` (created if missing), a local path or a `gs://` URL.

    `save` writes a step when it is a multiple of `save_interval_steps` (and the first step it is given,
    and any step with `force=True`); only the newest `max_to_keep` steps stay (None keeps all).
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(storage.absolute(directory), item_names=tuple(handlers), item_handlers=handlers,
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data: grain.DatasetIterator | None = None, *,
         config: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Save `state`, the position of `data` and `config` as `step`, if the manager's interval says so or
    `force`. Returns whether a save started. The data position is the one after the last batch returned."""
    items = {STATE: ocp.args.StandardSave(_keys_as_data(state))}
    if data is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data)
    if config is not None:
        items[CONFIG] = ocp.args.JsonSave(dict(config))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data: grain.DatasetIterator | None = None) -> tuple[int, Any] | None:
    """(step, state) of the newest complete checkpoint, or None when there is none.

    `abstract_state` has the structure of the saved state, each leaf a `jax.ShapeDtypeStruct` carrying
    the sharding it is to land in (`abstract_state(...)` makes one), so every process reads only its
    own shards and nothing is gathered on one device. `data`, a fresh iterator of the same pipeline, is
    moved to the saved position.
    """
    step = manager.latest_step()
    if step is None:
        return None
    items = {STATE: ocp.args.StandardRestore(_keys_as_data(abstract_state))}
    if data is not None:
        items[DATA] = grain.checkpoint.CheckpointRestore(data)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, _data_as_keys(restored[STATE], abstract_state)


def restore_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any] | None:
    """The config saved with `step` (default: the latest), or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def abstract_state(tree: Any, shardings: Any = None) -> Any:
    """`tree` (arrays, or the ShapeDtypeStructs of `jax.eval_shape`) as ShapeDtypeStructs that carry a
    sharding: from `shardings`, a tree of the same structure (e.g. `train_step.tree_shardings`), or
    else each leaf's own. A leaf without one is an error: a restore must not pick a device for it."""

    def one(x, placement=None):
        placement = getattr(x, "sharding", None) if placement is None else placement
        if placement is None:
            raise ValueError(f"a {x.dtype}{list(x.shape)} leaf has no sharding: pass `shardings`")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement)

    return jax.tree.map(one, tree) if shardings is None else jax.tree.map(one, tree, shardings)


class PreemptionGuard:
    """SIGTERM (a TPU VM's notice before preemption, the launchers' stop, `docker stop`) as a flag read at a
    step boundary, so a run can save and exit 0 rather than die mid-step:

        with PreemptionGuard() as guard:
            for step in range(start, total):
                state = ...one step...
                stop = guard.should_stop(step)
                checkpoints.save(manager, step, state, data, config=config, force=stop)
                if stop:
                    manager.wait_until_finished()
                    sys.exit(0)

    Every process installs the handler. With several processes `should_stop` is a collective (every process
    must ask at every step boundary, as for any collective): it gathers every process's flag and returns
    True on all of them at the first boundary where any one has heard the signal, so they all save the
    same step, whether each host heard the notice at its own time or only one did.

    Not JAX's preemption service (`multihost_utils.reached_preemption_sync_point`). It is on by default
    after `jax.distributed.initialize` on every platform, CPU included, and its C++ handler hears SIGTERM
    there (checked on jax 0.10.2, two CPU processes). But its sync point is one past the largest step any
    process last passed to it (0 before the first call), and it answers True only at exactly that step: a
    notice heard before a resumed run's first step (start S > 0, during compilation or a restore) sets the
    point to 1, which the loop's steps S + 1, S + 2, ... never equal, so the run ignored it and trained to
    the end. The guard's Python handler replaces the service's C++ one while the guard is entered (the
    service then never triggers, and orbax's own `reached_preemption` check stays False); a SIGTERM in the
    moment between `jax.distributed.initialize` and entering the guard still goes to the service.

    A SIGTERM to the whole process group also kills Grain's worker processes. A step in progress still
    ends and saves: the data iterator keeps the next batch ahead (`data.device_prefetch` >= 1) and holds
    a worker's failure until a batch is missing, by which time the flag has stopped the loop. A signal
    that lands while the workers are starting (the first batch of a start or a resume) can instead leave
    the process blocked inside Python's `multiprocessing` spawn (it writes to a child that died, holding
    the pipe's read end itself); there is no step to save yet, and the run is ended by the SIGKILL that
    follows a preemption notice. The launchers signal the training process alone (`launch/`).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._stopping = False

    def __enter__(self) -> PreemptionGuard:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def received(self) -> int | None:
        """The signal this process received, if any."""
        return self._received

    def should_stop(self, step: int) -> bool:
        """Whether the run should save `step` and exit: this process heard the signal, or (with several
        processes) any process did. A collective on several processes: every process asks at every step
        boundary, and all get the same answer. Once True, it stays True."""
        del step  # the same boundary on every process: the processes ask in the same order
        if jax.process_count() == 1:
            self._stopping = self._stopping or self._received is not None
        else:
            heard = distributed.gather_objects(self._received)
            self._stopping = self._stopping or any(signum is not None for signum in heard)
        return self._stopping

    def _handle(self, signum, frame) -> None:
        del frame
        if self._received is None:
            self._received = signum


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
    """Typed PRNG keys (arrays or ShapeDtypeStructs) as their uint32 key data, which orbax can save."""

    def one(x):
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = jax.eval_shape(jax.random.key_data, x).shape
            return jax.ShapeDtypeStruct(shape, jax.numpy.uint32, sharding=x.sharding)
        return jax.random.key_data(x)

    return jax.tree.map(one, tree)


def _data_as_keys(restored: Any, abstract: Any) -> Any:
    return jax.tree.map(lambda a, x: jax.random.wrap_key_data(x, dtype=a.dtype) if _is_key(a) else x,
                        abstract, restored)
