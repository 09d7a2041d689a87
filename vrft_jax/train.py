"""`python -m vrft_jax.train --config=NAME[:ARG] [--config.key=value ...] [--workdir=DIR]`

Runs a recipe of `vrft_jax/configs` (or a recipe file) to its `total_steps`: GRPO by default,
`--config.mode=sft` for the paper's SFT baseline on the same records. With no `--config` the
`demo` recipe runs. The workdir (default `runs/NAME`) holds:

    config.json      the resolved config
    metrics.jsonl    one row per logged step; TensorBoard events beside it; samples.jsonl
    checkpoints/     orbax steps: train state, data position, config (resumed automatically)
    model/           the final model directory (`vrft_jax.model_dir`); hf/ with `export_hf=True`
    warm_start/      the demo's SFT warm start, a run of its own (reused by a second run)
    heldout_before.json  the held-out reward of the initial weights, reported again on resume

SIGTERM (a TPU VM's preemption notice) saves the step and exits 0; the same command resumes it and
ends bit for bit where a straight run would. The initial weights are the recipe's `model.checkpoint`:
a model directory, or a Hugging Face one, converted once into `workdir/initial` by `model_port`
(run as its own process: the library never imports the converter).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, logging
from flax import nnx

from vrft_jax import checkpoints, distributed, grpo_loop, model_dir, recipe, sft
from vrft_jax.data import make_iterator
from vrft_jax.evaluate import evaluators, report
from vrft_jax.metrics import MetricWriter, every, read_metrics
from vrft_jax.models.qwen2_vl.model import Qwen2VL, with_config
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer, resolve_tokenizer_path
from vrft_jax.progress import Reporter, Timer
from vrft_jax.rewards.frames import Frame, frame_of
from vrft_jax.train_step import check_nonfinite, init_state, make_score_fn, make_train_step

TIMING_KEYS = ("time/", "rollout_tokens_per_s", "eval/examples_per_s")  # all that differs between identical runs


@dataclasses.dataclass(frozen=True)
class Result:
    """What a finished (or preempted) run leaves: its last step, the final model directory, and the
    held-out reward before and after training (mean, standard error, examples), when measured."""

    step: int
    preempted: bool
    model_dir: str | None
    heldout_before: tuple[float, float, int] | None = None
    heldout_after: tuple[float, float, int] | None = None
    report: str | None = None


# ---------------------------------------------------------------------------------------------- setup


def initial_model(config: ml_collections.ConfigDict, settings: recipe.Settings,
                  workdir: str) -> tuple[Qwen2VL, str | None]:
    """(model, its directory): the SFT warm start's result when the recipe asks for one, else the
    recipe's checkpoint (an HF directory is converted once), else random weights from the seed."""
    if config.mode == "grpo" and config.warm_start.sft_steps > 0:
        result = train(warm_start_config(config), os.path.join(workdir, "warm_start"))
        if result.preempted:
            raise SystemExit(0)
        directory = result.model_dir
    elif config.model.checkpoint:
        directory = model_directory(config.model.checkpoint, os.path.join(workdir, "initial"))
    else:
        return Qwen2VL(settings.model, rngs=nnx.Rngs(config.seed)), None
    model = model_dir.load_model(directory, dtype=settings.model.param_dtype)
    return _with_run_settings(model, settings), directory


def _with_run_settings(model: Qwen2VL, settings: recipe.Settings) -> Qwen2VL:
    m = settings.model
    return with_config(model, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)


def model_directory(checkpoint: str, converted: str) -> str:
    """`checkpoint` itself when it is a model directory; an HF directory is converted into `converted`."""
    if os.path.isdir(os.path.join(checkpoint, model_dir.PARAMS_DIR)):
        return checkpoint
    if not os.path.isdir(os.path.join(converted, model_dir.PARAMS_DIR)):
        logging.info("converting the HF checkpoint %s into %s", checkpoint, converted)
        subprocess.run([sys.executable, "-m", "model_port.hf_to_flax", "--hf", checkpoint, "--out", converted],
                       check=True)
    return converted


def warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The recipe as an SFT run of `warm_start.sft_steps` at `warm_start.learning_rate`."""
    sft_run = ml_collections.ConfigDict(config.to_dict())
    sft_run.mode = "sft"
    sft_run.total_steps = config.warm_start.sft_steps
    sft_run.warm_start.sft_steps = 0
    sft_run.train.learning_rate = config.warm_start.learning_rate
    sft_run.train.decay_steps = config.warm_start.sft_steps
    sft_run.export_hf = False
    sft_run.eval_every = 0
    return sft_run


def make_synthetic_data(config: ml_collections.ConfigDict) -> None:
    """Write a recipe's synthetic datasets when they are missing (the demo's: nothing to download). One
    already there must have been made by the recipe's own command: a set left by another version of the
    recipe is an error naming the arguments that differ, never silently trained on. Any other missing
    dataset is the user's to make: `recipe.build` names the command."""
    from vrft_jax.data import prepare, storage

    for which, path, command in (("train", config.data.path, config.source.prepare),
                                 ("eval", config.eval.path, config.eval.prepare)):
        if not path or not command.startswith("synthetic"):
            continue
        argv = recipe.prepare_argv(config, which)
        try:
            storage.dataset_dir(path)
        except FileNotFoundError:
            if jax.process_index() == 0:
                prepare.main(argv)
            if jax.process_count() > 1:  # the others read it once it is written
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"vrft_jax.train:{which} data written")
            continue
        expected, made = prepare.source_args(argv), storage.read_metadata(path).get("source", {})
        differ = sorted(k for k in expected.keys() | made.keys() if expected.get(k) != made.get(k))
        if differ:
            raise ValueError(
                f"the {which} dataset at {path} was made with other arguments than the recipe's "
                f"`prepare {command}`: " + ", ".join(f"{k}={made.get(k)!r} (recipe: {expected.get(k)!r})"
                                                     for k in differ)
                + f"; delete {path} (and the run directories trained on it) to make it again")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------- held-out


class Evaluation:
    """The run's held-out evaluation (`vrft_jax.evaluate`): the recipe's evaluator on the sampler's weights,
    its predictions and metrics under `workdir/eval/`, its scalars under `eval/` in metrics.jsonl and
    TensorBoard. Every example once: the last batch of the finite stream is filled with rows of padding
    only, which the sampler takes and the metrics leave out."""

    def __init__(self, config, settings, phases: grpo_loop.Phases, workdir: str):
        self.evaluator = evaluators.from_recipe(config, settings, tokenizer=phases.tokenizer,
                                                sampler_graphdef=phases.sampler_graphdef, mesh=phases.mesh)
        self.phases, self.directory = phases, os.path.join(workdir, "eval")
        self.last: evaluators.EvalResult | None = None

    def __call__(self, step: int, params, writer: MetricWriter | None) -> evaluators.EvalResult | None:
        if self.evaluator is None:
            return None
        result = self.evaluator.run(self.phases.sampler_cast(params))
        if jax.process_index() == 0:
            evaluators.save(result, self.directory, step)
        if writer is not None:
            writer.write(step, {f"eval/{k}": v for k, v in result.scalars.items()})
        self.last = result
        return result


def _heldout(result: evaluators.EvalResult | None) -> tuple[float, float, int] | None:
    """(mean reward, its standard error, examples) of an evaluation."""
    if result is None:
        return None
    m = result.metrics
    return m["reward"], m["reward_standard_error"], m["examples"]


# ------------------------------------------------------------------------------------------------ run


