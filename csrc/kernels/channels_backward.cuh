// Strided channels, backward (layouts in channels_common.cuh): BatchNorm's sums, finalize and dx
// kernels (the same general / fused / eval paths as the forward), GroupNorm channels_last's
// per-(n, chunk, channel) sums and dx (coefficients from groups_backward.cuh's gn_bwd_coef).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/channels_common.cuh"
#include "kernels/groups_backward.cuh"

namespace fastnorm {
namespace channels {

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
  // The fused activation (kernels instantiated with ACT): dy is replaced by dz = dy * act'(z),
  // z = (x - mean) * (w * rstd) + bias recomputed per element; bias absent = 0.
  Operand<scalar_t> bias;
  Activation act;
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

// NCHW: sum(dy) and sum(dy * (x - m)) over the elements of channel c that the cursor visits.
// ACT: of dz = act_grad(dy) instead, z from m, gs = w * rstd and the bias `shift`.
template <typename scalar_t, typename acc_t, int V, bool ACT, typename D>
__device__ __forceinline__ void nchw_thread_sums(const Pack<D, V>* __restrict__ dyv,
                                                 const Pack<scalar_t, V>* __restrict__ xv,
                                                 NchwCursor cur, acc_t m, acc_t& sdy,
                                                 acc_t& sdxm, const Activation& act, acc_t gs,
                                                 acc_t shift) {
  sdy = sdxm = acc_t(0);
  stream_packs(cur, LoadXDy<true, Pack<scalar_t, V>, Pack<D, V>>{xv, dyv},
               [&](const auto& v, const auto&) {
#pragma unroll
    for (int u = 0; u < group_size_v<decltype(v)>; ++u)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xf = static_cast<acc_t>(v[u].x.v[k]);
        acc_t d = static_cast<acc_t>(v[u].dy.v[k]);
        if constexpr (ACT) d = act_grad<ACT>(act, xf, m, gs, shift, d);
        sdy += d;
        sdxm += d * (xf - m);
      }
  });
}

// NHWC: the same two sums for V channels over rows r0, r0 + step, ... < R (ACT: gs[], shift[]
// per channel, as nchw_thread_sums).
template <typename scalar_t, typename acc_t, int V, bool ACT, typename D>
__device__ __forceinline__ void nhwc_thread_sums(const Pack<D, V>* __restrict__ dyv,
                                                 const Pack<scalar_t, V>* __restrict__ xv,
                                                 int64_t Cv, int64_t cv, int64_t R, int64_t r0,
                                                 int64_t step, const acc_t (&m)[V],
                                                 acc_t (&sdy)[V], acc_t (&sdxm)[V],
                                                 const Activation& act, const acc_t (&gs)[V],
                                                 const acc_t (&shift)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) sdy[j] = sdxm[j] = acc_t(0);
  stream_packs(NhwcCursor(Cv, cv, R, r0, step), LoadXDy<true, Pack<scalar_t, V>, Pack<D, V>>{xv, dyv},
               [&](const auto& v, const auto&) {
#pragma unroll
    for (int u = 0; u < group_size_v<decltype(v)>; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t xf = static_cast<acc_t>(v[u].x.v[j]);
        acc_t d = static_cast<acc_t>(v[u].dy.v[j]);
        if constexpr (ACT) d = act_grad<ACT>(act, xf, m[j], gs[j], shift[j], d);
        sdy[j] += d;
        sdxm[j] += d * (xf - m[j]);
      }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward sums kernels (general path): partial sums [2][G1][C].
// D, in these and the apply kernels: dy's dtype, the input's, or float for a float32 grad_out of
// a half / bf16 input (read as it is: rounded to half first, values above 65504 would overflow).
// The host takes float only with single elements (V == 1): the packed kernels keep their code.

template <typename scalar_t, int V, bool ACT, typename D = scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_sums_nchw(const D* __restrict__ dy, const scalar_t* __restrict__ x,
                     BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  using PD = Pack<D, V>;  // dy's packs
  __shared__ acc_t sh[64];
  const PD* __restrict__ dyv = reinterpret_cast<const PD*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    acc_t sdy, sdxm;
    acc_t gs = acc_t(0), shift = acc_t(0);  // z's coefficients (ACT)
    if constexpr (ACT) {
      gs = a.weight.get_or(c, acc_t(1)) * a.rstd[c];
      shift = a.bias.get_or(c, acc_t(0));
    }
    nchw_thread_sums<scalar_t, acc_t, V, ACT, D>(dyv, xv, cur, a.mean[c], sdy, sdxm, a.act, gs,
                                                 shift);
    block_sum2(sdy, sdxm, sh);
    if (threadIdx.x == 0) {
      const int64_t i = static_cast<int64_t>(blockIdx.x) * C + c;
      a.part[i] = sdy;
      a.part[a.G1 * C + i] = sdxm;
    }
  }
}

// Dynamic shared memory: 2 * kThreads * V * sizeof(acc_t).
template <typename scalar_t, int V, bool ACT, typename D = scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_sums_nhwc(const D* __restrict__ dy, const scalar_t* __restrict__ x,
                     BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  using PD = Pack<D, V>;  // dy's packs
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const PD* __restrict__ dyv = reinterpret_cast<const PD*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  const int64_t C = a.C, Cv = a.C / V, R = a.N * a.S;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  acc_t m[V], sdy[V], sdxm[V], gs[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = active ? a.mean[cv * V + j] : acc_t(0);
  if constexpr (ACT) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      gs[j] = active ? a.weight.get_or(cv * V + j, acc_t(1)) * a.rstd[cv * V + j] : acc_t(0);
      shift[j] = active ? a.bias.get_or(cv * V + j, acc_t(0)) : acc_t(0);
    }
  }
  nhwc_thread_sums<scalar_t, acc_t, V, ACT, D>(dyv, xv, Cv, cv, active ? R : 0, r0, step, m,
                                               sdy, sdxm, a.act, gs, shift);
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
// Backward apply kernels: dx. In kModeFused they also write dweight/dbias (chunk 0 == the whole
// channel); with need_dx false they only do that.

// NCHW. grid (G, min(C, 65535)), block kThreads.
// ACT: dz = dy * act'(z) in place of dy everywhere (sums and dx); z needs x in eval too.
template <typename scalar_t, int V, bool ACT, typename D = scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_apply_nchw(const D* __restrict__ dy, const scalar_t* __restrict__ x,
                      scalar_t* __restrict__ dx, BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  using PD = Pack<D, V>;  // dy's packs
  __shared__ acc_t sh[64];
  const PD* __restrict__ dyv = reinterpret_cast<const PD*>(dy);
  const P* __restrict__ xv = reinterpret_cast<const P*>(x);
  P* __restrict__ dxv = reinterpret_cast<P*>(dx);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = a.C;

  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    NchwCursor cur;
    cur.init(start, step, a.N, C, a.Sv, c);
    // z = (x - zm) * gs + zb (ACT): the saved mean (k.mean is 0 in eval), w * rstd, the bias
    acc_t zm = acc_t(0), zg = acc_t(0), zb = acc_t(0);
    if constexpr (ACT) {
      zm = a.mean[c];
      zg = a.weight.get_or(c, acc_t(1)) * a.rstd[c];
      zb = a.bias.get_or(c, acc_t(0));
    }
    BwdCoef<acc_t> k;
    if (a.mode == kModeFinal) {
      k.mean = a.coef[c];
      k.mdy = a.coef[C + c];
      k.proj = a.coef[2 * C + c];
      k.gs = a.coef[3 * C + c];
    } else {  // uniform branch
      acc_t sdy = acc_t(0), sdxm = acc_t(0);
      if (a.mode == kModeFused) {
        nchw_thread_sums<scalar_t, acc_t, V, ACT, D>(dyv, xv, cur, a.mean[c], sdy, sdxm, a.act,
                                                     zg, zb);
        block_sum2(sdy, sdxm, sh);
      }
      k = bwd_finalize(a, c, sdy, sdxm, blockIdx.x == 0 && threadIdx.x == 0);
    }
    if (!a.need_dx) continue;

    const LoadXDy<true, P, PD> load{xv, dyv};
    const LoadXDy<ACT, P, PD> load_eval{xv, dyv};  // x with ACT only (z)
    if (a.training) {
      stream_packs(cur, load, [&](const auto& v, const auto& offs) {
#pragma unroll
        for (int u = 0; u < group_size_v<decltype(v)>; ++u) {
          P o;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t xf = static_cast<acc_t>(v[u].x.v[j]);
            const acc_t d = act_grad<ACT>(a.act, xf, zm, zg, zb, static_cast<acc_t>(v[u].dy.v[j]));
            o.v[j] = static_cast<scalar_t>((d - k.mdy - (xf - k.mean) * k.proj) * k.gs);
          }
          dxv[offs[u]] = o;
        }
      });
    } else {
      stream_packs(cur, load_eval, [&](const auto& v, const auto& offs) {
#pragma unroll
        for (int u = 0; u < group_size_v<decltype(v)>; ++u) {
          P o;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc_t d = static_cast<acc_t>(v[u].dy.v[j]);
            if constexpr (ACT) d = act_grad<ACT>(a.act, static_cast<acc_t>(v[u].x.v[j]), zm, zg, zb, d);
            o.v[j] = static_cast<scalar_t>(d * k.gs);
          }
          dxv[offs[u]] = o;
        }
      });
    }
  }
}

