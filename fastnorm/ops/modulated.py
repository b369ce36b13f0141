"""Modulated row norms (functional.modulated_layer_norm, modulated_rms_norm,
gated_residual_modulated_norm): the norms of diffusion transformers' AdaLN / AdaLN-Zero,

    y = norm(r) * (scale_offset + scale) + shift,   norm(r) = LayerNorm or RMSNorm of the row r
                                                    with its per-element weight and bias,
    r = input                          (no residual), or
    r = round_X(residual + gate * input)   (the gated residual of AdaLN-Zero; X = residual's dtype;
                                        gate absent: 1), stored as residual_out.

Rows are the M rows of D elements of a 2-D input. The modulation operands (scale, shift, gate) are
[Q, D] with Q = M / seg_rows: consecutive blocks of seg_rows rows share one modulation row, which
is how a per-sample [B, D], per-frame [B, F, 1, D] or per-token [B, S, D] modulation lies against
[B * S, D] rows (the functional reduces any broadcast to this form). Everything is computed in the
statistics dtype and rounded once (y to the input's dtype, residual_out to the residual's).

The backward takes the input (the gated residual's branch) for d_gate = the sum over each segment
of d_r * input.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .common import _empty, define, lib, stat_dtype
from .row_norms import _check_residual_dtype

SCHEMAS = {
    "modulated_norm_fwd": "(Tensor input, Tensor? scale, Tensor? shift, Tensor? weight, Tensor? bias, "
                          "Tensor? residual, Tensor? gate, float eps, float scale_offset, "
                          "int seg_rows, bool rms) -> (Tensor, Tensor, Tensor, Tensor)",
    "modulated_norm_bwd": "(Tensor grad_out, Tensor? grad_residual_out, Tensor x, Tensor? input, "
                          "Tensor? scale, Tensor? weight, Tensor? bias, Tensor? gate, Tensor mean, "
                          "Tensor rstd, float scale_offset, int seg_rows, bool rms, bool residual, "
                          "ScalarType input_dtype, ScalarType mod_dtype, bool[7] output_mask) "
                          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}
define(SCHEMAS)

# the order of modulated_norm_bwd's outputs (and of its output_mask)
GRADS = ("input", "scale", "shift", "weight", "bias", "residual", "gate")


def check_modulated(op: str, input, scale, shift, weight, bias, residual, gate, seg_rows: int,
                    rms: bool) -> None:
    """The ops' argument checks (the functional has made its own, with the user's shapes)."""
    if input.dim() != 2:
        raise RuntimeError(f"{op}: expected a 2-D input [rows, D], but got input of shape "
                           f"{list(input.shape)}")
    m, d = input.shape
    if seg_rows < 1 or m % seg_rows != 0:
        raise RuntimeError(f"{op}: expected seg_rows >= 1 dividing the {m} rows, but got "
                           f"seg_rows={seg_rows}")
    q = m // seg_rows
    for what, t in (("scale", scale), ("shift", shift), ("gate", gate)):
        if t is not None and list(t.shape) != [q, d]:
            raise RuntimeError(f"{op}: expected {what} of shape [{q}, {d}] (rows / seg_rows, D), "
                               f"but got {what} of shape {list(t.shape)}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and list(t.shape) != [d]:
            raise RuntimeError(f"{op}: expected {what} of shape [{d}], but got {what} of shape "
                               f"{list(t.shape)}")
    if rms and bias is not None:
        raise RuntimeError(f"{op}: RMSNorm (rms=True) takes no bias")
    if gate is not None and residual is None:
        raise RuntimeError(f"{op}: a gate multiplies the input added to a residual: got a gate "
                           f"without a residual")
    if residual is not None:
        if list(residual.shape) != [m, d]:
            raise RuntimeError(f"{op}: expected residual of the input's shape [{m}, {d}], but got "
                               f"residual of shape {list(residual.shape)}")
        _check_residual_dtype(input, residual)


def _seg(t: Optional[torch.Tensor], seg_rows: int, sd: torch.dtype):
    """A [Q, D] modulation operand against the [M, D] rows, in the statistics dtype."""
    return None if t is None else t.to(sd).repeat_interleave(seg_rows, dim=0)


def segment_sum(t: torch.Tensor, seg_rows: int) -> torch.Tensor:
    """[M, D] -> [M / seg_rows, D]: the sum over each segment's rows."""
    return t.reshape(-1, seg_rows, t.shape[-1]).sum(1)


