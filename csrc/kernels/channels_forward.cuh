// Strided channels, forward (layouts in channels_common.cuh).
//
// BatchNorm paths (the host picks one per call; all reductions run in a fixed order, no float atomics, so
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
// Fused activation epilogue (kernels/activation.cuh): the apply kernels take a template flag ACT
// and then store act(z), z = (x - mean) * scale + shift in the accumulation type, rounded once;
// the backward's sums and dx kernels recompute z from x and the saved statistics and use
// dz = dy * act'(z) in place of dy (channels_backward.cuh). The statistics, finalize kernels and
// running statistics are the plain norm's: no ACT there.
//
// GroupNorm / InstanceNorm channels_last: a block takes (n, chunk of rpc rows, tile of bx channel
// packs); its threads are bx packs wide and by rows deep, so each pass reads a contiguous stretch.
//   cl_welford_partial + cl_welford_finalize   statistics; cl_apply   the apply pass.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/activation.cuh"
#include "kernels/channels_common.cuh"

namespace fastnorm {
namespace channels {

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
  Activation act;       // the apply kernels' epilogue when instantiated with ACT
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

// ---------------------------------------------------------------------------------------------
// Per-thread passes over a chunk (shared by the stats kernels and the fused apply kernels).

// NCHW: the Welford state of the elements of channel c that the cursor visits.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ Welford<acc_t> nchw_thread_welford(const Pack<scalar_t, V>* __restrict__ xv,
                                                              NchwCursor cur) {
  acc_t mean[1] = {acc_t(0)}, m2[1] = {acc_t(0)};
  acc_t count = acc_t(0);
  // a group of U packs is one chunk of U * V values, merged with one division
  stream_packs(cur, [&](int64_t off) { return xv[off]; }, [&](const auto& pk, const auto&) {
    constexpr int U = group_size_v<decltype(pk)>;
    acc_t d[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) d[u * V + k] = static_cast<acc_t>(pk[u].v[k]) - mean[0];
    acc_t dm[1], cm2[1];
    chunk_stats<acc_t, U * V>(d, dm[0], cm2[0]);
    merge_chunk<acc_t, 1>(mean, m2, count, dm, cm2, acc_t(U * V));
  });
  return Welford<acc_t>(mean[0], m2[0], count);
}

// NHWC: Welford states of V channels (vector column cv) over rows r0, r0 + step, ... < R.
// The V states share one count, returned in cnt[] for each.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void nhwc_thread_welford(const Pack<scalar_t, V>* __restrict__ xv,
                                                    int64_t Cv, int64_t cv, int64_t R, int64_t r0,
                                                    int64_t step, acc_t (&mean)[V],
                                                    acc_t (&m2)[V], acc_t (&cnt)[V]) {
  acc_t count = acc_t(0);
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = acc_t(0);
  // a group of U rows is one chunk of U values per channel
  stream_packs(NhwcCursor(Cv, cv, R, r0, step), [&](int64_t off) { return xv[off]; },
               [&](const auto& pk, const auto&) {
    constexpr int U = group_size_v<decltype(pk)>;
    acc_t dm[V], cm2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t d[U];
#pragma unroll
      for (int u = 0; u < U; ++u) d[u] = static_cast<acc_t>(pk[u].v[j]) - mean[j];
      chunk_stats<acc_t, U>(d, dm[j], cm2[j]);
    }
    merge_chunk<acc_t, V>(mean, m2, count, dm, cm2, acc_t(U));
  });
#pragma unroll
  for (int j = 0; j < V; ++j) cnt[j] = count;
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

// ---------------------------------------------------------------------------------------------
// Forward apply kernels: y = (x - mean) * scale + shift.

// NCHW. grid (G, min(C, 65535)), block kThreads. kModeFused needs G == 1.
// ACT: y = act(z) (a.act), rounded once.
template <typename scalar_t, int V, bool ACT>
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
    stream_packs(cur, [&](int64_t off) { return xv[off]; }, [&](const auto& pk, const auto& offs) {
#pragma unroll
      for (int u = 0; u < group_size_v<decltype(pk)>; ++u) {
        P o;
#pragma unroll
        for (int k = 0; k < V; ++k)
          o.v[k] = static_cast<scalar_t>(
              act_out<ACT>(a.act, affine_z(static_cast<acc_t>(pk[u].v[k]), mean, scale, shift)));
        yv[offs[u]] = o;
      }
    });
  }
  maybe_bump_nbt(a);
}

// NHWC. grid (ceil(C / V / tx), G), block (tx, ty). kModeFused needs G == 1.
// Dynamic shared memory: 3 * kThreads * V * sizeof(acc_t). ACT: as bn_fwd_apply_nchw.
template <typename scalar_t, int V, bool ACT>
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

  if (active) {
    stream_packs(NhwcCursor(Cv, cv, R, r0, step), [&](int64_t off) { return xv[off]; },
                 [&](const auto& pk, const auto& offs) {
#pragma unroll
      for (int u = 0; u < group_size_v<decltype(pk)>; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j)
          o.v[j] = static_cast<scalar_t>(act_out<ACT>(
              a.act, affine_z(static_cast<acc_t>(pk[u].v[j]), mean[j], scale[j], shift[j])));
        yv[offs[u]] = o;
      }
    });
  }
  maybe_bump_nbt(a);
}