// NHWC. grid (ceil(C / V / tx), G), block (tx, ty).
// Dynamic shared memory: 2 * kThreads * V * sizeof(acc_t). ACT: as bn_bwd_apply_nchw.
template <typename scalar_t, int V, bool ACT, typename D = scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_bwd_apply_nhwc(const D* __restrict__ dy, const scalar_t* __restrict__ x,
                      scalar_t* __restrict__ dx, BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, V>;
  using PD = Pack<D, V>;  // dy's packs
  extern __shared__ __align__(16) unsigned char bn_dyn_smem[];
  acc_t* smem = reinterpret_cast<acc_t*>(bn_dyn_smem);
  const PD* __restrict__ dyv = reinterpret_cast<const PD*>(dy);
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
  // z = (x - zm) * zg + zb (ACT), as in bn_bwd_apply_nchw
  acc_t zm[V], zg[V], zb[V];
  if constexpr (ACT) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      zm[j] = active ? a.mean[c0 + j] : acc_t(0);
      zg[j] = active ? a.weight.get_or(c0 + j, acc_t(1)) * a.rstd[c0 + j] : acc_t(0);
      zb[j] = active ? a.bias.get_or(c0 + j, acc_t(0)) : acc_t(0);
    }
  }
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
      nhwc_thread_sums<scalar_t, acc_t, V, ACT, D>(dyv, xv, Cv, cv, active ? R : 0, r0, step, m,
                                                   sdy, sdxm, a.act, zg, zb);
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
  if (!a.need_dx || !active) return;  // after the last barrier
  const LoadXDy<true, P, PD> load{xv, dyv};
  const LoadXDy<ACT, P, PD> load_eval{xv, dyv};  // x with ACT only (z)
  const NhwcCursor cur(Cv, cv, R, r0, step);
  if (a.training) {
    stream_packs(cur, load, [&](const auto& v, const auto& offs) {
#pragma unroll
      for (int u = 0; u < group_size_v<decltype(v)>; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t xf = static_cast<acc_t>(v[u].x.v[j]);
          const acc_t d =
              act_grad<ACT>(a.act, xf, zm[j], zg[j], zb[j], static_cast<acc_t>(v[u].dy.v[j]));
          o.v[j] = static_cast<scalar_t>((d - mdy[j] - (xf - mean[j]) * proj[j]) * gs[j]);
        }
        dxv[offs[u]] = o;
      }
    });
  } else {
    stream_packs(cur, load_eval, [&](const auto& v, const auto& offs) {
#pragma unroll
      for (int u = 0; u < group_size_v<decltype(v)>; ++u) {
        P o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc_t d = static_cast<acc_t>(v[u].dy.v[j]);
          if constexpr (ACT)
            d = act_grad<ACT>(a.act, static_cast<acc_t>(v[u].x.v[j]), zm[j], zg[j], zb[j], d);
          o.v[j] = static_cast<scalar_t>(d * gs[j]);
        }
        dxv[offs[u]] = o;
      }
    });
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
  Validity valid;  // the MASKED kernel only (nc_grad_sums with lengths or a mask)
};

