// Host-side shape and dtype checks shared by the row norms' forward and backward units
// (layer_norm_forward.cu, layer_norm_backward.cu): LayerNorm, RMSNorm and add + norm.
#pragma once

#include "common.h"

namespace fastnorm {

// N = prod(normalized_shape), which must be the trailing dims of x.
inline int64_t row_length(const at::Tensor& x, at::IntArrayRef ns, const char* op) {
  const int64_t k = static_cast<int64_t>(ns.size());
  TORCH_CHECK(k >= 1 && k <= x.dim(), op, ": normalized_shape ", ns,
              " must name 1 to input.dim() trailing dims of an input of shape ", x.sizes());
  int64_t n = 1;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(x.size(x.dim() - k + i) == ns[i], op, ": expected input with trailing shape ", ns,
                ", got input of shape ", x.sizes());
    n *= ns[i];
  }
  return n;
}

inline int64_t leading_rows(const at::Tensor& x, int64_t k) {
  int64_t m = 1;
  for (int64_t i = 0; i < x.dim() - k; ++i) m *= x.size(i);
  return m;
}

// The residual stream's dtype against the input's: the same (fp32, fp16, bf16, fp64), or float32
// with a half / bf16 input. (fp64 input with an fp32 residual has no kernel.)
inline void check_residual_dtype(at::ScalarType in, at::ScalarType res, const char* op,
                                 const char* what) {
  TORCH_CHECK(res == in || (res == at::kFloat && (in == at::kHalf || in == at::kBFloat16)), op,
              ": expected ", what, " of the input's dtype (", in, ") or, with a float16 / bfloat16 "
              "input, float32; got input of dtype ", in, " and ", what, " of dtype ", res);
}

// Gated RMSNorm's rows: M rows of H = input.size(-1), G = H / group_size groups each. The gate has
// the input's shape and dtype; the gate activation is silu or sigmoid (kernels/activation.cuh's
// codes); groups fit the kernels' registers (launch/groups.h kGatedMaxGroup).
struct GatedShape {
  int64_t M = 0, H = 0, G = 0;
};

inline GatedShape gated_shape(const at::Tensor& x, const at::Tensor& gate, int64_t group_size,
                              int64_t activation, int64_t max_group, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": expected an input of at least 1 dimension");
  TORCH_CHECK(gate.sizes() == x.sizes() && gate.scalar_type() == x.scalar_type(), op,
              ": expected gate of the input's shape ", x.sizes(), " and dtype ", x.scalar_type(),
              ", got gate of shape ", gate.sizes(), " and dtype ", gate.scalar_type());
  TORCH_CHECK(gate.device() == x.device(), op, ": gate is on ", gate.device(), " but input is on ",
              x.device());
  TORCH_CHECK_VALUE(activation == kActSilu || activation == kActSigmoid, op,
                    ": activation must be silu (", int(kActSilu), ") or sigmoid (",
                    int(kActSigmoid), "), got ", activation);
  GatedShape s;
  s.H = x.size(-1);
  TORCH_CHECK(group_size > 0 && s.H % group_size == 0, op,
              ": expected group_size dividing the last dim (", s.H, "), got ", group_size);
  TORCH_CHECK(group_size <= max_group, op, ": group_size ", group_size, " is longer than the ",
              max_group, " elements the kernels hold (fastnorm.functional.gated_rms_norm computes "
              "such groups with ATen operations)");
  s.M = s.H > 0 ? x.numel() / s.H : 0;
  if (s.H == 0) {
    s.M = 1;
    for (int64_t i = 0; i + 1 < x.dim(); ++i) s.M *= x.size(i);
  }
  s.G = s.H / group_size;
  return s;
}

}  // namespace fastnorm
