"""`python -m vrft_jax.evaluate`: a checkpoint's metrics on a recipe's held-out set, or saved completions scored.

    python -m vrft_jax.evaluate --config=NAME[:ARG] --ckpt=DIR [--split=SPLIT] [--config.key=value ...] [--workdir=DIR]
    python -m vrft_jax.evaluate score --gt GT.json --predictions P.jsonl [--parse strict] [--frame pixels] ...

The first decodes the recipe's `eval` set (`eval.path`, or `--split` of it) with the checkpoint, greedily and in
batches, and scores it with the recipe's evaluator (`eval.type`): `--ckpt` is a model directory (a run's
`model/`) or a Hugging Face checkpoint (converted once into WORKDIR/initial). WORKDIR (default
runs/NAME/evaluate) gets the predictions (`eval/step_0.jsonl`), the metrics (`eval/step_0.json`) and the visual
report (`report/report.html`); the metrics are printed as one JSON object. The second is `evaluate.score`.

Under a launcher (`launch/`) its processes join one job as the train command's do, each decoding its share of
the set; the weights are loaded once, in the sampler's dtype and layout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from flax import nnx

from vrft_jax import cli, distributed, model_dir, recipe, sampling
from vrft_jax import storage as files  # `storage` is the data package's (datasets)
from vrft_jax.data import storage
from vrft_jax.evaluate import evaluators, report, score
from vrft_jax.metrics import METRICS_FILE, read_metrics
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer, resolve_tokenizer_path
from vrft_jax.rewards.frames import frame_of


def evaluate_checkpoint(config, checkpoint: str, workdir: str) -> dict:
    """Metrics of `checkpoint` on the recipe's held-out set; predictions, metrics and report in `workdir`."""
    if not config.eval.path:
        raise cli.UserError(f"recipe {config.name} has no held-out set: give --config.eval.path=DATASET")
    settings = recipe.build(config, check_paths=False)
    try:
        storage.dataset_dir(config.eval.path)
    except FileNotFoundError:
        raise cli.UserError(f"the held-out set {config.eval.path} is not there; {recipe.how_to_make(config, 'eval')}"
                            ) from None
    directory = model_dir.import_hf(checkpoint, os.path.join(workdir, "initial"))
    mesh = recipe.make_mesh(config) if jax.device_count() > 1 else None
    # One copy of the weights: loaded straight into the sampler's dtype and layout, which the evaluator decodes with.
    layout = {} if mesh is None else dict(mesh=mesh, rules=sampling.layout_rules(settings.sampling.layout))
    model = model_dir.load_model(directory, dtype=settings.sampler_dtype, **layout)
    params = nnx.state(model, nnx.Param)
    del model
    tokenizer = load_tokenizer(resolve_tokenizer_path(checkpoint_dir=directory))
    graphdef = sampling.sampler_graphdef(settings.model, settings.sampler_dtype)
    evaluator = recipe.evaluator(config, settings, tokenizer=tokenizer, sampler_graphdef=graphdef, mesh=mesh)
    result = evaluator.run(params)
    distributed.on_primary(evaluators.save, result, os.path.join(workdir, "eval"), 0)
    frame = frame_of(recipe.box_frame(config)).value
    # a run's model/: its training curves go in the report too
    run_dir = checkpoint.rstrip("/").rsplit("/", 1)[0] if "/" in checkpoint.rstrip("/") else "."
    history = read_metrics(run_dir) if files.exists(files.join(run_dir, METRICS_FILE)) else ()
    context = {"recipe": config.name, "checkpoint": checkpoint, "held-out set": f"{config.eval.path} "
               f"({config.eval.split})", "reading": config.eval.parse,
               "training curves": f"{run_dir}/{METRICS_FILE}" if history else "none (not a run's model/)",
               "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path = distributed.on_primary(report.write_report, workdir, predictions=result.predictions,
                                  metrics=result.metrics, image_of=evaluator.image_bytes, history=history,
                                  title=f"{config.name}: evaluation of {checkpoint}", frame=frame, context=context,
                                  after_label="this checkpoint", parse_rule=config.eval.parse)
    return {**result.metrics, "checkpoint": checkpoint, "report": path,
            "predictions": os.path.join(workdir, "eval", "step_0.jsonl")}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    cli.choose_platform(cpu_recipe=config.slice == "cpu")  # before JAX starts a backend
    distributed.initialize()  # under a launcher: one job with the other processes, as the train command
    if flags.FLAGS.split:
        config.unlock()
        config.eval.split = flags.FLAGS.split
        config.lock()
    workdir = flags.FLAGS.workdir or os.path.join(recipe.default_workdir(config), "evaluate")
    metrics = evaluate_checkpoint(config, flags.FLAGS.ckpt, workdir)
    if jax.process_index() == 0:
        print(json.dumps(metrics, indent=2, default=str), flush=True)


def run(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "score":
        cli.run(score.main, argv[1:])
    argv, verbose = cli.strip_verbose(argv)
    recipe.define_flags()
    flags.DEFINE_string("ckpt", None, "(required) a model directory (a run's model/) or a Hugging Face checkpoint",
                        required=True)
    flags.DEFINE_string("split", None, "the held-out set's split (default: the recipe's eval.split)")
    app.run(cli.guard(main, verbose=verbose), argv=argv, flags_parser=recipe.parse_flags)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv))