// The ACT kernel's params (a struct of its own: the plain kernel keeps its parameter block and
// registers exactly): z = (x - mean) * (rstd * w) + b recomputed, dz = dy * act'(z) summed instead
// of dy.
template <typename T>
struct ClBwdAct : ClBwd<T> {
  Operand<T> w, b;
  Activation act;
};
template <typename T, bool ACT>
using cl_bwd_t = std::conditional_t<ACT, ClBwdAct<T>, ClBwd<T>>;

// Per-(n, chunk, channel) sums, channels_last: ws[kSumDy][(n*K + k)*C + c] = sum(dy),
// ws[kSumDyXhat][...] = sum(dy * xhat) (ACT: of dz). rstd null: sum(dy * (x - mean)), the centred
// sums of nc_grad_sums (G = C; rstd is applied to the block's total, so the choice is outside the
// loop).
// Minimum blocks per SM of the ACT variants. The derivative of the activation (exp, erf, tanh,
// log1p, inlined per element) runs with the plain kernel's packs of x and dy in flight plus the
// per-channel affine of z: at the plain caps, fp64 (both kernels) and the 8-wide half packs of
// the sums spilled 48-132 bytes. Two blocks (128 registers) for those.
template <typename T, int VEC>
inline constexpr int kClSumsActBlocks =
    sizeof(acc_of<T>) == 8 || VEC >= 8 ? 2 : kClSumsBlocks<T, VEC>;
