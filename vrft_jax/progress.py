"""What a person watching the run sees: one line per log step under a progress bar, and phase timings.

    timer = Timer()
    reporter = Reporter(total_steps, start_step=restored_step)
    for step in range(restored_step + 1, total_steps + 1):
        timer.reset()
        with timer.timed("rollout"):
            ...
        scalars = {**metrics, **timer.scalars()} if every(step, log_every, total_steps) else None
        reporter.update(step, scalars)
    reporter.close()

The line shows the keys it knows when they are present (see `format_line`) and skips the others, so
it works for GRPO and SFT alike; the full set of numbers goes to `metrics.MetricWriter`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Mapping, TextIO

import jax
import numpy as np
from tqdm import tqdm

_clock = time.perf_counter  # the Reporter's clock (a test replaces it)


class Timer:
    """Seconds per named phase of one step.

    JAX dispatches asynchronously: a phase that only enqueues device work measures the enqueueing.
    Where a phase's real time matters, block on its result inside the block
    (`jax.block_until_ready`); that costs the overlap with the next phase, so the loop does it for
    the phases whose results the host needs anyway (rollout tokens to detokenise, rewards).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to phase `name` (a phase entered twice in a step adds up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def scalars(self, prefix: str = "time/") -> dict[str, float]:
        """The phases as metrics: `time/rollout`, ... (the names `format_line` shows)."""
        return {prefix + name: seconds for name, seconds in self.seconds.items()}


def _seconds(value: float) -> str:
    """h:mm:ss for an ETA."""
    value = int(round(value))
    return f"{value // 3600}:{value // 60 % 60:02d}:{value % 60:02d}"


def _g(value: float) -> str:
    return f"{value:.4g}"


def format_line(step: int, total: int, scalars: Mapping[str, Any], eta: float | None = None) -> str:
    """The console line of a log step, from the metric names of `train_step`, `reward_stats` and `Timer`.

    step/total | reward mean±std (in-group std, share of prompts whose samples all scored alike, and of the prompts
    oversampling kept) | each reward NAME mean±std | kl | loss | clip low/high | ent (entropy) | len (completion
    tokens) | no-answer and cut (shares without an answer, at the token limit) | mismatch (sampler/trainer KL) |
    tok/s (rollout) | seconds per phase | skipped updates, when any | eta. Fields whose keys are absent are left out.
    """
    s = {k: float(np.asarray(v)) for k, v in scalars.items()}
    parts = [f"step {step}/{total}"]
    if "reward" in s:
        field = f"reward {s['reward']:.3f}±{s.get('reward_std', float('nan')):.3f}"
        if "reward_std_in_group" in s:
            field += f" (in-group std {s['reward_std_in_group']:.3f}"
            if "reward_zero_std_groups" in s:
                field += f", {s['reward_zero_std_groups']:.0%} flat"
            if "oversample/flat_kept" in s:
                field += f", {s['oversample/flat_kept']:.0%} of those kept"
            field += ")"
        parts.append(field)
    names = [k[len("reward/"):] for k in s if k.startswith("reward/") and not k.endswith("_std")]
    if names:
        parts.append("  ".join(f"{n} {s[f'reward/{n}']:.3f}±{s.get(f'reward/{n}_std', float('nan')):.3f}"
                               for n in names))
    for key, label in (("kl", "kl"), ("loss", "loss")):
        if key in s:
            parts.append(f"{label} {_g(s[key])}")
    if "clip_low" in s or "clip_high" in s:
        parts.append(f"clip {s.get('clip_low', float('nan')):.3f}/{s.get('clip_high', float('nan')):.3f}")
    if "entropy" in s and np.isfinite(s["entropy"]):
        parts.append(f"ent {s['entropy']:.2f}")
    if "completion_length" in s:
        parts.append(f"len {s['completion_length']:.1f}")
    if "no_answer" in s or "truncated" in s:
        parts.append(f"no-answer {s.get('no_answer', float('nan')):.0%} cut {s.get('truncated', float('nan')):.0%}")
    if "mismatch/kl" in s:
        parts.append(f"mismatch {_g(s['mismatch/kl'])}")
    if "rollout_tokens_per_s" in s:
        parts.append(f"{s['rollout_tokens_per_s']:.0f} tok/s")
    phases = [f"{k[len('time/'):]} {v:.2f}s" for k, v in s.items() if k.startswith("time/")]
    if phases:
        parts.append(" ".join(phases))
    if s.get("nonfinite_total", 0) > 0:
        parts.append(f"skipped {s['nonfinite_total']:.0f}")
    parts.append(f"eta {_seconds(eta)}" if eta is not None else "eta ?")
    return " | ".join(parts)


class Reporter:
    """The progress bar and the log lines above it, on process 0.

    The bar is drawn only when `stream` is a terminal (a log file or a pipe gets the plain lines and
    no carriage-return clutter). The ETA is the mean time of the steps since the first one this
    run made, times the steps left: the first step compiles, and counting it would overestimate
    every later ETA. Step times are measured on the host between `update` calls, which JAX's
    asynchronous dispatch skews step by step but not over a log interval (a log step reads values
    back, which waits for the device).
    """

    def __init__(self, total: int, *, start_step: int = 0, stream: TextIO | None = None,
                 bar: bool | None = None, enabled: bool | None = None):
        self.total = total
        self.start_step = start_step
        self.stream = sys.stdout if stream is None else stream
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if bar is None:
            bar = self.stream.isatty()
        self._bar = tqdm(total=total, initial=start_step, file=self.stream, dynamic_ncols=True, unit="step",
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                         disable=not (self.enabled and bar))
        self._first_done: tuple[int, float] | None = None  # (step, time) at the end of the first step

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left after `step`, from the steps after the first; None before there are any."""
        if self._first_done is None or step <= self._first_done[0]:
            return None
        first_step, first_time = self._first_done
        per_step = ((_clock() if now is None else now) - first_time) / (step - first_step)
        return per_step * (self.total - step)

    def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> str | None:
        """Mark `step` finished (call it every step); with `scalars` (log steps), print and return its line."""
        now = _clock()
        if self._first_done is None:
            self._first_done = (step, now)
        eta = self.eta(step, now)
        self._bar.update(step - self._bar.n)
        if eta is not None:
            self._bar.set_postfix_str(f"eta {_seconds(eta)}", refresh=False)
        if scalars is None or not self.enabled:
            return None
        line = format_line(step, self.total, scalars, eta)
        if self._bar.disable:
            print(line, file=self.stream, flush=True)
        else:
            self._bar.write(line, file=self.stream)
        return line

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
