// Host-side helpers shared by every <norm>.cu: dtype dispatch, statistics dtype, alignment.
// Device access (checks, guard, stream, launches) is in device.h.
// Light headers only: torch/extension.h costs minutes of nvcc per file.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>

#include "device.h"
#include "kernels/pack.cuh"

namespace fastnorm {

// Floating dtypes the kernels take: fp32, fp16, bf16 (fp32 statistics) and fp64 (fp64 statistics).
#define FASTNORM_DISPATCH_FLOATING(TYPE, NAME, ...)                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, \
                                  NAME, __VA_ARGS__)

// Statistics dtype: fp64 for fp64 input, fp32 otherwise.
inline at::ScalarType stat_dtype(at::ScalarType input) {
  return input == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

// A kernel operand from a tensor that is absent (undefined), of dtype T, or float32.
template <typename T>
inline Operand<T> operand(const at::Tensor& t) {
  if (!t.defined()) return Operand<T>{};
  return Operand<T>{t.data_ptr(), t.scalar_type() == at::kFloat};
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace fastnorm
