// Contiguous groups, forward: each normalisation group is a contiguous row of L elements.
//   LayerNorm: rows [M, N], per-element affine (column j).
//   RMSNorm: the same rows, statistics mean(x^2) instead of (mean, var)  -- the RMS template flag.
//   add_norm: LayerNorm or RMSNorm of r = round_X(input + residual): the sum is formed at load
//   time in the accumulation type, rounded to the residual's dtype X (T, or float32 for a half /
//   bf16 input with an fp32 residual stream), stored as residual_out in the same pass, and the
//   norm is applied to the rounded values  -- the X template type (void: no residual).
//   GroupNorm / InstanceNorm in NCHW: rows (n, g) of (C/G)*HW elements, per-channel affine
//   (channel = g*C/G + j/HW)  -- the GN template flag.
// Every reduction has a fixed order: per-thread sequential, then butterflies over lanes and fixed
// trees over warps / blocks, then fixed-order merges of per-block partials. No atomics.
//
// Kernels
//   row_fwd_cached   rows that fit in registers: a sub-warp, warp or block per row; one read of x
//                    (statistics and apply in one pass).
//   row_welford_partial + row_welford_finalize   statistics of long rows / too few rows: (row,
//                    chunk) work items give partial Welford states, merged per row in order.
//   row_apply        the apply pass of those (in the reverse order: the tail of x is still in L2).
// The kernels that write y (row_fwd_cached, row_apply) take the fused activation epilogue as the
// ACT flag (kernels/activation.cuh): y = act(z), z = xhat * w + b in the accumulation type, rounded
// once. LayerNorm and GroupNorm only: RMSNorm and add_norm (X != void) have no ACT instantiation.
// Host plans and launches: csrc/launch/groups.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/activation.cuh"
#include "kernels/pack.cuh"
#include "kernels/validity.cuh"
#include "kernels/welford.cuh"

