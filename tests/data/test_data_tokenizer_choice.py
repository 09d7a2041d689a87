"""The pipeline tokenizes with the model checkpoint's own tokenizer files when it is given a checkpoint."""

from __future__ import annotations

import shutil

from vrft_jax.data import synthetic
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import make_iterator
from vrft_jax.data.storage import InMemorySource


def test_pipeline_uses_the_tokenizer_of_the_checkpoint(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, tiny_config):
    """The tiny tokenizer's `<|image_pad|>` is not 151655: with the packaged tokenizer instead, the encoder
    would refuse `tiny_config`, and the ids would not decode with the tiny vocabulary."""
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, checkpoint / "hf_assets")
    record = next(synthetic.classification_records(1, seed=0))
    config = DataConfig(batch_size=2, max_prompt_len=256, max_pixels=160 * 160, num_workers=0, device_prefetch=0)
    it = make_iterator(config, tiny_config, source=InMemorySource([record] * 2, "test"), process_index=0,
                       process_count=1, checkpoint_dir=str(checkpoint))
    inputs = next(it).model_inputs
    ids = inputs.input_ids[0][inputs.attention_mask[0].astype(bool)]
    assert ids.max() < len(tiny_tokenizer)
    assert tiny_tokenizer.decode(ids).endswith(f"{record.problem}<|im_end|>\n<|im_start|>assistant\n")
