"""LoRA: our adapters equal PEFT's on transformers' models (logits and adapter gradients, every family), start as
the base model bit for bit, round-trip through PEFT's directory format both ways, merge to base + scale * B A,
and train alone: a LoRA GRPO step moves only the adapters, holds optimizer state for them only, and scores the
reference with the base model (adapters disabled) bit for bit.

Tolerances (max|ours - ref| / max|ref|, float32): the logits' is the model parity's `TOLERANCE` (2e-5, its
derivation in test_model_parity.py); an adapter adds two rank-r matmuls per projection, a handful of roundings
against the hundreds of the base path. The adapter gradients' is twice it: a backward pass rounds once per
forward matmul again (its transposed products), so its rounding budget is the forward's doubled.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from grpo.conftest import train_batch
from hf_reference import TINY_CONFIGS, mixed_batch, random_hf_model
from model_port import peft as peft_port
from model_port.flax_to_hf import save_hf
from model_port.hf_to_flax import load_hf
from model_port.mapping import canonical_name
from vrft_jax import grpo, model_dir
from vrft_jax import train_step as ts
from vrft_jax.models import forward_hf
from vrft_jax.models.qwen2_vl import ModelInputs
from vrft_jax.models.qwen2_vl import lora as lora_module
from vrft_jax.models.qwen2_vl.lora import TARGETS, LoRAConfig
from vrft_jax.models.qwen2_vl.model import base_graphdef, merge_lora, with_config, with_lora, without_lora
from vrft_jax.optimizer import OptimizerConfig
from vrft_jax.scoring import ScoringConfig, make_score_fn

TOLERANCE = 2e-5
GRAD_TOLERANCE = 2 * TOLERANCE
RANK, ALPHA = 4, 8.0


def relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=lambda t: t.name)
def family(request, tmp_path_factory):
    """(tiny, HF base model, our base converted from its checkpoint, PEFT model with random A and B, its
    directory, our model with those adapters imported through `model_port.peft`)."""
    tiny = request.param
    hf = random_hf_model(tiny, seed=1)
    root = tmp_path_factory.mktemp(tiny.name)
    hf.save_pretrained(root / "hf")
    base = load_hf(str(root / "hf"))
    torch.manual_seed(2)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=peft_port.target_regex(TARGETS),
                             init_lora_weights=False)  # B random too: the adapters change every logit
    peft_model = peft.get_peft_model(random_hf_model(tiny, seed=1), config).eval()
    peft_model.save_pretrained(root / "peft")
    peft_port.import_peft(str(root / "peft"), base.config, str(root / "adapters"))
    ours = model_dir.load_adapters(str(root / "adapters"), base)
    return tiny, hf, base, peft_model, root, ours


@pytest.mark.parity
def test_logits_and_adapter_gradients_match_peft(family):
    tiny, _, _, peft_model, _, ours = family
    assert ours.config.lora == LoRAConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    batch = mixed_batch(tiny, seed=3)
    valid = batch.attention_mask.astype(bool)
    peft_model.zero_grad()
    ref = peft_model(**batch.torch(tiny.image_token_id)).logits
    weights = np.random.default_rng(0).normal(size=ref.shape).astype(np.float32) * valid[..., None]
    (ref * torch.from_numpy(weights)).sum().backward()
    ref = ref.detach().numpy()
    logits = np.asarray(forward_hf(ours, **batch.numpy()))
    assert relative_error(logits[valid], ref[valid]) <= TOLERANCE
    with torch.no_grad(), peft_model.disable_adapter():  # the adapters matter: far more than the bound
        assert relative_error(peft_model(**batch.torch(tiny.image_token_id)).logits.numpy()[valid], ref[valid]) > 0.1

    inputs = ModelInputs.from_hf(ours.config, **batch.numpy())
    graphdef, adapters, rest = nnx.split(ours, nnx.LoRAParam, ...)
    grads = jax.grad(lambda a: jnp.sum(nnx.merge(graphdef, a, rest)(inputs) * weights))(adapters)
    # Our gradients in PEFT's names and layouts, through the exporter (whose layout the next test checks).
    ours_dir = family[4] / "grads"
    peft_port.to_peft(dict(nnx.to_flat_state(grads)), ours.config, str(ours_dir))
    ours_grads = load_file(os.path.join(ours_dir, peft_port.WEIGHTS_FILE))
    ref_grads = {name.replace(".default.", "."): p.grad.numpy() for name, p in peft_model.named_parameters()
                 if p.requires_grad}
    assert sorted(ours_grads) == sorted(ref_grads)
    assert len(ref_grads) == 2 * len(TARGETS) * tiny.hf["text_config"]["num_hidden_layers"]
    for name, ref_grad in ref_grads.items():
        assert relative_error(ours_grads[name], ref_grad) <= GRAD_TOLERANCE, name


def test_fresh_adapters_give_the_base_models_logits_bit_for_bit(family):
    tiny, _, base, _, _, _ = family
    model = with_lora(base, LoRAConfig(rank=RANK, alpha=ALPHA), seed=5)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert all(np.abs(np.asarray(v.get_raw_value())).max() > 0 for p, v in nnx.to_flat_state(adapters) if p[-1] == "a")
    assert all(not np.asarray(v.get_raw_value()).any() for p, v in nnx.to_flat_state(adapters) if p[-1] == "b")
    batch = mixed_batch(tiny, seed=3).numpy()
    np.testing.assert_array_equal(np.asarray(forward_hf(model, **batch)), np.asarray(forward_hf(base, **batch)))
    # and the base under a LoRA model is the base, its buffers shared
    np.testing.assert_array_equal(np.asarray(forward_hf(without_lora(model), **batch)),
                                  np.asarray(forward_hf(base, **batch)))


@pytest.mark.parity
def test_the_peft_export_loads_in_peft_and_gives_our_logits(family, tmp_path):
    tiny, _, base, _, _, ours = family
    model = with_lora(base, LoRAConfig(rank=RANK, alpha=ALPHA, targets=("q_proj", "v_proj", "down_proj")), seed=3)
    # B random: an export of zeros would prove nothing. At 0.1 the adapters move every logit by O(1) (asserted
    # below); much larger ones make a different random model of each family, whose rounding the Qwen2.5-VL tiny
    # amplifies past the bound as test_model_parity.py describes (at 0.3: 3.0e-5; the base alone: 1.1e-5).
    adapters = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(9), 64))
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), adapters))
    model_dir.save_adapters(model, str(tmp_path / "adapters"))
    peft_port.main(["peft", "export", "--adapters", str(tmp_path / "adapters"), "--out", str(tmp_path / "peft")])
    loaded = peft.PeftModel.from_pretrained(random_hf_model(tiny, seed=1), str(tmp_path / "peft")).eval()
    batch = mixed_batch(tiny, seed=3)
    with torch.no_grad():
        ref = loaded(**batch.torch(tiny.image_token_id)).logits.numpy()
    valid = batch.attention_mask.astype(bool)
    assert relative_error(np.asarray(forward_hf(model, **batch.numpy()))[valid], ref[valid]) <= TOLERANCE
    assert relative_error(np.asarray(forward_hf(base, **batch.numpy()))[valid], ref[valid]) > 0.1
    # Qwen2.5-VL's vision MLP has gate/up/down projections too: none of them took an adapter
    vision = [name for name, _ in loaded.named_modules() if "visual" in name and name.endswith("lora_A")]
    assert vision == []


def test_the_merged_model_is_base_plus_scaled_ba_and_exports_as_peft_merges(family, tmp_path):
    tiny, _, base, _, _, ours = family
    merged = merge_lora(ours)
    assert merged.config.lora is None
    flat, merged_flat = dict(nnx.to_flat_state(nnx.state(ours))), dict(nnx.to_flat_state(nnx.state(merged)))
    scale = ALPHA / RANK
    for target in ("q", "o", "down"):
        block = "attn" if target in ("q", "o") else "mlp"
        path = ("text", "layers", block, f"{target}_kernel")
        a = np.asarray(flat[path[:-1] + (f"{target}_lora", "a")].get_raw_value(), np.float64)
        b = np.asarray(flat[path[:-1] + (f"{target}_lora", "b")].get_raw_value(), np.float64)
        w = np.asarray(flat[path].get_raw_value(), np.float64)
        layers, rank = a.shape[0], a.shape[-1]
        exact = w + scale * np.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1)).reshape(w.shape)
        got = np.asarray(merged_flat[path].get_raw_value(), np.float64)
        # float32: r products, their sum and one addition, each rounded once (r + 2 unit roundoffs of the largest)
        assert np.max(np.abs(got - exact)) <= (RANK + 2) * 2 ** -24 * np.max(np.abs(exact)), target
    # Every other parameter is the base's, bit for bit.
    for path, variable in merged_flat.items():
        if not path[-1].endswith("_kernel") or path[1] != "layers":
            np.testing.assert_array_equal(np.asarray(variable.get_raw_value()), np.asarray(flat[path].get_raw_value()))
    # The HF export of the merged model equals PEFT's own merge, tensor for tensor.
    save_hf(merged, str(tmp_path / "merged"))
    exported = {}
    for name in os.listdir(tmp_path / "merged"):
        if name.endswith(".safetensors"):
            exported.update(load_file(str(tmp_path / "merged" / name)))
    fresh = peft.PeftModel.from_pretrained(random_hf_model(tiny, seed=1), str(family[4] / "peft"))
    with torch.no_grad():
        canonical = {canonical_name(k): v.numpy() for k, v in fresh.merge_and_unload().state_dict().items()}
    checked = 0
    for name, tensor in exported.items():
        ref = canonical[canonical_name(name)]
        assert np.max(np.abs(tensor - ref)) <= (RANK + 2) * 2 ** -24 * np.max(np.abs(ref)), name
        checked += 1
    assert checked == len(exported)


# ----------------------------------------------------------------------------------------------- training

G, L = 2, 8
CONFIG = ts.TrainConfig(grpo=grpo.GRPOConfig.trl("grpo", beta=0.04), lora=True, frozen_dtype="bfloat16",
                        optimizer=OptimizerConfig(learning_rate=0.1), scoring=ScoringConfig(chunk_size=3))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The GRPO tests' tiny Qwen2-VL (GQA, untied head), random."""
    directory = tmp_path_factory.mktemp("policy")
    random_hf_model(TINY_CONFIGS[0], seed=21).save_pretrained(directory)
    return load_hf(str(directory))


