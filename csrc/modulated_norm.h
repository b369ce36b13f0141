// Host-side checks shared by the modulated row norms' forward and backward units
// (modulated_norm_forward.cu, modulated_norm_backward.cu): rows [M, L], modulation rows [Q, L] with
// Q = M / seg_rows (fastnorm/ops/modulated.py is the contract).
#pragma once

#include <ATen/ops/empty.h>

#include "common.h"

namespace fastnorm {

struct ModShape {
  int64_t M = 0, L = 0, Q = 0;
};

inline ModShape modulated_shape(const at::Tensor& x, int64_t seg_rows, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": expected a 2-D input [rows, D], got input of shape ", x.sizes());
  ModShape s;
  s.M = x.size(0);
  s.L = x.size(1);
  TORCH_CHECK(seg_rows >= 1 && s.M % seg_rows == 0, op, ": expected seg_rows >= 1 dividing the ",
              s.M, " rows, got seg_rows=", seg_rows);
  s.Q = s.M / seg_rows;
  return s;
}

// A tensor the kernels read in 16-byte packs: contiguous, and copied when its view starts off a
// 16-byte boundary (the single-element kernels hold shorter rows: launch/groups.h
// kModulatedMaxRow).
inline at::Tensor packable(const at::Tensor& t) {
  if (!t.defined()) return t;
  at::Tensor c = t.contiguous();
  return is_aligned(c.data_ptr(), 16) ? c : c.clone();
}

// An operand of rows of L elements (shape: [L] for weight and bias, [Q, L] for the modulation's
// scale, shift and gate), on the input's device, of the input's dtype dt or float32.
inline at::Tensor row_operand(const std::optional<at::Tensor>& t, at::Device device,
                              at::ScalarType dt, at::IntArrayRef shape, const char* op,
                              const char* name) {
  if (!has(t)) return at::Tensor();
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but input is on ",
              device);
  TORCH_CHECK(t->scalar_type() == dt || t->scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype (", dt, ") or float32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", name,
              " of shape ", t->sizes());
  return packable(*t);
}

}  // namespace fastnorm
