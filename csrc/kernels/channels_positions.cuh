// Strided channels reduced per position: for every position (n, s) of an [N, C, S] tensor
// (NCHW with S = H*W, or any spatial rank), a reduction over its C channels, which lie S elements
// apart. LayerNorm2d on NCHW input (ConvNeXt's channels-first LayerNorm), and LocalResponseNorm,
// whose reduction is a window of channels around each output channel instead of all of them.
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
//
//   lrn_fwd_kernel   y_c = x_c / (k + alpha / size * sum_{j in win(c)} x_j^2)^beta, win(c) =
//                    [c - size/2, c + (size-1)/2] within [0, C) (torch's zero padding)
//   lrn_bwd_kernel   dx_c = dy_c * d_c^-beta - (2 alpha beta / size) * x_c *
//                    sum_{j in twin(c)} dy_j x_j d_j^(-beta-1), twin(c) = [c - (size-1)/2,
//                    c + size/2] (the channels whose window holds c); d recomputed from x
// A thread owns G consecutive channels (a channel group) of one position pack and walks the
// channels its group's windows reach in ascending order, so every output's window sum is a fresh
// sum in channel order (as torch's pooling sums it), never a running add/subtract one. Values
// outside the group are re-read (L1 hits: neighbouring groups and, NCHW, the same thread's last
// window). Two layouts, one kernel each way (template flag CL):
//   NCHW (CL = false): the pack is V consecutive positions (16 bytes when the host allows) of
//     channel j at base + j * S; a warp's load of one channel is 32 packs in a row (coalesced).
//     Threads: position packs fastest, then channel groups.
//   channels_last / channels_last_3d, or S == 1 (CL = true): a position's C channels are one
//     contiguous row; the thread's group is G consecutive channels of one row (V = 1) and the
//     window reads are scalar loads of that row, which the threads of neighbouring groups (the
//     next lanes of the warp) read too: L1 hits. The group's G outputs are stored as one pack
//     (16-byte stores) when the host allows. Threads: channel groups fastest, then positions.
// The backward needs d_j for every j of twin(c): the group computes them in one ascending walk
// over the G + size - 1 channels its twin windows reach (each a fresh window sum of size
// re-reads), adding dy_j x_j d_j^(-beta-1) to the outputs whose twin window holds j.
// Loads in flight: the forward's channel walk is unrolled 4 deep, the backward's inner window sum
// likewise (its outer walk is not: with G x V sums, own values and x live, an unrolled outer walk
// spills). G x V is 16 elements (8 in fp64), enough to amortise the size - 1 halo channels and
// few enough to stay within kLrnMinBlocks' 128 registers (-Xptxas -v: 60-92 forward, 93-124
// backward, no spills).
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

// ---------------------------------------------------------------------------------------------
// LocalResponseNorm
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LrnArgs {
  using A = acc_of<T>;
  const T* x = nullptr;   // [N, C, S] (CL = false) or [N, S, C] (CL = true), contiguous
  const T* dy = nullptr;  // backward only: x's layout
  T* out = nullptr;       // y (forward) or dx (backward): x's layout
  int64_t N = 0, C = 0, S = 0;
  int64_t size = 1;       // channels in a window, >= 1
  A alpha = 0, beta = 0, k = 0;
  bool vec_store = false;  // CL: a full group's G outputs stored as one pack (host: aligned)
};

// Elements a thread holds per array (G channels x V positions): 16 fp32 registers, 8 fp64 pairs.
template <typename T>
inline constexpr int kLrnElems = sizeof(acc_of<T>) == 8 ? 8 : 16;

// Channels per thread: G x V = kLrnElems. NCHW: 4 channels of a 4-position fp32 pack, 2 of an
// 8-position fp16/bf16 pack, 4 of a 2-position fp64 pack; single positions (and channels_last):
// 16 channels (8 in fp64).
template <typename T, int V>
inline constexpr int kLrnGroup = kLrnElems<T> / V > 0 ? kLrnElems<T> / V : 1;

// At least two resident 256-thread blocks per SM (a register cap of 128): one block's last units
// overlap the next one's loads. The kernels fit it without spilling (-Xptxas -v).
constexpr int kLrnMinBlocks = 2;

