"""LayerNorm2d: LayerNorm over the C channels of each position of an (N, C, *spatial) input
(ConvNeXt's channels-first LayerNorm). Statistics: one per position, [N * prod(spatial)], in
the order (n, position). The reference normalises the (N, *spatial, C) view with ATen's
LayerNorm (a view with no copy for channels_last input)."""
from __future__ import annotations

from typing import Optional

import torch

from .common import (_ACT, _act_grads, _affine_z, _aten_stat_dtype, _channel_view, _check_act,
                     _empty, _fn_ops, _in_input_format, _per_channel_bwd_fake, _ref_inputs,
                     _spatial, _to_front, _vmap_act_dz, _vmap_act_fwd, define, lib,
                     memory_format_of, stat_dtype)
from .. import activations as _activations

SCHEMAS = {
    "layer_norm2d_fwd": "(Tensor input, Tensor? weight, Tensor? bias, float eps, "
                        f"ScalarType? out_dtype=None, {_ACT}) -> (Tensor, Tensor, Tensor)",
    "layer_norm2d_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                        f"bool[3] output_mask, Tensor? bias=None, {_ACT}) -> (Tensor, Tensor, Tensor)",
}
define(SCHEMAS)


def _ln2d_positions(x: torch.Tensor) -> int:
    return x.shape[0] * _spatial(x)


def _layer_norm2d_fwd_plain(input, weight, bias, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    y, mean, rstd = torch.native_layer_norm(x.movedim(1, -1), [input.shape[1]], weight, bias, eps)
    m = _ln2d_positions(input)
    sd = stat_dtype(input.dtype)
    return _in_input_format(y.movedim(-1, 1), input), mean.reshape(m).to(sd), rstd.reshape(m).to(sd)


def _layer_norm2d_bwd_plain(grad_out, input, mean, rstd, weight, output_mask):
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
    return (_in_input_format(dx.movedim(-1, 1).to(in_dtype), input) if output_mask[0]
            else _empty(input, in_dtype),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


def _layer_norm2d_fwd_fake_plain(input, weight, bias, eps, out_dtype=None):
    m = _ln2d_positions(input)
    sd = stat_dtype(input.dtype)
    y = torch.empty_like(input, dtype=out_dtype or input.dtype, memory_format=memory_format_of(input))
    return y, input.new_empty((m,), dtype=sd), input.new_empty((m,), dtype=sd)


def _ln2d_z(x, mean, rstd, weight, bias):
    view = [x.shape[0], 1, *x.shape[2:]]
    return _affine_z(x, mean.reshape(view), rstd.reshape(view), _channel_view(weight, x),
                     _channel_view(bias, x))


@torch.library.impl(lib, "layer_norm2d_fwd", "CompositeExplicitAutograd")
def _layer_norm2d_fwd_ref(input, weight, bias, eps, out_dtype=None, activation=0,
                          activation_param=0.0):
    code = _check_act(activation, "layer_norm2d_fwd")
    if code == 0:
        return _layer_norm2d_fwd_plain(input, weight, bias, eps, out_dtype)
    _, mean, rstd = _layer_norm2d_fwd_plain(input, None, None, eps, out_dtype)
    z = _ln2d_z(input, mean, rstd, weight, bias)
    y = _activations.apply(code, z, activation_param).to(out_dtype or input.dtype)
    return _in_input_format(y, input), mean, rstd


@torch.library.impl(lib, "layer_norm2d_bwd", "CompositeExplicitAutograd")
def _layer_norm2d_bwd_ref(grad_out, input, mean, rstd, weight, output_mask, bias=None,
                          activation=0, activation_param=0.0):
    code = _check_act(activation, "layer_norm2d_bwd")
    if code == 0:
        return _layer_norm2d_bwd_plain(grad_out, input, mean, rstd, weight, output_mask)
    if grad_out.shape != input.shape:
        raise RuntimeError(f"layer_norm2d_bwd: grad_out has shape {list(grad_out.shape)} but input "
                           f"has shape {list(input.shape)}")
    z = _ln2d_z(input, mean, rstd, weight, bias)
    dx, dw, db = _act_grads(code, activation_param, grad_out, input, weight, z,
                            lambda dz, x, w: _layer_norm2d_bwd_plain(dz, x, mean, rstd, w,
                                                                     output_mask),
                            output_mask)
    return (_in_input_format(dx, input) if output_mask[0] else dx), dw, db


@torch.library.register_fake("fastnorm::layer_norm2d_fwd")
def _layer_norm2d_fwd_fake(input, weight, bias, eps, out_dtype=None, activation=0,
                           activation_param=0.0):
    _check_act(activation, "layer_norm2d_fwd")
    return _layer_norm2d_fwd_fake_plain(input, weight, bias, eps, out_dtype)


@torch.library.register_fake("fastnorm::layer_norm2d_bwd")
def _layer_norm2d_bwd_fake(grad_out, input, mean, rstd, weight, output_mask, bias=None,
                           activation=0, activation_param=0.0):
    _check_act(activation, "layer_norm2d_bwd")
    return _per_channel_bwd_fake(input, weight, output_mask)


# ----------------------------------------------------------------------------------------------
# vmap batching rules (how they fold the vmapped dimension: common.py)
# ----------------------------------------------------------------------------------------------
def _ln2d_param(t: torch.Tensor, d: Optional[int], b: int, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector, batched or not, as [B, 1, C, 1...] against (B, N, C, *) x."""
    t = _to_front(t, d, b)
    return t.reshape(b, 1, t.shape[-1], *([1] * (x.dim() - 3)))


def _layer_norm2d_fwd_vmap_plain(info, in_dims, input, weight, bias, eps, out_dtype=None):
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


def _layer_norm2d_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight, output_mask):
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


@torch.library.register_vmap("fastnorm::layer_norm2d_fwd")
def _layer_norm2d_fwd_vmap(info, in_dims, input, weight, bias, eps, out_dtype=None, activation=0,
                           activation_param=0.0):
    args = (input, weight, bias, eps, out_dtype)
    if activation == 0:
        return _layer_norm2d_fwd_vmap_plain(info, in_dims, *args)
    if in_dims[1] is None and in_dims[2] is None:
        b = info.batch_size
        x = _to_front(input, in_dims[0], b)
        m = _ln2d_positions(x[0]) if b else 0
        y, mean, rstd = _fn_ops.layer_norm2d_fwd(x.flatten(0, 1), weight, bias, eps, out_dtype,
                                                 activation, activation_param)
        return (y.reshape(x.shape), mean.view(b, m), rstd.view(b, m)), (0, 0, 0)
    return _vmap_act_fwd("ln2d", info, in_dims, _layer_norm2d_fwd_vmap_plain, args, 0, 1, 2, None,
                         out_dtype, activation, activation_param)


@torch.library.register_vmap("fastnorm::layer_norm2d_bwd")
def _layer_norm2d_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, output_mask,
                           bias=None, activation=0, activation_param=0.0):
    if activation != 0:
        grad_out = _vmap_act_dz("ln2d", info, in_dims, grad_out, input, mean, rstd, weight, bias,
                                in_dims[6], None, activation, activation_param)
        in_dims = (0,) + tuple(in_dims[1:])
    return _layer_norm2d_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight,
                                        output_mask)
