"""The input pipeline: prepared records -> static-shape batches as global arrays on the mesh, resumable.

  records (TFDS ArrayRecord) -> grain.MapDataset -> shuffle(seed), reseeded each epoch -> repeat
  -> shard by process -> encode (chat template, image patches, image-token expansion, M-RoPE ids)
  -> static-shape batches (bad records counted) -> worker processes -> global jax.Arrays

Usage:
    it = make_iterator(DataConfig(path=..., batch_size=8), model_config, mesh=mesh,
                       checkpoint_dir=model_dir)  # tokenize with the checkpoint's own tokenizer files
    batch = next(it)                  # Batch(model_inputs=ModelInputs, meta={...}, skipped={...})
    state = it.get_state()            # JSON-able; save it with the checkpoint
    it.set_state(state)               # later, in a fresh process: the same next batches

The stream is a pure function of the dataset, `DataConfig` (minus pure throughput knobs) and
(process_index, process_count). It does depend on `num_workers` (each worker builds whole batches
from every num_workers-th record), so a state restores only into a pipeline with the same workers;
`set_state` checks this and names any difference.

Grain starts worker processes with "spawn", which re-imports the main module: a script that builds
a pipeline with num_workers > 0 needs the usual `if __name__ == "__main__":` guard.

Worker batches arrive in POSIX shared memory, one segment per array. Grain removes a segment when
the array that maps it is garbage collected, from a background thread that dies with the process, so
segments of batches still alive near exit used to outlive their process until the resource tracker
removed them ("leaked shared_memory objects" warnings). The iterator therefore removes each segment's
name as it receives the batch: the memory stays mapped, and is freed with the last array that uses it
(or with the process, however it ends). `close()` also waits for the removal of the segments that were
still buffered inside Grain.

A finite run (num_epochs set) is cut (drop_remainder) or padded with valid=False rows to whole global
batches, so every process makes the same number of batches. Records skipped in lenient mode are
replaced by the next ones, so a process that skips more may end a finite run a batch early: multi-host
evaluation should run strict, on data that `prepare` has already validated.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

import grain
import grain.multiprocessing
import numpy as np
from jax.sharding import Mesh

from vrft_jax.data import records as rec
from vrft_jax.data import storage
from vrft_jax.data.batching import BatchLayout, StaticBatchDataset
from vrft_jax.data.buckets import resolve_patch_bucket, size_buckets
from vrft_jax.data.config import DataConfig
from vrft_jax.data.preprocess import ExampleEncoder
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.inputs import ModelInputs

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch: what goes to the devices and what stays on the host.

    model_inputs:    `ModelInputs` (global jax.Arrays on the mesh, or NumPy without a mesh), batch-first,
                     static shapes [B, T] / [B, P, D] (see `vrft_jax.data.batching`)
    meta:            host-only columns of this process's B rows (its shard of the global arrays, in
                     order): id, task, label, problem, solution (list[str]); index, image_hw, source_hw,
                     prompt_len, valid (NumPy; see `vrft_jax.data.batching.META_COLUMNS`)
    skipped:         {reason: n} records skipped while this batch was assembled (on_bad_record="skip")
    skipped_records: "where: reason: detail" of each of them
    """

    model_inputs: Any
    meta: dict[str, Any]
    skipped: dict[str, int]
    skipped_records: tuple[str, ...] = ()

    @property
    def solution(self) -> list[str]:
        return self.meta["solution"]


def batch_layout(config: DataConfig, model_config: Qwen2VLConfig, pad_id: int) -> BatchLayout:
    v = model_config.vision
    return BatchLayout(batch_size=config.batch_size, text_len=config.max_prompt_len,
                       patch_bucket=resolve_patch_bucket(config, model_config), patch_dim=v.patch_dim,
                       merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size, pad_id=pad_id,
                       patch_dtype=_dtype(config.patch_dtype), image_stats=model_config.image_stats)


