// Strided channels reduced per position: for every position (n, s) of an [N, C, S] tensor
// (NCHW with S = H*W, or any spatial rank), a reduction over its C channels, which lie S elements
// apart. LayerNorm2d on NCHW input (ConvNeXt's channels-first LayerNorm), and LocalResponseNorm,
// whose reduction is a window of channels around each output channel instead of all of them.
//   ln2d_fwd_kernel  per position: Welford over the thread's channels, Chan merge of the block's
//                    channel lanes in a fixed tree, then y = z = (x - mean) * (rstd * w_c) + b_c
//                    (affine_z, kernels/pack.cuh)
//   ln2d_bwd_kernel  per position: s1 = sum_c g, s2 = sum_c g * xhat (g = dy * w_c), then
//                    dx = rstd * (g - s1 / C - xhat * s2 / C) (two passes over x and dy: the
//                    first only when dx is wanted); per channel, this block's partial
//                    sums of dy * xhat and dy (dweight, dbias) -> row blockIdx.x of [gridDim, C]
//                    workspaces, summed in a fixed order by groups' col_sum_finalize_kernel.
// Block layout: kPosThreads = PX x CY threads. tx = threadIdx.x % PX walks positions, V
// consecutive positions per thread (a pack: 16 or 8 bytes when the host allows), so a warp's load
// of one channel is PX * V consecutive elements (coalesced); ty = threadIdx.x / PX takes channels
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
// Every output's window sum (and twin sum) is a fresh sum in ascending channel order, as torch's
// pooling sums it, never a running add/subtract one: its rounding depends on C, size and the
// dtype only, and both layouts give the same bits (one spelling of the arithmetic, LrnMath).
// Two layouts, one kernel each way per layout:
//   NCHW (lrn_fwd_kernel, lrn_bwd_kernel): a thread owns G consecutive channels of a pack of V
//     consecutive positions (16- or 8-byte packs when the host allows, else single positions)
//     and walks the channels its group's windows reach in ascending order; a warp's load of one
//     channel is 32 packs in a row (coalesced). Values outside the group are re-read (L1 hits).
//     The backward recomputes d_j per twin channel (a fresh window sum of size re-reads). G x V
//     is 16 elements (8 in fp64): enough to amortise the size - 1 halo channels, few enough to
//     stay within kLrnMinBlocks' 128 registers (-Xptxas -v, sm_90: 75-96 forward, 96-126
//     backward, no spills).
//   rows: channels_last / channels_last_3d, or S == 1 (lrn_fwd_rows_kernel,
//     lrn_bwd_rows_kernel): a position's C channels are one contiguous row. A block takes tiles
//     of whole rows (several rows, C channels: one contiguous run) when C fits its shared-memory
//     arrays, else of one row's channel chunk plus the halo its windows reach; it stages x (and
//     dy) of the tile in shared memory with coalesced pack loads, then computes each output from
//     there, consecutive threads on consecutive channels (conflict-free shared reads, coalesced
//     stores). The backward computes d_j, q_j and own_j once per (row, twin channel) of the tile
//     (not once per output's window), then each output's twin sum of q from shared memory.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/activation.cuh"
#include "kernels/channels_common.cuh"  // merge_shared_count
#include "kernels/pack.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace positions {

constexpr int kPosThreads = 256;
// Packs of x a forward thread keeps in registers (CACHED): 8 x 16 bytes = 32 registers.
constexpr int kCachePacks = 8;

// The backward's static merge buffer (red: s1 / s2 per channel lane and position), and the most
// dynamic shared memory its per-block dweight / dbias sums ([2, C] in the accumulation type) take:
// beyond it (C > 3072, 1536 in fp64) the sums live in the block's rows of the workspaces instead.
// Together at most 16 + 24 = 40 KB, 8 KB under the 48 KB a block gets without opting in.
template <typename T, int V>
inline constexpr size_t kBwdRedBytes = 2 * size_t(kPosThreads) * V * sizeof(acc_of<T>);
constexpr size_t kBwdSumsSmem = 24 * 1024;

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
  bool sums_in_smem = false;  // the block's sums in dynamic shared memory (else in its ws rows)
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
    // Chan merge of the cy channel lanes in a fixed tree: lane j takes lane j + h for h = cy / 2,
    // ..., 2, 1, every lane below h at once: log2(cy) dependent steps, not a chain of cy - 1
    // merges on one warp. The order depends on C alone (cy does).
    const int slot = tx * V;
    __syncthreads();  // red may still be read for the previous tile
