// fastnorm::layer_norm2d_fwd / layer_norm2d_bwd on CUDA: host side (checks, device guard, dtype
// dispatch, which family). LayerNorm over the C channels of each position of (N, C, *spatial):
//   - channels_last / channels_last_3d input, or one position per sample (S = 1): every position
//     is a row of C contiguous elements, exactly LayerNorm's rows [N * S, C]: the groups family
//     (launch/groups.h), no new kernel;
//   - otherwise (NCHW-contiguous, or made so): channels S elements apart, reduced per position by
//     the positions family (launch/positions.h, kernels/channels_positions.cuh).
// Statistics: [N * S] in (n, position) order either way. The output keeps the input's memory
// format (fastnorm/ops/common.py memory_format_of: anything else gives a contiguous output).
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "launch/groups.h"
#include "launch/positions.h"

namespace fastnorm {
namespace {

// The memory format fastnorm/ops/common.py's memory_format_of gives: the output's, and the layout
// the kernels read (rows for channels_last).
at::MemoryFormat format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

struct Shape2d {
  int64_t N = 0, C = 0, S = 1;
  int64_t positions() const { return N * S; }
};

Shape2d shape_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of shape (N, C, *) with at least 2 "
              "dimensions, got input of shape ", x.sizes());
  Shape2d s;
  s.N = x.size(0);
  s.C = x.size(1);
  for (int64_t i = 2; i < x.dim(); ++i) s.S *= x.size(i);
  return s;
}

// Rows of C contiguous elements: channels_last input, or S == 1 (then NCHW is rows too).
bool rows_layout(at::MemoryFormat fmt, const Shape2d& s) {
  return fmt != at::MemoryFormat::Contiguous || s.S == 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm2d_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::optional<at::ScalarType> out_dtype,
    int64_t activation, double activation_param) {
  constexpr const char* op = "fastnorm::layer_norm2d_fwd";
  const Activation act = activation_of(activation, activation_param, op);
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType odt = out_dtype_of(dt, out_dtype, op);
  const Shape2d s = shape_of(input, op);
  const at::Tensor w = param(weight, input, s.C, op, "weight");
  const at::Tensor b = param(bias, input, s.C, op, "bias");
  const at::MemoryFormat fmt = format_of(input);
  const at::Tensor x = input.contiguous(fmt);  // a copy only for other stride patterns
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt).memory_format(fmt));
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  const int64_t M = s.positions();
  if (M == 0) return {y, at::empty({0}, ao), at::empty({0}, ao)};
  if (s.C == 0) return {y, at::zeros({M}, ao), at::full({M}, NAN, ao)};  // as ATen: 0 and NaN
  at::Tensor mean = at::empty({M}, ao);
  at::Tensor rstd = at::empty({M}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::layer_norm2d_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    if (rows_layout(fmt, s)) {
      groups::layer_norm_rows_forward<T>(x, y, w, b, mean, rstd, M, s.C, eps, act);
    } else {
      positions::PosFwd<T> p;
      p.x = x.data_ptr<T>();
      p.y = operand<T>(y);
      p.w = operand<T>(w);
      p.b = operand<T>(b);
      p.mean = mean.data_ptr<A>();
      p.rstd = rstd.data_ptr<A>();
      p.N = s.N;
      p.C = s.C;
      p.S = s.S;
      p.eps = static_cast<A>(eps);
      p.act = act;
      positions::ln2d_forward<T>(p);
    }
  });
  return {y, mean, rstd};
}

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
    } else if (s.C > positions::kMaxBwdChannels<T>) {
      // channels too many for the positions backward's per-block parameter sums in shared
      // memory: the rows family on channels_last copies of x and dy (one extra pass each way)
      const at::Tensor xr = x.movedim(1, -1).contiguous();
      const at::Tensor dyr = dy.movedim(1, -1).contiguous();
      at::Tensor dxr = output_mask[0] ? at::empty(xr.sizes(), xr.options()) : at::Tensor();
      groups::layer_norm_rows_backward<T>(xr, dyr, mu, rs, w, output_mask[0] ? &dxr : nullptr,
                                          dw_out, db_out, M, s.C, act, b);
      if (output_mask[0]) dx.copy_(dxr.movedim(-1, 1));
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
  m.impl("layer_norm2d_fwd", TORCH_FN(fastnorm::layer_norm2d_fwd));
  m.impl("layer_norm2d_bwd", TORCH_FN(fastnorm::layer_norm2d_bwd));
}
