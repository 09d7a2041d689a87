"""The evaluators in a run and standalone (issue 11): a tiny training run with a detection evaluation of a
synthetic held-out set every step, then `python -m vrft_jax.evaluate --config --ckpt` on its model.

The set has a number of (image, category) questions that is not a multiple of the batch (4): every one is
evaluated exactly once, the last partial batch included; the decode compiles once however often it runs;
the metrics reach metrics.jsonl under eval/, and the predictions, the metrics and the report the workdir.
"""

import base64
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from compile_count import counting_compiles
from vrft_jax import recipe, sampling
from vrft_jax import run as runs
from vrft_jax.data import storage
from vrft_jax.evaluate import evaluators, report, report_curves
from vrft_jax.metrics import read_metrics
from vrft_jax.models.qwen2_vl.model import Qwen2VL
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer, resolve_tokenizer_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "tests", "train_recipe.py")


def detection_config(data: str, **overrides):
    return recipe.load(RECIPE, {
        "data.path": os.path.join(data, "train"), "eval.path": os.path.join(data, "heldout_detection"),
        "eval.prepare": "synthetic --task detection --num-images 5 --seed 3 --split test",
        "eval.type": "detection", "eval.max_new_tokens": 6, "data.max_prompt_len": 256,
        "total_steps": 2, "eval_every": 1, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, result) of a 2-step run evaluating before, after step 1 and after step 2."""
    base = tmp_path_factory.mktemp("evaluators")
    data, workdir = str(base / "data"), str(base / "run")
    config = detection_config(data)
    with pytest.MonkeyPatch.context() as patch:  # one device, as test_train's runs
        patch.setattr(recipe, "make_mesh", functools.partial(recipe.make_mesh, devices=jax.devices()[:1]))
        result = runs.train(config, workdir)
    return config, workdir, result


def test_every_question_is_evaluated_once_the_last_partial_batch_included(run):
    config, workdir, _ = run
    questions = len(storage.read_records(config.eval.path, "test"))
    assert questions % config.prompts_per_step != 0  # a partial last batch
    for step in (0, 1, 2):
        rows = evaluators.read_predictions(os.path.join(workdir, "eval", f"step_{step}.jsonl"))
        assert sorted(r["index"] for r in rows) == list(range(questions))
        assert all(r["id"] and "completion" in r and "rewards" in r and "parsed" in r for r in rows)
        with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
            metrics = json.load(f)
        assert metrics["examples"] == questions and metrics["counts"]["queries"] == questions
        assert metrics["query_protocol"] == "records" and metrics["protocol"] == "coco"
        assert set(metrics["per_category_AP"]) and 0 <= metrics["AP"] <= 1


def test_eval_metrics_reach_metrics_jsonl_under_eval(run):
    _, workdir, result = run
    rows = [r for r in read_metrics(workdir) if "eval/AP" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/reward" in r and "eval/examples_per_s" in r for r in rows)
    with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        per_category = json.load(f)["per_category_AP"]
    assert {k for k in rows[-1] if k.startswith("eval/AP/")} == {f"eval/AP/{n}" for n, v in per_category.items()
                                                                 if v is not None}
    assert result.report == os.path.join(workdir, "report", "report.html") and os.path.exists(result.report)


def test_the_decode_compiles_once(run):
    config, _, _ = run
    settings = recipe.build(config, process_count=1)
    tokenizer = load_tokenizer(resolve_tokenizer_path(checkpoint_dir=None))
    model = Qwen2VL(settings.model, rngs=nnx.Rngs(0))
    graphdef = sampling.sampler_graphdef(settings.model, settings.sampler_dtype)
    weights = nnx.state(model, nnx.Param)
    evaluator = recipe.evaluator(config, settings, tokenizer=tokenizer, sampler_graphdef=graphdef)
    evaluator.run(weights, progress=False)
    with counting_compiles() as names:
        evaluator.run(weights, progress=False)
        recipe.evaluator(config, settings, tokenizer=tokenizer, sampler_graphdef=graphdef).run(
            weights, progress=False)
    assert names == []


def one_device_env():
    """The child's environment without the session's 8 fake devices (a batch of 4 does not split over 8)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    return env


def test_the_evaluate_command_scores_a_checkpoint(run, tmp_path):
    config, workdir, _ = run
    out = subprocess.run(
        [sys.executable, "-m", "vrft_jax.evaluate", f"--config={RECIPE}", f"--ckpt={os.path.join(workdir, 'model')}",
         f"--workdir={tmp_path}", f"--config.data.path={config.data.path}", f"--config.eval.path={config.eval.path}",
         "--config.eval.type=detection", "--config.eval.max_new_tokens=6", "--config.data.max_prompt_len=256"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=one_device_env())
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout[out.stdout.index("{"):])
    with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        in_run = json.load(f)
    # the run's last evaluation and the command on the run's final model decode the same answers
    assert printed["AP"] == in_run["AP"] and printed["per_category_AP"] == in_run["per_category_AP"]
    assert printed["reward"] == in_run["reward"]
    assert os.path.exists(printed["report"]) and os.path.exists(printed["predictions"])


def test_an_unknown_eval_type_is_named():
    with pytest.raises(ValueError, match="eval.type='mAP' is not one of"):
        recipe.build(recipe.load(RECIPE, {"eval.type": "mAP"}), check_paths=False, process_count=1)



# ---------------------------------------------------------------------------------------------- the report


def inline_images(page: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc='([^']*)'", page)


