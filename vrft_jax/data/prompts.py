"""Visual-RFT's prompts and ground-truth answers, as exact strings (reference/visual-rft.md §3-§4).

The detection and aircraft prompts are byte-for-byte those of the published ViRFT datasets and
evaluation scripts, typos included ("tags.The", "grouding", the stray ")" of the LISA template).
Answers use Qwen2-VL's box frame: integers on a 0..1000 grid relative to the image
(`x / W * 1000`, `y / H * 1000`), which Qwen3-VL uses as well. Qwen2.5-VL writes absolute pixels of the
image as it sees it (after `smart_resize`): `in_frame` asks for those instead (and
`vrft_jax.rewards.frames.answer_in_frame` writes a stored answer's boxes in them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vrft_jax.rewards.frames import Frame, frame_of

REL_SCALE = 1000  # side of Qwen2-VL's relative box grid

_ANSWER_SUFFIX = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n"
)

# What the detection prompt says of the boxes, per frame; the 0..1000 phrase is Visual-RFT's, byte for byte.
_BOX_RANGE = {
    Frame.REL1000: "(between 0 and 1000, integer)",
    Frame.PIXELS: "(absolute pixel coordinates in the image, integer)",
}
# Not str.format templates: the answer format itself contains braces.
_DETECTION_HEAD = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    + _BOX_RANGE[Frame.REL1000] + " and confidence (between 0 and 1, with two decimal places).\n"
    "If no object belonging to the category '{category}' in the image, return 'No Objects'.\n"
)
_DETECTION_TAIL = (
    "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\n"
    "Please strictly follow the format."
)

# noun -> (article, what is asked). aircraft: the ViRFT dataset and eval script; plant, pet, flower: the
# paper (Table 1, Figure 4); car: not published, "model" as for aircraft; shape: the synthetic source.
CLASSIFICATION_NOUNS: dict[str, tuple[str, str]] = {
    "aircraft": ("an", "model"),
    "plant": ("a", "species"),
    "pet": ("a", "species"),
    "flower": ("a", "species"),
    "car": ("a", "model"),
    "shape": ("a", "kind"),
}
_CLASSIFICATION_TAIL = "<think> ... </think> <answer>species name</answer>\nPlease strictly follow the format."

# LISA training (src/virft/src/open_r1/grpo_lisa.py: QUESTION_TEMPLATE around gen_sft.py's user text).
LISA_QUESTION = "Output the bounding box in the image corresponding to the instruction: {instruction}"
LISA_TEMPLATE = (
    "{question} Output the thinking process in <think> </think> and your grouding box. "
    "Following \"<think> thinking process </think>\n<answer>(x1,y1),(x2,y2)</answer>)\" format."
)
# LISA evaluation (lisa_evaluation/Qwen2_VL_lisa_infere.py's f-string, demo/lisa_demo.ipynb, as visual-rft.md §4.3
# gives it): the training words with a period after the instruction, sent with R1_SYSTEM_PROMPT.
LISA_EVAL_TEMPLATE = (
    "Output the bounding box in the image corresponding to the instruction: {instruction}. Output the thinking "
    "process in <think> </think> and your grouding box. "
    "Following \"<think> thinking process </think>\n<answer>(x1,y1),(x2,y2)</answer>)\" format."
)

# The system prompt of every grpo*.py; Visual-RFT uses it only for LISA evaluation (training has none).
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)

# System prompts a recipe names (configs import no code): "template" sends none, so the chat template adds its
# default "You are a helpful assistant." (Visual-RFT's training and its COCO, LVIS and classification evaluation);
# "r1" is R1_SYSTEM_PROMPT (its LISA evaluation).
SYSTEM_PROMPTS: dict[str, str | None] = {"template": None, "r1": R1_SYSTEM_PROMPT}


def detection_problem(category: str) -> str:
    """The detection prompt for one category (LVIS names keep their underscores)."""
    return _DETECTION_HEAD.replace("{category}", category) + _ANSWER_SUFFIX + _DETECTION_TAIL


def classification_problem(noun: str, asked: str | None = None) -> str:
    """The fine-grained classification prompt, e.g. noun="aircraft" gives the FGVC-Aircraft one;
    `asked` replaces what is asked of the noun (the synthetic shapes' "colour")."""
    if noun not in CLASSIFICATION_NOUNS:
        raise ValueError(f"unknown classification noun {noun!r}; known: {sorted(CLASSIFICATION_NOUNS)}")
    article, default = CLASSIFICATION_NOUNS[noun]
    asked = asked or default
    head = (f"This is an image containing {article} {noun}. "
            f"Please identify the {asked} of the {noun} based on the image.\n")
    return head + _ANSWER_SUFFIX + _CLASSIFICATION_TAIL


def grounding_problem(instruction: str) -> str:
    """The LISA training prompt. Like grpo_lisa.py, the question is stripped before templating."""
    return LISA_TEMPLATE.format(question=LISA_QUESTION.format(instruction=instruction).strip())


def grounding_eval_problem(instruction: str) -> str:
    """The LISA evaluation prompt (LISA_EVAL_TEMPLATE) for one instruction."""
    return LISA_EVAL_TEMPLATE.format(instruction=instruction)


def system_prompt(name: str) -> str | None:
    """The system prompt SYSTEM_PROMPTS names (None: no system message); ValueError naming an unknown one."""
    if name not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown system prompt {name!r}; known: {sorted(SYSTEM_PROMPTS)}")
    return SYSTEM_PROMPTS[name]


def detection_solution(boxes_rel1000: Sequence[Sequence[int]]) -> str:
    """`<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 1}, ...]</answer>`, the ViRFT ground truth."""
    if not boxes_rel1000:
        raise ValueError("a detection answer needs at least one box")
    items = ", ".join(f"{{'Position': [{', '.join(str(int(v)) for v in box)}], 'Confidence': 1}}"
                      for box in boxes_rel1000)
    return f"<answer>[{items}]</answer>"


def in_frame(problem: str, frame: str | Frame) -> str:
    """The problem asking for boxes in `frame`: a detection prompt's 0..1000 phrase becomes the frame's; any
    other problem (classification, LISA's, which names no range) is returned as it is."""
    return problem.replace(_BOX_RANGE[Frame.REL1000], _BOX_RANGE[frame_of(frame)])


def classification_solution(class_name: str) -> str:
    return f"<answer>{class_name}</answer>"


def grounding_solution(box_rel1000: Sequence[int]) -> str:
    """`<answer> (x1,y1),(x2,y2) </answer>`, as grpo_lisa.py wraps gen_sft.py's assistant text."""
    x1, y1, x2, y2 = (int(v) for v in box_rel1000)
    return f"<answer> ({x1},{y1}),({x2},{y2}) </answer>"


def box_to_rel1000(box_xyxy: Sequence[float], width: float, height: float) -> list[int]:
    """Pixel `[x1, y1, x2, y2]` -> 0..1000 integers, rounded half up and clipped to the grid.

    Computed as `x * 1000 / W` (one rounding of the exact product) then `floor(v + 0.5)`, so a box edge
    exactly halfway between two grid lines goes to the larger one, independently of the float order.
    """
    scale = (width, height, width, height)
    return [min(REL_SCALE, max(0, math.floor(float(v) * REL_SCALE / s + 0.5))) for v, s in zip(box_xyxy, scale)]


def box_to_rel1000_truncated(box_xyxy: Sequence[float], width: float, height: float) -> list[int]:
    """Pixel box -> 0..1000 by `int(x / w * 1000)`: exactly LISA's gen_sft.py (truncation toward zero)."""
    scale = (width, height, width, height)
    return [int(float(v) / s * REL_SCALE) for v, s in zip(box_xyxy, scale)]
