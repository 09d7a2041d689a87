"""`python -m vrft_jax.aot` (issue 12): a whole GRPO step of a recipe compiled for a TPU slice on this CPU host,
everything a chip holds at once counted per phase against its HBM.

Needs libtpu (the `tpu` extra; the `test` extra pulls it in). The 2B lvis_fewshot compile for v4-8 takes
about 3 minutes on 2 cores, once for the module.
"""

import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPUs on this host")

from vrft_jax import aot, recipe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


@pytest.fixture(scope="module")
def lvis_2b_v4_8():
    return aot.report(recipe.load("lvis_fewshot"), "v4-8")


def test_the_2b_lvis_step_fits_a_v4_8_with_ten_percent_headroom(lvis_2b_v4_8):
    r = lvis_2b_v4_8
    print(r.text(30.0))
    assert r.slice.devices == 4 and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert set(r.programs) == {"update", "reference", "cast", "prefill", "decode"}
    assert not any(p.error for p in r.programs.values())
    assert set(r.phases) == {"cast", "rollout", "reference", "update"}
    assert r.fits and r.headroom >= 0.10, r.text()
    # The recipe sizes its buckets from its data at run time; the proof compiles the limits, which hold any data.
    assert "16 prompts x 1024 tokens and 2048 patches" in r.text() and "recipe's limits" in r.text()


def test_each_phase_counts_what_the_step_holds_at_once(lvis_2b_v4_8):
    r = lvis_2b_v4_8
    params_f32 = r.parameters * 4 / r.slice.devices
    # fp32 master weights and two AdamW moments, split over 4 chips (a few replicated scalars and biases aside)
    assert 3 * params_f32 <= r.state <= 3 * params_f32 * 1.02
    # beta 0.04: the initial weights, their matrices in the compute dtype (bf16; `train.reference_dtype`)
    assert r.reference == pytest.approx(params_f32 / 2, rel=0.02)
    # the sampler's bf16 copy is whole within each fsdp group (the sampling layout): not split over the chips
    assert r.sampler == pytest.approx(r.parameters * 2, rel=0.02)
    assert r.phases["rollout"] > r.state + r.reference + r.sampler
    # The cast's output is the sampler copy: compiled and counted, beside the state and the reference it reads.
    assert r.programs["cast"].outputs == pytest.approx(r.sampler, rel=0.01)
    assert r.phases["cast"] >= r.state + r.reference + r.sampler
    assert r.phases["update"] == r.reference + r.programs["update"].peak
    assert r.phases["reference"] == r.state + r.programs["reference"].peak


def test_the_rollout_is_compiled_as_the_run_traces_it(lvis_2b_v4_8):
    """Prefill and decode are lowered with the run's static mesh (`sampling.rollout(..., mesh=)`): prefill pins
    its outputs split over the batch axes, and decode is compiled for exactly the layout prefill produced."""
    prefill, decode = lvis_2b_v4_8.programs["prefill"].compiled, lvis_2b_v4_8.programs["decode"].compiled
    outputs = prefill.output_shardings
    assert outputs.cache.k.spec[1] == ("data", "fsdp") or outputs.cache.k.spec[1] == "fsdp"
    assert outputs.logits.spec[0] in ("fsdp", ("data", "fsdp"))
    # decode's dynamic arguments are (weights, prefilled, key); those it never reads are dropped (None)
    given = decode.input_shardings[0][1]
    assert given.cache.k == outputs.cache.k and given.logits == outputs.logits
    with_none = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: x is None)  # noqa: E731
    pairs = zip(with_none(given), with_none(outputs), strict=True)
    assert all(got is None or got == made for got, made in pairs)


def test_an_oversampled_step_counts_its_rollout_of_every_drawn_prompt():
    """collapse.oversample=k: the rollout draws k x prompts_per_step prompts, the update trains on prompts_per_step,
    so the step's model FLOPs grow by the rollout's for each further k, and nothing else changes."""
    flops = []
    for k in (1, 2, 3):
        config = recipe.load("lvis_fewshot", {"collapse.oversample": k})
        assert recipe.drawn_prompts(config) == k * config.prompts_per_step
        flops.append(aot.model_flops(recipe.build(config, check_paths=False, process_count=1), config, 2 * 10 ** 9))
    assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0]) and flops[1] > flops[0]


