// BatchNorm CUDA kernels: the column family (a channel is strided through memory).
//
// Two views of the input, both over a dense tensor:
//   NCHW  [N, C, S]   (S = prod(spatial)): channel c owns N runs of S contiguous elements.
//   NHWC  [R, C]      (R = N * S, channels_last / channels_last_3d, or any layout with S == 1).
//
// Paths (the host picks one per call; all reductions run in a fixed order, no float atomics, so
// results are bitwise repeatable for a given shape and device):
//   general (3 launches), when a channel's reduction needs several blocks:
//     stats kernel     grid (chunks G1 x channels): each block reduces one chunk of one channel
//                      (NCHW) or one chunk of rows for a tile of channels (NHWC) and writes a
//                      partial state to a workspace [planes][G1][C];
//     finalize kernel  merges the G1 partials of each channel once (fixed order), writes mean/rstd,
//                      updates the running stats (forward) or dweight/dbias (backward), and the
//                      per-channel coefficients of the elementwise pass [k][C];
//     apply kernel     the elementwise pass (y, or dx) reading those coefficients.
//   fused (1 launch), when one block per channel (tile) suffices: the apply kernel with a grid of
//     one chunk computes its channel's statistics itself (block reduction), finalizes, and
//     streams the channel a second time (mostly from L1/L2).
//   eval: the apply kernel alone, coefficients from the running statistics (forward) or from rstd
//     and weight (backward, dx only).
//
// num_batches_tracked (factor 1/nbt for momentum None) is never read and written by one launch:
// on the general path the finalize kernel reads it (factor 1 / (nbt + 1)) and the apply kernel,
// which runs after it in stream order, increments it; on the fused path the host increments it
// with an in-place add before the launch and the kernel reads the new value. Both capture in a
// CUDA graph (no host reads, no counters to reset).
//
// Framework-free: cuda headers and welford.cuh only. scalar_t may be any type with
// static_cast to/from float/double in device code (float, double, c10::Half, c10::BFloat16).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace bn {

constexpr int kThreads = 256;  // every kernel here: 256 threads (1-D for NCHW, tx * ty for NHWC)
constexpr int kUnroll = 4;     // independent loads in flight per thread per iteration

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

template <typename scalar_t>
struct FwdArgs {
  using acc_t = acc_of<scalar_t>;
  int64_t N, C, S;  // logical [N, C, S]; NHWC rows R = N * S
  int64_t Sv;       // NCHW: S / V
  int64_t G1;       // chunks of the stats kernel (partials per channel)
  acc_t* part;      // [3][G1][C]: mean, m2, count (general path)
  acc_t* coef;      // [3][C]: mean, scale, shift (general path)
  acc_t* save_mean;
  acc_t* save_rstd;
  Operand<scalar_t> weight, bias, running_mean, running_var;  // scalar_t or float32
  int64_t* nbt;       // num_batches_tracked or null
  int64_t nbt_offset; // factor = 1 / (nbt + nbt_offset): 1 when read before the increment
  double momentum;    // used when has_momentum
  double eps;
  double n;           // N * S, exact count per channel
  int mode;           // ApplyMode of the apply kernel
  bool has_momentum;
  bool training;
  bool update_running;  // training and a running stat is given
  bool bump_nbt;        // the apply kernel increments nbt (general path)
};

