"""Visual-RFT's verifiable rewards, in NumPy and pure Python (no JAX).

    from vrft_jax.rewards import get_reward, combine
    iou = get_reward("detection_iou")                 # strict mode, Qwen2-VL's 0-1000 frame
    scores = iou(completions, solutions)              # float32[N] in [0, 1]
    recipe = combine("detection", mode="paper")       # the paper's unweighted sum
    recipe(completions, solutions).total              # float32[N] in [0, 3]

Rewards: detection_iou, detection_confidence, classification, grounding_giou, format. Two modes:
"paper" gives the values of Visual-RFT's own reward functions, quirks included, except its
`math_verify` shortcut; "strict" (our recipes' default) closes the known reward hacks and reads
bad output as invalid. Each reward module's docstring lists its quirks and differences; the
README next to this file collects them.

A reward never raises on a completion; a solution it cannot read raises ValueError naming it.
"""
from vrft_jax.rewards import classification, detection, grounding, tag_format  # noqa: F401  (registers)
from vrft_jax.rewards.detection import DetectionScores, score_detection
from vrft_jax.rewards.frames import FRAME_NAMES, Frame, convert_boxes, frame_of, size_from_grid_thw
from vrft_jax.rewards.registry import (
    MODES,
    Mode,
    Reward,
    SharedPass,
    available_rewards,
    get_reward,
    register,
    reward_options,
)
from vrft_jax.rewards.weighted import (
    VISUAL_RFT_REWARDS,
    RewardBreakdown,
    RewardSpec,
    WeightedReward,
    combine,
)

__all__ = [
    "DetectionScores",
    "FRAME_NAMES",
    "Frame",
    "MODES",
    "Mode",
    "Reward",
    "RewardBreakdown",
    "RewardSpec",
    "SharedPass",
    "VISUAL_RFT_REWARDS",
    "WeightedReward",
    "available_rewards",
    "combine",
    "convert_boxes",
    "frame_of",
    "get_reward",
    "register",
    "reward_options",
    "score_detection",
    "size_from_grid_thw",
]
