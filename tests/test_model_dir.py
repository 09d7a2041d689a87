"""Model directories (review M3): saving over a model never leaves the directory without a complete
one, whatever the moment of a crash, and a load without a mesh does not put the model on one device."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tiny_model import tiny_model
from vrft_jax import model_dir


def params_of(model) -> dict:
    return {path: np.asarray(v.get_raw_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(model, expected: dict) -> None:
    got = params_of(model)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def entries(directory) -> set[str]:
    return set(os.listdir(directory))


class Crash(RuntimeError):
    pass


def test_a_save_that_dies_before_the_swap_keeps_the_old_model(tmp_path, monkeypatch):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    model_dir.save_model(old, str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(model_dir, "_swap_in_pending", lambda directory: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            model_dir.save_model(new, str(tmp_path))
    assert {"params", "params.pending", "config.json"} <= entries(tmp_path)  # the new copy complete, not in place
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(old))
    model_dir.save_model(new, str(tmp_path))  # the next save cleans up and succeeds
    assert entries(tmp_path) == {"params", "config.json"}
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(new))


def test_a_crash_between_the_two_renames_loses_neither_copy(tmp_path, monkeypatch):
    old, new, newest = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=3)
    model_dir.save_model(old, str(tmp_path))

    def first_rename_only(directory):
        os.rename(os.path.join(directory, "params"), os.path.join(directory, "params.old"))
        raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(model_dir, "_swap_in_pending", first_rename_only)
        with pytest.raises(Crash):
            model_dir.save_model(new, str(tmp_path))
    assert "params" not in entries(tmp_path) and {"params.old", "params.pending"} <= entries(tmp_path)
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(new))  # the newer complete copy
    os.rename(tmp_path / "params.pending", tmp_path / "params.lost")  # had only the old copy survived:
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(old))
    os.rename(tmp_path / "params.lost", tmp_path / "params.pending")
    model_dir.save_model(newest, str(tmp_path))
    assert entries(tmp_path) == {"params", "config.json"}
    assert_same_params(model_dir.load_model(str(tmp_path)), params_of(newest))


def test_an_unfinished_orbax_write_is_never_loaded_and_is_cleaned_up(tmp_path):
    model = tiny_model(seed=1)
    model_dir.save_model(model, str(tmp_path))
    unfinished = tmp_path / "params.pending.orbax-checkpoint-tmp-1234"  # what a crash inside orbax leaves
    unfinished.mkdir()
    (unfinished / "junk").write_text("half a shard")
    assert model_dir.params_path(str(tmp_path)) == str(tmp_path / "params")
    model_dir.save_model(model, str(tmp_path))
    assert entries(tmp_path) == {"params", "config.json"}


def test_load_without_a_mesh_spreads_the_model_over_every_device(tmp_path):
    model = tiny_model(seed=1)
    model_dir.save_model(model, str(tmp_path))
    loaded = model_dir.load_model(str(tmp_path))
    arrays = [v.get_raw_value() for _, v in nnx.to_flat_state(nnx.state(loaded))]
    assert all(len(a.sharding.device_set) == jax.device_count() == 8 for a in arrays)
    embed = loaded.text.embed_tokens.get_raw_value()
    assert not embed.sharding.is_fully_replicated  # split (FSDP), not copied to every device
    assert max(s.data.size for s in embed.addressable_shards) == embed.size // 8
    assert_same_params(loaded, params_of(model))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 32 and config["dtype"] == "float32"
