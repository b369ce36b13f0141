"""GroupNorm (InstanceNorm is GroupNorm with one group per channel): statistics per (n, group),
[N, num_groups]; a per-channel affine."""
from __future__ import annotations

import torch

from .common import (_ACT, _act_grads, _act_output, _affine_z, _aten_stat_dtype, _channel_view,
                     _channels_folded, _channels_unfolded, _check_act, _empty, _fn_ops,
                     _per_channel_bwd_fake, _per_sample_vector, _ref_inputs, _spatial, _to_front,
                     _vmap_act_dz, _vmap_act_fwd, define, lib, memory_format_of, stat_dtype)

SCHEMAS = {
    "group_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, int num_groups, float eps, "
                      f"ScalarType? out_dtype=None, {_ACT}) -> (Tensor, Tensor, Tensor)",
    "group_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      f"int num_groups, bool[3] output_mask, Tensor? bias=None, {_ACT}) "
                      "-> (Tensor, Tensor, Tensor)",
}
define(SCHEMAS)


def _group_norm_fwd_plain(input, weight, bias, num_groups, eps, out_dtype=None):
    x = input if out_dtype is None or out_dtype == input.dtype else input.to(out_dtype)
    n, c = x.shape[0], x.shape[1]
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, _spatial(x), num_groups, eps)
    sd = stat_dtype(input.dtype)
    y = y.contiguous(memory_format=memory_format_of(input))
    return y, mean.reshape(n, num_groups).to(sd), rstd.reshape(n, num_groups).to(sd)


def _group_norm_bwd_plain(grad_out, input, mean, rstd, weight, num_groups, output_mask):
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


def _group_norm_fwd_fake_plain(input, weight, bias, num_groups, eps, out_dtype=None):
    sd = stat_dtype(input.dtype)
    y = torch.empty_like(input, dtype=out_dtype or input.dtype, memory_format=memory_format_of(input))
    n = input.shape[0]
    return y, input.new_empty((n, num_groups), dtype=sd), input.new_empty((n, num_groups), dtype=sd)


def _gn_z(x, mean, rstd, weight, bias, num_groups):
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, num_groups, (c // num_groups) * _spatial(x))
    z = _affine_z(xg, mean.reshape(n, num_groups, 1), rstd.reshape(n, num_groups, 1), None,
                  None).reshape(x.shape)
    if weight is not None:
        z = z * _channel_view(weight, x).to(z.dtype)
    if bias is not None:
        z = z + _channel_view(bias, x).to(z.dtype)
    return z


@torch.library.impl(lib, "group_norm_fwd", "CompositeExplicitAutograd")
def _group_norm_fwd_ref(input, weight, bias, num_groups, eps, out_dtype=None, activation=0,
                        activation_param=0.0):
    code = _check_act(activation, "group_norm_fwd")
    if code == 0:
        return _group_norm_fwd_plain(input, weight, bias, num_groups, eps, out_dtype)
    _, mean, rstd = _group_norm_fwd_plain(input, None, None, num_groups, eps, out_dtype)
    z = _gn_z(input, mean, rstd, weight, bias, num_groups)
    return _act_output(code, activation_param, z, out_dtype or input.dtype, input), mean, rstd


@torch.library.impl(lib, "group_norm_bwd", "CompositeExplicitAutograd")
def _group_norm_bwd_ref(grad_out, input, mean, rstd, weight, num_groups, output_mask, bias=None,
                        activation=0, activation_param=0.0):
    code = _check_act(activation, "group_norm_bwd")
    if code == 0:
        return _group_norm_bwd_plain(grad_out, input, mean, rstd, weight, num_groups, output_mask)
    z = _gn_z(input, mean, rstd, weight, bias, num_groups)
    return _act_grads(code, activation_param, grad_out, input, weight, z,
                      lambda dz, x, w: _group_norm_bwd_plain(dz, x, mean, rstd, w, num_groups,
                                                             output_mask),
                      output_mask)


@torch.library.register_fake("fastnorm::group_norm_fwd")
def _group_norm_fwd_fake(input, weight, bias, num_groups, eps, out_dtype=None, activation=0,
                         activation_param=0.0):
    _check_act(activation, "group_norm_fwd")
    return _group_norm_fwd_fake_plain(input, weight, bias, num_groups, eps, out_dtype)


@torch.library.register_fake("fastnorm::group_norm_bwd")
def _group_norm_bwd_fake(grad_out, input, mean, rstd, weight, num_groups, output_mask, bias=None,
                         activation=0, activation_param=0.0):
    _check_act(activation, "group_norm_bwd")
    return _per_channel_bwd_fake(input, weight, output_mask)


# ----------------------------------------------------------------------------------------------
# vmap batching rules (how they fold the vmapped dimension: common.py)
# ----------------------------------------------------------------------------------------------
def _group_norm_fwd_vmap_plain(info, in_dims, input, weight, bias, num_groups, eps, out_dtype=None):
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


def _group_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight, num_groups,
                         output_mask):
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


@torch.library.register_vmap("fastnorm::group_norm_fwd")
def _group_norm_fwd_vmap(info, in_dims, input, weight, bias, num_groups, eps, out_dtype=None,
                         activation=0, activation_param=0.0):
    args = (input, weight, bias, num_groups, eps, out_dtype)
    if activation == 0:
        return _group_norm_fwd_vmap_plain(info, in_dims, *args)
    if in_dims[1] is None and in_dims[2] is None:
        b = info.batch_size
        x = input.movedim(in_dims[0], 0)
        y, mean, rstd = _fn_ops.group_norm_fwd(x.reshape(-1, *x.shape[2:]), weight, bias,
                                               num_groups, eps, out_dtype, activation,
                                               activation_param)
        return ((y.reshape(x.shape), mean.view(b, -1, num_groups), rstd.view(b, -1, num_groups)),
                (0, 0, 0))
    return _vmap_act_fwd("gn", info, in_dims, _group_norm_fwd_vmap_plain, args, 0, 1, 2,
                         num_groups, out_dtype, activation, activation_param)


@torch.library.register_vmap("fastnorm::group_norm_bwd")
def _group_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, num_groups,
                         output_mask, bias=None, activation=0, activation_param=0.0):
    if activation != 0:
        grad_out = _vmap_act_dz("gn", info, in_dims, grad_out, input, mean, rstd, weight, bias,
                                in_dims[7], num_groups, activation, activation_param)
        in_dims = (0,) + tuple(in_dims[1:])
    return _group_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight,
                                      num_groups, output_mask)
