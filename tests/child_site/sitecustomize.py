"""Loaded at startup by every Python process the tests start (conftest puts this directory on PYTHONPATH): each
process of a multi-process run writes the programs it compiles to the session's compilation cache, not only
process 0.

On the CPU backend JAX's cache key includes the process's own topology (`cache_key._hash_accelerator_config`),
so process 1's key for a program differs from process 0's, and JAX writes entries from process 0 only
(`compiler._cache_write`): without this, process 1 of every two-process test run compiled every program again
(about 50 s of CPU per run on 2 cores). The keys differ, so the writers never contend for an entry. Nothing is
imported at startup: the compiler's view of the process id is set when `jax._src.compiler` is first
imported.
"""

import importlib.abc
import importlib.machinery
import sys

TARGET = "jax._src.compiler"


class _AsProcessZero:
    """`distributed.global_state` as the compiler module sees it: every attribute the real one's, but the process
    id 0. On CPU `_cache_write`'s guard is the only reader that matters: the others decide the GPU autotuning
    cache's mode and who compiles when binaries are shared between hosts (`jax_share_binary_between_hosts`,
    off), neither of which a CPU test run uses."""

    def __init__(self, state):
        self._state = state

    def __getattr__(self, name):
        return 0 if name == "process_id" else getattr(self._state, name)


def _write_from_every_process(compiler):
    """Only `compiler`'s own reference to `distributed` changes: the rest of JAX sees the real process id."""
    import types

    from jax._src import distributed

    compiler.distributed = types.SimpleNamespace(global_state=_AsProcessZero(distributed.global_state))


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _write_from_every_process(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
