"""The visual report: one self-contained HTML page a researcher reads at a glance, and the PNGs of its curves.

    path = write_report(workdir, predictions=rows, metrics=eval_metrics, history=read_metrics(workdir),
                        image_of=lambda row: encoded_image_bytes, before=step_0_metrics, before_predictions=rows_0,
                        context={"model": ..., "recipe": ..., "seed": ...})

`workdir/report/report.html` holds, top to bottom: the run's context (model, recipe, mode, seed, data, date);
the evaluation as one table of before / after / difference with the difference's standard error
(`report_tables`), the format-validity rate (completions that ended with EOS and whose answer the task's reader
reads) beside the accuracy, and the per-class results as columns with every regression marked; a grid of
curves, one image per quantity (`report_curves`, also `report/curve_*.png`); and the best, the worst and random
examples in an even grid, each drawn with its boxes (detection and grounding: ground truth green, prediction red)
or its label and answer (classification), its `<think>` text, its answer and its rewards. Without an evaluation
(`eval_every=0`) the page has the context and the curves. Every image is inline (base64 PNG): the page can be
mailed or attached as it is. The workdir may be a `gs://` URL (files go through `vrft_jax.storage`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from vrft_jax import storage
from vrft_jax.evaluate import readers, report_curves, report_tables
from vrft_jax.rewards import parse
from vrft_jax.rewards.frames import REL_SCALE

REPORT_DIR = "report"
GROUND_TRUTH, PREDICTED = (40, 200, 60), (230, 40, 40)
DISPLAY_SIDE = 320  # images are drawn at least this large (the demo's are 112 px)

def _scaled(boxes, source_hw, shown_hw, frame_of_boxes: str):
    """Boxes of the 0..1000 grid or of the stored image's pixels, in the shown image's pixels."""
    height, width = source_hw
    shown_h, shown_w = shown_hw
    out = []
    for x1, y1, x2, y2 in boxes:
        if frame_of_boxes == "rel1000":
            sx, sy = shown_w / REL_SCALE, shown_h / REL_SCALE
        else:
            sx, sy = shown_w / width, shown_h / height
        out.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
    return out


def truth_boxes(row: Mapping[str, Any]) -> list[list[float]]:
    """The ground-truth boxes of a detection or grounding row, on the 0..1000 grid."""
    solution = row.get("solution", "")
    if "Position" in solution:
        try:
            return parse.detection_solution(solution)[0].tolist()
        except ValueError:
            return []
    box = readers.grounding_box(solution, "visual_rft")
    return [box] if box else []


def predicted_boxes(row: Mapping[str, Any]) -> list[list[float]]:
    parsed = row.get("parsed") or {}
    if parsed.get("boxes"):
        return parsed["boxes"]
    return [parsed["box"]] if parsed.get("box") else []


def draw(image_bytes: bytes, row: Mapping[str, Any], frame: str = "rel1000") -> bytes:
    """The example's image as PNG bytes, at least DISPLAY_SIDE on its short side, with its boxes drawn.
    Predicted boxes are in the model's frame: "rel1000" (Qwen2-VL) or "pixels" of the seen image."""
    image = _enlarged(image_bytes)
    shown_hw = (image.height, image.width)
    canvas = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 120))
    for box in _scaled(truth_boxes(row), row["source_hw"], shown_hw, "rel1000"):
        canvas.rectangle(_ordered(box), outline=GROUND_TRUTH, width=line)
    predicted = predicted_boxes(row)
    if frame == "rel1000":
        predicted = _scaled(predicted, row["source_hw"], shown_hw, "rel1000")
    else:  # pixels of the image the model saw
        predicted = _scaled(predicted, row["image_hw"], shown_hw, "pixels")
    for box in predicted:
        canvas.rectangle(_ordered(box), outline=PREDICTED, width=line)
    return _png(image)


