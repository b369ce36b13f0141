// fastnorm::layer_norm2d_fwd / layer_norm2d_bwd on CUDA: host side (checks, device guard, dtype
// dispatch, which family). LayerNorm over the C channels of each position of (N, C, *spatial):
//   - channels_last / channels_last_3d input, or one position per sample (S = 1): every position
//     is a row of C contiguous elements, exactly LayerNorm's rows [N * S, C]: the groups family
//     (launch/groups.h), no new kernel;
//   - otherwise (NCHW-contiguous, or made so): channels S elements apart, reduced per position by
//     the positions family (launch/positions.h, kernels/channels_positions.cuh).
// Statistics: [N * S] in (n, position) order either way. The output keeps the input's memory
// format (fastnorm/ops/common.py memory_format_of: anything else gives a contiguous output).
// This unit: the forward op; the backward op is compiled apart (layer_norm2d_backward.cu), so ninja
// builds the two in parallel.
#include "layer_norm2d.h"

namespace fastnorm {
namespace {

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

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("layer_norm2d_fwd", TORCH_FN(fastnorm::layer_norm2d_fwd));
}
