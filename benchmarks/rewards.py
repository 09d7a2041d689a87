"""Completions per second of the detection rewards, on one core.

    python benchmarks/rewards.py [--completions 100000] [--max-boxes 20] [--group 8]
    python benchmarks/rewards.py --adversarial [--megabytes 1]

Builds a synthetic GRPO batch like ViRFT COCO: prompts with 1 to `max_boxes` ground-truth boxes on
the 0-1000 grid, each repeated `group` times, and completions of 0 to `max_boxes` predicted boxes
(half of them near a ground-truth box), with a thinking prefix; a few percent are truncated, carry
NaN confidences or lack answer tags. Then times each reward in both modes over the whole batch.
Target (issue 4): >= 20,000 completions per second for each detection reward.

`--adversarial` instead times every reward, in both modes, on single megabyte outputs built to
make regexes backtrack or parsers loop (unclosed tags, a megabyte of digits or brackets, ...).
Target: well under a second each (at most 0.04 s measured on the 2-core machine); the tests bound
the same work in machine-independent units (tests/rewards/test_robustness.py), not in seconds.
"""
from __future__ import annotations

import argparse
import os
import time

# One core: keep any threaded NumPy kernel to a single thread.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from vrft_jax.rewards import available_rewards, combine, get_reward  # noqa: E402


def _box(rng: np.random.Generator) -> list[int]:
    x1, y1 = rng.integers(0, 900, size=2)
    return [int(x1), int(y1), int(rng.integers(x1 + 10, 1001)), int(rng.integers(y1 + 10, 1001))]


def synthetic_batch(completions: int, max_boxes: int, group: int, seed: int) -> tuple[list[str], list[str]]:
    """`completions` (completion, solution) texts: completions // group prompts, `group` samples each."""
    rng = np.random.default_rng(seed)
    texts, solutions = [], []
    for _ in range(-(-completions // group)):
        truth = [_box(rng) for _ in range(rng.integers(1, max_boxes + 1))]
        solution = "<answer>[" + ", ".join(f"{{'Position': {p}, 'Confidence': 1}}" for p in truth) + "]</answer>"
        for _ in range(group):
            entries = []
            for _ in range(rng.integers(0, max_boxes + 1)):
                if rng.random() < 0.5:
                    position = [int(np.clip(v + rng.integers(-15, 16), 0, 1000))
                                for v in truth[rng.integers(len(truth))]]
                else:
                    position = _box(rng)
                conf = "NaN" if rng.random() < 0.002 else f"{rng.random():.2f}"
                entries.append(f"{{'Position': {position}, 'Confidence': {conf}}}")
            answer = "[" + ", ".join(entries) + "]"
            kind = rng.random()
            if kind < 0.03:
                text = f"<think>counting</think><answer>{answer[: rng.integers(1, len(answer) + 1)]}"
            elif kind < 0.05:
                text = answer
            else:
                text = f"<think>I look for the objects and list their boxes.</think> <answer>{answer}</answer>"
            texts.append(text)
            solutions.append(solution)
    return texts[:completions], solutions[:completions]


_BOX = "{'Position': [1, 364, 98, 649], 'Confidence': 0.9}, "
# name -> (the text of k units, characters per unit)
ADVERSARIAL = {
    "many boxes": (lambda k: "<think>t</think><answer>[" + _BOX * k + "]</answer>", len(_BOX)),
    "many boxes, unclosed": (lambda k: "<answer>[" + _BOX * k, len(_BOX)),
    "digits": (lambda k: "<answer>[{'Position': [" + "9" * k + ", 1, 2, 3], 'Confidence': 1}]</answer>", 1),
    "open tags": (lambda k: "<answer>" * k, 8),
    "tag lines": (lambda k: "<answer>\n" * k + "</answer>", 9),
    "think/answer pairs": (lambda k: "<think>" + "</think><answer>" * k, 16),
    "braces": (lambda k: "<answer>" + "{" * k + "}" * k + "</answer>", 2),
    "point pairs": (lambda k: "<answer>" + "(1,2),(3,4) " * k + "</answer>", 12),
}
SOLUTIONS = {
    "detection_iou": "<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1}]</answer>",
    "detection_confidence": "<answer>[{'Position': [1, 364, 98, 649], 'Confidence': 1}]</answer>",
    "classification": "<answer>737-200</answer>",
    "grounding_giou": "<answer> (696,300),(999,999) </answer>",
    "format": "",
}


def adversarial(megabytes: float, repeats: int) -> None:
    rewards = [get_reward(name, mode) for name in available_rewards() for mode in ("paper", "strict")]
    print(f"seconds per single output of {megabytes:g} MB (best of {repeats})")
    print(f"{'output':<22}" + "".join(f"{r.name[:12] + '/' + r.mode[0]:>16}" for r in rewards))
    for name, (family, unit) in ADVERSARIAL.items():
        text = family(int(megabytes * (1 << 20)) // unit)
        times = []
        for reward in rewards:
            solution = [SOLUTIONS[reward.name]]
            reward([""], solution)  # the solution is cached; time the completion's work only
            times.append(_best_time(lambda: reward([text], solution), repeats)[0])
        print(f"{name:<22}" + "".join(f"{t:>16.3f}" for t in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=100_000)
    parser.add_argument("--max-boxes", type=int, default=20)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--adversarial", action="store_true", help="time megabyte adversarial outputs instead")
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of each adversarial output")
    args = parser.parse_args()
    if args.adversarial:
        adversarial(args.megabytes, args.repeats)
        return

    texts, solutions = synthetic_batch(args.completions, args.max_boxes, args.group, args.seed)
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"{len(texts):,} completions ({mean_chars:.0f} chars on average, up to {args.max_boxes} boxes), "
          f"{len(set(solutions)):,} distinct solutions")
    print(f"{'reward':<24}{'mode':<8}{'completions/s':>15}{'seconds':>10}{'mean':>8}")
    for name in ("detection_iou", "detection_confidence", "format"):
        for mode in ("paper", "strict"):
            reward = get_reward(name, mode)
            best, values = _best_time(lambda: reward(texts, solutions), args.repeats)
            print(f"{name:<24}{mode:<8}{len(texts) / best:>15,.0f}{best:>10.2f}{values.mean():>8.3f}")
    for mode in ("paper", "strict"):
        recipe = combine("detection", mode)
        best, out = _best_time(lambda: recipe(texts, solutions), args.repeats)
        print(f"{'detection (sum of 3)':<24}{mode:<8}{len(texts) / best:>15,.0f}{best:>10.2f}{out.total.mean():>8.3f}")


def _best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


if __name__ == "__main__":
    main()
