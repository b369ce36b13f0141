// fastnorm::local_response_norm_fwd / local_response_norm_bwd on CUDA: host side (checks, device
// guard, dtype dispatch, which layout). torch.nn.functional.local_response_norm's semantics: for
// (N, C, *spatial) input, d_c = k + alpha * (sum of x_j^2 over the window [c - size/2,
// c + (size-1)/2] of channels, zero-padded, divided by size), y = x / d^beta. One kernel each way,
// in the positions family (launch/positions.h, kernels/channels_positions.cuh):
//   - NCHW-contiguous (or made so): a channel's positions are contiguous, packs of positions;
//   - channels_last / channels_last_3d, or one position per sample (S = 1): a position's channels
//     are one contiguous row, groups of channels along it.
// The backward recomputes d from x (nothing saved but x). Outputs keep the input's memory format
// (fastnorm/ops/common.py memory_format_of: any other stride pattern gives a contiguous output).
#include "common.h"

#include <ATen/ops/empty.h>

#include <cstdint>

#include "launch/positions.h"

namespace fastnorm {
namespace {

// fastnorm/ops/common.py's memory_format_of: the output's, and the layout the kernels read.
at::MemoryFormat lrn_format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// torch's checks: rank >= 3 (ValueError, as F.local_response_norm), a positive window (torch's
// pooling refuses a kernel size below 1 with a RuntimeError).
void check_lrn_args(const at::Tensor& x, int64_t size, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 3, op, ": expected 3D or higher dimensionality input (N, C, *), got ",
                    x.dim(), " dimensions (input of shape ", x.sizes(), ")");
  TORCH_CHECK(size >= 1, op, ": size (channels in a window) must be at least 1, got ", size);
  // the kernels index a channel group's window relative to it in int
  TORCH_CHECK(x.size(1) < (int64_t(1) << 31), op, ": at most 2^31 - 1 channels, got ", x.size(1));
}

template <typename T>
positions::LrnArgs<T> lrn_args(const at::Tensor& x, int64_t size, double alpha, double beta,
                               double k) {
  using A = acc_of<T>;
  positions::LrnArgs<T> p;
  p.x = x.data_ptr<T>();
  p.N = x.size(0);
  p.C = x.size(1);
  p.S = x.numel() / (p.N * p.C);
  p.size = size;
  p.alpha = static_cast<A>(alpha);
  p.beta = static_cast<A>(beta);
  p.k = static_cast<A>(k);
  return p;
}

at::Tensor local_response_norm_fwd(const at::Tensor& input, int64_t size, double alpha,
                                   double beta, double k) {
  constexpr const char* op = "fastnorm::local_response_norm_fwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  check_float_dtype(input.scalar_type(), op);
  check_lrn_args(input, size, op);
  const at::MemoryFormat fmt = lrn_format_of(input);
  const at::Tensor x = input.contiguous(fmt);  // a copy only for other stride patterns
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return y;
  const bool rows = fmt != at::MemoryFormat::Contiguous || x.numel() == x.size(0) * x.size(1);
  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm::local_response_norm_fwd", [&] {
    positions::LrnArgs<scalar_t> p = lrn_args<scalar_t>(x, size, alpha, beta, k);
    p.out = y.data_ptr<scalar_t>();
    positions::lrn<scalar_t, false>(p, rows);
  });
  return y;
}

at::Tensor local_response_norm_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                   int64_t size, double alpha, double beta, double k) {
  constexpr const char* op = "fastnorm::local_response_norm_bwd";
  check_kernel_device(input, op);
  DeviceGuard guard(input.device());
  check_float_dtype(input.scalar_type(), op);
  check_lrn_args(input, size, op);
  TORCH_CHECK(grad_out.device() == input.device(), op, ": grad_out is on ", grad_out.device(),
              " but input is on ", input.device());
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op,
              ": grad_out must have the input's dtype (", input.scalar_type(), "), got ",
              grad_out.scalar_type());
  const at::MemoryFormat fmt = lrn_format_of(input);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor dy = grad_out.contiguous(fmt);  // x's layout
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return dx;
  const bool rows = fmt != at::MemoryFormat::Contiguous || x.numel() == x.size(0) * x.size(1);
  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm::local_response_norm_bwd", [&] {
    positions::LrnArgs<scalar_t> p = lrn_args<scalar_t>(x, size, alpha, beta, k);
    p.dy = dy.data_ptr<scalar_t>();
    p.out = dx.data_ptr<scalar_t>();
    positions::lrn<scalar_t, true>(p, rows);
  });
  return dx;
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("local_response_norm_fwd", TORCH_FN(fastnorm::local_response_norm_fwd));
  m.impl("local_response_norm_bwd", TORCH_FN(fastnorm::local_response_norm_bwd));
}