def open_source(config: DataConfig, source=None) -> tuple[Any, str]:
    """(random-access source, its name for errors and state fingerprints)."""
    if source is not None:
        return source, str(getattr(source, "name", type(source).__name__))
    if not config.path:
        raise ValueError("DataConfig.path is empty: give a dataset made by `python -m vrft_jax.data.prepare`")
    directory = storage.dataset_dir(config.path)
    name = "/".join(directory.rstrip(os.sep).split(os.sep)[-2:])  # <name>/<version>: survives moving the data
    return storage.open_split(directory, config.split), f"{name}[{config.split}]"


def build_dataset(config: DataConfig, model_config: Qwen2VLConfig, *, tokenizer=None, source=None,
                  process_index: int | None = None, process_count: int | None = None,
                  checkpoint_dir: str | None = None) -> grain.IterDataset:
    """The Grain pipeline of host batches (dicts of NumPy arrays; `DataIterator` wraps them).

    Args:
      tokenizer, checkpoint_dir: as for `make_iterator`.
      source: a random-access source of record dicts overriding `config.path` (e.g. `storage.InMemorySource`).
      process_index, process_count: this process's shard; default `jax.process_index()/process_count()`.
    """
    tokenizer = _tokenizer(config, tokenizer, checkpoint_dir)
    source, name = open_source(config, source)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"{name} has no records")
    config = size_buckets(config, model_config, tokenizer, source, name)
    process_index, process_count = _process(process_index, process_count)
    encoder = ExampleEncoder(
        tokenizer, model_config, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
        max_prompt_len=config.max_prompt_len, patch_bucket=resolve_patch_bucket(config, model_config),
        on_bad_record=config.on_bad_record, source=name, system_prompt=config.system_prompt,
        problem_prefix=config.problem_prefix, box_frame=config.box_frame)
    ds = grain.MapDataset.source(source).map_with_index(_with_index)  # before the shuffle: the stored index
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(config.num_epochs)
    if config.num_epochs is not None:
        ds = _whole_global_batches(ds, process_count * config.batch_size, config.drop_remainder, name)
    if process_count > 1:
        ds = _ProcessBlocks(ds, process_index, process_count, config.batch_size)
    ds = ds.map(encoder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=max(config.batch_size, config.read_threads)))
    it = StaticBatchDataset(it, batch_layout(config, model_config, _pad_id(tokenizer)),
                            drop_remainder=config.drop_remainder, give_up_after=max(2 * num_records, 100))
    if config.num_workers > 0:
        _allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer))
    return it


def fingerprint(config: DataConfig, model_config: Qwen2VLConfig, source_name: str, num_records: int,
                process_index: int, process_count: int) -> dict[str, Any]:
    """What decides the stream; a saved state only restores into a pipeline with the same values."""
    keys = ("split", "batch_size", "max_prompt_len", "min_pixels", "max_pixels", "seed", "shuffle", "num_epochs",
            "num_workers", "on_bad_record", "drop_remainder", "system_prompt", "problem_prefix")
    values = {k: getattr(config, k) for k in keys}
    values.update(source=source_name, records=num_records, patch_bucket=resolve_patch_bucket(config, model_config),
                  process_index=process_index, process_count=process_count)
    return values


