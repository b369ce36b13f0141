// BatchNorm's host helpers: argument checks, the input's layout (NCHW or NHWC view), pack widths, the activation flag.
// Shared by the forward and backward units (batch_norm_forward.cu, batch_norm_backward.cu).
#pragma once

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "kernels/channels_backward.cuh"
#include "kernels/channels_forward.cuh"
#include "launch/channels.h"

namespace fastnorm {

using at::Tensor;
using namespace channels;  // the BatchNorm plans of launch/channels.h

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A per-channel [C] tensor: same device as the input, C elements, a kernel dtype.
inline void check_channel_tensor(const Tensor& t, const Tensor& input, int64_t C, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "fastnorm batch_norm: ", name,
              " is on ", t.device(), " but the input is on ", input.device());
  TORCH_CHECK(t.numel() == C, "fastnorm batch_norm: ", name, " should have ", C,
              " elements (one per channel), got shape ", t.sizes());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "fastnorm batch_norm: ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

// weight, bias, running statistics: the input's dtype or float32 (the AMP case), as ATen.
inline void check_param_tensor(const Tensor& t, const Tensor& input, int64_t C, const char* name) {
  check_channel_tensor(t, input, C, name);
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat,
              "fastnorm batch_norm: ", name, " must have the input's dtype (", input.scalar_type(),
              ") or float32, got ", t.scalar_type());
}

inline Tensor defined_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? *t : Tensor();
}

// The input as one of the two dense views the kernels take.
struct Layout {
  Tensor x;               // dense, in `format`
  at::MemoryFormat format;  // memory format of x and of the outputs
  bool nhwc;              // [R, C] view (channels_last, or S == 1); else [N, C, S]
  int64_t N, C, S;
};

inline Layout make_layout(const Tensor& input) {
  Layout l;
  const int64_t dim = input.dim();
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = 1;
  for (int64_t d = 2; d < dim; ++d) l.S *= input.size(d);
  const bool cl = (dim == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (dim == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (cl && !input.is_contiguous()) {
    l.x = input;
    l.format = dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    l.nhwc = true;
  } else {
    // Contiguous (including the shapes that are both contiguous and channels_last: the memory
    // order is the same then), or any other strides: a contiguous copy.
    l.x = input.is_contiguous() ? input : input.contiguous();
    l.format = at::MemoryFormat::Contiguous;
    l.nhwc = l.S == 1;  // (N, C), (N, C, 1, ...): rows of C
  }
  return l;
}

// A tensor with x's sizes laid out like x (for dy).
inline Tensor like_layout(const Tensor& t, const Layout& l) {
  return t.is_contiguous(l.format) ? t : t.contiguous(l.format);
}

// A pack of V elements is legal when it lies inside one channel's run (NCHW: V | S) or one row
// (NHWC: V | C) and every pointer is aligned to the pack's size.
inline bool pack_ok(const Layout& l, int V, size_t bytes, std::initializer_list<const Tensor*> ts) {
  if (V <= 1) return false;
  if ((l.nhwc ? l.C : l.S) % V != 0) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->numel() > 0 && !is_aligned(t->data_ptr(), bytes)) return false;
  return true;
}

// Calls f with the widest legal pack width (std::integral_constant): 16 bytes, else 8 bytes
// (fp16 / bf16 with S = 196, ResNet-50's 14x14 stage, or any S = 4 mod 8), else one element.
template <typename scalar_t, typename F>
inline void with_pack_width(const Layout& l, std::initializer_list<const Tensor*> ts, F&& f) {
  constexpr int V16 = kVec16<scalar_t>, V8 = 8 / static_cast<int>(sizeof(scalar_t));
  if (pack_ok(l, V16, 16, ts)) {
    f(std::integral_constant<int, V16>{});
    return;
  }
  if constexpr (V8 > 1) {
    if (pack_ok(l, V8, 8, ts)) {
      f(std::integral_constant<int, V8>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

// Calls f with the kernels' ACT flag (std::bool_constant): the activation epilogue is compiled in
// only when there is one; identity runs the plain kernels.
template <typename F>
inline void with_act(const Activation& act, F&& f) {
  if (act.kind != kActIdentity) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace fastnorm