template <typename T, int VEC>
inline constexpr int kClDxActBlocks = sizeof(acc_of<T>) == 8 ? 2 : kClDxBlocks<T, VEC>;

// MASKED (nc_grad_sums with a validity, G = C; never with ACT): the valid rows (positions) only,
// skipped before their loads.
template <typename T, int VEC, bool ACT, bool MASKED = false>
__global__ void __launch_bounds__(kClThreads, ACT ? kClSumsActBlocks<T, VEC>
                                                  : kMaskedBlocks<MASKED, kClSumsBlocks<T, VEC>>)
    cl_bwd_sums_kernel(cl_bwd_t<T, ACT> p, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  static_assert(!MASKED || !ACT, "MASKED: the per-(n, c) sums");
  constexpr int kU = kClSumsPacks<T, VEC>;  // packs of x and of dy in flight per thread
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
    const ClItem it = cl_item(item, s);
    const int64_t ct = it.ct, nk = it.nk, k = it.k, n = it.n;
    const int64_t cp = ct * s.bx + tx;
    const bool cv = cp < Cp;
    A sa[VEC], sb[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) sa[v] = sb[v] = A(0);
    if (cv) {
      A mu[VEC];
      A sc[VEC], bb[VEC];  // ACT only: z = (x - mu) * sc + bb
      GroupWalk gw(n, s.G, cp * VEC, s.Cg);
#pragma unroll
      for (int v = 0; v < VEC; ++v, gw.next(s.Cg)) {
        mu[v] = p.mean[gw.ng];
        if constexpr (ACT) {
          const int64_t c = cp * VEC + v;
          sc[v] = p.rstd[gw.ng] * p.w.get_or(c, A(1));
          bb[v] = p.b.get_or(c, A(0));
        }
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
        A gv[kU][VEC];
        bool live[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          live[u] = h + u * s.by < h1 && (!MASKED || p.valid.ok(vs, h + u * s.by));
          if (live[u]) {
            load_raw<T, VEC>(p.x + off + u * step, xv[u]);
            p.dy.load(off + u * step, gv[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (live[u]) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              if constexpr (ACT) {
                const A d = static_cast<A>(xv[u][v]) - mu[v];
                const A g = activation_grad(p.act, d * sc[v] + bb[v], gv[u][v]);
                sa[v] += g * d;
                sb[v] += g;
              } else {
                sa[v] += gv[u][v] * (static_cast<A>(xv[u][v]) - mu[v]);
                sb[v] += gv[u][v];
              }
            }
          }
        }
      }
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
      // sum(dy * xhat) = rstd * sum(dy * (x - mean)): rstd is applied to the block's total, read
      // here and not before the loop, where its VEC registers would be held across it
      const int64_t base = nk * s.C + cp * VEC;
      GroupWalk gw(n, s.G, cp * VEC, s.Cg);
#pragma unroll
      for (int v = 0; v < VEC; ++v, gw.next(s.Cg)) {
        ws[groups::kSumDy * plane + base + v] = sb[v];
        ws[groups::kSumDyXhat * plane + base + v] = p.rstd != nullptr ? sa[v] * p.rstd[gw.ng] : sa[v];
      }
    }
  }
}

