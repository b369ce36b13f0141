// Strided channels reduced per position: for every position (n, s) of an [N, C, S] tensor
// (NCHW with S = H*W, or any spatial rank), a reduction over its C channels, which lie S elements
// apart. LayerNorm2d on NCHW input (ConvNeXt's channels-first LayerNorm); the family is meant to
// take LocalResponseNorm's window sums too.
//   ln2d_fwd_kernel  per position: Welford over the thread's channels, Chan merge of the block's
//                    channel lanes in a fixed order, then y = (x - mean) * rstd * w_c + b_c
//   ln2d_bwd_kernel  per position: s1 = sum_c g, s2 = sum_c g * xhat (g = dy * w_c), then
//                    dx = rstd * (g - s1 / C - xhat * s2 / C) (two passes over x and dy: the
//                    first only when dx is wanted); per channel, this block's partial
//                    sums of dy * xhat and dy (dweight, dbias) -> row blockIdx.x of [gridDim, C]
//                    workspaces, summed in a fixed order by groups' col_sum_finalize_kernel.
// Block layout: kPosThreads = PX x CY threads. tx = threadIdx.x % PX walks positions, V
// consecutive positions per thread (a pack: 16 bytes when the host allows), so a warp's load of
// one channel is PX * V consecutive elements (coalesced); ty = threadIdx.x / PX takes channels
// c = ty, ty + CY, ... A tile is PX packs of positions x all C channels; blocks walk tiles
// grid-stride. CACHED (forward): the thread's packs stay in registers between the statistics
// and the output pass (C <= CY * kCachePacks); otherwise the output pass reads them again (the
// same thread and addresses, soon after: L1/L2 hits as far as the tile fits there).
// ACT (both kernels): the fused activation epilogue (kernels/activation.cuh): the forward stores
// act(z), z = xhat * w_c + b_c; the backward recomputes z and uses dz = dy * act'(z) in place of
// dy (s1, s2, dx, dweight, dbias). ACT = false is the plain kernel, unchanged.
// Host plans and launches: csrc/launch/positions.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/activation.cuh"
#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace positions {

constexpr int kPosThreads = 256;
// Packs of x a forward thread keeps in registers (CACHED): 8 x 16 bytes = 32 registers.
constexpr int kCachePacks = 8;

template <typename T>
struct PosFwd {
  using A = acc_of<T>;
  const T* x = nullptr;  // [N, C, S] contiguous
  Operand<T> y;          // [N, C, S]: T or float32 (autocast)
  Operand<T> w, b;       // [C]: absent, T or float32
  A* mean = nullptr;     // [N * S], position order (n, s)
  A* rstd = nullptr;
  int64_t N = 0, C = 0, S = 0;
  A eps = 0;
  Activation act;        // the epilogue of ln2d_fwd_kernel<..., ACT = true>
};

template <typename T>
struct PosBwd {
  using A = acc_of<T>;
  const T* x = nullptr;  // [N, C, S] contiguous
  Operand<T> dy;         // [N, C, S]: T or float32
  const A* mean = nullptr;
  const A* rstd = nullptr;
  Operand<T> w;          // [C]: absent, T or float32
  T* dx = nullptr;       // nullable: dx not requested
  A* ws_dw = nullptr;    // nullable: [gridDim.x, C] partials of sum(dy * xhat)
  A* ws_db = nullptr;    // nullable: [gridDim.x, C] partials of sum(dy)
  int64_t N = 0, C = 0, S = 0;
  Operand<T> b;          // [C]: the bias (absent = 0), read with ACT only (z)
  Activation act;        // ln2d_bwd_kernel<..., ACT = true>: dy -> dy * act'(z)
};

// The position pack `item` (of N * S / V): its offset in [N, C, S] at channel 0.
template <int V>
__device__ __forceinline__ int64_t pack_base(int64_t item, int64_t Sp, int64_t C, int64_t S) {
  const int64_t n = item / Sp;
  return n * C * S + (item - n * Sp) * V;
}

// Channels taken by channel lane j of cy (c = j, j + cy, ... < C), from full = C / cy and
// rem = C % cy computed once per kernel (no 64-bit division in the merge loop).
__device__ __forceinline__ int64_t lane_channels(int64_t full, int64_t rem, int j) {
  return full + (j < rem ? 1 : 0);
}

