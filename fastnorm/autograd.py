"""Autograd for the fastnorm:: ops.

LayerNorm and GroupNorm ops are functional: `torch.library.register_autograd`.
BatchNorm's forward op updates the running statistics in place, which register_autograd refuses,
so it is wrapped in a `torch.autograd.Function` (traced by torch.compile without graph breaks).

Backward: the fused backward op; but when the backward itself must be differentiable (double
backward: grad mode is on inside backward) it is written out with differentiable torch ops,
recomputing the statistics from x so that second derivatives through mean and rstd are right.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (defines the ops)
from .ops import stat_dtype

_fn = torch.ops.fastnorm


def _normalization_grads(x, dy, weight, eps, group, group_dims, affine_shape, param_dims, needs):
    """(dx, dweight, dbias) of y = xhat * weight + bias, xhat normalised over `group_dims` of
    group(x), as differentiable torch ops in the statistics dtype.

    group: reshapes an x-shaped tensor so that its statistics reduce over group_dims;
    affine_shape: how weight broadcasts against x; param_dims: x's dims summed for dweight/dbias.
    """
    sd = stat_dtype(x.dtype)
    xs, g = x.to(sd), dy.to(sd)
    xg = group(xs)
    mu = xg.mean(group_dims, keepdim=True)
    rstd = torch.rsqrt((xg - mu).square().mean(group_dims, keepdim=True) + eps)
    xhat_g = (xg - mu) * rstd
    xhat = xhat_g.reshape(x.shape)
    dx = dw = db = None
    if needs[0]:
        gw = group(g if weight is None else g * weight.to(sd).reshape(affine_shape))
        dx = rstd * (gw - gw.mean(group_dims, keepdim=True)
                     - xhat_g * (gw * xhat_g).mean(group_dims, keepdim=True))
        dx = dx.reshape(x.shape).to(x.dtype)
    if needs[1] and weight is not None:
        dw = (g * xhat).sum(param_dims).reshape(weight.shape).to(weight.dtype)
    if needs[2]:
        db = g.sum(param_dims)  # the caller shapes it like bias
    return dx, dw, db


def _channel_dims(x):
    """(N, C, *spatial): the dims other than C, and the broadcast shape of a per-channel vector."""
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def _ln_setup(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps, *_ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.eps = eps


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if torch.is_grad_enabled():
        k = len(ctx.normalized_shape)
        rows = list(range(x.dim() - k))
        dx, dw, db = _normalization_grads(
            x, dy, w, ctx.eps, lambda t: t, list(range(x.dim() - k, x.dim())),
            ctx.normalized_shape, rows, (needs[0], needs[1], needs[2] and b is not None))
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.layer_norm_bwd(dy, x, mean, rstd, w, ctx.normalized_shape, mask)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, None, dw, db, None, None


torch.library.register_autograd("fastnorm::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)


# ----------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# ----------------------------------------------------------------------------------------------
def _gn_setup(ctx, inputs, output):
    input, weight, bias, num_groups, eps, *_ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.num_groups = num_groups
    ctx.eps = eps


def _gn_backward(ctx, dy, _dmean, _drstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if torch.is_grad_enabled():
        n, g = x.shape[0], ctx.num_groups
        param_dims, affine_shape = _channel_dims(x)
        dx, dw, db = _normalization_grads(
            x, dy, w, ctx.eps, lambda t: t.reshape(n, g, -1), [2], affine_shape, param_dims,
            (needs[0], needs[1], needs[2] and b is not None))
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.group_norm_bwd(dy, x, mean, rstd, w, ctx.num_groups, mask)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, dw, db, None, None, None


torch.library.register_autograd("fastnorm::group_norm_fwd", _gn_backward, setup_context=_gn_setup)


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
def _frozen_statistics_grads(x, dy, w, mean, rstd, dims, shape, needs):
    sd = stat_dtype(x.dtype)
    g, r = dy.to(sd), rstd.reshape(shape)
    dx = dw = db = None
    if needs[0]:
        dx = (g * (r if w is None else r * w.to(sd).reshape(shape))).to(x.dtype)
    if needs[1] and w is not None:
        dw = (g * (x.to(sd) - mean.reshape(shape)) * r).sum(dims).to(w.dtype)
    if needs[2]:
        db = g.sum(dims)
    return dx, dw, db


class BatchNormFunction(torch.autograd.Function):
    """(y, mean, rstd) = batch_norm(x); the op also updates running statistics (state, not
    differentiable). forward/setup_context are separate so torch.func transforms accept it."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps):
        return _fn.batch_norm_fwd(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, _, training, _, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.training = training
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, w, b, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            needs = (needs[0], needs[1], needs[2] and b is not None)
            dims, shape = _channel_dims(x)
            if ctx.training:
                dx, dw, db = _normalization_grads(x, dy, w, ctx.eps, lambda t: t, dims, shape,
                                                  dims, needs)
            else:  # frozen statistics: y is an affine map of x
                dx, dw, db = _frozen_statistics_grads(x, dy, w, mean, rstd, dims, shape, needs)
            db = None if db is None else db.reshape(b.shape).to(b.dtype)
        else:
            mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
            dx, dw, db = _fn.batch_norm_bwd(dy, x, mean, rstd, w, ctx.training, mask)
            dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
        return dx, dw, db, None, None, None, None, None, None