// Per-channel finalize of the forward. `w` is the merged batch state (training). The writer
// (one thread per channel) stores mean/rstd and updates the running stats in their dtype.
template <typename scalar_t>
__device__ __forceinline__ void fwd_finalize(const FwdArgs<scalar_t>& a, int64_t c,
                                             const Welford<acc_of<scalar_t>>& w, bool writer, acc_of<scalar_t>& mean,
                                             acc_of<scalar_t>& scale, acc_of<scalar_t>& shift) {
  using acc_t = acc_of<scalar_t>;
  acc_t rstd;
  if (a.training) {
    const acc_t n = static_cast<acc_t>(a.n);
    mean = w.mean;
    rstd = rsqrt_acc(w.m2 / n + static_cast<acc_t>(a.eps));
    if (writer) {
      a.save_mean[c] = mean;
      a.save_rstd[c] = rstd;
      if (a.update_running) {
        acc_t f;
        if (a.has_momentum) {
          f = static_cast<acc_t>(a.momentum);
        } else {
          const long long t = static_cast<long long>(a.nbt[0]) + a.nbt_offset;
          f = static_cast<acc_t>(1.0 / static_cast<double>(t));
        }
        if (a.running_mean.present()) {
          const acc_t rm = a.running_mean.get_or(c, acc_t(0));
          a.running_mean.set(c, f * mean + (acc_t(1) - f) * rm);
        }
        if (a.running_var.present()) {
          const acc_t rv = a.running_var.get_or(c, acc_t(0));
          const acc_t unbiased = w.m2 / (n - acc_t(1));
          a.running_var.set(c, f * unbiased + (acc_t(1) - f) * rv);
        }
      }
    }
  } else {
    mean = a.running_mean.get_or(c, acc_t(0));
    rstd = rsqrt_acc(a.running_var.get_or(c, acc_t(1)) + static_cast<acc_t>(a.eps));
    if (writer) {
      a.save_mean[c] = mean;
      a.save_rstd[c] = rstd;
    }
  }
  scale = a.weight.get_or(c, acc_t(1)) * rstd;
  shift = a.bias.get_or(c, acc_t(0));
}

template <typename scalar_t>
__device__ __forceinline__ void maybe_bump_nbt(const FwdArgs<scalar_t>& a) {
  using acc_t = acc_of<scalar_t>;
  if (a.bump_nbt && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    a.nbt[0] = a.nbt[0] + 1;
  }
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = acc_of<scalar_t>;
  int64_t N, C, S, Sv;
  int64_t G1;        // chunks of the sums kernel (general path)
  acc_t* part;       // [2][G1][C]: sum(dy), sum(dy * (x - mean))
  acc_t* coef;       // [4][C]: mean, mdy, proj, gs (general path)
  const acc_t* mean;
  const acc_t* rstd;
  Operand<scalar_t> weight, dweight, dbias;  // dweight/dbias: absent when masked off
  double n;
  int mode;
  bool training;
  bool need_dx;
};

// dx = (dy - mdy - (x - mean) * proj) * gs   (training);   dx = dy * gs   (eval)
template <typename acc_t>
struct BwdCoef {
  acc_t mean, mdy, proj, gs;
};

template <typename scalar_t>
__device__ __forceinline__ BwdCoef<acc_of<scalar_t>> bwd_finalize(const BwdArgs<scalar_t>& a, int64_t c,
                                                       acc_of<scalar_t> sdy, acc_of<scalar_t> sdxm, bool writer) {
  using acc_t = acc_of<scalar_t>;
  const acc_t r = a.rstd[c];
  if (writer) {
    if (a.dweight.present()) a.dweight.set(c, sdxm * r);
    if (a.dbias.present()) a.dbias.set(c, sdy);
  }
  BwdCoef<acc_t> k;
  k.gs = a.weight.get_or(c, acc_t(1)) * r;
  if (a.training) {
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(a.n);
    k.mean = a.mean[c];
    k.mdy = sdy * inv_n;
    k.proj = sdxm * inv_n * r * r;
  } else {
    k.mean = k.mdy = k.proj = acc_t(0);
  }
  return k;
}

// ---------------------------------------------------------------------------------------------
// Per-thread passes over a chunk (shared by the stats kernels and the fused apply kernels).

// NCHW: the Welford state of the elements of channel c that the cursor visits.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ Welford<acc_t> nchw_thread_welford(const Pack<scalar_t, V>* __restrict__ xv,
                                                              NchwCursor cur) {
  using P = Pack<scalar_t, V>;
  acc_t mean[1] = {acc_t(0)}, m2[1] = {acc_t(0)};
  acc_t count = acc_t(0);
  while (cur.remaining >= kUnroll) {
    P pk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pk[u] = xv[cur.off];
      cur.next();
    }
    cur.remaining -= kUnroll;
    acc_t d[kUnroll * V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) d[u * V + k] = static_cast<acc_t>(pk[u].v[k]) - mean[0];
    acc_t dm[1], cm2[1];
    chunk_stats<acc_t, kUnroll * V>(d, dm[0], cm2[0]);
    merge_chunk<acc_t, 1>(mean, m2, count, dm, cm2, acc_t(kUnroll * V));
  }
  while (cur.remaining > 0) {
    const P pk = xv[cur.off];
    cur.next();
    cur.remaining -= 1;
    acc_t d[V];
#pragma unroll
    for (int k = 0; k < V; ++k) d[k] = static_cast<acc_t>(pk.v[k]) - mean[0];
    acc_t dm[1], cm2[1];
    chunk_stats<acc_t, V>(d, dm[0], cm2[0]);
    merge_chunk<acc_t, 1>(mean, m2, count, dm, cm2, acc_t(V));
  }
  return Welford<acc_t>(mean[0], m2[0], count);
}

