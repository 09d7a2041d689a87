"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and `samples.jsonl` in its workdir
(a local directory or a `gs://` URL: every file goes through `vrft_jax.storage`).

    writer = MetricWriter(workdir, start_step=restored_step)      # 0 on a fresh run
    if every(step, config.log_every, total):
        writer.write(step, {**jax.device_get(train_metrics), **reward_stats(...), **timer.scalars()})
    if every(step, config.sample_every, total):
        writer.write_samples(step, [{"prompt": ..., "completion": ..., "rewards": {"iou": 0.7}}, ...])
    writer.close()

Files (all under the workdir, written by process 0 only; every other process gets a writer that does
nothing, so the loop never branches on the process index):
  metrics.jsonl  one JSON object per logged step: `step` and each scalar by its name. The file is
                 strict JSON: NaN and +-inf are written as the strings "NaN", "Infinity" and
                 "-Infinity" (the tokens `float()` parses), and `read_metrics` turns them back into
                 floats. Each row is flushed when written, so a preempted run loses at most a torn
                 last line, which the next open drops. (In a bucket, where an object has no append,
                 each flush uploads the whole file: see `storage.AppendFile`.)
  events.out.tfevents.*  TensorBoard scalars (`simple_value`) and the samples as text. Written with
                 tensorboard's record format and protos alone: `tensorboard.compat.tf` is never
                 resolved, so TensorFlow is not imported even where it is installed. Without
                 TensorFlow, `tensorboard --logdir gs://...` reads them through fsspec (gcsfs).
  samples.jsonl  one row per sample completion: `step`, then the sample's own keys (non-finite
                 rewards as in metrics.jsonl).

Resume: the loop checkpoints every k steps but logs more often, so after a preemption the jsonl files
hold rows for steps the resumed run will compute again. `MetricWriter(workdir, start_step=s)`, where s
is the step of the restored checkpoint (the number of finished steps), first drops every row with
step > s (`truncate_after`), so the files end up as a straight run's. TensorBoard files are
append-only: a new event file starts with `SessionLog.START` at step s + 1, on which tensorboard's Python
reader (`EventAccumulator`) discards the earlier files' events from step s + 1 on; its Rust data server
does the same per series when a step arrives that is not after the last one.

Reading the values (`jax.device_get`) is a host sync: the loop does it at log steps only, which is also
where the non-finite counters of the train step are read.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from vrft_jax import storage

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def every(step: int, n: int, total: int | None = None) -> bool:
    """Whether `step` (1-based: the number of finished steps) is a multiple of `n` or the last step.

    big_vision's `itstime`: the last step always logs, checkpoints and samples, so a run whose
    length is not a multiple of `n` still ends with a record of its final state. `n <= 0` turns
    the event off (it then happens only at the last step).
    """
    if total is not None and step == total:
        return True
    return n > 0 and step > 0 and step % n == 0


# --------------------------------------------------------------------------------------- values


def _scalar(name: str, value: Any) -> int | float:
    """A Python int or float from a one-element value (Python, NumPy or a fetched JAX array)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar: shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, (int, float)):
        return item
    raise TypeError(f"metric {name!r} is not a number: {item!r}")


def _json_value(value: Any) -> Any:
    """`value` with each non-finite float as its string token, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _json_value(np.asarray(value).tolist())
    return value


def _number(value: Any) -> Any:
    """The inverse of `_json_value` for one value that was a number."""
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def _nanmean(x: np.ndarray, axis=None, keepdims=False) -> np.ndarray:
    """Mean over the non-NaN entries; NaN where there is none (without NumPy's empty-slice warning)."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    return np.nansum(x, axis=axis, keepdims=keepdims) / np.where(count > 0, count, np.nan)


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Unbiased (N - 1) std over the non-NaN entries, 0 below two of them: `grpo._nanstd` in NumPy."""
    count = np.sum(~np.isnan(x), axis=axis)
    squares = np.nansum(np.square(x - _nanmean(x, axis, keepdims=True)), axis=axis)
    return np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), 0.0)


# `metric_names`: which definition the plain names `reward_std` and `kl` log. "trl": TRL 1.16's (`reward_std` the
# std over the batch's rewards, `kl` the mean over its tokens), Visual-RFT's then under explicit names. "visual_rft":
# Visual-RFT's (the mean over prompts of the in-group std; the mean over sequences of each one's token mean), TRL's
# then under explicit names. Plain name -> (Visual-RFT's explicit name, TRL's explicit name).
METRIC_NAMES = ("trl", "visual_rft")
_DEFINITIONS = {"reward_std": ("reward_std_in_group", "reward_std_batch"), "kl": ("kl_sequence_mean", "kl_token_mean")}