namespace fastnorm {
namespace groups {

constexpr int kUnroll = 4;        // packs in flight per thread in the streaming kernels
constexpr int kItemThreads = 256;  // block size of the (row, chunk) item kernels

// Packs per thread kept in registers by row_fwd_cached (16-byte packs: 8 (4 for fp64); single
// elements: 8) and by ln_bwd_cached (8 elements per thread whatever the pack size). A row held as
// X = float32 for a half input (add_norm with an fp32 residual) holds 4 packs of VEC floats: the
// same 32 data registers as 8 packs of halves.
template <typename T, int VEC, typename S = T>
inline constexpr int kFwdPacks =
    VEC == 1 ? 8 : (sizeof(T) == 8 ? 4 : (sizeof(S) > sizeof(T) ? 4 : 8));
// Largest block of row_fwd_cached: 128 registers per thread hold kFwdPacks and the row's
// statistics and channel map without spilling (at 1024 threads, 64 registers spilled up to 352
// bytes per thread). Rows longer than kFwdCachedMaxThreads * kFwdPacks * VEC take the split path.
inline constexpr int kFwdCachedMaxThreads = 512;
template <int VEC> inline constexpr int kBwdPacks = 8 / VEC;
inline constexpr int kBwdElems = 8;

// GroupNorm's element -> channel map inside a row (n, g): channel = (row % G) * Cg + j / HW.
// nc_affine (csrc/nc_norm.cu) reuses it with G = N * C, Cg = 1, HW = L: the "channel" of row
// (n, c) is the row itself, so row_apply (GN) with mean null, rstd = scale and b = shift applies
// per-(n, c) coefficients, y = x * scale + shift, with no kernel or template flag of its own.
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
  A* mean = nullptr;  // [M]; null for RMSNorm (no mean)
  A* rstd = nullptr;
  // add_norm only (absent otherwise): the residual input and r = round(x + residual), both of the
  // residual's dtype X (the kernels' X template type: T, or float32 with a half / bf16 input)
  Operand<T> res, res_out;
  int64_t M = 0, L = 0;
  A eps = 0;
  A inv_len = 0;  // RMSNorm: 1 / L, set by the host plan (mean of squares = sum * (1 / L), as
                  // ATen's mean computes it)
  bool round_xhat = false;  // RMSNorm only: rms_z's Llama convention
  GnMap gn;
  Validity valid;  // the MASKED kernels only (the per-(n, c) ops with lengths or a mask)
};

// RMSNorm's output element before its store. Plain: x * (rstd * w), rounded once at the store.
// round_xhat, the convention of Hugging Face's Llama-style RMSNorm (`weight * (x * rstd).to(dtype)`):
// the normalised value is formed first and rounded to the input dtype T, then multiplied by the
// weight (the product of two T values is exact in float32; the store rounds it, or not for a
// float32 output). A run-time flag, uniform over the grid.
template <typename T, typename A>
__device__ __forceinline__ A rms_z(A x, A rstd, A w, bool round_xhat) {
  if (round_xhat) return static_cast<A>(static_cast<T>(x * rstd)) * w;
  return x * (rstd * w);
}

// Gated RMSNorm (gated_rms_norm_fwd), on the cached RMS kernels, the GATE template flag:
//   kGateFirst  (Mamba-2)     the row is h = x * gate_value(gate), formed at load in the
//                             accumulation type and held so; y = rms_z(h) (Llama rounding or not);
//   kGateAfter  (Qwen3-Next)  the row is x; n = rms_z(x), rounded to T when round_n (a weight of
//                             T: `weight * x_n.to(dtype)` stays in T), then y = n * gate_value(gate).
// Rows are the groups of group_size elements of a [M, H] tensor: one launch per group column g, the
// pointers offset by g * group_size and a row pitch ld = H; rstd is stored group-major [G, M].
enum GateKind : int { kGateNone = 0, kGateFirst = 1, kGateAfter = 2 };

template <typename T>
struct GatedRowFwd : RowFwd<T> {
  const T* gate = nullptr;
  int64_t ld = 0;          // row pitch (elements)
  bool gate_silu = true;   // silu, else sigmoid
  bool round_n = false;    // kGateAfter: n rounded to T before the gate
};

// Modulated rows (modulated_norm_fwd, the AdaLN of diffusion transformers), the MOD template flag
// of the cached LayerNorm / RMSNorm kernels:
//   y = z * (scale_offset + scale[q]) + shift[q],   q = row / mod_rows,
// z the row's LayerNorm or RMSNorm with weight and bias; scale and shift are [Q, L] rows (absent:
// 0) read at the store. With a residual (X non-void), AdaLN-Zero's gated residual:
// the row is r = round_X(residual + gate[q] * x) (gate absent: 1), stored as residual_out.
template <typename T>
struct ModRowFwd : RowFwd<T> {
  Operand<T> scale, shift, gate;  // [Q, L], T or float32; absent: none
  acc_of<T> scale_offset = 1;
  int64_t mod_rows = 1;           // rows per modulation row
};

// Row pitch: L, or a gated launch's ld.
template <int GATE, typename P>
__device__ __forceinline__ int64_t row_pitch(const P& p) {
  if constexpr (GATE != kGateNone) return p.ld;
  else return p.L;
}

// The params of an ACT kernel: the plain kernel's struct P plus the epilogue's fields, a struct of
// its own, so that every plain kernel keeps its parameter block exactly: when a params struct
// merely grew, ptxas allocated some plain kernels' registers differently (gn_dx_nchw<half, 1>:
// 64 -> 48 registers and a spilled call save).
template <typename P>
struct ActOf : P {
  Activation act;
};
template <typename P, bool ACT>
using act_params_t = std::conditional_t<ACT, ActOf<P>, P>;
template <typename T, bool ACT, int GATE, bool MOD = false>
using row_fwd_params_t =
    std::conditional_t<MOD, ModRowFwd<T>,
                       std::conditional_t<GATE != kGateNone, GatedRowFwd<T>,
                                          act_params_t<RowFwd<T>, ACT>>>;

// The ACT epilogue on a pack of z before its store: act(z) when ACT, z untouched otherwise (the
// plain kernels compile to exactly what they were).
template <bool ACT, typename A, int VEC>
__device__ __forceinline__ void act_epilogue(const Activation& a, A (&o)[VEC]) {
  if constexpr (ACT) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = activate(a, o[k]);
  }
}

