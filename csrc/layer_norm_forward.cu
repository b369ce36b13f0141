// fastnorm::layer_norm_fwd, rms_norm_fwd and add_norm_fwd (LayerNorm or RMSNorm of input +
// residual) on CUDA: host side (checks, device guard, dtype dispatch). They run the row kernels of
// kernels/groups_forward.cuh; plans and launches: launch/groups.h. The backward ops are compiled
// apart (layer_norm_backward.cu) so that ninja builds the two halves in parallel.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "launch/groups.h"
#include "layer_norm.h"

namespace fastnorm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    std::optional<at::ScalarType> out_dtype, int64_t activation, double activation_param) {
  constexpr const char* op = "fastnorm::layer_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType odt = out_dtype_of(dt, out_dtype, op);
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const at::Tensor b = param(bias, input, N, op, "bias");
  const Activation act = activation_of(activation, activation_param, op);
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt));
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (M == 0) return {y, at::empty({0}, ao), at::empty({0}, ao)};
  if (N == 0) return {y, at::zeros({M}, ao), at::full({M}, NAN, ao)};  // as ATen: 0 and NaN
  at::Tensor mean = at::empty({M}, ao);
  at::Tensor rstd = at::empty({M}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::layer_norm_fwd", [&] {
    groups::layer_norm_rows_forward<scalar_t>(x, y, w, b, mean, rstd, M, N, eps, act);
  });
  return {y, mean, rstd};
}

// ---- RMSNorm -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& input,
                                                at::IntArrayRef normalized_shape,
                                                const std::optional<at::Tensor>& weight, double eps,
                                                std::optional<at::ScalarType> out_dtype,
                                                bool round_normalized) {
  constexpr const char* op = "fastnorm::rms_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType odt = out_dtype_of(dt, out_dtype, op);
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt));
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (M == 0) return {y, at::empty({0}, ao)};
  if (N == 0) return {y, at::full({M}, NAN, ao)};  // 1 / sqrt(mean of no elements + eps)
  at::Tensor rstd = at::empty({M}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::rms_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowFwd<T> p;
    p.x = x.data_ptr<T>();
    p.y = operand<T>(y);
    p.w = operand<T>(w);
    p.rstd = rstd.data_ptr<A>();
    p.M = M;
    p.L = N;
    p.eps = static_cast<A>(eps);
    p.round_xhat = round_normalized;
    groups::row_forward<T, false, true>(p, x);
  });
  return {y, rstd};
}

// ---- input + residual, then LayerNorm or RMSNorm ------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd(
    const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  constexpr const char* op = "fastnorm::add_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  TORCH_CHECK(residual.device() == input.device(), op, ": residual is on ", residual.device(),
              " but input is on ", input.device());
  check_residual_dtype(dt, residual.scalar_type(), op, "residual");
  TORCH_CHECK(residual.sizes() == input.sizes(), op, ": expected input and residual of the same "
              "shape, got input of shape ", input.sizes(), " and residual of shape ",
              residual.sizes());
  TORCH_CHECK(!rms || !has(bias), op, ": RMSNorm (rms=True) takes no bias");
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const at::Tensor b = param(bias, input, N, op, "bias");
  const at::Tensor x = input.contiguous();
  const at::Tensor res = residual.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor res_out = at::empty(res.sizes(), res.options());
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (M == 0) return {y, res_out, at::empty({0}, ao), at::empty({0}, ao)};
  if (N == 0)
    return {y, res_out, rms ? at::empty({0}, ao) : at::zeros({M}, ao), at::full({M}, NAN, ao)};
  at::Tensor mean = rms ? at::empty({0}, ao) : at::empty({M}, ao);
  at::Tensor rstd = at::empty({M}, ao);
  const bool res32 = res.scalar_type() != dt;  // an fp32 residual stream with a half input
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::add_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowFwd<T> p;
    p.x = x.data_ptr<T>();
    p.y = operand<T>(y);
    p.w = operand<T>(w);
    p.b = operand<T>(b);
    p.res = operand<T>(res);
    p.res_out = operand<T>(res_out);
    p.mean = rms ? nullptr : mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.M = M;
    p.L = N;
    p.eps = static_cast<A>(eps);
    if constexpr (sizeof(T) == 2) {
      if (res32) {
        if (rms) groups::row_forward<T, false, true, float>(p, x);
        else groups::row_forward<T, false, false, float>(p, x);
        return;
      }
    }
    if (rms) groups::row_forward<T, false, true, T>(p, x);
    else groups::row_forward<T, false, false, T>(p, x);
  });
  return {y, res_out, mean, rstd};
}

// ---- gated RMSNorm --------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> gated_rms_norm_fwd(
    const at::Tensor& input, const at::Tensor& gate, const std::optional<at::Tensor>& weight,
    double eps, int64_t group_size, bool norm_before_gate, int64_t activation,
    bool round_normalized) {
  constexpr const char* op = "fastnorm::gated_rms_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const GatedShape s = gated_shape(input, gate, group_size, activation, groups::kGatedMaxGroup, op);
  const at::Tensor w = param(weight, input, s.H, op, "weight");
  // the Llama rounding before a float32 weight promotes the output, as `weight * x.to(dtype)`
  const bool promote = !norm_before_gate && round_normalized && w.defined();
  const at::ScalarType odt = promote ? c10::promoteTypes(dt, w.scalar_type()) : dt;
  const at::Tensor x = input.contiguous();
  const at::Tensor g = gate.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt));
  at::Tensor rstd = at::empty({s.M * s.G}, x.options().dtype(stat_dtype(dt)));
  if (s.M == 0 || s.H == 0) return {y, rstd};
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::gated_rms_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::GatedRowFwd<T> p;
    p.x = x.data_ptr<T>();
    p.gate = g.data_ptr<T>();
    p.y = operand<T>(y);
    p.w = operand<T>(w);
    p.rstd = rstd.data_ptr<A>();
    p.M = s.M;
    p.L = group_size;
    p.ld = s.H;
    p.eps = static_cast<A>(eps);
    p.round_xhat = round_normalized;
    p.gate_silu = activation == kActSilu;
    // `weight * x_n.to(dtype)` stays in T for a weight of T (or none): rounded before the gate
    p.round_n = round_normalized && (!w.defined() || w.scalar_type() == dt);
    if (norm_before_gate) groups::gated_forward<T, groups::kGateAfter>(p, s.G);
    else groups::gated_forward<T, groups::kGateFirst>(p, s.G);
  });
  return {y, rstd};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("gated_rms_norm_fwd", TORCH_FN(fastnorm::gated_rms_norm_fwd));
  m.impl("layer_norm_fwd", TORCH_FN(fastnorm::layer_norm_fwd));
  m.impl("rms_norm_fwd", TORCH_FN(fastnorm::rms_norm_fwd));
  m.impl("add_norm_fwd", TORCH_FN(fastnorm::add_norm_fwd));
}
