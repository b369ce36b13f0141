"""Autograd for the fastnorm:: ops.

Each norm is a `torch.autograd.Function` written the way torch.func needs it: `forward` (the op)
and `setup_context` separate, `generate_vmap_rule = True` (the ops carry their own batching rules,
fastnorm/ops/, and everything else here is plain torch ops), and a `jvp` for forward-mode AD.
So `torch.func.grad`, `vjp`, `jacrev`, `jacfwd`, `jvp`, `vmap` and their compositions (per-sample
gradients: `vmap(grad(...))`) work, and plain autograd and forward AD (`torch.autograd.forward_ad`)
too. BatchNorm's forward op updates the running statistics in place (state, not differentiable).

The LayerNorm and GroupNorm ops also keep a `torch.library.register_autograd` registration, so a
direct call of `torch.ops.fastnorm.layer_norm_fwd` / `group_norm_fwd` is differentiable; the
library's generated Function has no setup_context, so torch.func transforms refuse that one: the
functional API uses the Functions below.

torch.compile refuses an autograd.Function with a custom `jvp` (graph break "Unsupported custom
jvp"), so each Function comes twice: the base class without `jvp`, used while compiling, and a
subclass with `jvp`, used eagerly. The `apply_*` functions at the end pick.

Backward: the fused backward op; but when the backward itself must be differentiable (double
backward, or any torch.func transform: grad mode is on inside backward) it is written out with
differentiable torch ops, recomputing the statistics from x so that second derivatives through
mean and rstd are right.
"""
from __future__ import annotations

import torch

from . import activations as _acts
from .ops.common import memory_format_of, stat_dtype
from .ops import modulated as _modulated
from .ops import row_norms as _row_norms
from .ops.local_response_norm import lrn_div, lrn_grad, lrn_window

_fn = torch.ops.fastnorm


def _act_dz(g, xhat, weight, bias, affine_shape, act):
    """dz = dy * act'(z), z = xhat * weight + bias (statistics dtype, differentiable); g as it is
    without an activation (act None or code 0)."""
    if act is None or act[0] == 0:
        return g
    z = xhat if weight is None else xhat * weight.to(g.dtype).reshape(affine_shape)
    if bias is not None:
        z = z + bias.to(g.dtype).reshape(affine_shape)
    return g * _acts.derivative(act[0], z, act[1])


def _normalization_grads(x, dy, weight, eps, group, group_dims, affine_shape, param_dims, needs,
                         bias=None, act=None):
    """(dx, dweight, dbias) of y = act(xhat * weight + bias), xhat normalised over `group_dims` of
    group(x), as differentiable torch ops in the statistics dtype.

    group: reshapes an x-shaped tensor so that its statistics reduce over group_dims;
    affine_shape: how weight broadcasts against x; param_dims: x's dims summed for dweight/dbias;
    act: (activation code, param) of a fused activation, or None.
    """
    sd = stat_dtype(x.dtype)
    xs, g = x.to(sd), dy.to(sd)
    xg = group(xs)
    mu = xg.mean(group_dims, keepdim=True)
    rstd = torch.rsqrt((xg - mu).square().mean(group_dims, keepdim=True) + eps)
    xhat_g = (xg - mu) * rstd
    xhat = xhat_g.reshape(x.shape)
    g = _act_dz(g, xhat, weight, bias, affine_shape, act)
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


def _normalization_jvp(x, mean, rstd, weight, tx, tw, tb, group, group_dims, stat_shape,
                       affine_shape, out_dtype, bias=None, act=None):
    """Tangent of y = act(xhat * weight + bias) (xhat normalised over `group_dims` of group(x),
    with the forward's statistics mean/rstd, viewed as `stat_shape` against group(x)) for
    tangents tx, tw, tb of x, weight, bias (each may be None); act: (code, param) or None."""
    sd = stat_dtype(x.dtype)
    xg = group(x.to(sd))
    r = rstd.reshape(stat_shape)
    xhat_g = (xg - mean.reshape(stat_shape)) * r
    out = None
    if tx is not None:
        tg = group(tx.to(sd))
        t = r * (tg - tg.mean(group_dims, keepdim=True)
                 - xhat_g * (tg * xhat_g).mean(group_dims, keepdim=True))
        t = t.reshape(x.shape)
        out = t if weight is None else t * weight.to(sd).reshape(affine_shape)
    if tw is not None:
        t = xhat_g.reshape(x.shape) * tw.to(sd).reshape(affine_shape)
        out = t if out is None else out + t
    if tb is not None:
        t = tb.to(sd).reshape(affine_shape)
        out = t.expand(x.shape) if out is None else out + t
    if out is not None and act is not None and act[0] != 0:
        out = _act_dz(out, xhat_g.reshape(x.shape), weight, bias, affine_shape, act)
    return _tangent(out, x, out_dtype)


