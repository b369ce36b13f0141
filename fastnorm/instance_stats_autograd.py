"""Autograd for the norms built on the per-(n, c) primitives: SwitchNorm, AdaIN, IBN.

Each norm is y = x * scale[n, c] + shift[n, c], where (scale, shift) is a small function of the
per-(n, c) moments of x and of the parameters. One torch.autograd.Function per family:

  forward:  nc_moments (one read of x) -> [N, C] math -> nc_affine (one read, one write)
  backward: nc_grad_sums (one read of x and dy) -> [N, C] math -> nc_affine_grad (one read of x
            and dy, one write): dx = a * dy + b * (x - m) + c per (n, c) carries the gradient
            through the statistics and through the affine at once.

The [N, C] backward math is written out in closed form (torch ops on [N, C] tensors, traceable by
torch.compile), in the statistics dtype (float64 for float64 input, float32 otherwise).

Notation: m, v are the per-(n, c) mean and biased variance over the L spatial positions; the
gradient sums are A = sum(dy), B = sum(dy * (x - m)). For y = (x - mu) * S + beta with mu, S
functions of (m, v), the chain rule through m = mean(x) and v = mean((x - m)^2) gives

    dx = S * dy + dL/dm / L + 2 * dL/dv / L * (x - m)

so a = S, b = 2 * dL/dv / L, c = dL/dm / L, with dL/dm and dL/dv collected from A and B.

When the backward itself must be differentiable (grad mode on inside backward: double
backward), it recomputes the whole forward with differentiable torch ops from the saved inputs
and differentiates that (the same [N, C] math functions, fed by torch.var_mean).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ops.common import stat_dtype

_fn = torch.ops.fastnorm


def _spatial_count(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _unbiased_factor(count: int) -> float:
    """L / (L - 1): the biased variance times it is the unbiased one. One element: inf, so that
    a zero biased variance becomes NaN, as torch's var(correction=1) of one element."""
    if count == 1:
        return math.inf
    return count / (count - 1)


def _nc(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N, C] as [N, C, 1, ...] against x."""
    return t.reshape(*t.shape, *([1] * (x.dim() - 2)))


def _param(t: Optional[torch.Tensor], sd: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(sd).reshape(1, -1)


def _grad_as(g: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter's gradient in the parameter's shape and dtype."""
    if g is None or t is None:
        return None
    return g.reshape(t.shape).to(t.dtype)


def _softmax_backward(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/dtheta of p = softmax(theta) given dL/dp = g."""
    return p * (g - (p * g).sum())


def _differentiable_moments(x: torch.Tensor, sd: torch.dtype):
    """(m, v) as nc_moments computes them, with differentiable torch ops (double backward)."""
    var, mean = torch.var_mean(x.to(sd), list(range(2, x.dim())), correction=0)
    return mean, var


def _apply_differentiable(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    sd = scale.dtype
    return (x.to(sd) * _nc(scale, x) + _nc(shift, x)).to(x.dtype)


def _double_backward(forward, inputs, dy, needs):
    """Gradients of forward(*inputs) (differentiable torch ops) with create_graph: the backward
    of a backward. `needs` says which of inputs need a gradient."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if isinstance(t, torch.Tensor) else t
                  for t, n in zip(inputs, needs)]
        # the recomputation must hang off the original inputs for second derivatives: use them
        # directly where a gradient is wanted
        args = [inp if n else leaf for inp, leaf, n in zip(inputs, leaves, needs)]
        y = forward(*args)
        wanted = [a for a, n in zip(args, needs) if n]
        grads = torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True)
    it = iter(grads)
    out = []
    for a, n in zip(args, needs):
        if not n:
            out.append(None)
            continue
        g = next(it)
        out.append(torch.zeros_like(a) if g is None else g)
    return out


