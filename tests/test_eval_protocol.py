"""Each reproduction recipe evaluates with the inputs of Visual-RFT's evaluation scripts while training keeps its
own (issue 19 items 1 and 2): full resolution, the '<image>\\n' question prefix of the COCO, LVIS and
classification scripts, and LISA as lisa_evaluation scores it (first instruction and box per image, its prompt
and system prompt, the exact pixel box). The expected values are written here from visual-rft.md, not read
from the code under test."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vrft_jax import cli, recipe
from vrft_jax.data import make_iterator, prepare, storage
from vrft_jax.data.image import ImageGeometry
from vrft_jax.data.records import Record
from vrft_jax.data.storage import InMemorySource
from vrft_jax.evaluate import evaluators, score
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer

# qwen_vl_utils' defaults, which Visual-RFT's evaluation resized with (visual-rft.md §7.1, §10.4)
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = 3136, 12_845_056
# Visual-RFT's training: --max_pixels 401408, min 3136, no prefix, no system message (§6, §4.4)
TRAIN_MAX_PIXELS = 401_408
TEMPLATE_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# §4.3: the SYSTEM_PROMPT constant of every grpo*.py, which Qwen2_VL_lisa_infere.py sends
R1_SYSTEM = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
             "assistant first thinks about the reasoning process in the mind and then provides the user with the "
             "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
             "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>")
# §4.3: lisa_evaluation's f-string, for the instruction "the red cup"
LISA_EVAL_RED_CUP = ("Output the bounding box in the image corresponding to the instruction: the red cup. Output the "
                     "thinking process in <think> </think> and your grouding box. Following \"<think> thinking "
                     "process </think>\n<answer>(x1,y1),(x2,y2)</answer>)\" format.")
# §4.1 for 'bus' and §4.2 (aircraft), "tags.The" included
DETECTION_BUS = (
    "Detect all objects belonging to the category 'bus' in the image, and provide the bounding boxes (between 0 "
    "and 1000, integer) and confidence (between 0 and 1, with two decimal places).\nIf no object belonging to the "
    "category 'bus' in the image, return 'No Objects'.\nOutput the thinking process in <think> </think> and final "
    "answer in <answer> </answer> tags.The output answer format should be as follows:\n<think> ... </think> "
    "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\nPlease strictly follow the "
    "format.")
AIRCRAFT = (
    "This is an image containing an aircraft. Please identify the model of the aircraft based on the image.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.The output "
    "answer format should be as follows:\n<think> ... </think> <answer>species name</answer>\nPlease strictly "
    "follow the format.")

# spec -> (question prefix, system prompt, global evaluation batch)
PROTOCOLS = {
    "coco_fewshot": ("<image>\n", None, 16),
    "coco_fewshot:model=7b,shots=8": ("<image>\n", None, 16),
    "lvis_fewshot": ("<image>\n", None, 16),
    "coco_ov_base65": ("<image>\n", None, 16),
    "coco_ov_base65:eval=lvis_rare": ("<image>\n", None, 16),
    "cls_fewshot:dataset=aircraft": ("<image>\n", None, 8),
    "cls_fewshot:dataset=cars,shots=16": ("<image>\n", None, 8),
    "lisa_grounding": ("", R1_SYSTEM, 8),
    "lisa_grounding:model=7b,eval=test": ("", R1_SYSTEM, 8),
}


IN_PROCESS = {"data.num_workers": 0}  # no Grain worker processes to start for one prompt


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return load_tokenizer()


def _settings(spec, overrides=None):
    return recipe.build(recipe.load(spec, overrides), process_count=1, check_paths=False)


@pytest.mark.parametrize("spec", sorted(PROTOCOLS))
def test_a_reproduction_evaluates_with_visual_rfts_inputs_and_trains_with_its_own(spec):
    prefix, system, batch = PROTOCOLS[spec]
    config = recipe.load(spec)
    settings = _settings(spec)
    held_out, train = settings.eval_data, settings.data
    assert held_out is not None and held_out.path == config.eval.path and config.eval.prepare
    assert (held_out.min_pixels, held_out.max_pixels) == (EVAL_MIN_PIXELS, EVAL_MAX_PIXELS)
    assert (held_out.problem_prefix, held_out.system_prompt, held_out.batch_size) == (prefix, system, batch)
    assert (held_out.num_epochs, held_out.shuffle, held_out.drop_remainder) == (1, False, False)
    # the text bucket's limit holds the largest image Visual-RFT's evaluation makes, with 1024 tokens of text
    side = ImageGeometry(min_pixels=EVAL_MIN_PIXELS, max_pixels=EVAL_MAX_PIXELS).resized_hw(8000, 8000)
    assert side[0] * side[1] // 28 ** 2 == 16384 and held_out.max_prompt_len == 16384 + 1024
    assert held_out.buckets == "data"  # sized from the held-out set within that limit
    assert (train.max_pixels, train.problem_prefix, train.system_prompt, train.max_prompt_len) == (
        TRAIN_MAX_PIXELS, "", None, 1024)
    assert train.batch_size == 16


def test_the_score_command_resizes_as_the_recipes_evaluate():
    """`evaluate score --frame pixels` maps boxes through the same smart_resize bounds."""
    assert (score.EVAL_MIN_PIXELS, score.EVAL_MAX_PIXELS) == (EVAL_MIN_PIXELS, EVAL_MAX_PIXELS)


def test_an_eval_key_left_none_keeps_the_training_value_and_an_unknown_system_prompt_is_named():
    settings = _settings("coco_fewshot", {"eval.max_pixels": None, "eval.problem_prefix": None,
                                          "eval.batch_size": None, "data.max_pixels": 200704})
    assert (settings.eval_data.max_pixels, settings.eval_data.problem_prefix) == (200704, "")
    with pytest.raises(ValueError, match=r"eval.system_prompt: unknown system prompt 'R1'; known: \['r1', "):
        _settings("lisa_grounding", {"eval.system_prompt": "R1"})
    with pytest.raises(ValueError, match=r"eval.batch_size=6 does not split over 4 processes"):
        recipe.eval_data_config(recipe.load("lisa_grounding", {"eval.batch_size": 6}), process_count=4)


def _rendered(settings, tokenizer, record):
    """The text of the first prompt the held-out pipeline makes of `record`, a run of image tokens as one,
    and how many image tokens it had."""
    config = Qwen2VLConfig.qwen2_vl_2b()
    batch = next(make_iterator(settings.eval_data, config, tokenizer=tokenizer, source=InMemorySource([record]),
                               process_index=0, process_count=1))
    ids = np.asarray(batch.model_inputs.input_ids[0])[np.asarray(batch.model_inputs.attention_mask[0]).astype(bool)]
    text = tokenizer.decode(ids)
    return re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", text), text.count("<|image_pad|>")


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("spec, problem", [("coco_fewshot", DETECTION_BUS), ("cls_fewshot:dataset=aircraft", AIRCRAFT)])
def test_detection_and_classification_questions_render_as_visual_rfts_evaluation_sent_them(spec, problem,
                                                                                         qwen_tokenizer):
    # An FGVC-Aircraft-sized image (1200 x 800): smart_resize to 1204 x 812 at full resolution, 43 x 29 tokens;
    # training's 401,408 pixels would have shrunk it to at most 512.
    record = Record(id="x", image=_png(1200, 800), problem=problem, solution="<answer>bus</answer>",
                    task="classification", label="bus")
    text, image_tokens = _rendered(_settings(spec, IN_PROCESS), qwen_tokenizer, record)
    assert text == (f"{TEMPLATE_SYSTEM}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><image>\n{problem}"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert image_tokens == 43 * 29


def _lisa_folder(root):
    """ReasonSeg's val/ layout: a.jpg (640 x 480) with two instructions and two polygons, b.jpg with one."""
    folder = root / "sources" / "LISA" / "val"
    folder.mkdir(parents=True)
    for name, size in (("a", (640, 480)), ("b", (300, 200))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(folder / f"{name}.jpg")
    (folder / "a.json").write_text(json.dumps({"text": ["the red cup", "what holds coffee"], "shapes": [
        {"label": "target", "points": [[333, 10], [639.9, 10], [500, 479.9]]},
        {"label": "target", "points": [[0, 0], [5, 5]]}]}))
    (folder / "b.json").write_text(json.dumps({"text": ["the door"], "shapes": [
        {"points": [[30.5, 20], [150, 20], [150, 199]]}]}))


def test_lisa_is_evaluated_as_lisa_evaluation_does_first_instruction_pixel_box_its_prompts(tmp_path, monkeypatch,
                                                                                          qwen_tokenizer):
    monkeypatch.chdir(tmp_path)  # the recipe's own relative sources/ and data/ paths
    _lisa_folder(tmp_path)
    config = recipe.load("lisa_grounding")
    assert recipe.prepare_command(config, "eval") == ("python -m vrft_jax.data.prepare lisa --input sources/LISA/val "
                                                      "--evaluation --split val --output data --name "
                                                      "lisa_val_evaluation")
    assert prepare.main(recipe.prepare_argv(config, "eval")) == 0
    records = sorted(storage.read_records(config.eval.path, "val"), key=lambda r: r.id)
    # one record per image: its first instruction and the first polygon's box, in exact pixels
    assert [(r.id, json.loads(r.label)) for r in records] == [("lisa:a:0", [333.0, 10.0, 639.9, 479.9]),
                                                              ("lisa:b:0", [30.5, 20.0, 150.0, 199.0])]
    assert records[0].problem == LISA_EVAL_RED_CUP
    assert records[0].solution == "<answer> (520,20),(999,999) </answer>"  # gen_sft.py's truncation, for rewards

    text, _ = _rendered(_settings("lisa_grounding", IN_PROCESS), qwen_tokenizer, records[0])
    assert text == (f"<|im_start|>system\n{R1_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                    f"<|vision_end|>{LISA_EVAL_RED_CUP}<|im_end|>\n<|im_start|>assistant\n")

    # Scored against the pixel box: the answer equal to the truncated solution is not a perfect box.
    row = {"id": "lisa:a:0", "index": 0, "label": records[0].label, "solution": records[0].solution,
           "completion": "<think>.</think>\n<answer>(520,20),(999,999)</answer>", "source_hw": [480, 640],
           "image_hw": [476, 644]}
    exact = evaluators.score_grounding([dict(row)], parse="visual_rft", frame="qwen2_vl")
    predicted = [520 * 0.64, 20 * 0.48, 999 * 0.64, 999 * 0.48]  # x / 1000 * W, y / 1000 * H
    inter = (predicted[2] - 333) * (predicted[3] - 10)
    union = (predicted[2] - predicted[0]) * (predicted[3] - predicted[1]) + (639.9 - 333) * (479.9 - 10) - inter
    assert exact["ground_truth"] == "pixel box of the label"
    assert exact["mIoU"] == pytest.approx(inter / union, abs=1e-12) and exact["mIoU"] < 0.999
    truncated = evaluators.score_grounding([dict(row, label="")], parse="visual_rft", frame="qwen2_vl")
    assert truncated["ground_truth"] == "solution's 0..1000 box" and truncated["mIoU"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"record 'lisa:b:0' \(index 1\): its ground truth is the solution's"):
        evaluators.score_grounding([dict(row), dict(row, id="lisa:b:0", index=1, label="")], parse="visual_rft",
                                   frame="qwen2_vl")


def test_prepare_refuses_evaluation_for_a_source_that_is_not_lisa(tmp_path):
    with pytest.raises(cli.UserError, match="unrecognized arguments: --evaluation"):
        prepare.main(["synthetic", "--evaluation", "--output", str(tmp_path), "--name", "s"])
