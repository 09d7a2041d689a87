"""The README's fit table: `python -m vrft_jax.aot` for each row, printed as the table's Markdown.

    python benchmarks/fit_table.py [--rows 2b-v4-8,7b-v4-16-sharded ...]

Each row compiles `lvis_fewshot`'s whole step (cast, rollout, reference scoring, update) for a TPU slice on
this CPU host with libtpu, as `aot` does; a 2B row takes a few minutes on 2 cores, a 7B row about twice that.
Needs the `tpu` extra (the `test` extra pulls it in).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vrft_jax import aot, recipe  # noqa: E402

LORA = {"lora.rank": 64}  # EasyR1's and verl's rank, on every projection of the language model

# name -> (recipe argument, topology, sampler layout, the row's label[, recipe overrides])
ROWS = {
    "2b-v4-8": ("", "v4-8", "whole", "2B, v4-8 (4 x 32 GiB)"),
    "2b-v5e-8": ("", "v5e-8", "whole", "2B, v5e-8 (8 x 16 GiB), the default"),
    "2b-v5e-16": ("", "v5e-16", "whole", "2B, v5e-16 (16 x 16 GiB)"),
    "2b-v5p-8": ("", "v5p-8", "whole", "2B, v5p-8 (4 x 95 GiB)"),
    "7b-v5p-8": ("model=7b", "v5p-8", "whole", "7B, v5p-8 (4 x 95 GiB), the default"),
    "7b-v4-16-sharded": ("model=7b", "v4-16", "sharded", "7B, v4-16 (8 x 32 GiB)"),
    "7b-v4-16-whole": ("model=7b", "v4-16", "whole", "7B, v4-16"),
    "7b-v5e-16-sharded": ("model=7b", "v5e-16", "sharded", "7B, v5e-16 (16 x 16 GiB)"),
    "7b-v5e-16-whole": ("model=7b", "v5e-16", "whole", "7B, v5e-16"),
    "7b-v5e-4": ("model=7b", "v5e-4", "whole", "7B, v5e-4 (4 x 16 GiB)"),
    "qwen2_5_vl_3b-v5e-8": ("model=qwen2_5_vl_3b", "v5e-8", "whole", "Qwen2.5-VL 3B, v5e-8 (8 x 16 GiB)"),
    "qwen2_5_vl_3b-v5e-8-sharded": ("model=qwen2_5_vl_3b", "v5e-8", "sharded", "Qwen2.5-VL 3B, v5e-8"),
    "qwen2_5_vl_3b-v4-8": ("model=qwen2_5_vl_3b", "v4-8", "whole", "Qwen2.5-VL 3B, v4-8 (4 x 32 GiB)"),
    "qwen2_5_vl_7b-v5p-8": ("model=qwen2_5_vl_7b", "v5p-8", "whole", "Qwen2.5-VL 7B, v5p-8 (4 x 95 GiB), the default"),
    "qwen2_5_vl_7b-v4-16-sharded": ("model=qwen2_5_vl_7b", "v4-16", "sharded", "Qwen2.5-VL 7B, v4-16 (8 x 32 GiB)"),
    "qwen3_vl_2b-v5e-8": ("model=qwen3_vl_2b", "v5e-8", "whole", "Qwen3-VL 2B, v5e-8 (8 x 16 GiB)"),
    "qwen3_vl_4b-v5e-8": ("model=qwen3_vl_4b", "v5e-8", "whole", "Qwen3-VL 4B, v5e-8 (8 x 16 GiB)"),
    "qwen3_vl_4b-v5e-8-sharded": ("model=qwen3_vl_4b", "v5e-8", "sharded", "Qwen3-VL 4B, v5e-8"),
    "qwen3_vl_4b-v4-8": ("model=qwen3_vl_4b", "v4-8", "whole", "Qwen3-VL 4B, v4-8 (4 x 32 GiB)"),
    "qwen3_vl_4b-v5e-16": ("model=qwen3_vl_4b", "v5e-16", "whole", "Qwen3-VL 4B, v5e-16 (16 x 16 GiB)"),
    "qwen3_vl_4b-v5e-16-sharded": ("model=qwen3_vl_4b", "v5e-16", "sharded", "Qwen3-VL 4B, v5e-16"),
    "qwen3_vl_4b-v5p-8": ("model=qwen3_vl_4b", "v5p-8", "whole", "Qwen3-VL 4B, v5p-8 (4 x 95 GiB)"),
    "qwen3_vl_8b-v5p-8": ("model=qwen3_vl_8b", "v5p-8", "whole", "Qwen3-VL 8B, v5p-8 (4 x 95 GiB)"),
    # LoRA (the largest preset of each family on each default slice)
    "7b-lora-v5e-8-sharded": ("model=7b", "v5e-8", "sharded", "7B LoRA r64, v5e-8 (8 x 16 GiB)", LORA),
    "7b-lora-v5e-8-whole": ("model=7b", "v5e-8", "whole", "7B LoRA r64, v5e-8", LORA),
    "7b-lora-v4-8-sharded": ("model=7b", "v4-8", "sharded", "7B LoRA r64, v4-8 (4 x 32 GiB)", LORA),
    "7b-lora-v4-8-whole": ("model=7b", "v4-8", "whole", "7B LoRA r64, v4-8", LORA),
    "7b-lora-v5p-8": ("model=7b", "v5p-8", "whole", "7B LoRA r64, v5p-8 (4 x 95 GiB)", LORA),
    "qwen2_5_vl_7b-lora-v5e-8-sharded": ("model=qwen2_5_vl_7b", "v5e-8", "sharded",
                                         "Qwen2.5-VL 7B LoRA r64, v5e-8 (8 x 16 GiB)", LORA),
    "qwen2_5_vl_7b-lora-v4-8": ("model=qwen2_5_vl_7b", "v4-8", "sharded",
                                "Qwen2.5-VL 7B LoRA r64, v4-8 (4 x 32 GiB)", LORA),
    "qwen3_vl_8b-lora-v5e-8-sharded": ("model=qwen3_vl_8b", "v5e-8", "sharded",
                                       "Qwen3-VL 8B LoRA r64, v5e-8 (8 x 16 GiB)", LORA),
    "qwen3_vl_8b-lora-v4-8": ("model=qwen3_vl_8b", "v4-8", "sharded", "Qwen3-VL 8B LoRA r64, v4-8 (4 x 32 GiB)",
                              LORA),
    "qwen3_vl_8b-lora-v5p-8": ("model=qwen3_vl_8b", "v5p-8", "whole", "Qwen3-VL 8B LoRA r64, v5p-8 (4 x 95 GiB)",
                               LORA),
}
PHASES = ("cast", "rollout", "reference", "update")


def row(name: str) -> str:
    argument, topology, layout, label, *overrides = ROWS[name]
    config = recipe.load("lvis_fewshot" + (f":{argument}" if argument else ""), *overrides)
    config.train.sampler_layout = layout
    result = aot.report(config, topology)
    mesh = ", ".join(f"{axis} {size}" for axis, size in result.mesh.items() if size > 1)
    if argument and argument != "model=qwen3_vl_2b":  # the sampler's layout decides whether these fit
        mesh += f", sampler {layout}"
    gib = aot.GIB
    failed = [p for p in result.programs.values() if p.error]
    if not result.programs:
        cells = [f"state and reference alone {(result.state + result.reference) / gib:.1f} GiB"] + [""] * 3
    else:
        cells = [f"{result.phases[p] / gib:.2f} GiB" if p in result.phases else "" for p in PHASES]
        for program in failed:
            cells[0] = f"{program.name} refused by XLA"
    verdict = f"fits, {result.headroom:.0%} headroom" if result.fits else "does not fit"
    return "| " + " | ".join([label, mesh, *cells, verdict]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    names = parser.parse_args().rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    print("| model, slice (chips x HBM) | layout | " + " | ".join(PHASES) + " | whole step |", flush=True)
    print("|---|---|" + "---|" * len(PHASES) + "---|", flush=True)
    for name in names:
        start = time.perf_counter()
        print(row(name), flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
