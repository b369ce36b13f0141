// fastnorm::modulated_norm_bwd on CUDA: host side (checks, device guard, dtype dispatch) of the
// cached row backward with the MOD flag (kernels/groups_backward.cuh ModRowBwd says what it
// computes per token and per segment); the per-segment sums become dscale, dshift, dweight and
// dbias here, with ATen operations on [Q, L] tensors (Q modulation rows: a few per batch).
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>
#include <tuple>

#include "launch/groups.h"
#include "layer_norm.h"
#include "modulated_norm.h"

namespace fastnorm {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads modulated_norm_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
                         const at::Tensor& x_in, const std::optional<at::Tensor>& input,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& gate, const at::Tensor& mean,
                         const at::Tensor& rstd, double scale_offset, int64_t seg_rows, bool rms,
                         bool residual, at::ScalarType input_dtype, at::ScalarType mod_dtype,
                         std::array<bool, 7> output_mask) {
  constexpr const char* op = "fastnorm::modulated_norm_bwd";
  check_kernel_device(x_in, op);
  DeviceGuard guard(x_in.device());
  const at::ScalarType dt = input_dtype;
  check_float_dtype(dt, op);
  const ModShape s = modulated_shape(x_in, seg_rows, op);
  const at::ScalarType xd = x_in.scalar_type();
  if (residual) check_residual_dtype(dt, xd, op, "x (residual_out)");
  else TORCH_CHECK(xd == dt, op, ": expected x of input_dtype (", dt, "), got ", xd);
  TORCH_CHECK(mod_dtype == dt || mod_dtype == at::kFloat, op,
              ": mod_dtype must be the input's dtype (", dt, ") or float32, got ", mod_dtype);
  TORCH_CHECK(!rms || !has(bias), op, ": RMSNorm (rms=True) takes no bias");
  TORCH_CHECK(!has(gate) || residual, op, ": a gate needs residual=True");
  TORCH_CHECK(grad_out.device() == x_in.device() && mean.device() == x_in.device() &&
                  rstd.device() == x_in.device(),
              op, ": all tensors must be on ", x_in.device());
  TORCH_CHECK(grad_out.sizes() == x_in.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but x has shape ", x_in.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dt || grad_out.scalar_type() == at::kFloat, op,
              ": grad_out must have the input's dtype (", dt, ") or float32, got ",
              grad_out.scalar_type());
  const bool has_gr = residual && has(grad_residual_out);
  if (has_gr) {
    TORCH_CHECK(grad_residual_out->device() == x_in.device() &&
                    grad_residual_out->sizes() == x_in.sizes() &&
                    grad_residual_out->scalar_type() == xd,
                op, ": expected grad_residual_out of x's shape ", x_in.sizes(), " and dtype ", xd,
                ", got shape ", grad_residual_out->sizes(), " and dtype ",
                grad_residual_out->scalar_type());
  }
  const at::Device dev = x_in.device();
  const std::array<int64_t, 1> cols{s.L};
  const std::array<int64_t, 2> rows{s.M, s.L}, mods{s.Q, s.L};
  const at::Tensor w = row_operand(weight, dev, dt, cols, op, "weight");
  const at::Tensor b = row_operand(bias, dev, dt, cols, op, "bias");
  const at::Tensor sc = row_operand(scale, dev, dt, mods, op, "scale");
  const at::Tensor g = row_operand(gate, dev, dt, mods, op, "gate");
  // dgate = sum over each segment of d_r * input: a gated residual, its input given
  const bool want_dg = output_mask[6] && residual && g.defined();
  TORCH_CHECK(!want_dg || has(input), op, ": dgate needs the input (the branch)");
  if (want_dg) {
    TORCH_CHECK(input->device() == dev && input->scalar_type() == dt &&
                    input->sizes() == x_in.sizes(),
                op, ": expected input of x's shape ", x_in.sizes(), " and dtype ", dt,
                ", got shape ", input->sizes(), " and dtype ", input->scalar_type());
  }
  const at::TensorOptions xo = x_in.options();
  const at::TensorOptions mo = xo.dtype(mod_dtype);
  const at::TensorOptions wo = xo.dtype(w.defined() ? w.scalar_type() : dt);
  const at::TensorOptions bo = xo.dtype(b.defined() ? b.scalar_type() : dt);
  auto out = [&](bool want, at::IntArrayRef shape, const at::TensorOptions& o, bool zero) {
    if (!want) return at::empty({0}, o);
    return zero ? at::zeros(shape, o) : at::empty(shape, o);
  };
  const bool empty = s.M == 0 || s.L == 0;
  at::Tensor dx = out(output_mask[0], rows, xo.dtype(dt), false);
  at::Tensor dres = out(output_mask[5] && residual, rows, xo, false);
  if (empty) {
    return {dx, out(output_mask[1], mods, mo, true), out(output_mask[2], mods, mo, true),
            out(output_mask[3], cols, wo, true), out(output_mask[4], cols, bo, true), dres,
            out(output_mask[6], mods, mo, true)};
  }
  const at::ScalarType sd = stat_dtype(dt);
  TORCH_CHECK(rstd.numel() == s.M && (rms || mean.numel() == s.M), op, ": mean and rstd must have ",
              s.M, " elements (one per row; mean unused with rms=True), got ", mean.numel(),
              " and ", rstd.numel());
  const at::Tensor mu = rms ? at::Tensor() : mean.to(sd).contiguous();
  const at::Tensor rs = rstd.to(sd).contiguous();
  const at::Tensor x = packable(x_in);
  const at::Tensor dy = packable(grad_out);
  const at::Tensor gr = has_gr ? packable(*grad_residual_out) : at::Tensor();
  const at::Tensor xin = want_dg ? packable(*input) : at::Tensor();
  const bool per_token = seg_rows == 1;
  const at::TensorOptions ao = xo.dtype(sd);
  // per token: dscale stored by the kernel, dshift = dy, dweight / dbias its column sums;
  // per segment: the sums A = sum(dy * xhat) and B = sum(dy) of each segment, [Q, L]
  at::Tensor dscale = out(output_mask[1] && per_token, mods, mo, false);
  at::Tensor dgate = out(output_mask[6], mods, mo, !want_dg);
  at::Tensor dweight = out(output_mask[3] && per_token, cols, wo, false);
  at::Tensor dbias = out(output_mask[4] && per_token, cols, bo, false);
  const bool want_a = !per_token && (output_mask[1] || output_mask[3]);
  const bool want_b =
      !per_token && (output_mask[2] || output_mask[4] || (output_mask[1] && b.defined()));
  at::Tensor sum_a = want_a ? at::empty(mods, ao) : at::Tensor();
  at::Tensor sum_b = want_b ? at::empty(mods, ao) : at::Tensor();
  const bool run = output_mask[0] || (output_mask[5] && residual) || output_mask[1] ||
                   output_mask[3] || output_mask[4] || (output_mask[2] && !per_token) || want_dg;
  if (run) {
    FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::modulated_norm_bwd", [&] {
      using T = scalar_t;
      using A = acc_of<T>;
      groups::ModRowBwd<T> p;
      p.dy = operand<T>(dy);
      p.mean = rms ? nullptr : mu.data_ptr<A>();
      p.rstd = rs.data_ptr<A>();
      p.w = operand<T>(w);
      p.b = operand<T>(b);
      p.scale = operand<T>(sc);
      p.gate = operand<T>(g);
      p.dscale = operand<T>(dscale.numel() > 0 ? dscale : at::Tensor());
      p.input = want_dg ? xin.data_ptr<T>() : nullptr;
      p.dgate = per_token && want_dg ? operand<T>(dgate) : Operand<T>{};
      const Operand<T> c3 = !per_token && want_dg ? operand<T>(dgate) : Operand<T>{};
      p.scale_offset = static_cast<A>(scale_offset);
      p.mod_rows = seg_rows;
      p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
      p.dres = output_mask[5] && residual ? dres.data_ptr() : nullptr;
      p.dres_in = has_gr ? gr.data_ptr() : nullptr;
      p.M = s.M;
      p.L = s.L;
      const Operand<T> c1 = per_token ? (output_mask[3] ? operand<T>(dweight) : Operand<T>{})
                                      : (want_a ? operand<T>(sum_a) : Operand<T>{});
      const Operand<T> c2 = per_token ? (output_mask[4] ? operand<T>(dbias) : Operand<T>{})
                                      : (want_b ? operand<T>(sum_b) : Operand<T>{});
      if constexpr (sizeof(T) == 2) {
        if (xd != dt) {  // an fp32 residual stream with a half input
          p.x32 = x.data_ptr<float>();
          groups::modulated_backward<T, float>(p, c1, c2, c3, x);
          return;
        }
      }
      p.x = x.data_ptr<T>();
      groups::modulated_backward<T, T>(p, c1, c2, c3, x);
    });
  }
  at::Tensor dshift = at::empty({0}, mo);
  if (per_token) {
    if (output_mask[2]) dshift = grad_out.to(mod_dtype, /*non_blocking=*/false, /*copy=*/true);
    return {dx, dscale, dshift, dweight, dbias, dres, dgate};
  }
  // per segment: m_q = scale_offset + scale_q is constant over the segment's rows
  if (output_mask[1]) {
    at::Tensor d = w.defined() ? sum_a.mul(w.to(sd)) : sum_a;
    if (b.defined()) d = d.add(sum_b.mul(b.to(sd)));
    dscale = d.to(mod_dtype).contiguous();
  }
  if (output_mask[2]) dshift = sum_b.to(mod_dtype, false, true);
  if (output_mask[3] || output_mask[4]) {
    const at::Tensor m = sc.defined() ? sc.to(sd).add(scale_offset) : at::Tensor();
    auto weighted_sum = [&](const at::Tensor& t, const at::TensorOptions& o) {
      const at::Tensor sum = m.defined() ? t.mul(m).sum(0) : t.sum(0).mul(scale_offset);
      return sum.to(o.dtype().toScalarType()).contiguous();
    };
    if (output_mask[3]) dweight = weighted_sum(sum_a, wo);
    if (output_mask[4]) dbias = weighted_sum(sum_b, bo);
  }
  return {dx, dscale, dshift, dweight, dbias, dres, dgate};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("modulated_norm_bwd", TORCH_FN(fastnorm::modulated_norm_bwd));
}
