"""Few-shot fine-grained classification (visual-rft.md §3.3, §9.1): Flowers102, Pets37, FGVC-Aircraft
or Cars196 with 1, 2, 4, 8 or 16 shots per class.

Four shots is the released ViRFT_CLS_* set of the dataset; the other counts are drawn from a folder
per class with `prepare classification --shots K` (seed 0). 200 steps (the author, issue #105);
paper-mode rewards: classification + format.

    --config=cls_fewshot                                  2B, flowers, 4 shots
    --config=cls_fewshot:dataset=aircraft,shots=16        2B, aircraft, 16 shots
"""

from vrft_jax.configs import _common

# dataset -> (released 4-shot repository, the noun of its prompt for `prepare classification`)
DATASETS = {
    "flowers": ("laolao77/ViRFT_CLS_flower_4_shot", "flower"),
    "pets": ("laolao77/ViRFT_CLS_pets37_4shot", "pet"),
    "aircraft": ("laolao77/ViRFT_CLS_fgvc_aircraft_4_shot", "aircraft"),
    "cars": ("laolao77/ViRFT_CLS_car196_4shot", "car"),
}


def get_config(arg=None):
    arg = _common.parse_arg(arg, model=("2b", _common.MODELS), dataset=("flowers", tuple(DATASETS)),
                            shots=(4, _common.SHOTS))
    c = _common.base_config(name=f"cls_fewshot_{arg.dataset}_{arg.model}_{arg.shots}shot", model=arg.model)
    c.total_steps = 200
    repo, noun = DATASETS[arg.dataset]
    if arg.shots == 4:
        local = f"sources/{repo.split('/')[1]}"
        c.source.download = _common.hf_download(repo, local)
        c.source.prepare = f"virft --parquet {local}/data/*.parquet"
        c.data.path = f"data/virft_cls_{arg.dataset}_4shot"
    else:
        c.source.download = (f"the {arg.dataset} training images, one folder per class, into "
                             f"sources/{arg.dataset}/train")
        c.source.prepare = (f"classification --folder sources/{arg.dataset}/train --noun {noun} "
                            f"--shots {arg.shots} --seed 0")
        c.data.path = f"data/cls_{arg.dataset}_{arg.shots}shot"
    c.rewards.terms = {"classification": 1.0, "format": 1.0}
    # Accuracy on the CoOp test split (visual-rft.md §7.1) once it is prepared, e.g. `prepare classification
    # --list test.txt --noun NOUN --split test`, and named: --config.eval.path=... --config.eval_every=N,
    # or `python -m vrft_jax.evaluate --config.eval.path=...`.
    c.eval.type = "classification"
    c.eval.split = "test"
    c.eval.max_new_tokens = 1024
    return c