__device__ __forceinline__ float pow_acc(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_acc(double a, double b) { return pow(a, b); }

// torch's div: the window's average (sum / size: avg_pool counting the zero padding), times
// alpha, plus k; y = x / div^beta.
template <typename A>
__device__ __forceinline__ A lrn_div(A sum, A size, A alpha, A k) {
  return sum / size * alpha + k;
}

// Unit u (position packs x channel groups) -> the position's offset at channel 0 and the group's
// first channel.
template <typename T, int V, bool CL>
__device__ __forceinline__ void lrn_unit(const LrnArgs<T>& p, int64_t u, int64_t items,
                                         int64_t groups, int64_t& base, int64_t& c0) {
  constexpr int G = kLrnGroup<T, V>;
  if constexpr (CL) {
    const int64_t row = u / groups;  // channel groups fastest: a warp reads along a row
    c0 = (u - row * groups) * G;
    base = row * p.C;
  } else {
    const int64_t gi = u / items;  // position packs fastest: a warp reads along positions
    c0 = gi * G;
    base = pack_base<V>(u - gi * items, p.S / V, p.C, p.S);
  }
}

template <typename T, int V, bool CL>
__device__ __forceinline__ void lrn_store(const LrnArgs<T>& p, int64_t base, int64_t c0,
                                          int64_t cs, const acc_of<T> (&o)[kLrnGroup<T, V>][V]) {
  using A = acc_of<T>;
  constexpr int G = kLrnGroup<T, V>;
  if constexpr (CL) {
    if (p.vec_store && c0 + G <= p.C) {
      A flat[G];
#pragma unroll
      for (int g = 0; g < G; ++g) flat[g] = o[g][0];
      store_as<T, G, A>(p.out + base + c0, flat);
      return;
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
    if (c0 + g < p.C) store_as<T, V, A>(p.out + base + (c0 + g) * cs, o[g]);
}

template <typename T, int V, bool CL>
__global__ void __launch_bounds__(kPosThreads, kLrnMinBlocks) lrn_fwd_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  constexpr int G = kLrnGroup<T, V>;
  static_assert(!CL || V == 1, "channels_last: a thread's channels belong to one position");
  const int64_t cs = CL ? 1 : p.S;  // channel stride
  const int64_t items = CL ? p.N * p.S : p.N * (p.S / V);
  const int64_t groups = (p.C + G - 1) / G;
  const int64_t units = items * groups;
  // win(c) = [c - before, c + after], reaching at most C channels either way (int: C < 2^31)
  const int before = static_cast<int>(p.size / 2 < p.C ? p.size / 2 : p.C);
  const int after = static_cast<int>((p.size - 1) / 2 < p.C ? (p.size - 1) / 2 : p.C);
  const A fsize = static_cast<A>(p.size);
  for (int64_t u = blockIdx.x * int64_t(kPosThreads) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * kPosThreads) {
    int64_t base, c0;
    lrn_unit<T, V, CL>(p, u, items, groups, base, c0);
    A sum[G][V], xo[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) sum[g][e] = xo[g][e] = A(0);
    // the channels the group's windows reach, ascending; each adds to the windows holding it
    const int64_t jlo = c0 - before > 0 ? c0 - before : 0;
    const int64_t jhi = c0 + G - 1 + after < p.C - 1 ? c0 + G - 1 + after : p.C - 1;
#pragma unroll 4
    for (int64_t j = jlo; j <= jhi; ++j) {
      A a[V];
      load_acc<A, T, V>(p.x + base + j * cs, a);
      // j is in win(c0 + g) for g in [jr - after, jr + before]: compares with constants
      const int jr = static_cast<int>(j - c0);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool in = g >= jr - after && g <= jr + before;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (in) sum[g][e] += a[e] * a[e];
          if (g == jr) xo[g][e] = a[e];
        }
      }
    }
    A o[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e)
        o[g][e] = xo[g][e] / pow_acc(lrn_div(sum[g][e], fsize, p.alpha, p.k), p.beta);
    lrn_store<T, V, CL>(p, base, c0, cs, o);
  }
}

template <typename T, int V, bool CL>
__global__ void __launch_bounds__(kPosThreads, kLrnMinBlocks) lrn_bwd_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  constexpr int G = kLrnGroup<T, V>;
  static_assert(!CL || V == 1, "channels_last: a thread's channels belong to one position");
  const int64_t cs = CL ? 1 : p.S;
  const int64_t items = CL ? p.N * p.S : p.N * (p.S / V);
  const int64_t groups = (p.C + G - 1) / G;
  const int64_t units = items * groups;
  const int before = static_cast<int>(p.size / 2 < p.C ? p.size / 2 : p.C);
  const int after = static_cast<int>((p.size - 1) / 2 < p.C ? (p.size - 1) / 2 : p.C);
  const A fsize = static_cast<A>(p.size);
  const A coef = A(2) * p.alpha * p.beta / fsize;
  for (int64_t u = blockIdx.x * int64_t(kPosThreads) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * kPosThreads) {
    int64_t base, c0;
    lrn_unit<T, V, CL>(p, u, items, groups, base, c0);
    // per output: the twin-window sum, its own dy * d^-beta, its own x
    A tsum[G][V], own[G][V], xo[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) tsum[g][e] = own[g][e] = xo[g][e] = A(0);
    // twin(c) = [c - after, c + before]: the channels j whose window holds c
    const int64_t jlo = c0 - after > 0 ? c0 - after : 0;
    const int64_t jhi = c0 + G - 1 + before < p.C - 1 ? c0 + G - 1 + before : p.C - 1;
#pragma unroll 1
    for (int64_t j = jlo; j <= jhi; ++j) {
      // d_j: a fresh sum over win(j) in channel order, the forward's sum
      const int64_t ilo = j - before > 0 ? j - before : 0;
      const int64_t ihi = j + after < p.C - 1 ? j + after : p.C - 1;
      A s[V], xj[V];
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] = xj[e] = A(0);
#pragma unroll 4
      for (int64_t i = ilo; i <= ihi; ++i) {
        A a[V];
        load_acc<A, T, V>(p.x + base + i * cs, a);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          s[e] += a[e] * a[e];
          if (i == j) xj[e] = a[e];
        }
      }
      A d[V];
      load_acc<A, T, V>(p.dy + base + j * cs, d);
      A q[V], r[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A div = lrn_div(s[e], fsize, p.alpha, p.k);
        r[e] = A(1) / pow_acc(div, p.beta);  // d_j^-beta
        q[e] = d[e] * xj[e] * r[e] / div;    // dy_j x_j d_j^(-beta-1)
      }
      // j is in twin(c0 + g) for g in [jr - before, jr + after]
      const int jr = static_cast<int>(j - c0);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool in = g >= jr - before && g <= jr + after;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (in) tsum[g][e] += q[e];
          if (g == jr) {
            own[g][e] = d[e] * r[e];
            xo[g][e] = xj[e];
          }
        }
      }
    }
    A o[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) o[g][e] = own[g][e] - coef * xo[g][e] * tsum[g][e];
    lrn_store<T, V, CL>(p, base, c0, cs, o);
  }
}

}  // namespace positions
}  // namespace fastnorm