// GroupNorm's per-channel weight and bias (absent: 1 and 0) of the VEC elements at j0 of row
// (n, g), whose first channel is cbase: one channel lookup per pack when the pack lies in one
// channel (HW % VEC == 0), one per element otherwise. The forward's apply and the NCHW dx read them
// through here.
template <typename T, int VEC>
__device__ __forceinline__ void gn_channel_affine(const Operand<T>& w, const Operand<T>& b,
                                                  const GnMap& gn, int64_t cbase, int64_t j0,
                                                  acc_of<T> (&wv)[VEC], acc_of<T> (&bv)[VEC]) {
  using A = acc_of<T>;
  if (gn.pack_in_channel) {
    const int64_t c = cbase + gn.chan_in_row(j0);
    const A wc = w.get_or(c, A(1));
    const A bc = b.get_or(c, A(0));
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      wv[k] = wc;
      bv[k] = bc;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = cbase + gn.chan_in_row(j0 + k);
      wv[k] = w.get_or(c, A(1));
      bv[k] = b.get_or(c, A(0));
    }
  }
}

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
    gn_channel_affine<T, VEC>(p.w, p.b, p.gn, cbase, j0, wv, bv);
  }
}

// The forward kernels' residual parameter X: void (no residual: the row is x), or the residual
// stream's dtype (add_norm: the row is r = round_X(x + residual), held as X).
template <typename T, typename X>
using held_t = std::conditional_t<std::is_void_v<X>, T, X>;
// The row as held in registers by the forward: T, the residual stream's X, or the gated h (acc).
template <typename T, typename X, int GATE>
using fwd_held_t = std::conditional_t<GATE == kGateFirst, acc_of<T>, held_t<T, X>>;

