# Everyday commands. `make test` and `make bench` work on a fresh machine: they create .venv,
# install the pinned torch and the test dependencies, and build the extension in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.deps-$(TORCH_VERSION)
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: venv build test test-fast bench plot lint format cuda-check sanitize clean

venv: $(STAMP)
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	touch $@

# Rebuilt when a source changes (pip's editable build is a no-op for Python-only edits).
$(VENV)/.built: $(STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/run_all.py

plot: venv
	$(PY) benchmarks/plot.py

lint: venv
	$(PY) -m ruff check normext tests benchmarks
	-clang-format --dry-run -Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: venv
	$(PY) -m ruff format normext tests benchmarks

# Compile (not run) the CUDA kernels with nvcc against a CUDA build of torch; see DEVELOPERS.md.
cuda-check:
	bash scripts/cuda_build_check.sh

# Build with AddressSanitizer + UBSan into build/asan (the normal build is untouched) and run
# the CPU test suite against it; scripts/sanitize.sh says what gets preloaded and why.
sanitize: venv
	bash scripts/sanitize.sh

clean:
	rm -rf build *.egg-info normext/*.so $(VENV)/.built