def train(config: ml_collections.ConfigDict, workdir: str) -> Result:
    """Run `config` in `workdir` from its latest checkpoint (or the start) to `total_steps`."""
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    make_synthetic_data(config)
    settings = recipe.build(config)
    mesh = recipe.make_mesh(config)
    model, source_dir = initial_model(config, settings, workdir)
    tokenizer = load_tokenizer(resolve_tokenizer_path(checkpoint_dir=source_dir))
    sft_mode = config.mode == "sft"
    train_config = settings.train.replace(grpo=sft.sft_config()) if sft_mode else settings.train
    graphdef, state = init_state(model, train_config, mesh=mesh)
    del model
    step_fn = make_train_step(graphdef, state, train_config, mesh=mesh)
    reference = None
    if not sft_mode and train_config.grpo.beta > 0:  # the initial weights, a copy the donated step never sees
        reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state.params)
    phases = grpo_loop.Phases(
        graphdef=graphdef, train=train_config, sampling=settings.sampling, reward_fn=settings.reward_fn,
        tokenizer=tokenizer, step=step_fn, score=make_score_fn(graphdef, state.params, train_config, mesh=mesh),
        reference=reference, sampler_graphdef=grpo_loop.sampler_graphdef(settings.model, settings.sampler_dtype),
        sampler_cast=grpo_loop.make_sampler_cast(state.params, settings.sampler_dtype, mesh,
                                                 train_config.sampler_layout), mesh=mesh)

    data = make_iterator(settings.data, settings.model, mesh=mesh, tokenizer=tokenizer, checkpoint_dir=source_dir)
    manager = checkpoints.make_manager(os.path.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_every,
                                       max_to_keep=config.keep_checkpoints)
    restored = checkpoints.restore_latest(manager, checkpoints.abstract_state(state), data)
    start = 0
    if restored is not None:
        start, state = restored
        logging.info("resumed %s at step %d", workdir, start)
    total = config.total_steps
    writer = MetricWriter(workdir, start_step=start)
    evaluation = Evaluation(config, settings, phases, workdir) if not sft_mode and config.eval_every else None
    before = None
    if evaluation is not None:
        # Measured once, on the initial weights (step 0), and kept in the workdir: a resumed run reports it too.
        if start == 0:
            before = _heldout(evaluation(0, state.params, writer))
            _write_heldout(workdir, before)
        else:
            before = _read_heldout(workdir)
        _report_heldout("before", before)
    reporter = Reporter(total, start_step=start)
    timer = Timer()
    key = jax.random.key(config.seed)
    resolved = json.loads(config.to_json_best_effort())
    preempted = False
    # An error (every process's at once: `distributed.agreed`) still lets the checkpoint in flight finish and
    # closes the files, so no process is left waiting for another in orbax's commit or at exit.
    try:
        with checkpoints.PreemptionGuard() as guard:
            for step in range(start + 1, total + 1):
                timer.reset()
                with timer.timed("data"):  # a bad record one process meets stops them all, naming it
                    batch = distributed.agreed(next, data)
                log = every(step, config.log_every, total)
                if sft_mode:
                    state, outcome = sft_iteration(phases, state, batch, config, timer, log=log)
                else:
                    state, outcome = grpo_loop.iteration(
                        phases, state, batch, jax.random.fold_in(key, step), timer,
                        samples=4 if every(step, config.sample_every, total) else 0, log=log)
                scalars = None
                if log:
                    scalars = {**{k: float(v) for k, v in jax.device_get(outcome.device).items()}, **outcome.host,
                               **timer.scalars(), "skipped_records": float(sum(batch.skipped.values()))}
                    writer.write(step, scalars)
                    check_nonfinite(state, train_config)
                if outcome.samples:
                    writer.write_samples(step, outcome.samples)
                if evaluation is not None and every(step, config.eval_every, total):
                    evaluation(step, state.params, writer)
                reporter.update(step, scalars)
                preempted = guard.should_stop(step)
                checkpoints.save(manager, step, state, data, config=resolved, force=preempted or step == total)
                if preempted:
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        reporter.close()
    if evaluation is not None and evaluation.last is None and not preempted:  # resumed at the end: evaluate
        evaluation(total, state.params, None)
    if preempted:
        logging.warning("preempted: saved step %d of %s; the same command resumes it", step, workdir)
        return Result(step=step, preempted=True, model_dir=None)
    final_dir = os.path.join(workdir, "model")
    final_model = nnx.merge(graphdef, state.params)
    model_dir.save_model(final_model, final_dir, hf_source=source_dir if source_dir and _is_hf(source_dir) else None)
    after, report = None, None
    if evaluation is not None and evaluation.last is not None:
        after = _heldout(evaluation.last)
        _report_heldout("after", after)
        report = write_report(config, workdir, evaluation)
    if config.export_hf and jax.process_index() == 0:  # from the saved directory: no process holds it whole
        export_hf(final_dir, os.path.join(workdir, "hf"))
    return Result(step=total, preempted=False, model_dir=final_dir, heldout_before=before, heldout_after=after,
                  report=report)


