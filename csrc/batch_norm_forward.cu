// BatchNorm forward/backward: host side (checks, device guard, layout, dtype dispatch, launch).
// Kernels and their design: kernels/channels_*.cuh; plans: launch/channels.h. Op contract: docs/ops.md.
// This unit: the forward op; the backward op is compiled apart (batch_norm_backward.cu), so ninja
// builds the two in parallel.
#include "batch_norm.h"

namespace fastnorm {
namespace {

// ------------------------------------------------------------------------------------------
// Forward launches.

template <typename scalar_t, int V, bool ACT>
void launch_fwd(const Layout& l, const Tensor& y, const Tensor& nbt, channels::FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  const cudaStream_t stream = current_stream();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.numel() > 0 ? y.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t C = l.C;
  const auto ws_opts = l.x.options().dtype(stat_dtype(l.x.scalar_type()));
  Tensor ws;  // lives until the launches are queued (stream-ordered reuse after that)

  const size_t smem = l.nhwc ? 3 * static_cast<size_t>(channels::kThreads) * V * sizeof(acc_t) : 0;
  // chunks per channel for one wave of the general path's stats and apply kernels
  const int per_sm =
      l.nhwc ? std::min(resident_blocks(channels::bn_fwd_stats_nhwc<scalar_t, V>, kThreads, smem),
                        resident_blocks(channels::bn_fwd_apply_nhwc<scalar_t, V, ACT>, kThreads, 0))
             : std::min(resident_blocks(channels::bn_fwd_stats_nchw<scalar_t, V>, kThreads, 0),
                        resident_blocks(channels::bn_fwd_apply_nchw<scalar_t, V, ACT>, kThreads, 0));
  const channels::BnPlan plan = channels::plan_bn(l.nhwc, l.N, l.S, C, V, per_sm);
  a.Sv = plan.Sv;
  const int64_t G = plan.G;
  const NhwcCfg k = plan.k;
  const bool fused = plan.fused;
  auto apply = [&](int64_t grid_chunks) {
    if (!l.nhwc) {
      launch(channels::bn_fwd_apply_nchw<scalar_t, V, ACT>,
          nchw_grid(grid_chunks, C), channels::kThreads, 0, stream,
          x, yp, a);
    } else {
      // Only the fused mode uses the shared memory (tree merge); the others take none, so the
      // elementwise pass keeps full occupancy on parts with less shared memory per SM.
      const size_t apply_smem = a.mode == channels::kModeFused ? smem : 0;
      launch(channels::bn_fwd_apply_nhwc<scalar_t, V, ACT>,
          nhwc_grid(k, grid_chunks), dim3(k.tx, k.ty), apply_smem, stream,
          x, yp, a);
    }
  };

  if (!a.training) {
    a.mode = channels::kModeEval;
    apply(G);
    return;
  }
  if (fused) {
    // The kernel's blocks all read num_batches_tracked: increment it first, read the new value.
    if (a.nbt != nullptr) nbt.add_(1);
    a.nbt_offset = 0;
    a.bump_nbt = false;
    a.mode = channels::kModeFused;
    apply(1);
    return;
  }
  a.G1 = G;
  ws = at::empty({3 * G * C + 3 * C}, ws_opts);
  a.part = ws.mutable_data_ptr<acc_t>();
  a.coef = a.part + 3 * G * C;
  a.nbt_offset = 1;  // the finalize kernel reads nbt before the apply kernel increments it
  a.bump_nbt = a.nbt != nullptr;
  if (!l.nhwc) {
    launch(channels::bn_fwd_stats_nchw<scalar_t, V>, nchw_grid(G, C), channels::kThreads, 0, stream,
        x, a);
  } else {
    launch(channels::bn_fwd_stats_nhwc<scalar_t, V>,
        nhwc_grid(k, G), dim3(k.tx, k.ty), smem, stream,
        x, a);
  }
  const FinCfg f = finalize_cfg(C, G);
  launch(channels::bn_fwd_finalize<scalar_t>,
      f.grid, f.block, 3 * static_cast<size_t>(channels::kThreads) * sizeof(acc_t), stream,
      a);
  a.mode = channels::kModeFinal;
  apply(G);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd(
    const Tensor& input, const std::optional<Tensor>& weight_opt,
    const std::optional<Tensor>& bias_opt, const std::optional<Tensor>& running_mean_opt,
    const std::optional<Tensor>& running_var_opt,
    const std::optional<Tensor>& num_batches_tracked_opt, bool training,
    std::optional<double> momentum, double eps, int64_t activation, double activation_param) {
  // Every check before anything is written: a call that raises leaves the buffers untouched.
  const Activation act = activation_of(activation, activation_param, "fastnorm batch_norm_fwd");
  check_kernel_device(input, "fastnorm batch_norm_fwd");
  TORCH_CHECK(input.dim() >= 2, "fastnorm batch_norm_fwd: expected an input (N, C, *), got shape ",
              input.sizes());
  TORCH_CHECK(is_kernel_dtype(input.scalar_type()),
              "fastnorm batch_norm_fwd: expected a floating input (float32, float16, bfloat16, "
              "float64), got ", input.scalar_type());
  const int64_t C = input.size(1);
  Tensor weight = defined_or_empty(weight_opt);
  Tensor bias = defined_or_empty(bias_opt);
  Tensor running_mean = defined_or_empty(running_mean_opt);
  Tensor running_var = defined_or_empty(running_var_opt);
  Tensor nbt = defined_or_empty(num_batches_tracked_opt);
  if (weight.defined()) check_param_tensor(weight, input, C, "weight");
  if (bias.defined()) check_param_tensor(bias, input, C, "bias");
  for (const Tensor* t : {&running_mean, &running_var}) {
    if (!t->defined()) continue;
    const char* name = t == &running_mean ? "running_mean" : "running_var";
    check_param_tensor(*t, input, C, name);
    TORCH_CHECK(t->is_contiguous(), "fastnorm batch_norm_fwd: ", name,
                " must be contiguous (it is updated in place)");
  }
  if (nbt.defined()) {
    TORCH_CHECK(nbt.device() == input.device(),
                "fastnorm batch_norm_fwd: num_batches_tracked is on ", nbt.device(),
                " but the input is on ", input.device());
    TORCH_CHECK(nbt.scalar_type() == at::kLong && nbt.numel() == 1,
                "fastnorm batch_norm_fwd: num_batches_tracked must be a one-element int64 tensor, "
                "got ", nbt.scalar_type(), " of shape ", nbt.sizes());
  }
  if (!training) {
    TORCH_CHECK(running_mean.defined() && running_var.defined(),
                "fastnorm batch_norm_fwd: running_mean and running_var are required when not "
                "training");
  }
  const bool update_running = training && (running_mean.defined() || running_var.defined());
  if (update_running && !momentum.has_value()) {
    TORCH_CHECK(nbt.defined(),
                "fastnorm batch_norm_fwd: momentum=None (cumulative average) needs "
                "num_batches_tracked");
  }

  DeviceGuard guard(input.device());
  weight = weight.defined() ? weight.contiguous() : weight;
  bias = bias.defined() ? bias.contiguous() : bias;
  const Layout l = make_layout(input);
  const auto stat_opts = input.options().dtype(stat_dtype(input.scalar_type()));
  Tensor y = at::empty(input.sizes(), input.options().memory_format(l.format));

  if (training && l.x.numel() == 0) {
    // No statistics: zeros, running stats untouched, the batch still counted.
    if (nbt.defined()) nbt.add_(1);
    return {y, at::zeros({C}, stat_opts), at::zeros({C}, stat_opts)};
  }
  Tensor save_mean = at::empty({C}, stat_opts);
  Tensor save_rstd = at::empty({C}, stat_opts);
  if (C == 0) return {y, save_mean, save_rstd};  // (eval: nothing to compute)

  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm_batch_norm_fwd", [&] {
    using acc_t = acc_of<scalar_t>;
    channels::FwdArgs<scalar_t> a{};
    a.N = l.N;
    a.C = C;
    a.S = l.S;
    a.Sv = 0;
    a.G1 = 0;
    a.part = nullptr;
    a.coef = nullptr;
    a.save_mean = save_mean.mutable_data_ptr<acc_t>();
    a.save_rstd = save_rstd.mutable_data_ptr<acc_t>();
    a.weight = operand<scalar_t>(weight);
    a.bias = operand<scalar_t>(bias);
    a.running_mean = operand<scalar_t>(running_mean);
    a.running_var = operand<scalar_t>(running_var);
    a.nbt = training && nbt.defined() ? nbt.mutable_data_ptr<int64_t>() : nullptr;
    a.nbt_offset = 1;
    a.bump_nbt = false;
    a.mode = channels::kModeEval;
    a.momentum = momentum.value_or(0.0);
    a.has_momentum = momentum.has_value();
    a.eps = eps;
    a.n = static_cast<double>(l.N) * static_cast<double>(l.S);
    a.training = training;
    a.update_running = update_running;
    a.act = act;
    with_pack_width<scalar_t>(l, {&l.x, &y}, [&](auto v) {
      with_act(act, [&](auto act_c) {
        launch_fwd<scalar_t, decltype(v)::value, decltype(act_c)::value>(l, y, nbt, a);
      });
    });
  });
  return {y, save_mean, save_rstd};
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("batch_norm_fwd", &fastnorm::batch_norm_fwd);
}
