# fastnorm: `make test` (the CI entry) and `make bench` (the benchmarks).
# Works on a fresh machine: creates .venv with torch 2.14.1 (a CUDA 13.0 build) when missing.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
# the tests of convert() for timm's, torchvision's, transformers' and diffusers' norm layers
# (fastnorm needs none of them); torchvision pinned to the release built for TORCH_SPEC, installed
# with it so pip keeps torch
TEST_EXTRAS ?= torchvision==0.29.1 timm transformers==5.25.0 diffusers==0.42.1
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

.PHONY: venv build test test-kernels test-emu-modules emu-build bench bench-quick gpu-check info clean

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
	$(EMU_MODULES)

# The emulation tier: csrc/ compiled by g++ against tools/cuda_emu (CUDA threads as fibers, every
# barrier and shuffle checked), the kernel tests of tests/cuda run on it; twice: plain, then under
# AddressSanitizer + UndefinedBehaviorSanitizer (exact-size buffers, misaligned vector accesses).
# Builds are cached by ninja under build/emu-*.
EMU_TESTS   := tests/cuda
ASAN_ENV     = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
               ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# On every core like the CPU suite: the xdist controller judges the kernel coverage of all workers
# together at session end (tests/conftest.py).
EMU_PLAIN    = FASTNORM_EMU=plain FASTNORM_KERNEL_TARGETS=emu $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(EMU_TESTS)
# --capture=sys: a sanitizer report is written to fd 2 by a dying process; keep fd 2 uncaptured
EMU_ASAN     = FASTNORM_EMU=asan FASTNORM_KERNEL_TARGETS=emu $(ASAN_ENV) $(PY) -m pytest -q -p no:cacheprovider --capture=sys $(XDIST) $(EMU_TESTS)

emu-build: venv
	$(PY) tools/cuda_emu/emu.py build plain asan

# The module-level tests on the emulated kernels: FASTNORM_EMU_OPS=plain routes every fastnorm:: op
# on CPU tensors to the plain emulation build and turns the CPU fast path off (tests/conftest.py,
# emu.route_ops), so modules, functional, autograd and convert() run the real kernel sources. A
# subset, chosen for kernel coverage per minute (docs/emulation.md): ~5 min on 2 cores with -n 2.
# Left out: the big model tests (minutes each in emulation) and the fast-path file (it compares
# the two CPU routes bitwise).
EMU_MODULE_TESTS := tests/test_emu_ops_switch.py tests/test_functional.py tests/test_convert.py \
  tests/test_modules_parity.py tests/test_nc_ops.py tests/test_frozen_batch_norm.py \
  tests/test_adain.py::test_matches_reference tests/test_adain.py::test_channels_last \
  tests/test_adain.py::test_only_one_input_requires_grad tests/test_adain.py::test_mixed_layouts_and_module \
  tests/test_layer_norm2d.py::test_module_matches_timm_and_float64 \
  tests/test_layer_norm2d.py::test_op_outputs_and_fake_metadata \
  tests/test_layer_norm2d.py::test_vmap_rules_of_the_ops_directly \
  tests/test_rms_norm.py::test_module_parity tests/test_rms_norm.py::test_autocast_cpu_bf16 \
  tests/test_rms_norm.py::test_eps_default_is_computation_dtype_epsilon \
  tests/test_add_norm.py::test_matches_composition_and_float64 tests/test_add_norm.py::test_one_output_used \
  tests/test_add_norm.py::test_vmap_and_per_sample_grads tests/test_add_norm.py::test_autocast_cpu_bf16 \
  tests/test_add_norm.py::test_same_dtype_grads_are_separate_tensors \
  tests/test_local_response_norm.py::test_matches_torch_and_float64 \
  tests/test_local_response_norm.py::test_module_defaults_alexnet_like \
  tests/test_local_response_norm.py::test_fake_metadata_matches tests/test_local_response_norm.py::test_opcheck \
  tests/test_local_response_norm.py::test_func_transforms \
  tests/test_local_response_norm.py::test_direct_op_call_is_differentiable \
  tests/test_switch_norm.py::test_batch_size_changes_between_steps \
  tests/test_switch_norm.py::test_switch_norm2d_layouts tests/test_switch_norm.py::test_switch_norm3d_matches_reference \
  tests/test_ibn.py::test_eval_only_and_frozen_gradients \
  tests/test_norm_act.py::test_ops_against_float64_reference tests/test_norm_act.py::test_ops_masks_and_no_weight_or_bias \
  tests/test_norm_act.py::test_ops_unknown_activation_code_raises_value_error \
  tests/test_norm_act.py::test_batch_norm_op_running_statistics_with_activation \
  tests/test_norm_act.py::test_fused_activation_saves_no_pre_activation_tensor \
  tests/test_convert_timm_act.py::test_class_each_activation tests/test_convert_timm_act.py::test_compiled_fullgraph \
  tests/test_convert_timm_act.py::test_fast_norm_mode_and_autocast \
  tests/test_convert_timm_act.py::test_state_classes_and_revert \
  "tests/test_convert_timm_act.py::test_timm_models[resnet18-kwargs3-None]" \
  tests/test_convert_third_party.py::test_timm_group_norm1 tests/test_convert_third_party.py::test_timm_layer_norm2d \
  tests/test_convert_third_party.py::test_timm_rms_norm tests/test_convert_third_party.py::test_torchvision_frozen_batch_norm \
  tests/test_convert_third_party.py::test_mixed_model tests/test_convert_third_party.py::test_torch_rms_norm_model \
  tests/test_convert_third_party.py::test_timm_vit_with_rms_norm tests/test_convert_third_party.py::test_timm_vit_layer_norm \
  tests/test_convert_third_party.py::test_timm_convnext_atto \
  tests/test_convert_third_party.py::test_timm_convnext_atto_block_layer_norm \
  tests/test_convert_third_party.py::test_timm_poolformer_s12_group_norm1 \
  tests/test_convert_third_party.py::test_timm_resnet18_group_norm \
  tests/test_convert_third_party.py::test_compiled_converted_model_fullgraph \
  tests/test_torch_samples.py::test_opinfo_samples \
  tests/test_autograd.py::test_functional_gradcheck tests/test_autograd.py::test_module_gradcheck \
  tests/test_autograd.py::test_double_backward_matches_torch tests/test_autograd.py::test_torch_func_transforms \
  tests/test_local_response_norm.py::test_gradcheck_gradgradcheck_float64 \
  tests/test_norm_act.py::test_functional_matches_the_unfused_composition tests/test_ibn.py::test_compile_fullgraph \
  tests/test_rms_norm_conventions.py tests/test_convert_huggingface.py::test_convention \
  tests/test_convert_huggingface.py::test_per_head_qk_norm tests/test_convert_huggingface.py::test_gated_without_gate \
  tests/test_modulated_norm.py tests/test_convert_diffusers_modulated.py::test_family \
  tests/test_masked_norm.py
# make has just built the plain emulation: the session loads it as it is
EMU_MODULES  = FASTNORM_EMU_OPS=plain FASTNORM_EMU_NO_BUILD=1 $(PY) -m pytest -q -p no:cacheprovider $(XDIST) \
               $(EMU_MODULE_TESTS)

test-emu-modules: build
	$(PY) tools/cuda_emu/emu.py build plain
	$(EMU_MODULES)

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
