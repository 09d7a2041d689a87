"""A lost peer (issue 18, item 4): when one process of a multi-process run dies without a clean exit, every other
process stops within a bounded time, non-zero, with a line naming the lost process (`distributed._PeerWatch`),
instead of waiting forever in a collective, in orbax's commit or in JAX's shutdown barrier; the same command then
resumes from the last complete checkpoint and ends where a straight run ends.

The run is `test_multihost`'s job: two processes of 4 CPU devices each on localhost, sharing this machine's disk.
Two smaller jobs (no training, a second or two each) cover the other ways a peer is lost: process 0 itself (which
also runs the JAX coordination service), and a process frozen with its connections open (SIGSTOP: a host that
vanished), which only the coordination service's heartbeat timeout (`VRFT_HEARTBEAT_TIMEOUT_S`) catches.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from test_multihost import REPO, command, environment, free_port, params_of, without_timings
from vrft_jax.distributed import LOST_PEER_EXIT_CODE
from vrft_jax.metrics import read_metrics

STEPS = 4
EXIT_BOUND_S = 120  # the bound, from the kill to the survivor's exit


def launch(argv_of, logs: str, name: str, **extra) -> list[tuple[subprocess.Popen, str]]:
    """`argv_of(rank)` as the two processes of one job on localhost; (process, log path) of each."""
    port, launched = free_port(), []
    for rank in range(2):
        env = environment(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", VRFT_NUM_PROCESSES="2",
                          VRFT_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1", **extra)
        log = os.path.join(logs, f"{name}-{rank}.log")
        with open(log, "w") as out:
            launched.append((subprocess.Popen(argv_of(rank), env=env, cwd=REPO, stdout=out,
                                              stderr=subprocess.STDOUT), log))
    return launched


def wait_ok(launched, timeout: float = 600) -> list[str]:
    """The logs, once both processes exited 0."""
    try:
        logs = []
        for proc, log in launched:
            code = proc.wait(timeout=timeout)
            text = open(log).read()
            assert code == 0, f"{log} (exit {code}):\n{text[-3000:]}"
            logs.append(text)
        return logs
    finally:
        stop(launched)


def stop(launched) -> None:
    for proc, _ in launched:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def exit_after(proc: subprocess.Popen, since: float, bound: float) -> tuple[int | None, float]:
    """(exit code or None if still running at `bound` s after `since`, seconds from `since` to the exit)."""
    while proc.poll() is None and time.monotonic() - since < bound:
        time.sleep(0.05)
    return proc.poll(), time.monotonic() - since


def complete_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def test_a_killed_process_stops_the_other_naming_it_and_the_relaunch_ends_where_a_straight_run_does(
        straight_two_process_run, tmp_path):
    data, straight = straight_two_process_run  # the same command, uninterrupted (conftest.py)

    def train(workdir):
        return lambda rank: command(workdir, data, f"--config.total_steps={STEPS}", "--config.data.num_workers=0")

    started = time.monotonic()
    killed = str(tmp_path / "killed")
    launched = launch(train(killed), str(tmp_path), "killed")
    (first, first_log), (second, second_log) = launched
    try:
        deadline = time.monotonic() + 600
        while not (os.path.exists(os.path.join(killed, "metrics.jsonl"))
                   and any(row["step"] >= 2 for row in read_metrics(killed))):
            assert first.poll() is None and second.poll() is None, [open(log).read()[-3000:] for _, log in launched]
            assert time.monotonic() < deadline, "no step-2 row within 600 s"
            time.sleep(0.05)
        second.send_signal(signal.SIGKILL)  # mid-run: in step 3, or in step 2's save
        killed_at = time.monotonic()
        code, after = exit_after(first, killed_at, EXIT_BOUND_S)
    finally:
        stop(launched)
    log = open(first_log).read()
    print(f"process 0 exited {code} {after:.1f} s after process 1 was killed")
    assert code is not None, f"process 0 still running {EXIT_BOUND_S} s after its peer was killed:\n{log[-3000:]}"
    assert code == LOST_PEER_EXIT_CODE, log[-3000:]
    assert "lost peer: process 1 of 2 stopped" in log, log[-3000:]
    assert "finished test_train" not in log
    saved = complete_steps(killed)
    assert saved and 1 <= saved[-1] < STEPS, saved  # the step in flight, if any, is not listed
    assert not os.path.exists(os.path.join(killed, "model"))

    relaunched = time.monotonic()
    logs = wait_ok(launch(train(killed), str(tmp_path), "relaunched"))
    print(f"relaunch from step {saved[-1]}: {time.monotonic() - relaunched:.0f} s; "
          f"test: {time.monotonic() - started:.0f} s")
    assert f"finished test_train: {STEPS} steps" in logs[0]
    # It went on from the last complete checkpoint, not from the start nor from a step it had not saved.
    assert f"step {saved[-1] + 1}/{STEPS}" in logs[0] and f"step {saved[-1]}/{STEPS}" not in logs[0], logs[0][-3000:]
    assert os.path.exists(os.path.join(killed, f"config.{saved[-1]}.json"))
    rows_straight, rows_resumed = read_metrics(straight), read_metrics(killed)
    assert [row["step"] for row in rows_resumed] == list(range(1, STEPS + 1))
    assert [without_timings(r) for r in rows_resumed] == [without_timings(r) for r in rows_straight]
    assert all(row["grad_norm"] > 0 and row["update_skipped"] == 0 for row in rows_straight)  # the updates moved
    for a, b in zip(*(jax.tree.leaves(params_of(os.path.join(w, "model"))) for w in (straight, killed)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Two processes joined as the train command joins them (`distributed.initialize`), in a collective every second
# until killed.
JOB = """
import time
import numpy as np
from jax.experimental import multihost_utils
from vrft_jax import distributed
distributed.initialize()
multihost_utils.process_allgather(np.zeros(1))
print("joined", flush=True)
while True:
    multihost_utils.process_allgather(np.zeros(1))
    time.sleep(1)
