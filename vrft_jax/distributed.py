"""Joining the other processes of a multi-host run (a TPU pod slice, several GPU hosts), or nothing on one host.

The launchers say which (`launch/tpu_pod.sh`, `launch/gpu.sh`):
  VRFT_DISTRIBUTED=1                   jax.distributed.initialize() finds the others itself (Cloud TPU's
                                       metadata, Slurm, Open MPI, Kubernetes)
  JAX_COORDINATOR_ADDRESS=host:port    with VRFT_NUM_PROCESSES and VRFT_PROCESS_ID: this process's place
                                       in a job of several (GPU hosts, or processes on one machine)
Neither set: one process, which needs no coordinator.
"""

from __future__ import annotations

import os

import jax


def initialize() -> bool:
    """Call `jax.distributed.initialize` as the environment asks (module docstring); whether it did."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        values = {}
        for name, key in (("num_processes", "VRFT_NUM_PROCESSES"), ("process_id", "VRFT_PROCESS_ID")):
            text = os.environ.get(key)
            if text is None:
                raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {key} is not: every process needs its "
                                 "place in the job (launch/gpu.sh sets both)")
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"{key}={text!r} is not an integer") from None
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], **values)
        return True
    if os.environ.get("VRFT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
