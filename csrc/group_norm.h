// The shape of a GroupNorm / InstanceNorm call, checked as ATen's native_group_norm checks it;
// shared by the forward and backward units (group_norm_forward.cu, group_norm_backward.cu).
#pragma once

#include "common.h"

namespace fastnorm {

// (N, C, *) with HW = the product of the spatial sizes, G groups of Cg channels.
struct Dims {
  int64_t N = 0, C = 0, HW = 1, G = 1, Cg = 0;
};

inline Dims dims_of(const at::Tensor& x, int64_t num_groups, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of rank >= 2 (N, C, *), got shape ", x.sizes());
  Dims d;
  d.N = x.size(0);
  d.C = x.size(1);
  for (int64_t i = 2; i < x.dim(); ++i) d.HW *= x.size(i);
  TORCH_CHECK(num_groups > 0 && d.C % num_groups == 0, op, ": num_groups (", num_groups,
              ") must be positive and divide the number of channels (", d.C, ")");
  // as ATen's native_group_norm: empty groups are an error, an empty batch is not
  TORCH_CHECK(d.C > 0, op, ": expected number of channels to be greater than 0, got ", d.C,
              " (input shape ", x.sizes(), ")");
  TORCH_CHECK(d.HW > 0, op, ": expected HxW to be greater than 0, got ", d.HW, " (input shape ",
              x.sizes(), ")");
  d.G = num_groups;
  d.Cg = d.C / num_groups;
  return d;
}

}  // namespace fastnorm
