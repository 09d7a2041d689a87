"""LISA reasoning grounding (the paper's Table 6; visual-rft.md §3.4, §9.5): a box for an instruction that needs
reasoning, 239 training images of LISA's ReasonSeg, one record per instruction.

500 steps and a checkpoint every 50, as the paper's run (6 epochs, save_steps 50); paper-mode rewards:
GIoU + 1 and format.

    --config=lisa_grounding            2B, G 8
    --config=lisa_grounding:model=7b   7B, G 4

Held-out sets (`eval=val|test`, Table 6's mIoU_val and mIoU_test), made from ReasonSeg's val/ and test/ folders
as lisa_evaluation makes them (visual-rft.md §7.4; `prepare lisa --evaluation`): one record per image, its first
instruction and first box, the evaluation prompt and the R1 system prompt, the exact pixel box as ground truth;
decoded at full resolution with 128 new tokens. Box mIoU and cIoU only: the gIoU column needs SAM masks.
`eval=test` is its own run name: evaluate a run's model with `--config=lisa_grounding:eval=test
--ckpt=runs/lisa_grounding_2b/model`.
"""

from vrft_jax.configs import _common

EVAL_SETS = ("val", "test")

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {"model": ("2b", _common.MODELS), "eval": ("val", EVAL_SETS)}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
    suffix = "" if arg.eval == "val" else f"_{arg.eval}"
    c = _common.base_config(name=f"lisa_grounding_{arg.model}{suffix}", model=arg.model)
    c.total_steps = 500
    c.ckpt_every = 50
    c.source.download = ("ReasonSeg's train/, val/ and test/ folders (images and their JSON, "
                         "https://github.com/dvlab-research/LISA) into sources/LISA")
    c.source.prepare = "lisa --input sources/LISA/train"
    c.data.path = "data/lisa_train"
    c.rewards.terms = {"grounding_giou": 1.0, "format": 1.0}
    # Evaluated by `python -m vrft_jax.evaluate`, as the paper scores the final model; in the loop with eval_every.
    c.eval_every = 0
    c.eval.path = f"data/lisa_{arg.eval}_evaluation"
    c.eval.prepare = f"lisa --input sources/LISA/{arg.eval} --evaluation --split {arg.eval}"
    c.eval.download = (f"ReasonSeg's {arg.eval}/ folder (https://github.com/dvlab-research/LISA) as "
                       f"sources/LISA/{arg.eval}")
    c.eval.type = "grounding"
    c.eval.split = arg.eval
    c.eval.max_new_tokens = 128
    # ReasonSeg's photos are often megapixels: at full resolution, half the training batch (a guess, as for
    # classification) bounds the prefill's activations.
    _common.visual_rft_eval(c, problem_prefix="", system_prompt="r1", batch_size=8)
    return c
