"""Data: Grain pipelines that stream few-shot image-text records into static-shape batches.

  sources -> `python -m vrft_jax.data.prepare` -> TFDS ArrayRecord dataset -> `make_iterator` -> Batch

Convert once (see `prepare` for every source and option):

    python -m vrft_jax.data.prepare coco --annotations instances_train2017.json --images train2017 \
        --shots 4 --seed 0 --categories bus,train,cat,dog --output data --name coco_4_shot

Stream:

    config = DataConfig(path="data/coco_4_shot", batch_size=8, on_bad_record="skip")
    it = make_iterator(config, Qwen2VLConfig.qwen2_vl_2b(), mesh=mesh)
    batch = next(it)        # batch.model_inputs: ModelInputs of global arrays [B, T], [B, P, 1176], ...
                            # batch.meta: solution, id, task, image_hw, ... (host only); batch.skipped
    state = it.get_state()  # JSON; or grain.checkpoint.CheckpointSave(it) inside an Orbax Composite

Modules: `records` (schema, validation, bad-record policy), `prompts` (Visual-RFT's exact strings),
`image` (HF-exact Qwen2-VL image processing), `virft`/`coco`/`classification`/`lisa`/`synthetic`
(sources), `storage` (TFDS ArrayRecord), `preprocess` (record -> example), `batching` (static
shapes), `pipeline` (the Grain stream and the resumable iterator), `config` (`DataConfig`).
"""

from vrft_jax.data.batching import INPUT_NAMES, META_COLUMNS, BatchLayout
from vrft_jax.data.config import DataConfig
from vrft_jax.data.pipeline import Batch, DataIterator, build_dataset, make_iterator
from vrft_jax.data.records import REASONS, TASKS, BadRecordError, Record
from vrft_jax.data.storage import InMemorySource, open_split, read_records, write_dataset

__all__ = [
    "INPUT_NAMES", "META_COLUMNS", "REASONS", "TASKS", "BadRecordError", "Batch", "BatchLayout", "DataConfig",
    "DataIterator", "InMemorySource", "Record", "build_dataset", "make_iterator", "open_split", "read_records",
    "write_dataset",
]
