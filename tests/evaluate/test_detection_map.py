"""Detection mAP (issue 11): hand-written completions through our text -> boxes -> COCO-results path give
what pycocotools' COCOeval gives on the same boxes, and `python -m vrft_jax.evaluate score` prints it.

The set: 5 images of different sizes, 3 categories, 11 ground-truth boxes. Each (image, category) question
has a completion written by hand in one of the forms models produce (JSON or Python quotes, `[[ ]]`, a
newline inside the answer, `, ...`, duplicates, a cut-off list, `No Objects`, no tags); `EXPECTED_BOXES`
lists, independently, the boxes Visual-RFT's reader takes from each, which pycocotools scores directly.
Tolerance 1e-9: both sides are float64 arithmetic over the same boxes; faster-coco-eval reimplements the
matching and accumulation in C++, and any difference beyond rounding would be a different algorithm.
"""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vrft_jax.evaluate import detection, inputs, readers, score

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGES = [(1, 640, 480), (2, 500, 375), (3, 800, 600), (4, 333, 500), (5, 1000, 1000)]  # id, width, height
CATEGORIES = [(1, "bus"), (2, "cat"), (3, "stop sign")]
GT = [  # image, category, [x, y, w, h] pixels
    (1, 1, [10, 20, 200, 150]), (1, 1, [300, 40, 120, 100]), (1, 2, [50, 300, 100, 90]),
    (2, 2, [100, 100, 150, 120]), (2, 3, [20, 20, 60, 60]),
    (3, 1, [400, 300, 300, 250]), (3, 3, [10, 10, 30, 30]),
    (4, 2, [30, 60, 200, 300]), (4, 2, [250, 400, 60, 80]),
    (5, 1, [100, 100, 500, 400]), (5, 3, [700, 700, 200, 200]),
]


def ground_truth():
    return {"images": [{"id": i, "width": w, "height": h} for i, w, h in IMAGES],
            "categories": [{"id": c, "name": n} for c, n in CATEGORIES],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for k, (i, c, b) in enumerate(GT)]}


# (image, category) -> (completion, the 0..1000 boxes with scores Visual-RFT's reader takes from it)
CASES = {
    (1, 1): ("<think>two buses</think> <answer>[{'Position': [16, 42, 328, 354], 'Confidence': 0.93}, "
             "{'Position': [469, 83, 656, 292], 'Confidence': 0.71}]</answer>",
             [([16, 42, 328, 354], 0.93), ([469, 83, 656, 292], 0.71)]),
    (1, 2): ('<think>a cat</think><answer>[{"Position": [80, 625, 234, 813], "Confidence": 0.6}]</answer>',
             [([80, 625, 234, 813], 0.6)]),
    (2, 2): ("<think>x</think><answer>[[{'Position': [200, 267, 500, 587], 'Confidence': 0.88}, "
             "{'Position': [200, 267, 500, 587], 'Confidence': 0.5}, {'Position': [600, 600, 700, 900], "
             "'Confidence': 0.4}]]</answer>",
             [([200, 267, 500, 587], 0.88), ([600, 600, 700, 900], 0.4)]),  # [[ ]] fixed; the duplicate dropped
    (2, 3): ("<think>sign</think><answer>[{'Position': [40, 53, 160,\n 213], 'Confidence': 0.77}, ...]</answer>",
             [([40, 53, 160, 213], 0.77)]),  # a newline in the answer and ", ..." removed
    (3, 1): ("<think>bus</think> <answer>[{'Position': [500, 500, 875, 917], 'Confidence': 0.95}, "
             "{'Position': [10, 10, 90, 9", []),  # cut off before </answer>: no box in Visual-RFT's reader
    (3, 3): ("<think>small sign</think><answer>[{'Position': [12, 17, 50, 67], 'Confidence': 0.3}, "
             "{'Position': [100, 100, 200, 200], 'Confidence': 0.9}]</answer>",
             [([12, 17, 50, 67], 0.3), ([100, 100, 200, 200], 0.9)]),
    (3, 2): ("<think>no cat</think><answer>No Objects</answer>", []),
    (4, 2): ("[{'Position': [90, 120, 690, 720], 'Confidence': 0.85}, {'Position': [751, 800, 931, 960], "
             "'Confidence': 0.65}, {'Position': [0, 0, 300, 300], 'Confidence': 0.2}]",
             [([90, 120, 690, 720], 0.85), ([751, 800, 931, 960], 0.65), ([0, 0, 300, 300], 0.2)]),  # no tags
    (5, 1): ("<think>a big bus</think><answer>[{'Position': [110, 95, 590, 510], 'Confidence': 1}, "
             "{'Position': [120, 100, 600, 500], 'Confidence': 0.55}, {'Position': [0, 0, 50], 'Confidence': 0.9}, "
             "{'Position': [1, 2, 3, 4], 'Confidence': 0.1}]</answer>",
             [([110, 95, 590, 510], 1.0), ([120, 100, 600, 500], 0.55)]),  # a 3-number box ends the list there
    (5, 3): ("<think>sign</think><answer>[{'Position': [690, 705, 905, 890], 'Confidence': 0.8}]</answer>",
             [([690, 705, 905, 890], 0.8)]),
    (5, 2): ("<think>?</think><answer>[]</answer>", []),  # an empty list: the script's error path
}


