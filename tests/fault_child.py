"""The train command with one failure injected into one process of a multi-process job, for the agreed-error
tests (`tests/test_agreed_errors.py`):

    python tests/fault_child.py SITE -- --config=... (the train command's arguments)

The process whose `VRFT_PROCESS_ID` is the site's (process 1 where every process does the work, process 0
where only it does: file writes, `prepare`, the model directory's swap, the HF conversion) raises
`InjectedFailure` naming the site at that point; every other process runs the command unchanged.
"""

import os
import runpy
import sys

import numpy as np


class InjectedFailure(RuntimeError):
    pass


def _raiser(site):
    def fail(*args, **kwargs):
        raise InjectedFailure(f"injected failure at {site} on process {os.environ['VRFT_PROCESS_ID']}")

    return fail


def _right_padded_row(real):
    """The first row of this process's prompts ending in padding: a batch the rollout must refuse."""

    def to_batch(self, host):
        mask = np.array(host["inputs"]["attention_mask"])
        mask[0, -1] = 0
        host["inputs"] = {**host["inputs"], "attention_mask": mask}
        return real(self, host)

    return to_batch


def inject(site: str) -> int:
    """Patch `site` in this process; the process it fails on."""
    from vrft_jax import metrics, model_dir, sft
    from vrft_jax.data import pipeline, prepare
    from vrft_jax.evaluate import evaluators

    sites = {  # site: (object, attribute, replacement, process)
        "sft_target": (sft, "target_tokens", _raiser("sft_target"), 1),
        "left_padding": (pipeline.DataIterator, "_to_batch", _right_padded_row(pipeline.DataIterator._to_batch), 1),
        "eval_rewards": (evaluators.Evaluator, "_add_rewards", _raiser("eval_rewards"), 1),
        "metrics_write": (metrics.MetricWriter, "write", _raiser("metrics_write"), 0),
        "prepare": (prepare, "main", _raiser("prepare"), 0),
        "model_swap": (model_dir, "_publish", _raiser("model_swap"), 0),
        "hf_conversion": (model_dir, "_run_model_port", _raiser("hf_conversion"), 0),
    }
    owner, name, replacement, process = sites[site]
    if int(os.environ["VRFT_PROCESS_ID"]) == process:
        setattr(owner, name, replacement)
    return process


if __name__ == "__main__":
    site, separator, *arguments = sys.argv[1:]
    assert separator == "--", "usage: fault_child.py SITE -- TRAIN ARGUMENTS"
    inject(site)
    sys.argv = ["vrft_jax.train", *arguments]
    runpy.run_module("vrft_jax.train", run_name="__main__", alter_sys=True)
