# effvit: `make bench` (set up, build, run the default benchmark) and `make test` (set up, build, test).
#
# Everything goes into a virtual environment in .venv built with $(PYTHON). The pinned stack is the
# CUDA build of torch (so the CUDA kernels compile, GPU or not) and the Triton release torch pins.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BENCH_ARGS ?=
PY := $(VENV)/bin/python
MACHINE = $(shell $(PY) -c "from effvit.bench.machine import machine_name; print(machine_name('cpu'))" 2>/dev/null || echo local)

.PHONY: setup build bench test test-heavy test-fast test-fuzz bench-pytest gpu-check clean

setup: $(VENV)/.deps

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) setuptools wheel ninja
	touch $@

# Rebuilt when a kernel source or the build script changes.
$(VENV)/.built: $(VENV)/.deps setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

build: $(VENV)/.built

bench: build
	$(VENV)/bin/effvit-bench --out bench-out/$(MACHINE) $(BENCH_ARGS)

# pytest-xdist (in the test extra) spreads the tests over every core
TEST_WORKERS ?= auto
test: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests -m "not heavy"

# every model through the deployment paths and timm's own model tests (minutes a model)
test-heavy: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests -m heavy

test-fast: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests -m "not slow"

# fresh random cases instead of the fixed per-test seeds `make test` uses; a failure prints its seed
test-fuzz: build
	EFFVIT_TEST_SEED=random $(PY) -m pytest -q -n $(TEST_WORKERS) tests

# the same cases through pytest-benchmark (bench/), for its history and comparison tools
bench-pytest: build
	$(PY) -m pytest -q bench --benchmark-json=bench-out/pytest-benchmark.json

# on a machine with a GPU: build for it, run the GPU tests and benchmarks (see bench/gpu_check.sh)
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build effvit/_C*.so effvit/_build_info.json *.egg-info bench-out
