// Contiguous groups, backward (rows as in groups_forward.cuh).
//   ln_bwd_cached    LayerNorm backward for rows in registers: dx plus per-block dweight/dbias
//                    column partials [gridDim, N] in one pass over x and dy.
// The LayerNorm kernels also run RMSNorm (mean null: xhat = x * rstd and no sum(g) term) and the
// add_norm backward (x is residual_out, of dtype X; d_r = dx + grad_residual_out written as
// grad_input (T) and / or grad_residual (X)): run-time flags, the X template type.
//   row_sums_partial + row_sums_finalize + ln_bwd_split
//                    LayerNorm backward for long rows; row_sums_partial also gives GroupNorm's
//                    per-(n, c) sums in NCHW.
//   col_sum_finalize fixed-order column sums of [K, N] partials (dweight / dbias).
//   gn_bwd_coef, gn_dx_nchw   GroupNorm's per-(n, g) coefficients and its NCHW dx pass.
// The kernels that read dy (ln_bwd_cached, row_sums_partial, ln_bwd_split, gn_dx_nchw) take the
// fused activation's backward as the ACT flag: z = xhat * w + b recomputed from x and the saved
// statistics (as the forward forms it), dz = dy * act'(z) (activation_grad), and dz used wherever
// dy was: the sums (hence dweight, dbias) and dx. LayerNorm and GroupNorm only (not RMSNorm, not
// add_norm's X != T).
// Host plans and launches: csrc/launch/groups.h.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/groups_forward.cuh"

