"""The group sampler: exact greedy decoding, the right sampling distribution, logprobs the trainer can
trust, one prefill per prompt, one compilation per bucket, and clean EOS handling."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from hf_reference import TINY_CONFIGS, count_vision_calls, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax import sampling, sharding
from vrft_jax.models.qwen2_vl import ModelInputs, forward
from vrft_jax.models.qwen2_vl.inputs import InputError
from vrft_jax.sampling import SamplingConfig, rollout

pytestmark = pytest.mark.parity

TINY = TINY_CONFIGS[0]
EOS = TINY.eos_token_id
VISION_IDS = tuple(TINY.image_token_id + i for i in range(4))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = random_hf_model(TINY, seed=11)
    path = tmp_path_factory.mktemp("sampler")
    hf.save_pretrained(path)
    return hf, load_hf(str(path))


def left_batch(seed, **kw):
    return mixed_batch(TINY, seed=seed, padding="left", length=60, **kw)


def inputs_of(model, batch, patch_bucket=128):
    return ModelInputs.from_hf(model.config, **batch.numpy(), patch_bucket=patch_bucket)


def config(**kw):
    base = dict(max_new_tokens=16, eos_token_ids=(EOS,), pad_token_id=0)
    return SamplingConfig(**{**base, **kw})


@pytest.mark.parametrize("tiny", TINY_CONFIGS, ids=lambda t: t.name)
def test_greedy_equals_hf_generate_for_48_tokens(tiny, tmp_path):
    hf = random_hf_model(tiny, seed=12)
    hf.save_pretrained(tmp_path)
    ours = load_hf(str(tmp_path))
    batch = mixed_batch(tiny, seed=13, padding="left")  # mixed image sizes, 0, 1 or 2 images per prompt
    eos = tiny.eos_token_id
    with torch.no_grad():
        ref = hf.generate(**batch.torch(tiny.image_token_id), max_new_tokens=48, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, batch.input_ids.shape[1]:].numpy()
    out = rollout(ours, ModelInputs.from_hf(ours.config, **batch.numpy()), jax.random.key(0),
                  SamplingConfig(max_new_tokens=48, greedy=True, eos_token_ids=(eos,), pad_token_id=0,
                                 suppressed_token_ids=()))
    tokens = np.asarray(out.tokens)[:, :ref.shape[1]]
    np.testing.assert_array_equal(tokens, ref)


def prompt_logits(model, batch, temperature):
    """Independent reference: softmax(logits / T) at the last prompt token, vision tokens removed."""
    logits = np.asarray(forward(model, inputs_of(model, batch)))[:, -1].astype(np.float64) / temperature
    logits[:, list(VISION_IDS)] = -np.inf
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, probs / probs.sum(axis=1, keepdims=True)


def first_tokens(model, batch, cfg, draws, seed=0):
    """`draws` samples of the first generated token of row 0 (G rows per call)."""
    inputs = jax.tree.map(lambda x: x[:1], inputs_of(model, batch))
    out = []
    for i in range(draws // cfg.group_size):
        out.append(np.asarray(rollout(model, inputs, jax.random.key(seed + i), cfg).tokens[:, 0]))
    return np.concatenate(out)


def test_first_token_follows_softmax_of_logits_over_temperature(pair):
    _, model = pair
    batch = left_batch(21)
    temperature = 0.8
    _, probs = prompt_logits(model, batch, temperature)
    cfg = config(max_new_tokens=1, group_size=2000, temperature=temperature)
    tokens = first_tokens(model, batch, cfg, draws=20_000)
    assert tokens.size == 20_000
    observed = np.bincount(tokens, minlength=probs.shape[1]).astype(float)
    expected = probs[0] * tokens.size
    frequent = expected >= 5  # pool the rare tokens into one bin, as a chi-square test needs
    f_obs = np.append(observed[frequent], observed[~frequent].sum())
    f_exp = np.append(expected[frequent], expected[~frequent].sum())
    assert frequent.sum() >= 20
    p_value = stats.chisquare(f_obs, f_exp).pvalue
    assert p_value > 0.001, p_value
    assert observed[list(VISION_IDS)].sum() == 0  # vision special tokens are never sampled


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (None, 0.6), (20, 0.7)])
def test_top_k_and_top_p_never_draw_outside_the_kept_set(pair, top_k, top_p):
    _, model = pair
    batch = left_batch(22)
    temperature = 1.3
    logits, _ = prompt_logits(model, batch, temperature)
    row = logits[0]
    order = np.argsort(-row)
    kept = order[:top_k] if top_k else order[np.isfinite(row[order])]
    p = np.exp(row[kept] - row[kept].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    kept = kept[(before < top_p) | (np.arange(kept.size) == 0)]
    tokens = first_tokens(model, batch, config(max_new_tokens=1, group_size=1000, temperature=temperature,
                                                top_k=top_k, top_p=top_p), draws=3000, seed=100)
    assert set(tokens.tolist()) <= set(kept.tolist())
    assert len(set(tokens.tolist())) > 1


def test_logprobs_equal_an_independent_forward_pass(pair):
    _, model = pair
    batch = left_batch(23)
    temperature = 0.9
    cfg = config(max_new_tokens=12, group_size=3, temperature=temperature)
    out = rollout(model, inputs_of(model, batch), jax.random.key(5), cfg)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    g, steps = cfg.group_size, cfg.max_new_tokens
    # Teacher-force prompt + completion through the plain forward pass.
    prompt_ids = np.repeat(batch.input_ids, g, axis=0)
    prompt_mask = np.repeat(batch.attention_mask, g, axis=0)
    grids = np.repeat(batch.image_grid_thw, 1, axis=0)
    per_image = np.split(batch.pixel_values, np.cumsum(grids.prod(axis=1))[:-1])
    images_of_row = [[0], [1, 2], [], [3]]  # mixed_batch's rows: 1, 2, 0 and 1 images
    order = [i for row in range(4) for _ in range(g) for i in images_of_row[row]]
    full = ModelInputs.from_hf(
        model.config, np.concatenate([prompt_ids, tokens], axis=1),
        np.concatenate([prompt_mask, mask.astype(np.int64)], axis=1),
        np.concatenate([per_image[i] for i in order]), grids[order], patch_bucket=128)
    logits = np.asarray(forward(model, full)).astype(np.float64) / temperature
    t = batch.input_ids.shape[1]
    scored = logits[:, t - 1:t - 1 + steps]
    logprobs = scored - np.log(np.exp(scored - scored.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - scored.max(-1, keepdims=True)
    reference = np.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    ours = np.asarray(out.logprobs)
    assert mask.sum() > 0
    # A logprob is a difference of logits, here below 16 in size: two float32 programs (the decode
    # loop, a full forward) round them to a few ulp(16) = 1.9e-6 each; 1e-5 is ~5 of those.
    assert np.abs(scored).max() < 16
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-5, rtol=0)
    assert (ours[~mask] == 0).all()


def test_group_samples_are_distinct_and_reproducible(pair):
    _, model = pair
    inputs = inputs_of(model, left_batch(24))
    cfg = config(max_new_tokens=10, group_size=4)
    a = np.asarray(rollout(model, inputs, jax.random.key(7), cfg).tokens)
    b = np.asarray(rollout(model, inputs, jax.random.key(7), cfg).tokens)
    c = np.asarray(rollout(model, inputs, jax.random.key(8), cfg).tokens)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for prompt in range(4):
        group = a[prompt * 4:(prompt + 1) * 4]
        assert len({tuple(r) for r in group}) == 4, f"prompt {prompt}: samples of a group repeat"


def test_vision_tower_and_prefill_run_once_per_prompt(pair, monkeypatch):
    _, model = pair
    inputs = inputs_of(model, left_batch(25))
    calls = count_vision_calls(monkeypatch)
    rollout(model, inputs, jax.random.key(0), config(group_size=8)).tokens.block_until_ready()
    assert calls == [4]  # one run over the 4 prompts, not 32 samples
    monkeypatch.undo()

    graphdef, state = nnx.split(model)
    prefilled = sampling.prefill(graphdef, state, inputs, config(group_size=8).resolve(model.config))
    assert prefilled.cache.k.shape[1] == 4 and prefilled.logits.shape[0] == 4  # per prompt, not per sample


def test_each_program_compiles_once_per_bucket(pair):
    _, model = pair
    cfg = config(group_size=2)
    sizes = [((56, 84), (100, 130), (70, 45), (84, 84)), ((28, 56), (56, 28), (84, 56), (45, 45)),
             ((112, 84), (60, 60), (70, 70), (28, 28))]
    before = (sampling.prefill._cache_size(), sampling.decode._cache_size())
    for seed, s in enumerate(sizes):
        rollout(model, inputs_of(model, left_batch(30 + seed, image_sizes=s)), jax.random.key(seed), cfg)
    assert (sampling.prefill._cache_size() - before[0], sampling.decode._cache_size() - before[1]) == (1, 1)


def test_tokens_after_eos_are_padding_and_lengths_count_through_eos(pair):
    _, model = pair
    inputs = inputs_of(model, left_batch(26))
    eos = tuple(range(3, 1000, 4))  # a quarter of the vocabulary ends a sequence: most rows stop early
    out = rollout(model, inputs, jax.random.key(3), config(max_new_tokens=12, group_size=4, eos_token_ids=eos))
    tokens, lengths, logprobs, mask = (np.asarray(x) for x in (out.tokens, out.lengths, out.logprobs, out.mask))
    ended = 0
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[row], eos))
        length = hits[0] + 1 if hits.size else tokens.shape[1]
        ended += bool(hits.size)
        assert lengths[row] == length
        assert (tokens[row, length:] == 0).all() and (logprobs[row, length:] == 0).all()
        assert mask[row].sum() == length and mask[row, :length].all()
        assert (logprobs[row, :length] < 0).all()
    assert 0 < ended < tokens.shape[0] or ended == tokens.shape[0]


def test_every_row_done_exits_the_loop_early(pair):
    _, model = pair
    inputs = inputs_of(model, left_batch(27))
    everything = tuple(i for i in range(1024) if i not in VISION_IDS)
    out = rollout(model, inputs, jax.random.key(1), config(max_new_tokens=12, group_size=2, eos_token_ids=everything))
    assert (np.asarray(out.lengths) == 1).all() and (np.asarray(out.tokens)[:, 1:] == 0).all()


def test_sharded_rollout_on_the_mesh_equals_one_device(pair):
    _, model = pair
    batch = left_batch(28)
    cfg = config(max_new_tokens=10, group_size=4, greedy=True)
    single = rollout(model, inputs_of(model, batch), jax.random.key(0), cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sampler_model = sampling.reshard(model, mesh)
    inputs = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)), inputs_of(model, batch))
    with jax.set_mesh(mesh):
        out = rollout(sampler_model, inputs, jax.random.key(0), cfg)
    assert out.tokens.sharding.spec[0] is not None
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))
    # The same logprobs as above from another reduction order (sharded): the same few-ulp bound.
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(single.logprobs), atol=1e-5)


def test_bad_sampling_configs_name_the_field(pair):
    _, model = pair
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingConfig(max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match=r"eos_token_ids has ids \[151645\] outside the vocabulary of 1024"):
        sampling.rollout(model, inputs_of(model, left_batch(29)), jax.random.key(0),
                         dataclasses.replace(config(), eos_token_ids=(151645,)))
    with pytest.raises(InputError, match=r"rows \[1\] end in padding"):
        sampling.rollout(model, inputs_of(model, mixed_batch(TINY, seed=1)), jax.random.key(0), config())


def test_right_padding_is_caught_shard_by_shard_on_the_mesh(pair):
    _, model = pair
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    inputs = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)),
                          inputs_of(model, mixed_batch(TINY, seed=1)))
    with pytest.raises(InputError, match=r"rows \[1\] end in padding"):
        sampling.check_left_padded(inputs)


@pytest.mark.parametrize("width,tile", [(151_657, None), (1000, 64), (130, 8), (96, 8)])
def test_tiled_top_k_is_lax_top_k_exactly_ties_included(width, tile):
    """Values and indices equal jax.lax.top_k's, ties broken to the lower id as there: on a row with
    many ties (values rounded to halves), with a tail that fills no tile (1000 = 15 x 64 + 40; 130 =
    16 x 8 + 2), and with the default tile, a divisor of Qwen2-VL's 151,657 (187)."""
    k = 10
    rng = np.random.default_rng(width)
    rows = rng.normal(size=(4, width)).astype(np.float32)
    for x in (rows, np.round(2 * rows) / 2):
        expected = jax.lax.top_k(x, k)
        values, indices = jax.jit(lambda x: sampling.top_k(x, k, tile))(x)
        np.testing.assert_array_equal(values, expected[0])
        np.testing.assert_array_equal(indices, expected[1])


