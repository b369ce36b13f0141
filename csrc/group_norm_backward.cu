// fastnorm::group_norm_bwd on CUDA (InstanceNorm is num_groups == C): host side.
// NCHW (contiguous) input: rows (n, g) of Cg*HW elements -> the contiguous-groups kernels
// (kernels/groups_*.cuh, launch/groups.h). channels_last / channels_last_3d input: the strided
// kernels (kernels/channels_*.cuh, launch/channels.h) read NHWC directly and write the output in
// the same memory format. Any other strides: .contiguous() first.
// The forward op: group_norm_forward.cu.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "group_norm.h"
#include "kernels/channels_backward.cuh"
#include "kernels/channels_forward.cuh"
#include "launch/channels.h"
#include "launch/groups.h"

namespace fastnorm {
namespace {

// ---- backward ------------------------------------------------------------------------------------
// Per-(n, c) sums S = sum(dy * xhat), B = sum(dy) -> [N*C] each (pointers into `keep`).
// ACT: of dz = dy * act'(z) instead (base.w, base.b: the affine of z; base.act).
template <typename T, int VEC, bool ACT>
void nchw_channel_sums(const groups::row_sums_t<T, ACT>& base, const Dims& d, at::Tensor& keep,
                       const acc_of<T>*& S, const acc_of<T>*& B, const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  const groups::Items it = groups::plan_items(d.N * d.C, d.HW, VEC);
  const int64_t items = it.M * it.S;
  at::Tensor ws = at::empty({2 * items}, acc_options(like));
  groups::row_sums_t<T, ACT> p = base;
  if constexpr (ACT) {
    p.chan_mod = d.C;  // rows are (n, c) planes: w and b per plane, for z only
  } else {
    p.w = Operand<T>{};
  }
  p.stat_div = d.Cg;
  p.ws = ws.data_ptr<A>();
  launch(groups::row_sums_partial_kernel<T, VEC, T, ACT>, groups::item_grid(it), groups::kItemThreads, 0, stream,
      p, it);
  if (it.S == 1) {
    keep = ws;
    B = p.ws + groups::kSumDy * items;
    S = p.ws + groups::kSumDyXhat * items;
    return;
  }
  const int64_t nc = d.N * d.C;
  keep = at::empty({2 * nc}, acc_options(like));
  A* o = keep.data_ptr<A>();
  launch(groups::row_sums_finalize_kernel<A>, grid_of(ceil_div(nc, 8)), 256, 0, stream,
      p.ws, groups::PartialsLayout::items(it.M, it.S), o + groups::kSumDy * nc,
      o + groups::kSumDyXhat * nc);
  B = o + groups::kSumDy * nc;
  S = o + groups::kSumDyXhat * nc;
}

template <typename T, int VEC, bool ACT>
void nchw_dx(groups::gn_dx_t<T, ACT> p, const Dims& d) {
  const int64_t L = d.Cg * d.HW;
  p.gn.G = d.G;
  p.gn.Cg = d.Cg;
  p.gn.HW = d.HW;
  p.gn.pack_in_channel = d.HW % VEC == 0;
  p.gn.div64 = L >= (int64_t(1) << 31);
  if (!p.gn.div64) p.gn.hw_div = FastDiv(static_cast<uint32_t>(d.HW));
  const groups::Items it = groups::plan_items(d.N * d.G, L, VEC);
  launch(groups::gn_dx_nchw_kernel<T, VEC, ACT>, groups::item_grid(it), groups::kItemThreads, 0, current_stream(),
      p, it);
}

template <typename T, int VEC, bool ACT>
void cl_channel_sums(const channels::cl_bwd_t<T, ACT>& base, const Dims& d, at::Tensor& keep,
                     const acc_of<T>*& S, const acc_of<T>*& B, const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  channels::cl_bwd_t<T, ACT> p = base;
  p.s = channels::plan_cl_sums(d.N, d.HW, d.C, d.G, VEC);  // the sums' tree: the sample's shape only
  const channels::ClShape& s = p.s;
  const int64_t plane = s.N * s.K * s.C;
  at::Tensor ws = at::empty({2 * plane}, acc_options(like));
  launch(channels::cl_bwd_sums_kernel<T, VEC, ACT>, grid_of(s.N * s.K * s.CT), s.bx * s.by, 0, stream,
      p, ws.data_ptr<A>());
  // laid out [N, K, C] per plane
  if (s.K == 1) {
    keep = ws;
    B = ws.data_ptr<A>() + groups::kSumDy * plane;
    S = ws.data_ptr<A>() + groups::kSumDyXhat * plane;
    return;
  }
  const int64_t nc = d.N * d.C;
  keep = at::empty({2 * nc}, acc_options(like));
  A* o = keep.data_ptr<A>();
  launch(groups::row_sums_finalize_kernel<A>, grid_of(ceil_div(nc, 8)), 256, 0, stream,
      ws.data_ptr<A>(), groups::PartialsLayout::channels_last(s.N, s.K, s.C), o + groups::kSumDy * nc,
      o + groups::kSumDyXhat * nc);
  B = o + groups::kSumDy * nc;
  S = o + groups::kSumDyXhat * nc;
}

// dx, channels_last: a plan of its own (a wave of cl_dx, whose register budget is not the sums').
template <typename T, int VEC, bool ACT>
void cl_dx(const groups::gn_dx_t<T, ACT>& p, const Dims& d) {
  const channels::ClShape s = channels::plan_cl(
      d.N, d.HW, d.C, d.G, VEC, sm_count(),
      resident_blocks(channels::cl_dx_kernel<T, VEC, ACT>, channels::kClThreads, 0));
  launch(channels::cl_dx_kernel<T, VEC, ACT>, grid_of(s.N * s.K * s.CT), s.bx * s.by, 0, current_stream(),
      p, s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, int64_t num_groups,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& bias, int64_t activation,
    double activation_param) {
  constexpr const char* op = "fastnorm::group_norm_bwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType sd = stat_dtype(dt);
  check_backward_inputs(grad_out, input, mean, rstd, op);
  const Dims d = dims_of(input, num_groups, op);
  const at::Tensor w = param(weight, input, d.C, op, "weight");
  const Activation act = activation_of(activation, activation_param, op);
  const bool use_act = act.kind != kActIdentity;  // the ACT kernels
  // the bias enters only through z = xhat * w + b: read (and checked) with an activation only
  const at::Tensor b = use_act ? param(bias, input, d.C, op, "bias") : at::Tensor();
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  const at::TensorOptions wo = x.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                 : at::empty({0}, x.options());
  if (d.N == 0) {  // nothing to reduce
    at::Tensor dw = output_mask[1] ? at::zeros({d.C}, wo) : at::empty({0}, wo);
    at::Tensor db = output_mask[2] ? at::zeros({d.C}, wo) : at::empty({0}, wo);
    return {dx, dw, db};
  }
  at::Tensor dw = output_mask[1] ? at::empty({d.C}, wo) : at::empty({0}, wo);
  at::Tensor db = output_mask[2] ? at::empty({d.C}, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dx, dw, db};
  TORCH_CHECK(mean.numel() == d.N * d.G && rstd.numel() == d.N * d.G, op,
              ": mean and rstd must have N * num_groups = ", d.N * d.G, " elements, got ",
              mean.numel(), " and ", rstd.numel());
  const at::Tensor mu = mean.to(sd).contiguous();
  const at::Tensor rs = rstd.to(sd).contiguous();
  const at::Tensor dy = grad_out.contiguous(fmt);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::group_norm_bwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    constexpr int V = kVec16<T>;
    const cudaStream_t stream = current_stream();
    const T* xp = x.data_ptr<T>();
    const void* dyp = dy.data_ptr();
    const Operand<T> dyo = operand<T>(dy);
    const A* mup = mu.data_ptr<A>();
    const A* rsp = rs.data_ptr<A>();
    at::Tensor keep;
    const A* S = nullptr;
    const A* B = nullptr;
    // 1. per-(n, c) sums (of dz with an activation)
    if (!cl) {
      groups::RowSums<T> p;
      p.x = xp;
      p.dy = dyo;
      p.mean = mup;
      p.rstd = rsp;
      // packs within a plane of HW: 16 bytes, else 8 (fp16 at 14 x 14), else single elements
      auto fits = [&](int v) {
        return d.HW % v == 0 && pack_aligned(xp, v, sizeof(T)) &&
               pack_aligned(dyp, v, dy.element_size());
      };
      if (use_act) {
        groups::RowSumsAct<T> q;
        static_cast<groups::RowSums<T>&>(q) = p;
        q.w = operand<T>(w);  // for z only (chan_mod, set by nchw_channel_sums)
        q.b = operand<T>(b);
        q.act = act;
        with_pack<T>(fits, [&](auto v) {
          nchw_channel_sums<T, decltype(v)::value, true>(q, d, keep, S, B, x);
        });
      } else {
        with_pack<T>(fits, [&](auto v) {
          nchw_channel_sums<T, decltype(v)::value, false>(p, d, keep, S, B, x);
        });
      }
    } else {
      channels::ClBwd<T> p;
      p.x = xp;
      p.dy = dyo;
      p.mean = mup;
      p.rstd = rsp;
      const bool vec = d.C % V == 0 && is_aligned(xp, 16) && is_aligned(dyp, 16);
      if (use_act) {
        channels::ClBwdAct<T> q;
        static_cast<channels::ClBwd<T>&>(q) = p;
        q.w = operand<T>(w);
        q.b = operand<T>(b);
        q.act = act;
        if (vec) cl_channel_sums<T, V, true>(q, d, keep, S, B, x);
        else cl_channel_sums<T, 1, true>(q, d, keep, S, B, x);
      } else if (vec) {
        cl_channel_sums<T, V, false>(p, d, keep, S, B, x);
      } else {
        cl_channel_sums<T, 1, false>(p, d, keep, S, B, x);
      }
    }
    // 2. dweight = sum_n S[n, c], dbias = sum_n B[n, c]
    if (output_mask[1] || output_mask[2])
      groups::launch_col_sums<T>(output_mask[1] ? S : nullptr, output_mask[2] ? B : nullptr, d.N, d.C,
                              output_mask[1] ? operand<T>(dw) : Operand<T>{},
                              output_mask[2] ? operand<T>(db) : Operand<T>{});
    if (!output_mask[0]) return;
    // 3. per-(n, g) coefficients, then dx
    at::Tensor coef = at::empty({2 * d.N * d.G}, acc_options(x));
    A* c1 = coef.data_ptr<A>();
    A* c2 = c1 + d.N * d.G;
    const A invD = A(1) / static_cast<A>(d.Cg * d.HW);
    launch(groups::gn_bwd_coef_kernel<T>, grid_of(ceil_div(d.N * d.G, 8)), 256, 0, stream,
        S, B, operand<T>(w),
        d.N, d.C, d.G, d.Cg, invD, c1, c2);
    groups::GnDx<T> p;
    p.x = xp;
    p.dy = dyo;
    p.mean = mup;
    p.rstd = rsp;
    p.c1 = c1;
    p.c2 = c2;
    p.w = operand<T>(w);
    p.dx = dx.data_ptr<T>();
    groups::GnDxAct<T> q;  // the ACT kernels' params
    static_cast<groups::GnDx<T>&>(q) = p;
    q.b = operand<T>(b);
    q.act = act;
    if (!cl) {
      const bool vec = (d.Cg * d.HW) % V == 0 && is_aligned(xp, 16) && is_aligned(dyp, 16) &&
                       is_aligned(p.dx, 16);
      if (use_act) {
        if (vec) nchw_dx<T, V, true>(q, d);
        else nchw_dx<T, 1, true>(q, d);
      } else if (vec) {
        nchw_dx<T, V, false>(p, d);
      } else {
        nchw_dx<T, 1, false>(p, d);
      }
    } else {
      const bool vec = d.C % V == 0 && is_aligned(xp, 16) && is_aligned(dyp, 16) &&
                       is_aligned(p.dx, 16);
      if (use_act) {
        if (vec) cl_dx<T, V, true>(q, d);
        else cl_dx<T, 1, true>(q, d);
      } else if (vec) {
        cl_dx<T, V, false>(p, d);
      } else {
        cl_dx<T, 1, false>(p, d);
      }
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("group_norm_bwd", TORCH_FN(fastnorm::group_norm_bwd));
}
