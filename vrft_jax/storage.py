"""The one file layer of a run: every path it reads or writes may be local or a `gs://` URL.

A multi-host slice has no shared local disk, so a run's workdir, its prepared data and its initial
checkpoint live in a bucket. Local paths go through the OS; URLs through fsspec (gcsfs for `gs://`),
the same client that `etils.epath`, and so orbax's metadata, use when TensorFlow is absent. Orbax
writes array data itself (tensorstore) and ArrayRecord readers read `gs://` natively; this module
covers everything else.

    path = storage.join(workdir, "config.json")     # never os.path.join on a URL
    storage.write_text_atomic(path, text)           # readers see the old text or the new, never half
    text = storage.read_text(path)
    with storage.open_append(storage.join(workdir, "metrics.jsonl")) as f:
        f.write(b"...\\n"); f.flush()              # on a bucket: the whole object re-uploaded
    local = storage.local_copy("gs://b/hf/Qwen2-VL-2B", cache_dir)   # staged once per host

What a bucket lacks, and what stands in for it:
- no directories: a "directory" exists while an object lies under its prefix; `makedirs` of a URL
  does nothing, `isdir` of an empty prefix is False;
- no rename: one object write is atomic, so `write_text_atomic` is one upload; a directory that must
  be swapped in (a model's parameters) is written under a new name and a small pointer object is
  written last (`vrft_jax.model_dir`);
- no append: `open_append` keeps a local copy of the file and uploads it whole at each `flush`, as
  TensorFlow's GCS file system does for event files.

Listings are never cached here: orbax and other processes write objects this process did not see.

Tests point the clients at a GCS emulator through their standard variables (`STORAGE_EMULATOR_HOST`
for gcsfs, `TENSORSTORE_GCS_HTTP_URL` for orbax's tensorstore, `CLOUD_STORAGE_EMULATOR_ENDPOINT` for
ArrayRecord's reader): see `tests/gcs.py`.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import IO, Any

import fsspec

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_LOCAL = fsspec.filesystem("file")


def is_url(p: str) -> bool:
    """Whether `p` names an object store location (`gs://bucket/key`, any `scheme://`), not a local path."""
    return bool(_URL.match(os.fspath(p)))


def absolute(p: str) -> str:
    """`p` as an absolute path; a URL is returned unchanged (`os.path.abspath('gs://b/x')` would be
    '<cwd>/gs:/b/x')."""
    p = os.fspath(p)
    return p if is_url(p) else os.path.abspath(p)


def join(base: str, *parts: str) -> str:
    """`base/part/...`: '/'-separated for a URL, `os.path.join` for a local path."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def _fs(p: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(the file system holding `p`, `p` in that file system's own form)."""
    p = os.fspath(p)
    if is_url(p):
        return fsspec.core.url_to_fs(p, use_listings_cache=False)
    return _LOCAL, os.path.abspath(p)


# ------------------------------------------------------------------------------------------- queries


def exists(p: str) -> bool:
    """Whether a file or a (non-empty, on a bucket) directory is at `p`."""
    fs, path = _fs(p)
    return fs.exists(path)


def isdir(p: str) -> bool:
    fs, path = _fs(p)
    return fs.isdir(path)


def isfile(p: str) -> bool:
    fs, path = _fs(p)
    return fs.isfile(path)


def listdir(p: str) -> list[str]:
    """The names of the entries directly under directory `p`, sorted; FileNotFoundError naming `p` when
    there is none."""
    fs, path = _fs(p)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no directory {p}") from None
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    names.discard("")
    return sorted(names)


# ------------------------------------------------------------------------------------- reads, writes


def makedirs(p: str) -> None:
    """Create directory `p` and its parents if missing (nothing to do on a bucket)."""
    if not is_url(p):
        os.makedirs(p, exist_ok=True)


def open(p: str, mode: str = "r", encoding: str | None = None) -> IO[Any]:
    """`p` opened for a whole-file read or write ("r", "rb", "w", "wb"). A write creates the local parent
    directory; on a bucket the object appears, whole, when the file is closed."""
    if mode not in ("r", "rb", "w", "wb"):
        raise ValueError(f"mode {mode!r} for {p}: whole-file 'r', 'rb', 'w' or 'wb' (appends: open_append)")
    encoding = None if "b" in mode else (encoding or "utf-8")
    if not is_url(p):
        if "w" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        return builtins.open(p, mode, encoding=encoding)
    fs, path = _fs(p)
    return fs.open(path, mode, encoding=encoding)


def read_text(p: str) -> str:
    with open(p, "r") as f:
        return f.read()


