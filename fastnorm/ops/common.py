"""What the fastnorm:: op families share: the one library object that defines every schema, the
statistics dtype and memory-format rules, the reference kernels' helpers, the fused-activation
epilogue and the batching-rule helpers."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import activations as _activations

lib = torch.library.Library("fastnorm", "DEF")  # noqa: TOR901 (a persistent library object)
_fn_ops = torch.ops.fastnorm

_ACT = "int activation=0, float activation_param=0.0"  # the fused epilogue (fastnorm.activations)


def define(schemas: dict) -> None:
    """Define a family's ops (name -> schema) in the fastnorm:: namespace."""
    for name, schema in schemas.items():
        lib.define(name + schema)


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


def _in_input_format(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """t (a fresh tensor, or a channels-last view of one) in the input's memory format, strides
    included when it has no elements (a view of zero elements counts as contiguous whatever its
    strides)."""
    fmt = memory_format_of(input)
    if t.numel() == 0:
        return torch.empty_like(t, memory_format=fmt)
    out = t.contiguous(memory_format=fmt)
    # a view (of ATen's (N, *, C) result, for channels_last input) would be a view output of the
    # autograd Function, which an in-place op after it (timm's in-place activations) may not
    # modify: a tensor of its own
    return out.clone(memory_format=fmt) if out._base is not None else out


def _per_channel_bwd_fake(input, weight, output_mask):
    """The backward fake of the norms with per-channel parameters (GroupNorm, BatchNorm,
    LayerNorm2d): dx like the input, dweight and dbias [C]."""
    wd = weight.dtype if weight is not None else input.dtype
    c = input.shape[1]
    return (torch.empty_like(input, memory_format=memory_format_of(input)) if output_mask[0] else _empty(input),
            input.new_empty((c,), dtype=wd) if output_mask[1] else _empty(input, wd),
            input.new_empty((c,), dtype=wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# Fused activation epilogues (activation != 0; fastnorm.activations has the codes): the forward
# returns y = act(z), z = xhat * weight + bias in the statistics dtype, rounded once; the
# backward recomputes z from x, mean, rstd, weight and bias, takes dz = dy * act'(z) with
# torch's own backward of the activation, then runs the plain backward with dz. activation == 0
# is the plain op, unchanged (the backward's bias argument is then ignored).
#
# The reference: the plain op for the statistics (and BatchNorm's running-statistics update),
# z recomputed with ATen ops, torch's activation; the backward's plain reference gets dz, x and
# the weight in the statistics dtype (dz is never rounded to a half dtype, as in the kernels).
# ----------------------------------------------------------------------------------------------
def _check_act(activation: int, op: str) -> int:
    return _activations.check_code(activation, op)


def _affine_z(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """z = (x - mean) * rstd * weight + bias in the statistics dtype; every operand already
    viewed to broadcast against x (weight None: 1, bias None: 0)."""
    sd = stat_dtype(x.dtype)
    z = (x.to(sd) - mean.to(sd)) * rstd.to(sd)
    if weight is not None:
        z = z * weight.to(sd)
    if bias is not None:
        z = z + bias.to(sd)
    return z


def _channel_view(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A per-channel [C] vector viewed as [1, C, 1, ...] against an (N, C, *) x."""
    return None if t is None else t.reshape([1, -1] + [1] * (x.dim() - 2))


def _act_output(code, param, z, dtype, fmt_of):
    """act(z) rounded once to dtype, in fmt_of's memory format."""
    y = _activations.apply(code, z, param).to(dtype)
    return y.contiguous(memory_format=memory_format_of(fmt_of))


def _act_grads(code, param, grad_out, input, weight, z, plain, output_mask):
    """The fused backward: dz = dy * act'(z) (statistics dtype), then plain(dz, x, w) with x and
    w in the statistics dtype; dx in the input's dtype and memory format, dweight/dbias in the
    weight's dtype (the input's without a weight)."""
    sd = stat_dtype(input.dtype)
    dz = _activations.grad(code, grad_out.to(sd), z, param)
    dx, dw, db = plain(dz, input.to(sd), None if weight is None else weight.to(sd))
    wd = weight.dtype if weight is not None else input.dtype
    return (dx.to(input.dtype).contiguous(memory_format=memory_format_of(input)) if output_mask[0]
            else _empty(input),
            dw.to(wd) if output_mask[1] else _empty(input, wd),
            db.to(wd) if output_mask[2] else _empty(input, wd))


# ----------------------------------------------------------------------------------------------
# vmap (torch.func.vmap) batching rules: every op folds the vmapped dimension into a dimension
# the op already has (rows, samples or channels) and runs once, so functorch never takes its
# slow per-sample fallback. Each rule gets the physical tensors and `in_dims` (the vmapped
# dimension of each argument, None when that argument is not batched).
# ----------------------------------------------------------------------------------------------
def _to_front(t: Optional[torch.Tensor], bdim: Optional[int], b: int) -> Optional[torch.Tensor]:
    """t with the vmapped dimension first; an unbatched t is expanded to b copies (a view)."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(b, *t.shape)
    return t.movedim(bdim, 0)


def _channels_folded(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C, *) -> (N, B*C, *): the vmapped dimension becomes B blocks of channels, so
    per-channel (BatchNorm) and per-group (GroupNorm) statistics stay per vmapped sample."""
    b, n, c = t.shape[:3]
    return t.movedim(0, 1).reshape(n, b * c, *t.shape[3:])


def _channels_unfolded(t: torch.Tensor, b: int) -> torch.Tensor:
    """(N, B*C, *) -> (N, B, C, *): the inverse of _channels_folded (the vmapped dim is 1)."""
    n, bc = t.shape[:2]
    return t.reshape(n, b, bc // b, *t.shape[2:])


def _per_sample_vector(t: Optional[torch.Tensor], bdim: Optional[int], b: int) -> Optional[torch.Tensor]:
    """A per-channel vector [C] (batched: [B, C]) as one [B*C] vector matching _channels_folded."""
    if t is None:
        return None
    if bdim is None:
        return t.repeat(b)
    return t.movedim(bdim, 0).reshape(-1)


# Batching rules with the fused activation. Unbatched affine parameters: the op takes the
# activation as it is (the vmapped dimension is one more row / sample / channel block, and the
# plain rules' per-sample parameter gradients are sums of dz). Batched weight or bias: the plain
# rule's statistics, then z and act(z) (forward) or dz (backward, handed to the plain rule as
# its grad_out, in the statistics dtype, which every backward op takes) with torch ops.
def _vmap_z(kind: str, x, mean, rstd, weight, bias, extra):
    """z = xhat * weight + bias in the statistics dtype; x, mean, rstd, weight, bias (the last two
    may be None) all with the vmapped dimension first. extra: normalized_shape for "ln",
    num_groups for "gn"."""
    sd = stat_dtype(x.dtype)
    b = x.shape[0]
    if kind == "ln":
        k = len(extra)
        view = list(x.shape[: x.dim() - k]) + [1] * k
        pview = [b] + [1] * (x.dim() - 1 - k) + list(extra)
        xhat = (x.to(sd) - mean.reshape(view).to(sd)) * rstd.reshape(view).to(sd)
    else:
        n, c = x.shape[1], x.shape[2]
        pview = [b, 1, c] + [1] * (x.dim() - 3)
        if kind == "gn":
            xg = x.reshape(b, n, extra, (c // extra) * math.prod(x.shape[3:])).to(sd)
            view = [b, n, extra, 1]
            xhat = ((xg - mean.reshape(view).to(sd)) * rstd.reshape(view).to(sd)).reshape(x.shape)
        else:
            view = pview if kind == "bn" else [b, n, 1, *x.shape[3:]]
            xhat = (x.to(sd) - mean.reshape(view).to(sd)) * rstd.reshape(view).to(sd)
    z = xhat
    if weight is not None:
        z = z * weight.reshape(pview).to(sd)
    if bias is not None:
        z = z + bias.reshape(pview).to(sd)
    return z


def _vmap_act_fwd(kind, info, in_dims, plain_rule, args, x_i, w_i, b_i, extra, out_dtype,
                  activation, activation_param):
    """The forward rule with batched affine parameters: statistics (and BatchNorm's update) from
    the plain rule without parameters, z and act(z) here, rounded once."""
    b = info.batch_size
    args = list(args)
    dims = list(in_dims[: len(args)])
    weight, bias = args[w_i], args[b_i]
    wd, bd = dims[w_i], dims[b_i]
    args[w_i] = args[b_i] = None
    dims[w_i] = dims[b_i] = None
    if kind != "bn":
        # the input batched (expanded when it is not: per-sample statistics, all equal); the
        # BatchNorm rule normalises an unbatched input once, updating its statistics once
        args[x_i], dims[x_i] = _to_front(args[x_i], dims[x_i], b), 0
    (_, mean, rstd), (_, mdim, rdim) = plain_rule(info, tuple(dims), *args)
    x = _to_front(args[x_i], dims[x_i], b)
    z = _vmap_z(kind, x, _to_front(mean, mdim, b), _to_front(rstd, rdim, b),
                _to_front(weight, wd, b), _to_front(bias, bd, b), extra)
    y = _activations.apply(activation, z, activation_param).to(out_dtype or x.dtype).contiguous()
    return (y, mean, rstd), (0, mdim, rdim)


def _vmap_act_dz(kind, info, in_dims, grad_out, input, mean, rstd, weight, bias, bias_dim, extra,
                 activation, activation_param):
    """dz = dy * act'(z) for the backward rules, vmapped dimension first, statistics dtype."""
    b = info.batch_size
    gd, xd, md, rd, wd = in_dims[:5]
    x = _to_front(input, xd, b)
    z = _vmap_z(kind, x, _to_front(mean, md, b), _to_front(rstd, rd, b), _to_front(weight, wd, b),
                _to_front(bias, bias_dim, b), extra)
    dy = _to_front(grad_out, gd, b).to(z.dtype)
    return _activations.grad(activation, dy, z, activation_param)
