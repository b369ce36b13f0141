# fastnorm: `make test` (the CI entry) and `make bench` (the benchmarks).
# Works on a fresh machine: creates .venv with torch 2.14.1 (a CUDA 13.0 build) when missing.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
NVCC        := $(shell command -v nvcc 2>/dev/null)
# Build the CUDA sources whenever a toolkit exists, GPU or not (CI has nvcc but no GPU).
BUILD_ENV   := $(if $(NVCC),FASTNORM_FORCE_CUDA=1,FASTNORM_SKIP_CUDA=1)
PYTEST_ARGS ?=

.PHONY: venv build test bench bench-quick gpu-check info clean

$(VENV)/.stamp:
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install "$(TORCH_SPEC)" ninja pybind11 pytest numpy matplotlib setuptools wheel
	touch $@

venv: $(VENV)/.stamp

build: venv
	$(BUILD_ENV) $(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | \
	  grep -E "fastnorm setup|error|Error|warning: |Successfully" || true
	@$(PY) -c "import fastnorm, fastnorm._ext as e; print('fastnorm extension loaded:', e.loaded)"

test: build
	$(PY) -m fastnorm.info
	$(PY) -m pytest -q $(PYTEST_ARGS)

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
