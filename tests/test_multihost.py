"""Multi-host (issue 12): two processes on localhost, each with 4 fake CPU devices and joined by
`jax.distributed.initialize` (launch/gpu.sh's environment), run GRPO steps of the tiny recipe through the train
command and end where one process with 8 devices ends; a bad record one process meets stops both, naming it.

The recipe is tests/train_recipe.py with 8 prompts per step (4 per process, one per device of each process)
and a mesh of fsdp 8 in both runs, so the two runs compile the same SPMD program; only the collectives differ
(gloo between the processes). Parameters agree within 1e-6 (float32 reductions in another order).
"""

import dataclasses
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from train_recipe import TIMING_KEYS
from vrft_jax import model_dir, recipe, run, sharding
from vrft_jax.data import storage, synthetic
from vrft_jax.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "train_recipe.py")
TIMING = TIMING_KEYS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(devices: int, **extra) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]), JAX_PLATFORMS="cpu",
               **extra)
    for key in ("JAX_COORDINATOR_ADDRESS", "VRFT_NUM_PROCESSES", "VRFT_PROCESS_ID", "VRFT_DISTRIBUTED"):
        if key not in extra:
            env.pop(key, None)
    return env


def command(workdir, data, *extra):
    return [sys.executable, "-m", "vrft_jax.train", f"--config={RECIPE}", f"--workdir={workdir}",
            f"--config.data.path={data}", "--config.eval.path=", "--config.total_steps=2",
            "--config.prompts_per_step=8", "--config.ckpt_every=1",
            "--config.shared_mount=true", *extra]  # one machine: the processes share its disk


def run_processes(workdir, data, *extra, processes=2, timeout=600, wrap=None):
    """(return codes, logs) of the train command as `processes` processes of one job on localhost; `wrap` maps
    the command's argv to the one each process runs (e.g. `tests/fault_child.py`'s)."""
    port, procs, logs = free_port(), [], []
    for rank in range(processes):
        log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}-{rank}.log"), "w+")
        env = environment(8 // processes, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                          VRFT_NUM_PROCESSES=str(processes), VRFT_PROCESS_ID=str(rank))
        argv = command(workdir, data, *extra)
        procs.append(subprocess.Popen(wrap(argv) if wrap else argv, env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT))
        logs.append(log)
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """(training set, held-out set) of the recipe: 16 and 8 synthetic images."""
    directory = str(tmp_path_factory.mktemp("multihost_data"))
    paths = os.path.join(directory, "train"), os.path.join(directory, "heldout")
    run.make_synthetic_data(recipe.load(RECIPE, {"data.path": paths[0], "eval.path": paths[1]}))
    return paths


def params_of(directory):
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    return nnx.state(model_dir.load_model(directory, mesh=mesh), nnx.Param)


def without_timings(row):
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


def test_two_processes_end_where_one_process_with_eight_devices_ends(datasets, tmp_path):
    """With the held-out evaluation every step: each process decodes its half of the 8 examples, and the
    gathered metrics are the single process's. With `collapse.oversample=2` (the path without it is the same
    steps less the choice: this test runs one, for CI's time) each step draws 16 prompts and every process keeps
    the same 8 groups of the 16 (the global choice): rows of process 1 come from process 0's draw."""
    data, heldout = datasets
    extra = (f"--config.eval.path={heldout}", "--config.eval_every=1", "--config.eval.type=classification",
             "--config.collapse.oversample=2")
    single = str(tmp_path / "single")
    done = subprocess.run(command(single, data, *extra), env=environment(8), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    multi = str(tmp_path / "multi")
    codes, logs = run_processes(multi, data, *extra)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "finished test_train: 2 steps" in logs[0]

    a, b = jax.tree.leaves(params_of(os.path.join(single, "model"))), jax.tree.leaves(params_of(
        os.path.join(multi, "model")))
    assert len(a) == len(b)
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))
    print(f"largest parameter difference: {worst:.3g}")
    assert worst <= 1e-6
    rows_single, rows_multi = read_metrics(single), read_metrics(multi)
    # a row per step, and an evaluation row before training (step 0) and after each step
    assert [r["step"] for r in rows_multi] == [r["step"] for r in rows_single] == [0, 1, 1, 2, 2]
    assert rows_multi[0]["eval/examples"] == 8
    for one, two in zip(rows_single, rows_multi):
        one, two = without_timings(one), without_timings(two)
        assert one.keys() == two.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    # 8 of 16 kept, the groups with a signal first: flat_kept = max(0, 1 - 2 signal_drawn)
    steps = [r for r in rows_multi if "grad_norm" in r]
    print("oversample/signal_drawn per step:", [r["oversample/signal_drawn"] for r in steps])
    assert all(r["oversample/flat_kept"] == max(0.0, 1 - 2 * r["oversample/signal_drawn"]) for r in steps)
    # the updates moved the parameters: the comparison is not of two untouched initialisations
    assert all(r["grad_norm"] > 0 and r["update_skipped"] == 0 for r in rows_multi if "grad_norm" in r)


def test_a_bad_record_one_process_meets_stops_both_naming_it(tmp_path):
    """Process 1 reads records 4-7 of each global batch of 8 (unshuffled here): record 5's image is not an
    image. Process 1 stops with the BadRecordError, process 0 with a PeerError quoting it."""
    records = list(synthetic.classification_records(16, seed=0, min_side=56, max_side=56))
    records[5] = dataclasses.replace(records[5], image=b"not an image at all")
    path = storage.write_dataset(str(tmp_path / "data"), "bad", {"train": records})
    codes, logs = run_processes(str(tmp_path / "run"), path, "--config.data.shuffle=False", "--config.source.prepare=",
                                timeout=300)
    assert codes[0] != 0 and codes[1] != 0, "\n".join(log[-3000:] for log in logs)
    name = records[5].id
    errors = [[line for line in log.splitlines() if line.startswith("error: ")] for log in logs]
    assert len(errors[1]) == 1 and name in errors[1][0], logs[1][-3000:]  # a user's error: one line
    assert len(errors[0]) == 1 and "process 1 failed" in errors[0][0] and name in errors[0][0], logs[0][-3000:]