# ----------------------------------------------------------------------------------------------
# SwitchNorm (2d, 3d): IN, LN and BN statistics mixed by softmax weights
# ----------------------------------------------------------------------------------------------
def switch_norm_mix(m, v, count, mean_weight, var_weight, running_mean, running_var, bn_batch,
                    using_bn):
    """The reference's statistics from the per-(n, c) mean m and biased variance v ([N, C]):
    returns (mean, var, mean_bn, var_bn, parts) with mean/var [N, C] the mixed statistics,
    mean_bn/var_bn [1, C] the BN statistics (batch or running; None without BN) and parts the
    intermediates the backward needs."""
    k = _unbiased_factor(count)
    vu = v * k  # the unbiased instance variance (the reference's x.var(-1))
    mean_ln = m.mean(1, keepdim=True)
    temp = vu + m * m
    var_ln = temp.mean(1, keepdim=True) - mean_ln * mean_ln
    pm = torch.softmax(mean_weight, 0)
    pv = torch.softmax(var_weight, 0)
    mean = pm[0] * m + pm[1] * mean_ln
    var = pv[0] * vu + pv[1] * var_ln
    mean_bn = var_bn = None
    if using_bn:
        if bn_batch:
            mean_bn = m.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn * mean_bn
        else:
            mean_bn, var_bn = running_mean, running_var
        mean = mean + pm[2] * mean_bn
        var = var + pv[2] * var_bn
    return mean, var, mean_bn, var_bn, (k, vu, mean_ln, var_ln, pm, pv)


def affine_coefficients(mean, r, weight, bias):
    """(scale, shift) with y = (x - mean) * r * weight + bias = x * scale + shift (weight, bias
    optional), for nc_affine."""
    scale = r if weight is None else r * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def norm_scale_shift(mean, var, weight, bias, eps):
    """(r, scale, shift) of a norm with statistics (mean, var): r = rsqrt(var + eps) and
    affine_coefficients'. SwitchNorm's, and the masked norms' (fastnorm/masked.py)."""
    r = torch.rsqrt(var + eps)
    return (r, *affine_coefficients(mean, r, weight, bias))


def _switch_norm_differentiable(x, weight, bias, mean_weight, var_weight, running_mean,
                                running_var, bn_batch, using_bn, eps):
    """SwitchNorm2d/3d's forward with differentiable torch ops (for double backward)."""
    sd = stat_dtype(x.dtype)
    m, v = _differentiable_moments(x, sd)
    mean, var, _, _, _ = switch_norm_mix(
        m, v, _spatial_count(x), mean_weight.to(sd), var_weight.to(sd),
        _param(running_mean, sd), _param(running_var, sd), bn_batch, using_bn)
    _, scale, shift = norm_scale_shift(mean, var, _param(weight, sd), _param(bias, sd), eps)
    return _apply_differentiable(x, scale, shift)


