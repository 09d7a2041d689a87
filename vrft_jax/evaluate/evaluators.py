"""Evaluators, registered by type and built from a recipe's `eval` block (big_vision's evaluator shape).

    evaluator = build(data=..., model_config=..., sampling=..., settings=..., ...)   # `recipe.evaluator` for a recipe's
    result = evaluator.run(weights)   # the sampler's weights (`sampling.make_sampler_cast`)
    result.scalars                    # {"reward": ..., "AP": ...}: metrics.jsonl and TensorBoard, under eval/
    result.metrics                    # everything, nested (per-category AP, per-class accuracy, counts)
    result.predictions                # one row per example: id, prompt, completion, parsed answer, rewards

Types: `rewards` (the recipe's rewards of greedy answers), `classification` (accuracy, both rules),
`detection` (COCO or LVIS mAP), `grounding` (box mIoU and cIoU). Each decodes the held-out set once per run
with batched greedy decoding (the rollout engine, G = 1, the block's repetition penalty and length), every
example exactly once: the finite stream's last batch is filled with padding rows, which the sampler takes
and nothing else sees. The decode compiles once: its shapes and settings are the run's, fixed at build.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from vrft_jax import distributed
from vrft_jax import storage as files  # `storage` is the data package's (datasets), imported below
from vrft_jax.data import lisa, make_iterator, storage
from vrft_jax.data.buckets import size_buckets
from vrft_jax.data.pipeline import open_source
from vrft_jax.evaluate import classification, detection, grounding, inputs, readers
from vrft_jax.evaluate.settings import EvaluationSettings
from vrft_jax.rewards import parse
from vrft_jax.rewards.frames import REL_SCALE, Frame, frame_of
from vrft_jax.sampling import detokenize, local_completions, rollout, stopped_rows

EVALUATORS: dict[str, type] = {}  # settings.TYPES, each registered below


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in EVALUATORS:
            raise ValueError(f"evaluator type {name!r} is registered twice")
        cls.type = name
        EVALUATORS[name] = cls
        return cls

    return add


@dataclasses.dataclass
class EvalResult:
    """metrics: the evaluator's whole output (JSON-able); scalars: the numbers to log; predictions: per example."""

    metrics: dict[str, Any]
    scalars: dict[str, float]
    predictions: list[dict[str, Any]]


