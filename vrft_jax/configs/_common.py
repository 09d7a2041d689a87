"""What every recipe shares: the argument parser, Visual-RFT's defaults and the links that make a shared
value one field.

Imports nothing but ml_collections: loading a recipe never imports JAX.

A recipe's blocks are one-to-one with the frozen dataclasses that `vrft_jax.recipe` builds from them:

    model     -> Qwen2VLConfig (a preset name, or "custom" with `text`/`vision` blocks) + the weights to load
    data      -> DataConfig (all fields but batch_size, which is prompts_per_step / processes)
    sampling  -> SamplingConfig
    grpo      -> GRPOConfig
    train     -> TrainConfig (its `grpo` is the block above)
    rewards   -> rewards.combine(terms, mode) with the box frame given to every reward that takes one
    mesh      -> sharding.make_mesh(data, fsdp, tensor)
    sft       -> the `mode="sft"` run's optimizer, batch and target limit (`vrft_jax.sft.run_config`)

The other top-level fields are the run's: its name, length and cadence, and where things come from.
"""

from __future__ import annotations

import shlex
import types

import ml_collections
from ml_collections import config_dict

MODELS = ("2b", "7b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b")
SHOTS = (1, 2, 4, 8, 16)

# Values that several blocks read, each set once at the top level: every path listed under a name is a
# two-way reference to it (setting either sets both), and `vrft_jax.recipe` checks that they agree.
SHARED = {
    "temperature": ("sampling.temperature", "train.temperature"),
    "eos_token_ids": ("sampling.eos_token_ids",),
    "pad_token_id": ("sampling.pad_token_id",),
    "param_dtype": ("train.param_dtype", "model.param_dtype"),
    "compute_dtype": ("train.compute_dtype", "model.dtype"),
    "remat": ("train.remat", "model.remat"),
}

# Per model size: the preset, Visual-RFT's group size (visual-rft.md §6: G 8 for 2B, 4 for the 7B
# script), the Hugging Face checkpoint and the TPU slice the README's memory report fits it on.
MODEL_SETTINGS = {
    "2b": dict(preset="qwen2_vl_2b", group_size=8, hub_id="Qwen/Qwen2-VL-2B-Instruct", slice="v5e-8"),
    # 7B fits a v5p-8 (`python -m vrft_jax.aot`). On a v4-16 or v5e-16 it fits only with
    # --config.train.sampler_layout=sharded, the v5e-16 under 10% headroom: the README's fit table.
    "7b": dict(preset="qwen2_vl_7b", group_size=4, hub_id="Qwen/Qwen2-VL-7B-Instruct", slice="v5p-8"),
    # Qwen2.5-VL (boxes in pixels of the resized image): the group sizes of the Qwen2-VL size it replaces.
    # 3B is 1.7x the 2B: on a v5e-8 it fits only with a sharded sampler, at 10% headroom; a v4-8 holds it whole.
    "qwen2_5_vl_3b": dict(preset="qwen2_5_vl_3b", group_size=8, hub_id="Qwen/Qwen2.5-VL-3B-Instruct", slice="v4-8"),
    "qwen2_5_vl_7b": dict(preset="qwen2_5_vl_7b", group_size=4, hub_id="Qwen/Qwen2.5-VL-7B-Instruct", slice="v5p-8"),
    # Qwen3-VL dense (boxes on the 0..1000 grid again; 32-pixel merged tokens, so the pixel budgets scale by
    # (32/28)^2 to keep the token counts): G 8 below 7B, 4 from 7B up, as for Qwen2-VL.
    "qwen3_vl_2b": dict(preset="qwen3_vl_2b", group_size=8, hub_id="Qwen/Qwen3-VL-2B-Instruct", slice="v5e-8"),
    # 4B (4.4B parameters) fits neither a v5e-8 nor a v4-8 (the fit table)
    "qwen3_vl_4b": dict(preset="qwen3_vl_4b", group_size=8, hub_id="Qwen/Qwen3-VL-4B-Instruct", slice="v5p-8"),
    "qwen3_vl_8b": dict(preset="qwen3_vl_8b", group_size=4, hub_id="Qwen/Qwen3-VL-8B-Instruct", slice="v5p-8"),
}


def token_side(model: str) -> int:
    """Pixels per side of one visual token of `model` (a MODEL_SETTINGS key): patch x merge, 28 or Qwen3-VL's 32."""
    return 32 if MODEL_SETTINGS[model]["preset"].startswith("qwen3_vl") else 28


