"""Autograd for the fastnorm:: ops.

LayerNorm and GroupNorm ops are functional: `torch.library.register_autograd`.
BatchNorm's forward op updates the running statistics in place, which register_autograd refuses,
so it is wrapped in a `torch.autograd.Function` (traced by torch.compile without graph breaks).

Backward: the fused backward op; but when the backward itself must be differentiable (double
backward, create_graph=True, grad mode on inside backward) the gradient is taken through a
recomputed forward written with differentiable torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops as _ops  # noqa: F401  (defines the ops)

_fn = torch.ops.fastnorm


def _differentiable_grads(forward, dy, tensors, needs):
    """Gradients of forward(*tensors) against dy, as a differentiable graph (double backward)."""
    wanted = [t for t, n in zip(tensors, needs) if n and t is not None]
    with torch.enable_grad():
        y = forward(*tensors)
        got = torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True)
    it = iter(got)
    return [next(it) if (n and t is not None) else None for t, n in zip(tensors, needs)]


def _as_output_dtype(x, dy):
    # under autocast the forward normalised a float32 copy of a half input
    return x if dy.dtype == x.dtype else x.to(dy.dtype)


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
        fwd = lambda x_, w_, b_: F.layer_norm(_as_output_dtype(x_, dy), ctx.normalized_shape, w_, b_, ctx.eps)
        dx, dw, db = _differentiable_grads(fwd, dy, (x, w, b), needs)
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
        fwd = lambda x_, w_, b_: F.group_norm(_as_output_dtype(x_, dy), ctx.num_groups, w_, b_, ctx.eps)
        dx, dw, db = _differentiable_grads(fwd, dy, (x, w, b), needs)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.group_norm_bwd(dy, x, mean, rstd, w, ctx.num_groups, mask)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, dw, db, None, None, None


torch.library.register_autograd("fastnorm::group_norm_fwd", _gn_backward, setup_context=_gn_setup)


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
class BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x); the op also updates running statistics (not differentiable state)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps):
        y, mean, rstd = _fn.batch_norm_fwd(input, weight, bias, running_mean, running_var,
                                           num_batches_tracked, training, momentum, eps)
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.training = training
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            if ctx.training:
                fwd = lambda x_, w_, b_: F.batch_norm(x_, None, None, w_, b_, True, 0.0, ctx.eps)
            else:  # frozen statistics: an affine map of x
                def fwd(x_, w_, b_):
                    shape = [1, -1] + [1] * (x_.dim() - 2)
                    y = (x_ - mean.reshape(shape)) * rstd.reshape(shape)
                    y = y if w_ is None else y * w_.reshape(shape)
                    return y if b_ is None else y + b_.reshape(shape)
            dx, dw, db = _differentiable_grads(fwd, dy, (x, w, b), needs)
        else:
            mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
            dx, dw, db = _fn.batch_norm_bwd(dy, x, mean, rstd, w, ctx.training, mask)
            dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
        return dx, dw, db, None, None, None, None, None, None
