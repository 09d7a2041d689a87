"""`train(config, workdir)`: a recipe run to its `total_steps`, from its latest checkpoint or the start.

GRPO by default (`grpo_loop.iteration`), `config.mode="sft"` for supervised fine-tuning on the same
records (`sft.iteration`) with the recipe's `sft` block (`sft.run_config`: the paper's baseline optimizer and
batch; the target bucket sized from the data before the first step). Both evaluate the held-out set every
`eval_every` steps. The workdir (a local path or a `gs://` URL) holds:

    config.json          the resolved config of the latest start; config.<step>.json of every start
    metrics.jsonl        one row per logged step; TensorBoard events beside it; samples.jsonl
    checkpoints/         orbax steps: train state, data position, config (resumed automatically)
    eval/, report/       the held-out evaluations and the visual report
    model/               the final model directory (`vrft_jax.model_dir`; a LoRA run's merged); hf/ with
                         `export_hf=True`. Both carry
                         the initial checkpoint's tokenizer, processor, chat template and generation config;
                         from random weights, the packaged tokenizer and template and the rollout's stop ids
    adapters/            a LoRA run's adapters (`model_dir.save_adapters`); peft/, their PEFT form, with `export_hf`
    warm_start/          an SFT warm start before GRPO (`warm_start.sft_steps`), a run of its own
    initial/             the recipe's Hugging Face checkpoint, converted once; initial_adapters/, `lora.init_from`'s
    heldout_before.json  the held-out reward of the initial weights, reported again on resume

SIGTERM (a TPU VM's preemption notice) is heard from the first line: a run saves the step it is at (or,
before its first step, stops with nothing to save) and returns `preempted`; the same command resumes it and
ends bit for bit where a straight run would. A resume with a config that differs from the checkpoint's in
anything but `RESUMABLE_CHANGES` is refused, naming every differing key.

On several processes every failure is agreed before anyone enters a collective (`distributed.agreed`):
a bad record, a reward, a file write of process 0, the HF conversion.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from vrft_jax import checkpoints, collapse, distributed, grpo_loop, model_dir, recipe, sampling, sft, storage
from vrft_jax.cli import UserError
from vrft_jax.data import make_iterator
from vrft_jax.data.pipeline import open_source
from vrft_jax.evaluate import evaluators, report
from vrft_jax.metrics import MetricWriter, every, named, read_metrics
from vrft_jax.models.qwen2_vl.model import Qwen2VL, base_graphdef, merge_lora, random_init, with_config, with_lora
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer, resolve_tokenizer_path
from vrft_jax.progress import Reporter, Timer
from vrft_jax.rewards.frames import frame_of
from vrft_jax.scoring import make_score_fn
from vrft_jax.train_step import (
    base_params,
    check_nonfinite,
    checkpointed,
    init_state,
    make_train_step,
    reference_weights,
    restored,
)

SAMPLES_PER_LOG = 4  # completions written to samples.jsonl at each sample_every step

# Keys a resumed run may change (fnmatch patterns on dotted keys): cadence, logging and evaluation, which do not
# touch the trained numbers. `total_steps` too, but only where the learning-rate schedule of the steps already
# taken stays the same (`check_resume_config`).
RESUMABLE_CHANGES = ("log_every", "ckpt_every", "keep_checkpoints", "sample_every", "eval_every", "export_hf",
                     "metric_names",
                     "eval.*", "data.num_workers", "data.worker_buffer", "data.read_threads", "data.device_prefetch",
                     "shared_mount", "total_steps")


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


class ConfigChangedError(UserError, ValueError):
    """A resume with a config whose trained numbers would differ from the checkpoint's run."""


# ---------------------------------------------------------------------------------------------- setup


