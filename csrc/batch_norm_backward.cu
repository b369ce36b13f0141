// BatchNorm forward/backward: host side (checks, device guard, layout, dtype dispatch, launch).
// Kernels and their design: kernels/channels_*.cuh; plans: launch/channels.h. Op contract: docs/ops.md.
// This unit: the backward op; the forward op is compiled apart (batch_norm_forward.cu), so ninja
// builds the two in parallel.
#include "batch_norm.h"

namespace fastnorm {
namespace {

// ------------------------------------------------------------------------------------------
// Backward launches.

// D: dy's dtype (scalar_t, or float with V == 1: kernels/channels_backward.cuh).
template <typename scalar_t, int V, bool ACT, typename D = scalar_t>
void launch_bwd(const Layout& l, const Tensor& dy, const Tensor& dx, bool need_sums,
                channels::BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  const cudaStream_t stream = current_stream();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const D* dyp = static_cast<const D*>(dy.const_data_ptr());
  scalar_t* dxp = a.need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t C = l.C;
  const auto ws_opts = l.x.options().dtype(stat_dtype(l.x.scalar_type()));
  Tensor ws;

  const size_t smem = l.nhwc ? 2 * static_cast<size_t>(channels::kThreads) * V * sizeof(acc_t) : 0;
  const int per_sm =
      l.nhwc ? std::min(resident_blocks(channels::bn_bwd_sums_nhwc<scalar_t, V, ACT, D>, kThreads, smem),
                        resident_blocks(channels::bn_bwd_apply_nhwc<scalar_t, V, ACT, D>, kThreads, 0))
             : std::min(resident_blocks(channels::bn_bwd_sums_nchw<scalar_t, V, ACT, D>, kThreads, 0),
                        resident_blocks(channels::bn_bwd_apply_nchw<scalar_t, V, ACT, D>, kThreads, 0));
  const channels::BnPlan plan = channels::plan_bn(l.nhwc, l.N, l.S, C, V, per_sm);
  a.Sv = plan.Sv;
  const int64_t G = plan.G;
  const NhwcCfg k = plan.k;
  const bool fused = plan.fused;
  auto apply = [&](int64_t grid_chunks) {
    if (!l.nhwc) {
      launch(channels::bn_bwd_apply_nchw<scalar_t, V, ACT, D>,
          nchw_grid(grid_chunks, C), channels::kThreads, 0, stream,
          dyp, x, dxp, a);
    } else {
      const size_t apply_smem = a.mode == channels::kModeFused ? smem : 0;  // (as in the forward)
      launch(channels::bn_bwd_apply_nhwc<scalar_t, V, ACT, D>,
          nhwc_grid(k, grid_chunks), dim3(k.tx, k.ty), apply_smem, stream,
          dyp, x, dxp, a);
    }
  };

  if (!need_sums) {  // eval, dx only: dx = dy * w * rstd (ACT: dz * w * rstd)
    a.mode = channels::kModeEval;
    apply(G);
    return;
  }
  if (fused) {
    a.mode = channels::kModeFused;
    apply(1);
    return;
  }
  a.G1 = G;
  ws = at::empty({2 * G * C + 4 * C}, ws_opts);
  a.part = ws.mutable_data_ptr<acc_t>();
  a.coef = a.part + 2 * G * C;
  if (!l.nhwc) {
    launch(channels::bn_bwd_sums_nchw<scalar_t, V, ACT, D>, nchw_grid(G, C), channels::kThreads, 0, stream,
        dyp, x, a);
  } else {
    launch(channels::bn_bwd_sums_nhwc<scalar_t, V, ACT, D>,
        nhwc_grid(k, G), dim3(k.tx, k.ty), smem, stream,
        dyp, x, a);
  }
  const FinCfg f = finalize_cfg(C, G);
  launch(channels::bn_bwd_finalize<scalar_t>,
      f.grid, f.block, 2 * static_cast<size_t>(channels::kThreads) * sizeof(acc_t), stream,
      a);
  if (!a.need_dx) return;
  a.mode = channels::kModeFinal;
  apply(G);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_bwd(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const std::optional<Tensor>& weight_opt,
                                                  bool training, std::array<bool, 3> output_mask,
                                                  const std::optional<Tensor>& bias_opt,
                                                  int64_t activation, double activation_param) {
  const Activation act = activation_of(activation, activation_param, "fastnorm batch_norm_bwd");
  check_kernel_device(input, "fastnorm batch_norm_bwd");
  TORCH_CHECK(input.dim() >= 2, "fastnorm batch_norm_bwd: expected an input (N, C, *), got shape ",
              input.sizes());
  TORCH_CHECK(is_kernel_dtype(input.scalar_type()),
              "fastnorm batch_norm_bwd: expected a floating input, got ", input.scalar_type());
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "fastnorm batch_norm_bwd: grad_out has shape ",
              grad_out.sizes(), " but the input has shape ", input.sizes());
  TORCH_CHECK(grad_out.device() == input.device(), "fastnorm batch_norm_bwd: grad_out is on ",
              grad_out.device(), " but the input is on ", input.device());
  TORCH_CHECK(is_kernel_dtype(grad_out.scalar_type()),
              "fastnorm batch_norm_bwd: expected a floating grad_out, got ", grad_out.scalar_type());
  const int64_t C = input.size(1);
  check_channel_tensor(mean, input, C, "mean");
  check_channel_tensor(rstd, input, C, "rstd");
  Tensor weight = defined_or_empty(weight_opt);
  if (weight.defined()) check_param_tensor(weight, input, C, "weight");
  // The bias only shapes z for the activation's derivative: ignored without one.
  Tensor bias = act.kind != kActIdentity ? defined_or_empty(bias_opt) : Tensor();
  if (bias.defined()) check_param_tensor(bias, input, C, "bias");

  DeviceGuard guard(input.device());
  const auto acc_type = stat_dtype(input.scalar_type());
  const at::ScalarType w_dtype = weight.defined() ? weight.scalar_type() : input.scalar_type();
  const Layout l = make_layout(input);
  const bool need_dx = output_mask[0];
  const bool need_sums = (training && need_dx) || output_mask[1] || output_mask[2];

  Tensor dx = need_dx ? at::empty(input.sizes(), input.options().memory_format(l.format))
                      : at::empty({0}, input.options());
  const auto w_opts = input.options().dtype(w_dtype);
  if (l.x.numel() == 0 || C == 0) {
    return {dx, output_mask[1] ? at::zeros({C}, w_opts) : at::empty({0}, w_opts),
            output_mask[2] ? at::zeros({C}, w_opts) : at::empty({0}, w_opts)};
  }
  Tensor dweight = at::empty({output_mask[1] ? C : 0}, w_opts);
  Tensor dbias = at::empty({output_mask[2] ? C : 0}, w_opts);
  if (!need_dx && !need_sums) return {dx, dweight, dbias};

  // grad_out of the input's dtype, or float32 with a half / bf16 input read as it is by the
  // single-element kernels (no rounding pass, no overflow of the values above 65504). Any other
  // dtype is converted first.
  const bool dy_f32 = grad_out.scalar_type() == at::kFloat &&
                      (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16);
  Tensor dy = grad_out.scalar_type() == input.scalar_type() || dy_f32
                  ? grad_out
                  : grad_out.to(input.scalar_type());
  dy = like_layout(dy, l);
  const Tensor mean_c = mean.to(acc_type).contiguous();
  const Tensor rstd_c = rstd.to(acc_type).contiguous();
  weight = weight.defined() ? weight.contiguous() : weight;
  bias = bias.defined() ? bias.contiguous() : bias;

  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm_batch_norm_bwd", [&] {
    using acc_t = acc_of<scalar_t>;
    channels::BwdArgs<scalar_t> a{};
    a.N = l.N;
    a.C = C;
    a.S = l.S;
    a.Sv = 0;
    a.G1 = 0;
    a.part = nullptr;
    a.coef = nullptr;
    a.mode = channels::kModeEval;
    a.mean = mean_c.const_data_ptr<acc_t>();
    a.rstd = rstd_c.const_data_ptr<acc_t>();
    a.weight = operand<scalar_t>(weight);
    a.dweight = output_mask[1] ? operand<scalar_t>(dweight) : Operand<scalar_t>{};
    a.dbias = output_mask[2] ? operand<scalar_t>(dbias) : Operand<scalar_t>{};
    a.n = static_cast<double>(l.N) * static_cast<double>(l.S);
    a.training = training;
    a.need_dx = need_dx;
    a.bias = operand<scalar_t>(bias);
    a.act = act;
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (dy_f32) {
        with_act(act, [&](auto act_c) {
          launch_bwd<scalar_t, 1, decltype(act_c)::value, float>(l, dy, dx, need_sums, a);
        });
        return;
      }
    }
    with_pack_width<scalar_t>(l, {&l.x, &dy, &dx}, [&](auto v) {
      with_act(act, [&](auto act_c) {
        launch_bwd<scalar_t, decltype(v)::value, decltype(act_c)::value>(l, dy, dx, need_sums, a);
      });
    });
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("batch_norm_bwd", &fastnorm::batch_norm_bwd);
}