@pytest.mark.fit
@pytest.mark.parametrize("model", ["qwen2_5_vl_3b", "qwen3_vl_2b"])
def test_each_familys_smallest_preset_fits_its_default_slice(model):
    """One row per family beside Qwen2-VL's: the windowed vision tower (Qwen2.5-VL) and DeepStack with Qwen3's
    decoder (Qwen3-VL) compile for the recipe's default slice, within HBM with the 10% headroom the README's
    table shows."""
    from vrft_jax.configs import _common

    config = recipe.load(f"lvis_fewshot:model={model}")
    r = aot.report(config, _common.MODEL_SETTINGS[model]["slice"])
    assert not any(p.error for p in r.programs.values()) and set(r.programs) >= {"update", "prefill", "decode"}
    assert r.fits and r.headroom >= 0.10, r.text()
    assert f"{config.data.max_pixels // (_common.token_side(model) ** 2 // 4)} patches" in r.text()


@pytest.mark.fit
def test_7b_lora_fits_a_v5e_8_with_ten_percent_headroom():
    """Issue 22: the LoRA step (the frozen bf16 base, float32 rank-64 adapters and their moments, no reference
    copy: the reference scorer reads the base from the state) of 7B on the chips full fine-tuning needs a
    v5p-8 for. The sampler is sharded: each fsdp group's whole bf16 copy alone would be 15.4 GiB of 16."""
    config = recipe.load("lvis_fewshot:model=7b", {"lora.rank": 64, "train.sampler_layout": "sharded"})
    r = aot.report(config, "v5e-8")
    print(r.text(30.0))
    assert not any(p.error for p in r.programs.values()), r.text()
    assert set(r.programs) == {"update", "reference", "cast", "prefill", "decode"}
    assert r.fits and r.headroom >= 0.10, r.text()
    text = recipe.build(config, check_paths=False, process_count=1).model.text
    rank, width, q, kv = 64, text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    per_layer = rank * (2 * (width + q) + 2 * (width + kv) + 3 * (width + text.intermediate_size))
    assert r.adapters == text.num_layers * per_layer  # q, o; k, v; gate, up, down
    assert r.reference == 0 and "reference" in r.phases
    # Per chip: the bf16 base split over the 8 chips, and the float32 adapters with two AdamW moments. An adapter
    # matrix is split where it has the residual (embed) dimension: A of q/k/v/gate/up, B of o/down; the others
    # (B of q/k/v/gate/up, A of o/down) are whole on each chip (the rank axis stays whole: sharding.py).
    split = text.num_layers * rank * 7 * width
    expected = (2 * r.parameters + 12 * split) / r.slice.devices + 12 * (r.adapters - split)
    assert expected <= r.state <= expected * 1.02, (r.state, expected)
    # The reference phase adds the scorer's batch and temporaries to the state it reads, nothing copied.
    assert r.phases["reference"] < r.state + r.programs["reference"].peak


def test_an_impossible_layout_is_reported_as_not_fitting(capfd):
    """7B full fine-tuning on a v5e-4: fp32 weights and moments alone are 23 GiB of each chip's 16."""
    r = aot.report(recipe.load("lvis_fewshot:model=7b"), "v5e-4")
    assert not r.fits and r.state > 16 * GIB
    assert "DOES NOT FIT" in r.text() and "nothing compiled" in r.text()


def test_the_command_prints_the_verdict_and_exits_3_when_it_does_not_fit():
    out = subprocess.run([sys.executable, "-m", "vrft_jax.aot", "--config=lvis_fewshot:model=7b", "--topology=v5e-4"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == aot.EXIT_DOES_NOT_FIT == 3, out.stderr[-2000:]  # 2 is a bad invocation
    assert "lvis_fewshot_7b on v5e-4 (4 chips x 16 GiB)" in out.stdout and "DOES NOT FIT" in out.stdout


@pytest.mark.parametrize("name, devices, topology", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-16", 8, "v4:2x2x2"), ("v5p-8", 4, "v5p:2x2x1"), ("v5e-8", 8, "v5e:2x4"),
    ("v5e-16", 16, "v5e:4x4"), ("v6e-8", 8, "v6e:2x4")])
def test_slice_names(name, devices, topology):
    s = aot.Slice.parse(name)
    assert (s.devices, s.topology) == (devices, topology)


@pytest.mark.parametrize("name", ["v4-6", "v3-8", "v5e-3", "tpu"])
def test_unknown_slices_are_named(name):
    with pytest.raises(ValueError, match=name):
        aot.Slice.parse(name)