// VEC elements of the row source at i: x, or with a residual r = round_X(x + residual), formed in
// the accumulation type and stored to residual_out on the way (add_norm). The residual is a
// compile-time choice (X = void: none), so the plain LayerNorm / RMSNorm / GroupNorm kernels carry
// none of its code or registers (as a run-time flag, its pointers stayed live across the
// grid-stride loops and cost the plain kernels spills).
template <typename T, int VEC, typename X>
__device__ __forceinline__ void load_row_source(const RowFwd<T>& p, int64_t i,
                                                held_t<T, X> (&v)[VEC]) {
  using A = acc_of<T>;
  using S = held_t<T, X>;
  if constexpr (std::is_same_v<S, T>) {
    load_raw<T, VEC>(p.x + i, v);
  } else {
    T t[VEC];
    load_raw<T, VEC>(p.x + i, t);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<S>(t[k]);  // exact: S is wider
  }
  if constexpr (!std::is_void_v<X>) {
    X r[VEC];
    load_raw<X, VEC>(static_cast<const X*>(p.res.ptr) + i, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<X>(static_cast<A>(v[k]) + static_cast<A>(r[k]));
    store_raw<X, VEC>(static_cast<X*>(p.res_out.ptr) + i, v);
  }
}

// VEC elements of an optional operand at j0 (a per-column parameter, a modulation row) (absent: `absent`).
template <typename T, int VEC>
__device__ __forceinline__ void param_or(const Operand<T>& o, int64_t j0, acc_of<T> absent,
                                         acc_of<T> (&v)[VEC]) {
  if (o.present()) {
    o.load(j0, v);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = absent;
  }
}

// MOD with a residual: r = round_X(residual + gate[q] * x) at i (qi: the gate's element), formed in
// the accumulation type and stored to residual_out on the way.
template <typename T, int VEC, typename X>
__device__ __forceinline__ void load_gated_residual(const ModRowFwd<T>& p, int64_t i, int64_t qi,
                                                    X (&v)[VEC]) {
  using A = acc_of<T>;
  T xt[VEC];
  X r[VEC];
  load_raw<T, VEC>(p.x + i, xt);
  load_raw<X, VEC>(static_cast<const X*>(p.res.ptr) + i, r);
  A g[VEC];
  param_or<T, VEC>(p.gate, qi, A(1), g);
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    v[k] = static_cast<X>(static_cast<A>(r[k]) + g[k] * static_cast<A>(xt[k]));
  store_raw<X, VEC>(static_cast<X*>(p.res_out.ptr) + i, v);
}

// ------------------------------------------------------------------------------------------------
// Forward, rows in registers. tpr threads per row (a power of two): tpr <= 32 -> blockDim/tpr rows
// per block, combined with butterflies of width tpr; tpr > 32 -> blockDim == tpr, one row per block.
// Requires L <= tpr * kFwdPacks * VEC and L % VEC == 0.
// Launch bounds (512, 1): without the minimum-blocks hint ptxas held several instantiations (RMS,
// add_norm) to 64 registers and spilled 8-24 bytes; with it every one fits the 128 registers a
// 512-thread block allows without spills (48-128, ptxas -v, sm_90). The same for
// row_welford_partial (256, 1): 55-80 registers, no spills.
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC, bool GN, bool RMS, typename X, bool ACT, int GATE = kGateNone,
          bool MOD = false>
__global__ void __launch_bounds__(kFwdCachedMaxThreads, 1)
    row_fwd_cached_kernel(row_fwd_params_t<T, ACT, GATE, MOD> p, int tpr) {
  using A = acc_of<T>;
  using S = fwd_held_t<T, X, GATE>;
  static_assert(!ACT || (!RMS && std::is_void_v<X>), "activation epilogues: LayerNorm / GroupNorm");
  static_assert(GATE == kGateNone || (RMS && !GN && !ACT && std::is_void_v<X>), "gates: RMSNorm rows");
  static_assert(!MOD || (!GN && !ACT && GATE == kGateNone), "modulation: LayerNorm / RMSNorm rows");
  constexpr int R = kFwdPacks<T, VEC, S>;
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
    const int64_t off = (valid ? row : 0) * row_pitch<GATE>(p);
    int64_t qoff = 0;  // MOD: the modulation row's first element
    if constexpr (MOD) qoff = (valid ? row / p.mod_rows : 0) * p.L;
    S v[R][VEC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        if constexpr (MOD && !std::is_void_v<X>) {
          load_gated_residual<T, VEC, X>(p, off + pk * VEC, qoff + pk * VEC, v[r]);
        } else if constexpr (GATE == kGateFirst) {  // h = x * gate(g), in the accumulation type
          T xt[VEC], gt[VEC];
          load_raw<T, VEC>(p.x + off + pk * VEC, xt);
          load_raw<T, VEC>(p.gate + off + pk * VEC, gt);
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            v[r][k] = static_cast<A>(xt[k]) * gate_value(p.gate_silu, static_cast<A>(gt[k]));
        } else {
          load_row_source<T, VEC, X>(p, off + pk * VEC, v[r]);
        }
      }
    }
    A mean = A(0), rstd;
    if constexpr (RMS) {
      // mean of x^2 in the accumulation type is the definition: a plain fixed-order sum
      A ss = A(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int pk = r * tpr + t;
        if (valid && pk < packs) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) ss += static_cast<A>(v[r][k]) * static_cast<A>(v[r][k]);
        }
      }
      if (tpr <= 32) {
        ss = warp_sum(ss, tpr);
      } else {
        A unused = A(0);
        block_sum2(ss, unused, red_raw);  // red_raw holds 96 >= 64 values
      }
      rstd = rsqrt_acc(ss * p.inv_len + p.eps);
    } else {
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
      mean = w.mean;
      rstd = rsqrt_acc(w.var_biased() + p.eps);
    }
    if (valid && t == 0) {
      if constexpr (!RMS) p.mean[row] = mean;
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
        for (int k = 0; k < VEC; ++k) {
          if constexpr (RMS) o[k] = rms_z<T>(static_cast<A>(v[r][k]), rstd, wv[k], p.round_xhat);
          else o[k] = affine_z(static_cast<A>(v[r][k]), mean, rstd * wv[k], bv[k]);
        }
        if constexpr (ACT) act_epilogue<ACT>(p.act, o);
        if constexpr (GATE == kGateAfter) {  // y = n * gate(g), n rounded to T first when round_n
          T gt[VEC];
          load_raw<T, VEC>(p.gate + off + j0, gt);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A n = p.round_n ? static_cast<A>(static_cast<T>(o[k])) : o[k];
            o[k] = n * gate_value(p.gate_silu, static_cast<A>(gt[k]));
          }
        }
        if constexpr (MOD) {  // y = z * (scale_offset + scale) + shift
          A sv[VEC], tv[VEC];
          param_or<T, VEC>(p.scale, qoff + j0, A(0), sv);
          param_or<T, VEC>(p.shift, qoff + j0, A(0), tv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] = o[k] * (p.scale_offset + sv[k]) + tv[k];
        }
        p.y.store(off + j0, o);
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