def initial_model(config: ml_collections.ConfigDict, settings: recipe.Settings, workdir: str,
                  guard: checkpoints.PreemptionGuard) -> tuple[Qwen2VL | None, str | None]:
    """(model, its directory): the SFT warm start's result when the recipe asks for one, else the
    recipe's checkpoint (an HF directory is converted once), else random weights from the seed; with LoRA,
    given its adapters (`initial_adapters`). (None, None) when the warm start was preempted."""
    m = settings.model
    if config.mode == "grpo" and config.warm_start.sft_steps > 0:
        result = train(warm_start_config(config), storage.join(workdir, "warm_start"), guard=guard)
        if result.preempted:
            return None, None
        directory = result.model_dir
    elif config.model.checkpoint:
        directory = model_dir.import_hf(config.model.checkpoint, storage.join(workdir, "initial"))
    else:
        return initial_adapters(config, random_init(m.replace(lora=None), config.seed), workdir), None
    model = model_dir.load_model(directory, dtype=m.param_dtype)
    model = with_config(model, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
    return initial_adapters(config, model, workdir), directory


def initial_adapters(config: ml_collections.ConfigDict, model: Qwen2VL, workdir: str) -> Qwen2VL:
    """`model` with the recipe's adapters: `lora.init_from`'s (a PEFT directory is converted once, into
    `initial_adapters/`), or fresh ones from the seed (B = 0: the base model's outputs); as it is without LoRA."""
    lora = recipe.lora_config(config)
    if lora is None:
        return model
    source = config.lora.init_from
    if not source:
        return with_lora(model, lora, config.seed)
    adapters = model_dir.import_peft(source, storage.join(workdir, "initial_adapters"), model.config)
    model = model_dir.load_adapters(adapters, model)
    if model.config.lora.replace(dropout=lora.dropout) != lora:  # dropout is the recipe's to choose
        raise recipe.RecipeError(f"lora.init_from={source} holds adapters of rank {model.config.lora.rank}, alpha "
                                 f"{model.config.lora.alpha}, targets {','.join(model.config.lora.targets)}, "
                                 f"rslora {model.config.lora.rslora}: set the lora block to the same")
    return with_config(model, lora=lora)


def warm_start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The recipe as an SFT run of `warm_start.sft_steps` at `warm_start.learning_rate`, decaying to 0 without
    warmup, on GRPO's batch and weight decay (not the baseline's `sft` block: the warm start only teaches the
    answer format). Its targets are at most the rollout's `max_new_tokens`: an answer GRPO could not sample
    is no format to teach."""
    sft_run = ml_collections.ConfigDict(config.to_dict())
    sft_run.mode = "sft"
    sft_run.total_steps = config.warm_start.sft_steps
    sft_run.warm_start.sft_steps = 0
    # SFT draws no completions: neither GRPO's dynamic sampling nor its oversampling are the warm start's settings
    sft_run.collapse.dynamic_sampling, sft_run.collapse.oversample = 0, 1
    sft_run.sft.learning_rate = config.warm_start.learning_rate
    sft_run.sft.warmup_steps = 0
    sft_run.sft.weight_decay = config.train.weight_decay
    sft_run.sft.samples_per_step = config.prompts_per_step
    sft_run.sft.micro_batches = config.train.micro_batches
    sft_run.sft.max_target_len = config.sampling.max_new_tokens
    sft_run.sft.lora_rank, sft_run.sft.lora_alpha = config.lora.rank, config.lora.alpha  # trains as GRPO will
    sft_run.export_hf = False
    sft_run.eval_every = 0
    return sft.run_config(sft_run)


def make_synthetic_data(config: ml_collections.ConfigDict) -> None:
    """Write a recipe's synthetic datasets when they are missing (the demo's: nothing to download), on process 0
    with every process waiting for it. A synthetic set already there must have been made by the recipe's own
    command: one left by another version of the recipe is an error naming the arguments that differ, never
    silently trained on. A set made from another source (the user's own, given as `--config.data.path`) is
    trained on as it is. Any other missing dataset is the user's to make: `recipe.build` names the command."""
    from vrft_jax.data import prepare
    from vrft_jax.data import storage as datasets

    for which, path, command in (("train", config.data.path, config.source.prepare),
                                 ("eval", config.eval.path, config.eval.prepare)):
        if not path or not command.startswith("synthetic"):
            continue
        argv = recipe.prepare_argv(config, which)
        try:
            datasets.dataset_dir(path)
        except FileNotFoundError:
            distributed.on_primary(prepare.main, argv)
            continue
        expected, made = prepare.source_args(argv), datasets.read_metadata(path).get("source", {})
        if made.get("source") != "synthetic":
            continue  # the user's own set under the recipe's name: theirs to train on
        # every option of the source, either side's absence read as the default None (an older version's
        # options that the source no longer has do not count)
        differ = sorted(k for k in prepare.source_options("synthetic") if expected.get(k) != made.get(k))
        if differ:
            key = "source.prepare" if which == "train" else "eval.prepare"
            raise recipe.RecipeError(
                f"the {which} dataset at {path} was made with other arguments than the recipe's "
                f"`prepare {command}`: " + ", ".join(f"--{k.replace('_', '-')} {made.get(k)!r} (recipe: "
                                                     f"{expected[k]!r})" for k in differ)
                + f"; to make the recipe's set, delete {path} (and the runs trained on it) or point "
                f"--config.{'data' if which == 'train' else 'eval'}.path elsewhere; to train on this one as it "
                f"is, pass --config.{key}=''")


def check_resume_config(saved: dict, current: dict) -> None:
    """ConfigChangedError naming every key whose value differs between the checkpoint's resolved config and this
    run's, except `RESUMABLE_CHANGES`; `total_steps` may change only where the learning-rate schedule does not
    depend on it (an explicit `train.decay_steps`, or a constant rate)."""
    flat_saved, flat_current = recipe.flat_config(saved), recipe.flat_config(current)
    differ = [key for key in sorted(flat_saved.keys() | flat_current.keys())
              if flat_saved.get(key, "<absent>") != flat_current.get(key, "<absent>")]
    refused = [key for key in differ if not any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_CHANGES)]
    if "total_steps" in differ and "train.decay_steps" in differ:
        refused.append("total_steps (train.decay_steps follows it: the learning rate of the steps taken would change)")
    if refused:
        details = "; ".join(f"{k}: {flat_saved.get(k, '<absent>')!r} -> {flat_current.get(k, '<absent>')!r}"
                            if k in flat_saved or k in flat_current else k for k in refused)
        raise ConfigChangedError(
            f"the config differs from the checkpoint's in {len(refused)} key(s) a resume may not change: {details}. "
            f"Resume with the checkpoint's values, or start a new run in another --workdir (changeable on resume: "
            f"{', '.join(RESUMABLE_CHANGES)})")


