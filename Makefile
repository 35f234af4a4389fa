# One command each, on a fresh machine: `make demo`, `make test`.
# Both create .venv, install the pinned dependencies, build the extension, then run.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)
NVCC := $(shell command -v nvcc 2>/dev/null)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# The CUDA build of `make cuda-build`: a second environment with the CUDA torch from PyPI
# (--isolated skips any local CPU wheel that pip's configuration points at), built for these
# GPU architectures in its own build folder, and installed (not editable) so that it never
# shares pycomm/_C*.so with the CPU build of .venv.
VENV_CUDA := .venv-cuda
PY_CUDA := $(VENV_CUDA)/bin/python
CUDA_ARCHS ?= 8.0;9.0
# The CPU tests that also run against the CUDA build (every op family's kernels, the compressed
# collective and the CPU-vs-reference checks); the whole suite runs in `make test`.
CUDA_BUILD_TESTS ?= tests/ops/test_kernels.py tests/ops/test_quantize_ops.py tests/ops/test_dgc_ops.py \
	tests/ops/test_philox_ops.py tests/ops/test_codec.py tests/ops/test_lgreco_solver.py tests/ops/test_layer_errors.py \
	tests/ops/test_opcheck.py tests/collectives/test_quantized_all_reduce.py

.PHONY: all demo test bench cuda-check cuda-build gpu-check clean

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

$(VENV_CUDA)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV_CUDA)
	$(PY_CUDA) -m pip install -q --isolated pip==26.3
	$(PY_CUDA) -m pip install -q --isolated torch==$(TORCH_VERSION) -r requirements.txt
	touch $@

$(VENV_CUDA)/.built: $(VENV_CUDA)/.deps $(SOURCES) $(shell find pycomm -name '*.py')
	PYCOMM_CUDA=1 PYCOMM_WERROR=1 PYCOMM_BUILD_BASE=build/cuda TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(JOBS) \
		$(PY_CUDA) -m pip install -q --isolated --no-build-isolation --no-deps .
	touch $@

# Builds, links and loads the whole CUDA extension (no GPU needed), checks that every op has its
# CUDA kernel, and runs the CPU tests above against that build. Run from $(VENV_CUDA) so that
# `import pycomm` finds the installed CUDA build, not the source tree.
cuda-build: $(VENV_CUDA)/.built
	cd $(VENV_CUDA) && PYCOMM_EXPECT_CUDA_KERNELS=1 bin/python -m pytest -q -c ../pytest.ini --rootdir .. \
		-p no:cacheprovider $(addprefix ../,$(CUDA_BUILD_TESTS))

test: $(VENV)/.built cuda-check
	$(PY) -m pytest -q tests

demo: $(VENV)/.built
	$(PY) -m pycomm demo

bench: $(VENV)/.built
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=bench/latest.json
	$(PY) bench/ratios.py bench/latest.json

# On a machine with a CUDA GPU: build with the machine's own torch (no venv, no downloads), run
# the CUDA tests, the hooks at W = 2 and 4 on one GPU and the GPU benchmarks, within 8 minutes.
# Writes $(OUT)/summary.md and summary.json; see bench/gpu_check.py.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) bench/gpu_check.py --out $(OUT)

clean:
	rm -rf build $(VENV) $(VENV_CUDA) *.egg-info pycomm/_C*.so
