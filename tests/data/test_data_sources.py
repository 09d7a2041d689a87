"""Every source converts to the same records: ViRFT parquet/JSON, COCO, LVIS, class folders, LISA, synthetic."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sample_data import png_bytes

from vrft_jax.data import classification, coco, lisa, prompts, storage, synthetic, virft
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.prepare import convert, main
from vrft_jax.data.records import BadRecordError

DET = "<answer>[{'Position': [%d, 100, 500, 600], 'Confidence': 1}]</answer>"


def _virft_rows(tmp_path, n=6):
    rows = []
    for i in range(n):
        image = png_bytes(40 + 7 * i, 60 - 3 * i, seed=i)
        if i % 2:
            rows.append((image, prompts.detection_problem(f"thing{i}"), DET % i))
        else:
            rows.append((image, prompts.classification_problem("flower"), f"<answer>rose {i}</answer>"))
    return rows


def test_virft_parquet_and_json_convert_and_stream_back_the_same_records(tmp_path, tiny_tokenizer, tiny_config):
    rows = _virft_rows(tmp_path)
    # The hub's schema: image as {bytes, path}. Row 4 is stored by path (bytes null), as `datasets` may do.
    (tmp_path / "img4.png").write_bytes(rows[4][0])
    images = [{"bytes": None if i == 4 else data, "path": "img4.png" if i == 4 else None}
              for i, (data, _, _) in enumerate(rows)]
    table = pa.table({"image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "problem": [r[1] for r in rows], "solution": [r[2] for r in rows]})
    pq.write_table(table, tmp_path / "train-00000.parquet", row_group_size=4)
    entries = []
    for i, (data, problem, solution) in enumerate(rows):
        (tmp_path / f"json_{i}.png").write_bytes(data)
        entries.append({"image_path": f"json_{i}.png", "problem": problem, "solution": solution})
    (tmp_path / "train.json").write_text(json.dumps(entries))

    from_parquet, report = convert({"train": virft.parquet_candidates([str(tmp_path / "train-00000.parquet")])},
                                   str(tmp_path / "out"), "virft_parquet")
    from_json, _ = convert({"train": virft.json_candidates(str(tmp_path / "train.json"))}, str(tmp_path / "out"),
                           "virft_json")
    assert report.written == {"train": 6} and report.skipped == {}

    def content(path):
        return sorted((r.problem, r.solution, r.task, r.label, hashlib.sha256(r.image).hexdigest())
                      for r in storage.read_records(path, "train"))

    assert content(from_parquet) == content(from_json)
    assert sorted(r[:2] for r in content(from_json)) == sorted((p, s) for _, p, s in rows)
    labels = {r.label for r in storage.read_records(from_json, "train")}
    assert {"thing1", "rose 0"} <= labels

    def streamed(path):
        config = DataConfig(path=path, batch_size=2, max_prompt_len=256, max_pixels=64 * 64, shuffle=False,
                            num_epochs=1, num_workers=0, device_prefetch=0)
        out = []
        for batch in make_iterator(config, tiny_config, tokenizer=tiny_tokenizer, process_index=0, process_count=1):
            for row in range(2):
                valid = batch.model_inputs.attention_mask[row].astype(bool)
                out.append((batch.meta["solution"][row], batch.model_inputs.input_ids[row][valid].tobytes(),
                            batch.model_inputs.patches[row].tobytes()))
        return sorted(out)

    assert streamed(from_parquet) == streamed(from_json)


def test_bad_conversion_records_name_the_record_or_are_counted(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes(30, 30))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    entries = [{"image_path": "ok.png", "problem": "p", "solution": "<answer>a</answer>"},
               {"image_path": "ok.png", "problem": "p"},  # no solution
               {"image_path": "bad.png", "problem": "p", "solution": "<answer>b</answer>"},
               {"image_path": "ok.png", "problem": "p", "solution": "<answer>[{'Position': [1, 2]}]</answer>",
                "task": "detection"}]
    (tmp_path / "d.json").write_text(json.dumps(entries))
    with pytest.raises(BadRecordError, match=r"entry 1 of .*d.json: missing_field: .*'solution'"):
        convert({"train": virft.json_candidates(str(tmp_path / "d.json"))}, str(tmp_path / "strict"), "d")
    with pytest.raises(ValueError, match=r"no usable records \(skipped: \{'bad_solution': 3, 'missing_field': 1\}"):
        convert({"train": virft.json_candidates(str(tmp_path / "d.json"), task="detection")},
                str(tmp_path / "lenient"), "d", on_bad_record="skip")  # as detection, every answer is malformed
    path, report = convert({"train": virft.json_candidates(str(tmp_path / "d.json"))}, str(tmp_path / "lenient2"),
                           "d", on_bad_record="skip")
    assert report.written == {"train": 1}
    assert report.skipped == {"missing_field": 1, "bad_image": 1, "bad_solution": 1}
    assert any("entry 2 of" in line and "bad_image" in line for line in report.skipped_records)
    assert storage.read_metadata(path)["report"]["skipped"] == report.skipped


# ---------------------------------------------------------------------------- COCO / LVIS

def _instances(tmp_path, flavor):
    """6 images of 64x48 (image 6: 80x40); cat in 5 images (twice in image 1), dog in 2, bus in 1, train in none."""
    images, annotations = [], []
    for image_id in range(1, 7):
        width, height = (80, 40) if image_id == 6 else (64, 48)
        name = f"{image_id:012d}.jpg"
        entry = {"id": image_id, "width": width, "height": height}
        if flavor == "coco":
            entry["file_name"] = name
            folder = tmp_path / "images"
        else:  # LVIS has only the COCO URL; images live in <root>/<split>/
            entry["coco_url"] = f"http://images.cocodataset.org/train2017/{name}"
            folder = tmp_path / "images" / "train2017"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((height, width, 3), image_id * 20, np.uint8)).save(folder / name, format="JPEG")
        images.append(entry)
    cat, dog, bus = (1, "cat"), (2, "dog"), (3, "bus")
    if flavor == "lvis":
        cat, dog, bus = (1, "kitchen_table"), (2, "die"), (3, "horse_buggy")

    def add(image_id, category, bbox, **extra):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[0],
                            "bbox": bbox, "area": bbox[2] * bbox[3], **extra})

    add(1, cat, [8, 6, 16, 12])        # -> [125, 125, 375, 375]
    add(1, cat, [0, 0, 64, 48])        # -> [0, 0, 1000, 1000]
    for image_id in (2, 3, 4):
        add(image_id, cat, [32, 24, 16, 12])
    add(6, cat, [1, 1, 10, 10])        # 80x40: x1 1/80*1000 = 12.5 -> 13, y1 25, x2 137.5 -> 138, y2 275
    add(1, dog, [10, 10, 5, 5])
    add(5, dog, [10, 10, 5, 5])
    add(3, bus, [1, 2, 3, 4])
    add(2, dog, [5, 5, 0, 4])          # no area: dropped
    crowd = {"iscrowd": 1} if flavor == "coco" else {}
    if flavor == "coco":
        add(4, bus, [1, 1, 5, 5], **crowd)  # crowd: dropped
    categories = [{"id": c[0], "name": c[1]} for c in (cat, dog, bus, (4, "train"))]
    if flavor == "lvis":
        for c in categories:
            c["frequency"] = "r"
    return {"images": images, "annotations": annotations, "categories": categories}, [c[1] for c in (cat, dog, bus)]


@pytest.mark.parametrize("flavor", ["coco", "lvis"])
def test_k_shot_subsets_boxes_and_base_novel_splits(tmp_path, flavor):
    annotations, (cat, dog, bus) = _instances(tmp_path, flavor)
    instances = coco.load_instances(annotations)
    assert instances.flavor == flavor
    assert instances.dropped == ({"empty_box": 1, "crowd": 1} if flavor == "coco" else {"empty_box": 1})

    every = {cid: len(instances.images_of(cid)) for cid in (1, 2, 3, 4)}
    assert every == {1: 5, 2: 2, 3: 1, 4: 0}
    chosen = coco.k_shot(instances, 3, seed=0, category_ids=[1, 2, 3, 4])
    assert {cid: len(ids) for cid, ids in chosen.items()} == {1: 3, 2: 2, 3: 1, 4: 0}  # k where available
    assert chosen == coco.k_shot(instances, 3, seed=0, category_ids=[1, 2, 3, 4])  # same seed, same subset
    assert chosen[1] == coco.k_shot(instances, 3, seed=0, category_ids=[1])[1]  # independent of other categories
    assert any(coco.k_shot(instances, 3, seed=s, category_ids=[1])[1] != chosen[1] for s in range(1, 10))

    candidates = list(coco.detection_candidates(instances, str(tmp_path / "images")))
    by_id = {c.fields["id"]: c.fields for c in candidates}
    assert len(candidates) == 5 + 2 + 1  # one record per (image, category)
    first = by_id[f"{flavor}:1:1"]
    assert first["solution"] == ("<answer>[{'Position': [125, 125, 375, 375], 'Confidence': 1}, "
                                 "{'Position': [0, 0, 1000, 1000], 'Confidence': 1}]</answer>")
    assert by_id[f"{flavor}:6:1"]["solution"] == "<answer>[{'Position': [13, 25, 138, 275], 'Confidence': 1}]</answer>"
    assert first["problem"] == prompts.detection_problem(cat) and first["label"] == cat
    assert os.path.exists(first["image"])

    splits = coco.split_categories(instances, base=[cat, dog], novel=[bus])
    path, report = convert({s: coco.detection_candidates(instances, str(tmp_path / "images"), categories=names,
                                                         shots=3, seed=0) for s, names in splits.items()},
                           str(tmp_path / "out"), f"{flavor}_open_vocab")
    assert report.written == {"base": 3 + 2, "novel": 1}
    assert {r.label for r in storage.read_records(path, "base")} == {cat, dog}
    assert {r.label for r in storage.read_records(path, "novel")} == {bus}
    with pytest.raises(ValueError, match="both base and novel"):
        coco.split_categories(instances, base=[cat], novel=[cat])
    with pytest.raises(KeyError, match="'zebra'"):
        coco.split_categories(instances, base=[cat], novel=["zebra"])


def test_prepare_cli_writes_coco_base_novel_splits(tmp_path, capsys):
    annotations, _ = _instances(tmp_path, "coco")
    (tmp_path / "instances.json").write_text(json.dumps(annotations))
    (tmp_path / "novel.txt").write_text("bus\ntrain\n")
    code = main(["coco", "--annotations", str(tmp_path / "instances.json"), "--images", str(tmp_path / "images"),
                 "--output", str(tmp_path / "out"), "--name", "coco_ov", "--shots", "2", "--seed", "1",
                 "--base", "cat,dog", "--novel", f"@{tmp_path / 'novel.txt'}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == {"base": 2 + 2, "novel": 1}
    assert printed["notes"]["dropped_annotations"] == {"empty_box": 1, "crowd": 1}
    assert storage.split_names(str(tmp_path / "out" / "coco_ov")) == ["base", "novel"]


def test_evaluation_queries_all_categories_or_visual_rfts_exist_map(tmp_path):
    """`prepare coco --queries`: `all` asks every chosen category in every image (absent ones answer No
    Objects); `exist:FILE` asks what Visual-RFT's exist map lists per image, of the chosen categories."""
    annotations, (cat, dog, bus) = _instances(tmp_path, "coco")
    instances = coco.load_instances(annotations)
    every = list(coco.detection_candidates(instances, str(tmp_path / "images"), categories=[cat, bus],
                                           queries="all"))
    assert [c.fields["id"] for c in every] == [f"coco:{i}:{k}" for i in range(1, 7) for k in (1, 3)]
    by_id = {c.fields["id"]: c.fields["solution"] for c in every}
    assert by_id["coco:5:1"] == "<answer>No Objects</answer>" and "Position" in by_id["coco:3:3"]
    (tmp_path / "exist.json").write_text(json.dumps({"1": ["dog", "cat", "cat"], "2": ["bus"], "6": ["train"]}))
    listed = list(coco.detection_candidates(instances, str(tmp_path / "images"), categories=[cat, dog, bus],
                                            queries=f"exist:{tmp_path / 'exist.json'}"))
    assert [c.fields["id"] for c in listed] == ["coco:1:2", "coco:1:1", "coco:2:3"]  # train is not chosen
    assert listed[2].fields["solution"] == "<answer>No Objects</answer>"  # bus hallucinated in image 2
    (tmp_path / "bad.json").write_text(json.dumps({"1": ["zebra"]}))
    with pytest.raises(ValueError, match=r"image 1 lists categories \['zebra'\]"):
        list(coco.detection_candidates(instances, "", queries=f"exist:{tmp_path / 'bad.json'}"))


