"""The fastnorm:: ops: schemas, reference kernels, fake kernels and autograd.

One registry for every backend (docs/ops.md is the contract):
- schemas are defined here, once;
- the reference implementation (ATen's own native ops) is registered as CompositeExplicitAutograd,
  so CPU and every other device work without a compiler;
- the compiled extension registers CUDA kernels under the same names; a direct CUDA registration
  takes precedence over the composite one;
- fake kernels make the ops traceable by torch.compile; autograd wraps the backward ops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

lib = torch.library.Library("fastnorm", "DEF")  # noqa: TOR901 (a persistent library object)

SCHEMAS = {
    "layer_norm_fwd": "(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, "
                      "ScalarType? out_dtype=None, int activation=0, float activation_param=0.0) "
                      "-> (Tensor, Tensor, Tensor)",
    "layer_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "int[] normalized_shape, bool[3] output_mask, Tensor? bias=None, "
                      "int activation=0, float activation_param=0.0) -> (Tensor, Tensor, Tensor)",
    "group_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps, "
                      "ScalarType? out_dtype=None, int activation=0, float activation_param=0.0) "
                      "-> (Tensor, Tensor, Tensor)",
    "group_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "int num_groups, bool[3] output_mask, Tensor? bias=None, int activation=0, "
                      "float activation_param=0.0) -> (Tensor, Tensor, Tensor)",
    "batch_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
                      "float? momentum, float eps) -> (Tensor, Tensor, Tensor)",
    "batch_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "layer_norm2d_fwd": "(Tensor input, Tensor? weight, Tensor? bias, float eps, "
                        "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)",
    "layer_norm2d_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "rms_norm_fwd": "(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
                    "ScalarType? out_dtype=None) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, "
                    "int[] normalized_shape, bool[2] output_mask) -> (Tensor, Tensor)",
    "add_norm_fwd": "(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, "
                    "Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)",
    "add_norm_bwd": "(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, Tensor mean, "
                    "Tensor rstd, Tensor? weight, int[] normalized_shape, bool rms, "
                    "ScalarType input_dtype, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
}
for _name, _schema in SCHEMAS.items():
    lib.define(_name + _schema)

OP_NAMES = tuple(f"fastnorm::{n}" for n in SCHEMAS)


# ----------------------------------------------------------------------------------------------
# helpers shared by the reference, fake and autograd code
# ----------------------------------------------------------------------------------------------
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp64 for fp64 input and fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output must keep: channels_last(_3d) when x is laid out that way."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The stand-in for an output masked off (custom ops cannot return None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _aten_stat_dtype(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype ATen's CPU backward ops insist on for mean/rstd: the parameters' dtype when they
    are given (its mixed-type path), else the input's."""
    return weight.dtype if weight is not None else x.dtype


def _spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _no_activation_yet(op, activation):
    """Branch actrows carries the CUDA side of the fused activations only: the reference, fake and
    vmap rules with an activation are branch actpy's (the merge keeps those)."""
    if activation != 0:
        raise NotImplementedError(f"fastnorm::{op}: activation={activation} has no reference "
                                  "implementation on this branch (see branch actpy)")


def _ref_inputs(grad_out, x, weight):
    """Backward reference off CPU: compute in the statistics dtype (ATen's CUDA kernels accept any
    float dtype there; the compiled kernels replace this path anyway)."""
    sd = stat_dtype(x.dtype)
    if x.device.type == "cpu":
        return grad_out.to(x.dtype), x, weight, None
    return grad_out.to(sd), x.to(sd), None if weight is None else weight.to(sd), sd


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def _ln_rows(x: torch.Tensor, normalized_shape: Sequence[int]) -> int:
    """Rows: the product of the dims before normalized_shape (rows of zero elements count too)."""
    return math.prod(x.shape[: x.dim() - len(normalized_shape)])


@torch.library.impl(lib, "layer_norm_fwd", "CompositeExplicitAutograd")
def _layer_norm_fwd_ref(input, normalized_shape, weight, bias, eps, out_dtype=None, activation=0,
                        activation_param=0.0):
    _no_activation_yet("layer_norm_fwd", activation)
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    y, mean, rstd = torch.native_layer_norm(x, list(normalized_shape), weight, bias, eps)
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    return y.contiguous(), mean.reshape(m).to(sd), rstd.reshape(m).to(sd)


@torch.library.impl(lib, "layer_norm_bwd", "CompositeExplicitAutograd")
def _layer_norm_bwd_ref(grad_out, input, mean, rstd, weight, normalized_shape, output_mask,
                        bias=None, activation=0, activation_param=0.0):
    _no_activation_yet("layer_norm_bwd", activation)
    in_dtype = input.dtype
    if grad_out.dtype != input.dtype:  # autocast: the forward normalised a float32 copy
        input = input.to(grad_out.dtype)
    dy, x, w, sd = _ref_inputs(grad_out, input, weight)
    k = len(normalized_shape)
    stat_shape = list(x.shape[: x.dim() - k]) + [1] * k
    md = sd or _aten_stat_dtype(x, w)
    # ATen's bias argument only tells it whether dbias is wanted: without a weight, give it a
    # stand-in, or a layer with a bias and no weight gets no dbias
    b = w if w is not None or not output_mask[2] else x.new_zeros(list(normalized_shape))
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, list(normalized_shape), mean.reshape(stat_shape).to(md),
        rstd.reshape(stat_shape).to(md), w, b, list(output_mask))
    wd = weight.dtype if weight is not None else in_dtype
    return (dx.to(in_dtype) if output_mask[0] else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


@torch.library.register_fake("fastnorm::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps, out_dtype=None, activation=0,
                         activation_param=0.0):
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    y = input.new_empty(input.shape, dtype=out_dtype or input.dtype)
    return y, input.new_empty((m,), dtype=sd), input.new_empty((m,), dtype=sd)


@torch.library.register_fake("fastnorm::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, mean, rstd, weight, normalized_shape, output_mask,
                         bias=None, activation=0, activation_param=0.0):
    wd = weight.dtype if weight is not None else input.dtype
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else _empty(input),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# GroupNorm (InstanceNorm is GroupNorm with one group per channel)
# ----------------------------------------------------------------------------------------------
@torch.library.impl(lib, "group_norm_fwd", "CompositeExplicitAutograd")
def _group_norm_fwd_ref(input, weight, bias, num_groups, eps, out_dtype=None, activation=0,
                        activation_param=0.0):
    _no_activation_yet("group_norm_fwd", activation)
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    n, c = x.shape[0], x.shape[1]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, _spatial(x), num_groups, eps)
    sd = stat_dtype(input.dtype)
    y = y.contiguous(memory_format=memory_format_of(input))
    return y, mean.reshape(n, num_groups).to(sd), rstd.reshape(n, num_groups).to(sd)