def _tangent(t, x, out_dtype):
    """The output tangent in y's dtype and memory format (zeros when no input has one)."""
    if t is None:
        return torch.zeros_like(x, dtype=out_dtype)
    return t.to(out_dtype).contiguous(memory_format=memory_format_of(x))


def _channel_dims(x):
    """(N, C, *spatial): the dims other than C, and the broadcast shape of a per-channel vector."""
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)


def _save(ctx, *tensors):
    """Saved for backward and for forward-mode AD (jvp) alike."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _applier(eager_cls, compiled_cls, nargs=None):
    """eager_cls.apply, or compiled_cls.apply (the same Function without jvp) while torch.compile
    traces: dynamo refuses a custom jvp, and forward-mode AD does not run under torch.compile.
    nargs: the Function's argument count; the fused activation's two trailing arguments default
    to identity (activation=0, activation_param=0.0) when a caller leaves them out."""
    def apply(*args):
        if nargs is not None and len(args) == nargs - 2:
            args = (*args, 0, 0.0)
        if torch.compiler.is_compiling():
            return compiled_cls.apply(*args)
        return eager_cls.apply(*args)
    apply.__name__ = apply.__qualname__ = f"apply_{eager_cls.__name__}"
    return apply


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def _act_of(inputs, index):
    """(activation, activation_param) from the Function's or op's inputs (absent: identity)."""
    rest = list(inputs[index:index + 2]) + [0, 0.0][len(inputs[index:index + 2]):]
    return int(rest[0]), float(rest[1])


def _ln_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, normalized_shape, weight, bias, eps, *_ = inputs
    _, mean, rstd = output
    save(ctx, input, weight, bias, mean, rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.eps = eps
    ctx.act = _act_of(inputs, 6)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if torch.is_grad_enabled():
        k = len(ctx.normalized_shape)
        rows = list(range(x.dim() - k))
        dx, dw, db = _normalization_grads(
            x, dy, w, ctx.eps, lambda t: t, list(range(x.dim() - k, x.dim())),
            ctx.normalized_shape, rows, (needs[0], needs[1], needs[2] and b is not None), b, ctx.act)
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.layer_norm_bwd(dy, x, mean, rstd, w, ctx.normalized_shape, mask, b,
                                        *ctx.act)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, None, dw, db, None, None


# A direct call of the op stays differentiable (plain autograd only, see the module docstring).
torch.library.register_autograd(
    "fastnorm::layer_norm_fwd", lambda ctx, dy, dm, dr: (*_ln_backward(ctx, dy, dm, dr), None, None),
    setup_context=_ln_setup)


class _LayerNormFunction(torch.autograd.Function):
    """(y, mean, rstd) = layer_norm(x); mean and rstd are not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, normalized_shape, weight, bias, eps, out_dtype, activation, activation_param):
        return _fn.layer_norm_fwd(input, normalized_shape, weight, bias, eps, out_dtype, activation,
                                  activation_param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _ln_setup(ctx, inputs, output, _save)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return (*_ln_backward(ctx, dy, dmean, drstd), None, None)


class LayerNormFunction(_LayerNormFunction):
    @staticmethod
    def jvp(ctx, tx, _tshape, tw, tb, _teps, _tdtype, _tact, _tparam):
        x, w, b, mean, rstd = ctx.saved_tensors
        k = len(ctx.normalized_shape)
        ty = _normalization_jvp(x, mean, rstd, w, tx, tw, tb, lambda t: t,
                                list(range(x.dim() - k, x.dim())),
                                list(x.shape[: x.dim() - k]) + [1] * k, ctx.normalized_shape,
                                ctx.y_dtype, b, ctx.act)
        return ty, None, None


# ----------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# ----------------------------------------------------------------------------------------------
def _gn_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, weight, bias, num_groups, eps, *_ = inputs
    _, mean, rstd = output
    save(ctx, input, weight, bias, mean, rstd)
    ctx.num_groups = num_groups
    ctx.eps = eps
    ctx.act = _act_of(inputs, 6)


def _gn_backward(ctx, dy, _dmean, _drstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if torch.is_grad_enabled():
        n, g = x.shape[0], ctx.num_groups
        param_dims, affine_shape = _channel_dims(x)
        dx, dw, db = _normalization_grads(
            x, dy, w, ctx.eps, lambda t: t.reshape(n, g, -1), [2], affine_shape, param_dims,
            (needs[0], needs[1], needs[2] and b is not None), b, ctx.act)
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.group_norm_bwd(dy, x, mean, rstd, w, ctx.num_groups, mask, b, *ctx.act)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, dw, db


torch.library.register_autograd(
    "fastnorm::group_norm_fwd",
    lambda ctx, dy, dm, dr: (*_gn_backward(ctx, dy, dm, dr), None, None, None, None, None),
    setup_context=_gn_setup)


def _gn_jvp(ctx, tx, tw, tb):
    x, w, b, mean, rstd = ctx.saved_tensors
    n, g = x.shape[0], ctx.num_groups
    _, affine_shape = _channel_dims(x)
    return _normalization_jvp(x, mean, rstd, w, tx, tw, tb, lambda t: t.reshape(n, g, -1), [2],
                              [n, g, 1], affine_shape, ctx.y_dtype, b, getattr(ctx, "act", None))


class _GroupNormFunction(torch.autograd.Function):
    """(y, mean, rstd) = group_norm(x); mean and rstd are not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, num_groups, eps, out_dtype, activation, activation_param):
        return _fn.group_norm_fwd(input, weight, bias, num_groups, eps, out_dtype, activation,
                                  activation_param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _gn_setup(ctx, inputs, output, _save)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return (*_gn_backward(ctx, dy, dmean, drstd), None, None, None, None, None)


class GroupNormFunction(_GroupNormFunction):
    @staticmethod
    def jvp(ctx, tx, tw, tb, _tgroups, _teps, _tdtype, _tact, _tparam):
        return _gn_jvp(ctx, tx, tw, tb), None, None


class _InstanceNormTrackedFunction(torch.autograd.Function):
    """Instance normalisation in training with tracked running statistics, as torch computes it:
    BatchNorm over (1, N*C, *) with the running buffers repeated N times, then averaged back into
    the module's buffers (in place, here in forward: below every torch.func level, as torch's own
    instance_norm does it in C++). Per-instance statistics: the backward and jvp are GroupNorm's
    with one group per channel; (y, mean [N, C], rstd [N, C])."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, momentum, eps, update):
        n, c = input.shape[0], input.shape[1]
        x = input.reshape(1, n * c, *input.shape[2:])
        rm, rv = running_mean.repeat(n), running_var.repeat(n)
        w = weight.repeat(n) if weight is not None else None
        b = bias.repeat(n) if bias is not None else None
        y, mean, rstd = _fn.batch_norm_fwd(x, w, b, rm, rv, None, True, momentum, eps)
        if n > 0 and update:
            running_mean.copy_(rm.view(n, c).mean(0))
            running_var.copy_(rv.view(n, c).mean(0))
        y = y.reshape(input.shape).contiguous(memory_format=memory_format_of(input))
        return y, mean.view(n, c), rstd.view(n, c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, _, eps, _ = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _save(ctx, input, weight, bias, mean, rstd)
        ctx.num_groups = input.shape[1]
        ctx.eps = eps
        ctx.act = (0, 0.0)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return (*_gn_backward(ctx, dy, dmean, drstd), None, None, None, None, None)


class InstanceNormTrackedFunction(_InstanceNormTrackedFunction):
    @staticmethod
    def jvp(ctx, tx, tw, tb, *_):
        return _gn_jvp(ctx, tx, tw, tb), None, None


# ----------------------------------------------------------------------------------------------
# BatchNorm
# ----------------------------------------------------------------------------------------------
def _frozen_statistics_grads(x, dy, w, mean, rstd, dims, shape, needs, b=None, act=None):
    sd = stat_dtype(x.dtype)
    g, r = dy.to(sd), rstd.reshape(shape)
    if act is not None and act[0] != 0:
        g = _act_dz(g, (x.to(sd) - mean.reshape(shape)) * r, w, b, shape, act)
    dx = dw = db = None
    if needs[0]:
        dx = (g * (r if w is None else r * w.to(sd).reshape(shape))).to(x.dtype)
    if needs[1] and w is not None:
        dw = (g * (x.to(sd) - mean.reshape(shape)) * r).sum(dims).to(w.dtype)
    if needs[2]:
        db = g.sum(dims)
    return dx, dw, db


class _BatchNormFunction(torch.autograd.Function):
    """(y, mean, rstd) = batch_norm(x); the op also updates running statistics (state, not
    differentiable). forward/setup_context are separate so torch.func transforms accept it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, activation, activation_param):
        return _fn.batch_norm_fwd(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, training, momentum, eps, activation,
                                  activation_param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, _, training, _, eps = inputs[:9]
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _save(ctx, input, weight, bias, mean, rstd)
        ctx.training = training
        ctx.eps = eps
        ctx.act = _act_of(inputs, 9)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, w, b, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            needs = (needs[0], needs[1], needs[2] and b is not None)
            dims, shape = _channel_dims(x)
            if ctx.training:
                dx, dw, db = _normalization_grads(x, dy, w, ctx.eps, lambda t: t, dims, shape,
                                                  dims, needs, b, ctx.act)
            else:  # frozen statistics: y is an affine map of x (then the activation)
                dx, dw, db = _frozen_statistics_grads(x, dy, w, mean, rstd, dims, shape, needs,
                                                      b, ctx.act)
            db = None if db is None else db.reshape(b.shape).to(b.dtype)
        else:
            mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
            dx, dw, db = _fn.batch_norm_bwd(dy, x, mean, rstd, w, ctx.training, mask, b, *ctx.act)
            dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
        return dx, dw, db, None, None, None, None, None, None, None, None


class BatchNormFunction(_BatchNormFunction):
    @staticmethod
    def jvp(ctx, tx, tw, tb, *_):
        x, w, b, mean, rstd = ctx.saved_tensors
        dims, shape = _channel_dims(x)
        if ctx.training:
            ty = _normalization_jvp(x, mean, rstd, w, tx, tw, tb, lambda t: t, dims, shape, shape,
                                    x.dtype, b, ctx.act)
        else:  # frozen statistics: y = (x - mean) * rstd * weight + bias
            sd = stat_dtype(x.dtype)
            r = rstd.reshape(shape)
            ty = None
            if tx is not None:
                ty = tx.to(sd) * (r if w is None else r * w.to(sd).reshape(shape))
            if tw is not None:
                t = (x.to(sd) - mean.reshape(shape)) * r * tw.to(sd).reshape(shape)
                ty = t if ty is None else ty + t
            if tb is not None:
                t = tb.to(sd).reshape(shape)
                ty = t.expand(x.shape) if ty is None else ty + t
            if ty is not None and ctx.act[0] != 0:
                ty = _act_dz(ty, (x.to(sd) - mean.reshape(shape)) * r, w, b, shape, ctx.act)
            ty = _tangent(ty, x, x.dtype)
        return ty, None, None


# ----------------------------------------------------------------------------------------------
# RMSNorm and the fused residual-add norms
# ----------------------------------------------------------------------------------------------
def _trailing(x, k):
    """(normalised dims, row dims) of x for a normalized_shape of k dims."""
    return list(range(x.dim() - k, x.dim())), list(range(x.dim() - k))


def _row_sum(t, rows):
    return t.sum(rows) if rows else t  # sum([]) would reduce every dim


def _norm_input_grad(g, xhat, rstd, dims, rms):
    """dx of xhat = norm(x), given g = dy * weight (statistics dtype, differentiable)."""
    proj = xhat * (g * xhat).mean(dims, keepdim=True)
    if rms:
        return rstd * (g - proj)
    return rstd * (g - g.mean(dims, keepdim=True) - proj)


def _recomputed_xhat(xs, dims, eps, rms):
    """(xhat, rstd) recomputed from x with differentiable ops, for second derivatives."""
    if rms:
        rstd = torch.rsqrt(xs.square().mean(dims, keepdim=True) + eps)
        return xs * rstd, rstd
    mu = xs.mean(dims, keepdim=True)
    rstd = torch.rsqrt((xs - mu).square().mean(dims, keepdim=True) + eps)
    return (xs - mu) * rstd, rstd


def _rms_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, normalized_shape, weight, eps, *_ = inputs
    _, rstd = output
    save(ctx, input, weight, rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.eps = eps


def _rms_backward(ctx, dy, _drstd):
    x, w, rstd = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and w is not None]
    if torch.is_grad_enabled():
        dims, rows = _trailing(x, len(ctx.normalized_shape))
        sd = stat_dtype(x.dtype)
        g = dy.to(sd)
        xhat, r = _recomputed_xhat(x.to(sd), dims, ctx.eps, rms=True)
        dx = dw = None
        if needs[0]:
            gw = g if w is None else g * w.to(sd)
            dx = _norm_input_grad(gw, xhat, r, dims, rms=True).to(x.dtype)
        if needs[1]:
            dw = _row_sum(g * xhat, rows).to(w.dtype)
    else:
        dx, dw = _fn.rms_norm_bwd(dy, x, rstd, w, ctx.normalized_shape, needs)
        dx, dw = (t if m else None for t, m in zip((dx, dw), needs))
    return dx, None, dw, None, None, None


torch.library.register_autograd("fastnorm::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)


class _RMSNormFunction(torch.autograd.Function):
    """(y, rstd) = rms_norm(x); rstd is not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, normalized_shape, weight, eps, out_dtype, round_normalized):
        return _fn.rms_norm_fwd(input, normalized_shape, weight, eps, out_dtype, round_normalized)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, rstd = output
        ctx.mark_non_differentiable(rstd)
        _rms_setup(ctx, inputs, output, _save)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, drstd):
        return _rms_backward(ctx, dy, drstd)


