"""A data pipeline in a fresh process, for the tests that need one (resume, multi-process).

    python pipeline_child.py '<job JSON>'   ->   one JSON line on stdout

job: {"config": DataConfig dict, "tokenizer": dir, "batches": n | null (all), "state": saved state | null,
      "distributed": {"coordinator": "host:port", "processes": n, "process_id": i} | null}
"""

from __future__ import annotations

import hashlib
import json
import os
import sys


def digest(batch) -> str:
    import numpy as np

    h = hashlib.sha256(json.dumps(batch.meta["id"]).encode())
    for name in ("input_ids", "attention_mask", "positions", "patches", "patch_positions"):
        h.update(np.asarray(getattr(batch.model_inputs, name)).tobytes())
    return h.hexdigest()


def main() -> None:
    job = json.loads(sys.argv[1])
    distributed = job.get("distributed")
    if distributed:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if distributed:
        jax.distributed.initialize(coordinator_address=distributed["coordinator"],
                                   num_processes=distributed["processes"], process_id=distributed["process_id"])
    from sample_data import config_for

    from vrft_jax import sharding
    from vrft_jax.data.config import DataConfig
    from vrft_jax.data.pipeline import make_iterator
    from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(job["tokenizer"])
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1) if distributed else None
    iterator = make_iterator(DataConfig.from_dict(job["config"]), config_for(tokenizer), tokenizer=tokenizer, mesh=mesh)
    if job.get("state"):
        iterator.set_state(job["state"])
    out = {"digests": [], "ids": [], "global_shape": None, "process_index": jax.process_index()}
    count = job.get("batches")
    for k, batch in enumerate(iterator):
        if count is not None and k == count:
            break
        out["ids"].append(batch.meta["id"])
        if mesh is None:
            out["digests"].append(digest(batch))
        else:
            out["global_shape"] = list(batch.model_inputs.input_ids.shape)
    iterator.close()
    print(json.dumps(out), flush=True)
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