// Per-(n, chunk, channel) Welford states: ws[0][(n*K + k)*C + c] = mean, ws[1][...] = m2
// (the count is the chunk's row count, recomputed by the finalize).
// MASKED (nc_moments with a validity, G = C): the valid rows (positions) only, skipped before
// their loads; the chunk's count, the same for every channel, goes to ws[2][n*K + k].
template <typename T, int VEC, bool MASKED = false>
__global__ void __launch_bounds__(kClThreads, kMaskedBlocks<MASKED, kClStreamBlocks<T, VEC>>)
    cl_welford_partial_kernel(const T* __restrict__ x, ClShape s, acc_of<T>* __restrict__ ws,
                              Validity valid) {
  using A = acc_of<T>;
  constexpr int kU = kClPartialPacks<T, VEC>;  // packs in flight per thread
  __shared__ A sm_mean[kClThreads * VEC];
  __shared__ A sm_m2[kClThreads * VEC];
  __shared__ A sm_cnt[kClThreads];
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int slot = ty * s.bx + tx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  const int64_t plane = s.N * s.K * s.C;
  int by_p2 = 1;
  while (by_p2 < s.by) by_p2 <<= 1;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform over the block
    const ClItem it = cl_item(item, s);
    const int64_t ct = it.ct, nk = it.nk, k = it.k, n = it.n;
    const int64_t cp = ct * s.bx + tx;
    const bool cv = cp < Cp;
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    A mean[VEC], m2[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) mean[v] = m2[v] = A(0);
    int cnt = 0;
    if (cv) {
      const int64_t step = static_cast<int64_t>(s.by) * s.C;  // elements between a thread's rows
      const T* xp = x + (n * s.HW + h0 + ty) * s.C + cp * VEC;
      Validity::Sample vs{};
      if constexpr (MASKED) vs = valid.sample(n);
      #pragma unroll 1  // kU packs are the unroll: nothing more in flight
      for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kU, xp += kU * step) {
        T xv[kU][VEC];
        bool live[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          live[u] = h + u * s.by < h1 && (!MASKED || valid.ok(vs, h + u * s.by));
          if (live[u]) load_raw<T, VEC>(xp + u * step, xv[u]);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (live[u]) {
            ++cnt;
            const A inv = A(1) / static_cast<A>(cnt);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const A xf = static_cast<A>(xv[u][v]);
              const A d = xf - mean[v];
              mean[v] += d * inv;
              m2[v] += d * (xf - mean[v]);
            }
          }
        }
      }
    }
    // fixed tree over the by row lanes
    A c = static_cast<A>(cnt);
    __syncthreads();  // the previous item's reads of shared memory are done
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      sm_mean[slot * VEC + v] = mean[v];
      sm_m2[slot * VEC + v] = m2[v];
    }
    sm_cnt[slot] = c;
    __syncthreads();
    for (int st = by_p2 >> 1; st > 0; st >>= 1) {
      if (ty < st && ty + st < s.by) {
        const int o = (ty + st) * s.bx + tx;
        merge_shared_count<A, VEC>(mean, m2, c, &sm_mean[o * VEC], &sm_m2[o * VEC], sm_cnt[o]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          sm_mean[slot * VEC + v] = mean[v];
          sm_m2[slot * VEC + v] = m2[v];
        }
        sm_cnt[slot] = c;
      }
      __syncthreads();
    }
    if (ty == 0 && cv) {
      const int64_t base = nk * s.C + cp * VEC;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        ws[base + v] = mean[v];
        ws[plane + base + v] = m2[v];
      }
      if (MASKED && cp == 0) ws[2 * plane + nk] = c;
    }
  }
}

// A warp per (n, g) merges the Cg channels x K chunks of states in a fixed order -> mean, rstd.
// var_out (nc_moments, G = C): the biased variance m2 / count goes to `rstd` instead (a run-time
// flag of the epilogue: the merge is the same). counts (the MASKED partials' [N, K] valid counts)
// null: a chunk counts its rows.
template <typename A>
__global__ void __launch_bounds__(256)
    cl_welford_finalize_kernel(const A* __restrict__ ws, ClShape s, A eps, A* __restrict__ mean,
                               A* __restrict__ rstd, bool var_out, const A* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  const int64_t plane = s.N * s.K * s.C;
  const int64_t total = s.Cg * s.K;
  for (int64_t ng = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); ng < s.N * s.G;
       ng += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    const int64_t n = ng / s.G, g = ng - n * s.G;
    Welford<A> w;
    for (int64_t idx = lane; idx < total; idx += 32) {
      const int64_t k = idx / s.Cg, ci = idx - k * s.Cg;
      const int64_t h0 = k * s.rpc;
      const int64_t rows = (h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW) - h0;
      const int64_t i = (n * s.K + k) * s.C + g * s.Cg + ci;
      const A cnt = counts != nullptr ? counts[n * s.K + k] : static_cast<A>(rows);
      w.merge(Welford<A>(ws[i], ws[plane + i], cnt));
    }
    w = warp_merge(w);
    if (lane == 0) {
      mean[ng] = w.mean;
      rstd[ng] = var_out ? w.var_biased() : rsqrt_acc(w.var_biased() + eps);
    }
  }
}

