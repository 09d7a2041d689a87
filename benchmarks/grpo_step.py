"""Seconds per GRPO step: our whole step (vrft_jax.grpo_loop) against TRL 1.16's GRPOTrainer, in one run.

    .venv/bin/python benchmarks/grpo_step.py [--steps 3] [--prompts 8] [--group 8] [--new-tokens 128]
    .venv/bin/python benchmarks/grpo_step.py --quick          # a minutes-long check of the script itself
    .venv/bin/python benchmarks/grpo_step.py --lora 64        # also LoRA: ours and TRL + peft, against full FT

Both sides get the same work. One tiny Qwen2-VL with the real vocabulary (hidden 256, 4 layers,
vocab 151,657, tied head; vision depth 4, width 128) and random weights is built in transformers,
saved, and loaded by ours with `model_port.hf_to_flax.load_hf` and by TRL from the same directory
(policy and reference). The same Visual-RFT detection records (`vrft_jax.data.synthetic`, 224x224
images, 64 image tokens each) in the same chat template, 8 prompts x G = 8 completions, up to 128
new tokens sampled with temperature 1 and top-k 50 (stop on <|im_end|> / <|endoftext|>, the vision
tokens suppressed), Visual-RFT's detection reward (`rewards.combine("detection", mode="paper")`,
handed to TRL as a Python reward function), the paper's GRPO loss (TRL's `loss_type="grpo"`, group
scaled rewards, one update per rollout, k3 KL without the ratio correction) with beta 0.04,
AdamW at lr 1e-6 decaying linearly to 0 over the run, clipping at 1, float32 on this machine's
CPU, one process.

A step is, for ours, `grpo_loop.iteration` as `vrft_jax.train` runs it (the library's phases:
`RunContext`, `make_sampler_cast`, `sampler_graphdef`, `init_state`, `make_train_step`,
`make_score_fn`) plus the data pipeline's next batch; for TRL, the time from the Trainer's
`on_step_begin` to `on_step_end` (generation, rewards, reference logprobs, loss, backward, clipping,
optimizer and schedule). The first step of each side is a warm-up (our compile); the printed
seconds are the median of the next `--steps`. Prints both, our split by phase (the loop's Timer),
each side's mean completion length (a random model rarely stops early, so both run to the limit:
equal work), and last a line `ratio: N.N` (TRL seconds / ours).

What the full-size run should show (issue 10, item 8). Measured before issue 10 with a step put
together from the then API (`rollout`, `make_score_fn`, `make_train_step`; fp32, one device) on an
AVX2 machine: rollout 14-17 s, reference scoring 17-18 s, update 60-66 s, about 100 s per step
against TRL's 381 s per step (median of 3) on the same machine: 3.8x. The LM head dominates (0.64
TFLOP per pass over the 8,192 completion tokens; JAX ran that matmul at 76 GFLOP/s there), so the
reference scorer and the update each take about twice their floor, and the whole step's floor is
about 45-50 s: the target is a ratio of at least 5 (issue 10's acceptance). Expect the update and
the reference phase to dominate ours, the rollout next, rewards and sampler weights negligible.

Measured at full size (`--steps 2`: one warm-up and the median of two measured steps each, on the
project's 2-core AVX-512 Intel Xeon, nothing else running), after the vocabulary-blocked LM head
(`vrft_jax.lm_head`) and the tiled top-k (`sampling.top_k`): TRL 172.0 s/step, ours 28.8 s/step
(rollout 7.48, reference 3.79, update 17.41, data 0.07, sampler weights 0.04, rewards 0.01; first
step with compile 41.5 s), "ratio: 6.0". Before them (`--steps 1`): TRL 160.4, ours 47.4 (rollout
7.70, reference 7.66, update 31.77), ratio 3.4. Each phase against its floor, the LM head's matmul
at the ~330 GFLOP/s this CPU reaches on [2048, 256] x [256, 4096] blocks (0.64 TFLOP, ~2.0 s per
pass over the 8,192 completion tokens) and the rest of the model's forward at ~0.8 s (measured
alone): reference 3.79 s against ~2.8 (one head pass + forward); update 17.41 s against ~10.4 (four
head passes: forward, the backward's recomputation, d hidden, d head; plus the model's forward and
backward, ~3x its forward), the rest being exp passes over the blocks (~2 s) and XLA's transposing
copies of the MLP activations in the backward (~1.6 s); rollout 7.48 s against ~4.5 (128 decode
steps whose [64, 256] x [256, 151,657] head matmul runs at ~140 GFLOP/s, too few rows to reach the
blocks' rate), the rest the softmax normaliser, top-k and the 4 layers.

With `--lora RANK` (alpha `--lora-alpha`, default the rank; every projection of the language model, the
vision tower frozen, `--lora-lr` 1e-5 as EasyR1's LoRA runs) both sides run a LoRA step as well, on the same
model, data and seed: ours as `vrft_jax.train` runs it (adapters alone trained, the frozen base the reference,
the sampler on the merged weights) and TRL's GRPOTrainer with a peft `LoraConfig` of the same targets (its
reference is the base with the adapter disabled). Ours runs a second LoRA pass whose sampler runs the base plus
the adapters unmerged (the sampler structure with adapters, the weights cast as they are): the measurement
behind the run's choice of the merged model. For each of ours it prints the step time and the memory the step
holds: the bytes live between steps (the train state and the reference weights) and the update program's
peak (XLA's memory analysis: arguments, outputs not aliased, temporaries), and `lora ratio: N.N` (TRL LoRA
seconds / ours).

Measured with `--steps 2 --lora 64` (same machine, nothing else running): TRL 276.2 s/step, ours 36.7 s (ratio
7.5); LoRA: TRL + peft 261.0 s, ours 32.4 s with the merged sampler and 31.8 s unmerged ("lora ratio: 8.1");
ours LoRA against full fine-tuning: update 19.8 s against 24.6 s, 185 MiB held between steps against 673 MiB,
update peak 2461 MiB against 3096 MiB; sampler weights + rollout merged 7.55 s, unmerged 7.46 s.

`--quick` (hidden 64, 2 layers, 2 prompts x G 2, 16 new tokens) only checks the script (measured
before the blocked head): TRL 13.1 s/step, ours 0.44, "ratio: 29.4", TRL's per-step overhead rather
than the model's arithmetic (in a cProfile of --quick, TRL's chunked log-prob kernel over the
151,657-token head took ~8 s of a ~14 s step, for under a GFLOP). The prompts
are the same on both sides token for token (226 tokens, left-padded to the longest) and so are the
image patches (checked once by hand; the script does not re-check).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICK = dict(hidden=64, layers=2, prompts=2, group=2, new_tokens=16, steps=1, vision_depth=2, vision_width=32)
FULL = dict(hidden=256, layers=4, prompts=8, group=8, new_tokens=128, steps=3, vision_depth=4, vision_width=128)
PHASES = ("data", "sampler_weights", "rollout", "rewards", "reference", "update")


def hf_config(vocab: int, hidden: int, layers: int, vision_depth: int, vision_width: int) -> dict:
    """A Qwen2-VL config with the real special-token ids (transformers' defaults) and M-RoPE sections
    split as Qwen2-VL's (1/4, 3/8, 3/8 of half the head dimension)."""
    heads = 4
    half = hidden // heads // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return dict(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, num_heads=max(2, vision_width // 32),
                           hidden_size=hidden, mlp_ratio=4 if vision_width >= 128 else 2),
        tie_word_embeddings=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script in a few minutes")
    for name, value in FULL.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({QUICK[name]} with --quick)")
    parser.add_argument("--vocab", type=int, default=None, help="default: the real tokenizer's size (151,657)")
    parser.add_argument("--image-side", type=int, default=224)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0, help="also run LoRA steps of this rank (0: only full FT)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    parser.add_argument("--lora-lr", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    # Transformers and TRL warn about deprecations and unused generation flags at every step.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    import jax
    import torch
    from PIL import Image
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration

    from model_port.hf_to_flax import load_hf
    from vrft_jax.data import DataConfig, InMemorySource, make_iterator
    from vrft_jax.data.synthetic import detection_records
    from vrft_jax.models.qwen2_vl.processor import (
        ENDOFTEXT_ID,
        EOS_TOKEN_IDS,
        QWEN2VL_VOCAB,
        load_processor,
    )

    vocab = args.vocab or QWEN2VL_VOCAB
    rows = args.prompts * args.group
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())

    # One set of weights for both: random, moved off the init so the logits are not flat.
    hf = Qwen2VLForConditionalGeneration(HFConfig(**hf_config(vocab, args.hidden, args.layers, args.vision_depth,
                                                               args.vision_width))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.generation_config.eos_token_id = list(EOS_TOKEN_IDS)
    hf.generation_config.pad_token_id = ENDOFTEXT_ID

    # The same records: the first `prompts` detection records of square images of `image_side`.
    side = args.image_side
    records = list(detection_records(args.prompts, seed=args.seed, min_side=side, max_side=side))[:args.prompts]
    processor = load_processor(min_pixels=side * side, max_pixels=side * side)
    processor.tokenizer.padding_side = "left"  # TRL takes mm_token_type_ids from the processor (trl#5785)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.problem}]}]
                for r in records]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in records]
    encoded = processor(text=texts, images=images, return_tensors="np", padding=True)
    prompt_len = int(encoded["attention_mask"].sum(axis=1).max())
    image_tokens = int(np.prod(encoded["image_grid_thw"][0])) // 4

    with tempfile.TemporaryDirectory() as workdir:
        model_path = os.path.join(workdir, "model")
        hf.save_pretrained(model_path)
        del hf
        ours_model = load_hf(model_path, dtype=np.float32)

        data = DataConfig(batch_size=args.prompts, max_prompt_len=prompt_len, min_pixels=side * side,
                          max_pixels=side * side, num_workers=0, seed=args.seed)
        model_config = ours_model.config
        batches = lambda: make_iterator(data, model_config, tokenizer=processor.tokenizer,  # noqa: E731
                                        source=InMemorySource(records))
        ours = run_ours(args, ours_model, batches(), processor.tokenizer)
        lora = {}
        if args.lora:
            for merged in (True, False):
                jax.clear_caches()
                lora[merged] = run_ours(args, ours_model, batches(), processor.tokenizer, lora=True, merged=merged)
        del ours_model
        jax.clear_caches()
        trl = run_trl(args, model_path, workdir, records, processor)
        trl_lora = run_trl(args, model_path, workdir, records, processor, lora=True) if args.lora else None

    ours_s = statistics.median(ours["total"])
    trl_s = statistics.median(trl["seconds"])
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {vocab:,}; {args.prompts} prompts x "
          f"G={args.group} = {rows} completions; prompt {prompt_len} tokens ({image_tokens} image tokens, "
          f"{side}x{side}); up to {args.new_tokens} new tokens; top-k {args.top_k}, T={args.temperature:g}; "
          f"beta {args.beta:g}; lr {args.lr:g}; fp32; {os.cpu_count()} CPU cores; median of {args.steps} step(s) "
          f"after a warm-up{' (--quick)' if args.quick else ''}")
    print(f"{'':30s}{'s/step':>10s}{'warm-up s':>12s}{'mean length':>13s}")
    print(f"{'TRL 1.16 GRPOTrainer':30s}{trl_s:>10.2f}{trl['warmup']:>12.1f}{statistics.median(trl['length']):>13.1f}")
    print(f"{'vrft_jax grpo_loop.iteration':30s}{ours_s:>10.2f}{ours['warmup']:>12.1f}"
          f"{statistics.median(ours['length']):>13.1f}")
    for phase in PHASES:
        seconds = statistics.median(ours[phase])
        print(f"{'  ' + phase:30s}{seconds:>10.2f}{100 * seconds / ours_s:>11.0f}% of our step")
    print(f"ratio: {trl_s / ours_s:.1f}")
    if not args.lora:
        return
    lora_s = statistics.median(lora[True]["total"])
    print(f"LoRA rank {args.lora}, alpha {args.lora_alpha:g}, lr {args.lora_lr:g} on q/k/v/o/gate/up/down of the "
          f"language model, the vision tower frozen")
    print(f"{'':36s}{'s/step':>9s}{'rollout s':>11s}{'reference s':>13s}{'update s':>10s}{'held MiB':>10s}"
          f"{'update peak MiB':>17s}")
    mib = 2 ** 20
    for name, result in (("vrft_jax full fine-tuning", ours), ("vrft_jax LoRA, merged sampler", lora[True]),
                         ("vrft_jax LoRA, unmerged sampler", lora[False])):
        print(f"{name:36s}{statistics.median(result['total']):>9.2f}"
              + "".join(f"{statistics.median(result[p]):>{w}.2f}" for p, w in (("rollout", 11), ("reference", 13),
                                                                             ("update", 10)))
              + f"{result['held'] / mib:>10.1f}{result['update_peak'] / mib:>17.1f}")
    print(f"{'TRL 1.16 GRPOTrainer + peft LoRA':36s}{statistics.median(trl_lora['seconds']):>9.2f}")
    unmerged = statistics.median(lora[False]["rollout"]) + statistics.median(lora[False]["sampler_weights"])
    merged = statistics.median(lora[True]["rollout"]) + statistics.median(lora[True]["sampler_weights"])
    print(f"sampler weights + rollout: merged {merged:.2f} s, unmerged {unmerged:.2f} s "
          f"(unmerged / merged {unmerged / merged:.2f})")
    print(f"LoRA / full fine-tuning: step time {lora_s / ours_s:.2f}, memory held "
          f"{lora[True]['held'] / ours['held']:.2f}, update peak {lora[True]['update_peak'] / ours['update_peak']:.2f}")
    print(f"lora ratio: {statistics.median(trl_lora['seconds']) / lora_s:.1f}")