class DataIterator(grain.DatasetIterator):
    """Batches with their `ModelInputs` as global arrays on `mesh` (batch over the rules' "batch" axes).

    Without a mesh the inputs stay NumPy. `get_state()` is JSON-able and describes the position after
    the last batch returned (batches already sent ahead to the devices are not counted), together with
    the running total of skipped records, `skipped`. Being a Grain `DatasetIterator`, it checkpoints
    with Orbax through `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`: one JSON file
    per process, as each process has its own shard and position.
    """

    def __init__(self, dataset: grain.IterDataset, *, fingerprint: Mapping[str, Any], mesh=None,
                 device_prefetch: int = 1, rules=None):
        iterator = iter(dataset)
        super().__init__(iterator)
        self._iterator = iterator
        self._fingerprint = dict(fingerprint)
        self._mesh, self._rules, self._device_prefetch = mesh, rules, device_prefetch
        self._ahead: collections.deque = collections.deque()
        self._failure: Exception | None = None
        self._batches = 0
        self._skipped: dict[str, int] = {}
        self._position = self._iterator.get_state()
        self._shardings: dict[int, Any] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far ({reason: n}) over all batches returned, across restarts."""
        return dict(self._skipped)

    @property
    def batches(self) -> int:
        return self._batches

    def __next__(self) -> Batch:
        self._assert_not_closed()
        while self._failure is None and len(self._ahead) <= self._device_prefetch:
            try:
                host = next(self._iterator)
            except StopIteration:
                break
            except Exception as e:  # e.g. a BadRecordError: raised at its own batch, after those before it
                self._failure = e
                break
            self._ahead.append((self._to_batch(host), self._iterator.get_state()))
        if not self._ahead:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            raise StopIteration
        batch, self._position = self._ahead.popleft()
        self._batches += 1
        for reason, n in batch.skipped.items():
            self._skipped[reason] = self._skipped.get(reason, 0) + n
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint, "batches": self._batches,
                "skipped": dict(self._skipped), "pipeline": self._position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = dict(state["fingerprint"])
        differences = {k: (saved.get(k), self._fingerprint.get(k)) for k in sorted(set(saved) | set(self._fingerprint))
                       if saved.get(k) != self._fingerprint.get(k)}
        if differences:
            raise ValueError("the data iterator state was saved by a different pipeline; (saved, now) differ in: "
                             + ", ".join(f"{k}={v}" for k, v in differences.items()))
        self._ahead.clear()
        self._failure = None
        self._iterator.set_state(state["pipeline"])
        self._position = state["pipeline"]
        self._batches = int(state["batches"])
        self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}

    def close(self) -> None:
        """Stop the worker processes (they also stop when the iterator is garbage collected).

        Returns once the shared-memory segments of batches that were still buffered are removed.
        """
        self._ahead.clear()
        super().close()
        _wait_for_shared_memory_removal()

    def __del__(self) -> None:
        # Collection can run on any thread, Grain's segment-removing one included: close, but never wait.
        if hasattr(self, "_ahead"):
            self._ahead.clear()
            super().close()

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _to_batch(self, host: dict[str, Any]) -> Batch:
        _unlink_shared_memory(host)
        arrays = host["inputs"]
        if self._mesh is not None:
            arrays = {name: self._to_global(value) for name, value in arrays.items()}
        return Batch(model_inputs=ModelInputs(**arrays), meta=host["meta"], skipped=dict(host["skipped"]),
                     skipped_records=tuple(host["skipped_records"]))

    def _to_global(self, local: np.ndarray):
        import jax

        from vrft_jax import sharding

        if local.ndim not in self._shardings:
            rules = sharding.DEFAULT_RULES if self._rules is None else self._rules
            self._shardings[local.ndim] = sharding.batch_sharding(self._mesh, local.ndim, rules=rules)
        try:
            return jax.make_array_from_process_local_data(self._shardings[local.ndim], np.asarray(local))
        except ValueError as e:
            raise ValueError(f"a local batch of {local.shape[0]} rows does not split over this process's devices "
                             f"of mesh {dict(self._mesh.shape)}: make DataConfig.batch_size a multiple of the "
                             f"batch shards per process ({e})") from e


def make_iterator(config: DataConfig, model_config: Qwen2VLConfig, *, mesh: Mesh | None = None, tokenizer=None,
                  source=None, process_index: int | None = None, process_count: int | None = None,
                  rules=None, checkpoint_dir: str | None = None) -> DataIterator:
    """The pipeline of `config` as a resumable iterator of `Batch`es (see the module docstring).

    Args:
      model_config: gives the vision geometry (patch, merge, temporal sizes) and the image token id.
      mesh: place `model_inputs` on it as global arrays, batch over the rules' "batch" axes
        (("data", "fsdp") by default); None keeps NumPy.
      tokenizer: default: `config.tokenizer_path`, else the tokenizer files of `checkpoint_dir`, else the
        packaged one (`vrft_jax.models.qwen2_vl.tokenizer.resolve_tokenizer_path`).
      checkpoint_dir: the model checkpoint the batches are for (a `vrft_jax.checkpoint` or HF directory).
      source: a random-access source of record dicts instead of `config.path` (`storage.InMemorySource`).
      process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
      rules: the logical-axis rules table of `vrft_jax.sharding` (default DEFAULT_RULES).
    """
    tokenizer = _tokenizer(config, tokenizer, checkpoint_dir)
    process_index, process_count = _process(process_index, process_count)
    opened, name = open_source(config, source)
    if len(opened) == 0:
        raise ValueError(f"{name} has no records")
    config = size_buckets(config, model_config, tokenizer, opened, name)  # once: build_dataset gets fixed ones
    dataset = build_dataset(config, model_config, tokenizer=tokenizer, source=opened,
                            process_index=process_index, process_count=process_count)
    return DataIterator(dataset, mesh=mesh, device_prefetch=config.device_prefetch, rules=rules,
                        fingerprint=fingerprint(config, model_config, name, len(opened), process_index, process_count))


def _whole_global_batches(ds: grain.MapDataset, step: int, drop_remainder: bool, name: str) -> grain.MapDataset:
    """A finite stream cut (drop_remainder) or padded with PADDING to a multiple of the global batch, so
    every process gets as many items, and so as many batches (unless lenient skipping unbalances them)."""
    total = len(ds)
    if drop_remainder:
        if total < step:
            raise ValueError(f"{name}: a run of {total} records is less than one global batch of {step}; "
                             "set drop_remainder=False to pad it")
        return ds[:total - total % step]
    return _PadToLength(ds, -(-total // step) * step)


class _ProcessBlocks(grain.MapDataset):
    """Process `index`'s share of a stream read in global batches of `count * batch` items: the `index`-th
    block of `batch` items of each. The global batch the processes assemble (`_to_global`, process order) is
    then the one a single process reading the stream would make, item for item."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, batch: int):
        super().__init__(parent)
        self._index, self._count, self._batch = index, count, batch

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, offset = divmod(index, self._batch)
        return self._parent[(step * self._count + self._index) * self._batch + offset]

    def __str__(self) -> str:
        return f"_ProcessBlocks(index={self._index}, count={self._count}, batch={self._batch})"


