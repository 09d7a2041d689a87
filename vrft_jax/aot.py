"""`python -m vrft_jax.aot --config=NAME[:ARG] --topology=v4-8`: will one GRPO step of a recipe fit a TPU slice?

Compiles the recipe's real programs for the slice on this CPU host with libtpu (`pip install -e ".[tpu]"`):
real shapes, its mesh and micro-batches, no weights. The abstract train state is `jax.eval_shape` of the run's
own `init_state`, laid out by the rules the run uses. Then it counts what lives on one chip in each phase of
a step, as `grpo_loop.iteration` holds it:

    cast       train state + reference weights + the sampler cast (its output copy and temporaries)
    rollout    train state + reference weights + the sampler's copy + prefill or decode (KV cache, temporaries)
    reference  train state + reference weights + the scorer's batch and temporaries (beta > 0 only)
    update     reference weights + the update (the donated state, batch, gradients, temporaries)

With LoRA (the recipe's `lora.rank`) the train state is the frozen base in `lora.base_dtype` plus the adapters
and their optimizer state; there are no reference weights (the reference is the base, read from the state by
the base structure's scorer), and the sampler cast merges the adapters into its copy.

The programs are the run's own, traced as the run traces them: the sampler cast with its output layout, the
rollout's prefill and decode on the mesh under the sampler layout's rules (`sampling.traced_on`), decode
compiled for the layout prefill's compiled outputs have; the reference weights in `train.reference_dtype`.

and prints each against the chip's HBM with the headroom, and the FLOPs of a step with the MFU that a given
step time (`--step_seconds`) implies. A phase that does not fit is reported as such, with its numbers; so is
a state too big for the slice before any compile, and a program XLA refuses for lack of memory.

Topologies: v4-N and v5p-N (N TensorCores, two per chip, one device per chip), v5e-N and v6e-N (N chips).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence

# libtpu probes for a TPU host at import; these tell it there is none to find (environment.md §7). Compiling
# ahead of time touches no chip, so several processes may load libtpu at once (its lockfile guards real chips).
for _name, _value in (("TPU_ACCELERATOR_TYPE", "v4-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_name, _value)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from vrft_jax import cli, recipe, sampling, sharding  # noqa: E402
from vrft_jax.data.buckets import resolve_patch_bucket  # noqa: E402
from vrft_jax.models.qwen2_vl.inputs import ModelInputs  # noqa: E402
from vrft_jax.models.qwen2_vl.model import Qwen2VL, base_graphdef  # noqa: E402
from vrft_jax.placement import placements  # noqa: E402
from vrft_jax.scoring import make_score_fn  # noqa: E402
from vrft_jax.train_step import TrainBatch, base_params, init_state, make_train_step, reference_dtypes  # noqa: E402

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: HBM per device, peak dense bf16 FLOP/s per device, TensorCores per device."""

    name: str
    hbm_gib: float
    peak_tflops: float
    cores_per_device: int


CHIPS = {  # Google Cloud's published per-chip figures
    "v4": Chip("v4", 32, 275, 2),
    "v5e": Chip("v5e", 16, 197, 1),
    "v5p": Chip("v5p", 95, 459, 2),
    "v6e": Chip("v6e", 32, 918, 1),
}
# devices -> physical shape (2D for v5e/v6e, 3D for v4/v5p)
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    devices: int
    topology: str  # get_topology_desc's name

    @classmethod
    def parse(cls, name: str) -> Slice:
        match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
        if not match:
            raise ValueError(f"topology {name!r} is not GENERATION-N, e.g. v4-8, v5e-16, v5p-8, v6e-8")
        chip = CHIPS[match.group(1)]
        cores = int(match.group(2))
        if cores % chip.cores_per_device:
            raise ValueError(f"{name}: a {chip.name} slice counts {chip.cores_per_device} TensorCores per chip")
        devices = cores // chip.cores_per_device
        shapes = SHAPES_3D if chip.cores_per_device == 2 else SHAPES_2D
        if devices not in shapes:
            raise ValueError(f"{name}: {devices} chips; known sizes: {sorted(shapes)} chips")
        return cls(name, chip, devices, f"{chip.name}:{shapes[devices]}")

    def tpu_devices(self):
        from jax.experimental import topologies

        extra = {}
        if self.chip.cores_per_device == 2:  # one device per chip ("megacore"), as a v4 / v5p VM presents it
            x, y, z = (int(v) for v in self.topology.split(":")[1].split("x"))
            extra = dict(chip_config_name="megacore", chips_per_host_bounds=(min(x, 2), min(y, 2), 1), num_slices=1,
                         wrap=(False, False, False))
        return topologies.get_topology_desc(topology_name=self.topology, platform="tpu", **extra).devices


