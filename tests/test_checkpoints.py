"""Run checkpoints: a restored run continues bit for bit (train state, PRNG key, data position,
config), onto another mesh; a crash mid-save never costs the last good checkpoint; SIGTERM is a flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_model import tiny_model
from vrft_jax import checkpoints, placement, sharding, train_step
from vrft_jax.data import synthetic
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.storage import InMemorySource
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer
from vrft_jax.optimizer import OptimizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# masked weight decay: optax's empty MaskedState too
TRAIN = train_step.TrainConfig(optimizer=OptimizerConfig(weight_decay=0.1))


@pytest.fixture(scope="module")
def data_iterator_factory():
    """Fresh iterators of one small shuffled, repeating pipeline (NumPy batches, no workers)."""
    tokenizer, config = load_tokenizer(), Qwen2VLConfig.qwen2_vl_2b()
    records = list(synthetic.detection_records(6, seed=3))
    data = DataConfig(batch_size=2, max_prompt_len=256, max_pixels=160 * 160, num_workers=0, device_prefetch=0,
                      shuffle=True, seed=5, num_epochs=None)

    def make():
        return make_iterator(data, config, tokenizer=tokenizer, source=InMemorySource(records, "test"),
                             process_index=0, process_count=1)

    return make


@pytest.fixture(scope="module")
def fresh_state():
    """A TrainState of the tiny model on an 8-device FSDP mesh."""
    return train_step.init_state(tiny_model(), TRAIN, mesh=sharding.make_mesh(fsdp=8))[1]


def run_state(like, seed: int):
    """{"train": `like` with every array random (moments, counts and counters too), in its layout, "rng"}."""
    rng = np.random.default_rng(seed)

    def random(x):
        host = (rng.standard_normal(x.shape) if jnp.issubdtype(x.dtype, jnp.floating)
                else rng.integers(0, 1000, x.shape))
        return jax.device_put(host.astype(x.dtype), x.sharding)

    return {"train": jax.tree.map(random, like), "rng": jax.random.fold_in(jax.random.key(seed), 7)}


def host_copy(state) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


def same_batch(a, b) -> bool:
    fields = ("input_ids", "attention_mask", "patches", "positions")
    return a.meta["id"] == b.meta["id"] and all(
        np.array_equal(np.asarray(getattr(a.model_inputs, f)), np.asarray(getattr(b.model_inputs, f))) for f in fields)


def test_resume_is_bitwise_onto_another_mesh_with_the_same_next_batch(tmp_path, data_iterator_factory, fresh_state):
    config = {"model": "tiny", "total_steps": 6, "learning_rate": 1e-6}
    data = data_iterator_factory()
    with checkpoints.make_manager(tmp_path, max_to_keep=2) as manager:
        for step in (1, 2, 3):
            state = run_state(fresh_state, seed=step)
            next(data)  # the step's batch
            assert checkpoints.save(manager, step, state, data, config=config)
        saved, expected = host_copy(state), next(data)
        for x in jax.tree.leaves(state):  # the step after a save donates the state: the save must not need it
            x.delete()
        next(data)  # and the loop reads on while the save is written
    assert manager.all_steps() == [2, 3]  # max_to_keep

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = jax.eval_shape(lambda: {"train": train_step.init_state(tiny_model(), TRAIN, mesh=mesh)[1],
                                       "rng": jax.random.key(0)})
    target = checkpoints.abstract_state(abstract, placement.tree_shardings(abstract, mesh))
    resumed = data_iterator_factory()
    with checkpoints.make_manager(tmp_path) as manager:
        step, state = checkpoints.restore_latest(manager, target, resumed)
        assert checkpoints.restore_config(manager) == config
    assert step == 3
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for got, want, x, t in zip(host_copy(state), saved, jax.tree.leaves(state), jax.tree.leaves(target)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert x.dtype == t.dtype and x.sharding == t.sharding  # landed sharded, in the target layout
    assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)  # typed again
    embed = state["train"].params["text"]["embed_tokens"].get_raw_value()
    assert not embed.sharding.is_fully_replicated
    assert same_batch(next(resumed), expected)
    assert resumed.batches == 4


def test_save_interval_force_and_an_empty_directory(tmp_path):
    state = {"w": jnp.arange(4.0), "rng": jax.random.key(1)}
    with checkpoints.make_manager(tmp_path / "run", save_interval_steps=2, max_to_keep=None) as manager:
        assert checkpoints.restore_latest(manager, checkpoints.abstract_state(state)) is None
        saved = [step for step in range(1, 6) if checkpoints.save(manager, step, state)]
        assert checkpoints.save(manager, 5, state, force=True)  # e.g. on SIGTERM
    assert saved == [1, 2, 4]  # the first step given, then the multiples of the interval
    assert manager.all_steps() == [1, 2, 4, 5]


CRASHING_SAVE = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from vrft_jax import checkpoints

    manager = checkpoints.make_manager(sys.argv[1])
    checkpoints.save(manager, 1, {"w": jnp.arange(8.0), "rng": jax.random.key(1)}, config={"step": 1})
    manager.wait_until_finished()

    async def die(self, *args, **kwargs):  # the process dies once every file of step 2 is written,
        os._exit(17)                       # just before orbax renames it into place

    atomicity.AtomicRenameTemporaryPath.finalize = die
    checkpoints.save(manager, 2, {"w": -jnp.arange(8.0), "rng": jax.random.key(2)}, config={"step": 2})
    manager.wait_until_finished()
    os._exit(0)
""")


def test_a_process_killed_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    directory = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    child = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(directory)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 17, child.stderr[-3000:]
    unfinished = [n for n in os.listdir(directory) if n.startswith("2.orbax-checkpoint-tmp")]
    assert unfinished and sorted(os.listdir(directory / unfinished[0])) != []  # step 2's files were written
    template = checkpoints.abstract_state({"w": jnp.zeros(8), "rng": jax.random.key(0)})
    with checkpoints.make_manager(directory) as manager:
        assert manager.all_steps() == [1]
        step, state = checkpoints.restore_latest(manager, template)
        assert step == 1 and checkpoints.restore_config(manager) == {"step": 1}
        np.testing.assert_array_equal(state["w"], np.arange(8.0))
        np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(jax.random.key(1)))
        assert checkpoints.save(manager, 2, {"w": -jnp.arange(8.0), "rng": jax.random.key(2)})
    # The manager removed the leftover in the background from its opening (a save waits for that), and
    # closing it finished the new step 2: no temporary directory is left.
    assert not [n for n in os.listdir(directory) if "tmp" in n]
    with checkpoints.make_manager(directory) as manager:
        assert manager.all_steps() == [1, 2]


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoints.PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal; Python runs the handler at the next bytecode
        assert guard.received == signal.SIGTERM
        assert guard.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is before
