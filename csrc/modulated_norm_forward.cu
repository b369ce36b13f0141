// fastnorm::modulated_norm_fwd on CUDA: the AdaLN of diffusion transformers, y = norm(r) *
// (scale_offset + scale) + shift with r the input or AdaLN-Zero's gated residual sum; host side
// (checks, device guard, dtype dispatch). The cached row kernels of kernels/groups_forward.cuh with
// the MOD flag; plans and launches: launch/groups.h. The backward is compiled apart
// (modulated_norm_backward.cu) so that ninja builds the two halves in parallel.
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
#include "modulated_norm.h"

namespace fastnorm {
namespace {

template <typename T, typename X>
void modulated_forward_of(const groups::ModRowFwd<T>& p, bool rms) {
  if (rms) groups::modulated_forward<T, true, X>(p);
  else groups::modulated_forward<T, false, X>(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_norm_fwd(
    const at::Tensor& input, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& gate, double eps, double scale_offset, int64_t seg_rows,
    bool rms) {
  constexpr const char* op = "fastnorm::modulated_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  const at::ScalarType dt = input.scalar_type();
  check_float_dtype(dt, op);
  const ModShape s = modulated_shape(input, seg_rows, op);
  TORCH_CHECK(!rms || !has(bias), op, ": RMSNorm (rms=True) takes no bias");
  TORCH_CHECK(!has(gate) || has(residual), op,
              ": a gate multiplies the input added to a residual: got a gate without a residual");
  const at::Device dev = input.device();
  const std::array<int64_t, 1> cols{s.L};
  const std::array<int64_t, 2> mods{s.Q, s.L};
  const at::Tensor w = row_operand(weight, dev, dt, cols, op, "weight");
  const at::Tensor b = row_operand(bias, dev, dt, cols, op, "bias");
  const at::Tensor sc = row_operand(scale, dev, dt, mods, op, "scale");
  const at::Tensor sh = row_operand(shift, dev, dt, mods, op, "shift");
  const at::Tensor g = row_operand(gate, dev, dt, mods, op, "gate");
  const bool has_res = has(residual);
  if (has_res) {
    TORCH_CHECK(residual->device() == input.device(), op, ": residual is on ", residual->device(),
                " but input is on ", input.device());
    check_residual_dtype(dt, residual->scalar_type(), op, "residual");
    TORCH_CHECK(residual->sizes() == input.sizes(), op, ": expected input and residual of the same "
                "shape, got input of shape ", input.sizes(), " and residual of shape ",
                residual->sizes());
  }
  const at::Tensor x = packable(input);
  const at::Tensor res = has_res ? packable(*residual) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor res_out = has_res ? at::empty(res.sizes(), res.options()) : at::empty({0}, x.options());
  const at::TensorOptions ao = x.options().dtype(stat_dtype(dt));
  if (s.M == 0) return {y, res_out, at::empty({0}, ao), at::empty({0}, ao)};
  if (s.L == 0)
    return {y, res_out, rms ? at::empty({0}, ao) : at::zeros({s.M}, ao), at::full({s.M}, NAN, ao)};
  at::Tensor mean = rms ? at::empty({0}, ao) : at::empty({s.M}, ao);
  at::Tensor rstd = at::empty({s.M}, ao);
  FASTNORM_DISPATCH_FLOATING(dt, "fastnorm::modulated_norm_fwd", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    groups::ModRowFwd<T> p;
    p.x = x.data_ptr<T>();
    p.y = operand<T>(y);
    p.w = operand<T>(w);
    p.b = operand<T>(b);
    p.mean = rms ? nullptr : mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.M = s.M;
    p.L = s.L;
    p.eps = static_cast<A>(eps);
    p.scale = operand<T>(sc);
    p.shift = operand<T>(sh);
    p.gate = operand<T>(g);
    p.scale_offset = static_cast<A>(scale_offset);
    p.mod_rows = seg_rows;
    if (!has_res) {
      modulated_forward_of<T, void>(p, rms);
      return;
    }
    p.res = operand<T>(res);
    p.res_out = operand<T>(res_out);
    if constexpr (sizeof(T) == 2) {
      if (res.scalar_type() != dt) {  // an fp32 residual stream with a half input
        modulated_forward_of<T, float>(p, rms);
        return;
      }
    }
    modulated_forward_of<T, T>(p, rms);
  });
  return {y, res_out, mean, rstd};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("modulated_norm_fwd", TORCH_FN(fastnorm::modulated_norm_fwd));
}
