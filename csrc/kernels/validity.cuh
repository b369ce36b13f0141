// Which positions of a sample count: the masked norms (fastnorm/masked.py) run on the per-(n, c)
// ops with a validity (csrc/nc_norm.cu). Position j of sample n (its flat spatial index) is valid
//   lengths: when j % W < lengths[n], W the last dimension's size (a prefix of every line of the
//            last dimension; a length outside [0, W] acts clamped), or
//   mask:    when mask[n * L + j] (bool [N, L]).
// The kernels take it as a compile-time flag (MASKED), so their unmasked instantiations are the
// code they were; which of the two forms is a run-time choice, uniform over the grid.
// Framework-free (cuda only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pack.cuh"

namespace fastnorm {

struct Validity {
  const int64_t* lengths = nullptr;  // [N]
  const bool* mask = nullptr;        // [N, L]
  int64_t L = 0;                     // positions per sample
  int64_t W = 1;                     // the last dimension: position j lies in column j % W
  int64_t C = 1;                     // rows per sample in the rows kernels: row (n, c), n = row / C
  FastDiv w_div;                     // j / W when !div64
  bool div64 = false;                // L >= 2^31: 64-bit division

  // What a row or an item of sample n reads once: the start of its mask row, or its length.
  struct Sample {
    const bool* m;
    int64_t len;
  };
  __device__ __forceinline__ Sample sample(int64_t n) const {
    return mask != nullptr ? Sample{mask + n * L, 0} : Sample{nullptr, lengths[n]};
  }
  __device__ __forceinline__ int64_t column(int64_t j) const {
    if (W == L) return j;  // one line per sample (a sequence): no division
    const int64_t line = div64 ? j / W : static_cast<int64_t>(w_div.div(static_cast<uint32_t>(j)));
    return j - line * W;
  }
  __device__ __forceinline__ bool ok(const Sample& s, int64_t j) const {
    return s.m != nullptr ? s.m[j] : column(j) < s.len;
  }
  // The end of the positions a reduction over [e0, e1) of a sample's row must read, a multiple of
  // vec: with lengths on one line per sample the row stops at its length (the loads past it are
  // skipped, not only masked); otherwise e1.
  __device__ __forceinline__ int64_t reduce_end(const Sample& s, int64_t e1, int vec) const {
    if (s.m != nullptr || W != L) return e1;
    const int64_t len = s.len < 0 ? 0 : s.len;
    const int64_t end = (len + vec - 1) / vec * vec;
    return end < e1 ? end : e1;
  }
};

}  // namespace fastnorm
