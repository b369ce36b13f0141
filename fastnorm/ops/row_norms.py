"""Row norms: LayerNorm, RMSNorm and add_norm (LayerNorm or RMSNorm of input + residual). Each
row, the trailing normalized_shape dims, is normalised on its own; statistics are [rows] vectors."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .common import (_ACT, _act_grads, _affine_z, _aten_stat_dtype, _check_act, _empty,
                     _fn_ops, _ref_inputs, _to_front, _vmap_act_dz, _vmap_act_fwd, define, lib,
                     stat_dtype)
from .. import activations as _activations

SCHEMAS = {
    "layer_norm_fwd": "(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps, "
                      f"ScalarType? out_dtype=None, {_ACT}) -> (Tensor, Tensor, Tensor)",
    "layer_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      f"int[] normalized_shape, bool[3] output_mask, Tensor? bias=None, {_ACT}) "
                      "-> (Tensor, Tensor, Tensor)",
    "rms_norm_fwd": "(Tensor input, int[] normalized_shape, Tensor? weight, float eps, "
                    "ScalarType? out_dtype=None, bool round_normalized=False) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor grad_out, Tensor input, Tensor rstd, Tensor? weight, "
                    "int[] normalized_shape, bool[2] output_mask) -> (Tensor, Tensor)",
    "add_norm_fwd": "(Tensor input, Tensor residual, int[] normalized_shape, Tensor? weight, "
                    "Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)",
    "add_norm_bwd": "(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out, Tensor mean, "
                    "Tensor rstd, Tensor? weight, int[] normalized_shape, bool rms, "
                    "ScalarType input_dtype, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    "gated_rms_norm_fwd": "(Tensor input, Tensor gate, Tensor? weight, float eps, int group_size, "
                          "bool norm_before_gate, int activation, bool round_normalized) "
                          "-> (Tensor, Tensor)",
    "gated_rms_norm_bwd": "(Tensor grad_out, Tensor input, Tensor gate, Tensor rstd, Tensor? weight, "
                          "int group_size, bool norm_before_gate, int activation, "
                          "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
}
define(SCHEMAS)


def _ln_rows(x: torch.Tensor, normalized_shape: Sequence[int]) -> int:
    """Rows: the product of the dims before normalized_shape (rows of zero elements count too)."""
    return math.prod(x.shape[: x.dim() - len(normalized_shape)])


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


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
def _layer_norm_fwd_plain(input, normalized_shape, weight, bias, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    y, mean, rstd = torch.native_layer_norm(x, list(normalized_shape), weight, bias, eps)
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    return y.contiguous(), mean.reshape(m).to(sd), rstd.reshape(m).to(sd)


def _layer_norm_bwd_plain(grad_out, input, mean, rstd, weight, normalized_shape, output_mask):
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


def _layer_norm_fwd_fake_plain(input, normalized_shape, weight, bias, eps, out_dtype=None):
    m = _ln_rows(input, normalized_shape)
    sd = stat_dtype(input.dtype)
    y = input.new_empty(input.shape, dtype=out_dtype or input.dtype)
    return y, input.new_empty((m,), dtype=sd), input.new_empty((m,), dtype=sd)


def _layer_norm_bwd_fake_plain(grad_out, input, mean, rstd, weight, normalized_shape, output_mask):
    wd = weight.dtype if weight is not None else input.dtype
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else _empty(input),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty(tuple(normalized_shape), dtype=wd) if output_mask[2] else _empty(input, wd))


def _ln_z(x, mean, rstd, weight, bias, normalized_shape):
    view = _stat_view(x, normalized_shape)
    return _affine_z(x, mean.reshape(view), rstd.reshape(view), weight, bias)


@torch.library.impl(lib, "layer_norm_fwd", "CompositeExplicitAutograd")
def _layer_norm_fwd_ref(input, normalized_shape, weight, bias, eps, out_dtype=None, activation=0,
                        activation_param=0.0):
    code = _check_act(activation, "layer_norm_fwd")
    if code == 0:
        return _layer_norm_fwd_plain(input, normalized_shape, weight, bias, eps, out_dtype)
    _, mean, rstd = _layer_norm_fwd_plain(input, normalized_shape, None, None, eps, out_dtype)
    z = _ln_z(input, mean, rstd, weight, bias, normalized_shape)
    y = _activations.apply(code, z, activation_param).to(out_dtype or input.dtype).contiguous()
    return y, mean, rstd


@torch.library.impl(lib, "layer_norm_bwd", "CompositeExplicitAutograd")
def _layer_norm_bwd_ref(grad_out, input, mean, rstd, weight, normalized_shape, output_mask,
                        bias=None, activation=0, activation_param=0.0):
    code = _check_act(activation, "layer_norm_bwd")
    if code == 0:
        return _layer_norm_bwd_plain(grad_out, input, mean, rstd, weight, normalized_shape,
                                     output_mask)
    z = _ln_z(input, mean, rstd, weight, bias, normalized_shape)
    dx, dw, db = _act_grads(code, activation_param, grad_out, input, weight, z,
                            lambda dz, x, w: _layer_norm_bwd_plain(dz, x, mean, rstd, w,
                                                                   normalized_shape, output_mask),
                            output_mask)
    return dx.contiguous(), dw, db


# Fake kernels: the plain ones' shapes; the activation code is checked as the kernels check it.
@torch.library.register_fake("fastnorm::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps, out_dtype=None, activation=0,
                         activation_param=0.0):
    _check_act(activation, "layer_norm_fwd")
    return _layer_norm_fwd_fake_plain(input, normalized_shape, weight, bias, eps, out_dtype)


@torch.library.register_fake("fastnorm::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, mean, rstd, weight, normalized_shape, output_mask,
                         bias=None, activation=0, activation_param=0.0):
    _check_act(activation, "layer_norm_bwd")
    return _layer_norm_bwd_fake_plain(grad_out, input, mean, rstd, weight, normalized_shape,
                                      output_mask)


# ----------------------------------------------------------------------------------------------
# RMSNorm and the fused residual-add norms (add_norm: LayerNorm or RMSNorm of input + residual)
#
# The references compute in the statistics dtype with plain ATen ops (ATen has no native RMSNorm
# backward and no fused add-norm), rounding once at the end, as the CUDA kernels do.
# ----------------------------------------------------------------------------------------------
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
def _rms_norm_fwd_ref(input, normalized_shape, weight, eps, out_dtype=None, round_normalized=False):
    """round_normalized: the Llama convention, y = weight * round_input_dtype(x * rstd), the
    normalised value rounded before the weight multiplies it (the kernels' rms_z)."""
    yd = _check_out_dtype(input, out_dtype)
    sd = stat_dtype(input.dtype)
    xs = input.to(sd)
    rstd = _rms_rstd(xs, _norm_dims(input, normalized_shape), eps)
    y = xs * rstd
    if round_normalized:
        y = y.to(input.dtype).to(sd)
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
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps, out_dtype=None, round_normalized=False):
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
# Gated RMSNorm (functional.gated_rms_norm). Rows are the groups of group_size elements of the
# last dim H; rstd is group-major [G, M] (G = H / group_size, M = the rows of H), as the kernels
# launch one group column at a time. activation: fastnorm.activations' code of silu or sigmoid.
#   norm_before_gate=False: y = w * round?(rms(x * a(gate))), in promote(input, weight) when
#     round_normalized (the Llama rounding), else in the input's dtype;
#   norm_before_gate=True:  y = round_input(n * a(gate)), n = w * round?(rms(x)) rounded to the
#     input's dtype too when round_normalized and the weight has the input's dtype.
# The references spell these with the ops Hugging Face's gated RMSNorms use, in their order.
# ----------------------------------------------------------------------------------------------
GATE_ACTIVATIONS = {4: torch.nn.functional.silu, 10: torch.sigmoid}  # activations' codes


