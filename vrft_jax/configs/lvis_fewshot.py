"""LVIS few-shot detection: Visual-RFT on 6 rare LVIS categories (the paper's Table 4; visual-rft.md §3.1, §9.3).

ViRFT_LVIS_few_shot holds 65 (image, category) records, 1-10 images per category ("10-shot"). 200
steps, as the paper's few-shot detection runs; paper-mode rewards: IoU + confidence + format.

    --config=lvis_fewshot              Qwen2-VL-2B, G 8, on a v5e-8
    --config=lvis_fewshot:model=7b     Qwen2-VL-7B, G 4, on a v5p-8
"""

from vrft_jax.configs import _common

CATEGORIES = ("horse_buggy", "die", "kitchen_table", "omelet", "papaya", "stepladder")

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {"model": ("2b", _common.MODELS)}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
    c = _common.base_config(name=f"lvis_fewshot_{arg.model}", model=arg.model)
    c.categories = CATEGORIES
    c.total_steps = 200
    c.source.download = _common.hf_download("laolao77/ViRFT_LVIS_few_shot", "sources/ViRFT_LVIS_few_shot")
    c.source.prepare = "virft --parquet sources/ViRFT_LVIS_few_shot/data/*.parquet"
    c.data.path = "data/virft_lvis_few_shot"
    c.rewards.terms = {"detection_iou": 1.0, "detection_confidence": 1.0, "format": 1.0}
    _common.detection_eval(c, flavor="lvis", annotations="sources/lvis/lvis_v1_val.json", images="sources/coco",
                           protocol="lvis",
                           exist_map=f"sources/Visual-RFT/lvis_evaluation/exist_map_lvis_Qwen2_vl_{arg.model.upper()}"
                                     "_baseline.json")
    return c
