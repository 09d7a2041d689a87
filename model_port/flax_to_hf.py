"""Our Flax model -> a Hugging Face directory that its family's `...ForConditionalGeneration.from_pretrained` loads.

    python -m model_port.flax_to_hf --ckpt DIR --out DIR [--max-shard-gb 2]

One stacked parameter is brought to the host at a time and written layer by layer into shard files
of bounded size, so the export never holds the whole model in host memory.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from model_port.mapping import hub_name, tensor_map
from model_port.safetensors_io import write_checkpoint
from vrft_jax import cli, model_dir
from vrft_jax.models.qwen2_vl.model import Qwen2VL

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def save_hf(model: Qwen2VL, path: str, *, hf_config: dict | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `config.json` and the weights (in the parameter dtype) to `path`; returns the shard files."""
    entries = tensor_map(model.config)
    family = model.config.family
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    dtype = model.config.param_dtype
    plan = [(hub_name(name, family), int(np.prod(e.hf_shape)) * dtype.itemsize) for e in entries
            for name in e.hf_names()]

    def tensors():
        for entry in entries:
            host = np.asarray(jax.device_get(flat[entry.path].get_raw_value()))
            for i, name in enumerate(entry.hf_names()):
                yield hub_name(name, family), entry.to_hf(host if entry.num_layers is None else host[i])
            del host

    os.makedirs(path, exist_ok=True)
    files = write_checkpoint(path, plan, tensors(), max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(hf_config), f, indent=2, sort_keys=True)
    return files


def main(argv) -> None:
    """The command (argv[0] its name); run through `cli.run`, which makes a UserError one line."""
    parser = cli.ArgumentParser(prog="python -m model_port.flax_to_hf", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="Flax model directory (a run's model/, or hf_to_flax's)")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3,
                        help="largest safetensors file, in GiB")
    parser.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show an error's traceback as well as its line")
    args = parser.parse_args(argv[1:])
    if not model_dir.is_model_dir(args.ckpt):
        raise cli.UserError(f"--ckpt {args.ckpt}: not a model directory (a run's model/ or hf_to_flax's --out, "
                            f"holding {model_dir.POINTER_FILE})")
    if not args.max_shard_gb > 0:
        raise cli.UserError(f"--max-shard-gb {args.max_shard_gb}: must be positive")
    cli.choose_platform()
    model, hf_config = model_dir.load_model(args.ckpt, with_hf_config=True)
    files = save_hf(model, args.out, hf_config=hf_config, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    copied = model_dir.copy_hf_assets(args.ckpt, args.out)
    print(f"exported {args.ckpt} -> {args.out}: {len(files)} safetensors file(s); "
          f"assets: {', '.join(copied) or 'none'}")


if __name__ == "__main__":
    cli.run(main)
