// fastnorm::layer_norm_fwd / layer_norm_bwd on CUDA: host side (checks, device guard, dtype
// dispatch). Kernels: kernels/groups_*.cuh; plans and launches: launch/groups.h.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "launch/groups.h"

namespace fastnorm {
namespace {



// N = prod(normalized_shape), which must be the trailing dims of x.
int64_t row_length(const at::Tensor& x, at::IntArrayRef ns, const char* op) {
  const int64_t k = static_cast<int64_t>(ns.size());
  TORCH_CHECK(k >= 1 && k <= x.dim(), op, ": normalized_shape ", ns,
              " must name 1 to input.dim() trailing dims of an input of shape ", x.sizes());
  int64_t n = 1;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(x.size(x.dim() - k + i) == ns[i], op, ": expected input with trailing shape ", ns,
                ", got input of shape ", x.sizes());
    n *= ns[i];
  }
  return n;
}

int64_t leading_rows(const at::Tensor& x, int64_t k) {
  int64_t m = 1;
  for (int64_t i = 0; i < x.dim() - k; ++i) m *= x.size(i);
  return m;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "fastnorm::layer_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const at::ScalarType odt = out_dtype.value_or(dt);
  TORCH_CHECK(odt == dt || odt == at::kFloat, op, ": out_dtype must be the input's dtype (", dt,
              ") or float32, got ", odt);
  const int64_t N = row_length(input, normalized_shape, op);
  const int64_t M = leading_rows(input, static_cast<int64_t>(normalized_shape.size()));
  const at::Tensor w = param(weight, input, N, op, "weight");
  const at::Tensor b = param(bias, input, N, op, "bias");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(odt));
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (M == 0) return {y, at::empty({0}, ao), at::empty({0}, ao)};
  if (N == 0) return {y, at::zeros({M}, ao), at::full({M}, NAN, ao)};  // as ATen: 0 and NaN
  at::Tensor mean = at::empty({M}, ao);
  at::Tensor rstd = at::empty({M}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::layer_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowFwd<T> p;
    p.x = x.data_ptr<T>();
    p.y = operand<T>(y);
    p.w = operand<T>(w);
    p.b = operand<T>(b);
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.M = M;
    p.L = N;
    p.eps = static_cast<A>(eps);
    groups::row_forward<T, false>(p, x);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    at::IntArrayRef normalized_shape, std::array<bool, 3> output_mask) {
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
    using T = scalar_t;
    using A = acc_of<T>;
    groups::RowBwd<T> p;
    p.x = x.data_ptr<T>();
    p.dy = operand<T>(dy);
    p.mean = mu.data_ptr<A>();
    p.rstd = rs.data_ptr<A>();
    p.w = operand<T>(w);
    p.dx = output_mask[0] ? dx.data_ptr<T>() : nullptr;
    p.M = M;
    p.L = N;
    groups::ln_backward<T>(p, output_mask[1] ? operand<T>(dw) : Operand<T>{},
                        output_mask[2] ? operand<T>(db) : Operand<T>{}, x);
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("layer_norm_fwd", TORCH_FN(fastnorm::layer_norm_fwd));
  m.impl("layer_norm_bwd", TORCH_FN(fastnorm::layer_norm_bwd));
}