class _PadToLength(grain.MapDataset):
    """The parent's items, then PADDING up to `length`."""

    def __init__(self, parent: grain.MapDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index] if index < len(self._parent) else rec.PADDING

    def __str__(self) -> str:
        return f"_PadToLength(length={self._length})"


def _with_index(index: int, record: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]]:
    return index, record


def _tokenizer(config: DataConfig, tokenizer, checkpoint_dir: str | None):
    if tokenizer is not None:
        return tokenizer
    from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer, resolve_tokenizer_path

    return load_tokenizer(resolve_tokenizer_path(config.tokenizer_path, checkpoint_dir))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (Qwen2-VL pads with <|endoftext|>)")
    return int(tokenizer.pad_token_id)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _unlink_shared_memory(tree: Any) -> None:
    """Remove the names of the shared-memory segments behind the arrays of a batch from the workers.

    Only segments this process must remove (Grain marks them `unlink_on_del`): unlinking now instead
    of when the array is collected. The mappings stay valid; the memory goes with the last of them.
    """
    if isinstance(tree, Mapping):
        for value in tree.values():
            _unlink_shared_memory(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _unlink_shared_memory(value)
    elif isinstance(tree, grain.multiprocessing.SharedMemoryArray) and getattr(tree, "_unlink_on_del", False):
        tree._unlink_on_del = False  # Grain's __del__ now only closes the mapping
        tree.shm.unlink()


def _wait_for_shared_memory_removal() -> None:
    """Wait until Grain's background thread has removed every segment whose array was collected.

    Grain closes and unlinks collected arrays on a one-thread pool, in order, so a no-op task queued
    after them finishes after they do. Without this, a program that ends right after `close()` ends
    before that thread has removed the segments of the batches Grain still held.
    """
    pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None and not sys.is_finalizing():
        pool.apply(int)


def _allow_grain_workers() -> None:
    # Grain's worker processes read absl flags; a program that never parsed them (pytest, notebooks, a
    # trainer with its own argument parser) must mark them parsed first (environment.md §4).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
