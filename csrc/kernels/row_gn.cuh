// GroupNorm / InstanceNorm kernels beyond the plain row kernels of row_norm.cuh:
//   channels_last (NHWC / NDHWC) native kernels: x[n] is an [HW, C] matrix; group g is the column
//   block [g*Cg, (g+1)*Cg). A block takes (n, chunk of rpc rows, tile of bx channel packs), its
//   threads are bx packs wide and by rows deep, so each pass reads a contiguous stretch.
//   The backward's shared pieces: per-(n, g) coefficients and the NCHW dx pass.
// Framework-free device code; fixed reduction orders, no atomics.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/row_norm.cuh"
#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace row {

constexpr int kClThreads = 256;  // bx * by never exceeds this

struct ClShape {
  int64_t N = 0, HW = 0, C = 0, G = 1, Cg = 1;
  int64_t K = 1, rpc = 1;  // HW split into K chunks of rpc rows
  int64_t CT = 1;          // channel tiles of bx packs
  int bx = 1, by = 1;      // blockDim.x == bx * by <= kClThreads
};

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

// Per-(n, chunk, channel) Welford states: ws[0][(n*K + k)*C + c] = mean, ws[1][...] = m2
// (the count is the chunk's row count, recomputed by the finalize).
template <typename T, int VEC>
__global__ void __launch_bounds__(kClThreads)
    cl_welford_partial_kernel(const T* __restrict__ x, ClShape s, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
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
    const int64_t ct = item % s.CT, nk = item / s.CT;
    const int64_t k = nk % s.K, n = nk / s.K;
    const int64_t cp = ct * s.bx + tx;
    const bool cv = cp < Cp;
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    A mean[VEC], m2[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) mean[v] = m2[v] = A(0);
    int cnt = 0;
    if (cv) {
      const T* xb = x + n * s.HW * s.C + cp * VEC;
      for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kUnroll) {
        T xv[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t hh = h + static_cast<int64_t>(u) * s.by;
          if (hh < h1) load_raw<T, VEC>(xb + hh * s.C, xv[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t hh = h + static_cast<int64_t>(u) * s.by;
          if (hh < h1) {
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
    }
  }
}

// A warp per (n, g) merges the Cg channels x K chunks of states in a fixed order -> mean, rstd.
template <typename A>
__global__ void __launch_bounds__(256)
    cl_welford_finalize_kernel(const A* __restrict__ ws, ClShape s, A eps, A* __restrict__ mean,
                               A* __restrict__ rstd) {
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
      w.merge(Welford<A>(ws[i], ws[plane + i], static_cast<A>(rows)));
    }
    w = warp_merge(w);
    if (lane == 0) {
      mean[ng] = w.mean;
      rstd[ng] = rsqrt_acc(w.var_biased() + eps);
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
};

// y = (x - mean) * (rstd * w) + b, channels_last, items in the reverse order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kClThreads) cl_apply_kernel(ClFwd<T> p) {
  using A = acc_of<T>;
  const ClShape& s = p.s;
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  for (int64_t fwd = blockIdx.x; fwd < items; fwd += gridDim.x) {
    const int64_t item = items - 1 - fwd;
    const int64_t ct = item % s.CT, nk = item / s.CT;
    const int64_t k = nk % s.K, n = nk / s.K;
    const int64_t cp = ct * s.bx + tx;
    if (cp >= Cp) continue;  // no collective operations in this kernel
    A mu[VEC], sc[VEC], bb[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = cp * VEC + v;
      const int64_t ng = n * s.G + c / s.Cg;
      mu[v] = p.mean[ng];
      const A wc = p.w.get_or(c, A(1));
      sc[v] = p.rstd[ng] * wc;
      bb[v] = p.b.get_or(c, A(0));
    }
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    const int64_t base = n * s.HW * s.C + cp * VEC;
    for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kUnroll) {
      T xv[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t hh = h + static_cast<int64_t>(u) * s.by;
        if (hh < h1) load_raw<T, VEC>(p.x + base + hh * s.C, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t hh = h + static_cast<int64_t>(u) * s.by;
        if (hh < h1) {
          A o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) o[v] = (static_cast<A>(xv[u][v]) - mu[v]) * sc[v] + bb[v];
          p.y.store(base + hh * s.C, o);
        }
      }
    }
  }
}

template <typename T>
struct ClBwd {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // T or float32
  const A* mean = nullptr;  // [N, G]
  const A* rstd = nullptr;
  ClShape s;
};

// Per-(n, chunk, channel) sums, channels_last: ws[0][(n*K + k)*C + c] = sum(dy * xhat),
// ws[1][...] = sum(dy).
template <typename T, int VEC>
__global__ void __launch_bounds__(kClThreads)
    cl_bwd_sums_kernel(ClBwd<T> p, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  __shared__ A sm_a[kClThreads * VEC];
  __shared__ A sm_b[kClThreads * VEC];
  const ClShape& s = p.s;
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int slot = ty * s.bx + tx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  const int64_t plane = s.N * s.K * s.C;
  int by_p2 = 1;
  while (by_p2 < s.by) by_p2 <<= 1;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform over the block
    const int64_t ct = item % s.CT, nk = item / s.CT;
    const int64_t k = nk % s.K, n = nk / s.K;
    const int64_t cp = ct * s.bx + tx;
    const bool cv = cp < Cp;
    A sa[VEC], sb[VEC], mu[VEC], rs[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) sa[v] = sb[v] = mu[v] = rs[v] = A(0);
    if (cv) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t ng = n * s.G + (cp * VEC + v) / s.Cg;
        mu[v] = p.mean[ng];
        rs[v] = p.rstd[ng];
      }
      const int64_t h0 = k * s.rpc;
      const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
      const int64_t base = n * s.HW * s.C + cp * VEC;
      for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kUnroll) {
        T xv[kUnroll][VEC];
        A gv[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t hh = h + static_cast<int64_t>(u) * s.by;
          if (hh < h1) {
            load_raw<T, VEC>(p.x + base + hh * s.C, xv[u]);
            p.dy.load(base + hh * s.C, gv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t hh = h + static_cast<int64_t>(u) * s.by;
          if (hh < h1) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              sa[v] += gv[u][v] * (static_cast<A>(xv[u][v]) - mu[v]);
              sb[v] += gv[u][v];
            }
          }
        }
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) sa[v] *= rs[v];
    }
    __syncthreads();  // the previous item's reads of shared memory are done
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      sm_a[slot * VEC + v] = sa[v];
      sm_b[slot * VEC + v] = sb[v];
    }
    __syncthreads();
    for (int st = by_p2 >> 1; st > 0; st >>= 1) {
      if (ty < st && ty + st < s.by) {
        const int o = (ty + st) * s.bx + tx;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          sa[v] += sm_a[o * VEC + v];
          sb[v] += sm_b[o * VEC + v];
          sm_a[slot * VEC + v] = sa[v];
          sm_b[slot * VEC + v] = sb[v];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && cv) {
      const int64_t base = nk * s.C + cp * VEC;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        ws[base + v] = sa[v];
        ws[plane + base + v] = sb[v];
      }
    }
  }
}

