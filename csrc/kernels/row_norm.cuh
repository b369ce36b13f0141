// Row-family kernels: each normalisation group is a contiguous row of L elements.
//   LayerNorm: rows [M, N], per-element affine (column j).
//   GroupNorm / InstanceNorm in NCHW: rows (n, g) of (C/G)*HW elements, per-channel affine
//   (channel = g*C/G + j/HW)  -- the GN template flag.
// Framework-free device code (cuda + c10 value types). Every reduction has a fixed order: per-thread
// sequential, then butterflies over lanes and fixed trees over warps / blocks, then fixed-order
// merges of per-block partials. No atomics: bitwise repeatable.
//
// Kernels
//   row_fwd_cached   rows that fit in registers: a sub-warp, warp or block per row; one read of x.
//   row_welford_partial + row_welford_finalize + row_apply
//                    long rows / too few rows: (row, chunk) work items give partial Welford states,
//                    a small kernel merges them per row, an element-wise pass normalises (in the
//                    reverse order, so the tail of x is still in L2).
//   ln_bwd_cached    LayerNorm backward for rows in registers: dx plus per-block dweight/dbias
//                    column partials [gridDim, N] in one pass over x and dy.
//   row_sums_partial + row_sums_finalize + ln_bwd_split
//                    LayerNorm backward for long rows; row_sums_partial also gives GroupNorm's
//                    per-(n, c) sums in NCHW.
//   col_sum_finalize fixed-order column sums of [K, N] partials (dweight / dbias).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace row {

constexpr int kUnroll = 4;        // packs in flight per thread in the streaming kernels
constexpr int kItemThreads = 256;  // block size of the (row, chunk) item kernels

// Packs per thread kept in registers by row_fwd_cached (16-byte packs: 8 (4 for fp64); single
// elements: 8) and by ln_bwd_cached (8 elements per thread whatever the pack size). Sized for the
// 64 registers a 1024-thread block allows.
template <typename T, int VEC>
inline constexpr int kFwdPacks = VEC == 1 ? 8 : (sizeof(T) == 8 ? 4 : 8);
template <int VEC> inline constexpr int kBwdPacks = 8 / VEC;
inline constexpr int kBwdElems = 8;

// GroupNorm's element -> channel map inside a row (n, g): channel = (row % G) * Cg + j / HW.
struct GnMap {
  int64_t G = 1, Cg = 1, HW = 1;
  FastDiv hw_div;                 // j / HW when !div64
  bool div64 = false;             // rows of 2^31 elements or more: 64-bit division
  bool pack_in_channel = true;    // HW % VEC == 0: a pack never straddles two channels
  __device__ __forceinline__ int64_t chan_base(int64_t row) const { return (row % G) * Cg; }
  __device__ __forceinline__ int64_t chan_in_row(int64_t j) const {
    return div64 ? j / HW : static_cast<int64_t>(hw_div.div(static_cast<uint32_t>(j)));
  }
};

template <typename T>
struct RowFwd {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> y;     // T or float32 (autocast)
  Operand<T> w, b;  // absent, T or float32
  A* mean = nullptr;  // [M]
  A* rstd = nullptr;
  int64_t M = 0, L = 0;
  A eps = 0;
  GnMap gn;
};

// Weight and bias of the VEC elements starting at column j0 of a row.
template <typename T, int VEC, bool GN>
__device__ __forceinline__ void row_affine(const RowFwd<T>& p, int64_t cbase, int64_t j0,
                                           acc_of<T> (&wv)[VEC], acc_of<T> (&bv)[VEC]) {
  using A = acc_of<T>;
  if constexpr (!GN) {
    if (p.w.present()) {
      p.w.load(j0, wv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[k] = A(1);
    }
    if (p.b.present()) {
      p.b.load(j0, bv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) bv[k] = A(0);
    }
  } else {
    if (p.gn.pack_in_channel) {
      const int64_t c = cbase + p.gn.chan_in_row(j0);
      const A wc = p.w.get_or(c, A(1));
      const A bc = p.b.get_or(c, A(0));
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        wv[k] = wc;
        bv[k] = bc;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t c = cbase + p.gn.chan_in_row(j0 + k);
        wv[k] = p.w.get_or(c, A(1));
        bv[k] = p.b.get_or(c, A(0));
      }
    }
  }
}


