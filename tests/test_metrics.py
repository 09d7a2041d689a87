"""Metric sinks and the console: rows round-trip, TensorBoard reads its files back, resume truncates."""
import io
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from vrft_jax import metrics, progress
from vrft_jax.metrics import MetricWriter, every, read_metrics, read_samples, reward_stats, truncate_after
from vrft_jax.progress import Reporter, Timer, format_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(step):
    return {"loss": 0.5 / step, "kl": 0.01 * step, "reward": 0.1 * step, "reward/iou": 0.2 * step,
            "reward/format": 1.0, "time/rollout": 2.0, "tokens": np.float32(100 + step)}


def _run(workdir, steps, start_step=0, **kw):
    with MetricWriter(str(workdir), start_step=start_step, enabled=True, **kw) as writer:
        for step in steps:
            writer.write(step, _scalars(step))
            if every(step, 2, steps[-1]):
                writer.write_samples(step, [{"completion": f"<answer>{step}</answer>", "rewards": {"iou": 0.1}}])


def _tensorboard(workdir):
    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.SCALARS: 0,
                                                                           event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def test_jsonl_rows_round_trip(tmp_path):
    import jax.numpy as jnp

    values = {"loss": jnp.float32(0.25), "kl": np.float64(1e-3), "count": 7, "flag": np.bool_(True),
              "reward": [0.5], "nan": float("nan"), "inf": np.float32(np.inf), "ninf": -math.inf}
    with MetricWriter(str(tmp_path), enabled=True) as writer:
        writer.write(3, values)
        writer.write_samples(3, [{"prompt": "p", "completion": "NaN", "rewards": {"iou": float("nan"), "fmt": 1.0}}])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))  # strict JSON
    (row,) = read_metrics(str(tmp_path))
    assert list(row)[0] == "step" and row["step"] == 3
    assert row["loss"] == 0.25 and row["kl"] == 1e-3 and row["count"] == 7 and row["flag"] == 1
    assert row["reward"] == 0.5 and isinstance(row["count"], int)
    assert math.isnan(row["nan"]) and row["inf"] == math.inf and row["ninf"] == -math.inf
    (sample,) = read_samples(str(tmp_path))
    assert sample["step"] == 3 and sample["completion"] == "NaN" and sample["prompt"] == "p"
    assert math.isnan(sample["rewards"]["iou"]) and sample["rewards"]["fmt"] == 1.0


def test_write_refuses_non_scalars_and_step(tmp_path):
    with MetricWriter(str(tmp_path), enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'loss' is not a scalar"):
            writer.write(1, {"loss": np.zeros(2)})
        with pytest.raises(ValueError, match="step"):
            writer.write(1, {"step": 1})


def test_tensorboard_reads_back_scalars_and_samples(tmp_path):
    _run(tmp_path, range(1, 6))
    acc = _tensorboard(tmp_path)
    tags = acc.Tags()
    assert set(_scalars(1)) <= set(tags["scalars"])
    for tag in _scalars(1):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([e.value for e in events], [float(_scalars(s)[tag]) for s in range(1, 6)],
                                   rtol=1e-7)  # simple_value is float32
    assert "samples" in tags["tensors"]
    texts = acc.Tensors("samples")
    assert [t.step for t in texts] == [2, 4, 5]
    assert "<answer>4</answer>" in texts[1].tensor_proto.string_val[0].decode()
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "text"


def test_resume_truncates_to_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, range(1, 7))
    _run(resumed, range(1, 6))  # checkpoint at 3, logged up to 5, then preempted
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a torn last line
    _run(resumed, range(4, 7), start_step=3)

    def without_timings(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    assert without_timings(read_metrics(str(resumed))) == without_timings(read_metrics(str(straight)))
    assert [r["step"] for r in read_metrics(str(resumed))] == [1, 2, 3, 4, 5, 6]
    assert read_samples(str(resumed)) == read_samples(str(straight))
    # TensorBoard: the second file's SessionLog.START at step 4 discards the first file's steps 4 and 5.
    assert len([f for f in os.listdir(resumed) if "tfevents" in f]) == 2
    assert [e.step for e in _tensorboard(resumed).Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_truncate_after(tmp_path):
    path = str(tmp_path / "m.jsonl")
    assert truncate_after(path, 0) == 0 and not os.path.exists(path)
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4))
    before = os.stat(path).st_mtime_ns
    assert truncate_after(path, 4) == 0 and os.stat(path).st_mtime_ns == before  # nothing to drop: untouched
    assert truncate_after(path, 2) == 2
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]
    assert truncate_after(path, 0) == 2 and open(path).read() == ""  # a fresh run in an old workdir
    assert not os.path.exists(path + ".tmp")


def test_writer_is_silent_off_process_zero(tmp_path):
    writer = MetricWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.write_samples(1, [{"completion": "x"}])
    writer.flush()
    writer.close()
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("step, n, total, expected", [
    (0, 5, 10, False), (1, 5, 10, False), (5, 5, 10, True), (7, 5, 10, False), (10, 5, 10, True),
    (7, 5, 7, True),  # the last step, not a multiple
    (3, 0, 7, False), (7, 0, 7, True), (7, -1, 7, True),  # off: only the last step
    (1, 1, 3, True), (6, 3, None, True), (7, 3, None, False),
])
def test_every(step, n, total, expected):
    assert every(step, n, total) is expected