"""


def joined(launched, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all("joined" in open(log).read() for _, log in launched):
        assert all(proc.poll() is None for proc, _ in launched), [open(log).read()[-3000:] for _, log in launched]
        assert time.monotonic() < deadline, "the two processes did not join"
        time.sleep(0.1)


def test_losing_process_0_stops_the_others_naming_it(tmp_path):
    launched = launch(lambda rank: [sys.executable, "-c", JOB], str(tmp_path), "hub")
    try:
        joined(launched)
        launched[0][0].send_signal(signal.SIGKILL)
        code, after = exit_after(launched[1][0], time.monotonic(), 30)
    finally:
        stop(launched)
    log = open(launched[1][1]).read()
    assert code == LOST_PEER_EXIT_CODE, (code, log[-3000:])
    assert "lost peer: process 0 of 2 stopped" in log and "coordination service" in log, log[-3000:]
    assert after < 10, after


def test_a_frozen_process_is_caught_by_the_heartbeat_timeout(tmp_path):
    """SIGSTOP keeps the process's connections open, as a host that vanished does: the peer watch sees nothing, and
    the JAX coordination service ends process 0 once process 1 has missed its heartbeats for
    VRFT_HEARTBEAT_TIMEOUT_S, with its own fatal error naming the task."""
    timeout = 6
    launched = launch(lambda rank: [sys.executable, "-c", JOB], str(tmp_path), "frozen",
                      VRFT_HEARTBEAT_TIMEOUT_S=str(timeout))
    try:
        joined(launched)
        launched[1][0].send_signal(signal.SIGSTOP)
        code, after = exit_after(launched[0][0], time.monotonic(), 60)
    finally:
        launched[1][0].send_signal(signal.SIGCONT)
        stop(launched)
    log = open(launched[0][1]).read()
    assert code not in (None, 0), (code, log[-3000:])
    assert "Task 1 heartbeat timeout" in log or "stopped sending heartbeats" in log, log[-3000:]
    assert after < 4 * timeout, after