def _gate_grad(code: int, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d * a'(g) for the gate activation."""
    s = torch.sigmoid(g)
    return d * s * (1 + g * (1 - s)) if code == 4 else d * s * (1 - s)


def _gated_shape(op: str, input, gate, group_size: int, activation: int):
    """(M, H, G) of a gated call, checked as the kernels check it."""
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"{op}: activation must be silu (4) or sigmoid (10), but got {activation}")
    if input.dim() < 1:
        raise RuntimeError(f"{op}: expected an input of at least 1 dimension")
    if gate.shape != input.shape or gate.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected gate of the input's shape {list(input.shape)} and dtype "
                           f"{input.dtype}, but got gate of shape {list(gate.shape)} and dtype "
                           f"{gate.dtype}")
    h = input.shape[-1]
    if group_size <= 0 or h % group_size != 0:
        raise RuntimeError(f"{op}: expected group_size dividing the last dim ({h}), but got "
                           f"{group_size}")
    return input.numel() // max(h, 1) if h else math.prod(input.shape[:-1]), h, h // group_size


def _gated_out_dtype(input, weight, norm_before_gate, round_normalized):
    if not norm_before_gate and round_normalized and weight is not None:
        return torch.promote_types(input.dtype, weight.dtype)
    return input.dtype