# ---------------------------------------------------------------------------- classification, LISA, synthetic

def test_classification_folders_and_lists_with_k_shot(tmp_path):
    for class_name, count in (("737-200", 5), ("A320", 2), ("Cessna 172", 4)):
        folder = tmp_path / "cls" / class_name
        folder.mkdir(parents=True)
        for k in range(count):
            (folder / f"{k}.png").write_bytes(png_bytes(20, 20, seed=k))
    entries = classification.folder_entries(str(tmp_path / "cls"))
    chosen = classification.k_shot(entries, 4, seed=0)
    counts = {}
    for _, name in chosen:
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"737-200": 4, "A320": 2, "Cessna 172": 4}
    assert chosen == classification.k_shot(entries, 4, seed=0)
    without_a320 = classification.k_shot([e for e in entries if e[1] != "A320"], 4, seed=0)
    assert without_a320 == [e for e in chosen if e[1] != "A320"]  # independent of the other classes
    (tmp_path / "list.tsv").write_text("# image\tclass\n" + "".join(f"{p}\t{n}\n" for p, n in entries))
    assert classification.list_entries(str(tmp_path / "list.tsv")) == entries
    path, report = convert({"train": classification.classification_candidates(chosen, str(tmp_path / "cls"),
                                                                              "aircraft", source="cls")},
                           str(tmp_path / "out"), "aircraft_4_shot")
    records = storage.read_records(path, "train")
    assert len(records) == 10
    record = next(r for r in records if r.label == "Cessna 172")
    assert record.solution == "<answer>Cessna 172</answer>"
    assert record.problem == prompts.classification_problem("aircraft") and record.task == "classification"


