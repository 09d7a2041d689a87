"""Mesh construction and the logical-axis rules that place parameters and activations on it.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...). One rules table maps each name to
mesh axes of the `("data", "fsdp", "tensor")` mesh, so a recipe changes the layout by changing
rules, never model code. A dimension that a mesh axis does not divide stays replicated (e.g. the 2
key/value heads of Qwen2-VL-2B on a 4-way tensor axis) rather than failing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Training layout: weights and optimizer state sharded over fsdp (ZeRO-3 style) and tensor.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("vit_patch", None),
    ("vit_embed", "fsdp"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", "fsdp"),
    ("vit_merge_out", "tensor"),
    # An adapter's inner dimension, whole: A is split as its kernel's input, B (whose other dimension, heads or
    # mlp, has no fsdp rule) is replicated with its moments. Split over fsdp, B would make the sampler's merge
    # (A B, contracted over the rank) all-reduce a kernel-sized product: measured by `aot`, 7B's cast on a
    # v5e-8 then peaks far above every other phase of the step.
    ("lora_rank", None),
    # activations: batch split over data x fsdp (weights are gathered, FSDP-style), features whole
    # except where tensor parallelism splits heads or the vocabulary.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

# Decoding is bandwidth-bound: keep weights whole on each fsdp group, split only over tensor.
SAMPLING_RULES: tuple[tuple[str, MeshAxes], ...] = tuple(
    (name, None if axes == "fsdp" else axes) for name, axes in DEFAULT_RULES)


_ACTIVE_RULES = contextvars.ContextVar("sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, MeshAxes]]):
    """Rules that `constrain` resolves activation names with, inside this context (default: DEFAULT_RULES)."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names under the ambient mesh (`jax.set_mesh`); a no-op
    without one, so single-device code is unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(names, x.shape, mesh, _ACTIVE_RULES.get() or DEFAULT_RULES)
    return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes; one size may be -1 (the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):
        grid = np.array(devices).reshape(sizes)  # e.g. fake CPU devices with no physical topology
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names.

    Unknown names are an error (a typo must not silently replicate a 7B matrix). A mesh axis is used
    at most once per array, and only where it divides the dimension.
    """
    table: Mapping[str, MeshAxes] = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for axis in axes:
            if axis in used or mesh.shape[axis] == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    value = variable.get_raw_value()
    names = variable.get_metadata().get("out_sharding") or (None,) * len(value.shape)
    return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """NamedShardings, one per variable of `state` (abstract or concrete), by the rules."""
    return nnx.from_flat_state([(path, var.replace(variable_sharding(var, mesh, rules)))
                                for path, var in nnx.to_flat_state(state)])


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of `model` by the rules (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, rules=DEFAULT_RULES) -> NamedSharding:
    """Shard an activation over the batch rule's mesh axes along `batch_axis`."""
    names = [None] * ndim
    names[batch_axis] = "batch"
    spec = [dict(rules)["batch"] if n == "batch" else None for n in names]
    return NamedSharding(mesh, PartitionSpec(*spec))