def gated_groups(input, gate, eps, group_size, norm_before_gate, activation):
    """(the rows as groups [..., G, group_size] in the statistics dtype: x, or x * a(gate) when the
    gate comes first; their rstd [..., G, 1]), spelled as the modules spell them. Differentiable:
    the autograd's double backward recomputes rstd with it."""
    sd = stat_dtype(input.dtype)
    x = input.to(sd)
    if gate is not None and not norm_before_gate:
        x = x * GATE_ACTIVATIONS[activation](gate.to(sd))
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return grouped, torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)


def gated_rms_composite(input, gate, weight, eps, group_size, norm_before_gate, activation,
                        normalized_dtype):
    """functional.gated_rms_norm with ATen ops in the order Hugging Face's gated RMSNorms use
    (bitwise theirs on CPU): the CPU fast path, the combinations the kernels do not take, and the
    op's reference (normalized_dtype: the input's dtype or None). Returns (y, rstd [..., G, 1])."""
    sd = stat_dtype(input.dtype)
    grouped, rstd = gated_groups(input, gate, eps, group_size, norm_before_gate, activation)
    n = (grouped * rstd).reshape(input.shape)
    if normalized_dtype is not None:
        n = n.to(normalized_dtype)
        if weight is not None:
            n = weight * n  # in promote(D, weight)
    elif weight is not None:
        n = weight.to(sd) * n
    if norm_before_gate:
        return (n * GATE_ACTIVATIONS[activation](gate.to(sd))).to(input.dtype), rstd
    return (n if normalized_dtype is not None else n.to(input.dtype)), rstd


@torch.library.impl(lib, "gated_rms_norm_fwd", "CompositeExplicitAutograd")
def _gated_rms_norm_fwd_ref(input, gate, weight, eps, group_size, norm_before_gate, activation,
                            round_normalized):
    m, h, g = _gated_shape("gated_rms_norm_fwd", input, gate, group_size, activation)
    y, rstd = gated_rms_composite(input, gate, weight, eps, group_size, norm_before_gate,
                                  activation, input.dtype if round_normalized else None)
    sd = stat_dtype(input.dtype)
    return y.contiguous(), rstd.reshape(m, g).t().contiguous().reshape(-1).to(sd)


def gated_rms_norm_grads(grad_out, input, gate, weight, rstd, group_size, norm_before_gate,
                         activation):
    """(dx, dgate, dweight) in the statistics dtype from ATen ops (differentiable); rstd [M, G, 1]
    (the roundings of the forward are the identity here)."""
    sd = stat_dtype(input.dtype)
    shape = input.shape
    m, g = rstd.shape[0], rstd.shape[1]
    x, gt, dy = input.to(sd), gate.to(sd), grad_out.to(sd)
    a = GATE_ACTIVATIONS[activation](gt)
    w = None if weight is None else weight.to(sd)
    rows = list(range(input.dim() - 1))

    def rms_dx(gw, hn):  # d(loss)/dh of hn = rms(h) given gw = d(loss)/dhn, per group
        gw3, hn3 = gw.reshape(m, g, group_size), hn.reshape(m, g, group_size)
        return (rstd * (gw3 - hn3 * (gw3 * hn3).mean(-1, keepdim=True))).reshape(shape)

    if not norm_before_gate:
        h = x * a
        hn = (h.reshape(m, g, group_size) * rstd).reshape(shape)
        dh = rms_dx(dy if w is None else dy * w, hn)
        dx, dgate = dh * a, _gate_grad(activation, gt, dh * x)
        dw = (dy * hn).sum(rows) if rows else dy * hn
    else:
        xhat = (x.reshape(m, g, group_size) * rstd).reshape(shape)
        n = xhat if w is None else xhat * w
        dgate = _gate_grad(activation, gt, dy * n)
        dn = dy * a
        dx = rms_dx(dn if w is None else dn * w, xhat)
        dw = (dn * xhat).sum(rows) if rows else dn * xhat
    return dx, dgate, dw


