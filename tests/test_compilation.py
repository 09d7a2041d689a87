"""Static shapes: one compiled forward serves every batch whose images fit the bucket."""

import numpy as np

from hf_reference import TINY_CONFIGS, mixed_batch, random_hf_model
from model_port.hf_to_flax import load_hf
from vrft_jax.models.qwen2_vl import ModelInputs, model


def test_bucketed_forward_compiles_once_across_image_sizes(tmp_path):
    tiny = TINY_CONFIGS[0]
    random_hf_model(tiny).save_pretrained(tmp_path)
    ours = load_hf(str(tmp_path))
    image_sets = [((56, 84), (100, 130), (70, 45), (84, 84)), ((28, 28), (140, 140), (56, 56), (60, 100)),
                  ((112, 56), (45, 45), (130, 90), (28, 140)), ((84, 84), (84, 84), (84, 84), (84, 84))]
    before = model.compile_count()
    grids = set()
    for seed, sizes in enumerate(image_sets):
        batch = mixed_batch(tiny, seed=seed, image_sizes=sizes, length=80)
        grids.update(map(tuple, batch.image_grid_thw.tolist()))
        inputs = ModelInputs.from_hf(ours.config, **batch.numpy(), patch_bucket=256)
        logits = model.forward(ours, inputs)
        assert logits.shape == (4, 80, 1024) and np.isfinite(np.asarray(logits)).all()
    assert len(grids) >= 8  # the batches really differ in image geometry
    assert model.compile_count() - before == 1
