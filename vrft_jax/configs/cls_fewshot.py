"""Few-shot fine-grained classification (the paper's Table 2; visual-rft.md §3.3, §9.1): Flowers102, Pets37,
FGVC-Aircraft or Cars196 with 1, 2, 4, 8 or 16 shots per class.

Four shots is the released ViRFT_CLS_* set of the dataset; the other counts are drawn from a folder
per class with `prepare classification --shots K` (seed 0). 200 steps (the author, issue #105);
paper-mode rewards: classification + format.

    --config=cls_fewshot                                  2B, flowers, 4 shots
    --config=cls_fewshot:dataset=aircraft,shots=16        2B, aircraft, 16 shots

Held-out set: the CoOp test split Visual-RFT's `classification/Qwen2_VL_classification_infere.py` scores
(visual-rft.md §7.1): Flowers102 2463, Pets37 3669, FGVC-Aircraft 3333, Cars196 8041 images, listed in its
`classification/val_data/{oxford_flowers,pets,fgvc_aircraft,stanford_cars}.pth` (image path -> label index into
the `.txt` class list beside it). Nothing here reads a `.pth`: write its images as `sources/DATASET/test.tsv`
(`relative/image/path<TAB>class name`, a file name of ours) under `sources/DATASET/`, then run the recipe's
`eval.prepare`. Evaluated by `python -m vrft_jax.evaluate` with Visual-RFT's inputs (full resolution, the
'<image>\n' prefix); in the loop only with eval_every > 0 (thousands of large images).
"""

from vrft_jax.configs import _common

# dataset -> (released 4-shot repository, the noun of its prompt for `prepare classification`)
DATASETS = {
    "flowers": ("laolao77/ViRFT_CLS_flower_4_shot", "flower"),
    "pets": ("laolao77/ViRFT_CLS_pets37_4shot", "pet"),
    "aircraft": ("laolao77/ViRFT_CLS_fgvc_aircraft_4_shot", "aircraft"),
    "cars": ("laolao77/ViRFT_CLS_car196_4shot", "car"),
}

# the recipe's arguments (--config=NAME:name=value,...): name -> (default, allowed values)
ARGS = {"model": ("2b", _common.MODELS), "dataset": ("flowers", tuple(DATASETS)), "shots": (4, _common.SHOTS)}


def get_config(arg=None):
    arg = _common.parse_arg(arg, **ARGS)
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
    # Accuracy on the CoOp test split (see the module docstring), 1024 new tokens as the script generates.
    c.eval_every = 0
    c.eval.path = f"data/cls_{arg.dataset}_test"
    c.eval.prepare = (f"classification --list sources/{arg.dataset}/test.tsv --image-root sources/{arg.dataset} "
                      f"--noun {noun} --split test")
    c.eval.download = (f"the CoOp test split of {arg.dataset}: its images under sources/{arg.dataset}, listed as "
                       f"sources/{arg.dataset}/test.tsv (image<TAB>class, written from Visual-RFT's val_data/*.pth)")
    c.eval.type = "classification"
    c.eval.split = "test"
    c.eval.max_new_tokens = 1024
    # Aircraft and car images reach 1.6k px and more at full resolution: half the training batch (a guess; the
    # recipes' slices still split 8 rows over their devices) bounds the prefill's activations.
    _common.visual_rft_eval(c, problem_prefix=_common.IMAGE_PREFIX, batch_size=8)
    return c
