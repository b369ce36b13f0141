// BatchNorm forward/backward: host side (checks, device guard, layout, dtype dispatch, launch).
// Kernels and their design: kernels/channels_*.cuh; plans: launch/channels.h. Op contract: docs/ops.md.
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "kernels/channels_backward.cuh"
#include "kernels/channels_forward.cuh"
#include "launch/channels.h"

namespace fastnorm {
namespace {

using at::Tensor;
using namespace channels;  // the BatchNorm plans of launch/channels.h

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A per-channel [C] tensor: same device as the input, C elements, a kernel dtype.
void check_channel_tensor(const Tensor& t, const Tensor& input, int64_t C, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "fastnorm batch_norm: ", name,
              " is on ", t.device(), " but the input is on ", input.device());
  TORCH_CHECK(t.numel() == C, "fastnorm batch_norm: ", name, " should have ", C,
              " elements (one per channel), got shape ", t.sizes());
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "fastnorm batch_norm: ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

// weight, bias, running statistics: the input's dtype or float32 (the AMP case), as ATen.
void check_param_tensor(const Tensor& t, const Tensor& input, int64_t C, const char* name) {
  check_channel_tensor(t, input, C, name);
  TORCH_CHECK(t.scalar_type() == input.scalar_type() || t.scalar_type() == at::kFloat,
              "fastnorm batch_norm: ", name, " must have the input's dtype (", input.scalar_type(),
              ") or float32, got ", t.scalar_type());
}

Tensor defined_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? *t : Tensor();
}

// The input as one of the two dense views the kernels take.
struct Layout {
  Tensor x;               // dense, in `format`
  at::MemoryFormat format;  // memory format of x and of the outputs
  bool nhwc;              // [R, C] view (channels_last, or S == 1); else [N, C, S]
  int64_t N, C, S;
};

Layout make_layout(const Tensor& input) {
  Layout l;
  const int64_t dim = input.dim();
  l.N = input.size(0);
  l.C = input.size(1);
  l.S = 1;
  for (int64_t d = 2; d < dim; ++d) l.S *= input.size(d);
  const bool cl = (dim == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (dim == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (cl && !input.is_contiguous()) {
    l.x = input;
    l.format = dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    l.nhwc = true;
  } else {
    // Contiguous (including the shapes that are both contiguous and channels_last: the memory
    // order is the same then), or any other strides: a contiguous copy.
    l.x = input.is_contiguous() ? input : input.contiguous();
    l.format = at::MemoryFormat::Contiguous;
    l.nhwc = l.S == 1;  // (N, C), (N, C, 1, ...): rows of C
  }
  return l;
}

// A tensor with x's sizes laid out like x (for dy).
Tensor like_layout(const Tensor& t, const Layout& l) {
  return t.is_contiguous(l.format) ? t : t.contiguous(l.format);
}

// A pack of V elements is legal when it lies inside one channel's run (NCHW: V | S) or one row
// (NHWC: V | C) and every pointer is aligned to the pack's size.
bool pack_ok(const Layout& l, int V, size_t bytes, std::initializer_list<const Tensor*> ts) {
  if (V <= 1) return false;
  if ((l.nhwc ? l.C : l.S) % V != 0) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->numel() > 0 && !is_aligned(t->data_ptr(), bytes)) return false;
  return true;
}

// Calls f with the widest legal pack width (std::integral_constant): 16 bytes, else 8 bytes
// (fp16 / bf16 with S = 196, ResNet-50's 14x14 stage, or any S = 4 mod 8), else one element.
template <typename scalar_t, typename F>
void with_pack_width(const Layout& l, std::initializer_list<const Tensor*> ts, F&& f) {
  constexpr int V16 = kVec16<scalar_t>, V8 = 8 / static_cast<int>(sizeof(scalar_t));
  if (pack_ok(l, V16, 16, ts)) {
    f(std::integral_constant<int, V16>{});
    return;
  }
  if constexpr (V8 > 1) {
    if (pack_ok(l, V8, 8, ts)) {
      f(std::integral_constant<int, V8>{});
      return;
    }
  }
  f(std::integral_constant<int, 1>{});
}

// Calls f with the kernels' ACT flag (std::bool_constant): the activation epilogue is compiled in
// only when there is one; identity runs the plain kernels.
template <typename F>
void with_act(const Activation& act, F&& f) {
  if (act.kind != kActIdentity) f(std::true_type{});
  else f(std::false_type{});
}


// ------------------------------------------------------------------------------------------
// Forward launches.

template <typename scalar_t, int V, bool ACT>
void launch_fwd(const Layout& l, const Tensor& y, const Tensor& nbt, channels::FwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  const cudaStream_t stream = current_stream();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.numel() > 0 ? y.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t C = l.C, R = l.N * l.S;
  const auto ws_opts = l.x.options().dtype(stat_dtype(l.x.scalar_type()));
  Tensor ws;  // lives until the launches are queued (stream-ordered reuse after that)

  bool fused = false;
  int64_t G = 1;
  NhwcCfg k{};
  const size_t smem = l.nhwc ? 3 * static_cast<size_t>(channels::kThreads) * V * sizeof(acc_t) : 0;
  // chunks per channel for one wave of the general path's stats and apply kernels
  const int per_sm =
      l.nhwc ? std::min(resident_blocks(channels::bn_fwd_stats_nhwc<scalar_t, V>, kThreads, smem),
                        resident_blocks(channels::bn_fwd_apply_nhwc<scalar_t, V, ACT>, kThreads, 0))
             : std::min(resident_blocks(channels::bn_fwd_stats_nchw<scalar_t, V>, kThreads, 0),
                        resident_blocks(channels::bn_fwd_apply_nchw<scalar_t, V, ACT>, kThreads, 0));
  if (!l.nhwc) {
    a.Sv = l.S / V;
    G = nchw_chunks(l.N * a.Sv, C, per_sm);
    fused = fuse_nchw(l.N * a.Sv, G);
  } else {
    a.Sv = 0;
    k = nhwc_cfg(R, C, V, per_sm);
    G = k.G;
    fused = fuse_nhwc(R, k);
  }
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

// ------------------------------------------------------------------------------------------
// Backward launches.

template <typename scalar_t, int V, bool ACT>
void launch_bwd(const Layout& l, const Tensor& dy, const Tensor& dx, bool need_sums,
                channels::BwdArgs<scalar_t> a) {
  using acc_t = acc_of<scalar_t>;
  const cudaStream_t stream = current_stream();
  const scalar_t* x = l.x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = a.need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t C = l.C, R = l.N * l.S;
  const auto ws_opts = l.x.options().dtype(stat_dtype(l.x.scalar_type()));
  Tensor ws;

  bool fused = false;
  int64_t G = 1;
  NhwcCfg k{};
  const size_t smem = l.nhwc ? 2 * static_cast<size_t>(channels::kThreads) * V * sizeof(acc_t) : 0;
  const int per_sm =
      l.nhwc ? std::min(resident_blocks(channels::bn_bwd_sums_nhwc<scalar_t, V, ACT>, kThreads, smem),
                        resident_blocks(channels::bn_bwd_apply_nhwc<scalar_t, V, ACT>, kThreads, 0))
             : std::min(resident_blocks(channels::bn_bwd_sums_nchw<scalar_t, V, ACT>, kThreads, 0),
                        resident_blocks(channels::bn_bwd_apply_nchw<scalar_t, V, ACT>, kThreads, 0));
  if (!l.nhwc) {
    a.Sv = l.S / V;
    G = nchw_chunks(l.N * a.Sv, C, per_sm);
    fused = fuse_nchw(l.N * a.Sv, G);
  } else {
    a.Sv = 0;
    k = nhwc_cfg(R, C, V, per_sm);
    G = k.G;
    fused = fuse_nhwc(R, k);
  }
  auto apply = [&](int64_t grid_chunks) {
    if (!l.nhwc) {
      launch(channels::bn_bwd_apply_nchw<scalar_t, V, ACT>,
          nchw_grid(grid_chunks, C), channels::kThreads, 0, stream,
          dyp, x, dxp, a);
    } else {
      const size_t apply_smem = a.mode == channels::kModeFused ? smem : 0;  // (as in the forward)
      launch(channels::bn_bwd_apply_nhwc<scalar_t, V, ACT>,
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
    launch(channels::bn_bwd_sums_nchw<scalar_t, V, ACT>, nchw_grid(G, C), channels::kThreads, 0, stream,
        dyp, x, a);
  } else {
    launch(channels::bn_bwd_sums_nhwc<scalar_t, V, ACT>,
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

  Tensor dy = grad_out.scalar_type() == input.scalar_type() ? grad_out
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
  m.impl("batch_norm_fwd", &fastnorm::batch_norm_fwd);
  m.impl("batch_norm_bwd", &fastnorm::batch_norm_bwd);
}