def parse_arg(arg: str | None, **options: tuple) -> types.SimpleNamespace:
    """`"model=7b,shots=8"` -> namespace(model="7b", shots=8).

    Each option is `name=(default, allowed)`: a value is converted to the default's type and must be
    one of `allowed` (None allows any). An unknown name, a repeated name or a value outside `allowed`
    is a ValueError naming it.
    """
    values = {name: default for name, (default, _) in options.items()}
    seen = set()
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"recipe argument {item.strip()!r} is not name=value")
        if name not in options:
            raise ValueError(f"unknown recipe argument {name!r}; known: {sorted(options)}")
        if name in seen:
            raise ValueError(f"recipe argument {name!r} is given twice")
        seen.add(name)
        default, allowed = options[name]
        value = _convert(name, text, type(default))
        if allowed is not None and value not in allowed:
            raise ValueError(f"recipe argument {name}={text} is not one of {list(allowed)}")
        values[name] = value
    return types.SimpleNamespace(**values)


def _convert(name: str, text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"recipe argument {name}={text} must be true or false")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"recipe argument {name}={text} must be {kind.__name__}") from None


def base_config(*, name: str, model: str) -> ml_collections.ConfigDict:
    """A whole recipe with Visual-RFT's settings (visual-rft.md §6) for `model` (a key of MODEL_SETTINGS), every
    dataclass field present so that any can be overridden. A recipe then sets its data, rewards and
    length."""
    settings = MODEL_SETTINGS[model]
    c = ml_collections.ConfigDict()
    c.name = name
    c.slice = settings["slice"]  # the TPU slice it is sized for (README: "Will it fit on my TPU slice?")
    c.mode = "grpo"  # "grpo", or "sft": cross-entropy on the same records' solutions, with the `sft` block below
    c.seed = 0
    c.categories = ()  # the categories a detection recipe trains on, for its reports

    # Length and cadence (steps are optimizer updates). Visual-RFT logged every step and saved every 100.
    c.total_steps = 200
    c.log_every = 1
    c.ckpt_every = 100
    c.keep_checkpoints = 3
    c.sample_every = 20
    c.eval_every = 50
    c.export_hf = False
    # What the logged `reward_std` and `kl` mean: "trl" TRL 1.16's (batch std; token mean), "visual_rft"
    # Visual-RFT's (mean in-group std; mean over sequences of their token means); `vrft_jax.metrics.named`.
    c.metric_names = "trl"
    # The workdir and the data are on a POSIX mount every host of a multi-host run sees (NFS, Filestore,
    # gcsfuse): without it such a run needs gs:// paths, and refuses a local workdir before any step.
    c.shared_mount = False

    # Shared values, set once (see SHARED). Sampling at temperature 1 (hard-coded in Visual-RFT); the
    # Instruct models stop at <|im_end|> or <|endoftext|>; float32 master weights, bfloat16 compute.
    c.temperature = 1.0
    c.eos_token_ids = (151645, 151643)
    c.pad_token_id = 151643
    c.param_dtype = "float32"
    c.compute_dtype = "bfloat16"
    c.remat = "block"  # the README's memory report assumes per-layer remat for both sizes

    # 16 prompts per optimizer step: 8 GPUs x 1 prompt x 2 accumulation steps in Visual-RFT.
    c.prompts_per_step = 16

    c.model = dict(
        preset=settings["preset"],
        checkpoint=f"checkpoints/{settings['hub_id'].split('/')[1]}",  # the HF directory the user brings
        hub_id=settings["hub_id"],
        precision=config_dict.placeholder(str),
    )

    c.source = dict(download="", prepare="")  # how the training data is made (see `vrft_jax.recipe`)
    c.data = dict(
        path="",
        split="train",
        max_prompt_len=1024,  # Visual-RFT's max_prompt_length: the limit; the bucket is sized from the data
        patch_bucket=config_dict.placeholder(int),  # None: max_pixels / 14^2 (2048 patches): the limit
        buckets="data",  # T and P measured from the split (`vrft_jax.data.buckets`); "fixed" uses the limits
        patch_dtype="float32",
        drop_remainder=True,
        min_pixels=4 * token_side(model) ** 2,  # 3136 for 28-pixel tokens
        max_pixels=512 * token_side(model) ** 2,  # 401408 for 28-pixel tokens: at most 512 visual tokens
        shuffle=True,
        num_epochs=config_dict.placeholder(int),  # None: repeat; total_steps ends the run
        num_workers=2,
        worker_buffer=2,
        read_threads=1,
        device_prefetch=1,
        on_bad_record="error",
        tokenizer_path=config_dict.placeholder(str),  # None: the checkpoint's own tokenizer files
        system_prompt=config_dict.placeholder(str),  # None: Visual-RFT's training prompts
        problem_prefix="",
    )
    c.data.seed = c.get_oneway_ref("seed")  # the shuffle follows the run's seed unless set
    # The held-out set ("" = none), evaluated every eval_every steps and by `python -m vrft_jax.evaluate`:
    # its evaluator type (rewards, classification, detection, grounding), detection's ground truth ("" = the
    # records' own boxes) and protocol (coco, lvis), how answers are read (visual_rft: as the paper's
    # scripts; strict), and decoding: greedy with Qwen2-VL's shipped repetition penalty, which Visual-RFT's
    # evaluation ran with; max_new_tokens None = the rollout's.
    # download: what to fetch before `prepare` can make the held-out set (the hint of a missing one)
    c.eval = dict(path="", split="train", prepare="", download="", type="rewards", gt="", protocol="coco",
                  parse="visual_rft", max_new_tokens=config_dict.placeholder(int), repetition_penalty=1.05)
    # What the held-out set is shown, apart from training (each None = the training value: the data block's,
    # prompts_per_step, the recipe's categories): image bounds, the text and patch buckets' limits, the text
    # before each question, the system prompt by name (`prompts.SYSTEM_PROMPTS`: "template" sends none, "r1"),
    # the global batch, and the categories of detection's paper mean. `visual_rft_eval` sets the paper's.
    for key, kind in (("min_pixels", int), ("max_pixels", int), ("max_prompt_len", int), ("patch_bucket", int),
                      ("problem_prefix", str), ("system_prompt", str), ("batch_size", int), ("categories", tuple)):
        c.eval[key] = config_dict.placeholder(kind)

    c.sampling = dict(
        max_new_tokens=256,  # TRL's max_completion_length default; Visual-RFT did not set it
        group_size=settings["group_size"],
        top_k=50,
        top_p=1.0,
        greedy=False,
        suppressed_token_ids=config_dict.placeholder(tuple),  # None: the model's vision tokens
        repetition_penalty=1.0,  # TRL's default for training rollouts; evaluation follows Qwen2-VL's 1.05
    )

    c.grpo = dict(
        loss="paper",
        advantage="group",
        advantage_eps=1e-4,
        beta=0.04,  # set explicitly: TRL's default became 0.0 in 2025-05, which silently drops the KL
        kl="k3",
        kl_bias_correction=False,
        epsilon=0.2,
        epsilon_high=config_dict.placeholder(float),
        delta=config_dict.placeholder(float),
        max_completion_length=config_dict.placeholder(int),
        # Through the first stop id (<|im_end|> or <|endoftext|>); "visual_rft": Visual-RFT's mask, through the
        # first <|im_end|> only (`GRPOConfig.visual_rft`).
        completion_mask="first_stop",
        # Guards (`GRPOConfig`, off as in the peers): truncated importance sampling of the sampler/trainer mismatch
        # ("token_truncate", TRL's vLLM correction; the mismatch is logged either way), its cap, an entropy bonus.
        importance_sampling=config_dict.placeholder(str),
        importance_sampling_cap=3.0,
        entropy_coef=0.0,
    )
    # Collapse (`vrft_jax.collapse`): DAPO's dynamic sampling, up to this many redraws of a step's flat groups (off),
    # oversampling (this many times prompts_per_step prompts drawn, the non-flat groups trained on first; 1: off),
    # and the stop of a run whose every reward was 0 for this many steps in a row (0: never).
    c.collapse = dict(dynamic_sampling=0, oversample=1, max_zero_reward_steps=20)

    c.train = dict(
        learning_rate=1e-6,  # TRL GRPOConfig's default, decaying linearly to 0 with no warmup (HF's)
        warmup_steps=0,
        end_learning_rate=0.0,
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        micro_batches=1,
        num_iterations=1,
        logits_chunk_size=32,
        logits_vocab_block=4096,
        freeze_vision=False,
        max_consecutive_nonfinite=10,
        sampler_layout="whole",  # each fsdp group holds the rollout's whole bf16 copy ("sharded": as the state)
        # The KL reference's matrices in the compute dtype (None), which the matmuls read: the same logprobs as a
        # float32 copy at half its memory; "float32" keeps a full copy.
        reference_dtype=config_dict.placeholder(str),
    )
    # HF's linear schedule: warmup, then decay to 0 over the rest of the run. Follows total_steps and
    # warmup_steps unless set itself (which leaves them alone).
    c.train.decay_steps = c.get_oneway_ref("total_steps") - c.train.get_ref("warmup_steps")

    # frame: the frame the model writes boxes in (None: its family's, `vrft_jax.rewards.frames`: Qwen2-VL's 0..1000
    # grid, Qwen2.5-VL's pixels of the resized image), which prompts, rewards, SFT targets and evaluation follow;
    # solution_frame: the one the records' answers are stored in (`prepare` writes Visual-RFT's 0..1000 grid).
    c.rewards = dict(mode="paper", frame=config_dict.placeholder(str), solution_frame="rel1000", terms={})
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.warm_start = dict(sft_steps=0, learning_rate=1e-5)  # SFT before GRPO (the demo's); 0 = none

    # LoRA (`vrft_jax.models.qwen2_vl.lora`): rank 0 is full fine-tuning. With rank > 0 only adapters on the language
    # model's projections train (`targets`: "all" = q/k/v/o/gate/up/down, or a comma-separated subset), the frozen
    # base is stored in `base_dtype` (None: the compute dtype, which the matmuls read anyway) and is the KL's
    # reference (adapters disabled: no copy), the sampler runs the merged model. EasyR1, verl and VLM-R1 use rank
    # 64 and a learning rate about 10x full fine-tuning's (1e-5 against 1e-6): set train.learning_rate with it.
    # `dropout`: PEFT's lora_dropout on the adapters' inputs in the update (VLM-R1 0.05; EasyR1 and verl none).
    # `init_from`: a PEFT adapter directory (or one of ours) to start from instead of fresh adapters (its rank,
    # alpha, targets and rslora must be the block's; its dropout is not read).
    c.lora = dict(rank=0, alpha=64.0, targets="all", rslora=False, dropout=0.0,
                  base_dtype=config_dict.placeholder(str), init_from="")

    # `mode="sft"`: the paper's SFT baseline, LLaMA-Factory's run of issue #34 (visual-rft.md §6): 200 steps (the
    # recipe's total_steps), `--warmup_steps 100 --weight_decay 0.1`, per-device batch 1 x grad-acc 8 x 8 GPUs,
    # `--finetuning_type lora` with LLaMA-Factory's LoRA defaults (rank 8, alpha 2 x rank, every linear layer of
    # the language model, the vision tower frozen): the sft block's lora_rank and lora_alpha, which replace the
    # lora block's rank and alpha in an SFT run (lora_rank=0: full fine-tuning; lower the learning rate with it).
    c.sft = dict(
        lora_rank=8,
        lora_alpha=16.0,
        # A guess: visual-rft.md gives no SFT learning rate (issue #34 does not show it). LLaMA-Factory's LoRA
        # examples use 1e-4 (its full fine-tuning examples about 1e-5).
        learning_rate=1e-4,
        warmup_steps=100,  # issue #34; then linear decay to 0 (HF's default schedule: a guess, #34 names none)
        weight_decay=0.1,  # issue #34 (not on biases and norms, as HF's Trainer)
        samples_per_step=64,  # issue #34: 8 GPUs x 1 sample x 8 accumulation steps
        micro_batches=1,  # a guess: 64 sequences per update, GRPO's 2B step takes 128; raise it if it does not fit
        # The limit; the target bucket is sized from the data (solution + EOS, `vrft_jax.sft.target_bucket`). A
        # guess: COCO base65 answers reach ~600 tokens. LLaMA-Factory's cutoff_len (2048, prompt and answer)
        # truncates; here a longer target is a bad record, named before the first step.
        max_target_len=1024,
    )
    link_shared(c)
    return c


