"""The visual report: one self-contained HTML page and PNG plots of the training curves.

    path = write_report(workdir, predictions=rows, metrics=eval_metrics, history=read_metrics(workdir),
                        image_of=lambda row: encoded_image_bytes)

`workdir/report/` gets `curves_*.png` (each reward, KL, completion length, evaluation metrics, from
`metrics.jsonl`) and `report.html`: the evaluation's numbers, the plots, and the best, the worst and random
examples, each drawn with its ground-truth (green) and predicted (red) boxes, its `<think>` text, its answer
and its rewards. Every image is inline (base64 PNG), so the page can be mailed or attached as it is. The
workdir may be a `gs://` URL (files go through `vrft_jax.storage`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

from vrft_jax import storage
from vrft_jax.evaluate import readers
from vrft_jax.rewards import parse
from vrft_jax.rewards.frames import REL_SCALE

REPORT_DIR = "report"
GROUND_TRUTH, PREDICTED = (40, 200, 60), (230, 40, 40)
DISPLAY_SIDE = 320  # images are drawn at least this large (the demo's are 112 px)

# Curves: (file stem, title, does a metric name belong to it)
CURVES = (
    ("rewards", "rewards (training samples)",
     lambda k: (k == "reward" or k.startswith("reward/")) and not k.endswith("_std")),
    ("kl", "KL to the reference", lambda k: k == "kl"),
    ("completion_length", "completion length (tokens)", lambda k: k == "completion_length"),
    ("eval", "held-out evaluation",
     lambda k: k.startswith("eval/") and k not in ("eval/examples_per_s", "eval/examples", "eval/images")
     and not k.startswith("eval/AP/")
     and not k.endswith("standard_error")),
)


def plot_curves(history: Sequence[Mapping[str, Any]], directory: str) -> list[str]:
    """A PNG per curve group that has data (CURVES), in `directory`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.makedirs(directory)
    paths = []
    for stem, title, member in CURVES:
        names = sorted({k for row in history for k in row if member(k)})
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for name in names:
            points = [(row["step"], row[name]) for row in history if name in row and row[name] is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = storage.join(directory, f"curves_{stem}.png")
        with storage.open(path, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


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
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    scale = max(1.0, DISPLAY_SIDE / min(image.size))
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
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
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


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
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px} table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}
.cards{display:flex;flex-wrap:wrap;gap:14px} .card{border:1px solid #ddd;border-radius:6px;padding:8px;width:340px;
font-size:12px} .card img{width:320px;display:block} .plots img{width:620px;margin:4px}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:4px;margin:4px 0}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"<tr><th>{html.escape(key)}</th><td>{value:.4g}</td></tr>")
        elif isinstance(value, str):
            rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>")
        elif value is None:
            rows.append(f"<tr><th>{html.escape(key)}</th><td>absent</td></tr>")
        elif isinstance(value, Mapping) and value and all(isinstance(v, (int, float, type(None)))
                                                           for v in value.values()):
            inner = ", ".join(f"{html.escape(str(k))}: {'absent' if v is None else f'{v:.3g}'}"
                              for k, v in value.items())
            rows.append(f"<tr><th>{html.escape(key)}</th><td style='text-align:left'>{inner}</td></tr>")
        elif isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            for name, inner in value.items():  # per class: one row each
                cells = ", ".join(f"{html.escape(str(k))} {v:.3g}" for k, v in inner.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool))
                rows.append(f"<tr><th>{html.escape(key)}: {html.escape(str(name))}</th>"
                            f"<td style='text-align:left'>{cells}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _card(row: Mapping[str, Any], image_of: Callable[[Mapping[str, Any]], bytes], frame: str) -> str:
    image = _data_uri(draw(image_of(row), row, frame))
    answer = parse.strict_answer(row["completion"], allow_unclosed=True)
    rewards = ", ".join(f"{k} {v:.3f}" for k, v in row["rewards"].items())
    parsed = row.get("parsed") or {}
    extra = f"<div>read as: {html.escape(json.dumps(parsed)[:300])}</div>" if parsed else ""
    return (f"<div class='card'><img alt='{html.escape(row['id'])}' src='{image}'>"
            f"<div><b>{html.escape(row['id'])}</b> · label <b>{html.escape(row.get('label', ''))}</b></div>"
            f"<div>think:</div><pre>{html.escape(_think(row['completion']) or '(none)')}</pre>"
            f"<div>answer:</div><pre>{html.escape(answer if answer is not None else '(no <answer> tag)')}</pre>"
            f"<div>completion:</div><pre>{html.escape(row['completion'])}</pre>"
            f"{extra}<div>rewards: {html.escape(rewards)}</div></div>")


def write_report(workdir: str, *, predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any],
                 history: Sequence[Mapping[str, Any]] = (), image_of: Callable[[Mapping[str, Any]], bytes],
                 title: str = "vrft_jax", frame: str = "rel1000", before: Mapping[str, Any] | None = None,
                 samples: int = 4) -> str:
    """Write `workdir/report/` (module docstring); returns the HTML page's path."""
    directory = storage.join(workdir, REPORT_DIR)
    plots = plot_curves(history, directory) if history else []
    picked = pick_samples(predictions, samples) if predictions else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<h2>evaluation</h2>" + _metrics_table(metrics))
    if before:
        parts.append("<h2>before training</h2>" + _metrics_table(before))
    if plots:
        parts.append("<h2>training curves</h2><div class='plots'>")
        for path in plots:
            parts.append(f"<img alt='{os.path.basename(path)}' src='{_data_uri(storage.read_bytes(path))}'>")
        parts.append("</div>")
    parts.append("<div class='legend'>boxes: <span style='background:rgb(40,200,60)'></span>ground truth"
                 "<span style='background:rgb(230,40,40)'></span>predicted</div>")
    for name, rows in picked.items():
        parts.append(f"<h2>{name} examples</h2><div class='cards'>")
        parts.extend(_card(row, image_of, frame) for row in rows)
        parts.append("</div>")
    parts.append("</body></html>")
    path = storage.join(directory, "report.html")
    storage.write_text_atomic(path, "".join(parts))
    return path
