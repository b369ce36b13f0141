// LayerNorm2d's host helpers: the input's memory format and shape, and which kernel family a
// layout takes.
// Shared by the forward and backward units (layer_norm2d_forward.cu, layer_norm2d_backward.cu).
#pragma once

#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "launch/groups.h"
#include "launch/positions.h"

namespace fastnorm {

// The memory format fastnorm/ops/common.py's memory_format_of gives: the output's, and the layout
// the kernels read (rows for channels_last).
inline at::MemoryFormat format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

struct Shape2d {
  int64_t N = 0, C = 0, S = 1;
  int64_t positions() const { return N * S; }
};

inline Shape2d shape_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of shape (N, C, *) with at least 2 "
              "dimensions, got input of shape ", x.sizes());
  Shape2d s;
  s.N = x.size(0);
  s.C = x.size(1);
  for (int64_t i = 2; i < x.dim(); ++i) s.S *= x.size(i);
  return s;
}

// Rows of C contiguous elements: channels_last input, or S == 1 (then NCHW is rows too).
inline bool rows_layout(at::MemoryFormat fmt, const Shape2d& s) {
  return fmt != at::MemoryFormat::Contiguous || s.S == 1;
}

}  // namespace fastnorm
