// Strided channels: a channel (or a group of channels) is strided through memory.
//   BatchNorm NCHW  [N, C, S]  (S = prod(spatial)): channel c owns N runs of S contiguous elements.
//   BatchNorm NHWC  [R, C]     (R = N * S: channels_last / channels_last_3d, or S == 1).
//   GroupNorm / InstanceNorm channels_last: x[n] is an [HW, C] matrix; group g is the column
//   block [g*Cg, (g+1)*Cg).
// This file: what the strided kernels share (cursors, chunked Welford merges, trees over the row
// lanes of a block). The kernels: channels_forward.cuh, channels_backward.cuh. Host plans and
// launches: csrc/launch/channels.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace channels {

constexpr int kThreads = 256;  // every kernel here: 256 threads (1-D for NCHW, tx * ty for NHWC)
constexpr int kUnroll = 4;     // independent loads in flight per thread per iteration

constexpr int kClThreads = 256;  // bx * by never exceeds this

struct ClShape {
  int64_t N = 0, HW = 0, C = 0, G = 1, Cg = 1;
  int64_t K = 1, rpc = 1;  // HW split into K chunks of rpc rows
  int64_t CT = 1;          // channel tiles of bx packs
  int bx = 1, by = 1;      // blockDim.x == bx * by <= kClThreads
};

// Merge a chunk of `cnt` values per channel into K running states that share one count (every
// channel of a thread has seen the same number of values). The chunk is given relative to the
// current mean: dm = mean(v - mean), cm2 = sum((v - mean - dm)^2). Working on deviations keeps
// the precision for data far from zero (1e4 + N(0, 1) in fp32: v - mean is exact there). One
// division per chunk, shared by the K channels. Exact when count == 0 (f = 1, g = 0).
template <typename acc_t, int K>
__device__ __forceinline__ void merge_chunk(acc_t (&mean)[K], acc_t (&m2)[K], acc_t& count,
                                            const acc_t (&dm)[K], const acc_t (&cm2)[K],
                                            acc_t cnt) {
  const acc_t n = count + cnt;
  const acc_t f = cnt / n;
  const acc_t g = count * f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    mean[k] += dm[k] * f;
    m2[k] += cm2[k] + dm[k] * dm[k] * g;
  }
  count = n;
}

// Chunk statistics of L values d[0..L) (deviations from the current mean), L a power of two.
template <typename acc_t, int L>
__device__ __forceinline__ void chunk_stats(const acc_t (&d)[L], acc_t& dm, acc_t& cm2) {
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < L; ++i) sum += d[i];
  dm = sum * (acc_t(1) / acc_t(L));  // power of two: exact scaling
  acc_t q = acc_t(0);
#pragma unroll
  for (int i = 0; i < L; ++i) {
    const acc_t e = d[i] - dm;
    q += e * e;
  }
  cm2 = q;
}

// Chan merge of VEC states that share one count (the same rows of VEC channels).
template <typename A, int VEC>
__device__ __forceinline__ void merge_shared_count(A (&ma)[VEC], A (&qa)[VEC], A& ca,
                                                   const A* mb, const A* qb, A cb) {
  if (cb == A(0)) return;
  if (ca == A(0)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ma[v] = mb[v];
      qa[v] = qb[v];
    }
    ca = cb;
    return;
  }
  const A n = ca + cb;
  const A f = cb / n;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const A d = mb[v] - ma[v];
    ma[v] += d * f;
    qa[v] += qb[v] + d * d * ca * f;
  }
  ca = n;
}

// ---------------------------------------------------------------------------------------------
// NCHW traversal. Channel c's elements, counted in vectors of V (V divides S): flat index
// i in [0, N * Sv), i = n * Sv + s, at vector offset (n * C + c) * Sv + s. A thread visits
// i = start, start + step, ...; the cursor advances (offset, s) without a division per element.
struct NchwCursor {
  int64_t off;        // vector offset of the current element
  int64_t s;          // its position inside the row (vectors)
  int64_t remaining;  // elements left for this thread
  int64_t sv, doff, ds, wrap;