// NHWC: Welford states of V channels (vector column cv) over rows r0, r0 + step, ... < R.
// The V states share one count, returned in cnt[] for each.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void nhwc_thread_welford(const Pack<scalar_t, V>* __restrict__ xv,
                                                    int64_t Cv, int64_t cv, int64_t R, int64_t r0,
                                                    int64_t step, acc_t (&mean)[V],
                                                    acc_t (&m2)[V], acc_t (&cnt)[V]) {
  using P = Pack<scalar_t, V>;
  acc_t count = acc_t(0);
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = acc_t(0);
  if (r0 < R) {
    int64_t rows = (R - 1 - r0) / step + 1;
    int64_t off = r0 * Cv + cv;
    const int64_t doff = step * Cv;
    while (rows >= kUnroll) {
      P pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u] = xv[off + u * doff];
      off += kUnroll * doff;
      rows -= kUnroll;
      acc_t dm[V], cm2[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t d[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) d[u] = static_cast<acc_t>(pk[u].v[j]) - mean[j];
        chunk_stats<acc_t, kUnroll>(d, dm[j], cm2[j]);
      }
      merge_chunk<acc_t, V>(mean, m2, count, dm, cm2, acc_t(kUnroll));
    }
    while (rows > 0) {
      const P pk = xv[off];
      off += doff;
      rows -= 1;
      acc_t dm[V], cm2[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        dm[j] = static_cast<acc_t>(pk.v[j]) - mean[j];
        cm2[j] = acc_t(0);
      }
      merge_chunk<acc_t, V>(mean, m2, count, dm, cm2, acc_t(1));
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) cnt[j] = count;
}

// NCHW: sum(dy) and sum(dy * (x - m)) over the elements of channel c that the cursor visits.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void nchw_thread_sums(const Pack<scalar_t, V>* __restrict__ dyv,
                                                 const Pack<scalar_t, V>* __restrict__ xv,
                                                 NchwCursor cur, acc_t m, acc_t& sdy,
                                                 acc_t& sdxm) {
  using P = Pack<scalar_t, V>;
  sdy = sdxm = acc_t(0);
  while (cur.remaining >= kUnroll) {
    P pd[kUnroll], px[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pd[u] = dyv[cur.off];
      px[u] = xv[cur.off];
      cur.next();
    }
    cur.remaining -= kUnroll;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t d = static_cast<acc_t>(pd[u].v[k]);
        sdy += d;
        sdxm += d * (static_cast<acc_t>(px[u].v[k]) - m);
      }
  }
  while (cur.remaining > 0) {
    const P pd = dyv[cur.off];
    const P px = xv[cur.off];
    cur.next();
    cur.remaining -= 1;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t d = static_cast<acc_t>(pd.v[k]);
      sdy += d;
      sdxm += d * (static_cast<acc_t>(px.v[k]) - m);
    }
  }
}