// The same over the elements ok[u][k] of the packs only (MASKED): the shift is the first valid
// element (a padded one may hold anything, inf included), and a chunk with none adds nothing.
template <typename A, typename T, int VEC>
__device__ __forceinline__ void welford_add_valid(Welford<A>& w, const T (&v)[kUnroll][VEC],
                                                  const bool (&ok)[kUnroll][VEC], int valid_packs) {
  A shift = A(0);
  bool found = false;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (!found && u < valid_packs && ok[u][k]) {
        shift = static_cast<A>(v[u][k]);
        found = true;
      }
    }
  }
  if (!found) return;
  A s = A(0), cnt = A(0);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (u < valid_packs && ok[u][k]) {
        s += static_cast<A>(v[u][k]) - shift;
        cnt += A(1);
      }
    }
  }
  const A lmean = shift + s / cnt;
  A m2 = A(0);
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (u < valid_packs && ok[u][k]) {
        const A d = static_cast<A>(v[u][k]) - lmean;
        m2 += d * d;
      }
    }
  }
  w.merge(Welford<A>(lmean, m2, cnt));
}

// Partial statistics per item: LayerNorm / GroupNorm: the Welford state, ws[0][item] = mean,
// ws[1][item] = m2, ws[2][item] = count; RMSNorm: ws[0][item] = sum of squares. With a residual
// (add_norm) the item's r = round_X(x + residual) is stored to residual_out here, so the apply
// pass reads r once instead of x and the residual.
// MASKED (nc_moments with a validity; never with RMS or X): the valid elements only
// (welford_add_valid), the count stored is theirs, and a row with lengths on one line stops at
// its length (Validity::reduce_end).
template <typename T, int VEC, bool RMS, typename X, bool MASKED = false>
__global__ void __launch_bounds__(kItemThreads, 1)
    row_welford_partial_kernel(RowFwd<T> p, Items it, acc_of<T>* __restrict__ ws) {
  static_assert(!MASKED || (!RMS && std::is_void_v<X>), "MASKED: the per-(n, c) moments");
  using A = acc_of<T>;
  const int tpr = it.tpr;
  const int ipb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t items = it.M * it.S;
  for (int64_t ib = blockIdx.x; ib * ipb < items; ib += gridDim.x) {  // uniform over the block
    const int64_t item = ib * ipb + grp;
    Welford<A> w;
    A ss = A(0);
    if (item < items) {
      const int64_t row = item / it.S, s = item - row * it.S;
      const int64_t e0 = s * it.chunk;
      int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
      Validity::Sample vs{};
      if constexpr (MASKED) {
        vs = p.valid.sample(row / p.valid.C);
        e1 = p.valid.reduce_end(vs, e1, VEC);
      }
      const int64_t off = row * it.L;
      const int64_t p1 = e1 / VEC;
      for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
        held_t<T, X> v[kUnroll][VEC];
        int nv = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            load_row_source<T, VEC, X>(p, off + q * VEC, v[u]);
            nv = u + 1;
          }
        }
        if constexpr (MASKED) {
          bool ok[kUnroll][VEC];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t q = pk + static_cast<int64_t>(u) * tpr;
#pragma unroll
            for (int k = 0; k < VEC; ++k) ok[u][k] = u < nv && p.valid.ok(vs, q * VEC + k);
          }
          welford_add_valid<A, held_t<T, X>, VEC>(w, v, ok, nv);
        } else if constexpr (RMS) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (u < nv) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) ss += static_cast<A>(v[u][k]) * static_cast<A>(v[u][k]);
            }
          }
        } else {
          welford_add_packs<A, held_t<T, X>, VEC>(w, v, nv);
        }
      }
    }
    // every lane of the warp takes part
    if constexpr (RMS) {
      ss = warp_sum(ss, tpr);
      if (item < items && t == 0) ws[item] = ss;
    } else {
      w = warp_merge(w, tpr);
      if (item < items && t == 0) {
        ws[item] = w.mean;
        ws[items + item] = w.m2;
        ws[2 * items + item] = w.count;
      }
    }
  }
}

