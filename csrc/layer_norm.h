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

}  // namespace fastnorm
