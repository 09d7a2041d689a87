"""Prompts are Visual-RFT's exact strings; answers and box conversions are as hand-computed."""

from __future__ import annotations

import pytest

from vrft_jax.data import prompts
from vrft_jax.data.records import solution_error

# Verbatim from coco_evaluation/Qwen2_VL_coco_infere.py (= the ViRFT datasets' `problem`).
COCO_CAT = (
    "Detect all objects belonging to the category 'cat' in the image, and provide the bounding boxes (between 0 "
    "and 1000, integer) and confidence (between 0 and 1, with two decimal places).\nIf no object belonging to the "
    "category 'cat' in the image, return 'No Objects'.\nOutput the thinking process in <think> </think> and final "
    "answer in <answer> </answer> tags.The output answer format should be as follows:\n<think> ... </think> "
    "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\nPlease strictly follow the format.")
# Verbatim from classification/Qwen2_VL_classification_infere.py (= ViRFT_CLS_fgvc_aircraft_4_shot).
AIRCRAFT = (
    "This is an image containing an aircraft. Please identify the model of the aircraft based on the image.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.The output answer "
    "format should be as follows:\n<think> ... </think> <answer>species name</answer>\nPlease strictly follow the "
    "format.")
# grpo_lisa.py's QUESTION_TEMPLATE around gen_sft.py's stripped user text.
LISA = (
    "Output the bounding box in the image corresponding to the instruction: the cup someone drinks from Output the "
    "thinking process in <think> </think> and your grouding box. Following \"<think> thinking process </think>\n"
    "<answer>(x1,y1),(x2,y2)</answer>)\" format.")


def test_prompts_are_the_published_strings():
    assert prompts.detection_problem("cat") == COCO_CAT
    assert prompts.classification_problem("aircraft") == AIRCRAFT
    assert prompts.grounding_problem("the cup someone drinks from  ") == LISA
    assert prompts.detection_problem("kitchen_table").count("'kitchen_table'") == 2


def test_classification_prompt_takes_the_papers_nouns():
    assert prompts.classification_problem("flower").startswith(
        "This is an image containing a flower. Please identify the species of the flower based on the image.\n")
    assert prompts.classification_problem("pet").startswith("This is an image containing a pet. Please identify "
                                                            "the species of the pet")
    with pytest.raises(ValueError, match="unknown classification noun 'boat'"):
        prompts.classification_problem("boat")


def test_answers_have_virft_format():
    assert prompts.detection_solution([[1, 364, 98, 649]]) == (
        "<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1}]</answer>")
    assert prompts.classification_solution("737-200") == "<answer>737-200</answer>"
    assert prompts.grounding_solution([696, 300, 999, 999]) == "<answer> (696,300),(999,999) </answer>"


def test_box_to_rel1000_rounds_half_up_and_clips():
    # 640x480 image: x 10 -> 15.625 -> 16; y 20 -> 41.67 -> 42; x2 330 -> 515.625 -> 516; y2 240 -> 500.
    assert prompts.box_to_rel1000([10, 20, 330, 240], 640, 480) == [16, 42, 516, 500]
    # Exactly half a grid step (1 / 2000 * 1000 = 0.5) goes up; beyond the image is clipped.
    assert prompts.box_to_rel1000([1, 3, 2000, 2100], 2000, 2000) == [1, 2, 1000, 1000]
    # LISA truncates like int(): 333 / 640 * 1000 = 520.3 -> 520, 479.9 / 480 * 1000 = 999.8 -> 999.
    assert prompts.box_to_rel1000_truncated([333, 0, 639.9, 479.9], 640, 480) == [520, 0, 999, 999]


@pytest.mark.parametrize("task,solution,problem", [
    ("detection", "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1}]</answer>", None),
    ("detection", "<answer>No Objects</answer>", None),
    ("detection", "<answer>[{'Position': [1, 2, 3], 'Confidence': 1}]</answer>", "4 numbers"),
    ("detection", "<answer>[{'Position': [5, 2, 3, 4], 'Confidence': 1}]</answer>", "not ordered"),
    ("detection", "<answer>[{'Position': [1, 2, 3, 1001], 'Confidence': 1}]</answer>", "not ordered"),
    ("detection", "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 2}]</answer>", "Confidence"),
    ("detection", "<answer>[]</answer>", "non-empty list"),
    ("detection", "<answer>[{'Position': [1, 2, 3, 4]</answer>", "not a Python list literal"),
    ("detection", "[{'Position': [1, 2, 3, 4], 'Confidence': 1}]", "not wrapped"),
    ("classification", "<answer>Boeing 717</answer>", None),
    ("classification", "<answer> </answer>", "non-empty"),
    ("grounding", "<answer> (1,2),(30,40) </answer>", None),
    ("grounding", "<answer> (1,2),(30) </answer>", "expected '(x1,y1),(x2,y2)'"),
    ("ranking", "<answer>a</answer>", "unknown task"),
])
def test_solution_validation(task, solution, problem):
    error = solution_error(task, solution)
    if problem is None:
        assert error is None
    else:
        assert problem in error