def _write_config(resolved: dict, workdir: str, start: int) -> None:
    text = json.dumps(resolved, indent=2, sort_keys=True)
    for name in ("config.json", f"config.{start}.json"):
        distributed.on_primary(storage.write_text_atomic, storage.join(workdir, name), text)


# ------------------------------------------------------------------------------------------- held-out


class HeldOut:
    """The run's held-out evaluation (`vrft_jax.evaluate`): the recipe's evaluator on the sampler's weights,
    its predictions and metrics under `workdir/eval/`, its scalars under `eval/` in metrics.jsonl and
    TensorBoard. Every example once: the last batch of the finite stream is filled with rows of padding
    only, which the sampler takes and the metrics leave out."""

    BEFORE = "heldout_before.json"

    def __init__(self, evaluator: evaluators.Evaluator, sampler_cast, workdir: str):
        self.evaluator, self.sampler_cast, self.workdir = evaluator, sampler_cast, workdir
        self.directory = storage.join(workdir, "eval")
        self.last: evaluators.EvalResult | None = None

    def __call__(self, step: int, params, writer: MetricWriter | None) -> evaluators.EvalResult:
        result = self.evaluator.run(self.sampler_cast(params))
        distributed.on_primary(evaluators.save, result, self.directory, step)
        if writer is not None:
            distributed.agreed(writer.write, step, {f"eval/{k}": v for k, v in result.scalars.items()})
        self.last = result
        return result

    def before(self, start: int, params, writer: MetricWriter) -> tuple[float, float, int] | None:
        """The held-out reward of the initial weights: measured at step 0 and kept in the workdir, so that a
        resumed run reports it too."""
        path = storage.join(self.workdir, self.BEFORE)
        if start == 0:
            value = summary(self(0, params, writer))
            text = json.dumps(dict(zip(("mean", "standard_error", "examples"), value)))
            distributed.on_primary(storage.write_text_atomic, path, text)
            return value
        if not storage.exists(path):
            return None
        saved = json.loads(storage.read_text(path))
        return saved["mean"], saved["standard_error"], saved["examples"]

    def evaluated(self, step: int) -> bool:
        """Whether step `step`'s evaluation was saved (a run preempted before it evaluates it on resume)."""
        return storage.exists(storage.join(self.directory, f"step_{step}.json"))