// NHWC: the same two sums for V channels over rows r0, r0 + step, ... < R.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void nhwc_thread_sums(const Pack<scalar_t, V>* __restrict__ dyv,
                                                 const Pack<scalar_t, V>* __restrict__ xv,
                                                 int64_t Cv, int64_t cv, int64_t R, int64_t r0,
                                                 int64_t step, const acc_t (&m)[V],
                                                 acc_t (&sdy)[V], acc_t (&sdxm)[V]) {
  using P = Pack<scalar_t, V>;
#pragma unroll
  for (int j = 0; j < V; ++j) sdy[j] = sdxm[j] = acc_t(0);
  if (r0 >= R) return;
  int64_t rows = (R - 1 - r0) / step + 1;
  int64_t off = r0 * Cv + cv;
  const int64_t doff = step * Cv;
  while (rows >= kUnroll) {
    P pd[kUnroll], px[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      pd[u] = dyv[off + u * doff];
      px[u] = xv[off + u * doff];
    }
    off += kUnroll * doff;
    rows -= kUnroll;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t d = static_cast<acc_t>(pd[u].v[j]);
        sdy[j] += d;
        sdxm[j] += d * (static_cast<acc_t>(px[u].v[j]) - m[j]);
      }
  }
  while (rows > 0) {
    const P pd = dyv[off];
    const P px = xv[off];
    off += doff;
    rows -= 1;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t d = static_cast<acc_t>(pd.v[j]);
      sdy[j] += d;
      sdxm[j] += d * (static_cast<acc_t>(px.v[j]) - m[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward stats kernels (general path): partial Welford states [3][G1][C].

// NCHW. grid (G1, min(C, 65535)), block kThreads (1-D).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_stats_nchw(const scalar_t* __restrict__ x, FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ __align__(16) unsigned char sh_raw[32 * sizeof(Welford<acc_t>)];
  Welford<acc_t>* sh = reinterpret_cast<Welford<acc_t>*>(sh_raw);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    Welford<acc_t> w = nchw_thread_welford<scalar_t, acc_t, V>(xv, cur);
    w = block_merge(w, sh);
    if (threadIdx.x == 0) {
      const int64_t i = static_cast<int64_t>(blockIdx.x) * C + c;
      a.part[i] = w.mean;
      a.part[a.G1 * C + i] = w.m2;
      a.part[2 * a.G1 * C + i] = w.count;
    }
  }
}

// NHWC [R, C]. grid (ceil(C / V / tx), G1), block (tx, ty), tx * ty = kThreads.
// Dynamic shared memory: 3 * kThreads * V * sizeof(acc_t).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_stats_nhwc(const scalar_t* __restrict__ x, FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t C = a.C, Cv = a.C / V, R = a.N * a.S;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  acc_t mean[V], m2[V], cnt[V];
  nhwc_thread_welford<scalar_t, acc_t, V>(xv, Cv, cv, active ? R : 0, r0, step, mean, m2, cnt);
  tree_merge_rows<acc_t, V>(mean, m2, cnt, smem);
  if (active && threadIdx.y == 0) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * C + cv * V;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a.part[base + j] = mean[j];
      a.part[a.G1 * C + base + j] = m2[j];
      a.part[2 * a.G1 * C + base + j] = cnt[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize kernels (general path): merge the G1 partials of each channel once, in a fixed order.
// grid ceil(C / tx), block (tx, ty): threadIdx.x picks the channel, threadIdx.y strides over the
// partials (g = y, y + ty, ...), then a tree over y. Dynamic shared memory: 3 * kThreads * acc_t.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_fwd_finalize(FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const int64_t C = a.C;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < C;
  acc_t m[1] = {acc_t(0)}, q[1] = {acc_t(0)}, n[1] = {acc_t(0)};
  if (active) {
    for (int64_t g = threadIdx.y; g < a.G1; g += blockDim.y) {
      Welford<acc_t> s(m[0], q[0], n[0]);
      const int64_t i = g * C + c;
      s.merge(Welford<acc_t>(a.part[i], a.part[a.G1 * C + i], a.part[2 * a.G1 * C + i]));
      m[0] = s.mean;
      q[0] = s.m2;
      n[0] = s.count;
    }
  }
  tree_merge_rows<acc_t, 1>(m, q, n, smem);
  if (active && threadIdx.y == 0) {
    acc_t mean, scale, shift;
    fwd_finalize(a, c, Welford<acc_t>(m[0], q[0], n[0]), true, mean, scale, shift);
    a.coef[c] = mean;
    a.coef[C + c] = scale;
    a.coef[2 * C + c] = shift;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bn_bwd_finalize(BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const int64_t C = a.C;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < C;
  acc_t sdy[1] = {acc_t(0)}, sdxm[1] = {acc_t(0)};
  if (active) {
    for (int64_t g = threadIdx.y; g < a.G1; g += blockDim.y) {
      sdy[0] += a.part[g * C + c];
      sdxm[0] += a.part[a.G1 * C + g * C + c];
    }
  }
  tree_sum2_rows<acc_t, 1>(sdy, sdxm, smem);
  if (active && threadIdx.y == 0) {
    const BwdCoef<acc_t> k = bwd_finalize(a, c, sdy[0], sdxm[0], true);
    a.coef[c] = k.mean;
    a.coef[C + c] = k.mdy;
    a.coef[2 * C + c] = k.proj;
    a.coef[3 * C + c] = k.gs;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward apply kernels: y = (x - mean) * scale + shift.

// NCHW. grid (G, min(C, 65535)), block kThreads. kModeFused needs G == 1.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_apply_nchw(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ __align__(16) unsigned char sh_raw[32 * sizeof(Welford<acc_t>)];
  Welford<acc_t>* sh = reinterpret_cast<Welford<acc_t>*>(sh_raw);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ yv = reinterpret_cast<P*>(y);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    acc_t mean, scale, shift;
    if (a.mode == kModeFinal) {
      mean = a.coef[c];
      scale = a.coef[C + c];
      shift = a.coef[2 * C + c];
    } else {  // uniform branch
      Welford<acc_t> w;
      if (a.mode == kModeFused) {
        w = nchw_thread_welford<scalar_t, acc_t, V>(xv, cur);
        w = block_merge(w, sh);
      }
      fwd_finalize(a, c, w, blockIdx.x == 0 && threadIdx.x == 0, mean, scale, shift);
    }
    while (cur.remaining >= kUnroll) {
      P pk[kUnroll];
      int64_t offs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        offs[u] = cur.off;
        pk[u] = xv[cur.off];
        cur.next();
      }
      cur.remaining -= kUnroll;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        P o;
#pragma unroll
        for (int k = 0; k < V; ++k)
          o.v[k] = static_cast<scalar_t>((static_cast<acc_t>(pk[u].v[k]) - mean) * scale + shift);
        yv[offs[u]] = o;
      }
    }
    while (cur.remaining > 0) {
      const P pk = xv[cur.off];
      P o;
#pragma unroll
      for (int k = 0; k < V; ++k)
        o.v[k] = static_cast<scalar_t>((static_cast<acc_t>(pk.v[k]) - mean) * scale + shift);
      yv[cur.off] = o;
      cur.next();
      cur.remaining -= 1;
    }
  }
  maybe_bump_nbt(a);
}

// NHWC. grid (ceil(C / V / tx), G), block (tx, ty). kModeFused needs G == 1.
// Dynamic shared memory: 3 * kThreads * V * sizeof(acc_t).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_fwd_apply_nhwc(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ yv = reinterpret_cast<P*>(y);
  const int64_t C = a.C, Cv = a.C / V, R = a.N * a.S;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const int64_t c0 = cv * V;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;

  acc_t mean[V], scale[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = scale[j] = shift[j] = acc_t(0);
  if (a.mode == kModeFinal) {
    if (active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        mean[j] = a.coef[c0 + j];
        scale[j] = a.coef[C + c0 + j];
        shift[j] = a.coef[2 * C + c0 + j];
      }
    }
  } else {  // uniform branch
    acc_t wm[V], wm2[V], wc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) wm[j] = wm2[j] = wc[j] = acc_t(0);
    if (a.mode == kModeFused) {
      nhwc_thread_welford<scalar_t, acc_t, V>(xv, Cv, cv, active ? R : 0, r0, step, wm, wm2, wc);
      tree_merge_rows<acc_t, V>(wm, wm2, wc, smem);
    }
    const bool writer = active && blockIdx.y == 0 && threadIdx.y == 0;
    if (active) {
#pragma unroll
      for (int j = 0; j < V; ++j)
        fwd_finalize(a, c0 + j, Welford<acc_t>(wm[j], wm2[j], wc[j]), writer, mean[j], scale[j],
                     shift[j]);
    }
  }

  if (active && r0 < R) {
    int64_t rows = (R - 1 - r0) / step + 1;
    int64_t off = r0 * Cv + cv;
    const int64_t doff = step * Cv;
    while (rows >= kUnroll) {
      P pk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pk[u] = xv[off + u * doff];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(pk[u].v[j]) - mean[j]) * scale[j] +
                                         shift[j]);
        yv[off + u * doff] = o;
      }
      off += kUnroll * doff;
      rows -= kUnroll;
    }
    while (rows > 0) {
      const P pk = xv[off];
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j)
        o.v[j] =
            static_cast<scalar_t>((static_cast<acc_t>(pk.v[j]) - mean[j]) * scale[j] + shift[j]);
      yv[off] = o;
      off += doff;
      rows -= 1;
    }
  }
  maybe_bump_nbt(a);
}

