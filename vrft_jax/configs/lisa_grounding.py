"""LISA reasoning grounding (visual-rft.md §3.4, §9.5): a box for an instruction that needs reasoning,
239 training images of LISA's ReasonSeg, one record per instruction.

500 steps and a checkpoint every 50, as the paper's run (6 epochs, save_steps 50); paper-mode rewards:
GIoU + 1 and format.

    --config=lisa_grounding            2B, G 8
    --config=lisa_grounding:model=7b   7B, G 4
"""

from vrft_jax.configs import _common


def get_config(arg=None):
    arg = _common.parse_arg(arg, model=("2b", _common.MODELS))
    c = _common.base_config(name=f"lisa_grounding_{arg.model}", model=arg.model)
    c.total_steps = 500
    c.ckpt_every = 50
    c.source.download = ("ReasonSeg's train/ folder (images and their JSON, https://github.com/dvlab-research/LISA) "
                         "into sources/LISA/train")
    c.source.prepare = "lisa --input sources/LISA/train"
    c.data.path = "data/lisa_train"
    c.rewards.terms = {"grounding_giou": 1.0, "format": 1.0}
    # Box mIoU/cIoU on LISA's val or test JSON once prepared (`prepare lisa --input val.json --split val`) and
    # named with --config.eval.path; lisa_evaluation generates 128 new tokens.
    c.eval.type = "grounding"
    c.eval.split = "val"
    c.eval.max_new_tokens = 128
    return c
