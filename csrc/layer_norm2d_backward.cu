// fastnorm::layer_norm2d_fwd / layer_norm2d_bwd on CUDA: host side (checks, device guard, dtype
// dispatch, which family). LayerNorm over the C channels of each position of (N, C, *spatial):
//   - channels_last / channels_last_3d input, or one position per sample (S = 1): every position
//     is a row of C contiguous elements, exactly LayerNorm's rows [N * S, C]: the groups family
//     (launch/groups.h), no new kernel;
//   - otherwise (NCHW-contiguous, or made so): channels S elements apart, reduced per position by
//     the positions family (launch/positions.h, kernels/channels_positions.cuh).
// Statistics: [N * S] in (n, position) order either way. The output keeps the input's memory
// format (fastnorm/ops/common.py memory_format_of: anything else gives a contiguous output).
// This unit: the backward op; the forward op is compiled apart (layer_norm2d_forward.cu), so ninja
// builds the two in parallel.
#include "layer_norm2d.h"

namespace fastnorm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& bias, int64_t activation,
    double activation_param) {
  constexpr const char* op = "fastnorm::layer_norm2d_bwd";
  const Activation act = activation_of(activation, activation_param, op);
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType sd = stat_dtype(dt);
  check_backward_inputs(grad_out, input, mean, rstd, op);
  const Shape2d s = shape_of(input, op);
  const at::Tensor w = param(weight, input, s.C, op, "weight");
  // the bias only shapes z for the activation's derivative: ignored without one
  const at::Tensor b =
      act.kind != kActIdentity ? param(bias, input, s.C, op, "bias") : at::Tensor();
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  const at::MemoryFormat fmt = format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const at::TensorOptions wo = x.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                 : at::empty({0}, x.options());
  const int64_t M = s.positions();
  at::Tensor dw, db;
  if (M == 0 || s.C == 0) {  // nothing to reduce: zero (or empty) parameter gradients
    dw = output_mask[1] ? at::zeros({s.C}, wo) : at::empty({0}, wo);
    db = output_mask[2] ? at::zeros({s.C}, wo) : at::empty({0}, wo);
    return {dx, dw, db};
  }
  dw = output_mask[1] ? at::empty({s.C}, wo) : at::empty({0}, wo);
  db = output_mask[2] ? at::empty({s.C}, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dx, dw, db};
  TORCH_CHECK(mean.numel() == M && rstd.numel() == M, op, ": mean and rstd must have ", M,
              " elements (one per position of input of shape ", input.sizes(), "), got ",
              mean.numel(), " and ", rstd.numel());
  const at::Tensor mu = mean.to(sd).contiguous();
  const at::Tensor rs = rstd.to(sd).contiguous();
  const at::Tensor dy = grad_out.contiguous(fmt);  // x's layout
  const at::Tensor dw_out = output_mask[1] ? dw : at::Tensor();
  const at::Tensor db_out = output_mask[2] ? db : at::Tensor();
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::layer_norm2d_bwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    if (rows_layout(fmt, s)) {
      groups::layer_norm_rows_backward<T>(x, dy, mu, rs, w, output_mask[0] ? &dx : nullptr, dw_out,
                                          db_out, M, s.C, act, b);
    } else {
      positions::PosBwd<T> p;
      p.x = x.data_ptr<T>();
      p.dy = operand<T>(dy);
      p.mean = mu.data_ptr<A>();
      p.rstd = rs.data_ptr<A>();
      p.w = operand<T>(w);
      p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
      p.N = s.N;
      p.C = s.C;
      p.S = s.S;
      p.b = operand<T>(b);
      p.act = act;
      positions::ln2d_backward<T>(p, dw_out.defined() ? operand<T>(dw_out) : Operand<T>{},
                                  db_out.defined() ? operand<T>(db_out) : Operand<T>{}, x);
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("layer_norm2d_bwd", TORCH_FN(fastnorm::layer_norm2d_bwd));
}
