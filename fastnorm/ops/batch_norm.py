"""BatchNorm: statistics per channel over the batch and the spatial dims, [C]; the forward op
updates the running statistics in place (training) or normalises with them (eval)."""
from __future__ import annotations

import torch

from .common import (_ACT, _act_grads, _act_output, _affine_z, _aten_stat_dtype, _channel_view,
                     _channels_folded, _channels_unfolded, _check_act, _empty, _fn_ops,
                     _per_channel_bwd_fake, _per_sample_vector, _ref_inputs, _to_front,
                     _vmap_act_dz, _vmap_act_fwd, define, lib, memory_format_of, stat_dtype)

SCHEMAS = {
    "batch_norm_fwd": "(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
                      f"float? momentum, float eps, {_ACT}) -> (Tensor, Tensor, Tensor)",
    "batch_norm_bwd": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                      f"bool training, bool[3] output_mask, Tensor? bias=None, {_ACT}) "
                      "-> (Tensor, Tensor, Tensor)",
}
define(SCHEMAS)


def _batch_norm_fwd_plain(input, weight, bias, running_mean, running_var, num_batches_tracked,
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


def _batch_norm_bwd_plain(grad_out, input, mean, rstd, weight, training, output_mask):
    in_dtype = input.dtype
    fmt = memory_format_of(input)
    wd = weight.dtype if weight is not None else in_dtype
    if input.numel() == 0:
        c = input.shape[1]
        return (torch.empty_like(input, memory_format=fmt) if output_mask[0] else _empty(input),
                input.new_zeros((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
                input.new_zeros((c,), dtype=wd) if output_mask[2] else _empty(input, wd))
    if grad_out.dtype == torch.float32 and in_dtype in (torch.float16, torch.bfloat16):
        # a float32 grad_out of a half input is read as it is, as the kernels read it (rounded
        # to half first, values above 65504 would overflow)
        input = input.float()
        weight = None if weight is None else weight.float()
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


def _batch_norm_fwd_fake_plain(input, weight, bias, running_mean, running_var, num_batches_tracked,
                         training, momentum, eps):
    sd = stat_dtype(input.dtype)
    c = input.shape[1]
    y = torch.empty_like(input, memory_format=memory_format_of(input))
    return y, input.new_empty((c,), dtype=sd), input.new_empty((c,), dtype=sd)


def _bn_z(x, mean, rstd, weight, bias):
    return _affine_z(x, _channel_view(mean, x), _channel_view(rstd, x), _channel_view(weight, x),
                     _channel_view(bias, x))


@torch.library.impl(lib, "batch_norm_fwd", "CompositeExplicitAutograd")
def _batch_norm_fwd_ref(input, weight, bias, running_mean, running_var, num_batches_tracked,
                        training, momentum, eps, activation=0, activation_param=0.0):
    code = _check_act(activation, "batch_norm_fwd")
    if code == 0:
        return _batch_norm_fwd_plain(input, weight, bias, running_mean, running_var,
                                     num_batches_tracked, training, momentum, eps)
    # the statistics and the running-statistics update are the plain op's
    _, mean, rstd = _batch_norm_fwd_plain(input, None, None, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps)
    z = _bn_z(input, mean, rstd, weight, bias)
    return _act_output(code, activation_param, z, input.dtype, input), mean, rstd


@torch.library.impl(lib, "batch_norm_bwd", "CompositeExplicitAutograd")
def _batch_norm_bwd_ref(grad_out, input, mean, rstd, weight, training, output_mask, bias=None,
                        activation=0, activation_param=0.0):
    code = _check_act(activation, "batch_norm_bwd")
    if code == 0:
        return _batch_norm_bwd_plain(grad_out, input, mean, rstd, weight, training, output_mask)
    z = _bn_z(input, mean, rstd, weight, bias)
    return _act_grads(code, activation_param, grad_out, input, weight, z,
                      lambda dz, x, w: _batch_norm_bwd_plain(dz, x, mean, rstd, w, training,
                                                             output_mask),
                      output_mask)


@torch.library.register_fake("fastnorm::batch_norm_fwd")
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, num_batches_tracked,
                         training, momentum, eps, activation=0, activation_param=0.0):
    _check_act(activation, "batch_norm_fwd")
    return _batch_norm_fwd_fake_plain(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, training, momentum, eps)


@torch.library.register_fake("fastnorm::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, mean, rstd, weight, training, output_mask, bias=None,
                         activation=0, activation_param=0.0):
    _check_act(activation, "batch_norm_bwd")
    return _per_channel_bwd_fake(input, weight, output_mask)


# ----------------------------------------------------------------------------------------------
# vmap batching rules (how they fold the vmapped dimension: common.py)
# ----------------------------------------------------------------------------------------------
_VMAP_STATS_ERROR = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval mode, "
    "please set `track_running_stats` to be False. If you are using a prebuilt module and do not "
    "need eval mode, please see the functorch website for resources on how to patch your module "
    "to work with vmap")


def _batch_norm_fwd_vmap_plain(info, in_dims, input, weight, bias, running_mean, running_var,
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


def _batch_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight, training, output_mask):
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


@torch.library.register_vmap("fastnorm::batch_norm_fwd")
def _batch_norm_fwd_vmap(info, in_dims, input, weight, bias, running_mean, running_var,
                         num_batches_tracked, training, momentum, eps, activation=0,
                         activation_param=0.0):
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, training,
            momentum, eps)
    if activation == 0:
        return _batch_norm_fwd_vmap_plain(info, in_dims, *args)
    # the plain rule's statistics and running-statistics update, then act(z) here
    return _vmap_act_fwd("bn", info, in_dims, _batch_norm_fwd_vmap_plain, args, 0, 1, 2, None,
                         None, activation, activation_param)


@torch.library.register_vmap("fastnorm::batch_norm_bwd")
def _batch_norm_bwd_vmap(info, in_dims, grad_out, input, mean, rstd, weight, training,
                         output_mask, bias=None, activation=0, activation_param=0.0):
    if activation != 0:
        grad_out = _vmap_act_dz("bn", info, in_dims, grad_out, input, mean, rstd, weight, bias,
                                in_dims[7], None, activation, activation_param)
        in_dims = (0,) + tuple(in_dims[1:])
    return _batch_norm_bwd_vmap_plain(info, in_dims, grad_out, input, mean, rstd, weight,
                                      training, output_mask)
