"""The open-vocabulary evaluation sets of `coco_ov_base65` (issue 19 item 3): the paper's 15 novel COCO categories
(Table 7, visual-rft.md §7.2) and 13 rare LVIS categories (Table 8, §7.3, §9.7), and `score`'s per-category AP
on each, as the paper's per-class columns report it, over synthetic ground truth written here."""

import shlex

import pytest

from vrft_jax import recipe
from vrft_jax.evaluate import score

# coco_evaluation's open-vocabulary selection (visual-rft.md §7.2)
COCO_NOVEL = ["mouse", "fork", "hot dog", "cat", "airplane", "suitcase", "parking meter", "sandwich", "train",
              "hair drier", "toilet", "toaster", "snowboard", "frisbee", "bear"]
# lvis_evaluation's open-vocabulary selection, Table 8's column order (§7.3, §9.7)
LVIS_RARE = ["casserole", "die", "egg_roll", "futon", "garbage", "handsaw", "hippopotamus", "kitchen_table", "mallet",
             "omelet", "shot_glass", "stepladder", "sugar_bowl"]

HIT = "<think>.</think> <answer>[{'Position': [100, 100, 500, 500], 'Confidence': 0.9}]</answer>"
MISS = "<think>.</think> <answer>[{'Position': [600, 600, 900, 900], 'Confidence': 0.9}]</answer>"


@pytest.mark.parametrize("spec, names, protocol", [("coco_ov_base65", COCO_NOVEL, "coco"),
                                                   ("coco_ov_base65:model=7b", COCO_NOVEL, "coco"),
                                                   ("coco_ov_base65:eval=lvis_rare", LVIS_RARE, "lvis")])
def test_the_open_vocabulary_recipe_evaluates_exactly_the_papers_categories(spec, names, protocol):
    config = recipe.load(spec)
    settings = recipe.eval_settings(config)
    assert list(settings.categories) == names and (settings.type, settings.protocol) == ("detection", protocol)
    assert len(names) == {"coco": 15, "lvis": 13}[protocol]
    # its prepare command asks about those categories alone
    words = shlex.split(config.eval.prepare)
    assert words[words.index("--categories") + 1].split(",") == names
    assert config.eval.gt.endswith({"coco": "instances_val2017.json", "lvis": "lvis_v1_val.json"}[protocol])


def _ground_truth(names, protocol):
    """One 100 x 100 image per category with one 40 x 40 box of it, and a category outside the set ("person")
    with a box of its own; LVIS: every category rare, each image exhaustively annotated for its category."""
    every = [*names, "person"]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(every)]
    if protocol == "lvis":
        for category in categories:
            category["frequency"] = "r"
    images = [{"id": k + 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for k in range(len(every))]
    annotations = [{"id": k + 1, "image_id": k + 1, "category_id": k + 1, "bbox": [10, 10, 40, 40]}
                   for k in range(len(every))]
    return {"images": images, "categories": categories, "annotations": annotations}


@pytest.mark.parametrize("names, protocol", [(COCO_NOVEL, "coco"), (LVIS_RARE, "lvis")])
def test_score_reports_per_category_ap_on_the_open_vocabulary_sets(names, protocol):
    gt = _ground_truth(names, protocol)
    # a perfect box for every other category of the set (and for "person"), a box elsewhere for the rest
    predictions = [(k + 1, k + 1, HIT if k % 2 == 0 or k == len(names) else MISS) for k in range(len(names) + 1)]
    metrics = score.score(gt, predictions, categories=names)
    assert metrics["protocol"] == protocol  # LVIS recognised by its category frequencies
    expected = {name: 1.0 if k % 2 == 0 else 0.0 for k, name in enumerate(names)}
    assert list(metrics["paper_per_category_AP"]) == names
    assert metrics["paper_per_category_AP"] == pytest.approx(expected, abs=1e-12)
    assert metrics["paper_mAP"] == pytest.approx(sum(expected.values()) / len(names), abs=1e-12)  # person left out
    assert metrics["per_category_AP"]["person"] == pytest.approx(1.0) and metrics["no_ground_truth"] == []