#pragma unroll
    for (int k = 0; k < V; ++k) {
      red[0][ty * px * V + slot + k] = mean[k];
      red[1][ty * px * V + slot + k] = m2[k];
    }
    for (int h = cy >> 1; h > 0; h >>= 1) {
      __syncthreads();
      if (ty < h) {
        // lane ty + h holds lanes ty + h, ty + 3h, ... (the steps before merged them); its V
        // positions share one count: one division per step
        int64_t nb = 0;
        for (int q = ty + h; q < cy; q += 2 * h) nb += lane_channels(full, rem, q);
        const int o = (ty + h) * px * V + slot;
        channels::merge_shared_count<A, V>(mean, m2, cnt, &red[0][o], &red[1][o],
                                           static_cast<A>(nb));
#pragma unroll
        for (int k = 0; k < V; ++k) {
          red[0][ty * px * V + slot + k] = mean[k];  // read by lane ty - h / 2 next step
          red[1][ty * px * V + slot + k] = m2[k];
        }
      }
    }
    if (ty == 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A rs = rsqrt_acc(Welford<A>(mean[k], m2[k], cnt).var_biased() + p.eps);
        red[0][slot + k] = mean[k];
        red[1][slot + k] = rs;
        if (active) {
          p.mean[item * V + k] = mean[k];
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
      for (int k = 0; k < V; ++k) o[k] = affine_z(static_cast<A>(v[k]), mu[k], rs[k] * wc, bc);
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
  static_assert(sizeof(red) == kBwdRedBytes<T, V> && sizeof(red) + kBwdSumsSmem <= 40 * 1024,
                "the backward's shared memory leaves 8 KB of the 48 KB a block gets by default");
  extern __shared__ __align__(16) unsigned char ln2d_dyn_smem[];
  const bool want_w = p.ws_dw != nullptr, want_b = p.ws_db != nullptr;
  const bool want_params = want_w || want_b;  // uniform
  // This block's sum j (0: dweight, 1: dbias) of channel c: [2, C] in dynamic shared memory when
  // the host sized it so, else the block's own row of that workspace (one writer each, below).
  auto acc = [&](int j, int64_t c) -> A& {
    if (p.sums_in_smem) return reinterpret_cast<A*>(ln2d_dyn_smem)[j * p.C + c];
    return (j == 0 ? p.ws_dw : p.ws_db)[blockIdx.x * p.C + c];
  };
  const int px = kPosThreads / cy;
  const int tx = threadIdx.x % px, ty = threadIdx.x / px;
  const int64_t Sp = p.S / V, items = p.N * Sp;
  const int64_t tiles = (items + px - 1) / px;
  const A inv_c = A(1) / static_cast<A>(p.C);
  if (want_params) {
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
      if (want_w) acc(0, c) = A(0);
      if (want_b) acc(1, c) = A(0);
    }
    __syncthreads();  // (global memory too: visible to the block after the barrier)
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
            for (int k = 0; k < V; ++k) {
              const A z = affine_z(static_cast<A>(v[k]), mu[k], rs[k] * wc, bc);
              d[k] = activation_grad(p.act, z, d[k]);
            }
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
        for (int k = 0; k < V; ++k) {
          const A z = affine_z(static_cast<A>(v[k]), mu[k], rs[k] * wc, bc);
          d[k] = activation_grad(p.act, z, d[k]);
        }
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
          if (want_w) acc(0, c) += pw;
          if (want_b) acc(1, c) += pb;
        }
      }
    }
  }
  if (!want_params || !p.sums_in_smem) return;  // uniform
  __syncthreads();
  for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
    if (want_w) p.ws_dw[blockIdx.x * p.C + c] = acc(0, c);
    if (want_b) p.ws_db[blockIdx.x * p.C + c] = acc(1, c);
  }
}