// The same dx, channels_last; blocks as in cl_apply_kernel. ACT: dz = dy * act'(z) in place of dy,
// z = (x - mean) * (rstd * w) + b recomputed. NC (nc_affine_grad, G = C): the coefficients per
// (n, c) as in groups::GnDx (w = a, c1 = c, c2 = b: rstd = 1, k1 = -c, k2 = -b), dy possibly
// absent; a compile-time flag, so GroupNorm's instantiations keep their code. Never with ACT.
// MASKED (NC with a validity): the invalid rows (positions) store 0 without reading x or dy.
template <typename T, int VEC, bool ACT, bool NC = false, bool MASKED = false>
__global__ void __launch_bounds__(kClThreads, ACT ? kClDxActBlocks<T, VEC>
                                                  : kMaskedBlocks<MASKED, kClDxBlocks<T, VEC>>)
    cl_dx_kernel(groups::gn_dx_t<T, ACT> p, ClShape s) {
  using A = acc_of<T>;
  static_assert(!MASKED || (NC && !ACT), "MASKED: the per-(n, c) affine gradient");
  constexpr int kU = kClDxPacks<T, VEC>;  // packs of x and of dy in flight per thread
  const int tx = threadIdx.x % s.bx, ty = threadIdx.x / s.bx;
  const int64_t Cp = s.C / VEC;
  const int64_t items = s.N * s.K * s.CT;
  for (int64_t fwd = blockIdx.x; fwd < items; fwd += gridDim.x) {
    const int64_t item = items - 1 - fwd;
    const ClItem it = cl_item(item, s);
    const int64_t ct = it.ct, k = it.k, n = it.n;
    const int64_t cp = ct * s.bx + tx;
    if (cp >= Cp) continue;  // no collective operations in this kernel
    A mu[VEC], rs[VEC], wr[VEC], k1[VEC], k2[VEC];
    A bb[VEC];  // ACT only: the bias of z
    GroupWalk gw(n, s.G, cp * VEC, s.Cg);
#pragma unroll
    for (int v = 0; v < VEC; ++v, gw.next(s.Cg)) {
      const int64_t c = cp * VEC + v;
      const int64_t ng = gw.ng;
      mu[v] = p.mean[ng];
      rs[v] = NC ? A(1) : p.rstd[ng];
      const A wc = NC ? p.w.get_or(ng, A(0)) : p.w.get_or(c, A(1));
      wr[v] = rs[v] * wc;
      k1[v] = rs[v] * (NC ? -p.c1[ng] : p.c1[ng]);
      k2[v] = rs[v] * rs[v] * (NC ? -p.c2[ng] : p.c2[ng]);
      if constexpr (ACT) bb[v] = p.b.get_or(c, A(0));
    }
    const bool has_dy = !NC || p.dy.present();
    const int64_t h0 = k * s.rpc;
    const int64_t h1 = h0 + s.rpc < s.HW ? h0 + s.rpc : s.HW;
    const int64_t step = static_cast<int64_t>(s.by) * s.C;  // elements between a thread's rows
    int64_t off = (n * s.HW + h0 + ty) * s.C + cp * VEC;
    Validity::Sample vs{};
    if constexpr (MASKED) vs = p.valid.sample(n);
    #pragma unroll 1  // kU packs are the unroll: nothing more in flight
    for (int64_t h = h0 + ty; h < h1; h += static_cast<int64_t>(s.by) * kU, off += kU * step) {
      T xv[kU][VEC];
      A gv[kU][VEC];
      bool live[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        live[u] = !MASKED || (h + u * s.by < h1 && p.valid.ok(vs, h + u * s.by));
        if (h + u * s.by < h1 && live[u]) {
          load_raw<T, VEC>(p.x + off + u * step, xv[u]);
          if (has_dy) {
            p.dy.load(off + u * step, gv[u]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) gv[u][v] = A(0);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (h + u * s.by < h1) {
          A o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            if constexpr (ACT) {
              const A d = static_cast<A>(xv[u][v]) - mu[v];
              const A g = activation_grad(p.act, affine_z(static_cast<A>(xv[u][v]), mu[v], wr[v], bb[v]), gv[u][v]);
              o[v] = wr[v] * g - k1[v] - d * k2[v];
            } else {
              o[v] = wr[v] * gv[u][v] - k1[v] - (static_cast<A>(xv[u][v]) - mu[v]) * k2[v];
            }
            if constexpr (MASKED) o[v] = live[u] ? o[v] : A(0);
          }
          store_as<T, VEC, A>(p.dx + off + u * step, o);
        }
      }
    }
  }
}

}  // namespace channels
}  // namespace fastnorm