def test_the_report_is_one_page_whose_images_are_inline_and_decode(run):
    _, workdir, result = run
    with open(result.report, encoding="utf-8") as f:
        page = f.read()
    sources = inline_images(page)
    assert len(sources) == page.count("<img")  # every image found, none referenced by path or URL
    curves = report_curves.curve_keys(read_metrics(workdir))
    assert {"reward", "loss", "grad_norm", "learning_rate", "completion_length", "eval/AP"} <= {k for k, _ in curves}
    shown = report.pick_samples(evaluators.read_predictions(os.path.join(workdir, "eval", "step_2.jsonl")))
    assert len(sources) == len(curves) + sum(map(len, shown.values()))  # a curve each, and the examples
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    for key, _ in curves:
        assert os.path.exists(os.path.join(workdir, "report", f"curve_{key.replace('/', '_')}.png")), key
    for heading in ("best examples", "worst examples", "random examples", "training curves", "difference",
                    "format_valid_rate", "per class: paper_per_category_AP"):
        assert heading in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_report_renders_in_headless_chromium_with_its_drawn_images_visible(run, tmp_path):
    """Needs Debian's `chromium` (.ci/run installs it); without it this test reports itself as not run."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed: the report's screenshot test did not run (apt-get install chromium)")
    _, _, result = run
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,5000", f"file://{result.report}"],
                   capture_output=True, timeout=180, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the ground-truth boxes drawn on the examples: (40, 200, 60), a colour no synthetic image or plot uses
    near_truth = (np.abs(pixels - np.array(report.GROUND_TRUTH)).max(axis=-1) <= 12).sum()
    legend = 12 * 12  # the legend's swatch has the same colour
    assert near_truth > legend + 500, near_truth
    # and the pictures themselves: many distinct colours, not a page of text on white
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000


def test_draw_puts_truth_and_prediction_where_the_boxes_are():
    """A 100 x 50 grey image shown at 640 x 320: the ground truth [100, 200, 500, 600] on the 0..1000 grid
    and the prediction [600, 100, 900, 900] land at x 64..320 / 384..576 of the shown image."""
    grey = io.BytesIO()
    Image.new("RGB", (100, 50), (128, 128, 128)).save(grey, format="PNG")
    row = {"solution": "<answer>[{'Position': [100, 200, 500, 600], 'Confidence': 1}]</answer>",
           "source_hw": [50, 100], "image_hw": [56, 112],
           "parsed": {"boxes": [[600, 100, 900, 900]], "scores": [0.9]}}
    shown = np.asarray(Image.open(io.BytesIO(report.draw(grey.getvalue(), row))).convert("RGB")).astype(int)
    assert shown.shape == (320, 640, 3)

    def columns(colour):
        hit = np.abs(shown - np.array(colour)).max(axis=-1) == 0
        xs = np.flatnonzero(hit.any(axis=0))
        return xs.min(), xs.max()

    assert columns(report.GROUND_TRUTH) == (64, 320)
    assert columns(report.PREDICTED) == (384, 576)
