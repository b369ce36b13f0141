// fastnorm::layer_norm_bwd, rms_norm_bwd and add_norm_bwd on CUDA: host side (checks, device
// guard, dtype dispatch). They run the row kernels of kernels/groups_backward.cuh; plans and
// launches: launch/groups.h. The forward ops: layer_norm_forward.cu.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    at::IntArrayRef normalized_shape, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& bias, int64_t activation, double activation_param) {
  constexpr const char* op = "fastnorm::layer_norm_bwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType sd = stat_dtype(dt);
  check_backward_inputs(grad_out, input, mean, rstd, op);
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const Activation act = activation_of(activation, activation_param, op);
  // the bias enters only through z = xhat * w + b: read (and checked) with an activation only
  const at::Tensor b = act.kind != kActIdentity ? param(bias, input, N, op, "bias") : at::Tensor();
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  const at::Tensor x = input.contiguous();
  const at::TensorOptions wo = x.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dw, db;
  if (M == 0 || N == 0) {  // nothing to reduce: zero (or empty) parameter gradients
    dw = output_mask[1] ? at::zeros(normalized_shape, wo) : at::empty({0}, wo);
    db = output_mask[2] ? at::zeros(normalized_shape, wo) : at::empty({0}, wo);
    return {dx, dw, db};
  }
  dw = output_mask[1] ? at::empty(normalized_shape, wo) : at::empty({0}, wo);
  db = output_mask[2] ? at::empty(normalized_shape, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dx, dw, db};
  TORCH_CHECK(mean.numel() == M && rstd.numel() == M, op, ": mean and rstd must have ", M,
              " elements (one per row), got ", mean.numel(), " and ", rstd.numel());
  const at::Tensor mu = mean.to(sd).contiguous();
  const at::Tensor rs = rstd.to(sd).contiguous();
  const at::Tensor dy = grad_out.contiguous();
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::layer_norm_bwd", [&] {
    groups::layer_norm_rows_backward<scalar_t>(x, dy, mu, rs, w, output_mask[0] ? &dx : nullptr,
                                               output_mask[1] ? dw : at::Tensor(),
                                               output_mask[2] ? db : at::Tensor(), M, N, act, b);
  });
  return {dx, dw, db};
}

// ---- RMSNorm -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight,
                                                at::IntArrayRef normalized_shape,
                                                std::array<bool, 2> output_mask) {
  constexpr const char* op = "fastnorm::rms_norm_bwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  check_backward_inputs(grad_out, input, rstd, rstd, op);
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  const at::Tensor x = input.contiguous();
  const at::TensorOptions wo = x.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (M == 0 || N == 0)
    return {dx, output_mask[1] ? at::zeros(normalized_shape, wo) : at::empty({0}, wo)};
  at::Tensor dw = output_mask[1] ? at::empty(normalized_shape, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1]) return {dx, dw};
  TORCH_CHECK(rstd.numel() == M, op, ": rstd must have ", M, " elements (one per row), got ",
              rstd.numel());
  const at::Tensor rs = rstd.to(stat_dtype(dt)).contiguous();
  const at::Tensor dy = grad_out.contiguous();
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::rms_norm_bwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowBwd<T> p;
    p.x = x.data_ptr<T>();
    p.dy = operand<T>(dy);
    p.mean = nullptr;  // RMSNorm
    p.rstd = rs.data_ptr<A>();
    p.w = operand<T>(w);
    p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
    p.M = M;
    p.L = N;
    groups::ln_backward<T>(p, output_mask[1] ? operand<T>(dw) : Operand<T>{}, Operand<T>{}, x);
  });
  return {dx, dw};
}

