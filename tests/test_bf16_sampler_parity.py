"""bfloat16 sampler against the float32 scorer: the mismatch GRPO lives with, measured against transformers' own.

A run samples from a bfloat16 copy of the policy (`sampling.make_sampler_cast` into `sampling.sampler_graphdef`,
the decode program's KV cache and fusions) and scores the same tokens with the float32 policy
(`scoring.make_score_fn`, the update's program). The two disagree by bf16 rounding, and GRPO's importance ratio
exp(lp_scorer - lp_sampler) carries that disagreement into every update. `test_bf16_parity` shows our bf16 forward
is no further from float32 than transformers' bf16 forward is; this is the second half: the rollout itself.

Per family (one tiny each), 8 prompts (6 with images), 4 completions each, 24 tokens at temperature 1:

- sampler KL: KL(sampler || scorer) per completion token, estimated on the sampled tokens by k3. With
  d = lp_scorer - lp_sampler at a real (masked) token, k3 = exp(d) - 1 - d >= 0; for x ~ q, E[k3] = KL(q || p)
  exactly (E_q[p/q] = 1). lp_sampler is `Rollout.logprobs` (the decode program's own log softmax of its bf16
  logits), lp_scorer the float32 scorer's: this is the decode path itself, not a re-computation of it. The run
  suppresses the vision tokens (so must we: a sampled <|image_pad|> would be an image placeholder to transformers'
  teacher forcing), so x is drawn from q restricted to the other tokens (mass Q; p's mass there P) while both
  logprobs are over the full vocabulary; then E[k3] = KL(q' || p') + (P/Q - 1 - log(P/Q)), the KL between the
  restricted distributions plus a term of second order in P/Q - 1 (the 4 suppressed tokens' mass, ~4/V, times
  its bf16 relative error, ~1e-2: ~1e-9 against KLs of ~1e-4).
- exact KL of the sampler's weights: the full-vocabulary KL(our bf16 || our float32) at the same positions, from
  teacher-forced forwards over prompt + completion (`forward_hf`) of the sampler's bf16 model (the cast weights
  and structure) and of the float32 policy.
- the reference: transformers' bf16 model against transformers' float32 model, teacher forced over the very same
  prompt + completion sequences, the exact full-vocabulary KL(HF bf16 || HF float32) at the same positions (the
  same direction as ours). Both of ours must be within KL_MULTIPLE of it.
- greedy: the bf16 sampler's greedy decode (the decode program's argmax) and, teacher forced along that decode,
  the float32 policy's argmax at every position: the fraction of positions where they agree, against the same
  fraction for transformers (HF bf16 `generate` greedy, HF float32's argmax along it).

Run with -s to see the numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import Batch, concat, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from test_bf16_parity import FAMILIES, KL_MULTIPLE, kl, log_softmax  # kl(p, q): KL(p || q) per position
from vrft_jax import sampling
from vrft_jax.models import forward_hf
from vrft_jax.models.qwen2_vl import ModelInputs
from vrft_jax.sampling import SamplingConfig, rollout
from vrft_jax.scoring import CompletionBatch, ScoringConfig, make_score_fn

pytestmark = pytest.mark.parity

SEEDS = range(2)  # 2 mixed batches of 4 left-padded prompts: 8 prompts (6 with images, one of them with two)
GROUP = 4  # completions per prompt
NEW_TOKENS = 24  # per completion: 8 x 4 x 24 = 768 sampled positions (fewer where EOS comes first)
# k3's mean is an estimate (one sampled token per position): it is held to the bound plus this many standard
# errors of that mean (a one-sided test at ~0.1% false failure); the HF reference is exact at the same positions.
STANDARD_ERRORS = 3


def at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log softmax(logits)[token] per position."""
    return np.take_along_axis(log_softmax(logits), tokens[:, None], axis=-1)[:, 0]


def through_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """bool mask of each row's tokens up to and including its first EOS (the whole row when none)."""
    is_eos = tokens == eos
    before = np.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before this slot
    return before == 0


def teacher_forced(prompts: Batch, tokens: np.ndarray, mask: np.ndarray, tiny) -> Batch:
    """Each completion row after its prompt (row r of `tokens` follows prompt r // (rows / prompts)), the prompt's
    images repeated with it: the sequences that the sampler decoded, for a full forward pass."""
    group = len(tokens) // len(prompts.input_ids)
    images_of_row = (prompts.input_ids == tiny.image_token_id + 1).sum(axis=1)  # one vision_start per image
    first = np.concatenate([[0], np.cumsum(images_of_row)])
    patches = np.concatenate([[0], np.cumsum(prompts.image_grid_thw.prod(axis=1))])
    images = [i for b in range(len(images_of_row)) for _ in range(group) for i in range(first[b], first[b + 1])]
    return Batch(input_ids=np.concatenate([np.repeat(prompts.input_ids, group, axis=0), tokens], axis=1),
                 attention_mask=np.concatenate([np.repeat(prompts.attention_mask, group, axis=0),
                                                mask.astype(np.int64)], axis=1),
                 pixel_values=np.concatenate([prompts.pixel_values[patches[i]:patches[i + 1]] for i in images]),
                 image_grid_thw=prompts.image_grid_thw[images])