def write_report(config, workdir: str, evaluation: Evaluation) -> str | None:
    """The run's visual report (`vrft_jax.evaluate.report`) from its last evaluation; its path."""
    if jax.process_index() != 0:
        return None
    before_path = os.path.join(evaluation.directory, "step_0.json")
    before = None
    if os.path.exists(before_path):
        with open(before_path, encoding="utf-8") as f:
            before = json.load(f)
    result = evaluation.last
    frame = "rel1000" if frame_of(config.rewards.frame) is Frame.REL1000 else "pixels"
    return report.write_report(workdir, predictions=result.predictions, metrics=result.metrics,
                               history=read_metrics(workdir), image_of=evaluation.evaluator.image_bytes,
                               title=f"{config.name}: {config.total_steps} steps", frame=frame, before=before)


def sft_iteration(phases: grpo_loop.Phases, state, batch, config, timer: Timer, *, log: bool = True):
    """One SFT update on the batch's solutions (G = 1, no rollout); the entropy measured when `log`."""
    with timer.timed("update"):
        train_batch = sft.sft_batch(batch.model_inputs, batch.solution, phases.tokenizer,
                                    length=phases.sampling.max_new_tokens, eos_id=phases.sampling.eos_token_ids[0],
                                    pad_id=phases.sampling.pad_token_id, valid=batch.meta.get("valid"))
        state, metrics = phases.step(state, grpo_loop.place(phases, train_batch), log)
        jax.block_until_ready(state.step)  # the update's time, not its dispatch's, as a GRPO iteration reports
    return state, grpo_loop.Outcome(metrics, {}, [])


def _is_hf(directory: str) -> bool:
    return not os.path.isdir(os.path.join(directory, model_dir.PARAMS_DIR))


HELDOUT_BEFORE = "heldout_before.json"


def _write_heldout(workdir: str, value) -> None:
    if value is not None and jax.process_index() == 0:
        with open(os.path.join(workdir, HELDOUT_BEFORE), "w", encoding="utf-8") as f:
            json.dump(dict(zip(("mean", "standard_error", "examples"), value)), f)


def _read_heldout(workdir: str):
    path = os.path.join(workdir, HELDOUT_BEFORE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    return value["mean"], value["standard_error"], value["examples"]


def _report_heldout(when: str, value) -> None:
    if value is not None and jax.process_index() == 0:
        mean, se, n = value
        print(f"held-out reward {when}: {mean:.4f} ± {se:.4f} (standard error, {n} examples)", flush=True)


def export_hf(directory: str, out: str) -> None:
    """The model directory as a Hugging Face checkpoint, by `model_port` in its own process, on the host's CPU:
    the run's process holds the accelerator (and libtpu, probed on a machine without a TPU, logs errors)."""
    subprocess.run([sys.executable, "-m", "model_port.flax_to_hf", "--ckpt", directory, "--out", out], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ------------------------------------------------------------------------------------------------ CLI


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file at INFO; the Reporter shows progress
    config, workdir = recipe.from_flags()
    recipe.use_platform(config)
    distributed.initialize()  # a multi-host run's processes find each other (launch/); nothing on one host
    result = train(config, workdir)
    if result.preempted:
        sys.exit(0)
    lines = [f"finished {config.name}: {result.step} steps", f"checkpoints {os.path.join(workdir, 'checkpoints')}",
             f"model {result.model_dir}"]
    if config.export_hf:
        lines.append(f"Hugging Face export {os.path.join(workdir, 'hf')}")
    lines += [f"metrics {os.path.join(workdir, 'metrics.jsonl')}, samples {os.path.join(workdir, 'samples.jsonl')}",
              f"curves: tensorboard --logdir {workdir}"]
    if result.report:
        lines.append(f"evaluations {os.path.join(workdir, 'eval')}; report {result.report}")
    print("\n  ".join(lines), flush=True)
    if result.heldout_before and result.heldout_after:
        (b, b_se, _), (a, a_se, _) = result.heldout_before, result.heldout_after
        gain = (a - b) / math.hypot(a_se, b_se) if a_se or b_se else math.copysign(math.inf, a - b) if a != b else 0.0
        print(f"held-out reward: {b:.4f} ± {b_se:.4f} before GRPO, {a:.4f} ± {a_se:.4f} after "
              f"({gain:+.1f} standard errors)", flush=True)


if __name__ == "__main__":
    recipe.define_flags()
    app.run(main, flags_parser=recipe.parse_flags)