namespace fastnorm {
namespace groups {

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <typename T>
struct RowBwd {
  using A = acc_of<T>;
  const T* x = nullptr;
  Operand<T> dy;  // T or float32
  const A* mean = nullptr;  // null: RMSNorm (xhat = x * rstd, dx without the mean(g) term)
  const A* rstd = nullptr;
  Operand<T> w;  // absent, or per element of a row (LayerNorm): T or float32
  T* dx = nullptr;       // nullable: dx not requested
  A* ws_dw = nullptr;    // nullable: [K, L] column partials of sum(dy * xhat)
  A* ws_db = nullptr;    // nullable: [K, L] column partials of sum(dy)
  int64_t M = 0, L = 0;
  // add_norm, residual stream of dtype X (the kernels' template type). X == T: x above is
  // residual_out; X == float32 with a half / bf16 input: x32 is, and x is unused.
  const float* x32 = nullptr;
  const void* dres_in = nullptr;  // nullable: grad_residual_out (X), added to dx in acc type
  void* dres = nullptr;           // nullable: d_r written in X (grad_residual)
};

// The ACT kernels' params (ActOf in groups_forward.cuh says why a struct of their own): the bias
// of z = xhat * w + b (absent: 0) and the activation.
template <typename T>
struct RowBwdAct : RowBwd<T> {
  Operand<T> b;
  Activation act;
};
template <typename T, bool ACT>
using row_bwd_t = std::conditional_t<ACT, RowBwdAct<T>, RowBwd<T>>;

// Gated RMSNorm's backward params (GATE as in groups_forward.cuh; the rounding of the forward is
// the identity here, as autograd takes it through `.to()`):
//   kGateFirst  the row is h = x * a(g) (x held as h, X = acc); d_h by the RMS formula, then
//               dx = d_h * a(g) and dgate = d_h * x * a'(g) at the store;
//   kGateAfter  y = n * a(g), n = w * xhat: at load dgate = dy * n * a'(g) is stored and dy becomes
//               dn = dy * a(g), which the RMS backward takes as its dy (dweight = sum dn * xhat).
template <typename T>
struct GatedRowBwd : RowBwd<T> {
  const T* gate = nullptr;
  T* dgate = nullptr;   // nullable: dgate not requested
  int64_t ld = 0;
  bool gate_silu = true;
};
// The modulated rows' backward (MOD; forward in groups_forward.cuh, ModRowFwd), with
// m = scale_offset + scale[q] and z the norm's output before the modulation:
//   dz = dy * m; dx by the LayerNorm / RMSNorm formula of dz; with a residual, x is residual_out,
//   d_r = dx (+ grad_residual_out) is stored as grad_residual (X) and d_r * gate[q] as grad_input.
// A block handles chunk_rows consecutive rows of one segment of part_rows rows (chunks blocks per
// segment; block b writes partial row b): the grid and the partials' order depend on the segment's
// length, the row's length and dtype only, so a sample's sums are the same bits in any batch.
//   mod_rows == 1 (per token; part_rows = M): dscale = dy * z is stored at load, dy becomes dz, and
//     the partials are those of dweight, dbias (sum dz * xhat, sum dz); dgate = d_r * input stored;
//   mod_rows > 1 (part_rows = mod_rows): dy is kept and the weight of dx is w * m, so the partials
//     are A = sum(dy * xhat), B = sum(dy) per segment, from which the host forms dshift = B,
//     dscale = w * A + b * B, dweight = sum_q m_q * A_q, dbias = sum_q m_q * B_q (m_q is constant
//     over a segment), and the third partials, of dgate = sum(d_r * input) per segment.
template <typename T>
struct ModRowBwd : RowBwd<T> {
  Operand<T> scale, b, gate;  // [Q, L] modulation rows; b: the norm's bias (dscale per token)
  Operand<T> dscale, dgate;   // per token: [M, L] in the modulation's dtype, absent when not wanted
  const T* input = nullptr;   // the gated residual's input (the branch): dgate, null when not wanted
  acc_of<T>* ws_dg = nullptr; // per segment: [K, L] column partials of sum(d_r * input)
  acc_of<T> scale_offset = 1;
  int64_t mod_rows = 1, part_rows = 0, chunk_rows = 0, chunks = 1;
};
template <typename T, bool ACT, int GATE, bool MOD = false>
using row_bwd_params_t =
    std::conditional_t<MOD, ModRowBwd<T>,
                       std::conditional_t<GATE != kGateNone, GatedRowBwd<T>, row_bwd_t<T, ACT>>>;

// dy -> dz = dy * act'(z) for the VEC elements of a pack, z = affine_z (the forward's z, so the
// activation's kinks fall where the forward put them).
template <typename A, int VEC>
__device__ __forceinline__ void act_grad_pack(const Activation& a, const A (&xa)[VEC], A mean,
                                              A rstd, const A (&wv)[VEC], const A (&bv)[VEC],
                                              A (&g)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    g[k] = activation_grad(a, affine_z(xa[k], mean, rstd * wv[k], bv[k]), g[k]);
}

// The normalised row's storage: x (X == T) or the fp32 residual stream (add_norm).
template <typename X, typename T>
__device__ __forceinline__ const X* row_src(const T* x, const float* x32) {
  if constexpr (std::is_same_v<X, T>) return x;
  else return x32;
}

// d_r = dx (+ grad_residual_out) -> grad_input (T) and / or grad_residual (X).
template <typename T, int VEC, typename X>
__device__ __forceinline__ void store_dx(const RowBwd<T>& p, int64_t i, acc_of<T> (&o)[VEC]) {
  if (p.dres_in != nullptr) {
    X g[VEC];
    load_raw<X, VEC>(static_cast<const X*>(p.dres_in) + i, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] += static_cast<acc_of<T>>(g[k]);
  }
  if (p.dx != nullptr) store_as<T, VEC>(p.dx + i, o);
  if (p.dres != nullptr) store_as<X, VEC>(static_cast<X*>(p.dres) + i, o);
}

// kGateFirst: the row h = x * a(g) of the pack at i, in the accumulation type.
template <typename T, int VEC>
__device__ __forceinline__ void gated_h(const GatedRowBwd<T>& p, int64_t i, acc_of<T> (&h)[VEC]) {
  T xt[VEC], gt[VEC];
  load_raw<T, VEC>(p.x + i, xt);
  load_raw<T, VEC>(p.gate + i, gt);
#pragma unroll
  for (int k = 0; k < VEC; ++k)
    h[k] = static_cast<acc_of<T>>(xt[k]) * gate_value(p.gate_silu, static_cast<acc_of<T>>(gt[k]));
}

// kGateFirst: d_h of the pack at i -> dx = d_h * a(g), dgate = d_h * x * a'(g) (x and g re-read:
// the row was held as h; the re-read hits L1 / L2).
template <typename T, int VEC>
__device__ __forceinline__ void gated_dx(const GatedRowBwd<T>& p, int64_t i, acc_of<T> (&dh)[VEC]) {
  using A = acc_of<T>;
  T xt[VEC], gt[VEC];
  load_raw<T, VEC>(p.x + i, xt);
  load_raw<T, VEC>(p.gate + i, gt);
  A dx[VEC], dg[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const A g = static_cast<A>(gt[k]);
    dx[k] = dh[k] * gate_value(p.gate_silu, g);
    dg[k] = gate_grad(p.gate_silu, g, dh[k] * static_cast<A>(xt[k]));
  }
  if (p.dx != nullptr) store_as<T, VEC>(p.dx + i, dx);
  if (p.dgate != nullptr) store_as<T, VEC>(p.dgate + i, dg);
}

// MOD: d_r = dx (+ grad_residual_out) -> grad_residual (X), d_r * gate[q] -> grad_input, and
// dgate's d_r * input: stored per token, added to dg per segment (qi: the gate's element).
template <typename T, int VEC, typename X>
__device__ __forceinline__ void store_mod_dx(const ModRowBwd<T>& p, int64_t i, int64_t qi,
                                             acc_of<T> (&o)[VEC], acc_of<T> (&dg)[VEC]) {
  if (!p.gate.present()) {
    store_dx<T, VEC, X>(p, i, o);
    return;
  }
  if (p.dres_in != nullptr) {
    X g[VEC];
    load_raw<X, VEC>(static_cast<const X*>(p.dres_in) + i, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] += static_cast<acc_of<T>>(g[k]);
  }
  if (p.dres != nullptr) store_as<X, VEC>(static_cast<X*>(p.dres) + i, o);
  if (p.input != nullptr) {
    T xt[VEC];
    load_raw<T, VEC>(p.input + i, xt);
    if (p.mod_rows == 1) {
      acc_of<T> d[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = o[k] * static_cast<acc_of<T>>(xt[k]);
      if (p.dgate.present()) p.dgate.store(qi, d);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) dg[k] += o[k] * static_cast<acc_of<T>>(xt[k]);
    }
  }
  if (p.dx != nullptr) {
    acc_of<T> g[VEC];
    p.gate.load(qi, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] *= g[k];
    store_as<T, VEC>(p.dx + i, o);
  }
}

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

// The weight of dx's g = dz * w at j0: w; MOD per segment (dy kept), w * (scale_offset + scale[q])
// (qoff: the modulation row).
template <typename T, int VEC, bool MOD, typename P>
__device__ __forceinline__ void dx_weight(const P& p, int64_t j0, int64_t qoff,
                                          acc_of<T> (&wv)[VEC]) {
  ln_weight<T, VEC>(p, j0, wv);
  if constexpr (MOD) {
    if (p.mod_rows > 1) {
      acc_of<T> sv[VEC];
      param_or<T, VEC>(p.scale, qoff + j0, acc_of<T>(0), sv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[k] *= p.scale_offset + sv[k];
    }
  }
}

// Largest block of ln_bwd_cached_kernel: fp64 holds twice the registers per element, the
// single-element path (8 separate loads and column partials per thread) and a half input with
// an fp32 residual stream (x held as floats) spilled at the 64 registers of a 1024-thread block;
// all get 128 at 512 threads.
template <typename T, int VEC, typename X = T>
inline constexpr int kBwdCachedMaxThreads =
    sizeof(acc_of<T>) == 8 || VEC == 1 || sizeof(X) > sizeof(T) ? 512 : 1024;
// The ACT variant evaluates the activation's derivative per element (the switch over every kind,
// inlined; fp64's exp, erf, tanh and log1p are long) on top of its rows of x and dy and its column
// partials: at 64 registers (1024 threads) every 16-byte-pack variant spilled (8-48 bytes), at 128
// (512 threads) the fp64 packs (28 bytes) and the half / bf16 single elements (4 bytes) still did.
// 512 threads, 256 for those (the longer rows take the split path).
template <typename T, int VEC>
inline constexpr int kBwdCachedActMaxThreads =
    (sizeof(acc_of<T>) == 8 && VEC > 1) || (VEC == 1 && sizeof(T) == 2) ? 256 : 512;
// The modulated rows (MOD) add the scale's loads at every use of the weight and, per token, the
// dscale store at load: 512 threads (sm_90 ptxas -v: no spills), 256 for fp64 and single elements.
template <typename T, int VEC>
inline constexpr int kBwdCachedModMaxThreads = sizeof(acc_of<T>) == 8 || VEC == 1 ? 256 : 512;
// The gated rows (GATE, kernels/groups_forward.cuh) add the gate's loads and its derivative: at
// 64 registers (1024 threads) every 16-byte-pack variant spilled (8-44 bytes), at 128 (512) the
// gate-first single elements (40-92 bytes), every fp64 gate-first one (76-140) and the fp64 packs
// of gate-after (28) still did (ptxas -v, sm_90): 256 threads for those, 512 for the rest. So a
// gated group holds up to 256 x kBwdElems = 2048 elements in every variant (launch/groups.h
// kGatedMaxGroup).
template <typename T, int VEC, int GATE>
inline constexpr int kBwdCachedGatedMaxThreads =
    (sizeof(acc_of<T>) == 8 && (VEC > 1 || GATE == kGateFirst)) || (GATE == kGateFirst && VEC == 1)
        ? 256 : 512;
template <typename T, int VEC, typename X, bool ACT, int GATE = kGateNone, bool MOD = false>
inline constexpr int kBwdCachedBound =
    MOD ? kBwdCachedModMaxThreads<T, VEC>
        : GATE != kGateNone
            ? kBwdCachedGatedMaxThreads<T, VEC, GATE>
            : (ACT ? kBwdCachedActMaxThreads<T, VEC> : kBwdCachedMaxThreads<T, VEC, X>);

// Dynamic shared memory of ln_bwd_cached_kernel for the column partials of a block: the tree over
// its units (rows in flight that own the same columns: warps when tpr <= 32, groups of tpr threads
// otherwise) stages half of them per level. 0 when neither dweight nor dbias is wanted.
template <typename A>
inline size_t ln_bwd_cached_smem(int threads, int tpr, int arrays) {
  const int units = threads / (tpr < 32 ? 32 : tpr);
  return static_cast<size_t>(units / 2) * arrays * kBwdElems * tpr * sizeof(A);
}

// blockDim = rows per block x tpr (tpr <= 32: 256 threads); a block loops over row groups and
// keeps its own column partials of dweight / dbias, combined once at the end (see below).
template <typename T, int VEC, typename X, bool ACT, int GATE = kGateNone, bool MOD = false>
__global__ void __launch_bounds__(kBwdCachedBound<T, VEC, X, ACT, GATE, MOD>)
    ln_bwd_cached_kernel(row_bwd_params_t<T, ACT, GATE, MOD> p, int tpr) {
  using A = acc_of<T>;
  constexpr int R = kBwdPacks<VEC>;
  static_assert(!ACT || std::is_same_v<X, T>, "activation epilogues: LayerNorm, not add_norm");
  static_assert(GATE != kGateFirst || std::is_same_v<X, A>, "gate first: the row held as h (acc)");
  static_assert(GATE == kGateNone || !ACT, "gates: RMSNorm rows");
  static_assert(!MOD || (GATE == kGateNone && !ACT), "modulation: LayerNorm / RMSNorm rows");
  __shared__ A red[64];
  extern __shared__ __align__(16) unsigned char col_smem[];  // ln_bwd_cached_smem bytes

  const int rpb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int L = static_cast<int>(p.L);
  const int packs = L / VEC;
  const A invL = A(1) / static_cast<A>(p.L);
  const bool rms = p.mean == nullptr;
  const X* xs = row_src<X>(p.x, p.x32);

  A dwp[R][VEC], dbp[R][VEC];
  A dgp[MOD ? R : 1][VEC];  // MOD: the partials of dgate
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dwp[r][k] = dbp[r][k] = A(0);
  if constexpr (MOD) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < VEC; ++k) dgp[r][k] = A(0);
  }
  A* ws_dg = nullptr;
  if constexpr (MOD) ws_dg = p.ws_dg;