class SwitchNormFunction(torch.autograd.Function):
    """y = SwitchNorm2d/3d(x); also returns the batch BN statistics mean_bn, var_bn ([C], stat
    dtype; empty when BN is off or in eval) for the module's running-statistics update (not
    differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, running_mean, running_var,
                bn_batch: bool, using_bn: bool, eps: float):
        sd = stat_dtype(x.dtype)
        m, v = _fn.nc_moments(x)
        rm, rv = _param(running_mean, sd), _param(running_var, sd)
        mean, var, mean_bn, var_bn, parts = switch_norm_mix(
            m, v, _spatial_count(x), mean_weight.to(sd), var_weight.to(sd), rm, rv, bn_batch,
            using_bn)
        w, b = _param(weight, sd), _param(bias, sd)
        r, scale, shift = norm_scale_shift(mean, var, w, b, eps)
        y = _fn.nc_affine(x, scale, shift)
        # with frozen BN statistics (eval) mean_bn / var_bn are the running buffers in the stat
        # dtype; in training the module updates the buffers in place after this call, which is
        # why the buffers themselves are never saved
        k, vu, mean_ln, var_ln, pm, pv = parts
        # every tensor the backward reads is saved (torch.compile traces the backward from them)
        ctx.save_for_backward(x, weight, bias, mean_weight, var_weight, m, mean, r, scale, vu,
                              mean_ln, var_ln, pm, pv, mean_bn, var_bn)
        ctx.bn_batch, ctx.using_bn, ctx.eps, ctx.k = bn_batch, using_bn, eps, k
        if using_bn and bn_batch:
            out_mean, out_var = mean_bn.reshape(-1), var_bn.reshape(-1)
        else:
            out_mean, out_var = m.new_empty((0,)), m.new_empty((0,))
        ctx.mark_non_differentiable(out_mean, out_var)
        return y, out_mean, out_var

    @staticmethod
    def backward(ctx, dy, _dmean_bn, _dvar_bn):
        (x, weight, bias, mean_weight, var_weight, m, mean, r, scale, vu, mean_ln, var_ln, pm,
         pv, mean_bn, var_bn) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # with frozen statistics mean_bn / var_bn are the running buffers (stat dtype)
            grads = _double_backward(
                lambda *a: _switch_norm_differentiable(*a, ctx.bn_batch, ctx.using_bn, ctx.eps),
                (x, weight, bias, mean_weight, var_weight, mean_bn, var_bn),
                dy, [needs[i] for i in range(7)])
            return (*grads[:5], None, None, None, None, None)
        sd = m.dtype
        n, c = m.shape
        count = _spatial_count(x)
        k = ctx.k
        A, B = _fn.nc_grad_sums(dy, x, m)
        w = _param(weight, sd)
        # y = (x - mean) * scale + bias, scale = weight * r, r = rsqrt(var + eps)
        centred = B + (m - mean) * A  # sum(dy * (x - mean))
        g_mean = -scale * A
        g_var = centred * (-0.5 * r * r * r)
        if w is not None:
            g_var = g_var * w
        dw = (r * centred).sum(0) if needs[1] and weight is not None else None
        db = A.sum(0) if needs[2] and bias is not None else None
        # mixing weights: mean = sum_k pm[k] * stat_k, var = sum_k pv[k] * stat_k
        dmw = dvw = None
        stats_m = [m, mean_ln]
        stats_v = [vu, var_ln]
        if ctx.using_bn:
            stats_m.append(mean_bn)
            stats_v.append(var_bn)
        if needs[3]:
            gp = torch.stack([(g_mean * s).sum() for s in stats_m])
            dmw = _softmax_backward(pm, gp)
        if needs[4]:
            gp = torch.stack([(g_var * s).sum() for s in stats_v])
            dvw = _softmax_backward(pv, gp)
        dx = None
        if needs[0]:
            g_m = pm[0] * g_mean
            g_vu = pv[0] * g_var
            g_mean_ln = pm[1] * g_mean.sum(1, keepdim=True)
            g_var_ln = pv[1] * g_var.sum(1, keepdim=True)
            # var_ln = mean_c(temp) - mean_ln^2, temp = vu + m^2
            g_temp = g_var_ln / c
            g_mean_ln = g_mean_ln - 2 * mean_ln * g_var_ln
            if ctx.using_bn and ctx.bn_batch:
                g_mean_bn = pm[2] * g_mean.sum(0, keepdim=True)
                g_var_bn = pv[2] * g_var.sum(0, keepdim=True)
                g_temp = g_temp + g_var_bn / n
                g_mean_bn = g_mean_bn - 2 * mean_bn * g_var_bn
                g_m = g_m + g_mean_bn / n
            g_m = g_m + g_mean_ln / c + 2 * m * g_temp
            g_v = (g_vu + g_temp) * k
            inv = 1.0 / max(count, 1)
            dx = _fn.nc_affine_grad(dy, x, m, scale, (2 * inv) * g_v, inv * g_m)
        return (dx, _grad_as(dw, weight), _grad_as(db, bias), _grad_as(dmw, mean_weight),
                _grad_as(dvw, var_weight), None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# SwitchNorm1d: (N, C) input; LN statistics over C, BN over N, both unbiased
# ----------------------------------------------------------------------------------------------
def switch_norm1d_mix(xs, mean_weight, var_weight, running_mean, running_var, bn_batch):
    """(mean, var, mean_ln, mean_bn, var_bn, pm, pv) of the reference's SwitchNorm1d, xs the
    (N, C) input in the statistics dtype."""
    var_ln, mean_ln = torch.var_mean(xs, 1, correction=1, keepdim=True)
    if bn_batch:
        var_bn, mean_bn = torch.var_mean(xs, 0, correction=1, keepdim=True)
    else:
        mean_bn, var_bn = running_mean, running_var
    pm = torch.softmax(mean_weight, 0)
    pv = torch.softmax(var_weight, 0)
    mean = pm[0] * mean_ln + pm[1] * mean_bn
    var = pv[0] * var_ln + pv[1] * var_bn
    return mean, var, (mean_ln, var_ln, mean_bn, var_bn, pm, pv)


def _switch_norm1d_differentiable(x, weight, bias, mean_weight, var_weight, running_mean,
                                  running_var, bn_batch, eps):
    sd = stat_dtype(x.dtype)
    mean, var, _ = switch_norm1d_mix(x.to(sd), mean_weight.to(sd), var_weight.to(sd),
                                     _param(running_mean, sd), _param(running_var, sd), bn_batch)
    _, scale, shift = norm_scale_shift(mean, var, _param(weight, sd), _param(bias, sd), eps)
    return (x.to(sd) * scale + shift).to(x.dtype)


class SwitchNorm1dFunction(torch.autograd.Function):
    """y = SwitchNorm1d(x) for an (N, C) input. The statistics are over the rows and columns of
    x itself (there is no spatial extent, so every [N, C] tensor is x-sized): torch.var_mean in
    the statistics dtype, then nc_affine / nc_affine_grad on the (N, C, 1) view write y and dx,
    each rounded once. Also returns mean_bn, var_bn ([C]; empty in eval) for the update."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, running_mean, running_var,
                bn_batch: bool, eps: float):
        sd = stat_dtype(x.dtype)
        xs = x.to(sd)
        mean, var, parts = switch_norm1d_mix(xs, mean_weight.to(sd), var_weight.to(sd),
                                             _param(running_mean, sd), _param(running_var, sd),
                                             bn_batch)
        r, scale, shift = norm_scale_shift(mean, var, _param(weight, sd),
                                                   _param(bias, sd), eps)
        y = _fn.nc_affine(x.unsqueeze(-1), scale, shift).squeeze(-1)
        ctx.save_for_backward(x, weight, bias, mean_weight, var_weight,  # buffers: see SwitchNorm
                              None if bn_batch else running_mean,
                              None if bn_batch else running_var, mean, r, scale, *parts)
        ctx.bn_batch, ctx.eps = bn_batch, eps
        if bn_batch:
            out_mean, out_var = parts[2].reshape(-1), parts[3].reshape(-1)
        else:
            out_mean, out_var = xs.new_empty((0,)), xs.new_empty((0,))
        ctx.mark_non_differentiable(out_mean, out_var)
        return y, out_mean, out_var

    @staticmethod
    def backward(ctx, dy, _dm, _dv):
        (x, weight, bias, mean_weight, var_weight, running_mean, running_var, mean, r,
         scale, mean_ln, var_ln, mean_bn, var_bn, pm, pv) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grads = _double_backward(
                lambda *a: _switch_norm1d_differentiable(*a, ctx.bn_batch, ctx.eps),
                (x, weight, bias, mean_weight, var_weight, running_mean, running_var),
                dy, [needs[i] for i in range(7)])
            return (*grads[:5], None, None, None, None)
        sd = mean.dtype
        n, c = x.shape
        xs, g = x.to(sd), dy.to(sd)
        centred = xs - mean
        g_mean = -scale * g
        g_var = g * centred * (-0.5 * r * r * r)
        w = _param(weight, sd)
        if w is not None:
            g_var = g_var * w
        dw = (g * centred * r).sum(0) if needs[1] and weight is not None else None
        db = g.sum(0) if needs[2] and bias is not None else None
        dmw = dvw = None
        if needs[3]:
            dmw = _softmax_backward(pm, torch.stack([(g_mean * mean_ln).sum(),
                                                     (g_mean * mean_bn).sum()]))
        if needs[4]:
            dvw = _softmax_backward(pv, torch.stack([(g_var * var_ln).sum(),
                                                     (g_var * var_bn).sum()]))
        dx = None
        if needs[0]:
            # dx = scale * dy + g_mean_ln / C + 2 g_var_ln (x - mean_ln) / (C - 1)
            #      [+ g_mean_bn / N + 2 g_var_bn (x - mean_bn) / (N - 1)]  (batch statistics)
            # written as a * dy + b * (x - mean_ln) + c for one nc_affine_grad
            b = (2 * pv[0] / (c - 1) if c > 1 else math.inf) * g_var.sum(1, keepdim=True)
            cc = (pm[0] / c) * g_mean.sum(1, keepdim=True)
            b = b.expand(n, c)
            cc = cc.expand(n, c)
            if ctx.bn_batch:
                b_bn = (2 * pv[1] / (n - 1) if n > 1 else math.inf) * g_var.sum(0, keepdim=True)
                cc = cc + (pm[1] / n) * g_mean.sum(0, keepdim=True) + b_bn * (mean_ln - mean_bn)
                b = b + b_bn
            dx = _fn.nc_affine_grad(dy.unsqueeze(-1), x.unsqueeze(-1), mean_ln.expand(n, c).contiguous(),
                                    scale.contiguous(), b.contiguous(), cc.contiguous()).squeeze(-1)
        return (dx, _grad_as(dw, weight), _grad_as(db, bias), _grad_as(dmw, mean_weight),
                _grad_as(dvw, var_weight), None, None, None, None)