// ------------------------------------------------------------------------------------------------
// Forward, rows in registers. tpr threads per row (a power of two): tpr <= 32 -> blockDim/tpr rows
// per block, combined with butterflies of width tpr; tpr > 32 -> blockDim == tpr, one row per block.
// Requires L <= tpr * kFwdPacks * VEC and L % VEC == 0.
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC, bool GN>
__global__ void __launch_bounds__(1024) row_fwd_cached_kernel(RowFwd<T> p, int tpr) {
  using A = acc_of<T>;
  constexpr int R = kFwdPacks<T, VEC>;
  // raw storage (a __shared__ variable cannot have a constructor); Welford<A> is three A's
  static_assert(sizeof(Welford<A>) == 3 * sizeof(A), "Welford layout");
  __shared__ A red_raw[32 * 3];
  Welford<A>* red = reinterpret_cast<Welford<A>*>(red_raw);

  const int rpb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int L = static_cast<int>(p.L);
  const int packs = L / VEC;
  for (int64_t rb = blockIdx.x; rb * rpb < p.M; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * rpb + grp;
    const bool valid = row < p.M;
    const T* xr = p.x + (valid ? row : 0) * p.L;
    T v[R][VEC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) load_raw<T, VEC>(xr + pk * VEC, v[r]);
    }
    // this thread's statistics: shift by its first element, exact second pass on registers
    int n = 0;
    A shift = A(0), s = A(0);
    if (valid && t < packs) shift = static_cast<A>(v[0][0]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) s += static_cast<A>(v[r][k]) - shift;
        n += VEC;
      }
    }
    const A cnt = static_cast<A>(n);
    const A lmean = n > 0 ? shift + s / cnt : A(0);
    A m2 = A(0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A d = static_cast<A>(v[r][k]) - lmean;
          m2 += d * d;
        }
      }
    }
    Welford<A> w(lmean, m2, cnt);
    if (tpr <= 32) w = warp_merge(w, tpr);
    else w = block_merge(w, red);
    const A mean = w.mean;
    const A rstd = rsqrt_acc(w.var_biased() + p.eps);
    if (valid && t == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    const int64_t cbase = (GN && valid) ? p.gn.chan_base(row) : 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        const int j0 = pk * VEC;
        A wv[VEC], bv[VEC], o[VEC];
        row_affine<T, VEC, GN>(p, cbase, j0, wv, bv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = (static_cast<A>(v[r][k]) - mean) * (rstd * wv[k]) + bv[k];
        p.y.store(row * p.L + j0, o);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// (row, chunk) work items, tpr (<= 32, a power of two) lanes per item, kItemThreads per block.
// Item i = row * S + s covers elements [s * chunk, min(L, (s + 1) * chunk)) of the row; with VEC > 1
// both L and chunk are multiples of VEC.
// ------------------------------------------------------------------------------------------------
struct Items {
  int64_t M = 0, L = 0, S = 1, chunk = 0;
  int tpr = 32;
};

// Merge up to kUnroll packs (count n, all loaded) into a running Welford state.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void welford_add_packs(Welford<A>& w, const T (&v)[kUnroll][VEC],
                                                  int valid_packs) {
  const A shift = static_cast<A>(v[0][0]);
  A s = A(0);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid_packs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += static_cast<A>(v[u][k]) - shift;
    }
  }
  const A cnt = static_cast<A>(valid_packs * VEC);
  const A lmean = shift + s / cnt;
  A m2 = A(0);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid_packs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A d = static_cast<A>(v[u][k]) - lmean;
        m2 += d * d;
      }
    }
  }
  w.merge(Welford<A>(lmean, m2, cnt));
}