def modulated_rows(r: torch.Tensor, scale, shift, weight, bias, eps: float, scale_offset: float,
                   seg_rows: int, rms: bool):
    """(y, mean, rstd) of rows r [M, D] in the statistics dtype (differentiable ATen ops: the
    reference, and the autograd's recomputation for second derivatives)."""
    sd = r.dtype
    if rms:
        rstd = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
        mean = None
        n = r * rstd
    else:
        if r.numel() == 0:  # no rows, or rows of no elements (mean 0, as layer_norm's)
            mu = r.new_zeros(r.shape[:-1] + (1,))
            var = torch.full_like(mu, math.nan)
        else:
            var, mu = torch.var_mean(r, -1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        mean = mu
        n = (r - mu) * rstd
    if weight is not None:
        n = n * weight.to(sd)
    if bias is not None:
        n = n + bias.to(sd)
    s = _seg(scale, seg_rows, sd)
    y = n * (scale_offset + s) if s is not None else n * scale_offset
    if shift is not None:
        y = y + _seg(shift, seg_rows, sd)
    return y, mean, rstd


def residual_rows(input, residual, gate, seg_rows: int):
    """residual_out = round_X(residual + gate * input), summed in the statistics dtype (float64
    when either is float64)."""
    sd = torch.promote_types(stat_dtype(input.dtype), stat_dtype(residual.dtype))
    b = input.to(sd)
    if gate is not None:
        b = _seg(gate, seg_rows, sd) * b
    return (residual.to(sd) + b).to(residual.dtype)


@torch.library.impl(lib, "modulated_norm_fwd", "CompositeExplicitAutograd")
def _modulated_norm_fwd_ref(input, scale, shift, weight, bias, residual, gate, eps, scale_offset,
                            seg_rows, rms):
    check_modulated("modulated_norm_fwd", input, scale, shift, weight, bias, residual, gate,
                    seg_rows, rms)
    sd = stat_dtype(input.dtype)
    m = input.shape[0]
    r = residual_rows(input, residual, gate, seg_rows) if residual is not None else input
    y, mean, rstd = modulated_rows(r.to(sd), scale, shift, weight, bias, eps, scale_offset,
                                   seg_rows, rms)
    mean = input.new_empty((0,), dtype=sd) if rms else mean.reshape(m)
    res_out = r.contiguous() if residual is not None else _empty(input)
    return y.to(input.dtype).contiguous(), res_out, mean, rstd.reshape(m)


def modulated_grads(grad_out, grad_residual_out, x, input, scale, weight, bias, gate, mean, rstd,
                    scale_offset: float, seg_rows: int, rms: bool, residual: bool):
    """Every gradient of the modulated row norm in the statistics dtype (the reference's
    formulas, ATen ops): (d_input, dscale, dshift, dweight, dbias, d_residual, dgate), where with
    a residual x is residual_out, d_residual = d_r, d_input = d_r * gate and dgate the sum over
    each segment of d_r * input (None without a gate or an input)."""
    sd = rstd.dtype
    xs = x.to(sd)
    rs = rstd.reshape(-1, 1)
    xhat = xs * rs if rms else (xs - mean.reshape(-1, 1)) * rs
    dy = grad_out.to(sd)
    w = None if weight is None else weight.to(sd)
    z = xhat if w is None else xhat * w
    if bias is not None:
        z = z + bias.to(sd)
    s = _seg(scale, seg_rows, sd)
    mod = s + scale_offset if s is not None else None
    dz = dy * mod if mod is not None else dy * scale_offset
    g = dz if w is None else dz * w
    d = xs.shape[-1]
    c1 = torch.zeros_like(rs) if rms else g.sum(-1, keepdim=True) / d
    c2 = (g * xhat).sum(-1, keepdim=True) / d
    d_r = rs * (g - c1 - xhat * c2)
    if residual and grad_residual_out is not None:
        d_r = d_r + grad_residual_out.to(sd)
    d_in = d_r
    if residual and gate is not None:
        d_in = d_r * _seg(gate, seg_rows, sd)
    dscale = segment_sum(dy * z, seg_rows)
    dshift = segment_sum(dy, seg_rows)
    dweight = (dz * xhat).sum(0)
    dbias = dz.sum(0)
    dgate = None
    if residual and gate is not None and input is not None:
        dgate = segment_sum(d_r * input.to(sd), seg_rows)
    return d_in, dscale, dshift, dweight, dbias, d_r, dgate


@torch.library.impl(lib, "modulated_norm_bwd", "CompositeExplicitAutograd")
def _modulated_norm_bwd_ref(grad_out, grad_residual_out, x, input, scale, weight, bias, gate, mean,
                            rstd, scale_offset, seg_rows, rms, residual, input_dtype, mod_dtype,
                            output_mask):
    if output_mask[6] and residual and gate is not None and input is None:
        raise RuntimeError("modulated_norm_bwd: dgate needs the input (the branch)")
    grads = list(modulated_grads(grad_out, grad_residual_out, x, input, scale, weight, bias, gate,
                                 mean, rstd, scale_offset, seg_rows, rms, residual))
    if grads[6] is None:  # no gate: zeros, as the kernels give
        grads[6] = torch.zeros_like(grads[1])
    dtypes = _grad_dtypes(x, weight, bias, input_dtype, mod_dtype)
    # d_input is d_r itself without a gate: two tensors, never one aliasing the other
    return tuple(t.to(dt, copy=i == 5).contiguous() if want else _empty(x, dt)
                 for i, (t, dt, want) in enumerate(zip(grads, dtypes, output_mask)))


def _grad_dtypes(x, weight, bias, input_dtype, mod_dtype):
    return (input_dtype, mod_dtype, mod_dtype,
            weight.dtype if weight is not None else input_dtype,
            bias.dtype if bias is not None else input_dtype, x.dtype, mod_dtype)


@torch.library.register_fake("fastnorm::modulated_norm_fwd")
def _modulated_norm_fwd_fake(input, scale, shift, weight, bias, residual, gate, eps, scale_offset,
                             seg_rows, rms):
    check_modulated("modulated_norm_fwd", input, scale, shift, weight, bias, residual, gate,
                    seg_rows, rms)
    sd = stat_dtype(input.dtype)
    m = input.shape[0]
    return (input.new_empty(input.shape),
            residual.new_empty(residual.shape) if residual is not None else _empty(input),
            input.new_empty((0,) if rms else (m,), dtype=sd), input.new_empty((m,), dtype=sd))


@torch.library.register_fake("fastnorm::modulated_norm_bwd")
def _modulated_norm_bwd_fake(grad_out, grad_residual_out, x, input, scale, weight, bias, gate, mean,
                             rstd, scale_offset, seg_rows, rms, residual, input_dtype, mod_dtype,
                             output_mask):
    m, d = x.shape
    q = m // seg_rows
    shapes = ((m, d), (q, d), (q, d), (d,), (d,), (m, d), (q, d))
    dtypes = _grad_dtypes(x, weight, bias, input_dtype, mod_dtype)
    return tuple(x.new_empty(s, dtype=dt) if want else _empty(x, dt)
                 for s, dt, want in zip(shapes, dtypes, output_mask))
