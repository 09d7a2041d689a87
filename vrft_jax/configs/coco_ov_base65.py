"""Open-vocabulary COCO: train on ViRFT_COCO_base65, 6k (image, category) records of 65 base categories,
then detect the 15 novel ones (the paper's Table 7; visual-rft.md §3.1, §9.6), or the 13 rare LVIS categories
(Table 8; visual-rft.md §9.7).

750 steps: 6k records x 2 epochs / 16 prompts per step, the released script's run (issue #47);
paper-mode rewards: IoU + confidence + format.

The held-out set (`eval=`), evaluated by `python -m vrft_jax.evaluate` as Visual-RFT's scripts do (§7.2, §7.3:
its exist map's questions, its evaluation inputs, per-class AP and their unweighted mean):
    novel      COCO val2017, the 15 novel categories (Table 7's mAP_n)
    lvis_rare  LVIS v1 val, the 13 rare categories (Table 8), under its own run name: evaluate the novel
               run's model with `--config=coco_ov_base65:eval=lvis_rare --ckpt=runs/coco_ov_base65_2b/model`

    --config=coco_ov_base65                      2B, G 8, novel COCO
    --config=coco_ov_base65:model=7b             7B, G 4 (the script `7B_base65cate_6k.sh`)
    --config=coco_ov_base65:eval=lvis_rare       2B, the 13 rare LVIS categories
"""

from vrft_jax.configs import _common

# coco_evaluation's open-vocabulary selection, in its order (visual-rft.md §7.2)
COCO_NOVEL = ("mouse", "fork", "hot dog", "cat", "airplane", "suitcase", "parking meter", "sandwich", "train",
              "hair drier", "toilet", "toaster", "snowboard", "frisbee", "bear")
# lvis_evaluation's open-vocabulary selection, Table 8's column order (visual-rft.md §7.3, §9.7)
LVIS_RARE = ("casserole", "die", "egg_roll", "futon", "garbage", "handsaw", "hippopotamus", "kitchen_table", "mallet",
             "omelet", "shot_glass", "stepladder", "sugar_bowl")
EVAL_SETS = ("novel", "lvis_rare")

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {"model": ("2b", _common.MODELS), "eval": ("novel", EVAL_SETS)}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
    suffix = "" if arg.eval == "novel" else f"_{arg.eval}"
    c = _common.base_config(name=f"coco_ov_base65_{arg.model}{suffix}", model=arg.model)
    c.total_steps = 750
    c.source.download = _common.hf_download("laolao77/ViRFT_COCO_base65", "sources/ViRFT_COCO_base65")
    c.source.prepare = "virft --parquet sources/ViRFT_COCO_base65/data/*.parquet"
    c.data.path = "data/virft_coco_base65"
    c.rewards.terms = {"detection_iou": 1.0, "detection_confidence": 1.0, "format": 1.0}
    size = arg.model.upper()
    if arg.eval == "novel":
        _common.detection_eval(c, flavor="coco", annotations="sources/coco/annotations/instances_val2017.json",
                               images="sources/coco/val2017", protocol="coco", categories=COCO_NOVEL,
                               exist_map=f"sources/Visual-RFT/coco_evaluation/exist_map_coco_Qwen2_vl_{size}_baseline.json")
    else:
        _common.detection_eval(c, flavor="lvis", annotations="sources/lvis/lvis_v1_val.json", images="sources/coco",
                               protocol="lvis", categories=LVIS_RARE,
                               exist_map=f"sources/Visual-RFT/lvis_evaluation/exist_map_lvis_Qwen2_vl_{size}_baseline.json")
    return c