// Partial Welford state per item -> ws[0][item] = mean, ws[1][item] = m2, ws[2][item] = count.
template <typename T, int VEC>
__global__ void __launch_bounds__(kItemThreads)
    row_welford_partial_kernel(const T* __restrict__ x, Items it, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  const int tpr = it.tpr;
  const int ipb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t items = it.M * it.S;
  for (int64_t ib = blockIdx.x; ib * ipb < items; ib += gridDim.x) {  // uniform over the block
    const int64_t item = ib * ipb + grp;
    Welford<A> w;
    if (item < items) {
      const int64_t row = item / it.S, s = item - row * it.S;
      const int64_t e0 = s * it.chunk;
      const int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
      const T* xr = x + row * it.L;
      const int64_t p1 = e1 / VEC;
      for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
        T v[kUnroll][VEC];
        int nv = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            load_raw<T, VEC>(xr + q * VEC, v[u]);
            nv = u + 1;
          }
        }
        welford_add_packs<A, T, VEC>(w, v, nv);
      }
    }
    w = warp_merge(w, tpr);  // every lane of the warp takes part
    if (item < items && t == 0) {
      ws[item] = w.mean;
      ws[items + item] = w.m2;
      ws[2 * items + item] = w.count;
    }
  }
}

// A warp per row merges its S partial states in a fixed order -> mean, rstd.
template <typename A>
__global__ void __launch_bounds__(256)
    row_welford_finalize_kernel(const A* __restrict__ ws, int64_t M, int64_t S, A eps,
                                A* __restrict__ mean, A* __restrict__ rstd) {
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  const int64_t items = M * S;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); row < M;
       row += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    Welford<A> w;
    for (int64_t k = lane; k < S; k += 32) {
      const int64_t i = row * S + k;
      w.merge(Welford<A>(ws[i], ws[items + i], ws[2 * items + i]));
    }
    w = warp_merge(w);
    if (lane == 0) {
      mean[row] = w.mean;
      rstd[row] = rsqrt_acc(w.var_biased() + eps);
    }
  }
}

