"""`python -m vrft_jax.train --config=NAME[:ARG] [--config.key=value ...] [--workdir=DIR]`

Runs a recipe of `vrft_jax/configs` (or a recipe file) to its `total_steps` (`vrft_jax.run.train`): GRPO by
default, `--config.mode=sft` for supervised fine-tuning on the same records with the recipe's `sft` block (the
paper's SFT baseline: its learning rate, warmup, weight decay and samples per step; full fine-tuning). Both
evaluate the held-out set every `eval_every` steps. With no `--config` the `demo` recipe runs. The workdir
(default `runs/NAME`; a `gs://` URL on a pod) holds the checkpoints, metrics, evaluations, report and final
model (`vrft_jax.run`). SIGTERM saves the step and exits 0; the same command resumes it.

A missing dataset or checkpoint, or a bad key, is one line saying what to do and exit code 2 (`--verbose` adds
the traceback). `--help` lists the recipes and their arguments; `--config=NAME --help` the recipe's fields.
"""

from __future__ import annotations

import math
import sys

from absl import app, logging

from vrft_jax import cli, distributed, recipe, run, storage


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO; the Reporter shows progress
    config, workdir = recipe.from_flags()
    cli.choose_platform(cpu_recipe=config.slice == "cpu")  # before JAX starts a backend
    distributed.initialize()  # a multi-host run's processes find each other (launch/); nothing on one host
    result = run.train(config, workdir)
    if result.preempted:
        sys.exit(0)
    print_summary(config, workdir, result)


def print_summary(config, workdir: str, result: run.Result) -> None:
    """Where the run's outputs are, and the held-out reward before and after."""
    lines = [f"finished {config.name}: {result.step} steps", f"checkpoints {storage.join(workdir, 'checkpoints')}",
             f"model {result.model_dir}"]
    if config.export_hf:
        lines.append(f"Hugging Face export {storage.join(workdir, 'hf')}")
    lines += [f"metrics {storage.join(workdir, 'metrics.jsonl')}, samples {storage.join(workdir, 'samples.jsonl')}",
              f"curves: tensorboard --logdir {workdir}"]
    if result.report:
        lines.append(f"evaluations {storage.join(workdir, 'eval')}; report {result.report}")
    print("\n  ".join(lines), flush=True)
    if result.heldout_before and result.heldout_after:
        (b, b_se, _), (a, a_se, _) = result.heldout_before, result.heldout_after
        gain = (a - b) / math.hypot(a_se, b_se) if a_se or b_se else math.copysign(math.inf, a - b) if a != b else 0.0
        print(f"held-out reward: {b:.4f} ± {b_se:.4f} before training, {a:.4f} ± {a_se:.4f} after "
              f"({gain:+.1f} standard errors)", flush=True)


if __name__ == "__main__":
    argv, verbose = cli.strip_verbose(sys.argv)
    recipe.define_flags()
    app.run(cli.guard(main, verbose=verbose), argv=argv, flags_parser=recipe.parse_flags)