template <typename T>
struct ClFwd {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> y;     // T or float32 (autocast)
  Operand<T> w, b;  // absent, T or float32
  const A* mean = nullptr;  // [N, G]
  const A* rstd = nullptr;
  ClShape s;
  Validity valid;  // the MASKED kernel only (nc_affine with lengths or a mask)
};

// The ACT kernel's params: ClFwd and the activation (kernels/activation.cuh), a struct of its own
// so that the plain kernel keeps its parameter block (and registers) exactly.
template <typename T>
struct ClFwdAct : ClFwd<T> {
  Activation act;
};
template <typename T, bool ACT>
using cl_fwd_t = std::conditional_t<ACT, ClFwdAct<T>, ClFwd<T>>;

// Minimum blocks per SM of the ACT cl_apply: fp64's activations (exp, erf, tanh, log1p in double
// precision, inlined per element on top of the packs in flight) spilled at the plain kernel's
// caps (48 / 64 registers: 12-24 bytes); one to two blocks fewer give them 64 / 128 registers.
template <typename T, int VEC>
inline constexpr int kClApplyActBlocks =
    sizeof(acc_of<T>) == 8 ? (VEC > 1 ? 2 : 4) : kClStreamBlocks<T, VEC>;

// y = (x - mean) * (rstd * w) + b, channels_last, items in the reverse order; ACT: y = act(that),
// rounded once.
// NC (nc_affine, G = C): y = x * scale[n, c] + shift[n, c] with rstd = scale and b = shift, both
// per (n, c) (index n * C + c), mean and w unused. A compile-time flag: GroupNorm's instantiations
// keep their code (registers and speed); only the per-item prologue differs. Never with ACT.
// MASKED (NC with a validity): the invalid rows (positions) store 0 without reading x.
template <typename T, int VEC, bool ACT, bool NC = false, bool MASKED = false>
__global__ void __launch_bounds__(kClThreads, ACT ? kClApplyActBlocks<T, VEC>
                                                  : kMaskedBlocks<MASKED, kClStreamBlocks<T, VEC>>)
    cl_apply_kernel(cl_fwd_t<T, ACT> p) {
  using A = acc_of<T>;
  static_assert(!MASKED || (NC && !ACT), "MASKED: the per-(n, c) affine");
  constexpr int kU = kClApplyPacks<T, VEC>;  // packs in flight per thread
  const ClShape& s = p.s;
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  for (int64_t fwd = blockIdx.x; fwd < items; fwd += gridDim.x) {
    const int64_t item = items - 1 - fwd;
    const ClItem it = cl_item(item, s);
    const int64_t ct = it.ct, k = it.k, n = it.n;
    const int64_t cp = ct * s.bx + tx;
    if (cp >= Cp) continue;  // no collective operations in this kernel
    A mu[VEC], sc[VEC], bb[VEC];
    GroupWalk gw(n, s.G, cp * VEC, s.Cg);
#pragma unroll
    for (int v = 0; v < VEC; ++v, gw.next(s.Cg)) {
      const int64_t c = cp * VEC + v;
      mu[v] = NC ? A(0) : p.mean[gw.ng];
      const A wc = NC ? A(1) : p.w.get_or(c, A(1));
      sc[v] = p.rstd[gw.ng] * wc;
      bb[v] = NC ? p.b.get(gw.ng) : p.b.get_or(c, A(0));
    }
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    const int64_t step = static_cast<int64_t>(s.by) * s.C;  // elements between a thread's rows
    int64_t off = (n * s.HW + h0 + ty) * s.C + cp * VEC;
    Validity::Sample vs{};
    if constexpr (MASKED) vs = p.valid.sample(n);
    #pragma unroll 1  // kU packs are the unroll: nothing more in flight
    for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kU, off += kU * step) {
      T xv[kU][VEC];
      bool live[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        live[u] = !MASKED || (h + u * s.by < h1 && p.valid.ok(vs, h + u * s.by));
        if (h + u * s.by < h1 && live[u]) load_raw<T, VEC>(p.x + off + u * step, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (h + u * s.by < h1) {
          A o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            o[v] = live[u] ? affine_z(static_cast<A>(xv[u][v]), mu[v], sc[v], bb[v]) : A(0);
          if constexpr (ACT) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) o[v] = activate(p.act, o[v]);
          }
          p.y.store(off + u * step, o);
        }
      }
    }
  }
}

}  // namespace channels
}  // namespace fastnorm