// Normalise with the saved mean/rstd, item by item in the reverse order.
template <typename T, int VEC, bool GN>
__global__ void __launch_bounds__(kItemThreads) row_apply_kernel(RowFwd<T> p, Items it) {
  using A = acc_of<T>;
  const int tpr = it.tpr;
  const int ipb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t items = it.M * it.S;
  for (int64_t ib = blockIdx.x; ib * ipb < items; ib += gridDim.x) {
    const int64_t fwd = ib * ipb + grp;
    if (fwd >= items) continue;  // no collective operations in this kernel
    const int64_t item = items - 1 - fwd;
    const int64_t row = item / it.S, s = item - row * it.S;
    const int64_t e0 = s * it.chunk;
    const int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
    const T* xr = p.x + row * it.L;
    const A mean = p.mean[row], rstd = p.rstd[row];
    const int64_t cbase = GN ? p.gn.chan_base(row) : 0;
    const int64_t p1 = e1 / VEC;
    for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
      T v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) load_raw<T, VEC>(xr + q * VEC, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) {
          const int64_t j0 = q * VEC;
          A wv[VEC], bv[VEC], o[VEC];
          row_affine<T, VEC, GN>(p, cbase, j0, wv, bv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] = (static_cast<A>(v[u][k]) - mean) * (rstd * wv[k]) + bv[k];
          p.y.store(row * it.L + j0, o);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <typename T>
struct RowBwd {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // T or float32
  const A* mean = nullptr;
  const A* rstd = nullptr;
  Operand<T> w;  // absent, or per element of a row (LayerNorm): T or float32
  T* dx = nullptr;       // nullable: dx not requested
  A* ws_dw = nullptr;    // nullable: [K, L] column partials of sum(dy * xhat)
  A* ws_db = nullptr;    // nullable: [K, L] column partials of sum(dy)
  int64_t M = 0, L = 0;
};

// LayerNorm backward with rows in registers (L <= tpr * kBwdElems, L % VEC == 0).
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w
// Column partials of dweight / dbias over the rows this block handled -> ws row blockIdx.x.
template <typename T, int VEC>
__device__ __forceinline__ void ln_weight(const RowBwd<T>& p, int64_t j0, acc_of<T> (&wv)[VEC]) {
  if (p.w.present()) {
    p.w.load(j0, wv);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) wv[k] = acc_of<T>(1);
  }
}

// Largest block of ln_bwd_cached_kernel: fp64 holds twice the registers per element.
template <typename T> inline constexpr int kBwdCachedMaxThreads = sizeof(acc_of<T>) == 8 ? 512 : 1024;

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdCachedMaxThreads<T>) ln_bwd_cached_kernel(RowBwd<T> p, int tpr) {
  using A = acc_of<T>;
  constexpr int R = kBwdPacks<VEC>;
  constexpr int kSubWarpWarps = 8;  // blockDim when tpr <= 32
  __shared__ A red[64];
  __shared__ A part[2][kSubWarpWarps][32 * kBwdElems];

  const int rpb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int L = static_cast<int>(p.L);
  const int packs = L / VEC;
  const A invL = A(1) / static_cast<A>(p.L);
  const bool want_cols = p.ws_dw != nullptr || p.ws_db != nullptr;

  A dwp[R][VEC], dbp[R][VEC];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dwp[r][k] = dbp[r][k] = A(0);

  for (int64_t rb = blockIdx.x; rb * rpb < p.M; rb += gridDim.x) {  // uniform over the block
    const int64_t row = rb * rpb + grp;
    const bool valid = row < p.M;
    const int64_t off = (valid ? row : 0) * p.L;
    T xv[R][VEC];
    A gv[R][VEC];  // dy; the weight is re-read from L1 rather than held (register budget)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        load_raw<T, VEC>(p.x + off + pk * VEC, xv[r]);
        p.dy.load(off + pk * VEC, gv[r]);
      }
    }
    const A mean = valid ? p.mean[row] : A(0);
    const A rstd = valid ? p.rstd[row] : A(0);
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        A wv[VEC];
        ln_weight<T, VEC>(p, pk * VEC, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A xh = (static_cast<A>(xv[r][k]) - mean) * rstd;
          const A g = gv[r][k] * wv[k];
          s1 += g;
          s2 += g * xh;
        }
      }
    }
    if (tpr <= 32) {
      s1 = warp_sum(s1, tpr);
      s2 = warp_sum(s2, tpr);
    } else {
      block_sum2(s1, s2, red);
    }
    const A c1 = s1 * invL, c2 = s2 * invL;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        A o[VEC], wv[VEC];
        ln_weight<T, VEC>(p, pk * VEC, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A xh = (static_cast<A>(xv[r][k]) - mean) * rstd;
          o[k] = rstd * (gv[r][k] * wv[k] - c1 - xh * c2);
          dwp[r][k] += gv[r][k] * xh;
          dbp[r][k] += gv[r][k];
        }
        if (p.dx != nullptr) store_as<T, VEC, A>(p.dx + off + pk * VEC, o);
      }
    }
  }
  if (!want_cols) return;

  // Column partials of this block, fixed order: lanes of a warp that own the same columns
  // (tpr < 32), then warps (tpr <= 32), then written by the owners.
  A* out_dw = p.ws_dw != nullptr ? p.ws_dw + static_cast<int64_t>(blockIdx.x) * p.L : nullptr;
  A* out_db = p.ws_db != nullptr ? p.ws_db + static_cast<int64_t>(blockIdx.x) * p.L : nullptr;
  if (tpr <= 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        for (int o = 16; o >= tpr; o >>= 1) {
          dwp[r][k] += __shfl_xor_sync(0xffffffffu, dwp[r][k], o);
          dbp[r][k] += __shfl_xor_sync(0xffffffffu, dbp[r][k], o);
        }
    if (nw > 1) {
      if (lane < tpr && warp < kSubWarpWarps) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            part[0][warp][lane * kBwdElems + r * VEC + k] = dwp[r][k];
            part[1][warp][lane * kBwdElems + r * VEC + k] = dbp[r][k];
          }
      }
      __syncthreads();
      if (warp == 0 && lane < tpr) {
        for (int w2 = 1; w2 < nw && w2 < kSubWarpWarps; ++w2) {
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              dwp[r][k] += part[0][w2][lane * kBwdElems + r * VEC + k];
              dbp[r][k] += part[1][w2][lane * kBwdElems + r * VEC + k];
            }
        }
      }
    }
    if (warp != 0 || lane >= tpr) return;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int pk = r * tpr + t;
    if (pk < packs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (out_dw != nullptr) out_dw[pk * VEC + k] = dwp[r][k];
        if (out_db != nullptr) out_db[pk * VEC + k] = dbp[r][k];
      }
    }
  }
}

