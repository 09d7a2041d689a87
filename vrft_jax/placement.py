"""Where the training programs' arrays live: parameter and optimizer-state layouts, the batch's split
over the mesh, micro-batches, and the one way a program is jitted onto a mesh.

On a ("data", "fsdp", "tensor") mesh, parameters and optimizer moments are laid out by their logical
axes (`vrft_jax.sharding`'s rules), counters and scalars are replicated, and a batch is split over
the mesh's batch axes on its first (prompt or completion-row) axis. Without a mesh everything sits
on the default device.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vrft_jax import sharding


def tree_shardings(tree, mesh, rules=sharding.DEFAULT_RULES):
    """NamedShardings for a tree holding nnx Variables (parameters, optimizer moments) by their logical
    axes; every other leaf (counters, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, nnx.Variable):
            return x.replace(sharding.variable_sharding(x, mesh, rules))
        return replicated

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def placements(tree, mesh=None, rules=sharding.DEFAULT_RULES):
    """`tree_shardings` on a mesh; without one, the default device (a single sharding, a prefix of any tree)."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return tree_shardings(tree, mesh, rules)


def shard_batch(batch, mesh, rules=sharding.DEFAULT_RULES):
    """Place every array of `batch` (a `TrainBatch`) split over the mesh's batch axes on its first
    (prompt or row) axis."""
    return jax.device_put(batch, sharding.batch_sharding(mesh, 1, rules=rules))


def jit_on_mesh(fn: Callable, mesh=None, rules=sharding.DEFAULT_RULES, *, in_shardings=None, out_shardings=None,
                donate_argnums=()):
    """`jax.jit(fn)` with its arguments and results laid out on `mesh`, and `fn` traced under the mesh
    and the logical-axis rules (so `sharding.constrain` inside it resolves). Without a mesh, a plain
    `jax.jit` (the shardings are ignored: everything is on the default device)."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)

    def on_mesh(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(rules):
            return fn(*args)

    return jax.jit(on_mesh, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)


def split_micro_batches(tree, prompts: int, micro_batches: int, mesh=None, rules=sharding.DEFAULT_RULES):
    """Every leaf of `tree`: leading axis [B*r, ...] -> [micro_batches, B/micro_batches*r, ...] (r = 1 for
    prompt arrays, G for completion arrays). Micro-batch j takes prompts j, j+k, j+2k, ...: each device
    keeps its own rows."""
    if prompts % micro_batches:
        raise ValueError(f"TrainConfig.micro_batches={micro_batches} does not divide the batch's {prompts} prompts")
    k = micro_batches

    def split(x):
        per_prompt = x.shape[0] // prompts
        x = x.reshape(prompts // k, k, per_prompt, *x.shape[1:]).swapaxes(0, 1)
        x = x.reshape(k, (prompts // k) * per_prompt, *x.shape[3:])
        if mesh is not None:  # each micro-batch split like the batch (where the axes divide its rows)
            names = (None, "batch") + (None,) * (x.ndim - 2)
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, sharding.logical_to_spec(names, x.shape, mesh, rules)))
        return x

    return jax.tree.map(split, tree)


def merge_micro_batches(tree, prompts: int):
    """Inverse of `split_micro_batches`, leaf by leaf: [k, B/k*r, ...] -> [B*r, ...]."""

    def merge(x):
        k, rows = x.shape[:2]
        per_prompt = rows * k // prompts
        x = x.reshape(k, prompts // k, per_prompt, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(prompts * per_prompt, *x.shape[3:])

    return jax.tree.map(merge, tree)