class Evaluator:
    """Greedy answers for every held-out example, their rewards, and the type's metrics (`score`)."""

    type = "?"

    def __init__(self, *, data, model_config, sampling, reward_fn, tokenizer, sampler_graphdef,
                 settings: EvaluationSettings, mesh=None, reward_columns=("image_hw",)):
        self.data, self.model_config, self.sampling = data, model_config, sampling
        self.reward_fn, self.tokenizer, self.graphdef = reward_fn, tokenizer, sampler_graphdef
        self.settings, self.mesh, self.reward_columns = settings, mesh, reward_columns
        source, name = open_source(data)
        self.examples = len(source)
        # Sized once (`buckets="data"`): every evaluation of a run then decodes the same shapes, compiled once.
        self.data = size_buckets(data, model_config, tokenizer, source, name)

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, weights: nnx.State, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """(one row per example in stored order, timing): id, index, label, prompt, solution, image sizes,
        completion, its token count, and the recipe's rewards."""
        model = nnx.merge(self.graphdef, weights)
        rows: list[dict[str, Any]] = []
        batches = math.ceil(self.examples / (self.data.batch_size * jax.process_count()))
        bar = tqdm(total=batches, desc=f"eval {self.type}", unit="batch", leave=False,  # on a terminal only, as
                   disable=not (progress and jax.process_index() == 0 and sys.stderr.isatty()))  # the Reporter's
        start, tokens_made = time.perf_counter(), 0
        iterator = make_iterator(self.data, self.model_config, mesh=self.mesh, tokenizer=self.tokenizer)
        try:
            # The host's parts are agreed by every process (a bad record, an unreadable answer on one of them stops
            # them all, naming it) before any enters the next collective: the rollout, or the metrics' gather.
            while (batch := distributed.agreed(next, iterator, None)) is not None:
                out = rollout(model, batch.model_inputs, jax.random.key(0), self.sampling, mesh=self.mesh)
                out = jax.block_until_ready(out if self.mesh is None else distributed.pin_rows(out, self.mesh))
                tokens, mask = local_completions(out)
                valid = np.asarray(batch.meta["valid"], bool)
                lengths = mask.sum(axis=1)
                stopped = stopped_rows(tokens, mask, self.sampling.eos_token_ids)
                rows.extend(distributed.agreed(self._rows, batch.meta, detokenize(self.tokenizer, tokens, mask),
                                               lengths, stopped, valid))
                tokens_made += int(mask[valid].sum())
                bar.update(1)
        finally:
            bar.close()
            iterator.close()
        seconds = time.perf_counter() - start
        distributed.agreed(self._add_rewards, rows)
        return rows, {"seconds": seconds, "examples_per_s": len(rows) / seconds if seconds else 0.0,
                      "tokens_per_s": tokens_made / seconds if seconds else 0.0}

    def _rows(self, meta: Mapping[str, Any], texts, lengths, stopped, valid) -> list[dict[str, Any]]:
        rows = []
        for i in np.flatnonzero(valid):  # padding rows end here: nothing downstream sees them
            rows.append({"id": meta["id"][i], "index": int(meta["index"][i]), "label": meta["label"][i],
                         "prompt": meta["problem"][i], "solution": meta["solution"][i],
                         "image_hw": [int(v) for v in meta["image_hw"][i]],
                         "source_hw": [int(v) for v in meta["source_hw"][i]],
                         "completion": texts[i], "completion_tokens": int(lengths[i]), "stopped": bool(stopped[i])})
        return rows

    def _add_rewards(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = {}
        if "image_hw" in self.reward_columns:
            columns["image_hw"] = np.array([row["image_hw"] for row in rows], np.int32)
        columns["stopped"] = np.array([row["stopped"] for row in rows], bool)  # read by answer_format
        scored = self.reward_fn([r["completion"] for r in rows], [r["solution"] for r in rows], **columns)
        for k, row in enumerate(rows):
            row["rewards"] = {"total": float(scored.total[k]),
                              **{name: float(values[k]) for name, values in scored.per_reward.items()}}

    # -- the run ----------------------------------------------------------------------------------

    def run(self, weights: nnx.State, progress: bool = True) -> EvalResult:
        rows, timing = self.decode(weights, progress)
        if jax.process_count() > 1:  # each process decoded its share of the set: metrics over all of them
            rows = sorted((row for part in distributed.gather_objects(rows) for row in part), key=lambda r: r["index"])
        if len(rows) != self.examples:
            raise AssertionError(f"evaluated {len(rows)} examples of {self.examples}")
        totals = np.array([row["rewards"]["total"] for row in rows], np.float64)
        reward = {"reward": float(totals.mean()) if len(rows) else None,
                  "reward_standard_error": float(totals.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else 0.0,
                  "examples": len(rows)}
        for name in (rows[0]["rewards"] if rows else {}):
            if name != "total":
                reward[f"reward/{name}"] = float(np.mean([row["rewards"][name] for row in rows]))
        scored = self.score(rows)
        for row in rows:  # after score, which may read the answers
            row["format_valid"] = bool(row["stopped"] and self.answer_reads(row["completion"]))
        validity = {"format_valid_rate": float(np.mean([row["format_valid"] for row in rows])) if rows else None,
                    "stopped_rate": float(np.mean([row["stopped"] for row in rows])) if rows else None}
        metrics = {"type": self.type, **reward, **validity, **scored, "timing": timing}
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, value in (metrics.get("per_category_AP") or {}).items():
            if value is not None:  # a category without ground truth has no AP to plot
                scalars[f"AP/{name}"] = float(value)
        scalars.update(examples_per_s=timing["examples_per_s"])
        return EvalResult(metrics, scalars, rows)

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The type's metrics; may add parsed answers, and per-example scores (`row["scores"]`, by metric name:
        what the report's paired standard errors are computed from), to the rows."""
        return {}

    def answer_reads(self, completion: str) -> bool:
        """Whether the completion has a closed `<answer>` the task's strict reader reads (a box list or `No
        Objects`, a class name, a box): with `stopped` (it ended with EOS, not at the token limit), the
        completion is format-valid, the rate the report shows beside the accuracy."""
        answer = parse.strict_answer(completion, allow_unclosed=False)
        return answer is not None and bool(answer.strip())

    def image_bytes(self, row: Mapping[str, Any]) -> bytes:
        """The encoded image of a prediction row (for the report), read from the held-out set by its index."""
        if getattr(self, "_source", None) is None:
            self._source = open_source(self.data)[0]
        return self._source[row["index"]]["image"]


def save(result: EvalResult, directory: str, step: int) -> tuple[str, str]:
    """`directory/step_<step>.jsonl` (one prediction per line) and `step_<step>.json` (the metrics); their paths.
    `directory` may be a `gs://` URL; each file is replaced in one atomic write, the metrics last (their
    presence says the step was evaluated)."""
    predictions, metrics = (files.join(directory, f"step_{step}.{ext}") for ext in ("jsonl", "json"))
    files.write_text_atomic(predictions, "".join(json.dumps(row) + "\n" for row in result.predictions))
    files.write_text_atomic(metrics, json.dumps(result.metrics, indent=2))
    return predictions, metrics


def read_predictions(path: str) -> list[dict[str, Any]]:
    """The rows `save` wrote to `path` (local or gs://)."""
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


@register("rewards")
class RewardsEvaluator(Evaluator):
    """The recipe's rewards of greedy answers: their mean and standard error (in `Evaluator.run`)."""


@register("classification")
class ClassificationEvaluator(Evaluator):
    def score(self, rows):
        for row in rows:
            row["parsed"] = {"class": readers.class_answer(row["completion"], self.settings.parse)}
            row["scores"] = {"accuracy_substring": float(classification.correct_substring(row["completion"],
                                                                                         row["label"])),
                             "accuracy_strict": float(classification.correct_strict(row["completion"], row["label"]))}
        return classification.accuracy([r["completion"] for r in rows], [r["label"] for r in rows])


@register("grounding")
class GroundingEvaluator(Evaluator):
    """Box mIoU and cIoU of the read answers, in the stored image's pixels.

    The ground truth is the record's exact pixel box when its label holds one (`prepare lisa --evaluation`, as
    lisa_evaluation scores against the polygon's box), else the solution's box, which gen_sft.py truncated to
    the 0..1000 grid (up to 1/1000 of the side smaller); `ground_truth` in the metrics says which.
    """

    def score(self, rows):
        return score_grounding(rows, parse=self.settings.parse, frame=self.settings.frame)

    def answer_reads(self, completion):
        return readers.grounding_box(completion, "strict") is not None


def score_grounding(rows: list[dict[str, Any]], *, parse: str, frame: str) -> dict[str, Any]:
    """The grounding metrics of prediction rows (completion, solution, label, image sizes); adds each row's
    parsed box. A held-out set mixing pixel-box labels and solution boxes is an error naming the first odd row."""
    predicted, truth, kinds = [], [], set()
    for row in rows:
        box = readers.grounding_box(row["completion"], parse)
        row["parsed"] = {"box": box}
        kind, gt = _grounding_truth(row)
        kinds.add(kind)
        if len(kinds) > 1:
            raise ValueError(f"record {row['id']!r} (index {row['index']}): its ground truth is the {kind} but an "
                             "earlier record's is not; make the held-out set with one `prepare lisa` command")
        truth.append(gt)
        predicted.append(None if box is None else _to_pixels(box, row, frame_of(frame)))
        row["scores"] = {"mIoU": grounding.box_metrics(predicted[-1:], truth[-1:])["mIoU"]}
    return {**grounding.box_metrics(predicted, truth), **grounding.mask_metrics_absent(),
            "ground_truth": kinds.pop() if kinds else None}


def _grounding_truth(row) -> tuple[str, list[float]]:
    """("pixel box of the label" | "solution's 0..1000 box", the box in the stored image's pixels) of a row."""
    pixels = lisa.read_pixel_box(row["label"] or "")
    if pixels is not None:
        return "pixel box of the label", pixels
    return "solution's 0..1000 box", _to_pixels(readers.grounding_box(row["solution"], "visual_rft"), row,
                                                Frame.REL1000)


def _to_pixels(box, row, frame: Frame) -> list[float]:
    """A box of `frame` in the stored image's pixels (the grid: x / 1000 * W; pixels: of the seen image)."""
    height, width = row["source_hw"]
    if frame is Frame.REL1000:
        sx, sy = width / REL_SCALE, height / REL_SCALE
    else:
        sx, sy = width / row["image_hw"][1], height / row["image_hw"][0]
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


@register("detection")
class DetectionEvaluator(Evaluator):
    """mAP of the boxes of every (image, category) question of the held-out set (`vrft_jax.evaluate.detection`).

    Ground truth: `eval.gt`, a COCO or LVIS instances file whose image and category ids the records carry
    (`coco:IMAGE:CATEGORY`, as `prepare coco|lvis` names them), evaluated over every image of the file as
    Visual-RFT does; or, without one, the records' own boxes (`detection.ground_truth_from_records`). The query
    protocol is the dataset's: `prepare ... --queries exist:FILE` (Visual-RFT's: the categories a file lists per
    image), `all` (every category in every image) or `present` (the categories each image has); named in the output.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._gt_file = None
        if self.settings.gt:
            self._gt_file, _ = inputs.load_ground_truth(self.settings.gt)
        source = storage.read_metadata(self.data.path).get("source", {})
        queries = source.get("queries")
        self.query_protocol = ("records" if source.get("source") not in ("coco", "lvis") else
                               "visual_rft" if str(queries).startswith("exist:") else
                               {"all": "full", None: "present", "present": "present"}.get(queries, str(queries)))

    def answer_reads(self, completion):
        answer = parse.strict_answer(completion, allow_unclosed=False)
        return answer is not None and parse.strict_predictions(answer, readers.MAX_STRICT_BOXES) is not None

    def score(self, rows):
        if self._gt_file is None:
            gt, pairs = detection.ground_truth_from_records(rows)
        else:
            gt, pairs = self._gt_file, [_ids_of(row["id"]) for row in rows]
        queries = [detection.Query(image_id, category_id, row["completion"], tuple(row["image_hw"]))
                   for (image_id, category_id), row in zip(pairs, rows)]
        results, counts = detection.to_results(queries, gt, reader=self.settings.parse, frame=self.settings.frame,
                                               protocol=self.settings.protocol)
        for row in rows:
            reading = readers.read_boxes(row["completion"], self.settings.parse)
            row["parsed"] = {"boxes": reading.boxes, "scores": reading.scores, "status": reading.status}
        names = {c["name"] for c in gt["categories"]}
        categories = [c for c in self.settings.categories if c in names]
        metrics = detection.evaluate(gt, results, protocol=self.settings.protocol, categories=categories or None)
        return {**metrics, "query_protocol": self.query_protocol, "reader": self.settings.parse, "counts": counts,
                # a recipe category the held-out set never asks about has no AP, and is named, not averaged as 0
                "categories_not_in_data": [c for c in self.settings.categories if c not in names]}


def _ids_of(record_id: str) -> tuple[int, int]:
    parts = record_id.split(":")
    if len(parts) != 3 or parts[0] not in ("coco", "lvis") or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"record {record_id!r}: with eval.gt, detection records need ids 'coco:IMAGE:CATEGORY' "
                         "(as `prepare coco|lvis` writes them) to find their ground truth")
    return int(parts[1]), int(parts[2])


def build(**kwargs) -> Evaluator:
    """The evaluator registered as `settings.type`, built from the keyword arguments of `Evaluator`."""
    type_name = kwargs["settings"].type
    if type_name not in EVALUATORS:
        raise ValueError(f"unknown evaluator type {type_name!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[type_name](**kwargs)
