"""The report's numbers as HTML tables: the run's context, and an evaluation before and after training.

    comparison_table(rows_of(after, before, after_rows, before_rows), ...)  # metric, before, after, difference, SE
    per_class_table(*per_class_of(after, ...), ...)                          # a column per class, regressions marked

The difference's standard error is paired where both evaluations scored the same examples and the metric has a
value per example (the reward and its terms, format validity, a classification's accuracies, a box's IoU):
sd(after_i - before_i) / sqrt(n), which is what tells a change from noise on one held-out set. Where only each
side's own standard error is known it is sqrt(se_a^2 + se_b^2) (marked unpaired); AP has none (n/a). A
difference below zero is marked as a regression, and bold when it exceeds two standard errors.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# the metrics a reader looks for first, in this order; the rest follow by name
LEADING = ("accuracy_strict", "accuracy_substring", "paper_mAP", "AP", "AP50", "AP75", "APr", "APc", "APf", "mIoU",
           "cIoU", "format_valid_rate", "stopped_rate", "reward")
NOT_COMPARED = ("examples", "images", "no_box", "timing", "type")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    before: float | None
    after: float | None
    se: float | None  # of the difference
    paired: bool

    @property
    def difference(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def per_example(rows: Sequence[Mapping[str, Any]], name: str) -> dict[Any, float] | None:
    """{example index: its value of metric `name`} when every row has one, else None."""
    def value(row):
        if name == "reward":
            return row.get("rewards", {}).get("total")
        if name.startswith("reward/"):
            return row.get("rewards", {}).get(name.split("/", 1)[1])
        if name == "format_valid_rate":
            return row.get("format_valid")
        if name == "stopped_rate":
            return row.get("stopped")
        return (row.get("scores") or {}).get(name)

    values = {row.get("index", k): value(row) for k, row in enumerate(rows)}
    if not values or not all(isinstance(v, (int, float)) for v in values.values()):
        return None
    return {k: float(v) for k, v in values.items()}


def paired_se(after: Mapping[Any, float] | None, before: Mapping[Any, float] | None) -> float | None:
    if after is None or before is None or set(after) != set(before) or len(after) < 2:
        return None
    differences = np.array([after[k] - before[k] for k in sorted(after)])
    return float(differences.std(ddof=1) / math.sqrt(len(differences)))


def rows_of(after: Mapping[str, Any], before: Mapping[str, Any] | None, after_rows: Sequence[Mapping] = (),
            before_rows: Sequence[Mapping] = ()) -> list[Row]:
    """A Row per scalar metric of `after` (LEADING first), with `before`'s value and the difference's SE."""
    before = before or {}
    names = [k for k, v in after.items() if _number(v) and k not in NOT_COMPARED and not k.endswith("standard_error")]
    names.sort(key=lambda k: (LEADING.index(k) if k in LEADING else len(LEADING), k))
    out = []
    for name in names:
        b = before.get(name) if _number(before.get(name)) else None
        se, paired = None, False
        if b is not None:
            se = paired_se(per_example(after_rows, name), per_example(before_rows, name))
            paired = se is not None
            a_se, b_se = after.get(f"{name}_standard_error"), before.get(f"{name}_standard_error")
            if se is None and _number(a_se) and _number(b_se):
                se = math.hypot(a_se, b_se)
        out.append(Row(name, b, float(after[name]), se, paired))
    return out


def per_class_of(metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = (),
                 parse: str = "visual_rft") -> tuple[str, dict[str, float | None], dict[str, dict[Any, float]]]:
    """(the per-class metric's name, {class: value}, {class: {example index: value}}) of an evaluation: a
    classification's accuracy by the evaluation's reading (strict or the paper's substring rule), or the AP per
    category the paper's tables print; ("", {}, {}) for a task without classes."""
    if isinstance(metrics.get("per_class"), Mapping):
        key = "accuracy_strict" if parse == "strict" else "accuracy_substring"
        values = {str(name): entry.get(key) for name, entry in metrics["per_class"].items()}
        by_class: dict[str, dict[Any, float]] = {}
        for k, row in enumerate(rows):
            score = (row.get("scores") or {}).get(key)
            if score is not None:
                by_class.setdefault(str(row.get("label")), {})[row.get("index", k)] = float(score)
        return key, values, by_class
    for key in ("paper_per_category_AP", "per_category_AP"):
        if isinstance(metrics.get(key), Mapping) and metrics[key]:
            return key, dict(metrics[key]), {}
    return "", {}, {}


# ---------------------------------------------------------------------------------------------- HTML


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def _difference_cell(difference: float | None, se: float | None) -> str:
    classes = []
    if difference is not None and difference < 0:
        classes.append("regression")
    elif difference is not None and difference > 0:
        classes.append("gain")
    if difference is not None and se is not None and abs(difference) > 2 * se:  # se 0: every example moved alike
        classes.append("significant")
    return f"<td class='difference {' '.join(classes)}'>{_fmt(difference, signed=True)}</td>"


def comparison_table(rows: Sequence[Row], before_label: str, after_label: str,
                     own_se: Mapping[str, Any] | None = None) -> str:
    """metric | before | after | difference | ± SE of the difference; with no `before` at all (a checkpoint's
    evaluation), metric | after | ± its own SE (from `own_se`, the metrics, where they give one)."""
    if all(row.before is None for row in rows):
        own_se = own_se or {}

        def se(name):
            value = own_se.get(f"{name}_standard_error")
            return _fmt(value) if _number(value) else "n/a"

        body = "".join(f"<tr data-metric='{html.escape(row.name)}'><th>{html.escape(row.name)}</th>"
                       f"<td>{_fmt(row.after)}</td><td class='se'>{se(row.name)}</td></tr>" for row in rows)
        return (f"<table class='comparison'><tr><th>metric</th><th>{html.escape(after_label)}</th>"
                f"<th>± standard error</th></tr>{body}</table>")
    head = (f"<tr><th>metric</th><th>{html.escape(before_label)}</th><th>{html.escape(after_label)}</th>"
            "<th>difference</th><th>± standard error</th></tr>")
    body = []
    for row in rows:
        se = "n/a" if row.se is None else f"{row.se:.3f}" + ("" if row.paired else " (unpaired)")
        body.append(f"<tr data-metric='{html.escape(row.name)}'><th>{html.escape(row.name)}</th>"
                    f"<td>{_fmt(row.before)}</td><td>{_fmt(row.after)}</td>"
                    f"{_difference_cell(row.difference, row.se)}<td class='se'>{se}</td></tr>")
    return f"<table class='comparison'>{head}{''.join(body)}</table>"


def per_class_table(name: str, after: Mapping[str, float | None], before: Mapping[str, float | None] | None,
                    after_examples: Mapping[str, Mapping] | None = None,
                    before_examples: Mapping[str, Mapping] | None = None, *, before_label: str,
                    after_label: str) -> str:
    """A column per class: before, after, difference (regressions marked) and its paired SE where known."""
    classes = list(after)
    before = before or {}
    cells = {"before": [], "after": [], "difference": [], "se": []}
    for c in classes:
        b, a = before.get(c), after.get(c)
        se = paired_se((after_examples or {}).get(c), (before_examples or {}).get(c))
        difference = None if a is None or b is None else a - b
        cells["before"].append(f"<td>{_fmt(b)}</td>")
        cells["after"].append(f"<td>{_fmt(a)}</td>")
        cells["difference"].append(_difference_cell(difference, se))
        cells["se"].append(f"<td class='se'>{'n/a' if se is None else f'{se:.3f}'}</td>")
    head = "<tr><th></th>" + "".join(f"<th class='class'>{html.escape(c)}</th>" for c in classes) + "</tr>"
    labels = {"before": before_label, "after": after_label, "difference": "difference", "se": "± standard error"}
    shown = [key for key in cells if (before or key == "after") and (key != "se" or any("n/a" not in c
                                                                                        for c in cells[key]))]
    body = "".join(f"<tr class='{key}'><th>{html.escape(labels[key])}</th>{''.join(cells[key])}</tr>"
                   for key in shown)
    return (f"<div class='scroll'><table class='per-class' data-metric='{html.escape(name)}'>{head}{body}</table>"
            "</div>")


def context_table(context: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in context.items() if v not in (None, ""))
    return f"<table class='context'>{rows}</table>"
