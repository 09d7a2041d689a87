"""Test session setup: 8 fake CPU devices, offline Hugging Face and a session-wide compilation cache, before
anything imports JAX."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A persistent compilation cache for this session only (fresh, and removed at exit): the tests run the same tiny
# recipes many times, in this process and in the train command's subprocesses (which inherit the variable), and
# each run would compile the same programs again. A retrieved program is the one compiling would make;
# `compile_count.counting_compiles` counts retrievals as compilations, so no recompilation hides behind it.
_CACHE = tempfile.mkdtemp(prefix="vrft-jax-compile-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