@torch.library.impl(lib, "gated_rms_norm_bwd", "CompositeExplicitAutograd")
def _gated_rms_norm_bwd_ref(grad_out, input, gate, rstd, weight, group_size, norm_before_gate,
                            activation, output_mask):
    m, h, g = _gated_shape("gated_rms_norm_bwd", input, gate, group_size, activation)
    r = rstd.to(stat_dtype(input.dtype)).reshape(g, m).t().reshape(m, g, 1)
    dx, dgate, dw = gated_rms_norm_grads(grad_out, input, gate, weight, r, group_size,
                                         norm_before_gate, activation)
    wd = weight.dtype if weight is not None else input.dtype
    return (dx.to(input.dtype).contiguous() if output_mask[0] else _empty(input),
            dgate.to(input.dtype).contiguous() if output_mask[1] else _empty(input),
            dw.to(wd).reshape(h) if output_mask[2] and weight is not None else _empty(input, wd))


@torch.library.register_fake("fastnorm::gated_rms_norm_fwd")
def _gated_rms_norm_fwd_fake(input, gate, weight, eps, group_size, norm_before_gate, activation,
                             round_normalized):
    m, h, g = _gated_shape("gated_rms_norm_fwd", input, gate, group_size, activation)
    return (input.new_empty(input.shape,
                            dtype=_gated_out_dtype(input, weight, norm_before_gate, round_normalized)),
            input.new_empty((m * g,), dtype=stat_dtype(input.dtype)))


@torch.library.register_fake("fastnorm::gated_rms_norm_bwd")
def _gated_rms_norm_bwd_fake(grad_out, input, gate, rstd, weight, group_size, norm_before_gate,
                             activation, output_mask):
    _gated_shape("gated_rms_norm_bwd", input, gate, group_size, activation)
    wd = weight.dtype if weight is not None else input.dtype
    return (input.new_empty(input.shape) if output_mask[0] else _empty(input),
            input.new_empty(input.shape) if output_mask[1] else _empty(input),
            input.new_empty((input.shape[-1],), dtype=wd) if output_mask[2] and weight is not None
            else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# vmap batching rules (how they fold the vmapped dimension: common.py)
# ----------------------------------------------------------------------------------------------
def _layer_norm_fwd_vmap_plain(info, in_dims, input, normalized_shape, weight, bias, eps, out_dtype=None):
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


def _layer_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight, normalized_shape,
                         output_mask):
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


@torch.library.register_vmap("fastnorm::layer_norm_fwd")
def _layer_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, bias, eps, out_dtype=None,
                         activation=0, activation_param=0.0):
    args = (input, normalized_shape, weight, bias, eps, out_dtype)
    if activation == 0 or (in_dims[2] is None and in_dims[3] is None):
        if activation == 0:
            return _layer_norm_fwd_vmap_plain(info, in_dims, *args)
        b = info.batch_size
        y, mean, rstd = _fn_ops.layer_norm_fwd(input.movedim(in_dims[0], 0), normalized_shape,
                                               weight, bias, eps, out_dtype, activation,
                                               activation_param)
        return (y, mean.view(b, -1), rstd.view(b, -1)), (0, 0, 0)
    return _vmap_act_fwd("ln", info, in_dims, _layer_norm_fwd_vmap_plain, args, 0, 2, 3,
                         list(normalized_shape), out_dtype, activation, activation_param)


@torch.library.register_vmap("fastnorm::layer_norm_bwd")
def _layer_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, normalized_shape,
                         output_mask, bias=None, activation=0, activation_param=0.0):
    if activation != 0:
        grad_out = _vmap_act_dz("ln", info, in_dims, grad_out, input, mean, rstd, weight, bias,
                                in_dims[7], list(normalized_shape), activation, activation_param)
        in_dims = (0,) + tuple(in_dims[1:])
    return _layer_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight,
                                      normalized_shape, output_mask)


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
def _rms_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, eps, out_dtype=None,
                       round_normalized=False):
    xd, _, wd = in_dims[:3]
    b = info.batch_size
    if wd is None:
        y, rstd = _fn_ops.rms_norm_fwd(input.movedim(xd, 0), normalized_shape, weight, eps, out_dtype,
                                       round_normalized)
        return (y, rstd.view(b, -1)), (0, 0)
    x = input if xd is None else input.movedim(xd, 0)
    sd = stat_dtype(input.dtype)
    # the unweighted normalisation, rounded to the input dtype first in the Llama convention
    xhat, rstd = _fn_ops.rms_norm_fwd(x, normalized_shape, None, eps,
                                      None if sd == input.dtype or round_normalized
                                      else torch.float32, round_normalized)
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