def summary(result: evaluators.EvalResult) -> tuple[float, float, int]:
    """(mean reward, its standard error, examples) of an evaluation."""
    m = result.metrics
    return m["reward"], m["reward_standard_error"], m["examples"]


def print_heldout(when: str, value) -> None:
    if value is not None and jax.process_index() == 0:
        mean, se, n = value
        print(f"held-out reward {when}: {mean:.4f} ± {se:.4f} (standard error, {n} examples)", flush=True)


def write_report(config, workdir: str, heldout: HeldOut | None) -> str | None:
    """The run's visual report (`vrft_jax.evaluate.report`): its context, its last evaluation against step 0's
    (when it evaluates) and its curves; its path (process 0)."""
    if jax.process_index() != 0:
        return None
    history = read_metrics(workdir)
    evaluated = {}
    if heldout is not None:
        before_path, rows_path = (storage.join(heldout.directory, f"step_0.{ext}") for ext in ("json", "jsonl"))
        if storage.exists(before_path) and storage.exists(rows_path):
            evaluated = dict(before=json.loads(storage.read_text(before_path)),
                             before_predictions=evaluators.read_predictions(rows_path))
        evaluated.update(predictions=heldout.last.predictions, metrics=heldout.last.metrics,
                         image_of=heldout.evaluator.image_bytes, parse_rule=config.eval.parse)
    warm = config.mode == "grpo" and config.warm_start.sft_steps > 0
    before_label = (f"before GRPO (after the {config.warm_start.sft_steps}-step SFT warm start)" if warm
                    else "before training")
    frame = frame_of(recipe.box_frame(config)).value
    return report.write_report(workdir, history=history, title=f"{config.name}: {config.mode} report", frame=frame,
                               before_label=before_label, after_label=f"after step {config.total_steps}",
                               context=report_context(config, workdir, history), **evaluated)