@torch.library.impl(lib, "group_norm_bwd", "CompositeExplicitAutograd")
def _group_norm_bwd_ref(grad_out, input, mean, rstd, weight, num_groups, output_mask, bias=None,
                        activation=0, activation_param=0.0):
    _no_activation_yet("group_norm_bwd", activation)
    in_dtype = input.dtype
    fmt = memory_format_of(input)
    if grad_out.dtype != input.dtype:
        input = input.to(grad_out.dtype)
    dy, x, w, sd = _ref_inputs(grad_out, input, weight)
    md = sd or _aten_stat_dtype(x, w)
    n, c = x.shape[0], x.shape[1]
    # ATen wants dy in x's layout
    dy = dy.contiguous(memory_format=memory_format_of(x))
    dx, dw, db = torch.ops.aten.native_group_norm_backward(
        dy, x, mean.to(md), rstd.to(md), w, n, c, _spatial(x), num_groups, list(output_mask))
    wd = weight.dtype if weight is not None else in_dtype
    return (dx.to(in_dtype).contiguous(memory_format=fmt) if output_mask[0] else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


@torch.library.register_fake("fastnorm::group_norm_fwd")
def _group_norm_fwd_fake(input, weight, bias, num_groups, eps, out_dtype=None, activation=0,
                         activation_param=0.0):
    sd = stat_dtype(input.dtype)
    y = torch.empty_like(input, dtype=out_dtype or input.dtype, memory_format=memory_format_of(input))
    n = input.shape[0]
    return y, input.new_empty((n, num_groups), dtype=sd), input.new_empty((n, num_groups), dtype=sd)


@torch.library.register_fake("fastnorm::group_norm_bwd")
def _group_norm_bwd_fake(grad_out, input, mean, rstd, weight, num_groups, output_mask, bias=None,
                         activation=0, activation_param=0.0):
    wd = weight.dtype if weight is not None else input.dtype
    c = input.shape[1]
    return (torch.empty_like(input, memory_format=memory_format_of(input)) if output_mask[0] else _empty(input),
            input.new_empty((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty((c,), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
@torch.library.impl(lib, "batch_norm_fwd", "CompositeExplicitAutograd")
def _batch_norm_fwd_ref(input, weight, bias, running_mean, running_var, num_batches_tracked,
                        training, momentum, eps):
    c = input.shape[1]
    sd = stat_dtype(input.dtype)
    fmt = memory_format_of(input)
    if not training:
        y, _, _ = torch.ops.aten._native_batch_norm_legit_no_training(
            input, weight, bias, running_mean, running_var, 0.0, eps)
        # a copy: op outputs must not alias inputs
        return (y.contiguous(memory_format=fmt), running_mean.to(sd, copy=True),
                torch.rsqrt(running_var.to(sd) + eps))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if input.numel() == 0:
        zeros = input.new_zeros((c,), dtype=sd)
        return torch.empty_like(input, memory_format=fmt), zeros, zeros.clone()
    if running_mean is None:
        y, mean, rstd = torch.ops.aten._native_batch_norm_legit.no_stats(input, weight, bias, True, 0.0, eps)
    else:
        if momentum is None:
            # The cumulative average: this reference path reads the counter on the host; the
            # compiled CUDA kernel reads it on the device.
            factor = 1.0 / float(num_batches_tracked)
        else:
            factor = momentum
        y, mean, rstd = torch.ops.aten._native_batch_norm_legit(
            input, weight, bias, running_mean, running_var, True, factor, eps)
    return y.contiguous(memory_format=fmt), mean.to(sd), rstd.to(sd)


@torch.library.impl(lib, "batch_norm_bwd", "CompositeExplicitAutograd")
def _batch_norm_bwd_ref(grad_out, input, mean, rstd, weight, training, output_mask):
    in_dtype = input.dtype
    fmt = memory_format_of(input)
    wd = weight.dtype if weight is not None else in_dtype
    if input.numel() == 0:
        c = input.shape[1]
        return (torch.empty_like(input, memory_format=fmt) if output_mask[0] else _empty(input),
                input.new_zeros((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
                input.new_zeros((c,), dtype=wd) if output_mask[2] else _empty(input, wd))
    dy, x, w, sd = _ref_inputs(grad_out, input, weight)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    if training:
        md = sd or _aten_stat_dtype(x, w)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean.to(md), rstd.to(md), True, 0.0, list(output_mask))
    else:
        # Frozen statistics: y is affine in x. ATen's eval backward wants running_var, so write
        # the three sums directly.
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        r = rstd.reshape(shape)
        scale = r if w is None else r * w.reshape(shape)
        dx = dy * scale if output_mask[0] else None
        dw = (dy * (x - mean.reshape(shape)) * r).sum(dims) if output_mask[1] else None
        db = dy.sum(dims) if output_mask[2] else None
    return (dx.to(in_dtype).contiguous(memory_format=fmt) if output_mask[0] else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


@torch.library.register_fake("fastnorm::batch_norm_fwd")
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, num_batches_tracked,
                         training, momentum, eps):
    sd = stat_dtype(input.dtype)
    c = input.shape[1]
    y = torch.empty_like(input, memory_format=memory_format_of(input))
    return y, input.new_empty((c,), dtype=sd), input.new_empty((c,), dtype=sd)


@torch.library.register_fake("fastnorm::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, mean, rstd, weight, training, output_mask):
    wd = weight.dtype if weight is not None else input.dtype
    c = input.shape[1]
    return (torch.empty_like(input, memory_format=memory_format_of(input)) if output_mask[0] else _empty(input),
            input.new_empty((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty((c,), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# RMSNorm and the fused residual-add norms (add_norm: LayerNorm or RMSNorm of input + residual)
#
# The references compute in the statistics dtype with plain ATen ops (ATen has no native RMSNorm
# backward and no fused add-norm), rounding once at the end, as the CUDA kernels do.
# ----------------------------------------------------------------------------------------------
def _norm_dims(x: torch.Tensor, normalized_shape: Sequence[int]) -> list:
    """The trailing dims normalised over (they must be normalized_shape, as the kernels check)."""
    k = len(normalized_shape)
    if not 1 <= k <= x.dim() or list(x.shape[x.dim() - k:]) != list(normalized_shape):
        raise RuntimeError(f"expected input with trailing shape {list(normalized_shape)}, but got "
                           f"input of shape {list(x.shape)}")
    return list(range(x.dim() - k, x.dim()))


def _stat_view(x: torch.Tensor, normalized_shape: Sequence[int]) -> list:
    """Shape that views a flat [M] statistic against x: the row dims, then ones."""
    k = len(normalized_shape)
    return list(x.shape[: x.dim() - k]) + [1] * k


def _check_out_dtype(input: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is None or out_dtype == input.dtype:
        return input.dtype
    if out_dtype != torch.float32:
        raise RuntimeError(f"rms_norm_fwd: out_dtype must be the input's dtype ({input.dtype}) or "
                           f"torch.float32, but got {out_dtype}")
    return out_dtype


def residual_pair_supported(input_dtype: torch.dtype, residual_dtype: torch.dtype) -> bool:
    """The dtype pairs add_norm_fwd takes: one dtype, or a float32 residual stream under float16 /
    bfloat16 activations (the kernels' two instantiations)."""
    return residual_dtype == input_dtype or (
        residual_dtype == torch.float32 and input_dtype in (torch.float16, torch.bfloat16))


def _check_residual_dtype(input: torch.Tensor, residual: torch.Tensor) -> None:
    if not residual_pair_supported(input.dtype, residual.dtype):
        raise RuntimeError(f"add_norm_fwd: expected residual of the input's dtype ({input.dtype}), "
                           f"or torch.float32 with a float16/bfloat16 input, but got input of "
                           f"dtype {input.dtype} and residual of dtype {residual.dtype}")
    if residual.shape != input.shape:
        raise RuntimeError(f"add_norm_fwd: expected input and residual of the same shape, but got "
                           f"input of shape {tuple(input.shape)} and residual of shape "
                           f"{tuple(residual.shape)}")


def _rms_rstd(xs: torch.Tensor, dims: list, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over dims, keepdim (xs already in the statistics dtype)."""
    return torch.rsqrt(xs.square().mean(dims, keepdim=True) + eps)


def _norm_dx(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, dims: list,
             rms: bool) -> torch.Tensor:
    """d(loss)/dx of xhat = norm(x), given g = dy * w (all in the statistics dtype)."""
    proj = xhat * (g * xhat).mean(dims, keepdim=True)
    if rms:
        return rstd * (g - proj)
    return rstd * (g - g.mean(dims, keepdim=True) - proj)


@torch.library.impl(lib, "rms_norm_fwd", "CompositeExplicitAutograd")
def _rms_norm_fwd_ref(input, normalized_shape, weight, eps, out_dtype=None):
    yd = _check_out_dtype(input, out_dtype)
    sd = stat_dtype(input.dtype)
    xs = input.to(sd)
    rstd = _rms_rstd(xs, _norm_dims(input, normalized_shape), eps)
    y = xs * rstd
    if weight is not None:
        y = y * weight.to(sd)
    return y.to(yd).contiguous(), rstd.reshape(_ln_rows(input, normalized_shape))


@torch.library.impl(lib, "rms_norm_bwd", "CompositeExplicitAutograd")
def _rms_norm_bwd_ref(grad_out, input, rstd, weight, normalized_shape, output_mask):
    sd = stat_dtype(input.dtype)
    dims = _norm_dims(input, normalized_shape)
    r = rstd.to(sd).reshape(_stat_view(input, normalized_shape))
    dy = grad_out.to(sd)
    xhat = input.to(sd) * r
    wd = weight.dtype if weight is not None else input.dtype
    dx = _empty(input)
    if output_mask[0]:
        g = dy if weight is None else dy * weight.to(sd)
        dx = _norm_dx(g, xhat, r, dims, rms=True).to(input.dtype).contiguous()
    dw = _empty(input, wd)
    if output_mask[1]:
        rows = list(range(input.dim() - len(normalized_shape)))
        dw = (dy * xhat).sum(rows).to(wd) if rows else (dy * xhat).to(wd)
    return dx, dw


@torch.library.register_fake("fastnorm::rms_norm_fwd")
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps, out_dtype=None):
    yd = _check_out_dtype(input, out_dtype)
    m = _ln_rows(input, normalized_shape)
    return (input.new_empty(input.shape, dtype=yd),
            input.new_empty((m,), dtype=stat_dtype(input.dtype)))


@torch.library.register_fake("fastnorm::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, input, rstd, weight, normalized_shape, output_mask):
    wd = weight.dtype if weight is not None else input.dtype
    return (input.new_empty(input.shape) if output_mask[0] else _empty(input),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[1] else _empty(input, wd))


@torch.library.impl(lib, "add_norm_fwd", "CompositeExplicitAutograd")
def _add_norm_fwd_ref(input, residual, normalized_shape, weight, bias, eps, rms):
    _check_residual_dtype(input, residual)
    if rms and bias is not None:
        raise RuntimeError("add_norm_fwd: RMSNorm (rms=True) takes no bias")
    sd = stat_dtype(input.dtype)
    dims = _norm_dims(input, normalized_shape)
    m = _ln_rows(input, normalized_shape)
    r = (input.to(sd) + residual.to(sd)).to(residual.dtype)
    rs = r.to(sd)  # statistics of the stored (rounded) sum: the backward recomputes from it
    if rms:
        rstd = _rms_rstd(rs, dims, eps)
        y = rs * rstd
        mean = input.new_empty((0,), dtype=sd)
    else:
        var, mu = torch.var_mean(rs, dims, correction=0, keepdim=True)
        if rs.numel() == 0:  # rows of no elements: mean 0 (rstd NaN), as ATen's layer_norm
            mu = torch.zeros_like(mu)
        rstd = torch.rsqrt(var + eps)
        y = (rs - mu) * rstd
        mean = mu.reshape(m)
    if weight is not None:
        y = y * weight.to(sd)
    if bias is not None:
        y = y + bias.to(sd)
    return y.to(input.dtype).contiguous(), r.contiguous(), mean, rstd.reshape(m)


@torch.library.impl(lib, "add_norm_bwd", "CompositeExplicitAutograd")
def _add_norm_bwd_ref(grad_out, grad_residual_out, residual_out, mean, rstd, weight,
                      normalized_shape, rms, input_dtype, output_mask):
    sd = stat_dtype(input_dtype)
    rd = residual_out.dtype
    dims = _norm_dims(residual_out, normalized_shape)
    view = _stat_view(residual_out, normalized_shape)
    rows = list(range(residual_out.dim() - len(normalized_shape)))
    r = rstd.to(sd).reshape(view)
    rs = residual_out.to(sd)
    xhat = rs * r if rms else (rs - mean.to(sd).reshape(view)) * r
    dy = grad_out.to(sd)
    wd = weight.dtype if weight is not None else input_dtype
    dx = dres = _empty(residual_out, input_dtype)
    if output_mask[0] or output_mask[1]:
        g = dy if weight is None else dy * weight.to(sd)
        d_r = _norm_dx(g, xhat, r, dims, rms)
        if grad_residual_out is not None:
            d_r = d_r + grad_residual_out.to(sd)
        if output_mask[0]:
            dx = d_r.to(input_dtype).contiguous()
        # both asked for: two tensors, never one aliasing the other (d_r may already be either)
        dres = (d_r.to(rd, copy=output_mask[0]).contiguous() if output_mask[1]
                else _empty(residual_out, rd))
    else:
        dres = _empty(residual_out, rd)

    def row_sum(t):
        return t.sum(rows) if rows else t

    dw = row_sum(dy * xhat).to(wd) if output_mask[2] else _empty(residual_out, wd)
    db = row_sum(dy).to(wd) if output_mask[3] and not rms else _empty(residual_out, wd)
    return dx, dres, dw, db


@torch.library.register_fake("fastnorm::add_norm_fwd")
def _add_norm_fwd_fake(input, residual, normalized_shape, weight, bias, eps, rms):
    _check_residual_dtype(input, residual)
    sd = stat_dtype(input.dtype)
    m = _ln_rows(input, normalized_shape)
    return (input.new_empty(input.shape), residual.new_empty(residual.shape),
            input.new_empty((0,) if rms else (m,), dtype=sd), input.new_empty((m,), dtype=sd))


@torch.library.register_fake("fastnorm::add_norm_bwd")
def _add_norm_bwd_fake(grad_out, grad_residual_out, residual_out, mean, rstd, weight,
                       normalized_shape, rms, input_dtype, output_mask):
    wd = weight.dtype if weight is not None else input_dtype
    rd = residual_out.dtype
    shape = residual_out.shape
    ns = tuple(normalized_shape)
    return (residual_out.new_empty(shape, dtype=input_dtype) if output_mask[0]
            else _empty(residual_out, input_dtype),
            residual_out.new_empty(shape) if output_mask[1] else _empty(residual_out, rd),
            residual_out.new_empty(ns, dtype=wd) if output_mask[2] else _empty(residual_out, wd),
            residual_out.new_empty(ns, dtype=wd) if output_mask[3] and not rms
            else _empty(residual_out, wd))


# ----------------------------------------------------------------------------------------------
# LayerNorm2d: LayerNorm over the C channels of each position of an (N, C, *spatial) input
# (ConvNeXt's channels-first LayerNorm). Statistics: one per position, [N * prod(spatial)], in
# the order (n, position). The reference normalises the (N, *spatial, C) view with ATen's
# LayerNorm (a view with no copy for channels_last input).
# ----------------------------------------------------------------------------------------------
def _ln2d_positions(x: torch.Tensor) -> int:
    return x.shape[0] * _spatial(x)


def _ln2d_layout(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """t (a channels-last view of a fresh tensor) in the input's memory format, strides included
    when it has no elements (a view of zero elements counts as contiguous whatever its strides)."""
    fmt = memory_format_of(input)
    if t.numel() == 0:
        return torch.empty_like(t, memory_format=fmt)
    return t.contiguous(memory_format=fmt)


@torch.library.impl(lib, "layer_norm2d_fwd", "CompositeExplicitAutograd")
def _layer_norm2d_fwd_ref(input, weight, bias, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    y, mean, rstd = torch.native_layer_norm(x.movedim(1, -1), [input.shape[1]], weight, bias, eps)
    m = _ln2d_positions(input)
    sd = stat_dtype(input.dtype)
    return _ln2d_layout(y.movedim(-1, 1), input), mean.reshape(m).to(sd), rstd.reshape(m).to(sd)


@torch.library.impl(lib, "layer_norm2d_bwd", "CompositeExplicitAutograd")
def _layer_norm2d_bwd_ref(grad_out, input, mean, rstd, weight, output_mask):
    if grad_out.shape != input.shape:
        raise RuntimeError(f"layer_norm2d_bwd: grad_out has shape {list(grad_out.shape)} but input "
                           f"has shape {list(input.shape)}")
    in_dtype = input.dtype
    if grad_out.dtype != input.dtype:  # autocast: the forward normalised a float32 copy
        input = input.to(grad_out.dtype)
    dy, x, w, sd = _ref_inputs(grad_out, input, weight)
    c = x.shape[1]
    rows = x.movedim(1, -1)
    stat_shape = list(rows.shape[:-1]) + [1]
    md = sd or _aten_stat_dtype(x, w)
    # ATen computes dbias only when it is given a bias; any [C] tensor stands in for it
    b_like = w if w is not None or not output_mask[2] else x.new_empty((c,))
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.movedim(1, -1), rows, [c], mean.reshape(stat_shape).to(md),
        rstd.reshape(stat_shape).to(md), w, b_like, list(output_mask))
    wd = weight.dtype if weight is not None else in_dtype
    return (_ln2d_layout(dx.movedim(-1, 1).to(in_dtype), input) if output_mask[0]
            else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


@torch.library.register_fake("fastnorm::layer_norm2d_fwd")
def _layer_norm2d_fwd_fake(input, weight, bias, eps, out_dtype=None):
    m = _ln2d_positions(input)
    sd = stat_dtype(input.dtype)
    y = torch.empty_like(input, dtype=out_dtype or input.dtype, memory_format=memory_format_of(input))
    return y, input.new_empty((m,), dtype=sd), input.new_empty((m,), dtype=sd)


@torch.library.register_fake("fastnorm::layer_norm2d_bwd")
def _layer_norm2d_bwd_fake(grad_out, input, mean, rstd, weight, output_mask):
    wd = weight.dtype if weight is not None else input.dtype
    c = input.shape[1]
    return (torch.empty_like(input, memory_format=memory_format_of(input)) if output_mask[0] else _empty(input),
            input.new_empty((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty((c,), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# vmap (torch.func.vmap) batching rules: every op folds the vmapped dimension into a dimension
# the op already has (rows, samples or channels) and runs once, so functorch never takes its
# slow per-sample fallback. Each rule gets the physical tensors and `in_dims` (the vmapped
# dimension of each argument, None when that argument is not batched).
# ----------------------------------------------------------------------------------------------
def _to_front(t: Optional[torch.Tensor], bdim: Optional[int], b: int) -> Optional[torch.Tensor]:
    """t with the vmapped dimension first; an unbatched t is expanded to b copies (a view)."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(b, *t.shape)
    return t.movedim(bdim, 0)


def _channels_folded(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C, *) -> (N, B*C, *): the vmapped dimension becomes B blocks of channels, so
    per-channel (BatchNorm) and per-group (GroupNorm) statistics stay per vmapped sample."""
    b, n, c = t.shape[:3]
    return t.movedim(0, 1).reshape(n, b * c, *t.shape[3:])


def _channels_unfolded(t: torch.Tensor, b: int) -> torch.Tensor:
    """(N, B*C, *) -> (N, B, C, *): the inverse of _channels_folded (the vmapped dim is 1)."""
    n, bc = t.shape[:2]
    return t.reshape(n, b, bc // b, *t.shape[2:])


def _per_sample_vector(t: Optional[torch.Tensor], bdim: Optional[int], b: int) -> Optional[torch.Tensor]:
    """A per-channel vector [C] (batched: [B, C]) as one [B*C] vector matching _channels_folded."""
    if t is None:
        return None
    if bdim is None:
        return t.repeat(b)
    return t.movedim(bdim, 0).reshape(-1)


@torch.library.register_vmap("fastnorm::layer_norm_fwd")
def _layer_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, bias, eps, out_dtype=None,
                         activation=0, activation_param=0.0):
    _no_activation_yet("layer_norm_fwd", activation)
    xd, _, wd, bd = in_dims[:4]
    b = info.batch_size
    if wd is None and bd is None:
        # The vmapped dimension is one more row dimension.
        x = input.movedim(xd, 0)
        y, mean, rstd = _fn_ops.layer_norm_fwd(x, normalized_shape, weight, bias, eps, out_dtype)
        return (y, mean.view(b, -1), rstd.view(b, -1)), (0, 0, 0)
    # Batched affine parameters: normalise once, then apply each sample's weight and bias.
    x = input if xd is None else input.movedim(xd, 0)
    y, mean, rstd = _fn_ops.layer_norm_fwd(x, normalized_shape, None, None, eps, out_dtype)
    lead = x.dim() - len(normalized_shape) - (0 if xd is None else 1)
    out = y if xd is not None else y.unsqueeze(0)

    def param(t, d):
        t = _to_front(t, d, b)
        return t.reshape(b, *([1] * lead), *t.shape[1:])

    if weight is not None:
        out = out * param(weight, wd)
    if bias is not None:
        out = out + param(bias, bd)
    out = out.to(y.dtype).expand(b, *out.shape[1:]).contiguous()
    if xd is None:
        return (out, mean, rstd), (0, None, None)
    return (out, mean.view(b, -1), rstd.view(b, -1)), (0, 0, 0)


@torch.library.register_vmap("fastnorm::layer_norm_bwd")
def _layer_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, normalized_shape,
                         output_mask, bias=None, activation=0, activation_param=0.0):
    _no_activation_yet("layer_norm_bwd", activation)
    b = info.batch_size
    gd, xd, md, rd, wd = in_dims[:5]
    dy, x = _to_front(grad_out, gd, b), _to_front(input, xd, b)
    m, r = _to_front(mean, md, b).reshape(-1), _to_front(rstd, rd, b).reshape(-1)
    k = len(normalized_shape)
    dx = _empty(input)
    if output_mask[0]:
        if wd is None:
            dx = _fn_ops.layer_norm_bwd(dy, x, m, r, weight, normalized_shape, [True, False, False])[0]
        else:  # dx depends on the weight only through dy * weight
            w = _to_front(weight, wd, b).reshape(b, *([1] * (x.dim() - 1 - k)), *normalized_shape)
            dx = _fn_ops.layer_norm_bwd((dy * w).to(dy.dtype), x, m, r, None, normalized_shape,
                                        [True, False, False])[0]
    wdt = weight.dtype if weight is not None else input.dtype
    dw = db = _empty(input, wdt)
    if output_mask[1] or output_mask[2]:
        # Per-sample parameter gradients: sums over each sample's rows only.
        sd = stat_dtype(input.dtype)
        rows = list(range(1, x.dim() - k))
        g = dy.to(sd)
        if output_mask[1]:
            stat_shape = list(x.shape[: x.dim() - k]) + [1] * k
            xhat = (x.to(sd) - m.view(stat_shape)) * r.view(stat_shape)
            dw = (g * xhat).sum(rows).to(wdt)
        if output_mask[2]:
            db = g.sum(rows).to(wdt)
    return (dx, dw, db), (0 if output_mask[0] else None, 0 if output_mask[1] else None,
                          0 if output_mask[2] else None)


@torch.library.register_vmap("fastnorm::group_norm_fwd")
def _group_norm_fwd_vmap(info, in_dims, input, weight, bias, num_groups, eps, out_dtype=None,
                         activation=0, activation_param=0.0):
    _no_activation_yet("group_norm_fwd", activation)
    xd, wd, bd = in_dims[:3]
    b = info.batch_size
    if wd is None and bd is None:
        # The vmapped dimension is one more sample dimension.
        x = input.movedim(xd, 0)
        y, mean, rstd = _fn_ops.group_norm_fwd(x.reshape(-1, *x.shape[2:]), weight, bias,
                                               num_groups, eps, out_dtype)
        return (y.reshape(x.shape), mean.view(b, -1, num_groups), rstd.view(b, -1, num_groups)), (0, 0, 0)
    # Batched affine parameters: B blocks of channels, B * num_groups groups.
    x = _channels_folded(_to_front(input, xd, b))
    y, mean, rstd = _fn_ops.group_norm_fwd(x, _per_sample_vector(weight, wd, b),
                                           _per_sample_vector(bias, bd, b), b * num_groups, eps,
                                           out_dtype)
    return (_channels_unfolded(y, b), _channels_unfolded(mean, b),
            _channels_unfolded(rstd, b)), (1, 1, 1)


@torch.library.register_vmap("fastnorm::group_norm_bwd")
def _group_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, num_groups,
                         output_mask, bias=None, activation=0, activation_param=0.0):
    _no_activation_yet("group_norm_bwd", activation)
    b = info.batch_size
    gd, xd, md, rd, wd = in_dims[:5]
    dy = _channels_folded(_to_front(grad_out, gd, b))
    x = _channels_folded(_to_front(input, xd, b))
    m = _channels_folded(_to_front(mean, md, b))
    r = _channels_folded(_to_front(rstd, rd, b))
    dx, dw, db = _fn_ops.group_norm_bwd(dy, x, m, r, _per_sample_vector(weight, wd, b),
                                        b * num_groups, output_mask)
    return ((_channels_unfolded(dx, b) if output_mask[0] else dx,
             dw.view(b, -1) if output_mask[1] else dw,
             db.view(b, -1) if output_mask[2] else db),
            (1 if output_mask[0] else None, 0 if output_mask[1] else None,
             0 if output_mask[2] else None))


_VMAP_STATS_ERROR = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval mode, "
    "please set `track_running_stats` to be False. If you are using a prebuilt module and do not "
    "need eval mode, please see the functorch website for resources on how to patch your module "
    "to work with vmap")


@torch.library.register_vmap("fastnorm::batch_norm_fwd")
def _batch_norm_fwd_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                         num_batches_tracked, training, momentum, eps):
    xd, wd, bd, rmd, rvd, nd = in_dims[:6]
    b = info.batch_size
    updates = training and running_mean is not None
    if updates and (xd is not None or rmd is not None or rvd is not None or nd is not None) and (
            rmd is None or rvd is None):
        # torch.nn refuses the same: vmap cannot write B sets of statistics into one buffer.
        raise RuntimeError(_VMAP_STATS_ERROR)
    if xd is None and rmd is None and rvd is None and nd is None:
        # Only the affine parameters are batched: normalise once, then apply each sample's.
        y, mean, rstd = _fn_ops.batch_norm_fwd(input, None, None, running_mean, running_var,
                                               num_batches_tracked, training, momentum, eps)
        shape = [b, 1, -1] + [1] * (input.dim() - 2)
        out = y.unsqueeze(0)
        if weight is not None:
            out = out * _to_front(weight, wd, b).reshape(shape)
        if bias is not None:
            out = out + _to_front(bias, bd, b).reshape(shape)
        out = out.to(y.dtype).expand(b, *y.shape).contiguous()
        return (out, mean, rstd), (0, None, None)
    if updates and nd is not None:
        # One counter per sample: increment them all, and with momentum=None each sample has its
        # own averaging factor, which one op call cannot take: one call per sample.
        nbt = num_batches_tracked.movedim(nd, 0)
        rm, rv = running_mean.movedim(rmd, 0), running_var.movedim(rvd, 0)
        x = _to_front(input, xd, b)
        w, bb = _to_front(weight, wd, b), _to_front(bias, bd, b)
        if momentum is not None:
            nbt.add_(1)
            nbt = [None] * b
        outs = [_fn_ops.batch_norm_fwd(x[i], None if w is None else w[i], None if bb is None else bb[i],
                                       rm[i], rv[i], nbt[i], training, momentum, eps) for i in range(b)]
        return tuple(torch.stack(t) for t in zip(*outs)), (0, 0, 0)
    # B blocks of channels: one op call normalises every vmapped sample with its own statistics.
    x = _channels_folded(_to_front(input, xd, b))
    stats = []
    for t, d in ((running_mean, rmd), (running_var, rvd)):
        if t is None:
            stats.append((None, None))
        elif d is None:
            stats.append((t.repeat(b), None))  # read only (eval)
        else:
            src = t.movedim(d, 0)
            flat = src.reshape(-1)
            stats.append((flat, src))
    y, mean, rstd = _fn_ops.batch_norm_fwd(
        x, _per_sample_vector(weight, wd, b), _per_sample_vector(bias, bd, b), stats[0][0],
        stats[1][0], num_batches_tracked, training, momentum, eps)
    if updates:
        for flat, src in stats:  # write back when reshape had to copy
            if flat.data_ptr() != src.data_ptr() or not src.is_contiguous():
                src.copy_(flat.view(src.shape))
    return (_channels_unfolded(y, b), mean.view(b, -1), rstd.view(b, -1)), (1, 0, 0)


@torch.library.register_vmap("fastnorm::batch_norm_bwd")
def _batch_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, training, output_mask):
    b = info.batch_size
    gd, xd, md, rd, wd = in_dims[:5]
    dy = _channels_folded(_to_front(grad_out, gd, b))
    x = _channels_folded(_to_front(input, xd, b))
    dx, dw, db = _fn_ops.batch_norm_bwd(dy, x, _per_sample_vector(mean, md, b),
                                        _per_sample_vector(rstd, rd, b),
                                        _per_sample_vector(weight, wd, b), training, output_mask)
    return ((_channels_unfolded(dx, b) if output_mask[0] else dx,
             dw.view(b, -1) if output_mask[1] else dw,
             db.view(b, -1) if output_mask[2] else db),
            (1 if output_mask[0] else None, 0 if output_mask[1] else None,
             0 if output_mask[2] else None))


def _ln2d_param(t: torch.Tensor, d: Optional[int], b: int, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector, batched or not, as [B, 1, C, 1...] against (B, N, C, *) x."""
    t = _to_front(t, d, b)
    return t.reshape(b, 1, t.shape[-1], *([1] * (x.dim() - 3)))


@torch.library.register_vmap("fastnorm::layer_norm2d_fwd")
def _layer_norm2d_fwd_vmap(info, in_dims, input, weight, bias, eps, out_dtype=None):
    xd, wd, bd = in_dims[:3]
    b = info.batch_size
    x = _to_front(input, xd, b)  # (B, N, C, *)
    m = _ln2d_positions(x[0]) if b else 0
    if wd is None and bd is None:
        # The vmapped dimension is one more sample dimension: (B * N, C, *).
        y, mean, rstd = _fn_ops.layer_norm2d_fwd(x.flatten(0, 1), weight, bias, eps, out_dtype)
        return (y.reshape(x.shape), mean.view(b, m), rstd.view(b, m)), (0, 0, 0)
    # Batched affine parameters: the statistics of one unweighted call, then each sample's
    # weight and bias applied to xhat in the statistics dtype, rounded once (as the op does).
    y, mean, rstd = _fn_ops.layer_norm2d_fwd(x.flatten(0, 1), None, None, eps, out_dtype)
    sd = stat_dtype(input.dtype)
    stat = (b, x.shape[1], 1, *x.shape[3:])
    out = (x.to(sd) - mean.view(stat)) * rstd.view(stat)
    if weight is not None:
        out = out * _ln2d_param(weight, wd, b, x).to(sd)
    if bias is not None:
        out = out + _ln2d_param(bias, bd, b, x).to(sd)
    out = out.to(y.dtype).contiguous()
    return (out, mean.view(b, m), rstd.view(b, m)), (0, 0, 0)


@torch.library.register_vmap("fastnorm::layer_norm2d_bwd")
def _layer_norm2d_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, output_mask):
    b = info.batch_size
    gd, xd, md, rd, wd = in_dims[:5]
    dy, x = _to_front(grad_out, gd, b), _to_front(input, xd, b)  # (B, N, C, *)
    m, r = _to_front(mean, md, b).reshape(-1), _to_front(rstd, rd, b).reshape(-1)
    sd = stat_dtype(input.dtype)
    dx = _empty(input)
    if output_mask[0]:
        if wd is None:
            dx = _fn_ops.layer_norm2d_bwd(dy.flatten(0, 1), x.flatten(0, 1), m, r, weight,
                                          [True, False, False])[0]
        else:  # dx depends on the weight only through dy * weight (float32 or float64 here)
            g = dy.to(sd) * _ln2d_param(weight, wd, b, x).to(sd)
            dx = _fn_ops.layer_norm2d_bwd(g.flatten(0, 1), x.flatten(0, 1), m, r, None,
                                          [True, False, False])[0]
        dx = dx.reshape(x.shape)
    wdt = weight.dtype if weight is not None else input.dtype
    dw = db = _empty(input, wdt)
    if output_mask[1] or output_mask[2]:
        # Per-sample parameter gradients: sums over each sample's (n, position) only.
        dims = [1] + list(range(3, x.dim()))
        g = dy.to(sd)
        if output_mask[1]:
            stat = (b, x.shape[1], 1, *x.shape[3:])
            xhat = (x.to(sd) - m.view(stat)) * r.view(stat)
            dw = (g * xhat).sum(dims).to(wdt)
        if output_mask[2]:
            db = g.sum(dims).to(wdt)
    return (dx, dw, db), (0 if output_mask[0] else None, 0 if output_mask[1] else None,
                          0 if output_mask[2] else None)


# RMSNorm and add_norm batching rules: the vmapped dimension is one more row dimension; batched
# affine parameters (model ensembles) are applied per sample to the unweighted normalisation in
# the statistics dtype and rounded once, as the ops do.
def _row_param(t: torch.Tensor, d: Optional[int], b: int, lead: int) -> torch.Tensor:
    """A normalized_shape parameter, batched or not, as [B, 1 (x lead), *normalized_shape]."""
    t = _to_front(t, d, b)
    return t.reshape(b, *([1] * lead), *t.shape[1:])


def _row_sums(t: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample sums over the row dims of a (B, *rows, *normalized_shape) tensor."""
    rows = list(range(1, t.dim() - k))
    return t.sum(rows) if rows else t


@torch.library.register_vmap("fastnorm::rms_norm_fwd")
def _rms_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, eps, out_dtype=None):
    xd, _, wd = in_dims[:3]
    b = info.batch_size
    if wd is None:
        y, rstd = _fn_ops.rms_norm_fwd(input.movedim(xd, 0), normalized_shape, weight, eps, out_dtype)
        return (y, rstd.view(b, -1)), (0, 0)
    x = input if xd is None else input.movedim(xd, 0)
    sd = stat_dtype(input.dtype)
    xhat, rstd = _fn_ops.rms_norm_fwd(x, normalized_shape, None, eps,
                                      None if sd == input.dtype else torch.float32)
    lead = x.dim() - len(normalized_shape) - (0 if xd is None else 1)
    out = xhat if xd is not None else xhat.unsqueeze(0)
    out = (out.to(sd) * _row_param(weight, wd, b, lead).to(sd)).to(out_dtype or input.dtype)
    out = out.expand(b, *out.shape[1:]).contiguous()
    if xd is None:
        return (out, rstd), (0, None)
    return (out, rstd.view(b, -1)), (0, 0)


@torch.library.register_vmap("fastnorm::rms_norm_bwd")
def _rms_norm_bwd_vmap(info, in_dims, grad_out, input, rstd, weight, normalized_shape, output_mask):
    b = info.batch_size
    gd, xd, rd, wd = in_dims[:4]
    dy, x = _to_front(grad_out, gd, b), _to_front(input, xd, b)
    r = _to_front(rstd, rd, b).reshape(-1)
    k = len(normalized_shape)
    sd = stat_dtype(input.dtype)
    dx = _empty(input)
    if output_mask[0]:
        if wd is None:
            dx = _fn_ops.rms_norm_bwd(dy, x, r, weight, normalized_shape, [True, False])[0]
        else:  # dx depends on the weight only through dy * weight (float32 or float64 here)
            g = dy.to(sd) * _row_param(weight, wd, b, x.dim() - 1 - k).to(sd)
            dx = _fn_ops.rms_norm_bwd(g, x, r, None, normalized_shape, [True, False])[0]
    wdt = weight.dtype if weight is not None else input.dtype
    dw = _empty(input, wdt)
    if output_mask[1]:
        xhat = x.to(sd) * r.view(_stat_view(x, normalized_shape))
        dw = _row_sums(dy.to(sd) * xhat, k).to(wdt)
    return (dx, dw), (0 if output_mask[0] else None, 0 if output_mask[1] else None)


@torch.library.register_vmap("fastnorm::add_norm_fwd")
def _add_norm_fwd_vmap(info, in_dims, input, residual, normalized_shape, weight, bias, eps, rms):
    xd, rd, _, wd, bd = in_dims[:5]
    b = info.batch_size
    x, res = _to_front(input, xd, b), _to_front(residual, rd, b)
    dims = (0, 0, None if rms else 0, 0)
    if wd is None and bd is None:
        out, r, mean, rstd = _fn_ops.add_norm_fwd(x, res, normalized_shape, weight, bias, eps, rms)
        return (out, r, mean if rms else mean.view(b, -1), rstd.view(b, -1)), dims
    _, r, mean, rstd = _fn_ops.add_norm_fwd(x, res, normalized_shape, None, None, eps, rms)
    sd = stat_dtype(input.dtype)
    view = _stat_view(r, normalized_shape)
    rs = r.to(sd)
    out = (rs if rms else rs - mean.view(view)) * rstd.view(view)
    lead = x.dim() - 1 - len(normalized_shape)
    if weight is not None:
        out = out * _row_param(weight, wd, b, lead).to(sd)
    if bias is not None:
        out = out + _row_param(bias, bd, b, lead).to(sd)
    out = out.to(input.dtype).contiguous()
    return (out, r, mean if rms else mean.view(b, -1), rstd.view(b, -1)), dims


@torch.library.register_vmap("fastnorm::add_norm_bwd")
def _add_norm_bwd_vmap(info, in_dims, grad_out, grad_residual_out, residual_out, mean, rstd,
                       weight, normalized_shape, rms, input_dtype, output_mask):
    b = info.batch_size
    gd, grd, rod, md, rsd, wd = in_dims[:6]
    k = len(normalized_shape)
    dy, r = _to_front(grad_out, gd, b), _to_front(residual_out, rod, b)
    dro = None if grad_residual_out is None else _to_front(grad_residual_out, grd, b)
    m = mean if rms else _to_front(mean, md, b).reshape(-1)
    rs = _to_front(rstd, rsd, b).reshape(-1)
    sd = stat_dtype(input_dtype)
    view = _stat_view(r, normalized_shape)
    dx = _empty(residual_out, input_dtype)
    dres = _empty(residual_out)
    if output_mask[0] or output_mask[1]:
        if wd is None:
            dx, dres, _, _ = _fn_ops.add_norm_bwd(dy, dro, r, m, rs, weight, normalized_shape, rms,
                                                  input_dtype, [output_mask[0], output_mask[1],
                                                                False, False])
        else:  # per-sample weights: the op's formula, in the statistics dtype
            xhat = (r.to(sd) if rms else r.to(sd) - m.view(view)) * rs.view(view)
            g = dy.to(sd) * _row_param(weight, wd, b, r.dim() - 1 - k).to(sd)
            d_r = _norm_dx(g, xhat, rs.view(view), _norm_dims(r, normalized_shape), rms)
            if dro is not None:
                d_r = d_r + dro.to(sd)
            if output_mask[0]:
                dx = d_r.to(input_dtype)
            if output_mask[1]:
                dres = d_r.to(residual_out.dtype, copy=True)
    wdt = weight.dtype if weight is not None else input_dtype
    dw = db = _empty(residual_out, wdt)
    if output_mask[2]:
        xhat = (r.to(sd) if rms else r.to(sd) - m.view(view)) * rs.view(view)
        dw = _row_sums(dy.to(sd) * xhat, k).to(wdt)
    if output_mask[3] and not rms:
        db = _row_sums(dy.to(sd), k).to(wdt)
    return ((dx, dres, dw, db),
            tuple(0 if on and (i < 3 or not rms) else None for i, on in enumerate(output_mask)))

_fn_ops = torch.ops.fastnorm
