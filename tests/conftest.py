"""Test session setup: 8 fake CPU devices, offline Hugging Face and a session-wide compilation cache, before
anything imports JAX."""
import atexit
import fcntl
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A persistent compilation cache for this session only (fresh, and removed at exit): the tests run the same tiny
# recipes many times, in this process and in the train command's subprocesses (which inherit the variable), and
# each run would compile the same programs again. A retrieved program is the one compiling would make;
# `compile_count.counting_compiles` counts retrievals as compilations, so no recompilation hides behind it.
# Under `make test`'s two workers (pytest-xdist) the controller makes it and the workers, which inherit its
# environment, share it: a program one worker compiled is read by the other (JAX writes cache entries atomically).
# Every program is kept, however quick its compilation: the tiny models' programs each compile in well under JAX's
# default threshold of a second, and a run compiles about 150 of them.
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    _CACHE = tempfile.mkdtemp(prefix="vrft-jax-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# Every Python process the tests start loads `child_site/sitecustomize.py`: each process of a multi-process run
# writes its programs to that cache (JAX writes process 0's only, and on CPU the other processes' keys differ).
_CHILD_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_site")
if _CHILD_SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_CHILD_SITE, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402 - after the environment above

STRAIGHT_STEPS = 4


@pytest.fixture(scope="session")
def straight_two_process_run(tmp_path_factory):
    """(data, workdir) of the tiny recipe's straight 4-step GRPO run as two processes of 4 CPU devices each
    (`test_multihost.run_processes`), checkpointing every step: what a preempted, killed or relaunched run must
    end equal to. Run once for the session (`test_pod_resume`, `test_lost_peer`): the result depends on neither
    the storage (local or gs://) nor each process's HOME, TMPDIR or cwd."""
    from test_multihost import RECIPE, run_processes
    from vrft_jax import recipe
    from vrft_jax import run as runs

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one run for all of `make test`'s workers: their shared directory
        root = root.parent
    directory = root / "straight_two_process_run"
    data, workdir = str(directory / "data" / "train"), str(directory / "run")
    with open(root / "straight_two_process_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here for the first one's run
        if not (directory / "done").exists():
            runs.make_synthetic_data(recipe.load(RECIPE, {"data.path": data, "eval.path": ""}))
            codes, logs = run_processes(workdir, data, f"--config.total_steps={STRAIGHT_STEPS}",
                                        "--config.data.num_workers=0")
            assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
            assert f"finished test_train: {STRAIGHT_STEPS} steps" in logs[0]
            (directory / "done").write_text("")
    return data, workdir


# The longest files first (measured: the 2B TPU compile, the multi-process runs, the train-step and loop compiles):
# `make test`'s workers take whole files in collection order (--dist loadfile), so these start at once instead of
# leaving one worker alone with a long file at the end. Within a file the order is kept.
LONGEST_FIRST = ("tests/test_aot.py", "tests/test_launchers.py", "tests/test_lost_peer.py", "tests/test_pod_resume.py",
                 "tests/test_train.py", "tests/grpo/test_train_step.py", "tests/test_agreed_errors.py",
                 "tests/test_multihost.py", "tests/test_sft_baseline.py", "tests/test_grpo_iteration.py",
                 "tests/test_sampling.py", "tests/evaluate/test_evaluators.py", "tests/test_families.py",
                 "tests/test_model_parity.py", "tests/test_model_port.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture
def one_device(monkeypatch):
    """A run (`run.train`) meshes over the first of the session's fake CPU devices only, as the command in a
    one-device process does; the fixture's value is that one-device mesh."""
    import functools

    import jax

    from vrft_jax import recipe, sharding

    monkeypatch.setattr(recipe, "make_mesh", functools.partial(recipe.make_mesh, devices=jax.devices()[:1]))
    return sharding.make_mesh(devices=jax.devices()[:1])