def run_ours(args, model, batches, tokenizer, lora: bool = False, merged: bool = True) -> dict:
    """Our steps: the library's loop phases, built as `vrft_jax.train` builds them; with `lora` the LoRA run's
    (`vrft_jax.run`), its sampler on the merged weights or, not `merged`, on the base plus the adapters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vrft_jax import grpo, grpo_loop
    from vrft_jax.models.qwen2_vl.lora import LoRAConfig
    from vrft_jax.models.qwen2_vl.model import Qwen2VL, base_graphdef, with_lora
    from vrft_jax.models.qwen2_vl.processor import ENDOFTEXT_ID, EOS_TOKEN_IDS
    from vrft_jax.optimizer import OptimizerConfig
    from vrft_jax.progress import Timer
    from vrft_jax.rewards import combine
    from vrft_jax.sampling import SamplingConfig, make_sampler_cast, sampler_graphdef
    from vrft_jax.scoring import ScoringConfig, make_score_fn
    from vrft_jax.train_step import TrainConfig, base_params, init_state, make_train_step

    total = 1 + args.steps
    train = TrainConfig(grpo=grpo.GRPOConfig(loss="paper", advantage="group", beta=args.beta),
                        optimizer=OptimizerConfig(learning_rate=args.lora_lr if lora else args.lr, decay_steps=total),
                        scoring=ScoringConfig(temperature=args.temperature), lora=lora)
    if lora:
        model = with_lora(model, LoRAConfig(rank=args.lora, alpha=args.lora_alpha), args.seed)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, group_size=args.group, temperature=args.temperature,
                              top_k=args.top_k, eos_token_ids=EOS_TOKEN_IDS,
                              pad_token_id=ENDOFTEXT_ID).resolve(model.config)
    graphdef, state = init_state(model, train)
    reference = base_score = None
    if lora and args.beta > 0:  # the base structure over the state's own frozen weights
        base_score = make_score_fn(base_graphdef(model.config), base_params(state.params), train.scoring)
    elif args.beta > 0:
        reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state.params)
    if lora and not merged:  # the sampler computes the adapters' path at every token
        unmerged = model.config.replace(dtype=jnp.float32, param_dtype=jnp.float32)
        sampler = nnx.split(nnx.eval_shape(lambda: Qwen2VL(unmerged, rngs=nnx.Rngs(0))))[0]
        cast = make_sampler_cast(state.params, jnp.float32)
    else:
        sampler = sampler_graphdef(model.config, jnp.float32)
        cast = make_sampler_cast(state.params, jnp.float32, lora=model.config.lora)
    update = make_train_step(graphdef, state, train)
    seen = []

    def recorded_step(state, batch, *args):  # the first call's abstract arguments, for the memory analysis
        if not seen:
            seen.append(jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                (state, batch)))
        return update(state, batch, *args)

    context = grpo_loop.RunContext(
        graphdef=graphdef, train=train, sampling=sampling, reward_fn=combine("detection", mode="paper"),
        tokenizer=tokenizer, step=recorded_step, score=make_score_fn(graphdef, state.params, train.scoring),
        reference=reference, base_score=base_score, sampler_graphdef=sampler, sampler_cast=cast)

    timer = Timer()
    key = jax.random.key(args.seed)
    result = {name: [] for name in (*PHASES, "total", "length")}
    for step in range(total):
        timer.reset()
        start = time.perf_counter()
        with timer.timed("data"):
            batch = next(batches)
        state, outcome = grpo_loop.iteration(context, state, batch, jax.random.fold_in(key, step), timer)
        seconds = time.perf_counter() - start
        metrics = jax.device_get(outcome.device)
        if not np.isfinite(float(metrics["loss"])) or float(metrics["update_skipped"]):
            raise RuntimeError(f"our step {step} skipped its update: {metrics}")
        if step == 0:
            result["warmup"] = seconds
            continue
        result["total"].append(seconds)
        result["length"].append(outcome.host["completion_length"])
        for name in PHASES:
            result[name].append(timer.seconds.get(name, 0.0))
    batches.close()
    # What the step holds: the train state and the reference between steps, and the update program's peak.
    result["held"] = sum(x.nbytes for x in jax.tree.leaves((state, reference)))
    analysis = update.lower(*seen[0]).compile().memory_analysis()
    result["update_peak"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return result


def run_trl(args, model_path: str, workdir: str, records, processor, lora: bool = False) -> dict:
    """TRL's steps: `GRPOTrainer.train()` for 1 + steps steps, each timed by a callback; with `lora` a peft
    adapter on the language model's projections (TRL's reference is then the base, the adapter disabled)."""
    import datasets
    import peft
    import torch
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from model_port.peft import target_regex
    from vrft_jax.models.qwen2_vl.lora import TARGETS
    from vrft_jax.models.qwen2_vl.processor import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID
    from vrft_jax.rewards import combine

    reward = combine("detection", mode="paper")

    def detection(completions, solution, image_hw, **kwargs):
        """Visual-RFT's detection sum (IoU + confidence + format) of each completion's text."""
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, solution, image_hw=np.asarray(image_hw)).total.tolist()

    class StepTimer(TrainerCallback):
        """Each step's seconds, and the mean completion length it logged (read before the final log clears it)."""

        def __init__(self):
            self.seconds, self.lengths, self.trainer, self._start = [], [], None, None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)
            self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])

    side = args.image_side
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.problem}]}],
         "image": Image.open(io.BytesIO(r.image)).convert("RGB"), "solution": r.solution, "image_hw": [side, side]}
        for r in records])
    total = 1 + args.steps
    config = GRPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=1.0, beta=args.beta, loss_type="grpo",
        scale_rewards="group", num_iterations=1, epsilon=0.2, use_bias_correction_kl=False,
        learning_rate=args.lora_lr if lora else args.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0,
        max_steps=total, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, bf16=False, seed=args.seed, dataloader_num_workers=0,
        # Ours never samples a vision token; TRL by default suppresses only <|image_pad|>.
        generation_kwargs={"suppress_tokens": [VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID]})
    timer = StepTimer()
    adapter = None
    if lora:  # ours' targets, anchored on the language model (the vision MLP's names collide)
        adapter = peft.LoraConfig(r=args.lora, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                  target_modules=target_regex(TARGETS))
    trainer = GRPOTrainer(model=model_path, reward_funcs=[detection], args=config, train_dataset=dataset,
                          processing_class=processor, callbacks=[timer], peft_config=adapter)
    timer.trainer = trainer
    torch.set_num_threads(os.cpu_count())
    trainer.train()
    if len(timer.seconds) != total:
        raise RuntimeError(f"TRL ran {len(timer.seconds)} steps, expected {total}")
    return {"warmup": timer.seconds[0], "seconds": timer.seconds[1:], "length": timer.lengths[1:]}


if __name__ == "__main__":
    main()
