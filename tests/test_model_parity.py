"""Our Qwen2-VL equals HF's PyTorch `Qwen2VLForConditionalGeneration` (float32, eager attention) on
tiny configs with every parameter randomised, on batches built to catch porting bugs."""

import copy

import numpy as np
import pytest
import torch

from hf_reference import TINY_CONFIGS, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models import forward_hf
from vrft_jax.models.qwen2_vl import ModelInputs, get_rope_index
from vrft_jax.sampling import greedy_generate

pytestmark = pytest.mark.parity

# max|ours - ref| / max|ref|, the bound issue 2 set: two float32 programs over these few layers differ by
# ~1e-6 of the logit scale (a few hundred roundings of unit roundoff 6e-8), so a porting bug cannot hide
# under it, while another CPU's reduction order or FMA use stays far inside it. The Qwen2.5-VL tinies sit
# higher (~1e-5: the random SwiGLU vision MLP amplifies rounding more than QuickGELU does); that this is
# rounding and not a porting bug is what `test_vision_features_are_as_close_to_float64_as_hfs` shows.
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


def vision_outputs(visual, batch, dtype=torch.float32) -> list[np.ndarray]:
    """HF's merged features, then (Qwen3-VL) each DeepStack block's, of the batch's images."""
    with torch.no_grad():
        out = visual(torch.from_numpy(batch.pixel_values).to(dtype), grid_thw=torch.from_numpy(batch.image_grid_thw))
    return [out.pooler_output.numpy(), *(f.numpy() for f in getattr(out, "deepstack_features", None) or ())]


def our_vision_outputs(model, batch) -> list[np.ndarray]:
    """Ours, in the same order, at the merged tokens made of real patches."""
    inputs = ModelInputs.from_hf(model.config, **batch.numpy())
    features = model.image_features(inputs)
    real = np.asarray(inputs.patch_segment_ids)[:, ::4] > 0
    if not isinstance(features, tuple):
        return [np.asarray(features)[real]]
    main, deepstack = (np.asarray(f) for f in features)  # [B, M, D], [B, K, M, D]
    return [main[real], *(deepstack[:, k][real] for k in range(deepstack.shape[1]))]


def test_vision_features_match_hf(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=4)
    ref, got = vision_outputs(hf.model.visual, batch), our_vision_outputs(ours, batch)
    assert len(got) == len(ref) == 1 + len(tiny.hf["vision_config"].get("deepstack_visual_indexes", ()))
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        assert relative_error(g, r) <= TOLERANCE


def test_vision_features_are_as_close_to_float64_as_hfs(pair):
    """Against HF's vision tower run in float64, our float32 features are no further than HF's own float32 ones
    (x2 for the two programs' independent rounding): a porting error would stand out against rounding."""
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=4)
    ref32 = vision_outputs(hf.model.visual, batch)
    ref64 = vision_outputs(copy.deepcopy(hf.model.visual).double(), batch, torch.float64)
    for got, r32, r64 in zip(our_vision_outputs(ours, batch), ref32, ref64):
        assert relative_error(got, r64) <= 2 * relative_error(r32, r64)


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


@pytest.mark.parametrize("window_size", [112, 56, 84])
def test_window_partition_equals_hfs_window_index(window_size):
    """Our window mask groups the patches exactly as HF's `get_vision_window_index` + `cu_window_seqlens` do, on
    grids whose merged sides are multiples of the window (HF pads a whole empty window there), are not, and
    are smaller than one window; two images packed in one row."""
    from transformers.vision_utils import get_vision_window_index

    from vrft_jax.models.qwen2_vl.config import VisionConfig
    from vrft_jax.models.qwen2_vl.rope import vision_patch_positions
    from vrft_jax.models.qwen2_vl.vision import attention_mask

    vision = VisionConfig(depth=1, embed_dim=8, num_heads=2, out_dim=8, intermediate_size=8, window_size=window_size)
    for grids in ([[1, 8, 8], [1, 16, 10]], [[1, 2, 2], [1, 6, 14]], [[1, 4, 22]], [[1, 24, 8], [1, 10, 2]]):
        index, cu = get_vision_window_index(torch.tensor(grids), 2, window_size, 14)
        hf_window = np.empty(sum(t * h * w for t, h, w in grids) // 4, np.int64)  # window of each merged token
        for k in range(len(cu) - 1):
            hf_window[index[cu[k] // 4:cu[k + 1] // 4].numpy()] = k
        hf_same = np.repeat(hf_window, 4)[:, None] == np.repeat(hf_window, 4)[None, :]
        segments = np.concatenate([np.full(t * h * w, k + 1) for k, (t, h, w) in enumerate(grids)])
        positions = np.concatenate([vision_patch_positions(g, 2) for g in grids])
        ours = np.asarray(attention_mask(segments[None], positions[None], vision.window_patches))[0]
        np.testing.assert_array_equal(ours, hf_same, err_msg=f"grids {grids}, window {window_size}")


def test_greedy_decoding_matches_hf_generate(pair):
    tiny, hf, ours = pair
    batch = mixed_batch(tiny, seed=6, padding="left")
    eos = tiny.eos_token_id
    with torch.no_grad():
        ref = hf.generate(**batch.torch(tiny.image_token_id), max_new_tokens=32, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, batch.input_ids.shape[1]:].numpy()
    tokens = greedy_generate(ours, ModelInputs.from_hf(ours.config, **batch.numpy()), 32,
                             eos_token_ids=[eos], pad_token_id=0)
    assert ref.shape == (4, 32)
    np.testing.assert_array_equal(tokens, ref)