def link_shared(c: ml_collections.ConfigDict) -> None:
    """Point every path of SHARED at its top-level field (a two-way FieldReference)."""
    for name, paths in SHARED.items():
        ref = c.get_ref(name)
        for path in paths:
            block, field = path.split(".")
            c[block][field] = ref


# Visual-RFT's evaluation inputs. Its scripts resize images with qwen_vl_utils' defaults (visual-rft.md §7.1,
# §10.4: min 4 x 28 x 28, max 16384 x 28 x 28 = 12,845,056 pixels; `evaluate.score` has the same), not
# training's 401,408. The text bucket's limit holds the largest such image (16384 tokens) and Visual-RFT's whole
# max_prompt_length (1024) of text; buckets="data" sizes the bucket from the held-out set within it.
# For a model of other tokens (Qwen3-VL's 32 pixels) the same token counts: 4 and 16384 tokens' worth of pixels.
EVAL_MIN_TOKENS, EVAL_MAX_TOKENS = 4, 16384
EVAL_MIN_PIXELS, EVAL_MAX_PIXELS = EVAL_MIN_TOKENS * 28 * 28, EVAL_MAX_TOKENS * 28 * 28
EVAL_MAX_PROMPT_LEN = EVAL_MAX_TOKENS + 1024
# COCO, LVIS and classification evaluation send '<image>\n' + question after the image (§4.4); LISA's does not.
IMAGE_PREFIX = "<image>\n"