@pytest.fixture(scope="module")
def lora_policy(policy):
    """`policy` with fresh adapters whose B is non-zero (a trained policy's)."""
    model = with_lora(policy, LoRAConfig(rank=RANK, alpha=ALPHA), seed=0)
    keys = iter(jax.random.split(jax.random.key(4), 64))
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                   nnx.state(model, nnx.LoRAParam)))
    return model


def test_a_lora_step_moves_only_the_adapters_and_the_reference_is_the_base_bit_for_bit(lora_policy, policy):
    graphdef, state = ts.init_state(lora_policy, CONFIG)
    params = {p: v.get_raw_value() for p, v in nnx.to_flat_state(state.params)}
    # The base is stored in bfloat16, the adapters in float32; Adam's moments exist for the adapters only.
    assert {str(v.dtype) for p, v in params.items() if p[-2].endswith("_lora")} == {"float32"}
    assert {str(v.dtype) for p, v in params.items() if not p[-2].endswith("_lora") and v.ndim >= 2} == {"bfloat16"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) >= 2]
    adapters = [v for p, v in params.items() if p[-2].endswith("_lora")]
    assert sorted(m.shape for m in moments) == sorted([a.shape for a in adapters] * 2)

    base_before = {p: np.asarray(v) for p, v in params.items() if not p[-2].endswith("_lora")}
    adapters_before = {p: np.asarray(v) for p, v in params.items() if p[-2].endswith("_lora")}
    batch = train_batch(lora_policy.config, G, L)
    base_score = make_score_fn(base_graphdef(lora_policy.config), ts.base_params(state.params), CONFIG.scoring)
    reference = base_score(ts.base_params(state.params), batch.scored())
    # The base model itself (no adapters ever added), in the frozen dtype: the same logprobs, bit for bit.
    base_model = ts.prepare_model(policy, CONFIG.replace(lora=False, frozen_dtype=None, param_dtype="bfloat16",
                                                        compute_dtype="float32"))
    base_alone = make_score_fn(*nnx.split(base_model), CONFIG.scoring)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(base_alone(nnx.state(base_model), batch.scored())))

    step = ts.make_train_step(graphdef, state, CONFIG)
    state, metrics = step(state, batch.replace(ref_logprobs=reference))
    assert float(metrics["update_skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    after = {p: np.asarray(v.get_raw_value()) for p, v in nnx.to_flat_state(state.params)}
    for path, value in base_before.items():
        assert after[path].dtype == value.dtype
        assert np.array_equal(after[path].view(np.uint8), value.view(np.uint8)), f"base parameter {path} moved"
    assert all(not np.array_equal(after[p], v) for p, v in adapters_before.items()), "an adapter did not move"
    # The checkpointed part is the adapters and their optimizer state alone, and restores onto a fresh base.
    saved = ts.checkpointed(state, CONFIG)
    assert {p[-2].endswith("_lora") for p, _ in nnx.to_flat_state(saved.params)} == {True}
    _, fresh = ts.init_state(lora_policy, CONFIG)
    back = ts.restored(fresh, saved, CONFIG)
    for path, variable in nnx.to_flat_state(back.params):
        np.testing.assert_array_equal(np.asarray(variable.get_raw_value()), after[path])


def test_adapter_dropout_drops_its_input_survivors_scaled_each_layer_and_projection_its_own_mask():
    """PEFT's lora_dropout: the adapter computes scale * (dropout(x) A) B, survivors scaled by 1 / (1 - p), inside
    `dropout_key` only. With A = B = I the delta shows the mask itself."""
    p, rank = 0.25, 16
    lora = LoRAConfig(rank=rank, alpha=float(rank), dropout=p)  # scale 1
    make = lambda name: lora_module.Adapter(name, (rank,), ("embed",), (rank,), ("mlp",), lora,  # noqa: E731
                                            rngs=nnx.Rngs(0))
    q, k = make("q_proj"), make("k_proj")
    for adapter in (q, k):
        adapter.a[...], adapter.b[...] = jnp.eye(rank), jnp.eye(rank)
    x = jnp.ones((64, rank), jnp.float32)
    spec = "BD,DF->BF"
    np.testing.assert_array_equal(q(spec, x, jnp.float32), x)  # off outside the context
    with lora_module.dropout_key(jax.random.key(7)):
        dropped = np.asarray(q(spec, x, jnp.float32))
        other_projection = np.asarray(k(spec, x, jnp.float32))
        with lora_module.layer_scope(jnp.int32(1)):
            layer_1 = np.asarray(q(spec, x, jnp.float32))
        with lora_module.layer_scope(jnp.int32(2)):
            layer_2 = np.asarray(q(spec, x, jnp.float32))
    assert set(np.unique(dropped)) == {0.0, np.float32(1 / (1 - p))}
    # 1024 Bernoulli draws: the dropped fraction within 5 standard deviations (0.068) of p.
    assert abs((dropped == 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / dropped.size)
    masks = [m == 0 for m in (dropped, other_projection, layer_1, layer_2)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1:])


def test_dropout_changes_the_update_only_and_a_step_draws_the_same_masks_again(lora_policy):
    """The scorer (old policy, reference, evaluation) never drops; the update does, from key(seed) and the state's
    step: the same state gives the same step, bit for bit (a resumed run's), another seed another."""
    dropping = with_config(lora_policy, lora=lora_policy.config.lora.replace(dropout=0.5))
    batch = train_batch(lora_policy.config, G, L)
    scores = [make_score_fn(*nnx.split(m), CONFIG.scoring)(nnx.state(m), batch.scored())
              for m in (lora_policy, dropping)]
    np.testing.assert_array_equal(np.asarray(scores[0]), np.asarray(scores[1]))

    def adapters_after(model, config):
        graphdef, state = ts.init_state(model, config)
        base_score = make_score_fn(base_graphdef(model.config), ts.base_params(state.params), config.scoring)
        step_batch = batch.replace(ref_logprobs=base_score(ts.base_params(state.params), batch.scored()))
        state, metrics = ts.make_train_step(graphdef, state, config)(state, step_batch)
        assert float(metrics["update_skipped"]) == 0
        return {p: np.asarray(v.get_raw_value()) for p, v in nnx.to_flat_state(nnx.state(state.params,
                                                                                         nnx.LoRAParam))}

    once, again = adapters_after(dropping, CONFIG), adapters_after(dropping, CONFIG)
    without, reseeded = adapters_after(lora_policy, CONFIG), adapters_after(dropping, CONFIG.replace(seed=1))
    assert all(np.array_equal(once[p], again[p]) for p in once)
    assert any(not np.array_equal(once[p], without[p]) for p in once)
    assert any(not np.array_equal(once[p], reseeded[p]) for p in once)


def test_lora_configs_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match=r"targets \['fc1'\] are not language-model projections.*vision tower"):
        LoRAConfig(targets=("q_proj", "fc1"))
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="frozen_dtype is the frozen base's dtype under LoRA"):
        ts.TrainConfig(frozen_dtype="bfloat16")
    assert ts.TrainConfig(lora=True).freeze_vision  # the vision tower has no adapters