// ---------------------------------------------------------------------------------------------
// LocalResponseNorm
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LrnArgs {
  using A = acc_of<T>;
  const T* x = nullptr;   // [N, C, S] (NCHW kernels) or [N * S, C] rows (rows kernels)
  const T* dy = nullptr;  // backward only: x's layout
  T* out = nullptr;       // y (forward) or dx (backward): x's layout
  int64_t N = 0, C = 0, S = 0;
  int64_t size = 1;       // channels in a window, >= 1
  A alpha = 0, beta = 0, k = 0;
  // rows kernels: tiles of tile_rows rows x tile_c channels (tile_c == C: whole rows), ctiles
  // channel tiles per row (launch/positions.h lrn_rows_tiles)
  int64_t tile_rows = 1, tile_c = 1, ctiles = 1;
};

// win(c) = [c - before, c + after] within [0, C); twin(c) = [c - after, c + before]. Channel
// indices and these reaches are 64-bit throughout: before + after reaches 2C.
struct LrnReach {
  int64_t before, after;
};
__host__ __device__ constexpr LrnReach lrn_reach(int64_t size, int64_t C) {
  return LrnReach{size / 2 < C ? size / 2 : C, (size - 1) / 2 < C ? (size - 1) / 2 : C};
}

// The outputs g of a group of G channels from c0 whose window, reaching lo_off channels below
// and hi_off above, holds channel j = c0 + jr: g in [jr - hi_off, jr + lo_off] within [0, G),
// as small ints (lo > hi: none). Clamped in 64 bits first: jr + lo_off exceeds 2^31 for C > 2^30.
struct LrnSpan {
  int lo, hi;
};
__host__ __device__ constexpr LrnSpan lrn_span(int64_t jr, int64_t lo_off, int64_t hi_off, int G) {
  const int64_t lo = jr - hi_off, hi = jr + lo_off;
  return LrnSpan{static_cast<int>(lo < 0 ? 0 : (lo > G ? G : lo)),
                 static_cast<int>(hi < -1 ? -1 : (hi > G - 1 ? G - 1 : hi))};
}
// At C = 2^31 + 2 and size 2^32 + 2 (reaches 2^31 + 1 below, 2^31 above), where an int span
// overflowed: the last channel the forward walk of a 16-channel group reaches is in output 15's
// window only, the first in output 0's only.
constexpr bool lrn_span_exact_at_2_31() {
  constexpr int64_t C = (int64_t(1) << 31) + 2;
  constexpr LrnReach w = lrn_reach((int64_t(1) << 32) + 2, C);
  constexpr LrnSpan last = lrn_span(15 + w.after, w.before, w.after, 16);
  constexpr LrnSpan first = lrn_span(-w.before, w.before, w.after, 16);
  return w.before == (int64_t(1) << 31) + 1 && w.after == (int64_t(1) << 31) && last.lo == 15 &&
         last.hi == 15 && first.lo == 0 && first.hi == 0;
}
static_assert(lrn_span_exact_at_2_31(), "LocalResponseNorm window spans at C > 2^31");