// Per-item sums for the backward, over (row, chunk) items:
//   s1 = sum(g), s2 = sum(g * xhat), g = dy * w[j] (w null: g = dy), xhat = (x - mean) * rstd,
// with the statistics of row / stat_div (GroupNorm NCHW: rows are (n, c) planes, stat_div = C/G).
// ws[0][item] = s1, ws[1][item] = s2.
template <typename T>
struct RowSums {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // T or float32
  const A* mean = nullptr;
  const A* rstd = nullptr;
  Operand<T> w;  // absent, T or float32
  int64_t stat_div = 1;
  A* ws = nullptr;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kItemThreads) row_sums_partial_kernel(RowSums<T> p, Items it) {
  using A = acc_of<T>;
  const int tpr = it.tpr;
  const int ipb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t items = it.M * it.S;
  for (int64_t ib = blockIdx.x; ib * ipb < items; ib += gridDim.x) {  // uniform over the block
    const int64_t item = ib * ipb + grp;
    A s1 = A(0), s2 = A(0);
    if (item < items) {
      const int64_t row = item / it.S, s = item - row * it.S;
      const int64_t e0 = s * it.chunk;
      const int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
      const int64_t srow = p.stat_div == 1 ? row : row / p.stat_div;
      const A mean = p.mean[srow], rstd = p.rstd[srow];
      const int64_t off = row * it.L;
      const int64_t p1 = e1 / VEC;
      for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
        T xv[kUnroll][VEC];
        A gv[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            load_raw<T, VEC>(p.x + off + q * VEC, xv[u]);
            p.dy.load(off + q * VEC, gv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            A wv[VEC];
            if (p.w.present()) {
              p.w.load(q * VEC, wv);
            } else {
#pragma unroll
              for (int k = 0; k < VEC; ++k) wv[k] = A(1);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const A g = gv[u][k] * wv[k];
              s1 += g;
              s2 += g * ((static_cast<A>(xv[u][k]) - mean) * rstd);
            }
          }
        }
      }
    }
    s1 = warp_sum(s1, tpr);  // every lane of the warp takes part
    s2 = warp_sum(s2, tpr);
    if (item < items && t == 0) {
      p.ws[item] = s1;
      p.ws[items + item] = s2;
    }
  }
}

// out1[r] = sum_k in[base(r) + k*sk], out2[r] = sum_k in[plane + base(r) + k*sk] in a fixed order,
// base(r) = (r / rdiv) * s_hi + (r % rdiv) * s_lo. A warp per r.
template <typename A>
__global__ void __launch_bounds__(256)
    row_sums_finalize_kernel(const A* __restrict__ in, int64_t rows, int64_t K, int64_t rdiv,
                             int64_t s_hi, int64_t s_lo, int64_t sk, int64_t plane,
                             A* __restrict__ out1, A* __restrict__ out2) {
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < rows;
       r += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    const int64_t base = (r / rdiv) * s_hi + (r % rdiv) * s_lo;
    A a = A(0), b = A(0);
    for (int64_t k = lane; k < K; k += 32) {
      a += in[base + k * sk];
      b += in[plane + base + k * sk];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      out1[r] = a;
      out2[r] = b;
    }
  }
}

