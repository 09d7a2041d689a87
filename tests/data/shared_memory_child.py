"""A multi-worker pipeline in a fresh process whose batches outlive the iterator, for the shared-memory test.

    python shared_memory_child.py <tokenizer dir> <batches>   ->   one JSON line on stdout

Takes `batches` batches from two Grain workers, keeps them past the iterator's `close()`, and reports the
shared-memory segments behind them: their names, which of those names still exist, and whether the
arrays still read what they held at first. The batches are dropped only as `main` returns, just before
the interpreter exits (as a script's last batch is), so stderr then shows whether any segment of the
process tree was left for the resource tracker to remove.
"""

from __future__ import annotations

import json
import os
import sys


def _shared_arrays(batch) -> list:
    import grain.multiprocessing

    leaves = [getattr(batch.model_inputs, name) for name in batch.model_inputs.__dataclass_fields__]
    leaves += list(batch.meta.values())
    return [a for a in leaves if isinstance(a, grain.multiprocessing.SharedMemoryArray) and a.shm is not None]


def main() -> None:
    tokenizer_dir, count = sys.argv[1], int(sys.argv[2])
    from sample_data import config_for

    from vrft_jax.data import storage, synthetic
    from vrft_jax.data.config import DataConfig
    from vrft_jax.data.pipeline import make_iterator
    from vrft_jax.models.qwen2_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    kept = []
    source = storage.InMemorySource(list(synthetic.detection_records(8, seed=3, min_side=30, max_side=120)))
    config = DataConfig(path="", batch_size=2, max_prompt_len=256, max_pixels=160 * 160, num_workers=2,
                        device_prefetch=1, seed=1)
    with make_iterator(config, config_for(tokenizer), tokenizer=tokenizer, source=source, process_index=0,
                       process_count=1) as it:
        for _ in range(count):
            kept.append(next(it))
        sums = [float(a.sum()) for batch in kept for a in _shared_arrays(batch)]
    arrays = [a for batch in kept for a in _shared_arrays(batch)]
    names = [a.shm.name for a in arrays]
    print(json.dumps({
        "segments": len(names),
        "still_named": [n for n in names if os.path.exists(os.path.join("/dev/shm", n.lstrip("/")))],
        "arrays_intact": [float(a.sum()) for a in arrays] == sums,
    }), flush=True)


if __name__ == "__main__":
    main()