__device__ __forceinline__ float pow_acc(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_acc(double a, double b) { return pow(a, b); }

// The per-channel arithmetic, one spelling for both layouts (so NCHW and rows give the same
// bits): torch's div = the window's average of squares (sum / size, the zero padding counted),
// times alpha, plus k; y = x / div^beta. Backward, per channel j of a twin window:
// q_j = dy_j x_j d_j^(-beta-1) and own_j = dy_j d_j^-beta; dx_c = own_c - coef x_c sum q.
template <typename A>
struct LrnMath {
  A fsize, alpha, beta, k, coef;
  __device__ __forceinline__ A div(A sum) const { return sum / fsize * alpha + k; }
  __device__ __forceinline__ A y(A x, A sum) const { return x / pow_acc(div(sum), beta); }
  __device__ __forceinline__ void q_own(A sum, A x, A dy, A& q, A& own) const {
    const A d = div(sum);
    const A r = A(1) / pow_acc(d, beta);  // d^-beta
    q = dy * x * r / d;
    own = dy * r;
  }
  __device__ __forceinline__ A dx(A own, A x, A tsum) const { return own - coef * x * tsum; }
};

template <typename T>
__device__ __forceinline__ LrnMath<acc_of<T>> lrn_math(const LrnArgs<T>& p) {
  using A = acc_of<T>;
  const A fsize = static_cast<A>(p.size);
  return LrnMath<A>{fsize, p.alpha, p.beta, p.k, A(2) * p.alpha * p.beta / fsize};
}

// ---- NCHW: a channel's positions are contiguous ----------------------------------------------
// Elements a thread holds per array (G channels x V positions): 16 fp32 registers, 8 fp64 pairs.
template <typename T>
inline constexpr int kLrnElems = sizeof(acc_of<T>) == 8 ? 8 : 16;

// Channels per thread: G x V = kLrnElems. 16-byte packs: 4 channels of a 4-position fp32 pack,
// 2 of an 8-position fp16/bf16 pack, 4 of a 2-position fp64 pack; 8-byte packs: 8 channels of
// 2 fp32 positions, 4 of 4 fp16/bf16 positions; single positions: 16 channels (8 in fp64).
template <typename T, int V>
inline constexpr int kLrnGroup = kLrnElems<T> / V > 0 ? kLrnElems<T> / V : 1;

// At least two resident 256-thread blocks per SM (a register cap of 128): one block's last units
// overlap the next one's loads. The kernels fit it without spilling (-Xptxas -v).
constexpr int kLrnMinBlocks = 2;

// Unit u (position packs fastest, then channel groups) -> the pack's offset at channel 0 and
// the group's first channel.
template <typename T, int V>
__device__ __forceinline__ void lrn_unit(const LrnArgs<T>& p, int64_t u, int64_t items,
                                         int64_t& base, int64_t& c0) {
  const int64_t gi = u / items;  // a warp reads along positions
  c0 = gi * kLrnGroup<T, V>;
  base = pack_base<V>(u - gi * items, p.S / V, p.C, p.S);
}

template <typename T, int V>
__device__ __forceinline__ void lrn_store(const LrnArgs<T>& p, int64_t base, int64_t c0,
                                          const acc_of<T> (&o)[kLrnGroup<T, V>][V]) {
#pragma unroll
  for (int g = 0; g < kLrnGroup<T, V>; ++g)
    if (c0 + g < p.C) store_as<T, V, acc_of<T>>(p.out + base + (c0 + g) * p.S, o[g]);
}

template <typename T, int V>
__global__ void __launch_bounds__(kPosThreads, kLrnMinBlocks) lrn_fwd_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  constexpr int G = kLrnGroup<T, V>;
  const LrnMath<A> m = lrn_math(p);
  const LrnReach w = lrn_reach(p.size, p.C);
  const int64_t items = p.N * (p.S / V);
  const int64_t units = items * ((p.C + G - 1) / G);
  for (int64_t u = blockIdx.x * int64_t(kPosThreads) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * kPosThreads) {
    int64_t base, c0;
    lrn_unit<T, V>(p, u, items, base, c0);
    A sum[G][V], xo[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) sum[g][e] = xo[g][e] = A(0);
    // the channels the group's windows reach, ascending; each adds to the windows holding it
    const int64_t jlo = c0 - w.before > 0 ? c0 - w.before : 0;
    const int64_t jhi = c0 + G - 1 + w.after < p.C - 1 ? c0 + G - 1 + w.after : p.C - 1;
#pragma unroll 4
    for (int64_t j = jlo; j <= jhi; ++j) {
      A a[V];
      load_acc<A, T, V>(p.x + base + j * p.S, a);
      const int64_t jr = j - c0;
      const LrnSpan s = lrn_span(jr, w.before, w.after, G);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool in = g >= s.lo && g <= s.hi;
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
      for (int e = 0; e < V; ++e) o[g][e] = m.y(xo[g][e], sum[g][e]);
    lrn_store<T, V>(p, base, c0, o);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kPosThreads, kLrnMinBlocks) lrn_bwd_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  constexpr int G = kLrnGroup<T, V>;
  const LrnMath<A> m = lrn_math(p);
  const LrnReach w = lrn_reach(p.size, p.C);
  const int64_t items = p.N * (p.S / V);
  const int64_t units = items * ((p.C + G - 1) / G);
  for (int64_t u = blockIdx.x * int64_t(kPosThreads) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * kPosThreads) {
    int64_t base, c0;
    lrn_unit<T, V>(p, u, items, base, c0);
    // per output: the twin-window sum, its own dy * d^-beta, its own x
    A tsum[G][V], own[G][V], xo[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) tsum[g][e] = own[g][e] = xo[g][e] = A(0);
    const int64_t jlo = c0 - w.after > 0 ? c0 - w.after : 0;
    const int64_t jhi = c0 + G - 1 + w.before < p.C - 1 ? c0 + G - 1 + w.before : p.C - 1;
#pragma unroll 1
    for (int64_t j = jlo; j <= jhi; ++j) {
      // d_j: a fresh sum over win(j) in channel order, the forward's sum
      const int64_t ilo = j - w.before > 0 ? j - w.before : 0;
      const int64_t ihi = j + w.after < p.C - 1 ? j + w.after : p.C - 1;
      A s[V], xj[V];
#pragma unroll
      for (int e = 0; e < V; ++e) s[e] = xj[e] = A(0);
#pragma unroll 4
      for (int64_t i = ilo; i <= ihi; ++i) {
        A a[V];
        load_acc<A, T, V>(p.x + base + i * p.S, a);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          s[e] += a[e] * a[e];
          if (i == j) xj[e] = a[e];
        }
      }
      A d[V], q[V], r[V];
      load_acc<A, T, V>(p.dy + base + j * p.S, d);
#pragma unroll
      for (int e = 0; e < V; ++e) m.q_own(s[e], xj[e], d[e], q[e], r[e]);
      // j is in twin(c0 + g): c0 + g in win(j)
      const int64_t jr = j - c0;
      const LrnSpan sp = lrn_span(jr, w.after, w.before, G);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool in = g >= sp.lo && g <= sp.hi;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (in) tsum[g][e] += q[e];
          if (g == jr) {
            own[g][e] = r[e];
            xo[g][e] = xj[e];
          }
        }
      }
    }
    A o[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < V; ++e) o[g][e] = m.dx(own[g][e], xo[g][e], tsum[g][e]);
    lrn_store<T, V>(p, base, c0, o);
  }
}

