"""Our Qwen2-VL equals HF's PyTorch `Qwen2VLForConditionalGeneration` (float32, eager attention) on
tiny configs with every parameter randomised, on batches built to catch porting bugs."""

import numpy as np
import pytest
import torch

from hf_reference import TINY_CONFIGS, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models.qwen2_vl import ModelInputs, forward_hf, get_rope_index
from vrft_jax.sampling import greedy_generate

pytestmark = pytest.mark.parity

# max|ours - ref| / max|ref|, the bound issue 2 set: two float32 programs over these few layers differ by
# ~1e-6 of the logit scale (a few hundred roundings of unit roundoff 6e-8), so a porting bug cannot hide
# under it, while another CPU's reduction order or FMA use stays far inside it.
TOLERANCE = 2e-5


def relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=lambda t: t.name)
def pair(request, tmp_path_factory):
    """(tiny config, HF model, our model converted from its saved checkpoint)."""
    tiny = request.param
    hf = random_hf_model(tiny, seed=1)
    path = tmp_path_factory.mktemp(tiny.name)
    hf.save_pretrained(path)
    return tiny, hf, load_hf(str(path))


def test_logits_match_hf(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=3)
    with torch.no_grad():
        ref = hf(**batch.torch(tiny.image_token_id)).logits.numpy()
    logits = np.asarray(forward_hf(ours, **batch.numpy()))
    assert logits.shape == ref.shape
    valid = batch.attention_mask.astype(bool)  # logits at padding are undefined in both models
    assert relative_error(logits[valid], ref[valid]) <= TOLERANCE


def test_vision_features_match_hf(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=4)
    with torch.no_grad():
        ref = hf.model.visual(torch.from_numpy(batch.pixel_values),
                              grid_thw=torch.from_numpy(batch.image_grid_thw)).pooler_output.numpy()
    inputs = ModelInputs.from_hf(ours.config, **batch.numpy())
    features = np.asarray(ours.image_features(inputs))  # [B, P/4, D]
    real = np.asarray(inputs.patch_segment_ids)[:, ::4] > 0  # merged tokens made of real patches
    assert real.sum() == ref.shape[0]
    assert relative_error(features[real], ref) <= TOLERANCE


def test_rope_index_equals_hf_exactly(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=5)
    t = batch.torch(tiny.image_token_id)
    ref_pos, ref_delta = hf.model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"],
                                                 attention_mask=t["attention_mask"])
    pos, delta = get_rope_index(batch.input_ids, batch.image_grid_thw, merge=2, image_token_id=tiny.image_token_id,
                                attention_mask=batch.attention_mask)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    inputs = ModelInputs.from_hf(ours.config, **batch.numpy())  # the batch layout is [B, T, 3]
    np.testing.assert_array_equal(np.asarray(inputs.positions).transpose(2, 0, 1), ref_pos.numpy())


def test_greedy_decoding_matches_hf_generate(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=6, padding="left")
    eos = tiny.hf["text_config"]["eos_token_id"]
    with torch.no_grad():
        ref = hf.generate(**batch.torch(tiny.image_token_id), max_new_tokens=32, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, batch.input_ids.shape[1]:].numpy()
    tokens = greedy_generate(ours, ModelInputs.from_hf(ours.config, **batch.numpy()), 32,
                             eos_token_ids=[eos], pad_token_id=0)
    assert ref.shape == (4, 32)
    np.testing.assert_array_equal(tokens, ref)
