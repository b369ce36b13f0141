// Kernels with planted defects (and a few correct ones), built into the emulation only, so the
// tests can show that each check of the emulator fires: torch.ops.fastnorm_emu.selftest(name, out).
// Written in CUDA and rewritten like csrc/ (rewrite.py); `out` is a float32 CPU tensor.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "device.h"

namespace fastnorm_emu_selftest {

// Correct: every lane's result of the four shuffle modes, width 8 and 32.
__global__ void __launch_bounds__(64) shfl_modes(float* out) {
  const int t = threadIdx.x;
  const float v = static_cast<float>(t);
  out[0 * 64 + t] = __shfl_sync(0xffffffffu, v, 5, 8);
  out[1 * 64 + t] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  out[2 * 64 + t] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  out[3 * 64 + t] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * 64 + t] = __shfl_down_sync(0xffffffffu, v, 7);
}

// Correct: a half-warp shuffle with a half-warp mask.
__global__ void __launch_bounds__(32) shfl_partial_mask(float* out) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (t < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1, 16);
  out[t] = v;
}

// Defect: lanes 16..31 skip a full-mask shuffle.
__global__ void __launch_bounds__(32) shfl_divergent(float* out) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (t < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[t] = v;
}

// Defect: the two halves of a warp meet at different shuffles.
__global__ void __launch_bounds__(32) shfl_two_sites(float* out) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (t < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[t] = v;
}

// Defect: half the block waits at one barrier, half at another.
__global__ void __launch_bounds__(64) barrier_divergent(float* out) {
  const int t = threadIdx.x;
  if (t < 32) __syncthreads();
  __syncthreads();
  out[t] = 1.0f;
}

// Correct: threads that exit before a barrier do not block the others.
__global__ void __launch_bounds__(64) barrier_after_exit(float* out) {
  __shared__ float sh[64];
  const int t = threadIdx.x;
  if (t >= 40) return;
  sh[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = sh[39 - t];
}

// Defect (a race): every thread writes one shared slot, then a barrier, then one reader. The
// value read depends on the order threads ran in: the scheduling variants disagree.
__global__ void __launch_bounds__(64) shared_race(float* out) {
  __shared__ float sh[1];
  sh[0] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = sh[0];
}

// Defect: shared memory read before any thread wrote it (fresh shared memory is NaN).
__global__ void __launch_bounds__(32) shared_uninitialized(float* out) {
  __shared__ float sh[32];
  if (threadIdx.x > 0) sh[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = sh[(threadIdx.x + 31) % 32];
}

// Defect: a block larger than the kernel's __launch_bounds__.
__global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }

// Defects the sanitizer variant catches: one element past a shared array, one past `out`,
// a 16-byte load from an address that is not 16-byte aligned.
__global__ void __launch_bounds__(32) shared_overrun(float* out) {
  __shared__ float sh[32];
  sh[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = sh[threadIdx.x + 1];
}

__global__ void __launch_bounds__(32) global_overrun(float* out) { out[threadIdx.x + 1] = 1.0f; }

__global__ void __launch_bounds__(32) misaligned_vector(float* out) {
  const uint4 u = *reinterpret_cast<const uint4*>(out + 1);
  out[threadIdx.x] = static_cast<float>(u.x & 1u);
}

// Correct: dynamic shared memory of the launch's size.
__global__ void __launch_bounds__(32) dynamic_shared_sum(float* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  float* sh = reinterpret_cast<float*>(raw);
  sh[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < 32; ++i) s += sh[i];
    out[0] = s;
  }
}

void selftest(const std::string& name, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 320,
              "selftest: out must be a contiguous float32 tensor of at least 320 elements");
  float* o = out.data_ptr<float>();
  using fastnorm::launch;
  if (name == "shfl_modes") launch(shfl_modes, 1, 64, 0, nullptr, o);
  else if (name == "shfl_partial_mask") launch(shfl_partial_mask, 1, 32, 0, nullptr, o);
  else if (name == "shfl_divergent") launch(shfl_divergent, 1, 32, 0, nullptr, o);
  else if (name == "shfl_two_sites") launch(shfl_two_sites, 1, 32, 0, nullptr, o);
  else if (name == "barrier_divergent") launch(barrier_divergent, 1, 64, 0, nullptr, o);
  else if (name == "barrier_after_exit") launch(barrier_after_exit, 1, 64, 0, nullptr, o);
  else if (name == "shared_race") launch(shared_race, 1, 64, 0, nullptr, o);
  else if (name == "shared_uninitialized") launch(shared_uninitialized, 1, 32, 0, nullptr, o);
  else if (name == "launch_bounds") launch(bounded, 1, 128, 0, nullptr, o);
  else if (name == "block_too_large") launch(bounded, 1, 2048, 0, nullptr, o);
  else if (name == "grid_y_too_large") launch(bounded, dim3(1, 70000), 32, 0, nullptr, o);
  else if (name == "dynamic_shared") launch(dynamic_shared_sum, 1, 32, 32 * sizeof(float), nullptr, o);
  else if (name == "dynamic_shared_over_48k") launch(bounded, 1, 32, 64 * 1024, nullptr, o);
  else if (name == "dynamic_shared_opt_in") {
    FASTNORM_DEVICE_CHECK(cudaFuncSetAttribute(dynamic_shared_sum,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    launch(dynamic_shared_sum, 1, 32, 64 * 1024, nullptr, o);
  }
  else if (name == "shared_overrun") launch(shared_overrun, 1, 32, 0, nullptr, o);
  else if (name == "global_overrun") launch(global_overrun, 1, 32, 0, nullptr, out.data_ptr<float>() + out.numel() - 32);
  else if (name == "misaligned_vector") launch(misaligned_vector, 1, 32, 0, nullptr, o);
  else TORCH_CHECK(false, "selftest: unknown kernel ", name);
}

}  // namespace fastnorm_emu_selftest

TORCH_LIBRARY_FRAGMENT(fastnorm_emu, m) { m.def("selftest(str name, Tensor(a!) out) -> ()"); }

TORCH_LIBRARY_IMPL(fastnorm_emu, CPU, m) {
  m.impl("selftest", [](c10::string_view name, at::Tensor out) {
    fastnorm_emu_selftest::selftest(std::string(name), out);
  });
}