def test_a_row_of_padding_only_is_decoded_without_touching_the_real_rows(pair):
    """A finite stream's last batch is filled with rows of padding only (valid=False; review H2): the
    sampler takes them, produces finite numbers for them, and the real rows decode exactly as without."""
    _, model = pair
    inputs = inputs_of(model, left_batch(29))
    filler = jax.tree.map(lambda x: x.at[2].set(0), jax.tree.map(jax.numpy.asarray, inputs))
    greedy = config(greedy=True)
    full = rollout(model, inputs, jax.random.key(0), greedy)
    padded = rollout(model, filler, jax.random.key(0), greedy)
    real = np.array([0, 1, 3])
    np.testing.assert_array_equal(np.asarray(padded.tokens)[real], np.asarray(full.tokens)[real])
    np.testing.assert_array_equal(np.asarray(padded.lengths)[real], np.asarray(full.lengths)[real])
    assert np.all(np.isfinite(np.asarray(padded.logprobs)))


def test_repetition_penalty_equals_hf_logits_processor():
    """Random logits of both signs and random histories (repeats included) through HF's
    RepetitionPenaltyLogitsProcessor and ours: equal to the last bit (one multiply or divide each)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 3
    history = rng.integers(0, 300, size=(5, 40))
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, history, True, axis=1)
    for penalty in (1.05, 1.3, 0.8):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
        ours = sampling.repetition_penalty(logits, seen, penalty)
        np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@pytest.mark.parametrize("tiny", TINY_CONFIGS[:1], ids=lambda t: t.name)
def test_greedy_with_repetition_penalty_equals_hf_generate(tiny, tmp_path):
    """Penalty 1.05 (Qwen2-VL's generation config), 32 tokens, token for token. HF runs each prompt alone,
    unpadded: its batches would count their padding as a token of the prompt, ours never does."""
    hf = random_hf_model(tiny, seed=12)
    hf.save_pretrained(tmp_path)
    ours = load_hf(str(tmp_path))
    batch = mixed_batch(tiny, seed=13, padding="left")
    eos = tiny.eos_token_id
    out = rollout(ours, ModelInputs.from_hf(ours.config, **batch.numpy()), jax.random.key(0),
                  SamplingConfig(max_new_tokens=32, greedy=True, eos_token_ids=(eos,), pad_token_id=0,
                                 suppressed_token_ids=(), repetition_penalty=1.05))
    plain = rollout(ours, ModelInputs.from_hf(ours.config, **batch.numpy()), jax.random.key(0),
                    SamplingConfig(max_new_tokens=32, greedy=True, eos_token_ids=(eos,), pad_token_id=0,
                                   suppressed_token_ids=()))
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))  # the penalty changed something
    grids = batch.image_grid_thw
    per_image = np.split(batch.pixel_values, np.cumsum(grids.prod(axis=1))[:-1])
    images_of_row = [[0], [1, 2], [], [3]]  # mixed_batch's rows hold 1, 2, 0 and 1 images
    for row in range(len(batch.input_ids)):
        real = batch.attention_mask[row].astype(bool)
        ids = torch.from_numpy(batch.input_ids[row][real][None]).long()
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      mm_token_type_ids=(ids == tiny.image_token_id).long())
        if images := images_of_row[row]:
            kwargs.update(pixel_values=torch.from_numpy(np.concatenate([per_image[i] for i in images])),
                          image_grid_thw=torch.from_numpy(grids[images]))
        with torch.no_grad():
            ref = hf.generate(**kwargs, max_new_tokens=32, do_sample=False, repetition_penalty=1.05,
                              eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, :len(ref)], ref, err_msg=f"row {row}")


def test_greedy_generate_stops_where_training_does(monkeypatch):
    """One stop set for training and evaluation (review M6): greedy_generate's defaults are
    SamplingConfig's (<|im_end|> and <|endoftext|>), not config.json's <|im_end|> alone."""
    seen = []

    def fake_rollout(model, inputs, key, config):
        seen.append(config)
        return sampling.Rollout(tokens=np.zeros((1, 2), np.int32), logprobs=np.zeros((1, 2), np.float32),
                                lengths=np.array([2], np.int32))

    monkeypatch.setattr(sampling, "rollout", fake_rollout)
    sampling.greedy_generate(None, None, 2)
    default = SamplingConfig(max_new_tokens=2)
    assert seen[0].eos_token_ids == default.eos_token_ids == (151645, 151643)
    assert seen[0].pad_token_id == default.pad_token_id and seen[0].greedy