class RMSNormFunction(_RMSNormFunction):
    @staticmethod
    def jvp(ctx, tx, _tshape, tw, _teps, _tdtype, _tround):
        x, w, rstd = ctx.saved_tensors
        k = len(ctx.normalized_shape)
        dims, _ = _trailing(x, k)
        sd = stat_dtype(x.dtype)
        r = rstd.reshape(list(x.shape[: x.dim() - k]) + [1] * k)
        xhat = x.to(sd) * r
        ty = None
        if tx is not None:
            ty = _norm_input_grad(tx.to(sd), xhat, r, dims, rms=True)  # self-adjoint
            if w is not None:
                ty = ty * w.to(sd)
        if tw is not None:
            t = xhat * tw.to(sd)
            ty = t if ty is None else ty + t
        if ty is None:
            return torch.zeros(x.shape, dtype=ctx.y_dtype, device=x.device), None
        return ty.to(ctx.y_dtype).contiguous(), None


# ----------------------------------------------------------------------------------------------
# Gated RMSNorm
# ----------------------------------------------------------------------------------------------
def _gated_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, gate, weight, eps, group_size, norm_before_gate, activation, _ = inputs
    save(ctx, input, gate, weight, output[1])
    ctx.gated = (float(eps), int(group_size), bool(norm_before_gate), int(activation))