def report_context(config, workdir: str, history) -> dict[str, Any]:
    """What a reader of the report needs to know of the run before its numbers."""
    model = config.model.checkpoint or f"random {config.model.preset} weights (seed {config.seed})"
    return {
        "recipe": config.name, "mode": config.mode, "model": model,
        "trained": f"{config.total_steps} steps of {config.prompts_per_step} prompts"
                   + (f" x {config.sampling.group_size} samples" if config.mode == "grpo" else ""),
        "warm start": (f"{config.warm_start.sft_steps} SFT steps at lr {config.warm_start.learning_rate:g} "
                       f"({storage.join(workdir, 'warm_start')})"
                       if config.mode == "grpo" and config.warm_start.sft_steps > 0 else ""),
        "learning rate": f"{config.train.learning_rate:g}", "seed": config.seed,
        "training data": config.data.path, "held-out set": f"{config.eval.path} ({config.eval.split})"
        if config.eval.path and config.eval_every else "none (eval_every=0)",
        "rewards": f"{config.rewards.mode}: {dict(config.rewards.terms) if config.rewards.terms else 'all terms'}",
        "steps logged": len({row['step'] for row in history}),
        "workdir": workdir, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ------------------------------------------------------------------------------------------------ run


def train(config: ml_collections.ConfigDict, workdir: str, *,
          guard: checkpoints.PreemptionGuard | None = None) -> Result:
    """Run `config` in `workdir` from its latest checkpoint (or the start) to `total_steps`."""
    if guard is None:  # heard from the first line: conversion, data sizing and warm start included
        with checkpoints.PreemptionGuard() as guard:
            return train(config, workdir, guard=guard)
    if config.mode == "sft":
        config = sft.run_config(config)
    storage.require_shared(workdir, config.shared_mount)
    make_synthetic_data(config)
    settings = recipe.build(config)  # names a missing input before the workdir exists: a failed start leaves none
    distributed.on_primary(storage.makedirs, workdir)
    mesh = recipe.make_mesh(config)
    model, source_dir = initial_model(config, settings, workdir, guard)
    if model is None or guard.should_stop(0):
        return Result(step=0, preempted=True, model_dir=None)
    tokenizer = load_tokenizer(resolve_tokenizer_path(checkpoint_dir=source_dir))
    sft_mode = config.mode == "sft"
    train_config = settings.train.replace(grpo=sft.sft_config()) if sft_mode else settings.train
    graphdef, state = init_state(model, train_config, mesh=mesh)
    del model
    reference = base_score = None
    if not sft_mode and train_config.grpo.beta > 0 and train_config.lora:  # the base, adapters disabled: no copy
        base_score = make_score_fn(base_graphdef(settings.model), base_params(state.params), train_config.scoring,
                                   micro_batches=train_config.micro_batches, mesh=mesh)
    elif not sft_mode and train_config.grpo.beta > 0:  # the initial weights, a copy the donated step never sees
        reference = reference_weights(state.params, train_config, mesh=mesh)
    context = grpo_loop.RunContext(
        graphdef=graphdef, train=train_config, sampling=settings.sampling, reward_fn=settings.reward_fn,
        tokenizer=tokenizer, step=make_train_step(graphdef, state, train_config, mesh=mesh),
        score=make_score_fn(graphdef, state.params, train_config.scoring, micro_batches=train_config.micro_batches,
                            mesh=mesh),
        reference=reference, base_score=base_score,
        sampler_graphdef=sampling.sampler_graphdef(settings.model, settings.sampler_dtype),
        sampler_cast=sampling.make_sampler_cast(state.params, settings.sampler_dtype, mesh, settings.sampling.layout,
                                                lora=settings.model.lora),
        mesh=mesh, box_frame=recipe.box_frame(config), solution_frame=config.rewards.solution_frame,
        collapse=settings.collapse)

    target_len = distributed.agreed(sft_target_bucket, config, settings, tokenizer) if sft_mode else None
    data = make_iterator(settings.data, settings.model, mesh=mesh, tokenizer=tokenizer, checkpoint_dir=source_dir)
    manager = checkpoints.make_manager(storage.join(workdir, "checkpoints"), save_interval_steps=config.ckpt_every,
                                       max_to_keep=config.keep_checkpoints)
    resolved = json.loads(config.to_json_best_effort())
    saved_config = checkpoints.restore_config(manager)
    if saved_config is not None:
        check_resume_config(saved_config, resolved)
    latest = checkpoints.restore_latest(manager, checkpoints.abstract_state(checkpointed(state, train_config)), data)
    start = 0
    if latest is not None:
        start, state = latest[0], restored(state, latest[1], train_config)
        logging.info("resumed %s at step %d", workdir, start)
    _write_config(resolved, workdir, start)
    total = config.total_steps
    writer = distributed.agreed(MetricWriter, workdir, start_step=start)  # process 0 opens (and truncates) them
    evaluator = None if not config.eval_every else recipe.evaluator(
        config, settings, tokenizer=tokenizer, sampler_graphdef=context.sampler_graphdef, mesh=mesh)
    heldout = None if evaluator is None else HeldOut(evaluator, context.sampler_cast, workdir)
    before = None
    reporter = Reporter(total, start_step=start)
    key = jax.random.key(config.seed)
    watch = collapse.ZeroRewardWatch(settings.collapse)
    step, preempted = start, False
    # After an error that only this process saw, a multi-process run does not wait for the save in flight: its
    # commit is a cross-process barrier that the others may never reach. The unfinished step is never listed (orbax
    # renames a step only once complete), so the previous one stays the latest. After an agreed error (every
    # process raised at once, `distributed.agreed`) they all finish it together.
    finish_saves = True
    try:
        if heldout is not None:
            before = heldout.before(start, state.params, writer)
            print_heldout("before", before)
            if start and every(start, config.eval_every, total) and not heldout.evaluated(start):
                heldout(start, state.params, writer)  # preempted between its update and its evaluation
        for step in range(start + 1, total + 1):
            state, scalars, host = one_step(context, state, data, writer, config, key, step, target_len)
            # The preemption flag is read before the step's evaluation: a long evaluation must not delay the save.
            preempted = guard.should_stop(step)
            collapsed = not sft_mode and watch.observe(host)  # from gathered rewards: every process agrees
            if heldout is not None and every(step, config.eval_every, total) and not (preempted or collapsed):
                heldout(step, state.params, writer)
            reporter.update(step, scalars)
            checkpoints.save(manager, step, checkpointed(state, train_config), data, config=resolved,
                             force=preempted or collapsed or step == total)
            if collapsed:
                raise watch.error(step, host)
            if preempted:
                break
    except BaseException as error:
        finish_saves = jax.process_count() == 1 or distributed.is_agreed(error)
        raise
    finally:
        if finish_saves:
            manager.close()
        writer.close()
        reporter.close()
    if preempted:
        logging.warning("preempted: saved step %d of %s; the same command resumes it", step, workdir)
        return Result(step=step, preempted=True, model_dir=None)
    if heldout is not None and heldout.last is None:  # resumed at the end: evaluate
        heldout(total, state.params, None)
    final_dir = storage.join(workdir, "model")
    final = nnx.merge(graphdef, state.params)
    if train_config.lora:
        model_dir.save_adapters(final, storage.join(workdir, "adapters"))
        final = merge_lora(final, dtype=train_config.param_dtype)
    model_dir.save_model(final, final_dir, hf_source=source_dir)
    del final
    distributed.on_primary(model_dir.add_missing_assets, final_dir, tokenizer, settings.sampling.eos_token_ids,
                           settings.sampling.pad_token_id)
    after = None
    if heldout is not None:
        after = summary(heldout.last)
        print_heldout("after", after)
    report_path = distributed.on_primary(write_report, config, workdir, heldout)
    if config.export_hf:  # from the saved directory: no process holds the model whole
        model_dir.export_hf(final_dir, storage.join(workdir, "hf"))
        if train_config.lora:
            model_dir.export_peft(storage.join(workdir, "adapters"), storage.join(workdir, "peft"),
                                  config.model.hub_id or config.model.checkpoint or None)
    return Result(step=total, preempted=False, model_dir=final_dir, heldout_before=before, heldout_after=after,
                  report=report_path)


def next_batch(data, config):
    """The next training batch; the end of a finite stream (`data.num_epochs`) before `total_steps` is an error
    that says so, not a bare StopIteration."""
    try:
        return next(data)
    except StopIteration:
        raise ValueError(f"the training data ended after data.num_epochs={config.data.num_epochs} epoch(s), before "
                         f"total_steps={config.total_steps}: raise num_epochs, or set it to None to repeat") from None


def sft_target_bucket(config: ml_collections.ConfigDict, settings: recipe.Settings, tokenizer) -> int:
    """The SFT run's target length: every training record's solution + EOS measured (`sft.target_bucket`)."""
    source, name = open_source(settings.data)
    return sft.target_bucket(tokenizer, source, config.sft.max_target_len, name, frame=recipe.box_frame(config),
                             stored=config.rewards.solution_frame, max_pixels=settings.data.max_pixels)


def one_step(context: grpo_loop.RunContext, state, data, writer: MetricWriter, config, key, step: int,
             target_len: int | None):
    """(state, logged scalars or None, the step's host metrics) after step `step`: the batch, the iteration (SFT's
    on targets `target_len` long; GRPO's when None), its metrics and samples."""
    total = config.total_steps
    timer = Timer()
    with timer.timed("data"):  # a bad record one process meets stops them all, naming it
        batch = distributed.agreed(next_batch, data, config)
    log = every(step, config.log_every, total)
    if target_len is not None:
        state, outcome = sft.iteration(context, state, batch, timer, length=target_len, log=log)
    else:
        samples = SAMPLES_PER_LOG if every(step, config.sample_every, total) else 0
        state, outcome = grpo_loop.iteration(context, state, batch, jax.random.fold_in(key, step), timer,
                                             samples=samples, log=log)
    scalars = None
    if log:
        scalars = {**{k: float(v) for k, v in jax.device_get(outcome.device).items()}, **outcome.host,
                   **timer.scalars(), "skipped_records": float(sum(batch.skipped.values()))}
        scalars = named(scalars, config.metric_names)
        distributed.agreed(writer.write, step, scalars)
        check_nonfinite(state, context.train)
    if outcome.samples:
        distributed.agreed(writer.write_samples, step, outcome.samples)
    return state, scalars, outcome.host
