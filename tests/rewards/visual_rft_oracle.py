"""Visual-RFT's reward functions, restated step by step as an oracle for paper mode.

Written from visual-rft.md §5 and a reading of grpo.py, grpo_classification.py and grpo_lisa.py
(Liuziyu77/Visual-RFT @ 9486633): the same regexes, the same `json.loads`, the same Python
arithmetic and the same exceptions caught, without `math_verify`. Deliberately naive (the
regexes backtrack, every step allocates): it is the specification, used on small inputs only.
Each function returns what the original appends to its reward list, NaN included.
"""
from __future__ import annotations

import json
import re


def _tagged_answer(text: str, flags: int = 0) -> str:
    found = re.search(r"<answer>(.*?)</answer>", text, flags)
    return found.group(1).strip() if found else text.strip()


def _read_box_list(text: str):
    """extract_bbox: first <answer> .. first </answer>, truncation repair, quotes, json."""
    if "<answer>" not in text:
        return None
    start = text.find("<answer>") + len("<answer>")
    end = text.find("</answer>")
    if end == -1:
        end = len(text)
    body = text[start:end]
    if not body.endswith("]"):
        body = body.rsplit("},", 1)[0] + "}]"
    try:
        return json.loads(body.replace("'", '"'))
    except json.JSONDecodeError:
        return None


def _iou(gt, pred):
    gx1, gy1, gx2, gy2 = gt
    px1, py1, px2, py2 = pred
    ix1, iy1 = max(gx1, px1), max(gy1, py1)
    ix2, iy2 = min(gx2, px2), min(gy2, py2)
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    return inter / ((gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter)


def _greedy(gt_list, pred_list):
    results, used = [], set()
    for pred in sorted(pred_list, key=lambda b: b["Confidence"], reverse=True):
        best, best_index = 0, -1
        for i, gt in enumerate(gt_list):
            if i in used:
                continue
            value = _iou(gt["Position"], pred["Position"])
            if value > best:
                best, best_index = value, i
        if best > 0.5:
            results.append((best, pred["Confidence"]))
            used.add(best_index)
        else:
            results.append((0, pred["Confidence"]))
    return results


def _sums(results):
    iou_total, conf_total = 0.0, 0.0
    for iou, conf in results:
        iou_total += iou
        conf_total += (1 - iou) * (1 - conf) if iou == 0 else conf
    return iou_total, conf_total


def detection(content: str, solution: str) -> tuple[float, float]:
    """(accuracy_reward_iou, accuracy_reward_confidence) of one completion."""
    rewards = []
    for which in ("iou", "confidence"):
        reward = 0.0
        try:
            answer = "<answer>" + _tagged_answer(content) + "</answer>"
            answer = answer.replace("[[", "[").replace("]]", "]").replace("\n", "")
            truth = _read_box_list(solution.strip())
            pred = _read_box_list(answer)
            if pred is None or type(pred[0]) != dict:  # noqa: E721 (the original's test)
                reward = 0.0
            else:
                unique, seen = [], set()
                for box in pred:
                    key = tuple(box["Position"])
                    if key not in seen:
                        seen.add(key)
                        unique.append(box)
                results = _greedy(truth, unique)
                iou_total, conf_total = _sums(results)
                if which == "iou":
                    reward = iou_total / (len(truth) if len(truth) >= len(results) else len(results))
                    if reward > 1:
                        reward = 1.0
                else:
                    reward = conf_total / len(results)
                    if reward > 1:
                        reward = 1.0
                    if reward < 0:
                        reward = 0.0
        except Exception:
            pass
        rewards.append(reward)
    return rewards[0], rewards[1]


def classification(content: str, solution: str) -> float:
    truth = _tagged_answer(solution).replace(" ", "").replace("_", "").lower()
    answer = _tagged_answer(content).replace(" ", "").replace("_", "").lower()
    return 1.0 if truth in answer or answer in truth else 0.0


def _giou_plus_one(gt, pred):
    (gx1, gy1), (gx2, gy2) = gt[0], gt[1]
    (px1, py1), (px2, py2) = pred[0], pred[1]
    inter = max(0, min(gx2, px2) - max(gx1, px1)) * max(0, min(gy2, py2) - max(gy1, py1))
    union = (gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter
    iou = inter / union if union > 0 else 0
    c = (max(gx2, px2) - min(gx1, px1)) * (max(gy2, py2) - min(gy1, py1))
    giou = iou - (c - union) / c if c > 0 else iou
    return giou + 1


def grounding(content: str, solution: str) -> float:
    truth = _tagged_answer(solution)
    answer = _tagged_answer(content, re.DOTALL)
    pattern = r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)"
    try:
        found = re.findall(pattern, answer)
        pred = [(int(a) / 1000, int(b) / 1000) for a, b, _, _ in found]
        pred += [(int(c) / 1000, int(d) / 1000) for _, _, c, d in found]
        found = re.findall(pattern, truth)
        gt = [(int(a) / 1000, int(b) / 1000) for a, b, _, _ in found]
        gt += [(int(c) / 1000, int(d) / 1000) for _, _, c, d in found]
        reward = _giou_plus_one(gt, pred)
    except Exception:
        reward = 0.0
    if answer == truth:
        reward = 2.0
    return reward


def format_(content: str) -> float:
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    return 1.0 if re.fullmatch(pattern, content, re.DOTALL) else 0.0