def _gated_backward(ctx, dy, _drstd):
    x, gate, w, rstd = ctx.saved_tensors
    eps, group_size, norm_before_gate, activation = ctx.gated
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             ctx.needs_input_grad[2] and w is not None]
    if torch.is_grad_enabled():
        # Differentiable ATen ops with rstd recomputed from the inputs, so that second derivatives
        # see its dependence on x and the gate.
        _, r = _row_norms.gated_groups(x, gate, eps, group_size, norm_before_gate, activation)
        r = r.reshape(-1, r.shape[-2], 1)  # [M, G, 1]
        dx, dg, dw = _row_norms.gated_rms_norm_grads(dy, x, gate, w, r, group_size,
                                                     norm_before_gate, activation)
        dx = dx.to(x.dtype) if needs[0] else None
        dg = dg.to(gate.dtype) if needs[1] else None
        dw = dw.to(w.dtype) if needs[2] else None
    else:
        dx, dg, dw = _fn.gated_rms_norm_bwd(dy, x, gate, rstd, w, group_size, norm_before_gate,
                                            activation, needs)
        dx, dg, dw = (t if m else None for t, m in zip((dx, dg, dw), needs))
    return dx, dg, dw, None, None, None, None, None


torch.library.register_autograd("fastnorm::gated_rms_norm_fwd", _gated_backward,
                                setup_context=_gated_setup)