def test_lisa_folder_gives_one_grounding_record_per_instruction(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(folder / "a.jpg")
    (folder / "a.json").write_text(json.dumps({"text": ["the red cup", "what holds coffee"], "shapes": [
        {"label": "target", "points": [[333, 10], [639.9, 10], [500, 479.9]]},
        {"label": "ignored", "points": [[0, 0], [1, 1]]}]}))
    (folder / "b.json").write_text(json.dumps({"text": ["no image for me"], "shapes": [{"points": [[0, 0], [1, 1]]}]}))
    with pytest.raises(BadRecordError, match="b.json: bad_image"):
        convert({"train": lisa.grounding_candidates(lisa.lisa_folder_items(str(folder)))}, str(tmp_path / "o1"), "l")
    path, report = convert({"train": lisa.grounding_candidates(lisa.lisa_folder_items(str(folder)))},
                           str(tmp_path / "o2"), "lisa_train", on_bad_record="skip")
    assert report.written == {"train": 2} and report.skipped == {"bad_image": 1}
    records = sorted(storage.read_records(path, "train"), key=lambda r: r.id)
    assert [r.id for r in records] == ["lisa:a:0", "lisa:a:1"]
    # First polygon only; int(x / W * 1000): 333/640 -> 520, 10/480 -> 20, 639.9/640 -> 999, 479.9/480 -> 999.
    assert records[0].solution == "<answer> (520,20),(999,999) </answer>"
    assert records[1].problem == prompts.grounding_problem("what holds coffee")
    # gen_box_ann.py's lisa_train.json gives the same records.
    (tmp_path / "lisa_train.json").write_text(json.dumps([{"image_path": str(folder / "a.jpg"), "instruction": [
        "the red cup", "what holds coffee"], "boxes": [[333, 10, 639.9, 479.9]]}]))
    code = main(["lisa", "--input", str(tmp_path / "lisa_train.json"), "--output", str(tmp_path / "o3"),
                 "--name", "lisa_json"])
    assert code == 0
    assert sorted(storage.read_records(str(tmp_path / "o3" / "lisa_json"), "train"), key=lambda r: r.id) == records


def test_prepare_cli_writes_synthetic_sets_and_names_bad_records(tmp_path, capsys):
    assert main(["synthetic", "--num-images", "3", "--task", "classification", "--output", str(tmp_path),
                 "--name", "shapes"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == {"train": 3}
    records = storage.read_records(str(tmp_path / "shapes"), "train")
    assert sorted(r.id for r in records) == sorted(r.id for r in synthetic.classification_records(3))
    (tmp_path / "d.json").write_text(json.dumps([{"image_path": "missing.png", "problem": "p",
                                                  "solution": "<answer>a</answer>"}]))
    with pytest.raises(BadRecordError, match=r"entry 0 of .*; rerun with --on-bad-record skip"):
        main(["virft", "--json", str(tmp_path / "d.json"), "--output", str(tmp_path), "--name", "bad"])
    assert not (tmp_path / "bad").exists()  # a failed prepare leaves nothing where the dataset would have gone


def test_synthetic_source_is_deterministic_with_exact_boxes():
    first = list(synthetic.detection_records(6, seed=3))
    assert first == list(synthetic.detection_records(6, seed=3))
    assert first != list(synthetic.detection_records(6, seed=4))
    for record in first:
        assert record.task == "detection" and record.problem == prompts.detection_problem(record.label)
    # The box of a plain square is exactly where its pixels are.
    rng = np.random.default_rng(0)
    image, placed = synthetic.render(rng, 100, 120, 3)
    pixels = np.asarray(image).astype(int)
    for category, (x1, y1, x2, y2) in placed:
        if category.endswith("square"):
            color = np.array(synthetic.COLORS[category.split()[0]])
            ys, xs = np.nonzero((np.abs(pixels - color).sum(-1) == 0))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    cls = list(synthetic.classification_records(3, seed=0))
    assert all(r.solution == f"<answer>{r.label}</answer>" and r.label in synthetic.SHAPES for r in cls)
    assert isinstance(Image.open(io.BytesIO(cls[0].image)), Image.Image)
    # The colour variant draws the same images and asks for the shape's colour instead of its kind.
    colours = list(synthetic.classification_records(3, seed=0, label="colour"))
    assert [r.image for r in colours] == [r.image for r in cls]
    assert all(r.label in synthetic.COLORS and r.solution == f"<answer>{r.label}</answer>" for r in colours)
    assert all("Please identify the colour of the shape" in r.problem for r in colours)
    with pytest.raises(ValueError, match="unknown synthetic classification label 'size'"):
        next(synthetic.classification_records(1, label="size"))
    # Large shapes (the demo's): a side from half the shorter image side to all of it.
    for seed in range(20):
        _, [(_, (x1, y1, x2, y2))] = synthetic.render(np.random.default_rng(seed), 100, 120, 1, "large")
        assert x2 - x1 == y2 - y1 and 50 <= x2 - x1 < 100 and 0 <= x1 and x2 <= 120 and 0 <= y1 and y2 <= 100
    with pytest.raises(ValueError, match="unknown shape_size 'huge'"):
        synthetic.render(np.random.default_rng(0), 100, 120, 1, "huge")