// Per (n, g): c1 = sum_c w_c * B[n, c] / D, c2 = sum_c w_c * S[n, c] / D over the group's
// channels (S = sum(dy * xhat), B = sum(dy) per (n, c); D = Cg * HW). A warp per (n, g).
template <typename T>
__global__ void __launch_bounds__(256)
    gn_bwd_coef_kernel(const acc_of<T>* __restrict__ S, const acc_of<T>* __restrict__ B,
                       Operand<T> w, int64_t N, int64_t C, int64_t G, int64_t Cg,
                       acc_of<T> invD, acc_of<T>* __restrict__ c1, acc_of<T>* __restrict__ c2) {
  using A = acc_of<T>;
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  for (int64_t ng = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); ng < N * G;
       ng += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    const int64_t n = ng / G, g = ng - n * G;
    A s1 = A(0), s2 = A(0);
    for (int64_t ci = lane; ci < Cg; ci += 32) {
      const int64_t c = g * Cg + ci;
      const A wc = w.get_or(c, A(1));
      s1 += wc * B[n * C + c];
      s2 += wc * S[n * C + c];
    }
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
      c1[ng] = s1 * invD;
      c2[ng] = s2 * invD;
    }
  }
}

// dx = rstd * (w_c * dy - c1 - xhat * c2) for GroupNorm; rows (n, g) of NCHW data.
template <typename T>
struct GnDx {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // T or float32
  const A* mean = nullptr;  // [N*G] for the NCHW rows; [N, G] for channels_last
  const A* rstd = nullptr;
  const A* c1 = nullptr;
  const A* c2 = nullptr;
  Operand<T> w;  // absent, T or float32
  T* dx = nullptr;
  GnMap gn;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kItemThreads) gn_dx_nchw_kernel(GnDx<T> p, Items it) {
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
    const int64_t off = row * it.L;
    const A mean = p.mean[row], rstd = p.rstd[row];
    const A k1 = p.c1[row], k2 = p.c2[row];
    const int64_t cbase = p.gn.chan_base(row);
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
          const int64_t j0 = q * VEC;
          A wv[VEC], o[VEC];
          if (!p.w.present()) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) wv[k] = A(1);
          } else if (p.gn.pack_in_channel) {
            const A wc = p.w.get(cbase + p.gn.chan_in_row(j0));
#pragma unroll
            for (int k = 0; k < VEC; ++k) wv[k] = wc;
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k)
              wv[k] = p.w.get(cbase + p.gn.chan_in_row(j0 + k));
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A xh = (static_cast<A>(xv[u][k]) - mean) * rstd;
            o[k] = rstd * (wv[k] * gv[u][k] - k1 - xh * k2);
          }
          store_as<T, VEC, A>(p.dx + off + j0, o);
        }
      }
    }
  }
}

