"""Bucket storage (issue 18 item 2): every file a run reads or writes works on `gs://` URLs, against a real
GCS API (the fake-gcs-server emulator on 127.0.0.1, `tests/gcs.py`), and gives what the same run gives on a
local disk: checkpoints bit for bit, metrics rows and TensorBoard events, model directories, prepared
datasets and their batches, Hugging Face conversions both ways."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from tiny_model import tiny_model
from vrft_jax import checkpoints, model_dir, sharding, storage
from vrft_jax.data import prepare
from vrft_jax.data import storage as datasets
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.metrics import MetricWriter, read_metrics, read_samples
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer

pytest_plugins = ("gcs",)  # the emulator's fixtures: gcs_bucket, gcs_dir

# ---------------------------------------------------------------------------------------- the file layer


def test_urls_are_never_made_local_paths():
    assert storage.absolute("gs://b/run") == "gs://b/run"  # os.path.abspath would give <cwd>/gs:/b/run
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.absolute("run") == os.path.join(os.getcwd(), "run")
    assert storage.is_url("gs://b") and not storage.is_url("/tmp/gs:/b") and not storage.is_url("runs/x")


def test_files_in_a_bucket_are_written_read_listed_and_deleted(gcs_dir):
    storage.write_text_atomic(storage.join(gcs_dir, "a.json"), '{"x": 1}')
    storage.write_text_atomic(storage.join(gcs_dir, "sub", "b.txt"), "old")
    storage.write_text_atomic(storage.join(gcs_dir, "sub", "b.txt"), "new")
    assert json.loads(storage.read_text(storage.join(gcs_dir, "a.json"))) == {"x": 1}
    assert storage.read_text(storage.join(gcs_dir, "sub", "b.txt")) == "new"
    assert storage.listdir(gcs_dir) == ["a.json", "sub"]
    assert storage.isdir(storage.join(gcs_dir, "sub")) and storage.isfile(storage.join(gcs_dir, "a.json"))
    assert sorted(storage.files(gcs_dir)) == ["a.json", "sub/b.txt"]
    storage.rmtree(storage.join(gcs_dir, "sub"))
    storage.rmtree(storage.join(gcs_dir, "never-written"))  # nothing there: nothing to do
    assert storage.listdir(gcs_dir) == ["a.json"] and not storage.exists(storage.join(gcs_dir, "sub"))
    with pytest.raises(FileNotFoundError, match="never-written"):
        storage.listdir(storage.join(gcs_dir, "never-written"))


def test_an_appended_object_holds_every_flushed_write_and_reopens_at_its_end(gcs_dir):
    path = storage.join(gcs_dir, "log.bin")
    with storage.open_append(path) as f:
        f.write(b"one\n")
        f.flush()
        assert storage.read_bytes(path) == b"one\n"  # readers see each flush
        f.write(b"two\n")
    with storage.open_append(path) as f:
        f.write(b"three\n")
    assert storage.read_bytes(path) == b"one\ntwo\nthree\n"


def test_trees_copy_both_ways_and_a_bucket_is_staged_once_until_it_changes(gcs_dir, tmp_path):
    source = tmp_path / "source"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "nested" / "weights.bin").write_bytes(os.urandom(3000))
    copied = storage.copy_tree(str(source), storage.join(gcs_dir, "tree"), last=("config.json",))
    assert copied == ["config.json", "nested/weights.bin"]

    cache = tmp_path / "cache"
    staged = storage.local_copy(storage.join(gcs_dir, "tree"), str(cache))
    assert (open(os.path.join(staged, "nested", "weights.bin"), "rb").read()
            == (source / "nested" / "weights.bin").read_bytes())
    stamp = os.stat(os.path.join(staged, "config.json")).st_mtime_ns
    assert storage.local_copy(storage.join(gcs_dir, "tree"), str(cache)) == staged  # the same copy, not again
    assert os.stat(os.path.join(staged, "config.json")).st_mtime_ns == stamp

    storage.write_text_atomic(storage.join(gcs_dir, "tree", "config.json"), '{"changed": true}')
    restaged = storage.local_copy(storage.join(gcs_dir, "tree"), str(cache))
    assert restaged != staged and not os.path.exists(staged)  # a new copy; the stale one removed
    assert json.loads(open(os.path.join(restaged, "config.json")).read()) == {"changed": True}
    assert storage.local_copy(str(source), str(cache)) == str(source)  # a local tree is used in place


def test_a_multi_process_run_refuses_a_workdir_its_processes_do_not_share(monkeypatch, tmp_path):
    storage.require_shared("runs/x", shared_mount=False)  # one process: anything goes
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"workdir 'runs/x' is a local path, but this run has 2 processes"):
        storage.require_shared("runs/x", shared_mount=False)
    with pytest.raises(ValueError, match=f"workdir '{tmp_path}' is a local path"):
        storage.require_shared(str(tmp_path), shared_mount=False)
    with pytest.raises(ValueError, match="workdir 'runs/x' is relative: with shared_mount=True"):
        storage.require_shared("runs/x", shared_mount=True)
    storage.require_shared(str(tmp_path), shared_mount=True)
    storage.require_shared("gs://bucket/run", shared_mount=False)


# ---------------------------------------------------------------------------------------- run checkpoints


def test_a_checkpoint_in_a_bucket_restores_bit_for_bit_in_its_layout(gcs_dir):
    mesh = sharding.make_mesh(fsdp=8)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    rng = np.random.default_rng(0)
    state = {"w": jax.device_put(rng.standard_normal((16, 4)).astype(np.float32), rows),
             "b": jax.device_put(rng.standard_normal(8).astype(jnp.bfloat16), rows),
             "count": jnp.int32(7), "rng": jax.random.key(3)}
    directory = storage.join(gcs_dir, "run", "checkpoints")
    with checkpoints.make_manager(directory) as manager:
        assert checkpoints.save(manager, 2, state, config={"lr": 1e-6})
    with checkpoints.make_manager(directory) as manager:
        step, restored = checkpoints.restore_latest(manager, checkpoints.abstract_state(state))
        assert checkpoints.restore_config(manager) == {"lr": 1e-6}
    assert step == 2 and manager.all_steps() == [2]
    for name in ("w", "b", "count"):
        assert restored[name].dtype == state[name].dtype and restored[name].sharding == state[name].sharding
        np.testing.assert_array_equal(np.asarray(restored[name]).reshape(-1).view(np.uint8),
                                      np.asarray(state[name]).reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    assert storage.isfile(storage.join(directory, "2", "commit_success.txt"))  # orbax's atomicity in a bucket


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_samples_and_tensorboard_events_in_a_bucket_resume_as_a_straight_run(gcs_dir):
    workdir = storage.join(gcs_dir, "run")
    with MetricWriter(workdir) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step, "reward": float("nan") if step == 2 else step / 10})
            writer.write_samples(step, [{"completion": f"answer {step}", "rewards": {"iou": step / 4}}])
    with MetricWriter(workdir, start_step=1) as writer:  # resumed from the step-1 checkpoint
        for step in (2, 3):
            writer.write(step, {"loss": 2.0 / step, "reward": step / 10})

    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["loss"] for r in rows] == [1.0, 1.0, 2.0 / 3]
    assert [r["step"] for r in read_samples(workdir)] == [1]
    events = [n for n in storage.listdir(workdir) if n.startswith("events.out.tfevents.")]
    assert len(events) == 2
    accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()  # tensorboard's own reader, through fsspec: what `tensorboard --logdir gs://...` shows
    loss = [(e.step, e.value) for e in accumulator.Scalars("loss")]
    assert loss == [(1, 1.0), (2, 1.0), (3, pytest.approx(2.0 / 3))]


# ---------------------------------------------------------------------------------------- model directories


def params_of(model) -> dict:
    return {path: np.asarray(v.get_raw_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(model, expected: dict) -> None:
    got = params_of(model)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


class Crash(RuntimeError):
    pass


def test_a_model_in_a_bucket_is_replaced_only_once_the_new_one_is_complete(gcs_dir, monkeypatch):
    directory = storage.join(gcs_dir, "model")
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    model_dir.save_model(old, directory)
    assert_same_params(model_dir.load_model(directory), params_of(old))
    with monkeypatch.context() as patch:
        patch.setattr(model_dir, "_write_pointer", lambda *args: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            model_dir.save_model(new, directory)
    assert storage.listdir(directory) == ["config.json", "params-1", "params-2", "params.json"]
    assert_same_params(model_dir.load_model(directory), params_of(old))  # the pointer still names the old one
    model_dir.save_model(new, directory)
    assert storage.listdir(directory) == ["config.json", "params-3", "params.json"]
    assert_same_params(model_dir.load_model(directory), params_of(new))
    assert json.loads(storage.read_text(storage.join(directory, "config.json")))["text_config"]["hidden_size"] == 32


def test_hugging_face_checkpoints_convert_to_and_from_a_bucket(gcs_dir, tmp_path, monkeypatch):
    model = tiny_model(seed=4)
    trained = storage.join(gcs_dir, "run", "model")
    model_dir.save_model(model, trained)
    hf = storage.join(gcs_dir, "run", "hf")
    model_dir.export_hf(trained, hf)  # read from the bucket, converted locally, uploaded
    assert {"config.json", "model.safetensors"} <= set(storage.listdir(hf))

    converted = storage.join(gcs_dir, "next_run", "initial")
    assert model_dir.import_hf(hf, converted) == converted  # staged locally, converted into the bucket
    assert_same_params(model_dir.load_model(converted), params_of(model))
    monkeypatch.setattr(model_dir, "_run_model_port", lambda *args: pytest.fail(f"converted again: {args}"))
    assert model_dir.import_hf(hf, converted) == converted  # once
    assert model_dir.import_hf(trained, str(tmp_path / "unused")) == trained  # already a model directory


def test_a_failed_conversion_names_the_command_and_its_error(gcs_dir, tmp_path):
    (tmp_path / "not_hf").mkdir()
    (tmp_path / "not_hf" / "weights.txt").write_text("no config here")
    with pytest.raises(RuntimeError, match=r"model_port.hf_to_flax --hf .*not_hf.* failed with exit code"):
        model_dir.import_hf(str(tmp_path / "not_hf"), storage.join(gcs_dir, "initial"))


# ---------------------------------------------------------------------------------------- datasets


SYNTHETIC = ["synthetic", "--name", "shapes", "--num-images", "6", "--seed", "2", "--max-side", "96"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def iterator(path: str, tokenizer):
    data = DataConfig(path=path, batch_size=2, max_prompt_len=256, max_pixels=96 * 96, num_workers=0,
                      device_prefetch=0, shuffle=True, seed=5, num_epochs=None)
    return make_iterator(data, Qwen2VLConfig.qwen2_vl_2b(), tokenizer=tokenizer, process_index=0, process_count=1)


def same_batch(a, b) -> bool:
    fields = ("input_ids", "attention_mask", "patches", "positions")
    return a.meta["id"] == b.meta["id"] and all(
        np.array_equal(np.asarray(getattr(a.model_inputs, f)), np.asarray(getattr(b.model_inputs, f))) for f in fields)


def test_a_dataset_prepared_into_a_bucket_gives_the_batches_it_gives_locally(gcs_dir, tmp_path, tokenizer):
    assert prepare.main([*SYNTHETIC, "--output", str(tmp_path)]) == 0
    assert prepare.main([*SYNTHETIC, "--output", gcs_dir]) == 0
    local, remote = str(tmp_path / "shapes"), storage.join(gcs_dir, "shapes")
    assert datasets.dataset_dir(remote) == storage.join(remote, "1.0.0")
    assert datasets.read_metadata(remote) == datasets.read_metadata(local)
    with pytest.raises(FileExistsError, match="shapes/1.0.0 exists"):
        prepare.convert({"train": []}, gcs_dir, "shapes")

    # Iterators are closed in the test: an open one's read-ahead would go on reading from the emulator.
    with iterator(local, tokenizer) as data:
        expected = [next(data) for _ in range(4)]
    state, checkpoint = {"w": jnp.arange(2.0)}, storage.join(gcs_dir, "run", "checkpoints")
    with iterator(remote, tokenizer) as data, checkpoints.make_manager(checkpoint) as manager:
        got = [next(data) for _ in range(2)]
        checkpoints.save(manager, 2, state, data)
    assert all(same_batch(a, b) for a, b in zip(expected, got))
    with iterator(remote, tokenizer) as data, checkpoints.make_manager(checkpoint) as manager:
        step, _ = checkpoints.restore_latest(manager, checkpoints.abstract_state(state), data)
        resumed = [next(data) for _ in range(2)]  # from the data position saved in the bucket
    assert step == 2 and all(same_batch(a, b) for a, b in zip(expected[2:], resumed))
