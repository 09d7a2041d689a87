"""A run as it lives on a TPU pod: two processes (4 CPU devices each), each with its own cwd, HOME and TMPDIR as
separate hosts have, sharing nothing but a bucket (`gs://` on the GCS emulator, `tests/gcs.py`) that holds the
workdir and the prepared data. A run that gets SIGTERM on both processes after step 2 and is relaunched by the
same command ends with parameters and `metrics.jsonl` rows (timings aside) bitwise equal to a straight 4-step run
of the same two-process job (`conftest.straight_two_process_run`): the checkpoint, the data position, the metrics
and the model directory all live in the bucket.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gcs import gcs_bucket  # noqa: F401 - the fixture
from test_multihost import RECIPE, environment, free_port, params_of
from train_recipe import TIMING_KEYS
from vrft_jax import recipe, storage
from vrft_jax import run as runs
from vrft_jax.metrics import read_metrics

STEPS = 4


def host_environment(tmp_path, rank: int, port: int) -> tuple[dict, str]:
    """(environment, cwd) of process `rank` as a host of its own: its own HOME, TMPDIR and working directory."""
    home = tmp_path / f"host{rank}"
    for sub in ("home", "tmp", "cwd"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = environment(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", VRFT_NUM_PROCESSES="2",
                      VRFT_PROCESS_ID=str(rank), HOME=str(home / "home"), TMPDIR=str(home / "tmp"))
    return env, str(home / "cwd")


def launch(tmp_path, name: str, workdir: str, data: str) -> list[tuple[subprocess.Popen, str]]:
    """The train command as two processes of one job; (process, log path) of each."""
    port, launched = free_port(), []
    argv = [sys.executable, "-m", "vrft_jax.train", f"--config={RECIPE}", f"--workdir={workdir}",
            f"--config.data.path={data}", "--config.eval.path=", f"--config.total_steps={STEPS}",
            "--config.prompts_per_step=8", "--config.ckpt_every=1", "--config.data.num_workers=0"]
    for rank in range(2):
        env, cwd = host_environment(tmp_path, rank, port)
        log = str(tmp_path / f"{name}-{rank}.log")
        with open(log, "w") as out:
            launched.append((subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT), log))
    return launched


def wait(launched, timeout: float = 300) -> list[str]:
    """The logs, once both processes exited 0."""
    logs = []
    for proc, log in launched:
        code = proc.wait(timeout=timeout)
        text = open(log).read()
        assert code == 0, f"{log} (exit {code}):\n{text[-3000:]}"
        logs.append(text)
    return logs


def without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


@pytest.fixture(scope="module")
def bucket_data(gcs_bucket, tmp_path_factory):  # noqa: F811 - the fixture
    """The recipe's synthetic training set, prepared into the bucket."""
    data = f"{gcs_bucket}/{os.urandom(6).hex()}/data/train"
    runs.make_synthetic_data(recipe.load(RECIPE, {"data.path": data, "eval.path": ""}))
    return data


def test_sigterm_on_both_processes_then_the_same_command_ends_where_a_straight_run_does(
        gcs_bucket, bucket_data, straight_two_process_run, tmp_path):  # noqa: F811 - the fixture
    # The straight run (conftest.py): the same recipe, data and steps as two processes on one disk; neither the
    # storage nor the hosts' separate HOME, TMPDIR and cwd change a number of it.
    straight = straight_two_process_run[1]
    resumed = f"{gcs_bucket}/{os.urandom(6).hex()}/resumed"
    launched = launch(tmp_path, "preempted", resumed, bucket_data)
    deadline = time.monotonic() + 300
    while not (storage.exists(storage.join(resumed, "metrics.jsonl"))
               and any(row["step"] >= 2 for row in read_metrics(resumed))):
        assert all(proc.poll() is None for proc, _ in launched), [open(log).read()[-2000:] for _, log in launched]
        assert time.monotonic() < deadline, "no step-2 row within 300 s"
        time.sleep(0.2)
    for proc, _ in launched:
        proc.send_signal(signal.SIGTERM)
    logs = wait(launched, timeout=120)  # SIGTERM saves and exits 0 on both
    assert not any("finished" in log for log in logs)
    saved = sorted(int(name) for name in storage.listdir(storage.join(resumed, "checkpoints")) if name.isdigit())
    assert saved and 2 <= saved[-1] < STEPS, saved
    assert not storage.exists(storage.join(resumed, "model"))

    logs = wait(launch(tmp_path, "relaunched", resumed, bucket_data))
    assert "finished test_train: 4 steps" in logs[0]
    rows_straight, rows_resumed = read_metrics(straight), read_metrics(resumed)
    assert [row["step"] for row in rows_resumed] == list(range(1, STEPS + 1))
    assert without_timings(rows_resumed) == without_timings(rows_straight)
    assert all(row["grad_norm"] > 0 and row["update_skipped"] == 0 for row in rows_straight)  # the updates moved
    for a, b in zip(*(storage_leaves(params_of(storage.join(w, "model"))) for w in (straight, resumed))):
        np.testing.assert_array_equal(a, b)
    # Each start kept its config, in the bucket.
    assert {"config.0.json", f"config.{saved[-1]}.json"} <= set(storage.listdir(resumed))


def storage_leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]