// The same dx, channels_last; blocks as in cl_apply_kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(kClThreads) cl_dx_kernel(GnDx<T> p, ClShape s) {
  using A = acc_of<T>;
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  for (int64_t fwd = blockIdx.x; fwd < items; fwd += gridDim.x) {
    const int64_t item = items - 1 - fwd;
    const int64_t ct = item % s.CT, nk = item / s.CT;
    const int64_t k = nk % s.K, n = nk / s.K;
    const int64_t cp = ct * s.bx + tx;
    if (cp >= Cp) continue;  // no collective operations in this kernel
    A mu[VEC], rs[VEC], wr[VEC], k1[VEC], k2[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = cp * VEC + v;
      const int64_t ng = n * s.G + c / s.Cg;
      mu[v] = p.mean[ng];
      rs[v] = p.rstd[ng];
      const A wc = p.w.get_or(c, A(1));
      wr[v] = rs[v] * wc;
      k1[v] = rs[v] * p.c1[ng];
      k2[v] = rs[v] * rs[v] * p.c2[ng];
    }
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    const int64_t base = n * s.HW * s.C + cp * VEC;
    for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kUnroll) {
      T xv[kUnroll][VEC];
      A gv[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t hh = h + static_cast<int64_t>(u) * s.by;
        if (hh < h1) {
          load_raw<T, VEC>(p.x + base + hh * s.C, xv[u]);
          p.dy.load(base + hh * s.C, gv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t hh = h + static_cast<int64_t>(u) * s.by;
        if (hh < h1) {
          A o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            o[v] = wr[v] * gv[u][v] - k1[v] - (static_cast<A>(xv[u][v]) - mu[v]) * k2[v];
          store_as<T, VEC, A>(p.dx + base + hh * s.C, o);
        }
      }
    }
  }
}

}  // namespace row
}  // namespace fastnorm
