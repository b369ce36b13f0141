// Host-side helpers shared by every <norm>.cu: checks, dtype dispatch, launch checking.
// Light headers only: torch/extension.h costs minutes of nvcc per file.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace fastnorm {

// Every kernel launch is followed by this: a bad configuration raises at the call, not later.
#define FASTNORM_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Floating dtypes the kernels take: fp32, fp16, bf16 (fp32 statistics) and fp64 (fp64 statistics).
#define FASTNORM_DISPATCH_FLOATING(TYPE, NAME, ...)                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, \
                                  NAME, __VA_ARGS__)

// Statistics dtype: fp64 for fp64 input, fp32 otherwise.
inline at::ScalarType stat_dtype(at::ScalarType input) {
  return input == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int sm_count() {
  static thread_local int cached_device = -1, cached_count = 0;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev != cached_device) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached_count, cudaDevAttrMultiProcessorCount, dev));
    cached_device = dev;
  }
  return cached_count;
}

}  // namespace fastnorm