// ---------------------------------------------------------------------------------------------
// Backward sums kernels (general path): partial sums [2][G1][C].

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_sums_nchw(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                     BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ acc_t sh[64];
  const P* __restrict__ dyv = reinterpret_cast<const P*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    acc_t sdy, sdxm;
    nchw_thread_sums<scalar_t, acc_t, V>(dyv, xv, cur, a.mean[c], sdy, sdxm);
    block_sum2(sdy, sdxm, sh);
    if (threadIdx.x == 0) {
      const int64_t i = static_cast<int64_t>(blockIdx.x) * C + c;
      a.part[i] = sdy;
      a.part[a.G1 * C + i] = sdxm;
    }
  }
}

// Dynamic shared memory: 2 * kThreads * V * sizeof(acc_t).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_sums_nhwc(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                     BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const P* __restrict__ dyv = reinterpret_cast<const P*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t C = a.C, Cv = a.C / V, R = a.N * a.S;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  acc_t m[V], sdy[V], sdxm[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = active ? a.mean[cv * V + j] : acc_t(0);
  nhwc_thread_sums<scalar_t, acc_t, V>(dyv, xv, Cv, cv, active ? R : 0, r0, step, m, sdy, sdxm);
  tree_sum2_rows<acc_t, V>(sdy, sdxm, smem);
  if (active && threadIdx.y == 0) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * C + cv * V;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a.part[base + j] = sdy[j];
      a.part[a.G1 * C + base + j] = sdxm[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward apply kernels: dx. In kModeFused they also write dweight/dbias (chunk 0 == the whole
// channel); with need_dx false they only do that.

// NCHW. grid (G, min(C, 65535)), block kThreads.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_apply_nchw(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                      scalar_t* __restrict__ dx, BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ acc_t sh[64];
  const P* __restrict__ dyv = reinterpret_cast<const P*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ dxv = reinterpret_cast<P*>(dx);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    BwdCoef<acc_t> k;
    if (a.mode == kModeFinal) {
      k.mean = a.coef[c];
      k.mdy = a.coef[C + c];
      k.proj = a.coef[2 * C + c];
      k.gs = a.coef[3 * C + c];
    } else {  // uniform branch
      acc_t sdy = acc_t(0), sdxm = acc_t(0);
      if (a.mode == kModeFused) {
        nchw_thread_sums<scalar_t, acc_t, V>(dyv, xv, cur, a.mean[c], sdy, sdxm);
        block_sum2(sdy, sdxm, sh);
      }
      k = bwd_finalize(a, c, sdy, sdxm, blockIdx.x == 0 && threadIdx.x == 0);
    }
    if (!a.need_dx) continue;

    if (a.training) {
      while (cur.remaining >= kUnroll) {
        P pd[kUnroll], px[kUnroll];
        int64_t offs[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          offs[u] = cur.off;
          pd[u] = dyv[cur.off];
          px[u] = xv[cur.off];
          cur.next();
        }
        cur.remaining -= kUnroll;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          P o;
#pragma unroll
          for (int j = 0; j < V; ++j)
            o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(pd[u].v[j]) - k.mdy -
                                            (static_cast<acc_t>(px[u].v[j]) - k.mean) * k.proj) *
                                           k.gs);
          dxv[offs[u]] = o;
        }
      }
      while (cur.remaining > 0) {
        const P pd = dyv[cur.off];
        const P px = xv[cur.off];
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(pd.v[j]) - k.mdy -
                                          (static_cast<acc_t>(px.v[j]) - k.mean) * k.proj) *
                                         k.gs);
        dxv[cur.off] = o;
        cur.next();
        cur.remaining -= 1;
      }
    } else {
      while (cur.remaining >= kUnroll) {
        P pd[kUnroll];
        int64_t offs[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          offs[u] = cur.off;
          pd[u] = dyv[cur.off];
          cur.next();
        }
        cur.remaining -= kUnroll;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          P o;
#pragma unroll
          for (int j = 0; j < V; ++j)
            o.v[j] = static_cast<scalar_t>(static_cast<acc_t>(pd[u].v[j]) * k.gs);
          dxv[offs[u]] = o;
        }
      }
      while (cur.remaining > 0) {
        const P pd = dyv[cur.off];
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>(static_cast<acc_t>(pd.v[j]) * k.gs);
        dxv[cur.off] = o;
        cur.next();
        cur.remaining -= 1;
      }
    }
  }
}