def read_bytes(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def write_text_atomic(p: str, text: str) -> None:
    """Replace the file `p` by `text` so that a reader, or a crash, sees the old content or the new, never
    part: locally a synced temporary file renamed over `p`; on a bucket one object upload."""
    write_bytes_atomic(p, text.encode("utf-8"))


def write_bytes_atomic(p: str, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    if is_url(p):
        fs, path = _fs(p)
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(os.path.abspath(p))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(p)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, p)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def rmtree(p: str) -> None:
    """Delete `p` and everything under it, if it is there."""
    if not is_url(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    fs, path = _fs(p)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


class AppendFile:
    """A binary file written at its end, flushed to where readers see it (`open_append`).

    Locally the file itself. For a URL, a local copy of the object that each `flush` uploads whole: a
    bucket has no append, and a torn upload leaves the previous object, so readers always see a prefix
    of what was written.
    """

    def __init__(self, p: str):
        self.path = p
        self._remote = _fs(p) if is_url(p) else None
        if self._remote is None:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            self._file = builtins.open(p, "ab")
            return
        fs, path = self._remote
        handle, self._mirror = tempfile.mkstemp(prefix="vrft-append-")
        os.close(handle)
        if fs.isfile(path):
            fs.get_file(path, self._mirror)
        self._file = builtins.open(self._mirror, "ab")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def flush(self) -> None:
        """What was written, to the OS (locally) or into the object (a URL)."""
        self._file.flush()
        if self._remote is not None:
            fs, path = self._remote
            fs.put_file(self._mirror, path)

    def sync(self) -> None:
        """What was written, onto the disk (locally: fsync) or into the object."""
        self.flush()
        if self._remote is None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
        if self._remote is not None:
            os.remove(self._mirror)

    def __enter__(self) -> AppendFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_append(p: str) -> AppendFile:
    """`p` (created if missing) opened to write at its end; see `AppendFile`."""
    return AppendFile(p)


# ------------------------------------------------------------------------------------------ trees


def files(p: str) -> dict[str, dict[str, Any]]:
    """Every file under directory `p`: {path relative to `p` ('/'-separated): its listing entry}."""
    fs, root = _fs(p)
    found = fs.find(root, detail=True)
    prefix = root.rstrip("/") + "/"
    return {name[len(prefix):].replace(os.sep, "/"): info for name, info in found.items()
            if name.startswith(prefix) and info.get("type", "file") == "file"}


def copy_tree(src: str, dst: str, *, last: Iterable[str] = ()) -> list[str]:
    """Copy every file under `src` to the same relative path under `dst` (either may be a URL), replacing
    files there; the ones whose relative path or name is in `last` are copied after all the others, so a
    reader that looks for them finds a complete tree. Returns the relative paths copied."""
    names = sorted(files(src))
    if not names:
        raise FileNotFoundError(f"no files under {src} to copy")
    last = set(last)
    tail = [n for n in names if n in last or posixpath.basename(n) in last]
    head = [n for n in names if n not in tail]
    for batch in (head, tail):
        if batch:
            _copy_files([join(src, *n.split("/")) for n in batch], [join(dst, *n.split("/")) for n in batch])
    return names


def _copy_files(sources: list[str], destinations: list[str]) -> None:
    """Copy each source file to its destination: the clients' bulk transfers between local and remote."""
    local_source, local_destination = not is_url(sources[0]), not is_url(destinations[0])
    if local_source and local_destination:
        for s, d in zip(sources, destinations):
            os.makedirs(os.path.dirname(d), exist_ok=True)
            shutil.copyfile(s, d)
    elif local_source:
        fs, _ = _fs(destinations[0])
        fs.put([os.path.abspath(s) for s in sources], [_fs(d)[1] for d in destinations])
    elif local_destination:
        fs, _ = _fs(sources[0])
        fs.get([_fs(s)[1] for s in sources], [os.path.abspath(d) for d in destinations])
    else:
        for s, d in zip(sources, destinations):
            with open(s, "rb") as a, open(d, "wb") as b:
                shutil.copyfileobj(a, b)


def _digest(listing: dict[str, dict[str, Any]]) -> str:
    """A digest of a tree from its listing alone (each file's relative path, size and the store's checksum:
    crc32c or MD5 on GCS, the modification time locally), so a change is seen without reading the data."""
    entries = []
    for name, info in sorted(listing.items()):
        stamp = info.get("crc32c") or info.get("md5Hash") or info.get("etag") or info.get("mtime")
        entries.append([name, int(info.get("size") or 0), str(stamp)])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def local_copy(p: str, cache_dir: str) -> str:
    """A local directory holding the tree at `p`: `p` itself when it is local, else a copy staged under
    `cache_dir` (local), named by the URL and a digest of its listing (`_digest`). Staged once per host:
    later calls, and the other processes of the host, find the copy; a changed remote tree is staged
    again, and the copies of its older contents removed. Processes racing to stage write separate
    temporary directories and the first rename wins."""
    if not is_url(p):
        return os.path.abspath(p)
    listing = files(p)
    if not listing:
        raise FileNotFoundError(f"no files under {p} to stage")
    digest = _digest(listing)
    key = hashlib.sha256(p.rstrip("/").encode()).hexdigest()[:12]
    target = os.path.join(os.path.abspath(cache_dir), f"{key}-{digest[:16]}")
    if not os.path.isdir(target):
        os.makedirs(cache_dir, exist_ok=True)
        temporary = tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-")
        try:
            copy_tree(p, temporary)
            os.rename(temporary, target)
        except OSError:
            if not os.path.isdir(target):  # not another process's rename winning the race
                raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    for name in os.listdir(cache_dir):
        if name.startswith(f"{key}-") and name != os.path.basename(target):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ runs


def require_shared(workdir: str, shared_mount: bool) -> None:
    """Refuse, in a run of several processes, a workdir that they would not all see: a local path (each
    host has its own disk) unless the recipe declares `shared_mount` (a file system mounted on every
    host), and with `shared_mount` a relative path (each process resolves it against its own cwd)."""
    import jax  # here: the rest of this module serves modules that do not import JAX (the tokenizer's)

    count = jax.process_count()
    if count == 1 or is_url(workdir):
        return
    if not shared_mount:
        raise ValueError(f"workdir {workdir!r} is a local path, but this run has {count} processes, each with "
                         "its own disk: give a gs:// URL, or set shared_mount=True if it is on a file system "
                         "mounted on every host")
    if not os.path.isabs(workdir):
        raise ValueError(f"workdir {workdir!r} is relative: with shared_mount=True give its absolute path on the "
                         "shared mount (each process resolves a relative path against its own working directory)")
