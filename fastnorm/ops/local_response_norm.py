"""LocalResponseNorm: torch.nn.functional.local_response_norm. For (N, C, *spatial) input,
div_c = k + alpha * avg_{j in win(c)} x_j^2, the average over the zero-padded window
win(c) = [c - size // 2, c + (size - 1) // 2] of channels divided by size; y = x / div^beta.
The reference computes torch's own composition in the statistics dtype and rounds once (as the
kernels do): float32 and float64 outputs are torch's, bitwise. The backward is the closed form
  dx_c = dy_c div_c^-beta - (2 alpha beta / size) x_c sum_{j: c in win(j)} dy_j x_j div_j^(-beta-1)
with div recomputed from x (the only tensor the autograd saves).
"""
from __future__ import annotations

import torch

from .common import _fn_ops, _to_front, define, lib, memory_format_of, stat_dtype

SCHEMAS = {
    "local_response_norm_fwd": "(Tensor input, int size, float alpha, float beta, float k) -> Tensor",
    "local_response_norm_bwd": "(Tensor grad_out, Tensor input, int size, float alpha, float beta, "
                               "float k) -> Tensor",
}
define(SCHEMAS)


def lrn_check(input: torch.Tensor, size: int, name: str = "local_response_norm") -> None:
    """torch's refusals: rank below 3 (ValueError, F.local_response_norm's), a window of fewer
    than one channel (RuntimeError, as torch's pooling raises)."""
    if input.dim() < 3:
        raise ValueError(f"{name}: expected 3D or higher dimensionality input (N, C, *), got "
                         f"{input.dim()} dimensions (input of shape {tuple(input.shape)})")
    if size < 1:
        raise RuntimeError(f"{name}: size (channels in a window) must be at least 1, got {size}")


def lrn_window(t: torch.Tensor, size: int, pre: int, post: int, average: bool) -> torch.Tensor:
    """Per channel of t (N, C, *), the sum (average=False) or the average over size (average=True,
    torch's avg_pool3d with the padding counted) of t over the channels [c - pre, c + post],
    zero-padded. Differentiable torch ops; t has elements."""
    n, c = t.shape[:2]
    t5 = torch.nn.functional.pad(t.reshape(n, 1, c, t.shape[2], -1), (0, 0, 0, 0, pre, post))
    s = torch.nn.functional.avg_pool3d(t5, (size, 1, 1), stride=1,
                                       divisor_override=None if average else 1)
    return s.reshape(t.shape)


def lrn_div(xs: torch.Tensor, size: int, alpha: float, k: float) -> torch.Tensor:
    """div = avg over win(c) of x^2, times alpha, plus k (xs in the statistics dtype)."""
    return lrn_window(xs * xs, size, size // 2, (size - 1) // 2, True) * alpha + k


def lrn_grad(dy: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float,
             k: float) -> torch.Tensor:
    """dx in the statistics dtype, from the closed form (differentiable torch ops)."""
    sd = stat_dtype(x.dtype)
    xs, g = x.to(sd), dy.to(sd)
    div = lrn_div(xs, size, alpha, k)
    r = 1.0 / div.pow(beta)
    # twin(c) = [c - (size - 1) // 2, c + size // 2]: the channels whose window holds c
    t = lrn_window(g * xs * r / div, size, (size - 1) // 2, size // 2, False)
    return g * r - (2.0 * alpha * beta / size) * xs * t


@torch.library.impl(lib, "local_response_norm_fwd", "CompositeExplicitAutograd")
def _local_response_norm_fwd_ref(input, size, alpha, beta, k):
    lrn_check(input, size)
    fmt = memory_format_of(input)
    if input.numel() == 0:
        return torch.empty_like(input, memory_format=fmt)
    xs = input.to(stat_dtype(input.dtype)).contiguous(memory_format=fmt)
    y = torch.nn.functional.local_response_norm(xs, size, alpha, beta, k)
    return y.to(input.dtype).contiguous(memory_format=fmt)


@torch.library.impl(lib, "local_response_norm_bwd", "CompositeExplicitAutograd")
def _local_response_norm_bwd_ref(grad_out, input, size, alpha, beta, k):
    lrn_check(input, size)
    if grad_out.shape != input.shape:
        raise RuntimeError(f"local_response_norm_bwd: grad_out has shape {list(grad_out.shape)} "
                           f"but input has shape {list(input.shape)}")
    if grad_out.dtype != input.dtype:
        raise RuntimeError(f"local_response_norm_bwd: grad_out must have the input's dtype "
                           f"({input.dtype}), got {grad_out.dtype}")
    fmt = memory_format_of(input)
    if input.numel() == 0:
        return torch.empty_like(input, memory_format=fmt)
    dx = lrn_grad(grad_out, input, size, alpha, beta, k)
    return dx.to(input.dtype).contiguous(memory_format=fmt)


@torch.library.register_fake("fastnorm::local_response_norm_fwd")
def _local_response_norm_fwd_fake(input, size, alpha, beta, k):
    lrn_check(input, size)
    return torch.empty_like(input, memory_format=memory_format_of(input))


@torch.library.register_fake("fastnorm::local_response_norm_bwd")
def _local_response_norm_bwd_fake(grad_out, input, size, alpha, beta, k):
    lrn_check(input, size)
    return torch.empty_like(input, memory_format=memory_format_of(input))


# vmap: the vmapped dimension is one more sample dimension, (B * N, C, *).
@torch.library.register_vmap("fastnorm::local_response_norm_fwd")
def _local_response_norm_fwd_vmap(info, in_dims, input, size, alpha, beta, k):
    x = input.movedim(in_dims[0], 0)
    y = _fn_ops.local_response_norm_fwd(x.flatten(0, 1), size, alpha, beta, k)
    return y.reshape(x.shape), 0


@torch.library.register_vmap("fastnorm::local_response_norm_bwd")
def _local_response_norm_bwd_vmap(info, in_dims, grad_out, input, size, alpha, beta, k):
    b = info.batch_size
    dy, x = _to_front(grad_out, in_dims[0], b), _to_front(input, in_dims[1], b)
    dx = _fn_ops.local_response_norm_bwd(dy.flatten(0, 1), x.flatten(0, 1), size, alpha, beta, k)
    return dx.reshape(x.shape), 0