// NHWC. grid (ceil(C / V / tx), G), block (tx, ty).
// Dynamic shared memory: 2 * kThreads * V * sizeof(acc_t).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_apply_nhwc(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                      scalar_t* __restrict__ dx, BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const P* __restrict__ dyv = reinterpret_cast<const P*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ dxv = reinterpret_cast<P*>(dx);
  const int64_t C = a.C, Cv = a.C / V, R = a.N * a.S;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const int64_t c0 = cv * V;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;

  acc_t mean[V], mdy[V], proj[V], gs[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = mdy[j] = proj[j] = gs[j] = acc_t(0);
  if (a.mode == kModeFinal) {
    if (active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        mean[j] = a.coef[c0 + j];
        mdy[j] = a.coef[C + c0 + j];
        proj[j] = a.coef[2 * C + c0 + j];
        gs[j] = a.coef[3 * C + c0 + j];
      }
    }
  } else {  // uniform branch
    acc_t sdy[V], sdxm[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sdy[j] = sdxm[j] = acc_t(0);
    if (a.mode == kModeFused) {
      acc_t m[V];
#pragma unroll
      for (int j = 0; j < V; ++j) m[j] = active ? a.mean[c0 + j] : acc_t(0);
      nhwc_thread_sums<scalar_t, acc_t, V>(dyv, xv, Cv, cv, active ? R : 0, r0, step, m, sdy, sdxm);
      tree_sum2_rows<acc_t, V>(sdy, sdxm, smem);
    }
    const bool writer = active && blockIdx.y == 0 && threadIdx.y == 0;
    if (active) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const BwdCoef<acc_t> k = bwd_finalize(a, c0 + j, sdy[j], sdxm[j], writer);
        mean[j] = k.mean;
        mdy[j] = k.mdy;
        proj[j] = k.proj;
        gs[j] = k.gs;
      }
    }
  }
  if (!a.need_dx || !active || r0 >= R) return;  // after the last barrier

  int64_t rows = (R - 1 - r0) / step + 1;
  int64_t off = r0 * Cv + cv;
  const int64_t doff = step * Cv;
  if (a.training) {
    while (rows >= kUnroll) {
      P pd[kUnroll], px[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        pd[u] = dyv[off + u * doff];
        px[u] = xv[off + u * doff];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(pd[u].v[j]) - mdy[j] -
                                          (static_cast<acc_t>(px[u].v[j]) - mean[j]) * proj[j]) *
                                         gs[j]);
        dxv[off + u * doff] = o;
      }
      off += kUnroll * doff;
      rows -= kUnroll;
    }
    while (rows > 0) {
      const P pd = dyv[off];
      const P px = xv[off];
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j)
        o.v[j] = static_cast<scalar_t>((static_cast<acc_t>(pd.v[j]) - mdy[j] -
                                        (static_cast<acc_t>(px.v[j]) - mean[j]) * proj[j]) *
                                       gs[j]);
      dxv[off] = o;
      off += doff;
      rows -= 1;
    }
  } else {
    while (rows >= kUnroll) {
      P pd[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pd[u] = dyv[off + u * doff];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>(static_cast<acc_t>(pd[u].v[j]) * gs[j]);
        dxv[off + u * doff] = o;
      }
      off += kUnroll * doff;
      rows -= kUnroll;
    }
    while (rows > 0) {
      const P pd = dyv[off];
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(static_cast<acc_t>(pd.v[j]) * gs[j]);
      dxv[off] = o;
      off += doff;
      rows -= 1;
    }
  }
}

}  // namespace bn
}  // namespace fastnorm