template <typename T, int V, bool CACHED, bool ACT>
__global__ void __launch_bounds__(kPosThreads) ln2d_fwd_kernel(PosFwd<T> p, int cy) {
  using A = acc_of<T>;
  constexpr int R = CACHED ? kCachePacks : 1;
  __shared__ A red[2][kPosThreads * V];  // per (channel lane, position): mean / m2, then results
  const int px = kPosThreads / cy;
  const int tx = threadIdx.x % px, ty = threadIdx.x / px;
  const int64_t Sp = p.S / V, items = p.N * Sp;
  const int64_t tiles = (items + px - 1) / px;
  const int64_t full = p.C / cy, rem = p.C % cy;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform over the block
    const int64_t item = t * px + tx;
    const bool active = item < items;
    const int64_t base = active ? pack_base<V>(item, Sp, p.C, p.S) : 0;
    // statistics over this lane's channels; every position of the pack has the same count
    A mean[V], m2[V];
#pragma unroll
    for (int k = 0; k < V; ++k) mean[k] = m2[k] = A(0);
    A cnt = A(0);
    T cache[R][V];
    if (active) {
      if constexpr (CACHED) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int64_t c = ty + int64_t(r) * cy;
          if (c < p.C) load_raw<T, V>(p.x + base + c * p.S, cache[r]);  // all loads first
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (ty + int64_t(r) * cy >= p.C) break;
          cnt += A(1);
          const A inv = A(1) / A(r + 1);  // = 1 / cnt, a constant of the unrolled loop
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A v = static_cast<A>(cache[r][k]);
            const A d = v - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (v - mean[k]);
          }
        }
      } else {
#pragma unroll 4
        for (int64_t c = ty; c < p.C; c += cy) {
          T v[V];
          load_raw<T, V>(p.x + base + c * p.S, v);
          cnt += A(1);
          const A inv = A(1) / cnt;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A a = static_cast<A>(v[k]);
            const A d = a - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (a - mean[k]);
          }
        }
      }
    }
    // Chan merge of the cy channel lanes, lane 0 first, in lane order
    const int slot = tx * V;
    __syncthreads();  // red may still be read for the previous tile
#pragma unroll
    for (int k = 0; k < V; ++k) {
      red[0][ty * px * V + slot + k] = mean[k];
      red[1][ty * px * V + slot + k] = m2[k];
    }
    __syncthreads();
    if (ty == 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        Welford<A> w(mean[k], m2[k], cnt);
        for (int j = 1; j < cy; ++j) {
          const A nj = static_cast<A>(lane_channels(full, rem, j));
          if (nj == A(0)) break;
          w.merge(Welford<A>(red[0][j * px * V + slot + k], red[1][j * px * V + slot + k], nj));
        }
        const A rs = rsqrt_acc(w.var_biased() + p.eps);
        red[0][slot + k] = w.mean;
        red[1][slot + k] = rs;
        if (active) {
          p.mean[item * V + k] = w.mean;
          p.rstd[item * V + k] = rs;
        }
      }
    }
    __syncthreads();
    if (!active) continue;
    A mu[V], rs[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mu[k] = red[0][slot + k];
      rs[k] = red[1][slot + k];
    }
    auto apply = [&](int64_t c, const T (&v)[V]) {
      const A wc = p.w.get_or(c, A(1)), bc = p.b.get_or(c, A(0));
      A o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) o[k] = (static_cast<A>(v[k]) - mu[k]) * rs[k] * wc + bc;
      if constexpr (ACT) {
#pragma unroll
        for (int k = 0; k < V; ++k) o[k] = activate(p.act, o[k]);
      }
      p.y.template store<V>(base + c * p.S, o);
    };
    if constexpr (CACHED) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t c = ty + int64_t(r) * cy;
        if (c < p.C) apply(c, cache[r]);
      }
    } else {
#pragma unroll 4
      for (int64_t c = ty; c < p.C; c += cy) {
        T v[V];
        load_raw<T, V>(p.x + base + c * p.S, v);
        apply(c, v);
      }
    }
  }
}

