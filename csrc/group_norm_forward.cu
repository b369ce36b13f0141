// fastnorm::group_norm_fwd on CUDA (InstanceNorm is num_groups == C): host side.
// NCHW (contiguous) input: rows (n, g) of Cg*HW elements -> the contiguous-groups kernels
// (kernels/groups_*.cuh, launch/groups.h). channels_last / channels_last_3d input: the strided
// kernels (kernels/channels_*.cuh, launch/channels.h) read NHWC directly and write the output in
// the same memory format. Any other strides: .contiguous() first.
// The backward op is compiled apart (group_norm_backward.cu) so that ninja builds both in parallel.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "group_norm.h"
#include "kernels/channels_forward.cuh"
#include "launch/channels.h"
#include "launch/groups.h"

namespace fastnorm {
namespace {

// ---- forward -------------------------------------------------------------------------------------
// ACT: the activation epilogue p.act in the apply pass (the statistics do not see it).
template <typename T, int VEC, bool ACT>
void cl_forward_vec(channels::cl_fwd_t<T, ACT> p, const Dims& d, acc_of<T> eps, acc_of<T>* mean, acc_of<T>* rstd,
                    const at::Tensor& like) {
  using A = acc_of<T>;
  const cudaStream_t stream = current_stream();
  // The statistics' plan fixes each (n, g)'s tree and the partials' layout, which the finalize
  // reads: from the sample's shape alone (plan_cl_sums). The apply pass, elementwise, gets a wave
  // of its own kernel.
  const channels::ClShape s = channels::plan_cl_sums(d.N, d.HW, d.C, d.G, VEC);
  at::Tensor ws = at::empty({2 * s.N * s.K * s.C}, acc_options(like));
  launch(channels::cl_welford_partial_kernel<T, VEC>, grid_of(s.N * s.K * s.CT), s.bx * s.by, 0,
      stream, p.x, s, ws.data_ptr<A>(), Validity{});
  launch(channels::cl_welford_finalize_kernel<A>, grid_of(ceil_div(s.N * s.G, 8)), 256, 0, stream,
      ws.data_ptr<A>(), s, eps, mean, rstd, false, static_cast<const A*>(nullptr));
  p.mean = mean;
  p.rstd = rstd;
  p.s = channels::plan_cl(d.N, d.HW, d.C, d.G, VEC, sm_count(),
                          resident_blocks(channels::cl_apply_kernel<T, VEC, ACT>, channels::kClThreads, 0));
  launch(channels::cl_apply_kernel<T, VEC, ACT>, grid_of(p.s.N * p.s.K * p.s.CT), p.s.bx * p.s.by, 0,
      stream, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps,
    std::optional<at::ScalarType> out_dtype, int64_t activation, double activation_param) {
  constexpr const char* op = "fastnorm::group_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType odt = out_dtype_of(dt, out_dtype, op);
  const Dims d = dims_of(input, num_groups, op);
  const at::Tensor w = param(weight, input, d.C, op, "weight");
  const at::Tensor b = param(bias, input, d.C, op, "bias");
  const Activation act = activation_of(activation, activation_param, op);
  const bool use_act = act.kind != kActIdentity;  // the ACT kernels
  at::MemoryFormat fmt;
  const bool cl = channels_last_layout(input, fmt);
  const at::Tensor x = cl ? input : input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt).memory_format(fmt));
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (d.N == 0) return {y, at::empty({0, d.G}, ao), at::empty({0, d.G}, ao)};
  at::Tensor mean = at::empty({d.N, d.G}, ao);
  at::Tensor rstd = at::empty({d.N, d.G}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::group_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    if (!cl) {
      groups::RowFwd<T> p;
      p.x = x.data_ptr<T>();
      p.y = operand<T>(y);
      p.w = operand<T>(w);
      p.b = operand<T>(b);
      p.mean = mean.data_ptr<A>();
      p.rstd = rstd.data_ptr<A>();
      p.M = d.N * d.G;
      p.L = d.Cg * d.HW;
      p.eps = static_cast<A>(eps);
      p.gn.G = d.G;
      p.gn.Cg = d.Cg;
      p.gn.HW = d.HW;
      groups::row_forward<T, true>(p, x, act);  // the ACT kernels unless act is the identity
    } else {
      channels::ClFwd<T> p;
      p.x = x.data_ptr<T>();
      p.y = operand<T>(y);
      p.w = operand<T>(w);
      p.b = operand<T>(b);
      constexpr int V = kVec16<T>;
      const bool vec = d.C % V == 0 && is_aligned(p.x, 16) && is_aligned(p.y.ptr, 16);
      A* mp = mean.data_ptr<A>();
      A* rp = rstd.data_ptr<A>();
      if (use_act) {
        channels::ClFwdAct<T> q;
        static_cast<channels::ClFwd<T>&>(q) = p;
        q.act = act;
        if (vec) cl_forward_vec<T, V, true>(q, d, static_cast<A>(eps), mp, rp, x);
        else cl_forward_vec<T, 1, true>(q, d, static_cast<A>(eps), mp, rp, x);
      } else if (vec) {
        cl_forward_vec<T, V, false>(p, d, static_cast<A>(eps), mp, rp, x);
      } else {
        cl_forward_vec<T, 1, false>(p, d, static_cast<A>(eps), mp, rp, x);
      }
    }
  });
  return {y, mean, rstd};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("group_norm_fwd", TORCH_FN(fastnorm::group_norm_fwd));
}
