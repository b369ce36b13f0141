// Welford statistics: per-thread accumulation and Chan's pairwise merge, combined across a warp and
// a block in a fixed order so results are bitwise repeatable. Framework-free (cuda only).
#pragma once
#include <cuda_runtime.h>

namespace fastnorm {

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;     // sum of squared deviations from the mean
  acc_t count;  // acc_t, not int: counts merge as real weights and never overflow 2^31

  __device__ __forceinline__ Welford() : mean(0), m2(0), count(0) {}
  __device__ __forceinline__ Welford(acc_t mean_, acc_t m2_, acc_t count_)
      : mean(mean_), m2(m2_), count(count_) {}

  __device__ __forceinline__ void add(acc_t x) {
    count += acc_t(1);
    acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }

  // Chan et al.: merge two partial states. Safe when either side is empty.
  __device__ __forceinline__ void merge(const Welford& b) {
    if (b.count == acc_t(0)) return;
    if (count == acc_t(0)) { *this = b; return; }
    acc_t n = count + b.count;
    acc_t nb_over_n = b.count / n;
    acc_t delta = b.mean - mean;
    mean += delta * nb_over_n;
    m2 += b.m2 + delta * delta * count * nb_over_n;
    count = n;
  }

  __device__ __forceinline__ acc_t var_biased() const {
    return count > acc_t(0) ? m2 / count : acc_t(0);
  }
};

// Butterfly merge over the lanes of a warp (or of `width` lanes), then every lane takes the first
// lane's total. The merge order depends only on lane ids, never on timing. The broadcast is
// needed: Chan's merge is not symmetric in rounding (merge(a, b) and merge(b, a) may differ in
// the last bit), so the butterfly leaves the lanes with totals that differ in the last bit, and a
// row's lanes would normalise with different means than the one its first lane saves for the
// backward (which recomputes z from it: an activation's kink could fall on the other side).
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> w, int width = 32) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    Welford<acc_t> o(__shfl_xor_sync(0xffffffffu, w.mean, offset, width),
                     __shfl_xor_sync(0xffffffffu, w.m2, offset, width),
                     __shfl_xor_sync(0xffffffffu, w.count, offset, width));
    w.merge(o);
  }
  return Welford<acc_t>(__shfl_sync(0xffffffffu, w.mean, 0, width),
                        __shfl_sync(0xffffffffu, w.m2, 0, width),
                        __shfl_sync(0xffffffffu, w.count, 0, width));
}

// Merge across a 1-D block. `shared` holds at least blockDim.x / 32 states. Every thread returns
// the total. Must be called by all threads of the block.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_merge(Welford<acc_t> w, Welford<acc_t>* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  w = warp_merge(w);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < num_warps ? shared[lane] : Welford<acc_t>();
    w = warp_merge(w);
    if (lane == 0) shared[0] = w;
  }
  __syncthreads();
  return shared[0];
}

// Plain sums with the same fixed order (for the backward's sum(dy) and sum(dy * xhat)).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v, int width = 32) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Two sums over a block (blockDim.x a multiple of 32) in a fixed order; every thread gets both.
// sh holds 64 values. Must be called by all threads of the block.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b, acc_t* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // `sh` may still be read by a previous call
  if (lane == 0) {
    sh[warp] = a;
    sh[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    acc_t x = lane < num_warps ? sh[lane] : acc_t(0);
    acc_t y = lane < num_warps ? sh[32 + lane] : acc_t(0);
    x = warp_sum(x);
    y = warp_sum(y);
    if (lane == 0) {
      sh[0] = x;
      sh[32] = y;
    }
  }
  __syncthreads();
  a = sh[0];
  b = sh[32];
}

// Two sums over each group of `width` consecutive threads of a block (width a multiple of 32
// dividing blockDim.x): a warp tree, then the group's warps in order. Every thread gets its
// group's sums. sh holds 64 values. Must be called by all threads of the block.
template <typename acc_t>
__device__ __forceinline__ void group_sum2(acc_t& a, acc_t& b, acc_t* sh, int width) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // `sh` may still be read by a previous call
  if (lane == 0) {
    sh[warp] = a;
    sh[32 + warp] = b;
  }
  __syncthreads();
  const int wpg = width >> 5, w0 = warp - warp % wpg;
  a = sh[w0];
  b = sh[32 + w0];
  for (int i = 1; i < wpg; ++i) {
    a += sh[w0 + i];
    b += sh[32 + w0 + i];
  }
}

}  // namespace fastnorm
