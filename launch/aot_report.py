"""Ahead-of-time compile the GRPO programs for a TPU slice on this CPU host and report per-chip memory.

    pip install -e ".[tpu]"     # libtpu: compiles for TPUs without one (environment.md §7)
    python launch/aot_report.py --model 2b --topology v5e:2x4 --mesh 1,8,1
    python launch/aot_report.py --model 7b --topology v4:2x2x2 --mesh 1,8,1 --remat block

Nothing runs and no weights exist: every array is a `jax.ShapeDtypeStruct` with the real Qwen2-VL
shapes, laid out by the same rules as a real run, and XLA's TPU compiler reports what each program
needs on one chip. The programs are one GRPO step's: the sampler's prefill and decode loop (weights in
the sampler's layout), the reference model's scoring, and the update (forward, backward, AdamW).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")  # silences libtpu's host probing on a CPU machine
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_WORKER_ID", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("2b", "7b"), default="2b")
    parser.add_argument("--topology", default="v5e:2x4", help="e.g. v4:2x2x1, v5e:2x4, v5p:2x2x1")
    parser.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes (product = chips)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step, global (Visual-RFT: 16)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt G (Visual-RFT 2B: 8)")
    parser.add_argument("--prompt-len", type=int, default=1024, help="text bucket T (Visual-RFT: 1024)")
    parser.add_argument("--completion-len", type=int, default=256, help="max new tokens L (Visual-RFT: 256)")
    parser.add_argument("--patch-bucket", type=int, default=2048, help="patches per prompt (max_pixels / 196)")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--remat", default="block", choices=("none", "block", "save_dots"))
    parser.add_argument("--freeze-vision", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies

    from vrft_jax import grpo, sampling, sharding
    from vrft_jax.models.qwen2_vl import ModelInputs, Qwen2VL, Qwen2VLConfig
    from vrft_jax.optimizer import make_optimizer
    from vrft_jax.scoring import make_score_fn
    from vrft_jax.train_step import TrainBatch, TrainConfig, TrainState, make_train_step, split_params

    chip = args.topology.split(":")[0]
    # v4 chips have two TensorCores; "megacore" presents each chip as one device, as a v4 VM does.
    extra = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), num_slices=1,
                 wrap=(False, False, False)) if chip == "v4" else {}
    topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu", **extra)
    devices = topology.devices
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)

    train_config = TrainConfig(grpo=grpo.GRPOConfig.visual_rft(), param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                               remat=args.remat, micro_batches=args.micro_batches, freeze_vision=args.freeze_vision)
    preset = {"2b": Qwen2VLConfig.qwen2_vl_2b, "7b": Qwen2VLConfig.qwen2_vl_7b}[args.model]
    config = preset(param_dtype=jnp.float32, dtype=jnp.bfloat16, remat=args.remat)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    trainable, _ = split_params(params, train_config)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(params=params, opt_state=jax.eval_shape(make_optimizer(train_config).init, trainable),
                       step=scalar, nonfinite_total=scalar, nonfinite_streak=scalar)

    b, g, t, length, p = args.prompts, args.group, args.prompt_len, args.completion_len, args.patch_bucket
    sds = jax.ShapeDtypeStruct
    inputs = ModelInputs(input_ids=sds((b, t), jnp.int32), attention_mask=sds((b, t), jnp.int32),
                         positions=sds((b, t, 3), jnp.int32), rope_deltas=sds((b,), jnp.int32),
                         patches=sds((b, p, config.vision.patch_dim), jnp.float32),
                         patch_segment_ids=sds((b, p), jnp.int32), patch_positions=sds((b, p, 2), jnp.int32))
    batch = TrainBatch(inputs=inputs, completions=sds((b * g, length), jnp.int32),
                       completion_mask=sds((b * g, length), jnp.int32), advantages=sds((b * g,), jnp.float32),
                       ref_logprobs=sds((b * g, length), jnp.float32))

    rows = []

    def report(name, compiled):
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        rows.append((name, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                     m.temp_size_in_bytes, peak))

    step = make_train_step(graphdef, state, train_config, mesh=mesh)
    report("update (fwd+bwd+AdamW)", step.lower(state, batch).compile())
    bf16_params = jax.tree.map(lambda x: sds(x.shape, jnp.bfloat16), params)
    score = make_score_fn(graphdef, bf16_params, train_config, mesh=mesh)
    report("reference logprobs (bf16)", score.lower(bf16_params, batch).compile())

    sampler_config = sampling.SamplingConfig(max_new_tokens=length, group_size=g, top_k=50).resolve(config)
    sampler_graphdef, sampler_params = nnx.split(nnx.eval_shape(
        lambda: Qwen2VL(config.replace(param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))))
    weight_shardings = sharding.state_shardings(sampler_params, mesh, sharding.SAMPLING_RULES)
    placed = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), sampler_params, weight_shardings)
    placed_inputs = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)),
                                 inputs)
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):
        prefill = sampling.prefill.lower(sampler_graphdef, placed, placed_inputs, sampler_config).compile()
        report("sampler prefill (bf16)", prefill)
        prefilled = jax.eval_shape(lambda s, i: sampling.prefill(sampler_graphdef, s, i, sampler_config), placed,
                                   placed_inputs)
        prefilled = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=sharding.batch_sharding(
            mesh, x.ndim, batch_axis=1 if x.ndim == 5 else 0) if x.ndim else None), prefilled)
        decode = sampling.decode.lower(sampler_graphdef, placed, prefilled, key, sampler_config).compile()
        report("sampler decode loop (bf16)", decode)

    gib = 1024 ** 3
    hbm = HBM_GIB.get(chip)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"Qwen2-VL-{args.model.upper()} ({count / 1e9:.2f}B parameters) on {args.topology} ({len(devices)} chips,"
          f" {hbm} GiB HBM each), mesh data={data} fsdp={fsdp} tensor={tensor}")
    print(f"step: {b} prompts x G={g}, prompt bucket {t}, {length} new tokens, {p} patches per prompt; fp32 master"
          f" weights, bf16 compute, remat={args.remat}, micro_batches={args.micro_batches}"
          f"{', vision frozen' if args.freeze_vision else ''}")
    print(f"{'program':30s}{'arguments':>11s}{'outputs':>10s}{'aliased':>10s}{'temp':>10s}{'peak/chip':>11s}")
    for name, arg, out, alias, temp, peak in rows:
        print(f"{name:30s}{arg / gib:>10.2f}G{out / gib:>9.2f}G{alias / gib:>9.2f}G{temp / gib:>9.2f}G"
              f"{peak / gib:>10.2f}G" + ("" if hbm is None else "  fits" if peak < hbm * gib else "  DOES NOT FIT"))


if __name__ == "__main__":
    main()
