"""COCO few-shot detection on 8 categories (the paper's Table 3; visual-rft.md §3.1, §9.2): 1, 2, 4, 8 or 16
shots.

Four shots is the released ViRFT_COCO_8_cate_4_shot (32 records); the other counts are drawn from
COCO 2017 train with `prepare coco --shots K` (same categories, seed 0). 200 steps, as the paper;
paper-mode rewards: IoU + confidence + format.

    --config=coco_fewshot                      2B, 4 shots
    --config=coco_fewshot:model=7b,shots=8     7B, 8 shots
"""

import shlex

from vrft_jax.configs import _common

CATEGORIES = ("bus", "train", "fire hydrant", "stop sign", "cat", "dog", "bed", "toilet")

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {"model": ("2b", _common.MODELS), "shots": (4, _common.SHOTS)}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
    c = _common.base_config(name=f"coco_fewshot_{arg.model}_{arg.shots}shot", model=arg.model)
    c.categories = CATEGORIES
    c.total_steps = 200
    if arg.shots == 4:
        c.source.download = _common.hf_download("laolao77/ViRFT_COCO_8_cate_4_shot",
                                                "sources/ViRFT_COCO_8_cate_4_shot")
        c.source.prepare = "virft --parquet sources/ViRFT_COCO_8_cate_4_shot/data/*.parquet"
        c.data.path = "data/virft_coco_8cate_4shot"
    else:
        c.source.download = ("COCO 2017 train images and annotations (https://cocodataset.org/#download: "
                             "train2017.zip, annotations_trainval2017.zip) into sources/coco")
        c.source.prepare = ("coco --annotations sources/coco/annotations/instances_train2017.json "
                            f"--images sources/coco/train2017 --categories {shlex.quote(','.join(CATEGORIES))} "
                            f"--shots {arg.shots} --seed 0")
        c.data.path = f"data/coco_8cate_{arg.shots}shot"
    c.rewards.terms = {"detection_iou": 1.0, "detection_confidence": 1.0, "format": 1.0}
    _common.detection_eval(c, flavor="coco", annotations="sources/coco/annotations/instances_val2017.json",
                           images="sources/coco/val2017", protocol="coco",
                           exist_map=f"sources/Visual-RFT/coco_evaluation/exist_map_coco_Qwen2_vl_{arg.model.upper()}"
                                     "_baseline.json")
    return c
