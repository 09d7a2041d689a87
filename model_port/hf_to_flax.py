"""A Hugging Face Qwen-VL checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense; safetensors, single or sharded)
-> our Flax model, the family read from its config.json.

    python -m model_port.hf_to_flax --hf DIR --out DIR [--dtype bfloat16]

Tensors stream one at a time: each HF tensor is read from the memory-mapped file, reshaped, placed on
the devices (sharded by the rules when a mesh is given, each process supplying only its own shards)
and, for per-layer tensors, written into its slot of the stacked parameter on the devices. The host
never holds more than one HF tensor and its reshaped copy.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_port.mapping import TIED_HEAD, canonical_name, tensor_map
from model_port.safetensors_io import SafetensorsReader
from vrft_jax import cli, model_dir, sharding
from vrft_jax.cli import UserError
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL

log = logging.getLogger(__name__)


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint's tensors do not match the architecture its config describes."""


def load_hf(path: str, dtype=None, *, compute_dtype=None, mesh: jax.sharding.Mesh | None = None,
            rules=sharding.DEFAULT_RULES, **runtime) -> Qwen2VL:
    """Build a Qwen2VL from an HF checkpoint directory.

    Args:
      dtype: parameter dtype; None keeps the checkpoint's (bf16 stays bf16, bit for bit).
      compute_dtype: activation dtype; defaults to the parameter dtype.
      mesh: when given, every parameter lands sharded by `rules`; else on the default device.
      runtime: other `Qwen2VLConfig` runtime fields (remat, precision).
    """
    reader = SafetensorsReader(path, rename=canonical_name)
    if dtype is None:
        dtype = reader.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in reader.names() \
            else np.float32
    dtype = jnp.dtype(dtype)
    config = Qwen2VLConfig.from_hf(path, param_dtype=dtype, dtype=compute_dtype or dtype, **runtime)
    entries = tensor_map(config)
    check_tensors(reader, config, entries)

    abstract = nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abstract_state))
    unmapped = set(flat) - {e.path for e in entries}
    if unmapped:
        raise RuntimeError(f"internal error: parameters without an HF tensor: {sorted(unmapped)}")
    for entry in entries:
        variable = flat[entry.path]
        target = variable.get_raw_value()
        placement = (sharding.variable_sharding(variable, mesh, rules) if mesh is not None
                     else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        if entry.num_layers is None:
            array = _place(entry.to_ours(reader.read(entry.hf_name)).astype(dtype), placement)
        else:
            array = _stack_layers(reader, entry, target.shape, dtype, placement)
        flat[entry.path] = variable.replace(array)
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def _place(host: np.ndarray, placement: jax.sharding.Sharding) -> jax.Array:
    """Put a host array on the devices of `placement`; each process supplies only its own shards."""
    array = jax.make_array_from_callback(host.shape, placement, lambda index: host[index])
    array.block_until_ready()
    return array


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, index):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, axis=0)


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype, placement):
    """A compiled constructor of a zero array born sharded (never whole on one device)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=placement)


def _stack_layers(reader, entry, shape, dtype, placement) -> jax.Array:
    """Fill a stacked parameter on the devices one layer at a time: the host only ever holds one HF tensor."""
    if isinstance(placement, jax.sharding.NamedSharding):
        if placement.spec and placement.spec[0] is not None:
            raise ValueError(f"{'/'.join(entry.path)}: the stacked layer axis must not be sharded to load it")
        layer_placement = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec(*placement.spec[1:]))
    else:
        layer_placement = placement
    stacked = _zeros(tuple(shape), jnp.dtype(dtype), placement)()
    for i, name in enumerate(entry.hf_names()):
        layer = _place(entry.to_ours(reader.read(name)).astype(dtype), layer_placement)
        stacked = _set_layer(stacked, layer, i)
    return stacked


def check_tensors(reader: SafetensorsReader, config: Qwen2VLConfig, entries) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and mis-shaped tensor."""
    expected = {name: entry.hf_shape for entry in entries for name in entry.hf_names()}
    present = reader.names()
    allowed_extra = {TIED_HEAD} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - allowed_extra)
    wrong = [f"{name}: expected {expected[name]}, found {reader.shape(name)}"
             for name in sorted(set(expected) & present) if reader.shape(name) != expected[name]]
    if config.tie_word_embeddings and TIED_HEAD in present:
        head, embed = reader.read(TIED_HEAD), reader.read("model.embed_tokens.weight")
        if head.shape != embed.shape or not np.array_equal(head.view(np.uint8), embed.view(np.uint8)):
            wrong.append(f"{TIED_HEAD}: the config ties word embeddings but it differs from model.embed_tokens.weight")
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped tensors ({len(wrong)}): {'; '.join(wrong)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {reader.path} does not match its config:\n  " + "\n  ".join(problems))


DTYPES = ("float32", "bfloat16", "float16")


def main(argv) -> None:
    """The command (argv[0] its name); run through `cli.run`, which makes a UserError one line."""
    parser = cli.ArgumentParser(prog="python -m model_port.hf_to_flax", description=__doc__)
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output Flax model directory (vrft_jax.model_dir)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="parameter dtype (default: the checkpoint's)")
    parser.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show an error's traceback as well as its line")
    args = parser.parse_args(argv[1:])
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        raise UserError(f"--hf {args.hf}: " + ("no such folder" if not os.path.isdir(args.hf) else
                                               "no config.json (a Hugging Face checkpoint folder holds config.json "
                                               "and its .safetensors files)"))
    cli.choose_platform()
    model = load_hf(args.hf, dtype=args.dtype)
    model_dir.save_model(model, args.out, hf_source=args.hf)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"converted {args.hf} -> {args.out}: {count:,} parameters in {model.config.param_dtype.name}")


if __name__ == "__main__":
    cli.run(main)
