"""Does the demo's GRPO learn on every seed? `make demo`'s recipe run with several seeds, in one table.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0,1,2,3,4] [--workdir runs/demo_seeds] [--set KEY=VALUE ...]

Each seed is a whole `vrft_jax.train` run of the `demo` recipe (`--config.seed=S`) in its own workdir: the SFT
warm start, the GRPO steps, the held-out evaluation before and after (greedy answers on the held-out images).
Per seed it prints the held-out accuracy (Visual-RFT's substring rule, `accuracy_substring`) before and after
GRPO with binomial standard errors and the change in standard errors of the difference, each class's accuracy
before and after with the change in its standard errors, and the share of the final completions that end with
EOS and parse (`format_valid`: stopped before the token limit, and an `<answer>` the strict reader reads).
`--set` overrides the recipe as `--config.KEY=VALUE` does (e.g. `--set train.learning_rate=3e-4`), to try a
change on every seed; a seed whose run stops on collapse (`collapse.CollapseError`) is reported as such.

A run of about 5-10 minutes per seed on 2 CPU cores; not run in CI. Issue 23's acceptance reads this table:
every seed gains at least 3 standard errors, no class loses more than 3 of its standard errors, and at least
95% of the final completions end with EOS and parse.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def gain_in_errors(before: float, after: float, n_before: int, n_after: int) -> float:
    """(after - before) over the standard error of the difference of two independent proportions."""
    error = math.hypot(standard_error(before, n_before), standard_error(after, n_after))
    if error > 0:
        return (after - before) / error
    return 0.0 if after == before else math.copysign(math.inf, after - before)  # both at 0 or 1: no noise


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def evaluations(workdir: str) -> tuple[dict, dict, list[dict]]:
    """(metrics of the first held-out evaluation, metrics of the last, the last one's predictions)."""
    directory = os.path.join(workdir, "eval")
    steps = sorted(int(name[len("step_"):-len(".json")]) for name in os.listdir(directory)
                   if name.startswith("step_") and name.endswith(".json"))
    if len(steps) < 2:
        raise RuntimeError(f"{directory} holds {len(steps)} evaluation(s): the run did not finish")
    first, last = (read_json(os.path.join(directory, f"step_{s}.json")) for s in (steps[0], steps[-1]))
    with open(os.path.join(directory, f"step_{steps[-1]}.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    return first, last, predictions


def seed_rows(seed: int, workdir: str) -> list[str]:
    before, after, predictions = evaluations(workdir)
    n0, n1 = before["examples"], after["examples"]
    a0, a1 = before["accuracy_substring"], after["accuracy_substring"]
    valid = sum(bool(p.get("format_valid")) for p in predictions) / len(predictions)
    rows = [f"| {seed} | all | {a0:.3f} +- {standard_error(a0, n0):.3f} | {a1:.3f} +- {standard_error(a1, n1):.3f} "
            f"| {gain_in_errors(a0, a1, n0, n1):+.1f} | {valid:.3f} |"]
    for label, entry in after["per_class"].items():
        old = before["per_class"].get(label, {"accuracy_substring": 0.0, "examples": 0})
        p0, p1 = old["accuracy_substring"], entry["accuracy_substring"]
        rows.append(f"| | {label} | {p0:.3f} +- {standard_error(p0, old['examples']):.3f} | {p1:.3f} +- "
                    f"{standard_error(p1, entry['examples']):.3f} | "
                    f"{gain_in_errors(p0, p1, old['examples'], entry['examples']):+.1f} | |")
    return rows


def literal(text: str):
    """A command-line value as Python reads it (3e-4, 0.04, True, {'classification': 1.0}), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--workdir", default="runs/demo_seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override, as --config.KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)

    from vrft_jax import collapse, recipe, run

    overrides = {key: literal(value) for key, value in (item.split("=", 1) for item in args.set)}

    table = ["| seed | class | held-out before | after | change (s.e.) | final EOS + parse |",
             "|---|---|---|---|---|---|"]
    for seed in (int(s) for s in args.seeds.split(",")):
        config = recipe.load("demo", {**overrides, "seed": seed})
        workdir = os.path.join(args.workdir, f"seed_{seed}")
        print(f"seed {seed}: {workdir}", flush=True)
        try:
            run.train(config, workdir)
        except collapse.CollapseError as error:
            table.append(f"| {seed} | collapsed | | | | |")
            print(error, flush=True)
            continue
        table.extend(seed_rows(seed, workdir))
        print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
