"""The LVIS federated protocol (issue 11), on a hand-built case whose APs are derived below by hand.

Two categories on 100 x 100 images: A (id 1, rare), B (id 2, common).
  image 1: A ground truth [10, 10, 40, 40] (x, y, w, h; area 1600: medium); B ground truth [50, 50, 20, 20]
           (area 400: small), and B is listed as not exhaustively annotated
  image 2: A is a verified negative (neg_category_ids); image 3: A is neither verified present nor absent
Detections (score):
  A: image 1 [10, 10, 40, 40] (0.90, exact); image 2 [0, 0, 10, 10] (0.92); image 3 [0, 0, 30, 30] (0.95)
  B: image 1 [80, 80, 10, 10] (0.90, unmatched); image 1 [52, 50, 20, 20] (0.60; IoU 360 / 440 = 0.818)

With one ground truth per category, COCOeval's interpolated precision at every recall point is the
precision at the ranked position of the true positive, so each AP is that precision averaged over the
ten IoU thresholds 0.50..0.95:
  LVIS, A: the image-3 detection is dropped (A unverified there); ranked 0.92 false, 0.90 true -> 1/2 at
           every threshold -> AP_A = 0.5
  LVIS, B: the unmatched detection is ignored (B not exhaustive in image 1): the match counts at the seven
           thresholds <= 0.818 (precision 1) and nothing is left at the three above (precision 0) -> 0.7
  AP = (0.5 + 0.7) / 2 = 0.6; AP50 = (0.5 + 1) / 2 = 0.75; AP75 = 0.75; APr = 0.5, APc = 0.7, no APf
  The paper's per-class AP averages the area ranges that have ground truth: A (medium) over all and medium;
  in medium the image-2 false positive (area 100, small) is outside the range and unmatched, so ignored ->
  1.0 -> A = (0.5 + 1.0) / 2 = 0.75; B (small) over all and small: 0.7 both -> paper mAP = 0.725
  COCO protocol, for contrast: A ranks 0.95 false, 0.92 false, 0.90 true -> 1/3; B 0.90 false, 0.60 true at
  seven thresholds -> 0.35.
"""

import pytest

from vrft_jax.evaluate import detection


def lvis_case():
    images = [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": [2]},
              {"id": 2, "width": 100, "height": 100, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
              {"id": 3, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}]
    categories = [{"id": 1, "name": "A", "frequency": "r"}, {"id": 2, "name": "B", "frequency": "c"}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600},
                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400}]
    gt = {"images": images, "categories": categories, "annotations": annotations}
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.90},
               {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.92},
               {"image_id": 3, "category_id": 1, "bbox": [0, 0, 30, 30], "score": 0.95},
               {"image_id": 1, "category_id": 2, "bbox": [80, 80, 10, 10], "score": 0.90},
               {"image_id": 1, "category_id": 2, "bbox": [52, 50, 20, 20], "score": 0.60}]
    return gt, results


def test_the_federated_protocol_gives_the_hand_derived_aps():
    gt, results = lvis_case()
    m = detection.evaluate(gt, results, protocol="lvis")
    assert m["per_category_AP"] == pytest.approx({"A": 0.5, "B": 0.7}, abs=1e-12)
    assert m["AP"] == pytest.approx(0.6, abs=1e-12)
    assert m["AP50"] == pytest.approx(0.75, abs=1e-12) and m["AP75"] == pytest.approx(0.75, abs=1e-12)
    assert m["APr"] == pytest.approx(0.5, abs=1e-12) and m["APc"] == pytest.approx(0.7, abs=1e-12)
    assert m["APf"] is None  # no frequent category: absent, not 0
    assert m["paper_per_category_AP"] == pytest.approx({"A": 0.75, "B": 0.7}, abs=1e-12)
    assert m["paper_mAP"] == pytest.approx(0.725, abs=1e-12)


def test_the_coco_protocol_counts_what_the_federated_one_leaves_out():
    gt, results = lvis_case()
    m = detection.evaluate(gt, results, protocol="coco")
    assert m["per_category_AP"] == pytest.approx({"A": 1 / 3, "B": 0.35}, abs=1e-12)


def test_lvis_keeps_the_300_best_detections_of_an_image():
    results = [{"image_id": 1, "category_id": 1 + k % 2, "bbox": [0, 0, 1, 1], "score": k / 400} for k in range(301)]
    results.append({"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.0})
    kept, cut = detection.cap_per_image(results, 300)
    assert cut == 1 and len(kept) == 301
    assert min(r["score"] for r in kept if r["image_id"] == 1) == 1 / 400  # the lowest (0) of image 1 went


def test_a_category_without_ground_truth_is_named_and_left_out_of_the_mean():
    gt, results = lvis_case()
    gt["categories"].append({"id": 3, "name": "C", "frequency": "f"})
    m = detection.evaluate(gt, results, protocol="lvis", categories=["A", "C"])
    assert m["no_ground_truth"] == ["C"] and m["per_category_AP"]["C"] is None
    assert m["paper_mAP"] == pytest.approx(0.75, abs=1e-12)