def named(scalars: Mapping[str, float], metric_names: str) -> dict[str, float]:
    """`scalars` (as the loop computes them: TRL's under the plain names) under `metric_names`' naming.

    Under "visual_rft" each plain name takes Visual-RFT's value and TRL's moves to its explicit name, so both
    stay in the log and the plain names compare with a Visual-RFT log. A name the step did not log (SFT has
    no reward, beta 0 no KL) stays absent.
    """
    if metric_names not in METRIC_NAMES:
        raise ValueError(f"metric_names={metric_names!r} is not one of {METRIC_NAMES}")
    renamed = dict(scalars)
    if metric_names == "visual_rft":
        for plain, (visual_rft, trl) in _DEFINITIONS.items():
            if plain in renamed and visual_rft in renamed:
                renamed[trl], renamed[plain] = renamed[plain], renamed.pop(visual_rft)
    return renamed


def reward_stats(total: Any, rewards: Mapping[str, Any], group_size: int, valid: Any = None) -> dict[str, float]:
    """Reward scalars of one batch: what tells whether GRPO has a signal to learn from.

    `total` is the weighted reward float[N] and `rewards` each reward function's float[N], with row
    b * G + g sample g of prompt b (as `grpo.advantages`). Returns `reward`, `reward_std` (over the
    batch), `reward_std_in_group` (the mean over prompts of the std within a group: the scale the
    group advantages divide by; near 0 means no learning signal), `reward_zero_std_groups` (the
    fraction of prompts whose samples all scored alike, or with one scored sample: advantage 0) and
    `reward/NAME`, `reward/NAME_std`.
    Rows with `valid=False` (padding) and non-finite rewards are left out, as the advantages leave
    them out; stds are unbiased (N - 1) over the finite entries, 0 below two, as `grpo._nanstd`.
    """
    def clean(values):
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size % group_size:
            raise ValueError(f"{values.size} rewards do not split into groups of {group_size}")
        values = np.where(np.isfinite(values), values, np.nan)
        if valid is not None:
            values = np.where(np.asarray(valid, bool).reshape(-1), values, np.nan)
        return values

    total = clean(total)
    groups = total.reshape(-1, group_size)
    group_std = _nanstd(groups, axis=1)[np.any(~np.isnan(groups), axis=1)]  # prompts with a scored sample
    stats = {"reward": float(_nanmean(total)), "reward_std": float(_nanstd(total)),
             "reward_std_in_group": float(group_std.mean()) if group_std.size else math.nan,
             "reward_zero_std_groups": float(np.mean(group_std == 0)) if group_std.size else math.nan}
    for name, values in rewards.items():
        values = clean(values)
        stats[f"reward/{name}"] = float(_nanmean(values))
        stats[f"reward/{name}_std"] = float(_nanstd(values))
    return stats


# --------------------------------------------------------------------------------------- files


def _read_rows(path: str) -> tuple[list[dict], bool]:
    """(the rows of a jsonl file up to its first unreadable line, whether every line was readable)."""
    rows = []
    with storage.open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return rows, False
            if not isinstance(row, dict) or not line.endswith("\n"):
                return rows, False
            rows.append(row)
    return rows, True


def truncate_after(path: str, step: int) -> int:
    """Drop the rows of jsonl `path` with `step` > `step`, and a torn last line; returns rows dropped.

    The rows written after the restored checkpoint belong to steps the resumed run computes again.
    The kept rows replace `path` atomically (`storage.write_text_atomic`), so a crash here leaves
    either the old file or the new one. A missing file is a fresh run: nothing to do.
    """
    if not storage.exists(path):
        return 0
    rows, whole = _read_rows(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    dropped = len(rows) - len(kept) + (0 if whole else 1)
    if dropped:
        storage.write_text_atomic(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept))
    return dropped


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `metrics.jsonl`, with "NaN", "Infinity" and "-Infinity" back as floats."""
    rows, _ = _read_rows(storage.join(workdir, METRICS_FILE))
    return [{k: _number(v) for k, v in row.items()} for row in rows]


def read_samples(workdir: str) -> list[dict]:
    """The rows of `samples.jsonl`, with each row's `rewards` values back as floats."""
    rows, _ = _read_rows(storage.join(workdir, SAMPLES_FILE))
    for row in rows:
        if isinstance(row.get("rewards"), dict):
            row["rewards"] = {k: _number(v) for k, v in row["rewards"].items()}
    return rows