// ---- rows (channels_last, or S == 1): a position's channels are contiguous --------------------
// Shared-memory tiles of the accumulation type: the forward stages x (16 KB), the backward x,
// dy and the twin terms q (8 KB each: 24 KB). kLrn*Tile: elements per array.
constexpr int kLrnFwdTileBytes = 16384;
constexpr int kLrnBwdTileBytes = 8192;
template <typename T>
inline constexpr int kLrnFwdTile = kLrnFwdTileBytes / int(sizeof(acc_of<T>));
template <typename T>
inline constexpr int kLrnBwdTile = kLrnBwdTileBytes / int(sizeof(acc_of<T>));
// Small register state (a staging batch of kLrnStage packs per array, held as loaded; one output
// at a time): four resident blocks (a cap of 64 registers; -Xptxas -v, sm_90: 51-64, no spills),
// up to eight by shared memory (16 KB / 24 KB a block).
constexpr int kLrnRowsMinBlocks = 4;
constexpr int kLrnStage = 4;  // packs per thread per array in flight while staging

// One tile's channel range [lo, hi) of the rows r0 .. r0 + nr - 1 -> dst (nr rows of hi - lo):
// coalesced packs of V (lo and hi multiples of V: the host picked V to divide C, so whole rows
// are too), kLrnStage packs per thread loaded before any is stored. Whole rows (the range is
// all of C) are one contiguous run of nr * C elements.
template <typename T, int V>
__device__ __forceinline__ void lrn_stage(acc_of<T>* dst, const T* __restrict__ src, int64_t C,
                                          int64_t r0, int nr, int64_t lo, int w) {
  using A = acc_of<T>;
  const int wp = w / V, packs = nr * wp;
  const bool whole = w == C;  // uniform
  for (int b = threadIdx.x; b < packs; b += kPosThreads * kLrnStage) {
    T v[kLrnStage][V];  // held as loaded, converted at the store (fewer registers)
#pragma unroll
    for (int s = 0; s < kLrnStage; ++s) {
      const int pk = b + s * kPosThreads;
      if (pk < packs) {
        int64_t off;
        if (whole) {
          off = r0 * C + int64_t(pk) * V;
        } else {
          const int r = pk / wp;
          off = (r0 + r) * C + lo + int64_t(pk - r * wp) * V;
        }
        load_raw<T, V>(src + off, v[s]);
      }
    }
#pragma unroll
    for (int s = 0; s < kLrnStage; ++s) {
      const int pk = b + s * kPosThreads;
      if (pk < packs) {
        A a[V];
#pragma unroll
        for (int e = 0; e < V; ++e) a[e] = static_cast<A>(v[s][e]);
        store_raw<A, V>(dst + pk * V, a);  // row r at r * w, packs in order
      }
    }
  }
}