def test_reward_stats():
    # 2 prompts x G=3; prompt 0 all alike; row 5 unscorable (NaN), row 4 padding (valid False).
    total = np.array([1.0, 1.0, 1.0, 0.0, 2.0, np.nan])
    iou = np.array([0.5, 0.5, 0.5, 0.0, 1.0, np.inf])
    valid = np.array([True, True, True, True, False, True])
    stats = reward_stats(total, {"iou": iou}, group_size=3, valid=valid)
    kept = np.array([1.0, 1.0, 1.0, 0.0])
    assert stats["reward"] == pytest.approx(kept.mean())
    assert stats["reward_std"] == pytest.approx(kept.std(ddof=1))
    assert stats["reward_std_in_group"] == 0.0  # group 1 has one scored sample: std 0, as grpo._nanstd
    assert stats["reward_zero_std_groups"] == 1.0
    assert stats["reward/iou"] == pytest.approx(0.375)
    assert stats["reward/iou_std"] == pytest.approx(np.std([0.5, 0.5, 0.5, 0.0], ddof=1))
    stats = reward_stats([0.0, 1.0, 1.0, 1.0], {}, group_size=2)
    assert stats["reward_std_in_group"] == pytest.approx(np.std([0.0, 1.0], ddof=1) / 2)
    assert stats["reward_zero_std_groups"] == 0.5
    with pytest.raises(ValueError, match="groups of 4"):
        reward_stats([1.0] * 6, {}, group_size=4)


def test_metric_names_put_visual_rfts_definitions_under_the_plain_names_and_keep_trls_under_explicit_ones():
    logged = {"reward_std": 0.5, "reward_std_in_group": 0.2, "kl": 0.03, "kl_sequence_mean": 0.04, "loss": 1.0}
    assert metrics.named(logged, "trl") == logged
    assert metrics.named(logged, "visual_rft") == {"reward_std": 0.2, "reward_std_batch": 0.5, "kl": 0.04,
                                                   "kl_token_mean": 0.03, "loss": 1.0}
    sft = {"loss": 1.0, "tokens": 12.0}  # no reward, no KL: nothing to rename
    assert metrics.named(sft, "visual_rft") == sft
    with pytest.raises(ValueError, match=r"metric_names='r1_v' is not one of \('trl', 'visual_rft'\)"):
        metrics.named(logged, "r1_v")


SCALARS = {"reward": 0.61, "reward_std": 0.2, "reward_std_in_group": 0.1, "reward_zero_std_groups": 0.25,
           "reward/iou": 0.4, "reward/iou_std": 0.3, "reward/format": 0.9, "reward/format_std": 0.05,
           "kl": 0.0123, "loss": -0.002, "clip_low": 0.01, "clip_high": 0.02, "completion_length": 87.25,
           "rollout_tokens_per_s": 1234.4, "time/rollout": 3.21, "time/update": 5.0, "nonfinite_total": 2.0,
           "entropy": 1.234, "no_answer": 0.125, "truncated": 0.5, "mismatch/kl": 3.2e-4}


def test_console_line_has_the_fields():
    line = format_line(120, 1000, SCALARS, eta=3723)
    for field in ("step 120/1000", "reward 0.610±0.200", "in-group std 0.100", "25% flat", "iou 0.400±0.300",
                  "format 0.900±0.050", "kl 0.0123", "loss -0.002", "clip 0.010/0.020", "len 87.2",
                  "1234 tok/s", "rollout 3.21s", "update 5.00s", "skipped 2", "eta 1:02:03", "ent 1.23",
                  "no-answer 12% cut 50%", "mismatch 0.00032"):
        assert field in line, (field, line)
    assert format_line(1, 10, {"loss": 1.0}) == "step 1/10 | loss 1 | eta ?"


def test_reporter_plain_lines_and_eta(monkeypatch):
    clock = iter([100.0, 102.0, 104.0])  # the ends of steps 1-3: step 1 compiled for 100 s, the others take 2 s
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    stream = io.StringIO()  # not a terminal: no bar
    reporter = Reporter(10, start_step=0, stream=stream, enabled=True)
    assert reporter.update(1, {"loss": 1.0}) == "step 1/10 | loss 1 | eta ?"
    assert reporter.update(2) is None
    assert reporter.update(3, {"loss": 0.5}) == "step 3/10 | loss 0.5 | eta 0:00:14"  # 7 steps x 2 s
    reporter.close()
    assert stream.getvalue().splitlines() == ["step 1/10 | loss 1 | eta ?", "step 3/10 | loss 0.5 | eta 0:00:14"]


def test_reporter_resumed_with_bar():
    stream = io.StringIO()
    with Reporter(6, start_step=3, stream=stream, bar=True, enabled=True) as reporter:
        reporter.update(4)
        reporter.update(5, {"loss": 0.5})
    out = stream.getvalue()
    assert "step 5/6 | loss 0.5" in out and "5/6" in out.replace("step 5/6", "")  # the line and the bar


def test_timer():
    timer = Timer()
    with timer.timed("rollout"):
        pass
    with timer.timed("rollout"):
        pass
    with pytest.raises(RuntimeError):
        with timer.timed("update"):
            raise RuntimeError
    assert set(timer.scalars()) == {"time/rollout", "time/update"}
    assert all(v >= 0 for v in timer.scalars().values())
    timer.reset()
    assert timer.scalars() == {}


def test_no_tensorflow_even_when_installed(tmp_path):
    """An importable `tensorflow` (here an empty stand-in) is still never imported by the writer."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    code = textwrap.dedent(f"""
        import sys
        import vrft_jax.metrics, vrft_jax.progress
        assert "tensorflow" not in sys.modules, "after import"
        with vrft_jax.metrics.MetricWriter({str(tmp_path / "run")!r}, enabled=True) as w:
            w.write(1, {{"loss": 1.0}})
            w.write_samples(1, [{{"completion": "x", "rewards": {{"iou": 1.0}}}}])
        assert "tensorflow" not in sys.modules, "after writing"
        import tensorflow  # the stand-in is importable: the checks above were not vacuous
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), REPO]), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert metrics.METRICS_FILE in os.listdir(tmp_path / "run")
