"""Records on disk or in a bucket: a TFDS dataset stored as ArrayRecord files, written and read without
TensorFlow.

Layout: `<data_dir>/<name>/<version>/` holds `dataset_info.json`, `features.json`, `metadata.json`
(the conversion report) and `<name>-<split>.array_record-NNNNN-of-NNNNN` shards. Readers need only
that directory (`tfds.builder_from_directory`), not the builder class. TFDS orders the records of a
split by a hash of their id, so the stored order is deterministic and independent of the source
order; the pipeline shuffles on top of it.

`<data_dir>` may be a `gs://` URL. The readers read it in place: TFDS reads the JSON files through
`etils.epath` (gcsfs), and ArrayRecord's reader reads `gs://` shards natively (google-cloud-cpp, with the
host's application default credentials). A dataset is written locally and then uploaded,
`dataset_info.json` last, so an interrupted upload is never taken for a dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vrft_jax import storage
from vrft_jax.cli import UserError
from vrft_jax.data.records import FIELDS, Record

VERSION = "1.0.0"
INFO_FILE, METADATA_FILE = "dataset_info.json", "metadata.json"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DatasetNameError(UserError, ValueError):
    """A dataset name TFDS cannot take."""


class DatasetExistsError(UserError, FileExistsError):
    """A dataset already written where a new one would go."""


def _features():
    import tensorflow_datasets as tfds

    text = tfds.features.Text
    # The image stays as the source's encoded bytes: no re-encoding, and decoding (with its errors) is
    # the pipeline's job, under the bad-record policy.
    return tfds.features.FeaturesDict({
        "id": text(), "image": tfds.features.Tensor(shape=(), dtype=np.object_), "problem": text(),
        "solution": text(), "task": text(), "label": text()})


def _builder_class(name: str):
    import tensorflow_datasets as tfds

    class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, splits, metadata, description, **kwargs):
            self._splits, self._metadata, self._description = splits, metadata, description
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self._description, features=_features(),
                                         metadata=tfds.core.MetadataDict(self._metadata))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(records) for split, records in self._splits.items()}

        def _generate_examples(self, records):
            for record in records:
                yield record.id, record.as_dict()

        # tfds announces "Downloading and preparing dataset Unknown size ..." and its end on stdout, for a local
        # conversion that downloads nothing; the prepare command prints its own report instead.
        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

    # tfds takes the dataset's directory name from the class attribute `name`.
    return types.new_class(f"Records_{name}", (_RecordsBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name))


def write_dataset(data_dir: str, name: str, splits: Mapping[str, Iterable[Record]], *,
                  metadata: Mapping[str, Any] | None = None, description: str = "") -> str:
    """Write `splits` (split name -> records) as ArrayRecord; returns the dataset directory.

    `metadata` (JSON-able) is stored with the dataset; the CLI puts the conversion report there, and
    fills it while the records stream, so it must be complete when the last split has been written.
    """

    if not splits:
        raise ValueError("no splits to write")
    check_new_dataset(data_dir, name)
    data_dir = storage.absolute(data_dir)
    if not storage.is_url(data_dir):
        return _write_local(data_dir, name, splits, {} if metadata is None else metadata, description)
    target = storage.join(data_dir, name, VERSION)
    storage.rmtree(target)  # what an interrupted upload left
    with tempfile.TemporaryDirectory(prefix="vrft-dataset-") as local:
        written = _write_local(local, name, splits, {} if metadata is None else metadata, description)
        storage.copy_tree(written, target, last=(INFO_FILE,))
    return target


def check_new_dataset(data_dir: str, name: str) -> None:
    """DatasetNameError for a name TFDS cannot take; DatasetExistsError when `<data_dir>/<name>/<VERSION>` holds
    a dataset already (a complete one: what an interrupted upload left is written over)."""
    if not _NAME.match(name):
        raise DatasetNameError(f"--name {name!r}: a dataset name is lower-case letters, digits and underscores, "
                               "starting with a letter")
    target = storage.join(storage.absolute(data_dir), name, VERSION)
    if storage.isfile(storage.join(target, INFO_FILE)) or (not storage.is_url(target) and os.path.exists(target)):
        raise DatasetExistsError(f"{target} exists; remove it or pick another --name")


def _write_local(data_dir: str, name: str, splits: Mapping[str, Iterable[Record]], metadata: Mapping[str, Any],
                 description: str) -> str:
    builder = _builder_class(name)(splits=splits, metadata=metadata, description=description,
                                   data_dir=data_dir, file_format="array_record")
    # A failed conversion leaves nothing behind: the highest folder this call creates (--output itself, when it
    # is new), else the version's temporary siblings.
    made = builder.data_dir
    while not os.path.exists(os.path.dirname(made)):
        made = os.path.dirname(made)
    made = os.path.join(data_dir, name) if made == builder.data_dir and not os.path.exists(
        os.path.join(data_dir, name)) else made
    before = set(os.listdir(os.path.dirname(builder.data_dir))) if os.path.isdir(
        os.path.dirname(builder.data_dir)) else set()
    # tfds wants a download directory even though nothing is downloaded, and may print to stdout, which belongs
    # to the caller (the CLI prints its report there).
    try:
        with tempfile.TemporaryDirectory() as downloads, contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(download_dir=downloads)
    except BaseException:
        _remove_partial(made, builder.data_dir, before)
        raise
    # The report was filled while the generators ran, after tfds snapshotted the metadata: write it again.
    storage.write_text_atomic(os.path.join(builder.data_dir, METADATA_FILE),
                              json.dumps(dict(metadata), indent=2, sort_keys=True))
    return builder.data_dir


def _remove_partial(made: str, version_dir: str, before: set[str]) -> None:
    """Remove what a failed write made: `made` when it is the dataset's folder this write created, else the
    entries beside `version_dir` (its temporary `.incomplete` siblings) that were not there before."""
    if made != version_dir:
        shutil.rmtree(made, ignore_errors=True)
        return
    parent = os.path.dirname(version_dir)
    for entry in set(os.listdir(parent) if os.path.isdir(parent) else []) - before:
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def dataset_dir(path: str) -> str:
    """The versioned directory of a dataset given it or its parent (`<data_dir>/<name>`, newest version)."""
    path = storage.absolute(path)
    if storage.isfile(storage.join(path, INFO_FILE)):
        return path
    names = storage.listdir(path) if storage.isdir(path) else []
    versions = sorted((d for d in names if re.fullmatch(r"\d+\.\d+\.\d+", d)),
                      key=lambda v: tuple(int(x) for x in v.split(".")))
    for version in reversed(versions):  # the newest complete one: an interrupted upload has no dataset_info.json
        if storage.isfile(storage.join(path, version, INFO_FILE)):
            return storage.join(path, version)
    raise FileNotFoundError(f"{path} is not a prepared dataset (no {INFO_FILE}); "
                            "make one with `python -m vrft_jax.data.prepare`")


def open_split(path: str, split: str):
    """Random-access source of one split: `len()`, and `[i]` -> dict of the record's fields (text as bytes)."""
    import tensorflow_datasets as tfds

    directory = dataset_dir(path)
    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        raise KeyError(f"split {split!r} not in {directory}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def split_names(path: str) -> list[str]:
    import tensorflow_datasets as tfds

    return sorted(tfds.builder_from_directory(dataset_dir(path)).info.splits)


def read_metadata(path: str) -> dict[str, Any]:
    file = storage.join(dataset_dir(path), METADATA_FILE)
    if not storage.exists(file):
        return {}
    return json.loads(storage.read_text(file))


def read_records(path: str, split: str) -> list[Record]:
    """Every record of a split, in stored order (for tests and small evaluation sets)."""
    source = open_split(path, split)
    return [record_from_dict(source[i]) for i in range(len(source))]


def record_from_dict(values: Mapping[str, Any]) -> Record:
    return Record(**{name: _stored(values[name]) if name == "image" else field_text(values[name]) for name in FIELDS})


def _stored(value):
    """A stored field as its Python value (ArrayRecord gives a 0-d array)."""
    return value.item() if isinstance(value, np.ndarray) else value


def field_text(value):
    """A stored string field as text (ArrayRecord gives bytes or a 0-d array); other values as they are."""
    value = _stored(value)
    return value.decode("utf-8") if isinstance(value, bytes) else value


class InMemorySource:
    """A random-access source over records held in memory (tests, the demo, notebooks)."""

    def __init__(self, records: Sequence[Record | Mapping[str, Any]], name: str = "memory"):
        self._records = [r.as_dict() if isinstance(r, Record) else dict(r) for r in records]
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._records[index]

    def __repr__(self) -> str:
        return f"InMemorySource({self.name!r}, {len(self)} records)"
