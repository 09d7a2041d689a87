"""Open-vocabulary COCO: train on ViRFT_COCO_base65, 6k (image, category) records of 65 base categories,
then detect the 15 novel ones (visual-rft.md §3.1, §9.6).

750 steps: 6k records x 2 epochs / 16 prompts per step, the released script's run (issue #47);
paper-mode rewards: IoU + confidence + format.

    --config=coco_ov_base65            2B, G 8
    --config=coco_ov_base65:model=7b   7B, G 4 (the script `7B_base65cate_6k.sh`)
"""

from vrft_jax.configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg, model=("2b", _common.MODELS))
    c = _common.base_config(name=f"coco_ov_base65_{arg.model}", model=arg.model)
    c.total_steps = 750
    c.source.download = _common.hf_download("laolao77/ViRFT_COCO_base65", "sources/ViRFT_COCO_base65")
    c.source.prepare = "virft --parquet sources/ViRFT_COCO_base65/data/*.parquet"
    c.data.path = "data/virft_coco_base65"
    c.rewards.terms = {"detection_iou": 1.0, "detection_confidence": 1.0, "format": 1.0}
    return c