class GatedRMSNormFunction(torch.autograd.Function):
    """(y, rstd) = gated_rms_norm(x, gate); rstd is not differentiable. No jvp: forward-mode AD
    and torch.func transforms take functional.gated_rms_norm's ATen composition instead."""

    @staticmethod
    def forward(input, gate, weight, eps, group_size, norm_before_gate, activation,
                round_normalized):
        return _fn.gated_rms_norm_fwd(input, gate, weight, eps, group_size, norm_before_gate,
                                      activation, round_normalized)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _gated_setup(ctx, inputs, output, _save)

    @staticmethod
    def backward(ctx, dy, drstd):
        return _gated_backward(ctx, dy, drstd)


# ----------------------------------------------------------------------------------------------
# Modulated row norms (AdaLN, AdaLN-Zero's gated residual)
# ----------------------------------------------------------------------------------------------
def _modulated_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, scale, shift, weight, bias, residual, gate, eps, scale_offset, seg_rows, rms = inputs
    _, res_out, mean, rstd = output
    has_res = residual is not None
    # the norm's rows: residual_out, or the input; the input and residual are kept for d_gate and
    # for second derivatives (recomputed from them)
    save(ctx, res_out if has_res else input, input, residual, scale, shift, weight, bias, gate,
         mean, rstd)
    ctx.modulated = (float(eps), float(scale_offset), int(seg_rows), bool(rms), has_res,
                     input.dtype)