  // rows [row0, row_end): all, in a grid-stride loop; MOD: block b's chunk of its segment
  int64_t row0 = 0, row_end = p.M, rb0 = blockIdx.x, rb_step = gridDim.x;
  if constexpr (MOD) {
    const int64_t seg = blockIdx.x / p.chunks, ck = blockIdx.x - seg * p.chunks;
    row0 = seg * p.part_rows + ck * p.chunk_rows;
    const int64_t chunk_end = row0 + p.chunk_rows, seg_end = (seg + 1) * p.part_rows;
    row_end = chunk_end < seg_end ? chunk_end : seg_end;
    if (p.M < row_end) row_end = p.M;
    rb0 = 0;
    rb_step = 1;
  }
  for (int64_t rb = rb0; row0 + rb * rpb < row_end; rb += rb_step) {  // uniform over the block
    const int64_t row = row0 + rb * rpb + grp;
    const bool valid = row < row_end;
    const int64_t off = (valid ? row : 0) * row_pitch<GATE>(p);
    int64_t qoff = 0;  // MOD: the modulation row's first element
    if constexpr (MOD) qoff = (valid ? row / p.mod_rows : 0) * p.L;
    X xv[R][VEC];
    A gv[R][VEC];  // dy; the weight is re-read from L1 rather than held (register budget)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        if constexpr (GATE == kGateFirst) {
          gated_h<T, VEC>(p, off + pk * VEC, xv[r]);
        } else {
          load_raw<X, VEC>(xs + off + pk * VEC, xv[r]);
        }
        p.dy.load(off + pk * VEC, gv[r]);
      }
    }
    const A mean = valid && !rms ? p.mean[row] : A(0);
    const A rstd = valid ? p.rstd[row] : A(0);
    if constexpr (GATE == kGateAfter) {  // dgate = dy * n * a'(g) stored; dy -> dn = dy * a(g)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int pk = r * tpr + t;
        if (valid && pk < packs) {
          A wv[VEC], dg[VEC];
          T gt[VEC];
          ln_weight<T, VEC>(p, pk * VEC, wv);
          load_raw<T, VEC>(p.gate + off + pk * VEC, gt);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A g = static_cast<A>(gt[k]);
            const A n = static_cast<A>(xv[r][k]) * rstd * wv[k];
            dg[k] = gate_grad(p.gate_silu, g, gv[r][k] * n);
            gv[r][k] *= gate_value(p.gate_silu, g);
          }
          if (p.dgate != nullptr) store_as<T, VEC>(p.dgate + off + pk * VEC, dg);
        }
      }
    }
    if constexpr (MOD) {
      if (p.mod_rows == 1) {  // per token: dscale = dy * z stored; dy -> dz = dy * m
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int pk = r * tpr + t;
          if (valid && pk < packs) {
            A wv[VEC], bv[VEC], sv[VEC], ds[VEC];
            ln_weight<T, VEC>(p, pk * VEC, wv);
            param_or<T, VEC>(p.b, pk * VEC, A(0), bv);
            param_or<T, VEC>(p.scale, qoff + pk * VEC, A(0), sv);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              ds[k] = gv[r][k] * affine_z(static_cast<A>(xv[r][k]), mean, rstd * wv[k], bv[k]);
              gv[r][k] *= p.scale_offset + sv[k];
            }
            if (p.dscale.present()) p.dscale.store(qoff + pk * VEC, ds);
          }
        }
      }
    }
    if constexpr (ACT) {  // dy -> dz in place: both passes below read dz
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int pk = r * tpr + t;
        if (valid && pk < packs) {
          A xa[VEC], wv[VEC], bv[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) xa[k] = static_cast<A>(xv[r][k]);
          ln_weight<T, VEC>(p, pk * VEC, wv);
          param_or<T, VEC>(p.b, pk * VEC, A(0), bv);
          act_grad_pack<A, VEC>(p.act, xa, mean, rstd, wv, bv, gv[r]);
        }
      }
    }
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        A wv[VEC];
        dx_weight<T, VEC, MOD>(p, pk * VEC, qoff, wv);
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
      group_sum2(s1, s2, red, tpr);
    }
    const A c1 = rms ? A(0) : s1 * invL, c2 = s2 * invL;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int pk = r * tpr + t;
      if (valid && pk < packs) {
        A o[VEC], wv[VEC];
        dx_weight<T, VEC, MOD>(p, pk * VEC, qoff, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A xh = (static_cast<A>(xv[r][k]) - mean) * rstd;
          o[k] = rstd * (gv[r][k] * wv[k] - c1 - xh * c2);
          dwp[r][k] += gv[r][k] * xh;
          dbp[r][k] += gv[r][k];
        }
        if constexpr (GATE == kGateFirst) {
          gated_dx<T, VEC>(p, off + pk * VEC, o);
        } else if constexpr (MOD) {
          store_mod_dx<T, VEC, X>(p, off + pk * VEC, qoff + pk * VEC, o, dgp[MOD ? r : 0]);
        } else {
          store_dx<T, VEC, X>(p, off + pk * VEC, o);
        }
      }
    }
  }
  if (p.ws_dw == nullptr && p.ws_db == nullptr && ws_dg == nullptr) return;  // uniform

  // Column partials of this block, fixed order: lanes of a warp that own the same columns
  // (tpr < 32) by xor-shuffles; then a pairwise tree over the block's units (a warp when
  // tpr <= 32, tpr threads otherwise; a power of two of them), the upper half of each level
  // staged in dynamic shared memory; unit 0 writes ws row blockIdx.x.
  if (tpr < 32) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        for (int o = 16; o >= tpr; o >>= 1) {
          dwp[r][k] += __shfl_xor_sync(0xffffffffu, dwp[r][k], o);
          dbp[r][k] += __shfl_xor_sync(0xffffffffu, dbp[r][k], o);
          if constexpr (MOD) dgp[r][k] += __shfl_xor_sync(0xffffffffu, dgp[r][k], o);
        }
  }
  const int uw = tpr < 32 ? 32 : tpr;  // threads per unit
  const int units = blockDim.x / uw, u = threadIdx.x / uw, i = threadIdx.x % uw;
  const bool owner = i < tpr;          // thread i of a unit owns packs r * tpr + i
  A* stage = reinterpret_cast<A*>(col_smem);
  const int na = (p.ws_dw != nullptr) + (p.ws_db != nullptr) + (ws_dg != nullptr);
  const int adb = p.ws_dw != nullptr ? 1 : 0;  // staged array of dbias
  const int adg = adb + (p.ws_db != nullptr ? 1 : 0);  // of dgate (MOD)
  // element e of array a in slot s: ((s * na + a) * kBwdElems + e) * tpr + i (consecutive threads,
  // consecutive words)
  for (int s = units >> 1; s > 0; s >>= 1) {  // uniform over the block
    if (u >= s && u < 2 * s && owner) {
      A* slot = stage + static_cast<int64_t>(u - s) * na * kBwdElems * tpr;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int e = r * VEC + k;
          if (p.ws_dw != nullptr) slot[e * tpr + i] = dwp[r][k];
          if (p.ws_db != nullptr) slot[(adb * kBwdElems + e) * tpr + i] = dbp[r][k];
          if constexpr (MOD) {
            if (ws_dg != nullptr) slot[(adg * kBwdElems + e) * tpr + i] = dgp[r][k];
          }
        }
    }
    __syncthreads();
    if (u < s && owner) {
      const A* slot = stage + static_cast<int64_t>(u) * na * kBwdElems * tpr;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int e = r * VEC + k;
          if (p.ws_dw != nullptr) dwp[r][k] += slot[e * tpr + i];
          if (p.ws_db != nullptr) dbp[r][k] += slot[(adb * kBwdElems + e) * tpr + i];
          if constexpr (MOD) {
            if (ws_dg != nullptr) dgp[r][k] += slot[(adg * kBwdElems + e) * tpr + i];
          }
        }
    }
    __syncthreads();  // the slots are rewritten by the next level
  }
  if (u != 0 || !owner) return;
  A* out_dw = p.ws_dw != nullptr ? p.ws_dw + static_cast<int64_t>(blockIdx.x) * p.L : nullptr;
  A* out_db = p.ws_db != nullptr ? p.ws_db + static_cast<int64_t>(blockIdx.x) * p.L : nullptr;
  A* out_dg = ws_dg != nullptr ? ws_dg + static_cast<int64_t>(blockIdx.x) * p.L : nullptr;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int pk = r * tpr + i;
    if (pk < packs) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (out_dw != nullptr) out_dw[pk * VEC + k] = dwp[r][k];
        if (out_db != nullptr) out_db[pk * VEC + k] = dbp[r][k];
        if constexpr (MOD) {
          if (out_dg != nullptr) out_dg[pk * VEC + k] = dgp[r][k];
        }
      }
    }
  }
}