# ----------------------------------------------------------------------------------------------
# AdaIN: y = sigma(style) * (content - mu(content)) / sigma(content) + mu(style)
# ----------------------------------------------------------------------------------------------
def _adain_sigma(v, count, unbiased, eps):
    return torch.sqrt((v * _unbiased_factor(count) if unbiased else v) + eps)


def _adain_differentiable(content, style, eps, unbiased):
    sd = stat_dtype(content.dtype)
    mc, vc = _differentiable_moments(content, sd)
    ms, vs = _differentiable_moments(style, sd)
    scale = _adain_sigma(vs, _spatial_count(style), unbiased, eps) / _adain_sigma(
        vc, _spatial_count(content), unbiased, eps)
    return _apply_differentiable(content, scale, ms - mc * scale)


class AdaINFunction(torch.autograd.Function):
    """AdaIN(content, style): one statistics pass over each input, one apply pass; backward: one
    sums pass over content and dy, then one nc_affine_grad for each input (the style's through
    its own moments alone: grad_out None)."""

    @staticmethod
    def forward(ctx, content, style, eps: float, unbiased: bool):
        mc, vc = _fn.nc_moments(content)
        ms, vs = _fn.nc_moments(style)
        sc = _adain_sigma(vc, _spatial_count(content), unbiased, eps)
        ss = _adain_sigma(vs, _spatial_count(style), unbiased, eps)
        scale = ss / sc
        y = _fn.nc_affine(content, scale, ms - mc * scale)
        ctx.save_for_backward(content, style, mc, ms, sc, ss, scale)
        ctx.eps, ctx.unbiased = eps, unbiased
        return y

    @staticmethod
    def backward(ctx, dy):
        content, style, mc, ms, sc, ss, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            dc, ds = _double_backward(
                lambda c_, s_: _adain_differentiable(c_, s_, ctx.eps, ctx.unbiased),
                (content, style), dy, [needs[0], needs[1]])
            return dc, ds, None, None
        A, B = _fn.nc_grad_sums(dy, content, mc)
        # y = (x - mc) * scale + ms, scale = ss / sc: dL/dscale = B, dL/dms = A, dL/dmc = -scale A
        lc, ls = _spatial_count(content), _spatial_count(style)
        dc = ds = None
        if needs[0]:
            kc = _unbiased_factor(lc) if ctx.unbiased else 1.0
            g_vc = (-B * scale / sc) / (2 * sc) * kc  # d sc / d vc = k / (2 sc)
            inv = 1.0 / max(lc, 1)
            dc = _fn.nc_affine_grad(dy, content, mc, scale, (2 * inv) * g_vc, (-inv) * scale * A)
        if needs[1]:
            ks = _unbiased_factor(ls) if ctx.unbiased else 1.0
            g_vs = (B / sc) / (2 * ss) * ks
            inv = 1.0 / max(ls, 1)
            b = (2 * inv) * g_vs
            # a is unused without grad_out; any [N, C] tensor of the stat dtype stands in
            ds = _fn.nc_affine_grad(None, style, ms, b, b, inv * A)
        return dc, ds, None, None