def hf_logits(model, batch: Batch, tiny, dtype) -> np.ndarray:
    inputs = batch.torch(tiny.image_token_id)
    with torch.no_grad():
        return model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}).logits.float().numpy()


def completion_positions(logits: np.ndarray, prompt_length: int, mask: np.ndarray) -> np.ndarray:
    """[N, V] logits of the real completion positions: slot T - 1 + k predicts completion token k."""
    return logits[:, prompt_length - 1:-1][mask]


def agreement_slack(p_ours: float, n_ours: int, p_hf: float, n_hf: int) -> float:
    """3 standard errors of the difference of two agreement rates under the hypothesis that they are equal
    (the two-proportion test's pooled rate), plus one position of discreteness."""
    pooled = (p_ours * n_ours + p_hf * n_hf) / (n_ours + n_hf)
    return 3 * np.sqrt(pooled * (1 - pooled) * (1 / n_ours + 1 / n_hf)) + 1 / n_ours


@pytest.fixture(scope="module", params=sorted(FAMILIES), ids=str)
def measured(request, tmp_path_factory):
    tiny = FAMILIES[request.param]
    hf = random_hf_model(tiny, seed=5)
    path = tmp_path_factory.mktemp(f"bf16_sampler_{tiny.name}")
    hf.save_pretrained(path)
    hf_bf16 = random_hf_model(tiny, seed=5, dtype=torch.bfloat16)  # the same draws, rounded to bf16

    # The run's two copies: the float32 policy (train state and scorer) and the sampler's bf16 cast of it.
    policy = load_hf(str(path), dtype="float32")
    graphdef, params = nnx.split(policy)
    sampler = nnx.merge(sampling.sampler_graphdef(policy.config, jnp.bfloat16),
                        sampling.make_sampler_cast(params, jnp.bfloat16)(params))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(sampler))} == {jnp.dtype(jnp.bfloat16)}

    prompts = concat(*(mixed_batch(tiny, seed=s, padding="left") for s in SEEDS))
    inputs = ModelInputs.from_hf(policy.config, **prompts.numpy())
    length = prompts.input_ids.shape[1]
    eos = tiny.eos_token_id
    # The run's sampling: temperature 1 (the scorer's), no top-k / top-p, the vision tokens suppressed.
    sample = SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=GROUP, temperature=1.0, eos_token_ids=(eos,),
                            pad_token_id=0)
    out = rollout(sampler, inputs, jax.random.key(0), sample)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    score = make_score_fn(graphdef, params, ScoringConfig(temperature=1.0))
    scorer_lp = np.asarray(score(params, CompletionBatch(inputs, out.tokens, out.mask.astype(jnp.int32))))

    # Greedy: the sampler's decode, the same prompts, one row each, as long as the samples (one forward shape).
    greedy = rollout(sampler, inputs, jax.random.key(0), SamplingConfig(
        max_new_tokens=NEW_TOKENS, greedy=True, eos_token_ids=(eos,), pad_token_id=0))
    greedy_tokens, greedy_mask = np.asarray(greedy.tokens), np.asarray(greedy.mask)
    suppressed = list(sample.resolve(policy.config).suppressed_token_ids)
    with torch.no_grad():
        prompt_inputs = prompts.torch(tiny.image_token_id)
        generated = hf_bf16.generate(
            **{**prompt_inputs, "pixel_values": prompt_inputs["pixel_values"].to(torch.bfloat16)},
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0,
            suppress_tokens=suppressed)[:, length:].numpy()
    hf_greedy = np.zeros_like(greedy_tokens)
    hf_greedy[:, :generated.shape[1]] = generated  # generate stops early when every row is done: pad as ours does
    hf_greedy_mask = through_eos(hf_greedy, eos) & (np.arange(NEW_TOKENS) < generated.shape[1])

    # Teacher forcing over the sampled rows, then the greedy rows.
    sampled = teacher_forced(prompts, tokens, mask, tiny)
    ours_f32 = np.asarray(forward_hf(policy, **concat(sampled, teacher_forced(
        prompts, greedy_tokens, greedy_mask, tiny)).numpy()), np.float32)
    ours_bf16 = np.asarray(forward_hf(sampler, **sampled.numpy()), np.float32)
    hf_f32 = hf_logits(hf, concat(sampled, teacher_forced(prompts, hf_greedy, hf_greedy_mask, tiny)), tiny,
                       torch.float32)
    hf_bf16_logits = hf_logits(hf_bf16, sampled, tiny, torch.bfloat16)

    rows = len(tokens)
    f32_greedy = completion_positions(ours_f32[rows:], length, greedy_mask)
    hf_f32_greedy = completion_positions(hf_f32[rows:], length, hf_greedy_mask)
    f32_greedy[:, suppressed] = -np.inf  # the greedy decode never picks these: neither may its reference
    hf_f32_greedy[:, suppressed] = -np.inf
    return tiny.name, dict(
        tokens=tokens[mask], sampler_lp=np.asarray(out.logprobs)[mask], scorer_lp=scorer_lp[mask],
        ours_f32=completion_positions(ours_f32[:rows], length, mask),
        ours_bf16=completion_positions(ours_bf16, length, mask),
        hf_f32=completion_positions(hf_f32[:rows], length, mask),
        hf_bf16=completion_positions(hf_bf16_logits, length, mask),
        greedy=greedy_tokens[greedy_mask], f32_argmax=f32_greedy.argmax(-1),
        hf_greedy=hf_greedy[hf_greedy_mask], hf_f32_argmax=hf_f32_greedy.argmax(-1))