class _EventFile:
    """An append-only TensorBoard event file: length-prefixed, CRC-checked `Event` protos.

    tensorboard's `EventFileWriter` opens its file through `tensorboard.compat.tf.io.gfile`, which
    imports TensorFlow when it is installed and without it cannot write to a bucket; this writes the
    same records through `storage.open_append`, and synchronously, so a flushed step is stored (no
    writer thread to lose a queue at preemption).
    """

    _opened = 0  # distinguishes files opened in the same second by one process; names sort in order

    def __init__(self, logdir: str):
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{_EventFile._opened}"
        _EventFile._opened += 1
        self.path = storage.join(logdir, name)
        self._file = storage.open_append(self.path)
        self._records = RecordWriter(self._file)
        self.add(event_pb2.Event(file_version="brain.Event:2"))

    def add(self, event: event_pb2.Event) -> None:
        if not event.wall_time:
            event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def flush(self, sync: bool = False) -> None:
        if sync:
            self._file.sync()
        else:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _text_value(tag: str, texts: Sequence[str]) -> summary_pb2.Summary.Value:
    """A TensorBoard text-plugin value: a 1-D string tensor, shown as a table with one row per text."""
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[t.encode("utf-8") for t in texts],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(texts))]))
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _sample_markdown(sample: Mapping[str, Any]) -> str:
    """One sample as markdown: its rewards, then its completion verbatim (in a code block)."""
    rewards = sample.get("rewards", {})
    head = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rewards.items())
    body = str(sample.get("completion", "")).replace("```", "'''")
    return f"**{head or 'no rewards'}**\n\n```\n{body}\n```"


class MetricWriter:
    """The run's metric sinks; on any process but 0 (or with `enabled=False`) every method does nothing.

    `start_step` is the step the run starts from (the restored checkpoint's step, 0 on a fresh
    run): rows after it are dropped from the jsonl files first (see the module docstring).
    """

    def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool | None = None, tensorboard: bool = True):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._metrics = self._samples = self._events = None
        if not self.enabled:
            return
        storage.makedirs(workdir)
        self._metrics = self._open(METRICS_FILE, start_step)
        self._samples = self._open(SAMPLES_FILE, start_step)
        if tensorboard:
            self._events = _EventFile(workdir)
            self._events.add(event_pb2.Event(step=start_step + 1,
                                             session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _open(self, name: str, start_step: int) -> storage.AppendFile:
        path = storage.join(self.workdir, name)
        truncate_after(path, start_step)
        return storage.open_append(path)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One row of `metrics.jsonl` and one TensorBoard scalar per entry of `scalars`.

        Values may be Python or NumPy numbers or JAX arrays of one element (fetched here in one
        `jax.device_get`); `step` is added as the row's first key and may not be among them.
        """
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is the row's key; pass it as the step argument")
        values = {name: _scalar(name, v) for name, v in jax.device_get(dict(scalars)).items()}
        row = {"step": int(step), **values}
        self._metrics.write((json.dumps(_json_value(row), allow_nan=False) + "\n").encode("utf-8"))
        self._metrics.flush()
        if self._events is not None:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                                 for k, v in values.items()])
            self._events.add(event_pb2.Event(step=int(step), summary=summary))
            self._events.flush()

    def write_samples(self, step: int, samples: Iterable[Mapping[str, Any]], tag: str = "samples") -> None:
        """Sample completions with their rewards: rows of `samples.jsonl` and one TensorBoard text entry.

        Each sample is a mapping of JSON-able values, by convention `prompt`, `completion`,
        `solution` and `rewards` ({name: float}); it is written as given, after `step`.
        """
        if not self.enabled:
            return
        samples = [dict(s) for s in samples]
        for sample in samples:
            line = json.dumps(_json_value({"step": int(step), **sample}), allow_nan=False) + "\n"
            self._samples.write(line.encode("utf-8"))
        self._samples.flush()
        if self._events is not None and samples:
            summary = summary_pb2.Summary(value=[_text_value(tag, [_sample_markdown(s) for s in samples])])
            self._events.add(event_pb2.Event(step=int(step), summary=summary))
            self._events.flush()

    def flush(self) -> None:
        """Everything written so far onto the disk (or into the bucket), not only to the OS (before a
        checkpoint, say)."""
        if not self.enabled:
            return
        for f in (self._metrics, self._samples):
            f.sync()
        if self._events is not None:
            self._events.flush(sync=True)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            for f in (self._metrics, self._samples, self._events):
                if f is not None:
                    f.close()
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