# ----------------------------------------------------------------------------------------------
# IBN: InstanceNorm (affine) on channels [0, h), BatchNorm on [h, C), one output
# ----------------------------------------------------------------------------------------------
def ibn_bn_batch_stats(m, v):
    """Per-channel batch mean and biased variance from the per-(n, c) ones (every (n, c) has the
    same count L, so Chan's merge is the plain average plus the spread of the means)."""
    mean = m.mean(0)
    var = (v + (m - mean) ** 2).mean(0)
    return mean, var


def _ibn_scale_shift(m, v, h, in_w, in_b, bn_w, bn_b, bn_mean, bn_var, in_eps, bn_eps):
    """Per-(n, c) (scale, shift) and the rstd of both halves ([N, h] and [C - h])."""
    n = m.shape[0]
    r_in = torch.rsqrt(v[:, :h] + in_eps)
    s_in = r_in if in_w is None else r_in * in_w
    t_in = -m[:, :h] * s_in
    if in_b is not None:
        t_in = t_in + in_b
    r_bn = torch.rsqrt(bn_var + bn_eps)
    s_bn = r_bn if bn_w is None else r_bn * bn_w
    t_bn = -bn_mean * s_bn
    if bn_b is not None:
        t_bn = t_bn + bn_b
    s_bn = s_bn.reshape(1, -1).expand(n, -1)
    t_bn = t_bn.reshape(1, -1).expand(n, -1)
    return (torch.cat([s_in, s_bn], 1), torch.cat([t_in, t_bn], 1), r_in, r_bn)