// The two planes of the backward sums' workspaces (row_sums_partial, cl_bwd_sums) and of
// row_sums_finalize's output, in this order: sum(dy) then sum(dy * xhat) (ACT: of dz).
enum SumsPlane : int { kSumDy = 0, kSumDyXhat = 1 };

// Per-item sums for the backward, over (row, chunk) items:
//   s1 = sum(g), s2 = sum(g * xhat), g = dy * w[j] (w null: g = dy), xhat = (x - mean) * rstd,
// with the statistics of row / stat_div (GroupNorm NCHW: rows are (n, c) planes, stat_div = C/G).
// rstd null: 1, the centred sums sum(dy * (x - mean)) of nc_grad_sums (rstd is read once per
// item, so the choice costs nothing in the loop).
// ws[kSumDy][item] = s1, ws[kSumDyXhat][item] = s2.
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
  const float* x32 = nullptr;  // add_norm with an fp32 residual stream (X = float): the rows
  Validity valid;              // the MASKED kernel only (nc_grad_sums with lengths or a mask)
};

// The ACT kernel's params: z = xhat * w + b. LayerNorm (chan_mod == 0): w and b per column, and the
// sums are of g = dz * w as above. GroupNorm NCHW (chan_mod == C): the row is the plane (n, c),
// c = row % C, whose w and b enter z only (the sums stay of dz: the host sets w for z, where the
// plain kernel has it absent).
template <typename T>
struct RowSumsAct : RowSums<T> {
  Operand<T> b;
  int64_t chan_mod = 0;
  Activation act;
};
template <typename T, bool ACT>
using row_sums_t = std::conditional_t<ACT, RowSumsAct<T>, RowSums<T>>;

