"""Counting XLA compilations in a block: what the no-recompilation tests assert on."""

import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
PERSISTENT_CACHE_HIT = "/jax/compilation_cache/cache_retrieval_time_sec"


@contextlib.contextmanager
def counting_compiles():
    """A list that collects the name of every XLA compilation in the block (jit's in-memory cache hits compile
    nothing; a program read back from the session's persistent cache counts, as the compilation it replaces)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))
        elif event == PERSISTENT_CACHE_HIT:
            names.append("(persistent cache)")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
