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
                      "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)",
    "layer_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "int[] normalized_shape, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "group_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps, "
                      "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)",
    "group_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "int num_groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "batch_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
                      "float? momentum, float eps) -> (Tensor, Tensor, Tensor)",
    "batch_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
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
    n = math.prod(normalized_shape)
    return x.numel() // n if n else 0


@torch.library.impl(lib, "layer_norm_fwd", "CompositeExplicitAutograd")
def _layer_norm_fwd_ref(input, normalized_shape, weight, bias, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    y, mean, rstd = torch.native_layer_norm(x, list(normalized_shape), weight, bias, eps)
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    return y.contiguous(), mean.reshape(m).to(sd), rstd.reshape(m).to(sd)


@torch.library.impl(lib, "layer_norm_bwd", "CompositeExplicitAutograd")
def _layer_norm_bwd_ref(grad_out, input, mean, rstd, weight, normalized_shape, output_mask):
    in_dtype = input.dtype
    if grad_out.dtype != input.dtype:  # autocast: the forward normalised a float32 copy
        input = input.to(grad_out.dtype)
    dy, x, w, sd = _ref_inputs(grad_out, input, weight)
    k = len(normalized_shape)
    stat_shape = list(x.shape[: x.dim() - k]) + [1] * k
    md = sd or _aten_stat_dtype(x, w)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, list(normalized_shape), mean.reshape(stat_shape).to(md),
        rstd.reshape(stat_shape).to(md), w, w, list(output_mask))
    wd = weight.dtype if weight is not None else in_dtype
    return (dx.to(in_dtype) if output_mask[0] else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


@torch.library.register_fake("fastnorm::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps, out_dtype=None):
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    y = input.new_empty(input.shape, dtype=out_dtype or input.dtype)
    return y, input.new_empty((m,), dtype=sd), input.new_empty((m,), dtype=sd)


@torch.library.register_fake("fastnorm::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, mean, rstd, weight, normalized_shape, output_mask):
    wd = weight.dtype if weight is not None else input.dtype
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else _empty(input),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# GroupNorm (InstanceNorm is GroupNorm with one group per channel)
# ----------------------------------------------------------------------------------------------
@torch.library.impl(lib, "group_norm_fwd", "CompositeExplicitAutograd")
def _group_norm_fwd_ref(input, weight, bias, num_groups, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    n, c = x.shape[0], x.shape[1]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, _spatial(x), num_groups, eps)
    sd = stat_dtype(input.dtype)
    y = y.contiguous(memory_format=memory_format_of(input))
    return y, mean.reshape(n, num_groups).to(sd), rstd.reshape(n, num_groups).to(sd)


@torch.library.impl(lib, "group_norm_bwd", "CompositeExplicitAutograd")
def _group_norm_bwd_ref(grad_out, input, mean, rstd, weight, num_groups, output_mask):
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
def _group_norm_fwd_fake(input, weight, bias, num_groups, eps, out_dtype=None):
    sd = stat_dtype(input.dtype)
    y = torch.empty_like(input, dtype=out_dtype or input.dtype, memory_format=memory_format_of(input))
    n = input.shape[0]
    return y, input.new_empty((n, num_groups), dtype=sd), input.new_empty((n, num_groups), dtype=sd)


@torch.library.register_fake("fastnorm::group_norm_bwd")
def _group_norm_bwd_fake(grad_out, input, mean, rstd, weight, num_groups, output_mask):
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