// mean null: RMSNorm (xhat = x * rstd). X: the rows' dtype (T, or float32: add_norm's x32).
// MASKED (nc_grad_sums with a validity; never with ACT): the valid elements only, and a row with
// lengths on one line stops at its length (Validity::reduce_end).
template <typename T, int VEC, typename X, bool ACT, bool MASKED = false>
__global__ void __launch_bounds__(kItemThreads) row_sums_partial_kernel(row_sums_t<T, ACT> p, Items it) {
  using A = acc_of<T>;
  static_assert(!ACT || std::is_same_v<X, T>, "activation epilogues: LayerNorm / GroupNorm");
  static_assert(!MASKED || (!ACT && std::is_same_v<X, T>), "MASKED: the per-(n, c) sums");
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
      int64_t e1 = e0 + it.chunk < it.L ? e0 + it.chunk : it.L;
      Validity::Sample vs{};
      if constexpr (MASKED) {
        vs = p.valid.sample(row / p.valid.C);
        e1 = p.valid.reduce_end(vs, e1, VEC);
      }
      const int64_t srow = p.stat_div == 1 ? row : row / p.stat_div;
      const A mean = p.mean != nullptr ? p.mean[srow] : A(0);
      const A rstd = p.rstd != nullptr ? p.rstd[srow] : A(1);
      const int64_t off = row * it.L;
      const int64_t p1 = e1 / VEC;
      const X* xs = row_src<X>(p.x, p.x32);
      A zw = A(1), zb = A(0);  // ACT, GroupNorm planes: the plane's channel affine
      if constexpr (ACT) {
        if (p.chan_mod > 0) {
          const int64_t c = row % p.chan_mod;
          zw = p.w.get_or(c, A(1));
          zb = p.b.get_or(c, A(0));
        }
      }
      for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
        X xv[kUnroll][VEC];
        A gv[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            load_raw<X, VEC>(xs + off + q * VEC, xv[u]);
            p.dy.load(off + q * VEC, gv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t q = pk + static_cast<int64_t>(u) * tpr;
          if (q < p1) {
            A wv[VEC];
            if constexpr (ACT) {
              A bv[VEC], xa[VEC];
              if (p.chan_mod > 0) {
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                  wv[k] = zw;
                  bv[k] = zb;
                }
              } else {
                param_or<T, VEC>(p.w, q * VEC, A(1), wv);
                param_or<T, VEC>(p.b, q * VEC, A(0), bv);
              }
#pragma unroll
              for (int k = 0; k < VEC; ++k) xa[k] = static_cast<A>(xv[u][k]);
              act_grad_pack<A, VEC>(p.act, xa, mean, rstd, wv, bv, gv[u]);
              if (p.chan_mod > 0) {  // GroupNorm: sums of dz (the weight enters later)
#pragma unroll
                for (int k = 0; k < VEC; ++k) wv[k] = A(1);
              }
            } else if (p.w.present()) {
              p.w.load(q * VEC, wv);
            } else {
#pragma unroll
              for (int k = 0; k < VEC; ++k) wv[k] = A(1);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const A g = gv[u][k] * wv[k];
              if (MASKED && !p.valid.ok(vs, q * VEC + k)) continue;  // padding: anything, inf too
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
      p.ws[kSumDy * items + item] = s1;
      p.ws[kSumDyXhat * items + item] = s2;
    }
  }
}

// Where row_sums_finalize finds the K partials of output r in each plane of its input:
// base(r) + k * sk, base(r) = (r / rdiv) * s_hi + (r % rdiv) * s_lo.
struct PartialsLayout {
  int64_t rows = 0;   // outputs per plane
  int64_t K = 0;      // partials per output
  int64_t rdiv = 1;
  int64_t s_hi = 0;
  int64_t s_lo = 0;
  int64_t sk = 1;     // between an output's partials
  int64_t plane = 0;  // elements per plane of the input

  // row_sums_partial's (row, chunk) items: row r's S partials are items r * S .. r * S + S - 1.
  static PartialsLayout items(int64_t M, int64_t S) {
    return PartialsLayout{M, S, 1, S, 0, 1, M * S};
  }
  // cl_bwd_sums' [N, K, C] planes: (n, c)'s K partials lie C apart from n * K * C + c.
  static PartialsLayout channels_last(int64_t N, int64_t K, int64_t C) {
    return PartialsLayout{N * C, K, C, K * C, 1, C, N * K * C};
  }
};

// out_dy[r], out_dy_xhat[r]: the sums of output r's partials in the kSumDy and kSumDyXhat planes of
// `in`, in a fixed order. A warp per r.
template <typename A>
__global__ void __launch_bounds__(256)
    row_sums_finalize_kernel(const A* __restrict__ in, PartialsLayout l,
                             A* __restrict__ out_dy, A* __restrict__ out_dy_xhat) {
  const int lane = threadIdx.x & 31;
  const int wpb = blockDim.x >> 5;
  // the layout's fields as locals: read in place from the struct, fp32's kernel spilled 4 bytes
  const int64_t rows = l.rows, K = l.K, rdiv = l.rdiv, s_hi = l.s_hi, s_lo = l.s_lo, sk = l.sk;
  const A* in_dy = in + kSumDy * l.plane;
  const A* in_dy_xhat = in + kSumDyXhat * l.plane;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < rows;
       r += static_cast<int64_t>(gridDim.x) * wpb) {  // uniform over the warp
    const int64_t base = (r / rdiv) * s_hi + (r % rdiv) * s_lo;
    A a = A(0), b = A(0);
    for (int64_t k = lane; k < K; k += 32) {
      a += in_dy[base + k * sk];
      b += in_dy_xhat[base + k * sk];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      out_dy[r] = a;
      out_dy_xhat[r] = b;
    }
  }
}

