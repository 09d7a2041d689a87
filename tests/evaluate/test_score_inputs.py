"""`evaluate score` checks its two files before it scores (issue 20 item 4): what would make a number wrong is an
InputError naming the file and the line or annotation; what is legal but changes what the number means is a
counted warning, printed and in the output. And the strict reading of an answer counts the same false positives
as the paper's reading of it."""

import json

import pytest

from vrft_jax.evaluate import detection, inputs, readers, score


def gt():
    return {"images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 500, "height": 500}],
            "categories": [{"id": 1, "name": "bus"}, {"id": 2, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [64, 48, 320, 240]},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 100, 100]}]}


def line(image_id=1, category_id=1, completion="<answer>[{'Position': [100, 100, 600, 600], 'Confidence': 0.9}]"
         "</answer>"):
    return json.dumps({"image_id": image_id, "category_id": category_id, "completion": completion})


def with_(**changes):
    g = gt()
    for path, value in changes.items():
        block, index, key = path.split("__")
        g[block][int(index)][key] = value
    return g


@pytest.mark.parametrize("ground_truth, message", [
    ([], r"expected a COCO object with images, categories and annotations, got a JSON list"),
    ({"images": []}, r"no 'categories' list"),
    (with_(annotations__0__bbox=[64, 48, -320, 240]), r"annotation 0 \(id 1\) has a negative width or height"),
    (with_(annotations__1__bbox="50,50,100,100"), r"annotation 1 \(id 2\) needs a bbox of four finite numbers"),
    (with_(annotations__0__bbox=[64, 48, "w", 240]), r"annotation 0 \(id 1\) needs a bbox of four finite"),
    (with_(annotations__0__image_id=7), r"annotation 0 \(id 1\) names image 7, which is not in images"),
    (with_(annotations__0__category_id=9), r"names category 9, which is not in categories"),
    (with_(images__1__id=1), r"image id 1 appears twice"),
    (with_(images__0__id="1"), r"image 0 needs an int id"),
    (with_(images__0__width=0), r"image 1 needs a positive width, has 0"),
    (with_(categories__0__name=None), r"category 1 has no name"),
    (with_(images__0__neg_category_ids=[5]), r"image 1's neg_category_ids must list known category ids"),
])
def test_a_bad_ground_truth_is_named(tmp_path, ground_truth, message):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth))
    with pytest.raises(inputs.InputError, match=rf"{path}: .*{message}|{path}: {message}"):
        inputs.load_ground_truth(str(path))


def test_unreadable_ground_truth_names_the_file_and_line(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text('{\n  "images": [,]\n}')
    with pytest.raises(inputs.InputError, match=rf"{path}:2:14: the ground truth is not JSON"):
        inputs.load_ground_truth(str(path))
    path.write_bytes(b'{"images": "\xff"}')
    with pytest.raises(inputs.InputError, match=rf"{path}: the ground truth is not UTF-8 text"):
        inputs.load_ground_truth(str(path))
    with pytest.raises(inputs.InputError, match=r"missing.json: cannot read the ground truth"):
        inputs.load_ground_truth(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("lines, message", [
    ([b""], r"p.jsonl: no predictions \(the file is empty\)"),
    ([line().encode(), b'{"image_id": 1, "category_id": 2, "completion": "caf\xe9"}'], r"p.jsonl:2: not UTF-8 text"),
    ([line().encode(), b"[1, 2]"], r"p.jsonl:2: expected an object, got a JSON list"),
    ([line(image_id=3).encode()], r"p.jsonl:1: image 3 is not in the ground truth"),
    ([line(category_id=3).encode()], r"p.jsonl:1: category 3 is not in the ground truth"),
    ([line().encode(), line(completion="<answer>No Objects</answer>").encode()],
     r"p.jsonl:2: a second, different completion for image 1, category 1 \(line 1 has the first\)"),
])
def test_a_bad_predictions_file_is_named_with_its_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(inputs.InputError, match=message):
        inputs.read_predictions(str(path), gt())


def test_repeated_lines_partial_coverage_and_zero_size_boxes_are_counted_warnings(tmp_path):
    g = gt()
    g["annotations"].append({"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]})
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([line(), line(), "", line()]) + "\n")
    predictions, warnings = inputs.read_predictions(str(path), g)
    assert [p.line for p in predictions] == [1] and warnings == {"duplicate_lines": 2}
    result = score.score(g, predictions, warnings=warnings)
    assert result["warnings"] == {"duplicate_lines": 2, "zero_size_gt_boxes": 1, "images_without_predictions": 1,
                                  "gt_pairs_not_asked": 1}
    printed = inputs.describe(result["warnings"], {"images_without_predictions": 2})
    assert "warning: 1 of 2 ground-truth images no prediction asks about: their boxes count as missed" in printed


def test_the_lvis_protocol_on_a_coco_file_is_refused_and_the_reverse_warned():
    predictions = [(1, 1, json.loads(line())["completion"])]
    with pytest.raises(inputs.InputError, match=r"--protocol lvis: the ground truth is not an LVIS file"):
        score.score(gt(), predictions, protocol="lvis")
    lvis = gt()
    for category in lvis["categories"]:
        category["frequency"] = "r"
    assert score.score(lvis, predictions, protocol="coco")["warnings"]["coco_protocol_on_lvis_file"] == 1
    assert "coco_protocol_on_lvis_file" not in score.score(lvis, predictions)["warnings"]  # lvis by default


@pytest.mark.parametrize("inverted", [[600, 600, 100, 100], [600, 100, 100, 600], [100, 600, 600, 100]])
def test_strict_and_the_papers_reading_count_an_inverted_box_alike(inverted):
    """The same well-formed answer, with a right box and an inverted one (on both axes, on x, on y) scored above
    it: both readers hand COCOeval the same detections, so both score the same, below 1 (the inverted box counts
    against the answer); strict used to drop it and score 1."""
    completion = (f"<think>a bus</think><answer>[{{'Position': {inverted}, 'Confidence': 0.95}}, "
                  "{'Position': [100, 100, 600, 600], 'Confidence': 0.9}]</answer>")
    paper, strict = readers.read_boxes(completion, "visual_rft"), readers.read_boxes(completion, "strict")
    assert strict.boxes == paper.boxes == [[float(v) for v in inverted], [100.0, 100.0, 600.0, 600.0]]
    assert strict.scores == paper.scores and strict.dropped == paper.dropped == 0
    queries = [detection.Query(1, 1, completion), detection.Query(2, 2, "<answer>No Objects</answer>")]
    ap = {reader: detection.evaluate(gt(), detection.to_results(queries, gt(), reader=reader)[0])["AP"]
          for reader in readers.READERS}
    assert ap["strict"] == ap["visual_rft"] and 0 < ap["strict"] < 1, ap


def test_a_ground_truth_built_in_memory_with_numpy_numbers_is_accepted():
    import numpy as np

    g = gt()
    g["images"][0]["id"] = np.int64(1)
    g["annotations"][0]["bbox"] = [np.float64(v) for v in g["annotations"][0]["bbox"]]
    assert inputs.check_ground_truth(g) == {}
