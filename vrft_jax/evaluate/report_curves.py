"""The report's training curves: one small PNG per quantity, so that no curve hides behind another of the same
values and each has its own scale.

    curves = plot_curves(history, directory)        # [Curve(key, title, path)], in CURVE_ORDER

From `metrics.jsonl` rows (`{"step": ..., key: value}`): the reward and each of its terms, the loss, the KL to the
reference, the policy's entropy, the gradient norm, the learning rate, the completion length, the collapse signals
(flat groups, answerless and truncated completions, dynamic sampling's replacements, the flat groups oversampling
kept), the sampler/trainer mismatch, and each held-out metric (`eval/...`, with its standard error as a band where
the evaluation gives one). A key the run never logged has no plot; a run of a few steps gets markers on its points.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vrft_jax import storage

# (key or pattern, title); order is the page's
CURVE_ORDER = (
    ("reward", "reward (training samples, weighted total)"),
    (re.compile(r"reward/(?!.*_std$).+"), "reward term {name}"),
    ("loss", "loss"),
    ("kl", "KL to the reference"),
    ("entropy", "entropy of the policy (nats per token)"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("learning_rate", "learning rate"),
    ("completion_length", "completion length (tokens)"),
    # Collapse (`vrft_jax.collapse`): what shows GRPO losing its signal.
    ("reward_zero_std_groups", "share of flat groups (all samples scored alike)"),
    ("no_answer", "share of completions without a readable answer"),
    ("truncated", "share of completions cut at the token limit"),
    ("dynamic_sampling/replaced", "share of groups replaced by dynamic sampling"),
    ("oversample/flat_kept", "share of flat groups among those oversampling kept"),
    ("mismatch/kl", "sampler/trainer mismatch: KL(sampler || scorer) per token"),
    ("mismatch/gap_max", "sampler/trainer mismatch: max |logprob gap|"),
    (re.compile(r"eval/(?!AP/|timing|examples|images|.*standard_error$|.*per_s$|no_box$).+"), "held-out {name}"),
)


@dataclasses.dataclass(frozen=True)
class Curve:
    key: str  # the metrics.jsonl key
    title: str
    path: str  # the PNG


def curve_keys(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(key, title) of every curve the history has data for, in CURVE_ORDER."""
    logged = {k for row in history for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    chosen = []
    for pattern, title in CURVE_ORDER:
        if isinstance(pattern, str):
            if pattern in logged:
                chosen.append((pattern, title))
            continue
        for key in sorted(k for k in logged if pattern.fullmatch(k)):
            chosen.append((key, title.format(name=key.split("/", 1)[1])))
    return chosen


def plot_curves(history: Sequence[Mapping[str, Any]], directory: str) -> list[Curve]:
    """A PNG per curve (`curve_keys`) in `directory` (local or gs://), named after its key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.makedirs(directory)
    curves = []
    for key, title in curve_keys(history):
        points = [(row["step"], row[key], row.get(f"{key}_standard_error")) for row in history
                  if isinstance(row.get(key), (int, float))]
        steps, values, errors = zip(*points)
        fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
        ax.plot(steps, values, color="#1f5fa8", marker="o" if len(points) <= 30 else None, markersize=3, lw=1.4)
        if all(isinstance(e, (int, float)) for e in errors):
            ax.fill_between(steps, [v - e for v, e in zip(values, errors)], [v + e for v, e in zip(values, errors)],
                            color="#1f5fa8", alpha=0.18, lw=0, label="± standard error")
            ax.legend(fontsize=7, loc="best")
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = storage.join(directory, "curve_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png")
        with storage.open(path, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        curves.append(Curve(key, title, path))
    return curves
