"""`EvaluationSettings`: what a recipe's `eval` block tells an evaluator beyond its data and decoding."""

from __future__ import annotations

import dataclasses

from vrft_jax.evaluate import detection, readers
from vrft_jax.rewards.frames import frame_of

TYPES = ("rewards", "classification", "detection", "grounding")  # `evaluators.EVALUATORS` registers each

@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """The parts of a recipe's `eval` block an evaluator reads (`vrft_jax.recipe.eval_settings` builds it).

    type:      one of TYPES
    gt:        detection: a COCO/LVIS instances file; "" builds the ground truth from the records
    protocol:  detection: "coco" or "lvis"
    parse:     readers.READERS: "visual_rft" (the paper's scripts) or "strict"
    categories: the recipe's categories (detection's paper mean); () = every category
    frame:     the box frame the model writes (the recipe's rewards.frame)
    """

    type: str = "rewards"
    gt: str = ""
    protocol: str = "coco"
    parse: str = "visual_rft"
    categories: tuple[str, ...] = ()
    frame: str = "qwen2_vl"

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"eval.type={self.type!r} is not one of {TYPES}")
        readers.check_reader(self.parse)
        frame_of(self.frame)
        if self.protocol not in detection.PROTOCOLS:
            raise ValueError(f"eval.protocol={self.protocol!r} is not one of {detection.PROTOCOLS}")