def visual_rft_eval(c: ml_collections.ConfigDict, *, problem_prefix: str, system_prompt: str = "template",
                    batch_size: int | None = None) -> None:
    """Visual-RFT's evaluation inputs as the `eval` block's: its image bounds, a text bucket that holds them,
    the text before each question and the system prompt by name ("template": none, the chat template's "You
    are a helpful assistant."; "r1": LISA's). `batch_size` (global; None: prompts_per_step) bounds the
    high-resolution prefill of sets with large images."""
    side = int(round((c.data.min_pixels / 4) ** 0.5))  # the recipe's model's token side (`token_side`)
    c.eval.min_pixels = EVAL_MIN_TOKENS * side * side
    c.eval.max_pixels = EVAL_MAX_TOKENS * side * side
    c.eval.max_prompt_len = EVAL_MAX_PROMPT_LEN
    c.eval.problem_prefix = problem_prefix
    c.eval.system_prompt = system_prompt
    c.eval.batch_size = batch_size


def detection_eval(c: ml_collections.ConfigDict, *, flavor: str, annotations: str, images: str, exist_map: str,
                   protocol: str, categories: tuple[str, ...] | None = None) -> None:
    """The paper's detection evaluation as the recipe's `eval` block: Visual-RFT's questions (the categories
    its exist map lists per image, of `categories`: default the recipe's) with its inputs (`visual_rft_eval`,
    the '<image>\n' prefix), the instances file as ground truth, answers read as its scripts read them, 1024
    new tokens (its `max_new_tokens`), the paper's mean and per-class AP over `categories`. Run by
    `python -m vrft_jax.evaluate`; in the loop only with eval_every > 0 (thousands of images: hours)."""
    categories = tuple(c.categories if categories is None else categories)
    c.eval_every = 0
    c.eval.path = f"data/{flavor}_val_{c.name}_queries"
    c.eval.split = "val"
    c.eval.prepare = (f"{flavor} --annotations {annotations} --images {images} "
                      f"--categories {shlex.quote(','.join(categories))} --queries exist:{exist_map} --split val")
    clone = exist_map[:exist_map.index("Visual-RFT/") + len("Visual-RFT")]
    if flavor == "lvis":
        fetch = [f"LVIS v1 val annotations (https://www.lvisdataset.org) as {annotations}",
                 f"COCO train2017 and val2017 images (LVIS val draws from both; https://cocodataset.org) under "
                 f"{images}"]
    else:
        fetch = [f"COCO 2017 annotations and val2017 images (https://cocodataset.org) as {annotations} and {images}"]
    c.eval.download = "; ".join([*fetch, f"Visual-RFT's exist maps: git clone {VISUAL_RFT_REPO} {clone}"])
    c.eval.type = "detection"
    c.eval.gt = annotations
    c.eval.protocol = protocol
    c.eval.max_new_tokens = 1024
    c.eval.categories = categories
    visual_rft_eval(c, problem_prefix=IMAGE_PREFIX)


VISUAL_RFT_REPO = "https://github.com/Liuziyu77/Visual-RFT"


def hf_download(repo: str, directory: str) -> str:
    """The command that fetches a Hugging Face dataset repository into `directory`."""
    return f"hf download {repo} --repo-type dataset --local-dir {directory}"