template <typename T, int V, bool ACT>
__global__ void __launch_bounds__(kPosThreads) ln2d_bwd_kernel(PosBwd<T> p, int cy) {
  using A = acc_of<T>;
  __shared__ A red[2][kPosThreads * V];  // per (channel lane, position): s1 / s2 partials
  extern __shared__ unsigned char dyn_smem[];  // [2, C] dweight / dbias sums of this block
  A* acc_w = reinterpret_cast<A*>(dyn_smem);
  A* acc_b = acc_w + p.C;
  const bool want_w = p.ws_dw != nullptr, want_b = p.ws_db != nullptr;
  const bool want_params = want_w || want_b;  // uniform; the host sized dyn_smem to match
  const int px = kPosThreads / cy;
  const int tx = threadIdx.x % px, ty = threadIdx.x / px;
  const int64_t Sp = p.S / V, items = p.N * Sp;
  const int64_t tiles = (items + px - 1) / px;
  const A inv_c = A(1) / static_cast<A>(p.C);
  if (want_params) {
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) acc_w[c] = acc_b[c] = A(0);
    __syncthreads();
  }
  // channel blocks of cy channels: the same trip count for every lane, so the width-px shuffles
  // of the parameter sums see all 32 lanes of a warp (a lane past C contributes zeros)
  const int64_t cblocks = (p.C + cy - 1) / cy;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform over the block
    const int64_t item = t * px + tx;
    const bool active = item < items;
    const int64_t base = active ? pack_base<V>(item, Sp, p.C, p.S) : 0;
    A mu[V], rs[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mu[k] = active ? p.mean[item * V + k] : A(0);
      rs[k] = active ? p.rstd[item * V + k] : A(0);
    }
    // pass 1 (dx only): s1 = sum_c g, s2 = sum_c g * xhat over this lane's channels
    A s1[V], s2[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s1[k] = s2[k] = A(0);
    if (p.dx != nullptr) {
      if (active) {
        for (int64_t c = ty; c < p.C; c += cy) {
          T v[V];
          A d[V];
          load_raw<T, V>(p.x + base + c * p.S, v);
          p.dy.template load<V>(base + c * p.S, d);
          const A wc = p.w.get_or(c, A(1));
          if constexpr (ACT) {
            const A bc = p.b.get_or(c, A(0));
#pragma unroll
            for (int k = 0; k < V; ++k)
              d[k] = activation_grad(p.act, (static_cast<A>(v[k]) - mu[k]) * rs[k] * wc + bc, d[k]);
          }
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A g = d[k] * wc;
            s1[k] += g;
            s2[k] += g * ((static_cast<A>(v[k]) - mu[k]) * rs[k]);
          }
        }
      }
      const int slot = tx * V;
      __syncthreads();  // red may still be read for the previous tile
#pragma unroll
      for (int k = 0; k < V; ++k) {
        red[0][ty * px * V + slot + k] = s1[k];
        red[1][ty * px * V + slot + k] = s2[k];
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < V; ++k) {  // every lane sums the cy partials itself, in lane order
        A a = A(0), b = A(0);
        for (int j = 0; j < cy; ++j) {
          a += red[0][j * px * V + slot + k];
          b += red[1][j * px * V + slot + k];
        }
        s1[k] = a * inv_c;
        s2[k] = b * inv_c;
      }
    }
    // pass 2: dx, and the parameter sums of this tile per channel
    for (int64_t cb = 0; cb < cblocks; ++cb) {
      const int64_t c = cb * cy + ty;
      const bool live = active && c < p.C;
      T v[V];
      A d[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = static_cast<T>(0);
        d[k] = A(0);
      }
      if (live) {
        load_raw<T, V>(p.x + base + c * p.S, v);
        p.dy.template load<V>(base + c * p.S, d);
      }
      A pw = A(0), pb = A(0);
      const A wc = live ? p.w.get_or(c, A(1)) : A(0);
      if constexpr (ACT) {  // a lane past C or the positions: d = 0 stays 0 (z finite there)
        const A bc = live ? p.b.get_or(c, A(0)) : A(0);
#pragma unroll
        for (int k = 0; k < V; ++k)
          d[k] = activation_grad(p.act, (static_cast<A>(v[k]) - mu[k]) * rs[k] * wc + bc, d[k]);
      }
      A o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xh = (static_cast<A>(v[k]) - mu[k]) * rs[k];
        pw += d[k] * xh;
        pb += d[k];
        o[k] = rs[k] * (d[k] * wc - s1[k] - xh * s2[k]);
      }
      if (live && p.dx != nullptr) store_as<T, V, A>(p.dx + base + c * p.S, o);
      if (want_params) {
        pw = warp_sum(pw, px);
        pb = warp_sum(pb, px);
        if (tx == 0 && c < p.C) {  // lane ty owns channel c: one writer, tiles in order
          acc_w[c] += pw;
          acc_b[c] += pb;
        }
      }
    }
  }
  if (!want_params) return;  // uniform
  __syncthreads();
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    if (want_w) p.ws_dw[blockIdx.x * p.C + c] = acc_w[c];
    if (want_b) p.ws_db[blockIdx.x * p.C + c] = acc_b[c];
  }
}

}  // namespace positions
}  // namespace fastnorm