def shard_bytes(tree, shardings=None) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs or arrays) under its (or the given) shardings."""
    leaves = jax.tree.leaves(tree)
    layouts = jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]
    total = 0
    for x, layout in zip(leaves, layouts):
        shape = layout.shard_shape(x.shape) if layout is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Program:
    name: str
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    error: str | None = None
    compiled: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def measure(name: str, lower) -> Program:
    """Compile `lower()` and read XLA's memory analysis; a compile XLA refuses for memory (RESOURCE_EXHAUSTED) is
    reported as such, any other failure raised."""
    try:
        compiled = lower().compile()
    except Exception as e:  # XLA's RESOURCE_EXHAUSTED arrives as a JaxRuntimeError or XlaRuntimeError
        if "RESOURCE_EXHAUSTED" in str(e):
            return Program(name, error=str(e).splitlines()[0][:300])
        raise
    m = compiled.memory_analysis()
    return Program(name, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, compiled=compiled)


@dataclasses.dataclass
class Report:
    recipe: str
    slice: Slice
    mesh: dict[str, int]
    micro_batches: int
    parameters: int  # the model's, adapters left out
    state: int  # bytes per chip
    reference: int
    sampler: int
    programs: dict[str, Program]
    phases: dict[str, int]  # phase -> bytes per chip live at its peak
    step_flops: float  # model FLOPs per chip (`model_flops`)
    note: str = ""
    shapes: str = ""  # the batch's buckets
    adapters: int = 0  # LoRA parameters (trained alone), 0 without LoRA

    @property
    def hbm(self) -> int:
        return int(self.slice.chip.hbm_gib * GIB)

    @property
    def peak(self) -> int:
        return max(self.phases.values()) if self.phases else self.state + self.reference

    @property
    def fits(self) -> bool:
        return not any(p.error for p in self.programs.values()) and self.peak <= self.hbm

    @property
    def headroom(self) -> float:
        return 1 - self.peak / self.hbm

    def mfu(self, step_seconds: float) -> float:
        return self.step_flops / (step_seconds * self.slice.chip.peak_tflops * 1e12)

    def text(self, step_seconds: float | None = None) -> str:
        g = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
        lines = [f"{self.recipe} on {self.slice.name} ({self.slice.devices} chips x {self.slice.chip.hbm_gib:g} GiB), "
                 f"mesh {self.mesh}, micro_batches {self.micro_batches}, {self.parameters / 1e9:.2f}B parameters"
                 + (f" + {self.adapters / 1e6:.1f}M LoRA parameters (the only ones trained)" if self.adapters else ""),
                 f"  per chip: train state {g(self.state)}, reference weights {g(self.reference)}, "
                 f"sampler weights {g(self.sampler)}"]
        if self.shapes:
            lines.append(f"  batch: {self.shapes}")
        for p in self.programs.values():
            lines.append(f"  {p.name:22s} " + (f"NOT COMPILED: {p.error}" if p.error else
                                                f"arguments {g(p.arguments)} outputs {g(p.outputs)} aliased "
                                                f"{g(p.aliased)} temporaries {g(p.temporaries)} peak {g(p.peak)}"))
        for phase, live in self.phases.items():
            lines.append(f"  phase {phase:10s} {g(live)} of {g(self.hbm)}  ({1 - live / self.hbm:+.0%} headroom)")
        verdict = (f"FITS with {self.headroom:.0%} headroom" if self.fits else "DOES NOT FIT")
        lines.append(f"  whole step: peak {g(self.peak)} per chip -> {verdict}"
                     + (f" ({self.note})" if self.note else ""))
        if self.step_flops:
            lines.append(f"  {self.step_flops / 1e12:.1f} model TFLOP per chip per step"
                         + (f"; at {step_seconds:g} s per step: MFU {self.mfu(step_seconds):.1%}"
                            if step_seconds else ""))
        return "\n".join(lines)


def _image_features_spec(model_config, batch: int, patches: int, dtype, batch_layout):
    """What `Qwen2VL.image_features` returns for a batch: [B, M, D], with DeepStack (Qwen3-VL) also [B, K, M, D]."""
    merged, width = patches // model_config.vision.merge_tokens, model_config.text.hidden_size
    features = _spec((batch, merged, width), dtype, batch_layout(3))
    layers = len(model_config.vision.deepstack_visual_indexes)
    return (features, _spec((batch, layers, merged, width), dtype, batch_layout(4))) if layers else features


def _spec(shape, dtype, layout=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=layout)


def report(config, topology: str) -> Report:
    """Compile `config`'s step for `topology` and count each phase's live bytes per chip (module docstring)."""
    target = Slice.parse(topology)
    devices = target.tpu_devices()
    settings = recipe.build(config, process_count=1, check_paths=False)
    mesh = recipe.make_mesh(config, devices=devices)
    train = settings.train
    rules = sharding.DEFAULT_RULES

    # The run's own constructors, traced: nothing is allocated.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(settings.model, rngs=nnx.Rngs(0))))
    state = jax.eval_shape(lambda: init_state(Qwen2VL(settings.model, rngs=nnx.Rngs(0)), train, mesh=mesh)[1])
    layouts = placements(state, mesh, rules)
    state = jax.tree.map(lambda x, s: _spec(x.shape, x.dtype, s), state, layouts)
    params = state.params
    state_bytes = shard_bytes(state)
    reference = jax.tree.map(lambda x, dtype: _spec(x.shape, dtype, x.sharding), params,
                             reference_dtypes(params, train))  # `reference_weights`, abstract
    reference_bytes = shard_bytes(reference) if train.grpo.beta > 0 and not train.lora else 0
    cast = sampling.make_sampler_cast(params, settings.sampler_dtype, mesh, settings.sampling.layout,
                                      lora=settings.model.lora)
    sampler_params = jax.eval_shape(cast, params)  # laid out by the cast's out_shardings
    sampler_bytes = shard_bytes(sampler_params)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    parameters = count(base_params(params))
    result = Report(recipe=config.name, slice=target, mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
                    micro_batches=train.micro_batches, parameters=parameters, state=state_bytes,
                    reference=reference_bytes, sampler=sampler_bytes, programs={}, phases={}, step_flops=0.0,
                    adapters=count(params) - parameters)
    if state_bytes + reference_bytes > result.hbm:
        result.note = "the train state and reference weights alone exceed the chip's HBM: nothing compiled"
        return result

    model_config, data = settings.model, settings.data
    b, g, t = config.prompts_per_step, settings.sampling.group_size, data.max_prompt_len
    length = settings.sampling.max_new_tokens
    p = resolve_patch_bucket(data, model_config)
    result.shapes = (f"{b} prompts x {t} tokens and {p} patches, {g} completions x {length} tokens each"
                     + (f" (the rollout draws {recipe.drawn_prompts(config)} prompts: collapse.oversample)"
                        if recipe.drawn_prompts(config) != b else "")
                     + ("; the buckets are the recipe's limits, which hold any dataset (a run sizes them from its "
                        "data: data.buckets='data')" if data.buckets == "data" else ""))
    batch_layout = lambda ndim: sharding.batch_sharding(mesh, ndim, rules=rules)  # noqa: E731
    patch_dtype = jnp.dtype(data.patch_dtype)

    def inputs_of(b):
        return ModelInputs(
            input_ids=_spec((b, t), jnp.int32, batch_layout(2)),
            attention_mask=_spec((b, t), jnp.int32, batch_layout(2)),
            positions=_spec((b, t, 3), jnp.int32, batch_layout(3)), rope_deltas=_spec((b,), jnp.int32, batch_layout(1)),
            patches=_spec((b, p, model_config.vision.patch_dim), patch_dtype, batch_layout(3)),
            patch_segment_ids=_spec((b, p), jnp.int32, batch_layout(2)),
            patch_positions=_spec((b, p, 2), jnp.int32, batch_layout(3)))

    inputs = inputs_of(b)  # the update's prompts; the rollout's are the drawn ones (collapse.oversample)
    drawn = recipe.drawn_prompts(config)
    rollout_inputs = inputs if drawn == b else inputs_of(drawn)
    rows = b * g
    completions = _spec((rows, length), jnp.int32, batch_layout(2))
    batch = TrainBatch(inputs=inputs, completions=completions, completion_mask=completions,
                       advantages=_spec((rows,), jnp.float32, batch_layout(1)),
                       ref_logprobs=(_spec((rows, length), jnp.float32, batch_layout(2)) if train.grpo.beta > 0
                                     else None),
                       old_logprobs=(_spec((rows, length), jnp.float32, batch_layout(2))
                                     if train.num_iterations > 1 else None),
                       sampled_logprobs=_spec((rows, length), jnp.float32, batch_layout(2)),  # the mismatch
                       image_features=_image_features_spec(model_config, b, p, settings.sampler_dtype, batch_layout)
                       if train.freeze_vision else None)

    programs = result.programs
    step = make_train_step(graphdef, state, train, mesh=mesh)
    programs["update"] = measure("update", lambda: step.lower(state, batch))
    if train.grpo.beta > 0 and train.lora:  # the base structure on the state's frozen parameters
        base = base_params(params)
        score = make_score_fn(base_graphdef(model_config), base, train.scoring, micro_batches=train.micro_batches,
                              mesh=mesh)
        programs["reference"] = measure("reference scoring", lambda: score.lower(base, batch.scored()))
    elif train.grpo.beta > 0:
        score = make_score_fn(graphdef, params, train.scoring, micro_batches=train.micro_batches, mesh=mesh)
        programs["reference"] = measure("reference scoring", lambda: score.lower(reference, batch.scored()))
    programs["cast"] = measure("sampler cast", lambda: cast.lower(params))
    # The rollout's two programs with the run's static arguments (`sampling.rollout`): its mesh and layout rules.
    sampler_config = settings.sampling.resolve(model_config)
    sampler_graphdef = sampling.sampler_graphdef(model_config, settings.sampler_dtype)
    key = jax.eval_shape(lambda: jax.random.key(0))
    programs["prefill"] = measure("sampler prefill", lambda: sampling.prefill.lower(
        sampler_graphdef, sampler_params, rollout_inputs, sampler_config, mesh.abstract_mesh))
    prefilled = jax.eval_shape(lambda s, i: sampling.prefill(sampler_graphdef, s, i, sampler_config,
                                                             mesh.abstract_mesh), sampler_params, rollout_inputs)
    if programs["prefill"].compiled is not None:  # decode reads what prefill's compiled program lays out
        prefilled = jax.tree.map(lambda x, layout: _spec(x.shape, x.dtype, layout), prefilled,
                                 programs["prefill"].compiled.output_shardings)
    programs["decode"] = measure("sampler decode loop", lambda: sampling.decode.lower(
        sampler_graphdef, sampler_params, prefilled, key, sampler_config, mesh.abstract_mesh))

    def working(name, other_arguments):  # a program's live bytes besides the weights it reads
        program = programs[name]
        return program.outputs - program.aliased + program.temporaries + other_arguments

    # Live per phase: what grpo_loop.iteration holds at once. The sampler copy is counted whole: XLA drops
    # the arguments a program does not read (the decode loop never reads the vision tower), but the copy
    # lives through the rollout all the same. The scorer's and the update's arguments are the reference
    # weights and the donated state, which they read whole.
    result.phases["cast"] = state_bytes + reference_bytes + working("cast", 0)
    result.phases["rollout"] = state_bytes + reference_bytes + sampler_bytes + max(
        working("prefill", shard_bytes(rollout_inputs)), working("decode", shard_bytes(prefilled)))
    if "reference" in programs and train.lora:  # its weights are the state's: counted once
        result.phases["reference"] = state_bytes + working("reference", shard_bytes(batch.scored()))
    elif "reference" in programs:
        result.phases["reference"] = state_bytes + programs["reference"].peak
    result.phases["update"] = reference_bytes + programs["update"].peak
    result.step_flops = model_flops(settings, config, parameters) / target.devices
    return result


def model_flops(settings, config, parameters: int) -> float:
    """A step's model FLOPs, the convention of MFU: 2 per parameter per token a program reads forward, 6 per
    trained token (forward and backward). The decoder's parameters count for every prompt and completion
    token, the LM head's (the embedding table when tied) only where logits are taken (each prompt's last
    token in the rollout's prefill, every completion token), the vision tower's for patches, and not in
    scoring and the update with `train.freeze_vision` (they reuse the rollout's features). With LoRA the
    update's backward pass takes no gradient of the frozen weights: 4 per trained token, not 6 (the adapters'
    own FLOPs are not counted). Attention's
    quadratic term and remat's recomputation are not counted, so the MFU is a lower bound of the hardware's use."""
    text, train = settings.model.text, settings.train
    head = text.vocab_size * text.hidden_size
    vision = _vision_parameters(settings.model)
    decoder = parameters - vision - head * (1 if settings.model.tie_word_embeddings else 2)  # embedding (a gather)

    b, g = config.prompts_per_step, settings.sampling.group_size
    factor = recipe.drawn_prompts(config) // b  # the rollout draws oversample x the update's prompts
    completions = b * g * settings.sampling.max_new_tokens
    tower = 2 * vision * b * resolve_patch_bucket(settings.data, settings.model)
    prompts = 2 * decoder * b * settings.data.max_prompt_len
    rollout = factor * (tower + prompts + 2 * head * b + 2 * (decoder + head) * completions)
    scoring = (0 if train.freeze_vision else tower) + prompts + 2 * (decoder + head) * completions
    reference = scoring if train.grpo.beta > 0 else 0
    old_policy = scoring if train.num_iterations > 1 else 0
    update = (2 if train.lora else 3) * scoring * train.num_iterations
    return float(rollout + reference + old_policy + update)


def _vision_parameters(model_config) -> int:
    abstract = nnx.eval_shape(lambda: Qwen2VL(model_config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract.visual, nnx.Param)))


# ------------------------------------------------------------------------------------------------ CLI


EXIT_DOES_NOT_FIT = 3  # the verdict; 2 (cli.EXIT_USER_ERROR) is a bad invocation, as for every command


def main(argv: Sequence[str]) -> None:
    del argv
    config = flags.FLAGS.config
    try:
        Slice.parse(flags.FLAGS.topology)
    except ValueError as e:
        raise cli.UserError(f"--topology={flags.FLAGS.topology}: {e}") from None
    if importlib.util.find_spec("libtpu") is None:
        raise cli.UserError("aot compiles with libtpu, which is not installed: pip install -e '.[tpu]'")
    cli.choose_platform()  # this host's backend; the slice's programs are compiled by libtpu whatever it is
    result = report(config, flags.FLAGS.topology)
    print(result.text(flags.FLAGS.step_seconds), flush=True)
    if not result.fits:
        sys.exit(EXIT_DOES_NOT_FIT)


def run(argv: Sequence[str] | None = None) -> None:
    recipe.define_flags()
    flags.DEFINE_string("topology", None, "(required) the TPU slice: v4-N, v5e-N, v5p-N, v6e-N", required=True)
    flags.DEFINE_float("step_seconds", None, "a step time, for the MFU it implies")
    argv, verbose = cli.strip_verbose(argv or sys.argv)
    app.run(cli.guard(main, verbose=verbose), argv=argv, flags_parser=recipe.parse_flags)


if __name__ == "__main__":
    run()
