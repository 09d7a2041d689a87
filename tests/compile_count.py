"""Counting XLA compilations in a block: what the no-recompilation tests assert on."""

import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    """A list that collects the name of every XLA compilation in the block, one entry per program. jit's
    in-memory cache hits compile nothing; a program read back from the session's persistent cache counts, as the
    compilation it replaces: jit times the compile-or-retrieve call as a whole and reports it under this event
    either way (a retrieval also reports a cache event of its own, not counted here, or it would count twice)."""
    names = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