def _modulated_backward(ctx, dy, dres_out, _dmean, _drstd):
    x, input, residual, scale, shift, weight, bias, gate, mean, rstd = ctx.saved_tensors
    eps, c, seg, rms, has_res, in_dtype = ctx.modulated
    ni, ns, nt, nw, nb, nr, ng = ctx.needs_input_grad[:7]
    if dy is None:
        dy = torch.zeros_like(x, dtype=in_dtype)
    if torch.is_grad_enabled():
        # second derivatives: the forward recomputed with differentiable ATen ops, from the inputs
        args = [input, scale, shift, weight, bias, residual, gate]
        wanted = [t for t, n in zip(args, ctx.needs_input_grad[:7]) if n and t is not None]
        sd = stat_dtype(in_dtype)
        r = _modulated.residual_rows(input, residual, gate, seg) if has_res else input
        y, _, _ = _modulated.modulated_rows(r.to(sd), scale, shift, weight, bias, eps, c, seg, rms)
        outs, gos = [y], [dy.to(sd)]
        if has_res and dres_out is not None:
            outs.append(r)
            gos.append(dres_out.to(r.dtype))
        got = iter(torch.autograd.grad(outs, wanted, gos, create_graph=True, allow_unused=True))
        res = []
        for t, n in zip(args, ctx.needs_input_grad[:7]):
            g = next(got) if n and t is not None else None
            res.append(None if g is None else g.to(t.dtype))
        for i, t in enumerate(args):
            if res[i] is None and ctx.needs_input_grad[i] and t is not None:
                res[i] = torch.zeros_like(t)
        return (*res, None, None, None, None)
    mod = next((t for t in (scale, shift, gate) if t is not None), None)
    mod_dtype = mod.dtype if mod is not None else in_dtype
    want_dg = bool(has_res and ng and gate is not None)
    mask = [bool(ni), bool(ns and scale is not None), bool(nt and shift is not None),
            bool(nw and weight is not None), bool(nb and bias is not None), bool(has_res and nr),
            want_dg]
    dx, ds, dt, dw, db, dr, dg = _fn.modulated_norm_bwd(
        dy, dres_out if has_res else None, x, input if want_dg else None, scale, weight, bias,
        gate, mean, rstd, c, seg, rms, has_res, in_dtype, mod_dtype, mask)
    cast = [None if not m else t.to(ref.dtype) for t, m, ref in
            ((ds, mask[1], scale), (dt, mask[2], shift), (dg, want_dg, gate))]
    return (dx if mask[0] else None, cast[0], cast[1], dw if mask[3] else None,
            db if mask[4] else None, dr if mask[5] else None, cast[2],
            None, None, None, None)


torch.library.register_autograd("fastnorm::modulated_norm_fwd", _modulated_backward,
                                setup_context=_modulated_setup)


class ModulatedNormFunction(torch.autograd.Function):
    """(y, residual_out, mean, rstd) = modulated_norm(...); only y and residual_out are
    differentiable. No jvp: forward-mode AD and torch.func transforms take the functional's ATen
    composition instead."""

    @staticmethod
    def forward(input, scale, shift, weight, bias, residual, gate, eps, scale_offset, seg_rows,
                rms):
        return _fn.modulated_norm_fwd(input, scale, shift, weight, bias, residual, gate, eps,
                                      scale_offset, seg_rows, rms)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.set_materialize_grads(False)
        _modulated_setup(ctx, inputs, output, _save)

    @staticmethod
    def backward(ctx, dy, dres_out, dmean, drstd):
        return _modulated_backward(ctx, dy, dres_out, dmean, drstd)


