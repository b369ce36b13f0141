# fastnorm: `make test` (the CI entry) and `make bench` (the benchmarks).
# Works on a fresh machine: creates .venv with torch 2.14.1 (a CUDA 13.0 build) when missing.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
# the tests of convert() for timm's and torchvision's norm layers (fastnorm needs neither);
# torchvision pinned to the release built for TORCH_SPEC, installed with it so pip keeps torch
TEST_EXTRAS ?= torchvision==0.29.1 timm
NVCC        := $(shell command -v nvcc 2>/dev/null)
# Build the CUDA sources whenever a toolkit exists, GPU or not (CI has nvcc but no GPU). With no
# GPU visible and TORCH_CUDA_ARCH_LIST unset, a development build is for one arch, CI's (9.0),
# not the seven a wheel for other machines gets; with a GPU, setup.py builds its arch.
DEV_ARCH_LIST ?= 9.0
BUILD_ENV   := $(if $(NVCC),FASTNORM_FORCE_CUDA=1 FASTNORM_DEFAULT_ARCH_LIST="$(DEV_ARCH_LIST)",FASTNORM_SKIP_CUDA=1)
SHELL       := /bin/bash
PYTEST_ARGS ?=
# The CPU suite runs on every core (pytest-xdist; tests/conftest.py gives each worker its share of
# torch's threads). PYTEST_JOBS=0 runs it in one process. A venv made before xdist was in the list
# above runs it in one process too.
PYTEST_JOBS ?= auto
XDIST        = $(shell $(PY) -c "import xdist" 2>/dev/null && test "$(PYTEST_JOBS)" != 0 && echo "-n $(PYTEST_JOBS)")

.PHONY: venv build test test-kernels emu-build bench bench-quick gpu-check info clean

$(VENV)/.stamp:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)" $(TEST_EXTRAS) ninja pybind11 pytest pytest-xdist numpy matplotlib setuptools wheel
	touch $@

venv: $(VENV)/.stamp

# Incremental: ninja keeps its objects in build/ext (setup.py), so a second build recompiles only
# the units whose sources changed. pip's output is filtered to setup.py's progress lines (one per
# compiled unit, then each unit's time) and errors; a failed build fails the target.
build: venv
	@set -o pipefail; $(BUILD_ENV) $(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | \
	  grep --line-buffered -E "fastnorm setup|error|Error|warning: |Successfully"
	@$(PY) -c "import fastnorm, fastnorm._ext as e; print('fastnorm extension loaded:', e.loaded)"

test: build emu-build
	$(PY) -m fastnorm.info
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)
	$(EMU_PLAIN)
	$(EMU_ASAN)

# The emulation tier: csrc/ compiled by g++ against tools/cuda_emu (CUDA threads as fibers, every
# barrier and shuffle checked), the kernel tests of tests/cuda run on it; twice: plain, then under
# AddressSanitizer + UndefinedBehaviorSanitizer (exact-size buffers, misaligned vector accesses).
# Builds are cached by ninja under build/emu-*.
EMU_TESTS   := tests/cuda
ASAN_ENV     = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
               ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
EMU_PLAIN    = FASTNORM_EMU=plain FASTNORM_KERNEL_TARGETS=emu $(PY) -m pytest -q -p no:cacheprovider $(EMU_TESTS)
# --capture=sys: a sanitizer report is written to fd 2 by a dying process; keep fd 2 uncaptured
EMU_ASAN     = FASTNORM_EMU=asan FASTNORM_KERNEL_TARGETS=emu $(ASAN_ENV) $(PY) -m pytest -q -p no:cacheprovider --capture=sys $(EMU_TESTS)

emu-build: venv
	$(PY) tools/cuda_emu/emu.py build plain asan

test-kernels: build emu-build
	$(EMU_PLAIN)
	$(EMU_ASAN)

bench: build
	$(PY) bench/run.py
	$(PY) bench/e2e.py

bench-quick: build
	$(PY) bench/run.py --quick
	$(PY) bench/e2e.py --quick

# On a GPU machine with no network: build with what is there, CUDA tests, benchmarks -> OUT
gpu-check:
	bash bench/gpu_check.sh $(or $(OUT),gpu_check_out)

info: build
	$(PY) -m fastnorm.info

clean:
	rm -rf build *.egg-info fastnorm/_C*.so fastnorm/_build_info.json