// LayerNorm backward for long rows: block (rg, s) handles the column chunk s (blockDim * 8
// elements) of rows rg, rg + RG, ...; row sums s1 = sum(g), s2 = sum(g * xhat) come precomputed.
// Column partials -> ws row rg.
constexpr int kBwdSplitMaxThreads = 512;

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdSplitMaxThreads)
    ln_bwd_split_kernel(RowBwd<T> p, const acc_of<T>* __restrict__ rs1,
                        const acc_of<T>* __restrict__ rs2, int64_t S2, int64_t RG) {
  using A = acc_of<T>;
  constexpr int R = kBwdPacks<VEC>;
  const A invL = A(1) / static_cast<A>(p.L);
  const int64_t cw = static_cast<int64_t>(blockDim.x) * kBwdElems;  // chunk width
  for (int64_t item = blockIdx.x; item < RG * S2; item += gridDim.x) {
    const int64_t rg = item / S2, s = item - rg * S2;
    const int64_t c0 = s * cw;
    A dwp[R][VEC], dbp[R][VEC], wv[R][VEC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) dwp[r][k] = dbp[r][k] = A(0);
      if (j0 < p.L) {
        if (p.w.present()) {
          p.w.load(j0, wv[r]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) wv[r][k] = A(1);
        }
      }
    }
    for (int64_t row = rg; row < p.M; row += RG) {
      const A mean = p.mean[row], rstd = p.rstd[row];
      const A c1 = rs1[row] * invL, c2 = rs2[row] * invL;
      const int64_t off = row * p.L;
      T xv[R][VEC];
      A gv[R][VEC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
        if (j0 < p.L) {
          load_raw<T, VEC>(p.x + off + j0, xv[r]);
          p.dy.load(off + j0, gv[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
        if (j0 < p.L) {
          A o[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A xh = (static_cast<A>(xv[r][k]) - mean) * rstd;
            o[k] = rstd * (gv[r][k] * wv[r][k] - c1 - xh * c2);
            dwp[r][k] += gv[r][k] * xh;
            dbp[r][k] += gv[r][k];
          }
          if (p.dx != nullptr) store_as<T, VEC, A>(p.dx + off + j0, o);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
      if (j0 < p.L) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (p.ws_dw != nullptr) p.ws_dw[rg * p.L + j0 + k] = dwp[r][k];
          if (p.ws_db != nullptr) p.ws_db[rg * p.L + j0 + k] = dbp[r][k];
        }
      }
    }
  }
}

// out_i[j] = sum_{k < K} in_i[k * ncols + j] in a fixed order, for i = blockIdx.y (0: out1,
// 1: out2; a null output skips). blockDim 1024 = (1024 / ky) columns x ky row lanes (ky a power of
// two <= 32: few rows -> wide column tiles); out dtype T or float32.
template <typename T>
__global__ void __launch_bounds__(1024)
    col_sum_finalize_kernel(const acc_of<T>* __restrict__ in1, const acc_of<T>* __restrict__ in2,
                            int64_t K, int64_t ncols, int ky, Operand<T> out1, Operand<T> out2) {
  using A = acc_of<T>;
  __shared__ A sh[1024];
  const A* in = blockIdx.y == 0 ? in1 : in2;
  const Operand<T> out = blockIdx.y == 0 ? out1 : out2;
  if (in == nullptr || !out.present()) return;  // uniform over the block
  const int cx = blockDim.x / ky;
  const int tx = threadIdx.x % cx, ty = threadIdx.x / cx;
  for (int64_t cb = blockIdx.x; cb * cx < ncols; cb += gridDim.x) {  // uniform over the block
    const int64_t col = cb * cx + tx;
    A acc = A(0);
    if (col < ncols)
      for (int64_t k = ty; k < K; k += ky) acc += in[k * ncols + col];
    __syncthreads();  // sh may still be read by the previous column block
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int st = ky >> 1; st > 0; st >>= 1) {
      if (ty < st) sh[ty * cx + tx] += sh[(ty + st) * cx + tx];
      __syncthreads();
    }
    if (ty == 0 && col < ncols) out.set(col, sh[tx]);
  }
}

}  // namespace row
}  // namespace fastnorm
