// fastnorm::local_response_norm_fwd / local_response_norm_bwd on CUDA: host side (checks, device
// guard, dtype dispatch, which layout). torch.nn.functional.local_response_norm's semantics: for
// (N, C, *spatial) input, d_c = k + alpha * (sum of x_j^2 over the window [c - size/2,
// c + (size-1)/2] of channels, zero-padded, divided by size), y = x / d^beta. One kernel each way
// per layout, in the positions family (launch/positions.h, kernels/channels_positions.cuh):
//   - NCHW-contiguous (or made so): a channel's positions are contiguous, packs of positions;
//   - channels_last / channels_last_3d, or one position per sample (S = 1): a position's channels
//     are one contiguous row, tiles of rows staged in shared memory. Windows too wide for those
//     tiles (C above a tile and about a thousand channels a window): the NCHW kernels, on a
//     contiguous copy for channels_last input.
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

// out = y (forward) or dx (backward, dy defined), in x's layout. Rows (channels_last, or S == 1)
// take the rows kernels when their tiles hold C and the window (lrn_rows_fit), else the NCHW
// kernels on contiguous x and dy (copies for channels_last input; x itself when S == 1), the
// result copied into out.
template <typename T, bool BWD>
void run_lrn(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& out, at::MemoryFormat fmt,
             int64_t size, double alpha, double beta, double k) {
  const bool rows = fmt != at::MemoryFormat::Contiguous || x.numel() == x.size(0) * x.size(1);
  if (rows && !positions::lrn_rows_fit<T, BWD>(x.size(1), size)) {
    const at::Tensor xc = x.contiguous();
    const at::Tensor dyc = BWD ? dy.contiguous() : at::Tensor();
    const at::Tensor oc = out.is_contiguous() ? out : at::empty(xc.sizes(), xc.options());
    positions::LrnArgs<T> p = lrn_args<T>(xc, size, alpha, beta, k);
    if constexpr (BWD) p.dy = dyc.data_ptr<T>();
    p.out = oc.data_ptr<T>();
    positions::lrn<T, BWD>(p, false);
    if (!oc.is_same(out)) out.copy_(oc);
    return;
  }
  positions::LrnArgs<T> p = lrn_args<T>(x, size, alpha, beta, k);
  if constexpr (BWD) p.dy = dy.data_ptr<T>();
  p.out = out.data_ptr<T>();
  positions::lrn<T, BWD>(p, rows);
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
  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm::local_response_norm_fwd", [&] {
    run_lrn<scalar_t, false>(x, at::Tensor(), y, fmt, size, alpha, beta, k);
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
  FASTNORM_DISPATCH_FLOATING(input.scalar_type(), "fastnorm::local_response_norm_bwd", [&] {
    run_lrn<scalar_t, true>(x, dy, dx, fmt, size, alpha, beta, k);
  });
  return dx;
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_IMPL(FASTNORM_OP_NAMESPACE, FASTNORM_DISPATCH_KEY, m) {
  m.impl("local_response_norm_fwd", TORCH_FN(fastnorm::local_response_norm_fwd));
  m.impl("local_response_norm_bwd", TORCH_FN(fastnorm::local_response_norm_bwd));
}
