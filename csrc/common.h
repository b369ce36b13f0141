// Host-side helpers shared by every <norm>.cu: dtype dispatch, statistics dtype, alignment.
// Device access (checks, guard, stream, launches) is in device.h.
// Light headers only: torch/extension.h costs minutes of nvcc per file.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "device.h"
#include "kernels/activation.cuh"
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

// Whether p (elements of `elem` bytes; null: absent) can be read or written in packs of `vec`
// elements: load_raw / store_raw need min(16, vec * elem) bytes of alignment.
inline bool pack_aligned(const void* p, int vec, size_t elem) {
  return p == nullptr || is_aligned(p, std::min<size_t>(16, size_t(vec) * elem));
}

// f(std::integral_constant<int, V>{}) with the widest pack of T that fits(V) allows: 16 bytes
// (kVec16), then 8 bytes (kVec8: fp16 at 14 x 14 = 196 positions), then single elements.
template <typename T, typename Fits, typename F>
void with_pack(const Fits& fits, F&& f) {
  if (fits(kVec16<T>)) return f(std::integral_constant<int, kVec16<T>>{});
  if constexpr (kVec8<T> > 1) {
    if (fits(kVec8<T>)) return f(std::integral_constant<int, kVec8<T>>{});
  }
  f(std::integral_constant<int, 1>{});
}

// The layout the kernels read (group_norm_*.cu, nc_norm.cu): channels_last(_3d) natively, plain
// contiguous, or a contiguous copy.
inline bool channels_last_layout(const at::Tensor& input, at::MemoryFormat& fmt) {
  if (input.is_contiguous()) {
    fmt = at::MemoryFormat::Contiguous;
    return false;
  }
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    fmt = at::MemoryFormat::ChannelsLast;
    return true;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    fmt = at::MemoryFormat::ChannelsLast3d;
    return true;
  }
  fmt = at::MemoryFormat::Contiguous;
  return false;
}

// Host-side checks shared by the op wrappers.
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_float_dtype(at::ScalarType dt, const char* op) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected a floating input (float32, float64, float16, bfloat16), got ", dt);
}

// The output dtype of a forward: the input's, or float32 when asked (CUDA autocast: the kernel
// reads the half input and writes float32, the cast fused).
inline at::ScalarType out_dtype_of(at::ScalarType dt, std::optional<at::ScalarType> out_dtype,
                                   const char* op) {
  const at::ScalarType odt = out_dtype.value_or(dt);
  TORCH_CHECK(odt == dt || odt == at::kFloat, op, ": out_dtype must be the input's dtype (", dt,
              ") or float32, got ", odt);
  return odt;
}

// An affine parameter: the input's device, the input's dtype or float32, n elements.
inline at::Tensor param(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t n,
                        const char* op, const char* name) {
  if (!has(t)) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
              x.device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype (", x.scalar_type(), ") or float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->numel() == n, op, ": ", name, " must have ", n, " elements, got ", t->numel(),
              " (input shape ", x.sizes(), ")");
  return t->contiguous();
}

// The backward's grad_out/mean/rstd against the input: device, shape, dtype.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& input,
                                  const at::Tensor& mean, const at::Tensor& rstd, const char* op) {
  const at::ScalarType dt = input.scalar_type();
  for (const at::Tensor* t : {&grad_out, &mean, &rstd})
    TORCH_CHECK(t->device() == input.device(), op, ": all tensors must be on ", input.device(),
                ", got one on ", t->device());
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dt || grad_out.scalar_type() == at::kFloat, op,
              ": grad_out must have the input's dtype (", dt, ") or float32, got ",
              grad_out.scalar_type());
}


constexpr int64_t kMaxGrid = int64_t(1) << 20;  // kernels loop (grid-stride) beyond this

// The `activation` / `activation_param` arguments of the norm ops -> the kernels' epilogue
// (kernels/activation.cuh). An unknown code is a caller's error: ValueError, as torch raises for
// a bad enum-like argument.
inline Activation activation_of(int64_t kind, double param, const char* op) {
  TORCH_CHECK_VALUE(kind >= 0 && kind < kActCount, op, ": activation must be a code in [0, ", int(kActCount),
                    ") (fastnorm.activations), got ", kind);
  Activation a;
  a.kind = static_cast<int>(kind);
  a.param = static_cast<float>(param);
  a.param64 = param;
  return a;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}
inline unsigned grid_of(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxGrid)));
}

// Options of a statistics / workspace tensor for input `like`: fp64 for fp64, fp32 otherwise.
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(stat_dtype(like.scalar_type()));
}

}  // namespace fastnorm