def _ordered(box):
    x1, y1, x2, y2 = box
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _think(text: str) -> str:
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0:
        return ""
    return text[start + len("<think>"):end if end > start else len(text)].strip()


def pick_samples(rows: Sequence[Mapping[str, Any]], k: int = 4, seed: int = 0) -> dict[str, list]:
    """{"best", "worst", "random"}: k rows each by total reward (ties by stored order), and k at random."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["rewards"]["total"], i))
    best = order[:k]
    worst = [i for i in reversed(order) if i not in best][:k]
    rest = [i for i in range(len(rows)) if i not in best and i not in worst]
    picked = random.Random(seed).sample(rest, min(k, len(rest)))
    return {"best": [rows[i] for i in best], "worst": [rows[i] for i in worst],
            "random": [rows[i] for i in sorted(picked)]}


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px;margin-bottom:6px} h2{font-size:18px;margin-top:28px} h3{font-size:15px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} table.context th,table.context td{text-align:left}
td.regression{background:#fde2e2;color:#a40000} td.gain{color:#176b1d} td.significant{font-weight:700}
.scroll{overflow-x:auto;max-width:100%} .note{color:#555;font-size:13px}
.curves{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:10px}
.curves figure{margin:0} .curves img{width:100%;display:block} .curves figcaption{font-size:12px;color:#555}
.cards{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;min-width:0}
.card img{width:100%;aspect-ratio:1/1;object-fit:contain;background:#fafafa;display:block}
.valid{color:#176b1d} .invalid{color:#a40000;font-weight:700}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:4px;margin:4px 0;max-height:12em;
overflow:auto}
.legend .swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""

BOX_TASKS = ("detection", "grounding")


def _legend(task: str) -> str:
    """What the examples' marks mean, for the task: boxes where there are boxes, else the answer's colour."""
    if task in BOX_TASKS:
        return ("<div class='legend'>boxes: <span class='swatch' style='background:rgb(40,200,60)'></span>ground "
                "truth<span class='swatch' style='background:rgb(230,40,40)'></span>predicted</div>")
    if task == "classification":
        return ("<div class='legend'>each example: its label, and the class its answer names, "
                "<b class='valid'>right</b> or <b class='invalid'>wrong</b></div>")
    return ""


def _card(row: Mapping[str, Any], image_of: Callable[[Mapping[str, Any]], bytes], frame: str, task: str) -> str:
    image = _data_uri(draw(image_of(row), row, frame) if task in BOX_TASKS else _png(_enlarged(image_of(row))))
    answer = parse.strict_answer(row["completion"], allow_unclosed=True)
    rewards = ", ".join(f"{k} {v:.3f}" for k, v in row["rewards"].items())
    parsed = row.get("parsed") or {}
    valid = row.get("format_valid")
    why = "cut at the token limit" if not row.get("stopped") else "answer not read"
    validity = "" if valid is None else (
        "<div class='valid'>format valid: ended with EOS, answer read</div>" if valid else
        f"<div class='invalid'>format invalid: {why}</div>")
    if task == "classification":
        named = parsed.get("class")
        right = (row.get("scores") or {}).get("accuracy_strict", 0.0) > 0 or (
            row.get("scores") or {}).get("accuracy_substring", 0.0) > 0
        extra = (f"<div>answer names <b class='{'valid' if right else 'invalid'}'>"
                 f"{html.escape(str(named) if named is not None else '(nothing)')}</b></div>")
    else:
        extra = f"<div>read as: {html.escape(json.dumps(parsed)[:300])}</div>" if parsed else ""
    return (f"<div class='card'><img alt='{html.escape(row['id'])}' src='{image}'>"
            f"<div><b>{html.escape(row['id'])}</b> · label <b>{html.escape(row.get('label', ''))}</b></div>"
            f"{extra}{validity}"
            f"<div>think:</div><pre>{html.escape(_think(row['completion']) or '(none)')}</pre>"
            f"<div>answer:</div><pre>{html.escape(answer if answer is not None else '(no <answer> tag)')}</pre>"
            f"<div>completion ({row.get('completion_tokens', '?')} tokens):</div>"
            f"<pre>{html.escape(row['completion'])}</pre><div>rewards: {html.escape(rewards)}</div></div>")


def _enlarged(image_bytes: bytes) -> Image.Image:
    """The image, at least DISPLAY_SIDE on its short side (nearest neighbour: pixels stay sharp)."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    scale = max(1.0, DISPLAY_SIDE / min(image.size))
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _evaluation(metrics, predictions, before, before_predictions, *, before_label, after_label, parse_rule) -> str:
    rows = report_tables.rows_of(metrics, before, predictions, before_predictions or ())
    parts = [f"<h2>held-out evaluation ({metrics.get('type', '?')}, {metrics.get('examples', '?')} examples)</h2>"]
    parts.append(report_tables.comparison_table(rows, before_label, after_label, own_se=metrics))
    name, after_classes, after_examples = report_tables.per_class_of(metrics, predictions, parse_rule)
    if after_classes:
        _, before_classes, before_examples = report_tables.per_class_of(before or {}, before_predictions or (),
                                                                        parse_rule)
        regressions = sum(1 for c, a in after_classes.items()
                          if a is not None and before_classes.get(c) is not None and a < before_classes[c])
        parts.append(f"<h3>per class: {html.escape(name)} ({len(after_classes)} classes, {regressions} "
                     f"regressed)</h3>")
        parts.append(report_tables.per_class_table(name, after_classes, before_classes or None, after_examples,
                                                   before_examples, before_label=before_label,
                                                   after_label=after_label))
    return "".join(parts)


