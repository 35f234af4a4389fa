# One command each, on a fresh machine: `make demo`, `make test`.
# Both create .venv, install the pinned dependencies, build the extension, then run.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)
NVCC := $(shell command -v nvcc 2>/dev/null)

.PHONY: all demo test bench cuda-check clean

all: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# Compiles every csrc/cuda/*.cu with nvcc (sm_80, sm_90) and runs the C++ tests.
cuda-check:
ifneq ($(NVCC),)
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure
else
	@echo "nvcc not found: skipping the CUDA compile check"
endif

test: $(VENV)/.built cuda-check
	$(PY) -m pytest -q tests

demo: $(VENV)/.built
	$(PY) -m pycomm demo

bench: $(VENV)/.built
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=bench/latest.json
	$(PY) bench/ratios.py bench/latest.json

clean:
	rm -rf build $(VENV) *.egg-info pycomm/_C*.so