def test_with_config_may_change_the_adapters_dropout_not_their_shape(lora_policy):
    lora = lora_policy.config.lora
    assert with_config(lora_policy, lora=lora.replace(dropout=0.1)).config.lora.dropout == 0.1
    with pytest.raises(ValueError, match="with_config cannot change the adapters"):
        with_config(lora_policy, lora=lora.replace(rank=2 * lora.rank))


def test_peft_directories_our_adapters_cannot_hold_are_refused_in_one_line(family, tmp_path):
    _, _, base, _, root, _ = family
    shutil.copytree(root / "peft", tmp_path / "dora")
    path = tmp_path / "dora" / peft_port.CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(peft_port.PeftFormatError, match="use_dora=True: only plain LoRA"):
        peft_port.from_peft(str(tmp_path / "dora"), base.config)
    # an adapter on the vision tower (Qwen2-VL's fc1) is named, not silently dropped
    shutil.copytree(root / "peft", tmp_path / "vision")
    weights = load_file(str(tmp_path / "vision" / peft_port.WEIGHTS_FILE))
    weights["base_model.model.model.visual.blocks.0.mlp.fc1.lora_A.weight"] = np.zeros((RANK, 8), np.float32)
    save_file(weights, str(tmp_path / "vision" / peft_port.WEIGHTS_FILE))
    with pytest.raises(peft_port.PeftFormatError, match="visual.blocks.0.mlp.fc1.lora_A.weight' is not a LoRA adapter "
                                                        "of a language-model projection"):
        peft_port.from_peft(str(tmp_path / "vision"), base.config)