def expected_results(gt):
    sizes = {i: (w, h) for i, w, h in IMAGES}
    results = []
    for (image, category), (_, boxes) in CASES.items():
        w, h = sizes[image]
        for (x1, y1, x2, y2), s in boxes:
            px = [x1 / 1000 * w, y1 / 1000 * h, x2 / 1000 * w, y2 / 1000 * h]
            results.append({"image_id": image, "category_id": category,
                            "bbox": [px[0], px[1], px[2] - px[0], px[3] - px[1]], "score": s})
    return results


def pycocotools_metrics(gt, results):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    evaluation = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    precision = evaluation.eval["precision"]
    per_category = {}
    for k, cid in enumerate(evaluation.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_category[dict(CATEGORIES)[cid]] = float(np.mean(p[p > -1]))
    return {"AP": evaluation.stats[0], "AP50": evaluation.stats[1], "AP75": evaluation.stats[2],
            "per_category_AP": per_category}


def queries():
    return [detection.Query(i, c, text) for (i, c), (text, _) in CASES.items()]


def test_the_reader_takes_the_boxes_visual_rfts_script_takes():
    for (image, category), (text, boxes) in CASES.items():
        reading = readers.read_boxes(text, "visual_rft")
        assert list(zip(reading.boxes, reading.scores)) == [([float(v) for v in b], s) for b, s in boxes], \
            (image, category)
    assert readers.read_boxes(CASES[(5, 2)][0]).status == "error"
    assert readers.read_boxes(CASES[(5, 1)][0]).status == "error"  # its first two boxes kept all the same
    assert readers.read_boxes(CASES[(3, 2)][0]).status == "no_boxes"


def test_map_through_text_equals_pycocotools_on_the_same_boxes():
    gt = ground_truth()
    results, counts = detection.to_results(queries(), gt)
    expected_rows = expected_results(gt)
    assert len(results) == len(expected_rows) == counts["boxes"]
    for ours, theirs in zip(results, expected_rows):
        assert ours["image_id"] == theirs["image_id"] and ours["score"] == theirs["score"]
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], rtol=0, atol=1e-9)
    ours = detection.evaluate(gt, results, protocol="coco")
    reference = pycocotools_metrics(gt, expected_rows)
    assert 0.2 < reference["AP"] < 0.9  # a set with hits, misses and false positives: not a degenerate 0 or 1
    for key in ("AP", "AP50", "AP75"):
        assert abs(ours[key] - reference[key]) <= 1e-9, key
    for name, value in reference["per_category_AP"].items():
        assert abs(ours["per_category_AP"][name] - value) <= 1e-9, name
    # the paper's reduction: the mean per-class AP over the recipe's categories
    subset = ["bus", "stop sign"]
    assert abs(detection.evaluate(gt, results, categories=subset)["paper_mAP"]
               - np.mean([reference["per_category_AP"][n] for n in subset])) <= 1e-9
    assert counts["errors"] == 2 and counts["no_boxes"] == 3 and counts["queries"] == len(CASES)


def test_the_score_command_prints_the_same_numbers(tmp_path):
    gt = ground_truth()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with open(tmp_path / "predictions.jsonl", "w") as f:
        for (image, category), (text, _) in CASES.items():
            f.write(json.dumps({"image_id": image, "category_id": category, "completion": text}) + "\n")
    out = subprocess.run([sys.executable, "-m", "vrft_jax.evaluate", "score", "--gt", str(tmp_path / "gt.json"),
                          "--predictions", str(tmp_path / "predictions.jsonl")], capture_output=True, text=True,
                         cwd=REPO, check=True)
    printed = json.loads(out.stdout)
    reference = pycocotools_metrics(gt, expected_results(gt))
    for key in ("AP", "AP50", "AP75"):
        assert abs(printed[key] - reference[key]) <= 1e-9, key
    assert printed["per_category_AP"].keys() == reference["per_category_AP"].keys()
    for name, value in reference["per_category_AP"].items():
        assert abs(printed["per_category_AP"][name] - value) <= 1e-9, name
    assert printed["protocol"] == "coco" and printed["reader"] == "visual_rft"


def test_the_strict_reader_keeps_the_complete_boxes_of_a_cut_off_list():
    reading = readers.read_boxes(CASES[(3, 1)][0], "strict")
    assert reading.boxes == [[500.0, 500.0, 875.0, 917.0]] and reading.scores == [0.95]


def test_the_pixels_frame_scales_by_the_size_the_model_saw():
    gt = ground_truth()
    text = "<answer>[{'Position': [28, 56, 280, 112], 'Confidence': 0.5}]</answer>"
    results, _ = detection.to_results([detection.Query(1, 1, text, seen_hw=(336, 448))], gt, frame="pixels")
    np.testing.assert_allclose(results[0]["bbox"], [28 * 640 / 448, 56 * 480 / 336, 252 * 640 / 448,
                                                    56 * 480 / 336], rtol=1e-12)


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"image_id": "1", "category_id": 1, "completion": "x"}', "needs int image_id"),
])
def test_the_score_command_names_a_bad_line(tmp_path, line, message):
    (tmp_path / "p.jsonl").write_text('{"image_id": 1, "category_id": 1, "completion": ""}\n' + line + "\n")
    with pytest.raises(inputs.InputError, match=rf"p.jsonl:2: {message}"):
        inputs.read_predictions(str(tmp_path / "p.jsonl"))


def test_a_prediction_for_an_unknown_image_is_an_error_naming_it():
    with pytest.raises(inputs.InputError, match=r"prediction 1 \(image 99, category 1\): not in the ground truth"):
        score.score(ground_truth(), [(99, 1, "x")])