def _vec(t, sd):
    return None if t is None else t.to(sd)


def _ibn_differentiable(x, in_w, in_b, bn_w, bn_b, running_mean, running_var, h, bn_batch,
                        in_eps, bn_eps):
    sd = stat_dtype(x.dtype)
    m, v = _differentiable_moments(x, sd)
    if bn_batch:
        bn_mean, bn_var = ibn_bn_batch_stats(m[:, h:], v[:, h:])
    else:
        bn_mean, bn_var = running_mean.to(sd), running_var.to(sd)
    scale, shift, _, _ = _ibn_scale_shift(m, v, h, _vec(in_w, sd), _vec(in_b, sd), _vec(bn_w, sd),
                                          _vec(bn_b, sd), bn_mean, bn_var, in_eps, bn_eps)
    return _apply_differentiable(x, scale, shift)


class IBNFunction(torch.autograd.Function):
    """IBN(x): one nc_moments over every channel, the InstanceNorm half normalised with its
    per-(n, c) statistics and the BatchNorm half with per-channel ones merged from them (batch)
    or the running buffers (eval), one nc_affine writing the whole output. Also returns the
    BatchNorm half's batch mean and biased variance ([C - h]; empty with frozen statistics) for
    the running-statistics update (not differentiable)."""

    @staticmethod
    def forward(ctx, x, in_w, in_b, bn_w, bn_b, running_mean, running_var, h: int,
                bn_batch: bool, in_eps: float, bn_eps: float):
        sd = stat_dtype(x.dtype)
        m, v = _fn.nc_moments(x)
        if bn_batch:
            bn_mean, bn_var = ibn_bn_batch_stats(m[:, h:], v[:, h:])
        else:
            bn_mean, bn_var = running_mean.to(sd), running_var.to(sd)
        scale, shift, r_in, r_bn = _ibn_scale_shift(
            m, v, h, _vec(in_w, sd), _vec(in_b, sd), _vec(bn_w, sd), _vec(bn_b, sd), bn_mean,
            bn_var, in_eps, bn_eps)
        y = _fn.nc_affine(x, scale, shift)
        ctx.save_for_backward(x, in_w, in_b, bn_w, bn_b,  # buffers: see SwitchNorm
                              None if bn_batch else running_mean,
                              None if bn_batch else running_var, m, scale, r_in, r_bn, bn_mean)
        ctx.h, ctx.bn_batch, ctx.in_eps, ctx.bn_eps = h, bn_batch, in_eps, bn_eps
        if bn_batch:
            out_mean, out_var = bn_mean, bn_var
        else:
            out_mean, out_var = m.new_empty((0,)), m.new_empty((0,))
        ctx.mark_non_differentiable(out_mean, out_var)
        return y, out_mean, out_var

    @staticmethod
    def backward(ctx, dy, _dm, _dv):
        (x, in_w, in_b, bn_w, bn_b, running_mean, running_var, m, scale, r_in, r_bn,
         bn_mean) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        h = ctx.h
        if torch.is_grad_enabled():
            grads = _double_backward(
                lambda *a: _ibn_differentiable(*a, h, ctx.bn_batch, ctx.in_eps, ctx.bn_eps),
                (x, in_w, in_b, bn_w, bn_b, running_mean, running_var), dy,
                [needs[i] for i in range(7)])
            return (*grads[:5], None, None, None, None, None, None)
        n, c = m.shape
        count = _spatial_count(x)
        A, B = _fn.nc_grad_sums(dy, x, m)
        a_in, a_bn = scale[:, :h], scale[:, h:]
        A_in, B_in = A[:, :h], B[:, :h]
        A_bn, B_bn = A[:, h:], B[:, h:]
        # BatchNorm half: sums over (n, positions) of dy and dy * (x - bn_mean)
        dm_bn = m[:, h:] - bn_mean
        sum_dy_bn = A_bn.sum(0)
        sum_dyc_bn = (B_bn + dm_bn * A_bn).sum(0)
        din_w = (r_in * B_in).sum(0) if needs[1] and in_w is not None else None
        din_b = A_in.sum(0) if needs[2] and in_b is not None else None
        dbn_w = r_bn * sum_dyc_bn if needs[3] and bn_w is not None else None
        dbn_b = sum_dy_bn if needs[4] and bn_b is not None else None
        dx = None
        if needs[0]:
            inv = 1.0 / max(count, 1)
            # InstanceNorm: dx = s (dy - A / L - r^2 B (x - m) / L)
            b_in = -a_in * r_in * r_in * B_in * inv
            c_in = -a_in * A_in * inv
            if ctx.bn_batch:
                inv_m = 1.0 / max(n * count, 1)
                # dx = s (dy - sum_dy / M - r^2 sum_dyc (x - bn_mean) / M), x - bn_mean =
                # (x - m) + (m - bn_mean)
                b_bn = -a_bn * (r_bn * r_bn * sum_dyc_bn * inv_m)
                c_bn = -a_bn * (sum_dy_bn * inv_m) + b_bn * dm_bn
            else:  # frozen statistics: y is affine in x
                b_bn = torch.zeros_like(a_bn)
                c_bn = b_bn
            dx = _fn.nc_affine_grad(dy, x, m, scale, torch.cat([b_in, b_bn], 1),
                                    torch.cat([c_in, c_bn], 1))
        return (dx, _grad_as(din_w, in_w), _grad_as(din_b, in_b), _grad_as(dbn_w, bn_w),
                _grad_as(dbn_b, bn_b), None, None, None, None, None, None)