// LayerNorm backward for long rows: block (rg, s) handles the column chunk s (blockDim * 8
// elements) of rows rg, rg + RG, ...; row sums s1 = sum(g), s2 = sum(g * xhat) come precomputed.
// Column partials -> ws row rg.
constexpr int kBwdSplitMaxThreads = 512;
// The ACT variant in fp64: the weight and bias of z held as doubles, the column partials and the
// activation's derivative spilled 80-144 bytes at the 128 registers of 512 threads: 256 threads.
template <typename T, bool ACT>
inline constexpr int kBwdSplitBound = ACT && sizeof(acc_of<T>) == 8 ? 256 : kBwdSplitMaxThreads;

template <typename T, int VEC, typename X, bool ACT>
__global__ void __launch_bounds__(kBwdSplitBound<T, ACT>)
    ln_bwd_split_kernel(row_bwd_t<T, ACT> p, const acc_of<T>* __restrict__ rs1,
                        const acc_of<T>* __restrict__ rs2, int64_t S2, int64_t RG) {
  using A = acc_of<T>;
  static_assert(!ACT || std::is_same_v<X, T>, "activation epilogues: LayerNorm, not add_norm");
  constexpr int R = kBwdPacks<VEC>;
  const A invL = A(1) / static_cast<A>(p.L);
  const int64_t cw = static_cast<int64_t>(blockDim.x) * kBwdElems;  // chunk width
  const bool rms = p.mean == nullptr;
  const X* xs = row_src<X>(p.x, p.x32);
  for (int64_t item = blockIdx.x; item < RG * S2; item += gridDim.x) {
    const int64_t rg = item / S2, s = item - rg * S2;
    const int64_t c0 = s * cw;
    A dwp[R][VEC], dbp[R][VEC], wv[R][VEC];
    A bv[R][VEC];  // ACT only: the bias of z
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
        if constexpr (ACT) param_or<T, VEC>(p.b, j0, A(0), bv[r]);
      }
    }
    for (int64_t row = rg; row < p.M; row += RG) {
      const A mean = rms ? A(0) : p.mean[row], rstd = p.rstd[row];
      const A c1 = rms ? A(0) : rs1[row] * invL, c2 = rs2[row] * invL;
      const int64_t off = row * p.L;
      X xv[R][VEC];
      A gv[R][VEC];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
        if (j0 < p.L) {
          load_raw<X, VEC>(xs + off + j0, xv[r]);
          p.dy.load(off + j0, gv[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t j0 = c0 + (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * VEC;
        if (j0 < p.L) {
          A o[VEC];
          if constexpr (ACT) {
            A xa[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) xa[k] = static_cast<A>(xv[r][k]);
            act_grad_pack<A, VEC>(p.act, xa, mean, rstd, wv[r], bv[r], gv[r]);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A xh = (static_cast<A>(xv[r][k]) - mean) * rstd;
            o[k] = rstd * (gv[r][k] * wv[r][k] - c1 - xh * c2);
            dwp[r][k] += gv[r][k] * xh;
            dbp[r][k] += gv[r][k];
          }
          store_dx<T, VEC, X>(p, off + j0, o);
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

// out_i[s, j] = sum_{k < K} in_i[(s * K + k) * ncols + j] in a fixed order, for each of `segments`
// segments s and i = blockIdx.y (0: out1, 1: out2; a null output skips). blockDim 1024 =
// (1024 / ky) columns x ky row lanes (ky a power of two <= 32: few rows -> wide column tiles); out
// dtype T or float32.
template <typename T>
__global__ void __launch_bounds__(1024)
    col_sum_finalize_kernel(const acc_of<T>* __restrict__ in1, const acc_of<T>* __restrict__ in2,
                            int64_t K, int64_t ncols, int ky, Operand<T> out1, Operand<T> out2,
                            int64_t segments) {
  using A = acc_of<T>;
  __shared__ A sh[1024];
  const A* in = blockIdx.y == 0 ? in1 : in2;
  const Operand<T> out = blockIdx.y == 0 ? out1 : out2;
  if (in == nullptr || !out.present()) return;  // uniform over the block
  const int cx = blockDim.x / ky;
  const int tx = threadIdx.x % cx, ty = threadIdx.x / cx;
  const int64_t col_blocks = (ncols + cx - 1) / cx;
  for (int64_t sb = blockIdx.x; sb < segments * col_blocks; sb += gridDim.x) {  // uniform
    const int64_t seg = sb / col_blocks, cb = sb - seg * col_blocks;
    const int64_t col = cb * cx + tx;
    const A* sin = in + seg * K * ncols;
    A acc = A(0);
    if (col < ncols)
      for (int64_t k = ty; k < K; k += ky) acc += sin[k * ncols + col];
    __syncthreads();  // sh may still be read by the previous column block
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int st = ky >> 1; st > 0; st >>= 1) {
      if (ty < st) sh[ty * cx + tx] += sh[(ty + st) * cx + tx];
      __syncthreads();
    }
    if (ty == 0 && col < ncols) out.set(seg * ncols + col, sh[tx]);
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
// nc_affine_grad (the dx kernels' NC template flag): rows (n, c), coefficients given per row,
//   dx = a * dy + b * (x - mean) + c,  held as  w = a (absent with dy), c1 = c, c2 = b, rstd unused
// and computed as this formula with rstd = 1, k1 = -c, k2 = -b (exact negations: the same value).
// A compile-time flag, so GroupNorm's instantiations are the code they were (registers, speed).
// With NC, dy may be absent (the gradient through nc_moments alone: the a * dy term drops).
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
  Validity valid;  // the MASKED kernels only (nc_affine_grad with lengths or a mask)
};

// The ACT kernels' params (gn_dx_nchw, cl_dx): the bias of z = xhat * w + b and the activation.
template <typename T>
struct GnDxAct : GnDx<T> {
  Operand<T> b;
  Activation act;
};
template <typename T, bool ACT>
using gn_dx_t = std::conditional_t<ACT, GnDxAct<T>, GnDx<T>>;

// NC (nc_affine_grad): see GnDx; never together with ACT. MASKED (NC with a validity): 0 at the
// invalid positions.
template <typename T, int VEC, bool ACT, bool NC = false, bool MASKED = false>
__global__ void __launch_bounds__(kItemThreads) gn_dx_nchw_kernel(gn_dx_t<T, ACT> p, Items it) {
  using A = acc_of<T>;
  static_assert(!MASKED || (NC && !ACT), "MASKED: the per-(n, c) affine gradient");
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
    const A mean = p.mean[row], rstd = NC ? A(1) : p.rstd[row];
    const A k1 = NC ? -p.c1[row] : p.c1[row], k2 = NC ? -p.c2[row] : p.c2[row];
    const int64_t cbase = NC ? 0 : p.gn.chan_base(row);
    const A a_row = NC ? p.w.get_or(row, A(0)) : A(0);  // NC: a of the row (0 without dy)
    const bool has_dy = !NC || p.dy.present();
    Validity::Sample vs{};
    if constexpr (MASKED) vs = p.valid.sample(row / p.valid.C);
    const int64_t p1 = e1 / VEC;
    for (int64_t pk = e0 / VEC + t; pk < p1; pk += static_cast<int64_t>(tpr) * kUnroll) {
      T xv[kUnroll][VEC];
      A gv[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) {
          load_raw<T, VEC>(p.x + off + q * VEC, xv[u]);
          if (has_dy) {
            p.dy.load(off + q * VEC, gv[u]);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) gv[u][k] = A(0);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = pk + static_cast<int64_t>(u) * tpr;
        if (q < p1) {
          const int64_t j0 = q * VEC;
          A wv[VEC], bv[VEC], o[VEC];  // bv: ACT only (the bias of z)
          if constexpr (NC) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) wv[k] = a_row;
          } else if constexpr (ACT) {
            gn_channel_affine<T, VEC>(p.w, p.b, p.gn, cbase, j0, wv, bv);
          } else {
            gn_channel_affine<T, VEC>(p.w, Operand<T>{}, p.gn, cbase, j0, wv, bv);
          }
          if constexpr (ACT) {
            A xa[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) xa[k] = static_cast<A>(xv[u][k]);
            act_grad_pack<A, VEC>(p.act, xa, mean, rstd, wv, bv, gv[u]);
          }
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A xh = (static_cast<A>(xv[u][k]) - mean) * rstd;
            o[k] = rstd * (wv[k] * gv[u][k] - k1 - xh * k2);
            if constexpr (MASKED) o[k] = p.valid.ok(vs, j0 + k) ? o[k] : A(0);
          }
          store_as<T, VEC, A>(p.dx + off + j0, o);
        }
      }
    }
  }
}

}  // namespace groups
}  // namespace fastnorm
