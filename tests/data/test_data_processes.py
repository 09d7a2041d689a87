"""Behaviour across processes: resuming in a new process, and two JAX processes sharing an epoch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from pipeline_child import digest

from vrft_jax.data import synthetic
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.prepare import convert
from vrft_jax.data.records import Candidate

CHILD = os.path.join(os.path.dirname(__file__), "pipeline_child.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    return env


def run_children(jobs: list[dict]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, CHILD, json.dumps(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=child_env(), cwd=ROOT) for job in jobs]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    records = synthetic.detection_records(20, seed=11, min_side=30, max_side=200)
    path, _ = convert({"train": (Candidate(r.id, r.as_dict()) for r in records)},
                      str(tmp_path_factory.mktemp("data")), "synthetic_resume")
    return path


def test_state_restored_in_a_new_process_continues_exactly(dataset, tiny_tokenizer_dir, tiny_tokenizer, tiny_config):
    config = DataConfig(path=dataset, batch_size=2, max_prompt_len=256, max_pixels=160 * 160, num_workers=2,
                        device_prefetch=1, seed=5)
    k, m = 5, 12  # m batches run past the end of the first epoch (~18 batches of 2 from ~37 records)
    with make_iterator(config, tiny_config, tokenizer=tiny_tokenizer, process_index=0, process_count=1) as it:
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        uninterrupted = [digest(next(it)) for _ in range(m)]
    (restored,) = run_children([{"config": config.to_dict(), "tokenizer": tiny_tokenizer_dir, "batches": m,
                                 "state": state}])
    assert restored["digests"] == uninterrupted


def test_two_jax_processes_get_disjoint_shards_that_cover_the_epoch(dataset, tiny_tokenizer_dir):
    from vrft_jax.data import storage

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    config = DataConfig(path=dataset, batch_size=2, max_prompt_len=256, max_pixels=160 * 160, num_workers=0,
                        num_epochs=1, drop_remainder=False, device_prefetch=0)
    jobs = [{"config": config.to_dict(), "tokenizer": tiny_tokenizer_dir, "batches": None,
             "distributed": {"coordinator": f"localhost:{port}", "processes": 2, "process_id": i}} for i in range(2)]
    outputs = run_children(jobs)
    assert [o["process_index"] for o in outputs] == [0, 1]
    shards = [[i for batch in o["ids"] for i in batch if i] for o in outputs]
    assert not set(shards[0]) & set(shards[1])
    every = sorted(r.id for r in storage.read_records(dataset, "train"))
    assert sorted(shards[0] + shards[1]) == every
    # each process reads its block of every global batch (rows 0-1 and 2-3 of each 4): as many batches each,
    # the last one's padding falling to whichever blocks it reaches
    assert len(outputs[0]["ids"]) == len(outputs[1]["ids"])
    assert abs(len(shards[0]) - len(shards[1])) <= config.batch_size
    assert outputs[0]["global_shape"] == [4, 256]  # 2 rows per process, one global batch


def test_worker_batches_leave_no_shared_memory_behind(tiny_tokenizer_dir):
    # Grain unlinks a batch's segments when its arrays are collected, from a thread that dies with the
    # process: batches alive near exit left their segments to the resource tracker ("leaked
    # shared_memory objects"). The iterator now unlinks each segment as its batch arrives.
    child = os.path.join(os.path.dirname(__file__), "shared_memory_child.py")
    proc = subprocess.run([sys.executable, child, tiny_tokenizer_dir, "3"], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["segments"] >= 3 * 7  # every batch came through shared memory: at least its 7 inputs
    assert report["still_named"] == []  # deterministic: the batches are alive, yet their names are gone
    assert report["arrays_intact"]  # ... and their memory is still theirs
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