// ---- input + residual, then LayerNorm or RMSNorm ------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, at::IntArrayRef normalized_shape, bool rms,
    at::ScalarType input_dtype, std::array<bool, 4> output_mask) {
  constexpr const char* op = "fastnorm::add_norm_bwd";
  check_kernel_device(residual_out, op);
  DeviceGuard guard(residual_out.device());
  const at::ScalarType dt = input_dtype;
  check_float_dtype(dt, op);
  const at::ScalarType rd = residual_out.scalar_type();
  check_residual_dtype(dt, rd, op, "residual_out");
  TORCH_CHECK(grad_out.device() == residual_out.device() && mean.device() == residual_out.device() &&
                  rstd.device() == residual_out.device(),
              op, ": all tensors must be on ", residual_out.device());
  TORCH_CHECK(grad_out.sizes() == residual_out.sizes(), op, ": grad_out has shape ",
              grad_out.sizes(), " but residual_out has shape ", residual_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dt || grad_out.scalar_type() == at::kFloat, op,
              ": grad_out must have the input's dtype (", dt, ") or float32, got ",
              grad_out.scalar_type());
  const bool has_gr = has(grad_residual_out);
  if (has_gr) {
    TORCH_CHECK(grad_residual_out->device() == residual_out.device(), op,
                ": grad_residual_out is on ", grad_residual_out->device(), " but residual_out is on ",
                residual_out.device());
    TORCH_CHECK(grad_residual_out->sizes() == residual_out.sizes(), op,
                ": grad_residual_out has shape ", grad_residual_out->sizes(),
                " but residual_out has shape ", residual_out.sizes());
    TORCH_CHECK(grad_residual_out->scalar_type() == rd, op,
                ": grad_residual_out must have residual_out's dtype (", rd, "), got ",
                grad_residual_out->scalar_type());
  }
  const int64_t N = row_length(residual_out, normalized_shape, op);
  const int64_t M = leading_rows(residual_out, static_cast<int64_t>(normalized_shape.size()));
  TORCH_CHECK(!has(weight) || weight->device() == residual_out.device(), op, ": weight is on ",
              weight->device(), " but residual_out is on ", residual_out.device());
  TORCH_CHECK(!has(weight) || weight->scalar_type() == dt || weight->scalar_type() == at::kFloat, op,
              ": weight must have the input's dtype (", dt, ") or float32, got ",
              weight->scalar_type());
  TORCH_CHECK(!has(weight) || weight->numel() == N, op, ": weight must have ", N,
              " elements, got ", weight->numel());
  const at::Tensor w = has(weight) ? weight->contiguous() : at::Tensor();
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  const at::Tensor r = residual_out.contiguous();
  const at::TensorOptions wo = r.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(r.sizes(), r.options().dtype(dt))
                                 : at::empty({0}, r.options().dtype(dt));
  at::Tensor dres = output_mask[1] ? at::empty(r.sizes(), r.options()) : at::empty({0}, r.options());
  const bool want_db = output_mask[3] && !rms;
  if (M == 0 || N == 0) {
    return {dx, dres, output_mask[2] ? at::zeros(normalized_shape, wo) : at::empty({0}, wo),
            want_db ? at::zeros(normalized_shape, wo) : at::empty({0}, wo)};
  }
  at::Tensor dw = output_mask[2] ? at::empty(normalized_shape, wo) : at::empty({0}, wo);
  at::Tensor db = want_db ? at::empty(normalized_shape, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !want_db) return {dx, dres, dw, db};
  const at::ScalarType sd = stat_dtype(dt);
  TORCH_CHECK(rstd.numel() == M && (rms || mean.numel() == M), op, ": mean and rstd must have ", M,
              " elements (one per row; mean unused with rms=True), got ", mean.numel(), " and ",
              rstd.numel());
  const at::Tensor mu = rms ? at::Tensor() : mean.to(sd).contiguous();
  const at::Tensor rs = rstd.to(sd).contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor gr = has_gr ? grad_residual_out->contiguous() : at::Tensor();
  const bool res32 = rd != dt;
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::add_norm_bwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowBwd<T> p;
    p.dy = operand<T>(dy);
    p.mean = rms ? nullptr : mu.data_ptr<A>();
    p.rstd = rs.data_ptr<A>();
    p.w = operand<T>(w);
    p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
    p.dres = output_mask[1] ? dres.data_ptr() : nullptr;
    p.dres_in = has_gr ? gr.data_ptr() : nullptr;
    p.M = M;
    p.L = N;
    const Operand<T> dw_out = output_mask[2] ? operand<T>(dw) : Operand<T>{};
    const Operand<T> db_out = want_db ? operand<T>(db) : Operand<T>{};
    if constexpr (sizeof(T) == 2) {
      if (res32) {
        p.x32 = r.data_ptr<float>();
        groups::ln_backward<T, float>(p, dw_out, db_out, r);
        return;
      }
    }
    p.x = r.data_ptr<T>();
    groups::ln_backward<T>(p, dw_out, db_out, r);
  });
  return {dx, dres, dw, db};
}

