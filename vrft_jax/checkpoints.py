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
  every item of every process is complete. An unrenamed directory is never listed, so a crash mid-save
  leaves the previous step the latest; a manager opened on the directory deletes such leftovers in the
  background, finished before its first save (orbax awaits the clean-up there).
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

import os
import signal
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


def make_manager(directory: str, *, save_interval_steps: int = 1, max_to_keep: int | None = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The run's CheckpointManager on `directory` (created if missing).

    `save` writes a step when it is a multiple of `save_interval_steps` (and the first step it is given,
    and any step with `force=True`); only the newest `max_to_keep` steps stay (None keeps all).
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), item_names=tuple(handlers), item_handlers=handlers,
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
    """SIGTERM (a TPU VM's notice before preemption) as a flag read at a step boundary, so a run can
    save and exit 0 rather than die mid-step:

        with PreemptionGuard() as guard:
            for step in range(start, total):
                state = ...one step...
                stop = guard.should_stop(step)
                checkpoints.save(manager, step, state, data, config=config, force=stop)
                if stop:
                    manager.wait_until_finished()
                    sys.exit(0)

    With several processes, a signal-handler flag is not enough: each host hears the notice at its own
    time, and one that stops alone leaves the others waiting in a collective. There JAX's preemption
    service (`jax.distributed.initialize`, `jax_enable_preemption_service`, on by default on TPU) hears
    SIGTERM itself and `multihost_utils.reached_preemption_sync_point(step)` returns True on every host
    at the same step; the guard asks it (every process, every step) and installs no handler, which would
    take the signal from the service. Without that service a multi-process run is not guarded.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._received: int | None = None

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() == 1:
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def received(self) -> int | None:
        """The signal received, if any (single process)."""
        return self._received

    def should_stop(self, step: int) -> bool:
        """Whether the run should save `step` and exit; every process must ask at every step."""
        if self._previous or jax.process_count() == 1:
            return self._received is not None
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off
            return False

    def _handle(self, signum, frame) -> None:
        del frame
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
