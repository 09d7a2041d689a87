"""Read and write Hugging Face safetensors checkpoints one tensor at a time.

Reading memory-maps each file and materialises only the tensor asked for. Writing fills one shard
file at a time; a checkpoint of several shards gets the hub's `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vrft_jax.cli import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}


class CheckpointFormatError(UserError, ValueError):
    pass


class SafetensorsReader:
    """Every tensor of a single-file or sharded (index JSON) safetensors checkpoint, by name."""

    def __init__(self, path: str, rename=lambda name: name):
        self.path = path
        if os.path.isfile(path):
            files = [path]
        elif os.path.exists(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, name) for name in weight_map.values()})
        else:
            files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise CheckpointFormatError(f"no .safetensors files in {path}")
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}
        for file in files:
            if not os.path.exists(file):
                raise CheckpointFormatError(f"{INDEX_FILE} in {path} names {os.path.basename(file)}, which is missing")
            handle = safe_open(file, framework="np")
            self._handles[file] = handle
            for original in handle.keys():
                name = rename(original)
                if name in self._where:
                    raise CheckpointFormatError(
                        f"tensor {name!r} is stored twice ({self._where[name][1]!r} and {original!r})")
                self._where[name] = (file, original)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, original = self._where[name]
        return tuple(self._handles[file].get_slice(original).get_shape())

    def dtype(self, name: str) -> np.dtype:
        file, original = self._where[name]
        code = self._handles[file].get_slice(original).get_dtype()
        if code not in _DTYPES:
            raise CheckpointFormatError(f"tensor {name!r} has unsupported dtype {code}")
        return np.dtype(_DTYPES[code])

    def read(self, name: str) -> np.ndarray:
        file, original = self._where[name]
        return self._handles[file].get_tensor(original)


def write_checkpoint(path: str, plan: list[tuple[str, int]], tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int) -> list[str]:
    """Write `tensors` (yielded in `plan` order, `plan` = [(name, nbytes)]) into shards of at most
    `max_shard_bytes` (a bigger single tensor gets its own shard). Returns the files written."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in plan:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    count = len(shards)
    files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    file_of = {name: files[i] for i, names in enumerate(shards) for name in names}
    os.makedirs(path, exist_ok=True)
    pending: dict[str, np.ndarray] = {}
    shard = 0
    for name, array in tensors:
        if name not in file_of:
            raise KeyError(f"tensor {name!r} is not in the write plan")
        pending[name] = np.ascontiguousarray(array)
        while shard < count and all(n in pending for n in shards[shard]):
            save_file({n: pending.pop(n) for n in shards[shard]}, os.path.join(path, files[shard]),
                      metadata={"format": "pt"})
            shard += 1
    if shard != count or pending:
        raise RuntimeError(f"write plan incomplete: {count - shard} shard(s) not written")
    if count > 1:
        total = sum(nbytes for _, nbytes in plan)
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": file_of}, f, indent=2, sort_keys=True)
    return [os.path.join(path, f) for f in files]
