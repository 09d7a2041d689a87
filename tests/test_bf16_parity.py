"""bfloat16 parity: our bf16 model against transformers' bf16 model, both measured against transformers' float32.

bf16 keeps 8 bits of mantissa (unit roundoff 2^-9), so a bf16 forward is not equal to anything: two bf16
implementations of the same model round at different places (XLA fuses elementwise chains and keeps them in
float32 registers; PyTorch rounds each op's output) and land at different points of the same error ball around
the exact model. What parity means here is that ours is no further from the truth than HF's own bf16 model: per
token, the KL divergence from HF's float32 distribution (the truth, to bf16's resolution) to ours is within a
stated multiple of HF-bf16's own, and the greedy (argmax) next token agrees with the float32 model's as often
as HF-bf16's does, over many prompts of text and images.
"""

import numpy as np
import pytest
import torch

from hf_reference import TINY_CONFIGS, concat, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models import forward_hf

pytestmark = pytest.mark.parity

# One tiny per family: Qwen2-VL (GQA), Qwen2.5-VL (windowed vision tower), Qwen3-VL (DeepStack, q/k norms).
FAMILIES = {t.family: t for t in reversed(TINY_CONFIGS)}
SEEDS = range(8)  # 8 mixed batches of 4 rows: 32 prompts, about 1,300 scored positions

# Both KLs are sums of the same kind of independent roundings (a few hundred of relative size 2^-9 between the
# input and a logit), so their expectations are of one order; which of the two programs rounds more depends on
# where each rounds (per op in PyTorch, per fusion in XLA). A factor of 2 on the mean admits any such difference
# of rounding placement, while a porting error (a missed scale, a wrong rope section, an f32 cast in the wrong
# place) moves the logits by far more than bf16 rounding does and the KL by orders of magnitude.
KL_MULTIPLE = 2.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(truth: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(p_truth || p_other) per position, from logits [N, V]."""
    log_p, log_q = log_softmax(truth), log_softmax(other)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


@pytest.fixture(scope="module", params=sorted(FAMILIES), ids=str)
def logits(request, tmp_path_factory):
    """{"f32": HF float32, "hf_bf16": HF bfloat16, "ours_bf16": ours, bf16 weights and compute}: logits at the
    valid positions of the same 32 prompts, as float32 [N, V]."""
    tiny = FAMILIES[request.param]
    hf = random_hf_model(tiny, seed=5)
    path = tmp_path_factory.mktemp(f"bf16_{tiny.name}")
    hf.save_pretrained(path)
    ours = load_hf(str(path), dtype="bfloat16", compute_dtype="bfloat16")
    hf_bf16 = random_hf_model(tiny, seed=5, dtype=torch.bfloat16)
    batch = concat(*(mixed_batch(tiny, seed=s) for s in SEEDS))
    valid = batch.attention_mask.astype(bool)
    inputs = batch.torch(tiny.image_token_id)
    with torch.no_grad():
        f32 = hf(**inputs).logits.numpy()
        half = hf_bf16(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}).logits
    mine = np.asarray(forward_hf(ours, **batch.numpy()), np.float32)
    return tiny.name, {"f32": f32[valid], "hf_bf16": half.float().numpy()[valid], "ours_bf16": mine[valid]}


def test_ours_in_bf16_is_as_close_to_float32_as_hfs_bf16(logits):
    name, out = logits
    hf_kl, ours_kl = kl(out["f32"], out["hf_bf16"]), kl(out["f32"], out["ours_bf16"])
    truth = out["f32"].argmax(-1)
    hf_agree, ours_agree = (out["hf_bf16"].argmax(-1) == truth).mean(), (out["ours_bf16"].argmax(-1) == truth).mean()
    print(f"{name}: {truth.size} positions; KL to float32 mean/max: HF bf16 {hf_kl.mean():.2e}/{hf_kl.max():.2e}, "
          f"ours {ours_kl.mean():.2e}/{ours_kl.max():.2e}; greedy agreement HF bf16 {hf_agree:.4f}, ours "
          f"{ours_agree:.4f}")
    assert ours_kl.mean() <= KL_MULTIPLE * hf_kl.mean(), (ours_kl.mean(), hf_kl.mean())
    # Greedy agreement: ours no lower than HF-bf16's by more than 3 binomial standard errors of the difference.
    slack = 3 * np.sqrt(2 * hf_agree * (1 - hf_agree) / truth.size) + 1 / truth.size
    assert ours_agree >= hf_agree - slack, (ours_agree, hf_agree)
