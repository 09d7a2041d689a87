"""What every command (`train`, `evaluate`, `evaluate score`, `aot`, `data.prepare`, `model_port.*`) does with a
failure and with the machine it starts on.

A failure a user can fix (a missing file, a bad key, a malformed record) is a `UserError`: the command prints its
message as one line, `error: ...`, and exits with `EXIT_USER_ERROR`, with no traceback; `--verbose` anywhere on
the command line shows the traceback as well. Any other exception is a bug and keeps its traceback.

    def main(argv): ...
    if __name__ == "__main__":
        cli.choose_platform()        # before JAX starts a backend: the one line saying which platform runs
        cli.run(main)                # sys.argv less --verbose; a UserError is one line and exit 2

This module is a leaf: the library's error classes derive from `UserError` without importing anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2
VERBOSE_FLAG = "--verbose"


class UserError(Exception):
    """A failure whose message is the whole story: input a user can fix (the message names the file, key or record
    and, where there is one, the command that makes it right), or a failure another process reported in full."""


# ---------------------------------------------------------------------------------------------- failures


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """`main(argv)` (sys.argv by default, without `--verbose`), then exit with its return value. A UserError, or
    an absl UsageError (a flag's validation), ends the process with one line on stderr and EXIT_USER_ERROR."""
    argv, verbose = strip_verbose(sys.argv if argv is None else argv)
    try:
        code = main(argv)
    except Exception as e:  # noqa: BLE001 - a user's error is one line; anything else is re-raised
        if not is_user_error(e):
            raise
        fail(e, verbose=verbose)
    sys.exit(code or 0)


def guard(main: Callable[..., int | None], *, verbose: bool) -> Callable[..., int | None]:
    """`main`, its UserErrors turned into one line and EXIT_USER_ERROR: the form for absl's `app.run`, whose own
    handler would print the whole usage text before a UsageError."""

    def guarded(*args):
        try:
            return main(*args)
        except Exception as e:  # noqa: BLE001 - as in run
            if not is_user_error(e):
                raise
            fail(e, verbose=verbose)

    return guarded


def strip_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without `--verbose`, whether it was there); arguments after `--` are left alone."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    verbose = VERBOSE_FLAG in argv[1:end]
    return [a for i, a in enumerate(argv) if i >= end or i == 0 or a != VERBOSE_FLAG], verbose


def is_user_error(error: BaseException) -> bool:
    """A UserError, or absl's UsageError (flag validation), which is one too."""
    if isinstance(error, UserError):
        return True
    return type(error).__name__ == "UsageError" and type(error).__module__.startswith("absl")


def fail(error: BaseException | str, *, verbose: bool = False) -> NoReturn:
    """Print `error: MESSAGE` as one line on stderr (with the traceback under --verbose) and exit EXIT_USER_ERROR."""
    if verbose and isinstance(error, BaseException):
        traceback.print_exception(error)
    message = str(error) if not isinstance(error, KeyError) or not error.args else str(error.args[0])
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    if not verbose and isinstance(error, BaseException):
        print(f"(add {VERBOSE_FLAG} to see where it was raised)", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing or unknown argument, a bad choice) are a UserError, one
    line with a pointer to --help, instead of the usage text and an exit: raised, so that a library caller (a
    run's process 0 making a dataset) reports it to its peers like any other error. `--help` keeps the
    description's own line breaks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------- platform


def choose_platform(*, cpu_recipe: bool = False, announce: bool = True) -> str:
    """The platform JAX runs on, chosen before JAX starts a backend, so that a CPU machine never loads the TPU
    plugin (libtpu, installed by the `tpu` extra, logs TPU_WORKER_HOSTNAMES errors on a host without chips):

    JAX_PLATFORMS when set; else `cpu` for a recipe sized for the CPU (`cpu_recipe`: the demo); else `tpu` when
    the PCI bus has TPU chips, `cuda` when an NVIDIA device and JAX's CUDA plugin are both there; else `cpu`.
    Sets JAX_PLATFORMS (so that child processes agree) and JAX's own setting when JAX is already imported, and
    prints the choice and its reason as one line on stderr."""
    chosen, reason = _platform()
    if cpu_recipe and not os.environ.get("JAX_PLATFORMS"):
        chosen, reason = "cpu", "the recipe is sized for the CPU; JAX_PLATFORMS=tpu or cuda overrides"
    os.environ["JAX_PLATFORMS"] = chosen
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", chosen)
    if announce:
        print(f"platform: {chosen} ({reason})", file=sys.stderr, flush=True)
    return chosen


def _platform() -> tuple[str, str]:
    if os.environ.get("JAX_PLATFORMS"):
        return os.environ["JAX_PLATFORMS"], "JAX_PLATFORMS"
    # JAX's own probes (the PCI ids of each TPU generation, NVIDIA's device nodes), kept current by JAX; they read
    # /sys and /dev only and start no backend.
    from jax._src import hardware_utils

    chips, version = hardware_utils.num_available_tpu_chips_and_device_id()
    if chips:
        return "tpu", f"{chips} TPU {version.name} chips on this host"
    if hardware_utils.has_visible_nvidia_gpu():
        if any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
            return "cuda", "an NVIDIA device on this host"
        return "cpu", "an NVIDIA device, but JAX's CUDA plugin is not installed (pip install -e '.[gpu]')"
    return "cpu", "no TPU or GPU on this host"