// A tile's place: rows r0 .. r0 + nr - 1, channels c0 .. c0 + nc - 1.
struct LrnTile {
  int64_t r0, c0;
  int nr, nc;
};
template <typename T>
__device__ __forceinline__ LrnTile lrn_tile(const LrnArgs<T>& p, int64_t t, int64_t rows) {
  const int64_t rt = t / p.ctiles, ct = t - rt * p.ctiles;
  LrnTile q;
  q.r0 = rt * p.tile_rows;
  q.c0 = ct * p.tile_c;
  q.nr = static_cast<int>(rows - q.r0 < p.tile_rows ? rows - q.r0 : p.tile_rows);
  q.nc = static_cast<int>(p.C - q.c0 < p.tile_c ? p.C - q.c0 : p.tile_c);
  return q;
}

// The outputs of a tile, thread by thread: (r, cc) = o / nc, o % nc for o = threadIdx.x,
// + kPosThreads, ...; one division per tile, then steps.
struct LrnWalk {
  int r, cc, dr, dc, nc;
  __device__ __forceinline__ LrnWalk(int nc_) : nc(nc_) {
    r = threadIdx.x / nc;
    cc = threadIdx.x - r * nc;
    dr = kPosThreads / nc;
    dc = kPosThreads - dr * nc;
  }
  __device__ __forceinline__ void next() {
    r += dr;
    cc += dc;
    if (cc >= nc) {
      cc -= nc;
      ++r;
    }
  }
};

// y for a tile of rows x channels: x over the channels its windows reach staged in shared
// memory (coalesced, read once from memory), then each output's window summed from there in
// channel order (fresh, as the NCHW kernel sums it: the same bits), y stored (coalesced).
template <typename T, int V>
__global__ void __launch_bounds__(kPosThreads, kLrnRowsMinBlocks) lrn_fwd_rows_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  __shared__ __align__(16) A xs[kLrnFwdTile<T>];
  const LrnMath<A> m = lrn_math(p);
  const LrnReach w = lrn_reach(p.size, p.C);
  const int64_t rows = p.N * p.S;
  const int64_t tiles = (rows + p.tile_rows - 1) / p.tile_rows * p.ctiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform over the block
    const LrnTile q = lrn_tile(p, t, rows);
    const int64_t lo = (q.c0 - w.before > 0 ? q.c0 - w.before : 0) / V * V;
    const int64_t end = q.c0 + q.nc + w.after;
    const int64_t hi = end < p.C ? (end + V - 1) / V * V : p.C;
    const int wx = static_cast<int>(hi - lo);
    __syncthreads();  // the previous tile's reads of xs are done
    lrn_stage<T, V>(xs, p.x, p.C, q.r0, q.nr, lo, wx);
    __syncthreads();
    LrnWalk o(q.nc);
    for (; o.r < q.nr; o.next()) {
      const int64_t c = q.c0 + o.cc;
      const int64_t jlo = c - w.before > 0 ? c - w.before : 0;
      const int64_t jhi = c + w.after < p.C - 1 ? c + w.after : p.C - 1;
      const A* row = xs + o.r * wx;
      A sum = A(0);
      for (int j = static_cast<int>(jlo - lo); j <= static_cast<int>(jhi - lo); ++j) sum += row[j] * row[j];
      const A y = m.y(row[c - lo], sum);
      p.out[(q.r0 + o.r) * p.C + c] = static_cast<T>(y);
    }
  }
}