  __device__ __forceinline__ void init(int64_t start, int64_t step, int64_t N, int64_t C,
                                       int64_t Sv, int64_t c) {
    sv = Sv;
    const int64_t M = N * Sv;
    if (start >= M || Sv == 0) {
      remaining = 0;
      off = s = doff = ds = wrap = 0;
      return;
    }
    remaining = (M - 1 - start) / step + 1;
    const int64_t n = start / Sv;
    s = start - n * Sv;
    off = (n * C + c) * Sv + s;
    const int64_t dn = step / Sv;
    ds = step - dn * Sv;
    doff = dn * C * Sv + ds;
    wrap = (C - 1) * Sv;
  }
  __device__ __forceinline__ void next() {
    off += doff;
    s += ds;
    if (s >= sv) {
      s -= sv;
      off += wrap;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Block-level reductions with a fixed order.

// NHWC blocks are (tx, ty): threadIdx.x picks V channels, threadIdx.y a row lane. Merge the
// states of the ty row lanes per channel with a tree over threadIdx.y (ty a power of two).
// Every thread returns the total for its V channels. `smem`: 3 * blockDim.x * blockDim.y * V.
template <typename acc_t, int V>
__device__ __forceinline__ void tree_merge_rows(acc_t (&mean)[V], acc_t (&m2)[V],
                                                acc_t (&cnt)[V], acc_t* smem) {
  const int W = blockDim.x * V;
  const int plane = blockDim.y * W;
  acc_t* s_mean = smem;
  acc_t* s_m2 = smem + plane;
  acc_t* s_cnt = smem + 2 * plane;
  const int col = threadIdx.x * V;
  __syncthreads();  // smem may still be read by a previous call
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = threadIdx.y * W + col + j;
    s_mean[i] = mean[j];
    s_m2[i] = m2[j];
    s_cnt[i] = cnt[j];
  }
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = threadIdx.y * W + col + j;
        const int o = (threadIdx.y + stride) * W + col + j;
        Welford<acc_t> a(s_mean[i], s_m2[i], s_cnt[i]);
        a.merge(Welford<acc_t>(s_mean[o], s_m2[o], s_cnt[o]));
        s_mean[i] = a.mean;
        s_m2[i] = a.m2;
        s_cnt[i] = a.count;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mean[j] = s_mean[col + j];
    m2[j] = s_m2[col + j];
    cnt[j] = s_cnt[col + j];
  }
}

// Same tree for two sums per channel. `smem`: 2 * blockDim.x * blockDim.y * V.
template <typename acc_t, int V>
__device__ __forceinline__ void tree_sum2_rows(acc_t (&a)[V], acc_t (&b)[V], acc_t* smem) {
  const int W = blockDim.x * V;
  const int plane = blockDim.y * W;
  acc_t* s_a = smem;
  acc_t* s_b = smem + plane;
  const int col = threadIdx.x * V;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int i = threadIdx.y * W + col + j;
    s_a[i] = a[j];
    s_b[i] = b[j];
  }
  __syncthreads();
  for (int stride = blockDim.y >> 1; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = threadIdx.y * W + col + j;
        const int o = (threadIdx.y + stride) * W + col + j;
        s_a[i] = s_a[i] + s_a[o];
        s_b[i] = s_b[i] + s_b[o];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = s_a[col + j];
    b[j] = s_b[col + j];
  }
}

// ---------------------------------------------------------------------------------------------
// Arguments.

// What the apply kernels take their per-channel coefficients from.
enum ApplyMode : int {
  kModeFinal = 0,  // the finalize kernel's output (workspace `coef`)
  kModeEval = 1,   // the running statistics (forward eval) / rstd and weight (backward eval, dx only)
  kModeFused = 2,  // statistics of the block's own chunk, which is the whole channel (grid of one
                   // chunk): stats + finalize + apply in one launch
};

}  // namespace channels
}  // namespace fastnorm