def test_teacher_forced_positions_are_the_sampled_ones(measured):
    """The reference is only a reference if its positions are the sampler's: the float32 scorer's logprobs must be
    HF float32's log softmax at the sampled tokens of the teacher-forced sequences, to float32's resolution.
    Two float32 programs differ by roundings of unit 2^-24 where bf16's are 2^-9, so their gap is ~2^-15 of the
    bf16 gap d; the bound, 2^-10 x max |d|, leaves 32x for per-op (PyTorch) against per-fusion (XLA) rounding and
    for taking a maximum. A position off by one, or a wrong M-RoPE start, moves a logprob by O(1) nats."""
    name, m = measured
    d = m["scorer_lp"] - m["sampler_lp"]
    gap = np.abs(m["scorer_lp"] - at(m["hf_f32"], m["tokens"]))
    print(f"{name}: {d.size} sampled tokens; float32 scorer vs HF float32 max {gap.max():.1e} "
          f"(bound {2 ** -10 * np.abs(d).max():.1e})")
    assert gap.max() <= 2 ** -10 * np.abs(d).max(), (gap.max(), np.abs(d).max())


def test_the_bf16_sampler_is_as_close_to_the_float32_scorer_as_hfs_bf16_is_to_hfs_float32(measured):
    """KL_MULTIPLE (test_bf16_parity: both KLs are sums of independent bf16 roundings of one order, the factor
    admits where each program rounds, a porting error costs orders of magnitude) bounds both the decode path's
    KL (k3 on the sampled tokens, plus STANDARD_ERRORS of its mean) and the exact KL of the sampler's weights
    against HF bf16's exact KL to HF float32 at the same positions."""
    name, m = measured
    d = m["scorer_lp"] - m["sampler_lp"]
    k3 = np.exp(d.astype(np.float64)) - 1 - d
    se = k3.std(ddof=1) / np.sqrt(k3.size)
    hf_kl = kl(m["hf_bf16"], m["hf_f32"])
    weights_kl = kl(m["ours_bf16"], m["ours_f32"])
    d_hf = at(m["hf_f32"], m["tokens"]) - at(m["hf_bf16"], m["tokens"])
    decode_vs_forward = np.abs(m["sampler_lp"] - at(m["ours_bf16"], m["tokens"]))
    print(f"{name}: {d.size} tokens; KL(bf16 || float32) per token: sampler (k3) {k3.mean():.3e} +- {se:.1e}, "
          f"sampler weights (exact) {weights_kl.mean():.3e}, HF bf16 (exact) {hf_kl.mean():.3e}; ratios "
          f"{k3.mean() / hf_kl.mean():.3f} and {weights_kl.mean() / hf_kl.mean():.3f} (bound {KL_MULTIPLE}); "
          f"|lp_scorer - lp_sampler| mean {np.abs(d).mean():.4f} max {np.abs(d).max():.4f} (HF's on the same tokens "
          f"{np.abs(d_hf).mean():.4f} / {np.abs(d_hf).max():.4f}); decode vs teacher-forced bf16 forward mean "
          f"{decode_vs_forward.mean():.4f} max {decode_vs_forward.max():.4f}")
    assert k3.mean() <= KL_MULTIPLE * hf_kl.mean() + STANDARD_ERRORS * se, (k3.mean(), se, hf_kl.mean())
    assert weights_kl.mean() <= KL_MULTIPLE * hf_kl.mean(), (weights_kl.mean(), hf_kl.mean())


def test_the_bf16_greedy_decode_agrees_with_float32_as_often_as_hfs(measured):
    """Each greedy position is a trial: does the bf16 decode's argmax equal the float32 model's given the same
    prefix (its own decode, teacher forced)? Ours no lower than HF's by more than 3 binomial standard errors of
    the difference (`agreement_slack`)."""
    name, m = measured
    ours, theirs = m["greedy"] == m["f32_argmax"], m["hf_greedy"] == m["hf_f32_argmax"]
    slack = agreement_slack(ours.mean(), ours.size, theirs.mean(), theirs.size)
    print(f"{name}: greedy agreement with float32: bf16 sampler {ours.mean():.4f} of {ours.size} positions, "
          f"HF bf16 {theirs.mean():.4f} of {theirs.size} (slack {slack:.4f})")
    assert ours.mean() >= theirs.mean() - slack, (ours.mean(), theirs.mean(), slack)