// dx for a tile: x over the channels the tile's twin windows' own windows reach and dy over the
// twin channels staged; then q_j and own_j once per twin channel j (each d_j a fresh window sum
// from shared memory, as the forward's), q to shared memory, own over dy's slot; then each
// output's twin sum of q in channel order (the NCHW kernel's order: the same bits).
template <typename T, int V>
__global__ void __launch_bounds__(kPosThreads, kLrnRowsMinBlocks) lrn_bwd_rows_kernel(LrnArgs<T> p) {
  using A = acc_of<T>;
  constexpr int E = kLrnBwdTile<T>;
  __shared__ __align__(16) A xs[E];
  __shared__ __align__(16) A ds[E];  // dy, then own
  __shared__ __align__(16) A qs[E];
  const LrnMath<A> m = lrn_math(p);
  const LrnReach w = lrn_reach(p.size, p.C);
  const int64_t rows = p.N * p.S;
  const int64_t tiles = (rows + p.tile_rows - 1) / p.tile_rows * p.ctiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // uniform over the block
    const LrnTile q = lrn_tile(p, t, rows);
    // twin channels [qlo, qhi); dy staged over [dlo, dhi), x over [xlo, xhi) (pack-rounded)
    const int64_t qlo = q.c0 - w.after > 0 ? q.c0 - w.after : 0;
    const int64_t qhi = q.c0 + q.nc + w.before < p.C ? q.c0 + q.nc + w.before : p.C;
    const int64_t dlo = qlo / V * V;
    const int64_t dhi = qhi < p.C ? (qhi + V - 1) / V * V : p.C;
    const int64_t xlo = (qlo - w.before > 0 ? qlo - w.before : 0) / V * V;
    const int64_t xend = qhi + w.after;
    const int64_t xhi = xend < p.C ? (xend + V - 1) / V * V : p.C;
    const int wq = static_cast<int>(qhi - qlo), wd = static_cast<int>(dhi - dlo),
              wx = static_cast<int>(xhi - xlo);
    __syncthreads();  // the previous tile's reads are done
    lrn_stage<T, V>(xs, p.x, p.C, q.r0, q.nr, xlo, wx);
    lrn_stage<T, V>(ds, p.dy, p.C, q.r0, q.nr, dlo, wd);
    __syncthreads();
    // q_j and own_j for every twin channel j of every row (one thread each)
    LrnWalk o(wq);
    for (; o.r < q.nr; o.next()) {
      const int64_t j = qlo + o.cc;
      const int64_t ilo = j - w.before > 0 ? j - w.before : 0;
      const int64_t ihi = j + w.after < p.C - 1 ? j + w.after : p.C - 1;
      const A* xr = xs + o.r * wx;
      A s = A(0);
      for (int i = static_cast<int>(ilo - xlo); i <= static_cast<int>(ihi - xlo); ++i) s += xr[i] * xr[i];
      A* dslot = ds + o.r * wd + (j - dlo);
      A qj, own;
      m.q_own(s, xr[j - xlo], *dslot, qj, own);
      qs[o.r * wq + o.cc] = qj;
      *dslot = own;  // read back by this tile's outputs only (the same j)
    }
    __syncthreads();
    LrnWalk oc(q.nc);
    for (; oc.r < q.nr; oc.next()) {
      const int64_t c = q.c0 + oc.cc;
      const int64_t jlo = c - w.after > 0 ? c - w.after : 0;
      const int64_t jhi = c + w.before < p.C - 1 ? c + w.before : p.C - 1;
      const A* qr = qs + oc.r * wq;
      A tsum = A(0);
      for (int j = static_cast<int>(jlo - qlo); j <= static_cast<int>(jhi - qlo); ++j) tsum += qr[j];
      const A dx = m.dx(ds[oc.r * wd + (c - dlo)], xs[oc.r * wx + (c - xlo)], tsum);
      p.out[(q.r0 + oc.r) * p.C + c] = static_cast<T>(dx);
    }
  }
}

}  // namespace positions
}  // namespace fastnorm
