"""Data: Grain pipelines that stream few-shot image-text records into static-shape batches.

  sources -> `python -m vrft_jax.data.prepare` -> TFDS ArrayRecord dataset -> `make_iterator` -> Batch

See `pipeline` for the stream, `batching` for the batch layout, `records` for the bad-record policy.
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