// ---- gated RMSNorm --------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& gate,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, int64_t group_size,
    bool norm_before_gate, int64_t activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "fastnorm::gated_rms_norm_bwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  check_backward_inputs(grad_out, input, rstd, rstd, op);
  const GatedShape s = gated_shape(input, gate, group_size, activation, groups::kGatedMaxGroup, op);
  const at::Tensor w = param(weight, input, s.H, op, "weight");
  const bool want_dw = output_mask[2] && w.defined();
  const at::ScalarType wd = w.defined() ? w.scalar_type() : dt;
  const at::Tensor x = input.contiguous();
  const at::Tensor g = gate.contiguous();
  const at::TensorOptions xo = x.options(), wo = x.options().dtype(wd);
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), xo) : at::empty({0}, xo);
  at::Tensor dg = output_mask[1] ? at::empty(x.sizes(), xo) : at::empty({0}, xo);
  if (s.M == 0 || s.H == 0)
    return {dx, dg, want_dw ? at::zeros({s.H}, wo) : at::empty({0}, wo)};
  at::Tensor dw = want_dw ? at::empty({s.H}, wo) : at::empty({0}, wo);
  if (!output_mask[0] && !output_mask[1] && !want_dw) return {dx, dg, dw};
  TORCH_CHECK(rstd.numel() == s.M * s.G, op, ": rstd must have ", s.M * s.G,
              " elements (one per row and group), got ", rstd.numel());
  const at::Tensor rs = rstd.to(stat_dtype(dt)).contiguous();
  const at::Tensor dy = grad_out.contiguous();
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::gated_rms_norm_bwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::GatedRowBwd<T> p;
    p.x = x.data_ptr<T>();
    p.gate = g.data_ptr<T>();
    p.dy = operand<T>(dy);
    p.mean = nullptr;  // RMSNorm
    p.rstd = rs.data_ptr<A>();
    p.w = operand<T>(w);
    p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
    p.dgate = output_mask[1] ? dg.data_ptr<T>() : nullptr;
    p.M = s.M;
    p.L = group_size;
    p.ld = s.H;
    p.gate_silu = activation == kActSilu;
    const Operand<T> dw_out = want_dw ? operand<T>(dw) : Operand<T>{};
    if (norm_before_gate) groups::gated_backward<T, groups::kGateAfter>(p, s.G, dw_out, x);
    else groups::gated_backward<T, groups::kGateFirst>(p, s.G, dw_out, x);
  });
  return {dx, dg, dw};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("gated_rms_norm_bwd", TORCH_FN(fastnorm::gated_rms_norm_bwd));
  m.impl("layer_norm_bwd", TORCH_FN(fastnorm::layer_norm_bwd));
  m.impl("rms_norm_bwd", TORCH_FN(fastnorm::rms_norm_bwd));
  m.impl("add_norm_bwd", TORCH_FN(fastnorm::add_norm_bwd));
}