def _add_norm_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, _, normalized_shape, weight, bias, eps, rms = inputs
    _, r, mean, rstd = output
    save(ctx, r, weight, bias, mean, rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.eps, ctx.rms, ctx.input_dtype = eps, rms, input.dtype


def _add_norm_backward(ctx, dout, dr, _dmean, _drstd):
    r, w, b, mean, rstd = ctx.saved_tensors
    ni, nr = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nw, nb = ctx.needs_input_grad[3] and w is not None, ctx.needs_input_grad[4] and b is not None
    if dout is None:
        dout = torch.zeros_like(r, dtype=ctx.input_dtype)
    if torch.is_grad_enabled():
        # Differentiable ops; residual_out is this node's output, so second derivatives flow
        # back to input and residual through it.
        dims, rows = _trailing(r, len(ctx.normalized_shape))
        sd = stat_dtype(ctx.input_dtype)
        g = dout.to(sd)
        xhat, rs = _recomputed_xhat(r.to(sd), dims, ctx.eps, ctx.rms)
        d_r = None
        if ni or nr:
            d_r = _norm_input_grad(g if w is None else g * w.to(sd), xhat, rs, dims, ctx.rms)
            if dr is not None:
                d_r = d_r + dr.to(sd)
        dx = d_r.to(ctx.input_dtype) if ni else None
        dres = d_r.to(r.dtype) if nr else None
        dw = _row_sum(g * xhat, rows).to(w.dtype) if nw else None
        db = _row_sum(g, rows).to(b.dtype) if nb else None
    else:
        same = ctx.input_dtype == r.dtype
        # one dtype: one gradient tensor serves input and residual (one write pass)
        mask = [ni and not same, nr or (same and ni), nw, nb]
        dx, dres, dw, db = _fn.add_norm_bwd(dout, dr, r, mean, rstd, w, ctx.normalized_shape,
                                            ctx.rms, ctx.input_dtype, mask)
        if same:
            dx = dres if ni else None
            dres = dres if nr else None
        else:
            dx, dres = dx if ni else None, dres if nr else None
        dw = dw if nw else None
        db = db.to(b.dtype) if nb else None  # the op gives it in weight's (or input's) dtype
    return dx, dres, None, dw, db, None, None


torch.library.register_autograd("fastnorm::add_norm_fwd", _add_norm_backward,
                                setup_context=_add_norm_setup)


class _AddNormFunction(torch.autograd.Function):
    """(output, residual_out, mean, rstd) = add_norm(input, residual): residual_out = input +
    residual (residual's dtype), output = LayerNorm or RMSNorm of residual_out (input's dtype).
    Only residual_out is saved (with the statistics): the backward recomputes xhat from it.
    mean and rstd are not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, residual, normalized_shape, weight, bias, eps, rms):
        return _fn.add_norm_fwd(input, residual, normalized_shape, weight, bias, eps, rms)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        # an unused output's gradient stays None (not a plain zeros tensor, which would not mix
        # with DTensors under tensor parallelism); the backward builds zeros like residual_out
        ctx.set_materialize_grads(False)
        _add_norm_setup(ctx, inputs, output, _save)

    @staticmethod
    def backward(ctx, dout, dr, dmean, drstd):
        return _add_norm_backward(ctx, dout, dr, dmean, drstd)


class AddNormFunction(_AddNormFunction):
    @staticmethod
    def jvp(ctx, t_in, t_res, _tshape, tw, tb, _teps, _trms):
        r, w, _, mean, rstd = ctx.saved_tensors
        k = len(ctx.normalized_shape)
        dims, _ = _trailing(r, k)
        sd = stat_dtype(ctx.input_dtype)
        view = list(r.shape[: r.dim() - k]) + [1] * k
        rv = rstd.reshape(view)
        rs = r.to(sd)
        xhat = (rs if ctx.rms else rs - mean.reshape(view)) * rv
        t_r = None
        for t in (t_in, t_res):
            if t is not None:
                t_r = t.to(sd) if t_r is None else t_r + t.to(sd)
        ty = None
        if t_r is not None:
            ty = _norm_input_grad(t_r, xhat, rv, dims, ctx.rms)  # self-adjoint
            if w is not None:
                ty = ty * w.to(sd)
        if tw is not None:
            t = xhat * tw.to(sd)
            ty = t if ty is None else ty + t
        if tb is not None:
            t = tb.to(sd).expand(r.shape)
            ty = t if ty is None else ty + t
        zeros = lambda dt: torch.zeros(r.shape, dtype=dt, device=r.device)  # noqa: E731
        ty = zeros(ctx.input_dtype) if ty is None else ty.to(ctx.input_dtype).contiguous()
        tr = zeros(r.dtype) if t_r is None else t_r.to(r.dtype).contiguous()
        return ty, tr, None, None


# ----------------------------------------------------------------------------------------------
# LayerNorm2d: statistics over the channels (dim 1) of each position of (N, C, *spatial)
# ----------------------------------------------------------------------------------------------
def _ln2d_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, weight, bias, eps, *_ = inputs
    _, mean, rstd = output
    save(ctx, input, weight, bias, mean, rstd)
    ctx.eps = eps
    ctx.act = _act_of(inputs, 5)


def _ln2d_backward(ctx, dy, _dmean, _drstd):
    x, w, b, mean, rstd = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if torch.is_grad_enabled():
        param_dims, affine_shape = _channel_dims(x)
        dx, dw, db = _normalization_grads(
            x, dy, w, ctx.eps, lambda t: t, [1], affine_shape, param_dims,
            (needs[0], needs[1], needs[2] and b is not None), b, ctx.act)
        db = None if db is None else db.reshape(b.shape).to(b.dtype)
    else:
        mask = [needs[0], needs[1] and w is not None, needs[2] and b is not None]
        dx, dw, db = _fn.layer_norm2d_bwd(dy, x, mean, rstd, w, mask, b, *ctx.act)
        dx, dw, db = (t if m else None for t, m in zip((dx, dw, db), mask))
    return dx, dw, db


torch.library.register_autograd(
    "fastnorm::layer_norm2d_fwd",
    lambda ctx, dy, dm, dr: (*_ln2d_backward(ctx, dy, dm, dr), None, None, None, None),
    setup_context=_ln2d_setup)


class _LayerNorm2dFunction(torch.autograd.Function):
    """(y, mean, rstd) = layer_norm2d(x); mean and rstd are not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, eps, out_dtype, activation, activation_param):
        return _fn.layer_norm2d_fwd(input, weight, bias, eps, out_dtype, activation,
                                    activation_param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        _ln2d_setup(ctx, inputs, output, _save)
        ctx.y_dtype = y.dtype

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return (*_ln2d_backward(ctx, dy, dmean, drstd), None, None, None, None)


class LayerNorm2dFunction(_LayerNorm2dFunction):
    @staticmethod
    def jvp(ctx, tx, tw, tb, _teps, _tdtype, _tact, _tparam):
        x, w, b, mean, rstd = ctx.saved_tensors
        _, affine_shape = _channel_dims(x)
        ty = _normalization_jvp(x, mean, rstd, w, tx, tw, tb, lambda t: t, [1],
                                [x.shape[0], 1, *x.shape[2:]], affine_shape, ctx.y_dtype, b,
                                ctx.act)
        return ty, None, None


# ----------------------------------------------------------------------------------------------
# LocalResponseNorm: y = x / div^beta, div = k + alpha * (window average of x^2 over channels)
# ----------------------------------------------------------------------------------------------
def _lrn_setup(ctx, inputs, output, save=lambda ctx, *t: ctx.save_for_backward(*t)):
    input, size, alpha, beta, k = inputs
    save(ctx, input)
    ctx.lrn = (size, alpha, beta, k)


def _lrn_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    if torch.is_grad_enabled():  # a differentiable backward (double backward, torch.func)
        return lrn_grad(dy, x, *ctx.lrn).to(x.dtype)
    return _fn.local_response_norm_bwd(dy.to(x.dtype), x, *ctx.lrn)


torch.library.register_autograd(
    "fastnorm::local_response_norm_fwd",
    lambda ctx, dy: (_lrn_backward(ctx, dy), None, None, None, None),
    setup_context=_lrn_setup)


class _LocalResponseNormFunction(torch.autograd.Function):
    """y = local_response_norm(x); only x is differentiable (size, alpha, beta, k are numbers)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, size, alpha, beta, k):
        return _fn.local_response_norm_fwd(input, size, alpha, beta, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _lrn_setup(ctx, inputs, output, _save)

    @staticmethod
    def backward(ctx, dy):
        return _lrn_backward(ctx, dy), None, None, None, None


class LocalResponseNormFunction(_LocalResponseNormFunction):
    @staticmethod
    def jvp(ctx, tx, *_):
        # ty = tx div^-beta - beta x div^(-beta-1) alpha avg_win(2 x tx)
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = ctx.lrn
        sd = stat_dtype(x.dtype)
        xs, t = x.to(sd), tx.to(sd)
        div = lrn_div(xs, size, alpha, k)
        r = 1.0 / div.pow(beta)
        tdiv = lrn_window(2.0 * xs * t, size, size // 2, (size - 1) // 2, True) * alpha
        ty = t * r - beta * xs * r / div * tdiv
        return ty.to(x.dtype)


apply_layer_norm = _applier(LayerNormFunction, _LayerNormFunction)
apply_group_norm = _applier(GroupNormFunction, _GroupNormFunction)
apply_layer_norm = _applier(LayerNormFunction, _LayerNormFunction, 8)
apply_group_norm = _applier(GroupNormFunction, _GroupNormFunction, 8)
apply_instance_norm_tracked = _applier(InstanceNormTrackedFunction, _InstanceNormTrackedFunction)
apply_batch_norm = _applier(BatchNormFunction, _BatchNormFunction, 11)
apply_layer_norm2d = _applier(LayerNorm2dFunction, _LayerNorm2dFunction, 7)
apply_rms_norm = _applier(RMSNormFunction, _RMSNormFunction)
apply_add_norm = _applier(AddNormFunction, _AddNormFunction)
apply_gated_rms_norm = _applier(GatedRMSNormFunction, GatedRMSNormFunction)
apply_modulated_norm = _applier(ModulatedNormFunction, ModulatedNormFunction)
apply_local_response_norm = _applier(LocalResponseNormFunction, _LocalResponseNormFunction)