def write_report(workdir: str, *, predictions: Sequence[Mapping[str, Any]] = (),
                 metrics: Mapping[str, Any] | None = None, history: Sequence[Mapping[str, Any]] = (),
                 image_of: Callable[[Mapping[str, Any]], bytes] | None = None, title: str = "vrft_jax",
                 frame: str = "rel1000", before: Mapping[str, Any] | None = None,
                 before_predictions: Sequence[Mapping[str, Any]] | None = None,
                 before_label: str = "before training", after_label: str = "after training",
                 context: Mapping[str, Any] | None = None, parse_rule: str = "visual_rft", samples: int = 4) -> str:
    """Write `workdir/report/` (module docstring); returns the HTML page's path. Without `metrics` (a run that
    never evaluates) the page has the context and the curves."""
    directory = storage.join(workdir, REPORT_DIR)
    curves = report_curves.plot_curves(history, directory) if history else []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if context:
        parts.append(report_tables.context_table(context))
    if metrics is not None:
        parts.append(_evaluation(metrics, predictions, before, before_predictions, before_label=before_label,
                                 after_label=after_label, parse_rule=parse_rule))
    else:
        parts.append("<p class='note'>no held-out evaluation (eval_every=0, or no held-out set): the curves "
                     "below are the training's own</p>")
    if curves:
        parts.append("<h2>training curves</h2><div class='curves'>")
        for curve in curves:
            parts.append(f"<figure data-curve='{html.escape(curve.key)}'><img alt='curve: {html.escape(curve.key)}' "
                         f"src='{_data_uri(storage.read_bytes(curve.path))}'><figcaption>{html.escape(curve.key)}"
                         "</figcaption></figure>")
        parts.append("</div>")
    if predictions and image_of is not None:
        task = (metrics or {}).get("type", "")
        parts.append(_legend(task))
        for name, rows in pick_samples(predictions, samples).items():
            parts.append(f"<h2>{name} examples</h2><div class='cards'>")
            parts.extend(_card(row, image_of, frame, task) for row in rows)
            parts.append("</div>")
    parts.append("</body></html>")
    path = storage.join(directory, "report.html")
    storage.write_text_atomic(path, "".join(parts))
    return path