// A warp per row merges its S partial states in a fixed order -> mean, rstd. RMSNorm (inv_len > 0,
// 1 / L): the partial sums of squares add up in the same fixed order, rstd =
// 1 / sqrt(sum * inv_len + eps), no mean.
// var_out (nc_moments): the biased variance m2 / L goes to `rstd` instead (a run-time flag of the
// epilogue, uniform over the grid: the merge is the same, so one kernel serves both).
template <typename A>
__global__ void __launch_bounds__(256)
    row_welford_finalize_kernel(const A* __restrict__ ws, int64_t M, int64_t S, A eps,
                                A* __restrict__ mean, A* __restrict__ rstd, A inv_len,
                                bool var_out) {
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  const int64_t items = M * S;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); row < M;
       row += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    if (inv_len > A(0)) {  // uniform over the grid
      A ss = A(0);
      for (int64_t k = lane; k < S; k += 32) ss += ws[row * S + k];
      ss = warp_sum(ss);
      if (lane == 0) rstd[row] = rsqrt_acc(ss * inv_len + eps);
      continue;
    }
    Welford<A> w;
    for (int64_t k = lane; k < S; k += 32) {
      const int64_t i = row * S + k;
      w.merge(Welford<A>(ws[i], ws[items + i], ws[2 * items + i]));
    }
    w = warp_merge(w);
    if (lane == 0) {
      mean[row] = w.mean;
      rstd[row] = var_out ? w.var_biased() : rsqrt_acc(w.var_biased() + eps);
    }
  }
}

// Normalise with the saved mean/rstd, item by item in the reverse order. The source is x (X void),
// or with a residual (add_norm) residual_out of dtype X, which the partial pass wrote.
// RMSNorm: p.mean is null (mean 0, no bias).
// MASKED (nc_affine with a validity; GN, never with ACT or X): 0 at the invalid positions.
template <typename T, int VEC, bool GN, typename X, bool ACT, bool MASKED = false>
__global__ void __launch_bounds__(kItemThreads) row_apply_kernel(act_params_t<RowFwd<T>, ACT> p, Items it) {
  using A = acc_of<T>;
  using S = held_t<T, X>;
  static_assert(!ACT || std::is_void_v<X>, "activation epilogues: LayerNorm / GroupNorm");
  static_assert(!MASKED || (GN && !ACT && std::is_void_v<X>), "MASKED: the per-(n, c) affine");
  const int tpr = it.tpr;
  const int ipb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int64_t items = it.M * it.S;
  const S* src;
  if constexpr (std::is_void_v<X>) src = p.x;
  else src = static_cast<const S*>(p.res_out.ptr);
  for (int64_t ib = blockIdx.x; ib * ipb < items; ib += gridDim.x) {
    const int64_t fwd = ib * ipb + grp;
    if (fwd >= items) continue;  // no collective operations in this kernel
    const int64_t item = items - 1 - fwd;
    const int64_t row = item / it.S, s = item - row * it.S;
    const int64_t e0 = s * it.chunk;
    const int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
    const S* xr = src + row * it.L;
    const A mean = p.mean != nullptr ? p.mean[row] : A(0), rstd = p.rstd[row];
    const int64_t cbase = GN ? p.gn.chan_base(row) : 0;
    Validity::Sample vs{};
    if constexpr (MASKED) vs = p.valid.sample(row / p.valid.C);
    const int64_t p1 = e1 / VEC;
    for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
      S v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) load_raw<S, VEC>(xr + q * VEC, v[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) {
          const int64_t j0 = q * VEC;
          A wv[VEC], bv[VEC], o[VEC];
          row_affine<T, VEC, GN>(p, cbase, j0, wv, bv);
          if (p.round_xhat) {  // RMSNorm (mean 0, no bias) in the Llama convention
#pragma unroll
            for (int k = 0; k < VEC; ++k) o[k] = rms_z<T>(static_cast<A>(v[u][k]), rstd, wv[k], true);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k)
              o[k] = affine_z(static_cast<A>(v[u][k]), mean, rstd * wv[k], bv[k]);
          }
          if constexpr (ACT) act_epilogue<ACT>(p.act, o);
          if constexpr (MASKED) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) o[k] = p.valid.ok(vs, j0 + k) ? o[k] : A(0);
          }
          p.y.store(row * it.L + j0, o);
        }
      }
    }
  }
}

}  // namespace groups
}  // namespace fastnorm
