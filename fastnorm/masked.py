"""Masked (variable-length) BatchNorm, InstanceNorm and GroupNorm: statistics over the valid
positions of each sample only, outputs and input gradients 0 at the invalid ones.

A validity is `lengths` (integer [N]: positions [0, lengths[n]) of the last dimension are valid)
or `mask` (bool, broadcastable to (N, *spatial); True = valid), at most one. Why zeros at the
invalid positions: a padded position carries no data; a zero keeps the padding inert for what
follows (a convolution sees zero padding, a later masked op ignores it) instead of leaking the
bias or a normalised garbage value into the valid positions of later layers.

Built like fastnorm/instance_stats_autograd.py, on the per-(n, c) primitives with the validity:

  forward:  nc_moments -> [N, C] math -> nc_affine
  backward: nc_grad_sums -> [N, C] math -> nc_affine_grad (dx = a dy + b (x - mean) + c per
            (n, c), 0 at invalid positions)

Notation: L_n = valid positions of sample n (`counts`, [N] in the statistics dtype), m, v the
per-(n, c) mean and biased variance over them, A = sum(dy), B = sum(dy * (x - m)) over them.
  GroupNorm (InstanceNorm: one group per channel): the group's mean and variance merge the
      channels' (m, v) (Chan, equal counts); with Bg = B + (m - mean_g) A per channel,
      dx = scale dy - r^3 sum_g(w Bg) / (Cg L_n) (x - mean_g) - sum_g(scale A) / (Cg L_n).
  BatchNorm (training): the channel's mean and variance merge the samples' (m, v) weighted by
      L_n; over T = sum_n L_n, dx = scale dy - scale r^2 S (x - mean) / T - scale sum(A) / T,
      S = sum_n (B + (m - mean) A).
  Frozen statistics (BatchNorm eval, InstanceNorm with running statistics): dx = scale dy.
Double backward recomputes the forward with differentiable torch ops (torch.where on the
validity) and differentiates that, as _double_backward there does.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import functional as FN
from .instance_stats_autograd import (_double_backward, _grad_as, _nc, _param,
                                      norm_scale_shift)
from .ops.common import stat_dtype
from .ops.instance_stats import _nc_valid
from .sync_batchnorm import _update_running_stats

_fn = torch.ops.fastnorm


# ----------------------------------------------------------------------------------------------
# validity
# ----------------------------------------------------------------------------------------------
class Validity(NamedTuple):
    lengths: Optional[Tensor]  # int64 [N] on the input's device
    mask: Optional[Tensor]  # bool [N, *spatial] (N, 1 for an (N, C) input), contiguous
    counts: Tensor  # [N], statistics dtype: valid positions of each sample


def check_one_validity(name: str, lengths, mask) -> None:
    if lengths is not None and mask is not None:
        raise ValueError(f"{name}: expected at most one of lengths and mask, but got both")


def prepare_validity(name: str, input: Tensor, lengths, mask) -> Validity:
    """The public validity arguments as the ops take them, with the per-sample valid counts
    (torch ops on the device: no host sync). The caller has run check_one_validity first (its
    error comes before the other argument checks)."""
    n, sd = input.shape[0], stat_dtype(input.dtype)
    spatial = list(input.shape[2:])
    for what, t in (("lengths", lengths), ("mask", mask)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected {what} to be a Tensor, but got {type(t).__name__}")
    if lengths is not None:
        if input.dim() < 3:
            raise ValueError(f"{name}: lengths needs a length dimension (the last of (N, C, *)), "
                             f"but got input of shape {tuple(input.shape)}; select samples "
                             f"with a mask of shape (N,)")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise RuntimeError(f"{name}: expected lengths of an integer dtype, but got "
                               f"{lengths.dtype}")
        if list(lengths.shape) != [n]:
            raise RuntimeError(f"{name}: expected lengths of shape [{n}] (N of the input), but "
                               f"got lengths of shape {list(lengths.shape)}")
        lengths = lengths.to(device=input.device, dtype=torch.int64)
        # every position of the leading spatial dims of a valid column counts
        counts = lengths.clamp(0, spatial[-1]).to(sd) * math.prod(spatial[:-1])
        return Validity(lengths, None, counts)
    target = [n, *spatial]  # an (N, C) input: [N], which samples count
    if mask.dtype != torch.bool:
        raise RuntimeError(f"{name}: expected a mask of dtype torch.bool, but got {mask.dtype}")
    aligned = [1] * (len(target) - mask.dim()) + list(mask.shape)
    if mask.dim() > len(target) or any(a not in (1, t) for a, t in zip(aligned, target)):
        raise RuntimeError(f"{name}: expected a mask broadcastable to (N, *spatial) = {target}, "
                           f"but got mask of shape {list(mask.shape)}")
    mask = mask.to(input.device).reshape(aligned).expand(target)
    if not spatial:
        mask = mask.unsqueeze(-1)  # the op runs on input.unsqueeze(-1)
    mask = mask.contiguous()
    counts = mask.sum(list(range(1, mask.dim()))).to(sd)
    return Validity(None, mask, counts)


def _with_length_dim(input: Tensor) -> Tensor:
    """The ops take (N, C, *spatial); an (N, C) input runs as (N, C, 1)."""
    return input.unsqueeze(-1) if input.dim() == 2 else input


def _like_input(y: Tensor, input: Tensor) -> Tensor:
    return y.squeeze(-1) if input.dim() == 2 else y


# ----------------------------------------------------------------------------------------------
# [N, C] and [C] math shared by the forwards, backwards and differentiable recomputations
# ----------------------------------------------------------------------------------------------
def _per_nc(t: Tensor, n: int) -> Tensor:
    """A per-channel tensor as the contiguous [N, C] the ops take."""
    return t.reshape(1, -1).expand(n, -1).contiguous()


def _vec(t: Optional[Tensor], sd: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(sd).reshape(-1)


def _group_sum(t: Tensor, groups: int) -> Tensor:
    """[N, C] -> each channel holds the sum over its group's channels."""
    n, c = t.shape
    cg = c // groups  # not -1: an empty batch has no size to infer it from
    return t.reshape(n, groups, cg).sum(-1, keepdim=True).expand(n, groups, cg).reshape(n, c)


def _group_scale_shift(m, v, groups, w, b, eps):
    """(mean, rstd, scale, shift), each [N, C]: the group statistics merged from the per-(n, c)
    ones (Chan, every channel of a sample having the same count), broadcast to the channels."""
    n, c = m.shape
    cg = c // groups
    mean = _group_sum(m, groups) / cg
    var = _group_sum(v + (m - mean).square(), groups) / cg
    r, scale, shift = norm_scale_shift(mean, var, w, b, eps)
    return mean, r, scale, shift


def batch_moments(m: Tensor, v: Tensor, counts: Tensor):
    """Per-channel (T, mean, M2) of the batch (T = sum_n counts[n], 0-d; mean and
    M2 = sum of squared deviations, [C]) from the per-(n, c) moments over counts[n] positions
    each: Chan's merge weighted by the counts."""
    weights = counts.unsqueeze(1)
    total = counts.sum()
    mean = (weights * m).sum(0) / total.clamp_min(1)
    m2 = (weights * (v + (m - mean).square())).sum(0)
    return total, mean, m2


def batch_grad_sums(dy, x, m, mean, lengths, mask):
    """Per-channel sum(dy) and sum(dy * (x - mean)) over the batch's valid positions."""
    A, B = _fn.nc_grad_sums(dy, x, m, lengths=lengths, mask=mask)
    return A.sum(0), (B + (m - mean) * A).sum(0)


def batch_norm_input_grad(dy, x, mean, rstd, w, sum_dy, sum_dy_xmu, total, lengths, mask):
    """dx of y = (x - mean) * rstd * w + b with (mean, rstd) the statistics of `total` valid
    positions (the sums over them given: this rank's or every rank's)."""
    n = x.shape[0]
    scale = rstd if w is None else rstd * w
    inv = 1.0 / total.clamp_min(1)
    b = -scale * rstd * rstd * sum_dy_xmu * inv
    c = -scale * sum_dy * inv
    return _fn.nc_affine_grad(dy, x, _per_nc(mean, n), _per_nc(scale, n), _per_nc(b, n),
                              _per_nc(c, n), lengths=lengths, mask=mask)


def _moments_differentiable(x, valid, counts, sd):
    """(m, v) as nc_moments computes them with the validity, with differentiable torch ops."""
    dims = list(range(2, x.dim()))
    xs = x.to(sd)
    denom = counts.clamp_min(1).unsqueeze(1)
    m = torch.where(valid, xs, 0).sum(dims) / denom
    xc = torch.where(valid, xs - _nc(m, x), 0)
    return m, (xc * xc).sum(dims) / denom


def _affine_differentiable(x, scale, shift, valid):
    y = x.to(scale.dtype) * _nc(scale, x) + _nc(shift, x)
    return torch.where(valid, y, 0).to(x.dtype)


def _group_norm_differentiable(x, weight, bias, groups, eps, lengths, mask, counts):
    sd = stat_dtype(x.dtype)
    valid = _nc_valid(x, lengths, mask)
    m, v = _moments_differentiable(x, valid, counts, sd)
    _, _, scale, shift = _group_scale_shift(m, v, groups, _param(weight, sd), _param(bias, sd), eps)
    return _affine_differentiable(x, scale, shift, valid)


def _batch_norm_differentiable(x, weight, bias, eps, lengths, mask, counts):
    sd = stat_dtype(x.dtype)
    valid = _nc_valid(x, lengths, mask)
    m, v = _moments_differentiable(x, valid, counts, sd)
    total, mean, m2 = batch_moments(m, v, counts)
    _, scale, shift = norm_scale_shift(mean, m2 / total.clamp_min(1), _vec(weight, sd),
                                           _vec(bias, sd), eps)
    return _affine_differentiable(x, scale.reshape(1, -1), shift.reshape(1, -1), valid)


def _frozen_differentiable(x, weight, bias, running_mean, running_var, eps, lengths, mask):
    sd = stat_dtype(x.dtype)
    _, scale, shift = norm_scale_shift(_vec(running_mean, sd), _vec(running_var, sd),
                                           _vec(weight, sd), _vec(bias, sd), eps)
    return _affine_differentiable(x, scale.reshape(1, -1), shift.reshape(1, -1),
                                  _nc_valid(x, lengths, mask))


# ----------------------------------------------------------------------------------------------
# autograd.Functions (x of rank >= 3; lengths, mask, counts as prepare_validity makes them)
# ----------------------------------------------------------------------------------------------
class MaskedGroupNormFunction(torch.autograd.Function):
    """y = GroupNorm(x) over the valid positions (InstanceNorm: groups = C). Also returns the
    per-(n, c) mean and biased variance (not differentiable) for InstanceNorm's running
    statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, lengths, mask, counts):
        sd = stat_dtype(x.dtype)
        m, v = _fn.nc_moments(x, lengths=lengths, mask=mask)
        mean, r, scale, shift = _group_scale_shift(m, v, groups, _param(weight, sd),
                                                   _param(bias, sd), eps)
        y = _fn.nc_affine(x, scale, shift, lengths=lengths, mask=mask)
        ctx.save_for_backward(x, weight, bias, lengths, mask, counts, m, mean, r, scale)
        ctx.groups, ctx.eps = groups, eps
        ctx.mark_non_differentiable(m, v)
        return y, m, v

    @staticmethod
    def backward(ctx, dy, _dm, _dv):
        x, weight, bias, lengths, mask, counts, m, mean, r, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        groups = ctx.groups
        if torch.is_grad_enabled():
            grads = _double_backward(
                lambda *a: _group_norm_differentiable(*a, groups, ctx.eps, lengths, mask, counts),
                (x, weight, bias), dy, needs[:3])
            return (*grads, None, None, None, None, None)
        A, B = _fn.nc_grad_sums(dy, x, m, lengths=lengths, mask=mask)
        centred = B + (m - mean) * A  # sum(dy * (x - group mean)) per (n, c)
        dw = (r * centred).sum(0) if needs[1] and weight is not None else None
        db = A.sum(0) if needs[2] and bias is not None else None
        dx = None
        if needs[0]:
            w = _param(weight, m.dtype)
            w_centred = centred if w is None else w * centred
            # a sample with no valid position: any finite divisor (its dx is 0)
            inv = 1.0 / ((m.shape[1] // groups) * counts.clamp_min(1)).unsqueeze(1)
            b = _group_sum(-(r * r * r) * w_centred, groups) * inv
            c = _group_sum(-scale * A, groups) * inv
            dx = _fn.nc_affine_grad(dy, x, mean, scale, b, c, lengths=lengths, mask=mask)
        return (dx, _grad_as(dw, weight), _grad_as(db, bias), None, None, None, None, None)


class MaskedBatchNormFunction(torch.autograd.Function):
    """y = BatchNorm(x) with the statistics of the batch's valid positions. Also returns the
    batch mean and biased variance ([C], not differentiable) for the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, lengths, mask, counts):
        sd = stat_dtype(x.dtype)
        m, v = _fn.nc_moments(x, lengths=lengths, mask=mask)
        total, mean, m2 = batch_moments(m, v, counts)
        var = m2 / total.clamp_min(1)
        r, scale, shift = norm_scale_shift(mean, var, _vec(weight, sd), _vec(bias, sd), eps)
        n = x.shape[0]
        y = _fn.nc_affine(x, _per_nc(scale, n), _per_nc(shift, n), lengths=lengths, mask=mask)
        ctx.save_for_backward(x, weight, bias, lengths, mask, counts, m, mean, r)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, lengths, mask, counts, m, mean, r = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grads = _double_backward(
                lambda *a: _batch_norm_differentiable(*a, ctx.eps, lengths, mask, counts),
                (x, weight, bias), dy, needs[:3])
            return (*grads, None, None, None, None)
        sum_dy, sum_dy_xmu = batch_grad_sums(dy, x, m, mean, lengths, mask)
        dw = r * sum_dy_xmu if needs[1] and weight is not None else None
        db = sum_dy if needs[2] and bias is not None else None
        dx = None
        if needs[0]:
            dx = batch_norm_input_grad(dy, x, mean, r, _vec(weight, m.dtype), sum_dy,
                                       sum_dy_xmu, counts.sum(), lengths, mask)
        return (dx, _grad_as(dw, weight), _grad_as(db, bias), None, None, None, None)


class MaskedFrozenNormFunction(torch.autograd.Function):
    """y = (x - running_mean) * rsqrt(running_var + eps) * weight + bias at the valid positions,
    0 at the invalid ones (BatchNorm in eval, InstanceNorm with running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, lengths, mask):
        sd = stat_dtype(x.dtype)
        mean = _vec(running_mean, sd)
        r, scale, shift = norm_scale_shift(mean, _vec(running_var, sd), _vec(weight, sd),
                                               _vec(bias, sd), eps)
        n = x.shape[0]
        y = _fn.nc_affine(x, _per_nc(scale, n), _per_nc(shift, n), lengths=lengths, mask=mask)
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, lengths, mask, mean, r,
                              scale)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, rm, rv, lengths, mask, mean, r, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grads = _double_backward(
                lambda *a: _frozen_differentiable(*a, ctx.eps, lengths, mask),
                (x, weight, bias, rm, rv), dy, needs[:5])
            return (*grads, None, None, None)
        n = x.shape[0]
        mean_nc = _per_nc(mean, n)
        dx = dw = db = drm = drv = None
        if needs[0]:
            zero = torch.zeros_like(mean_nc)
            dx = _fn.nc_affine_grad(dy, x, mean_nc, _per_nc(scale, n), zero, zero,
                                    lengths=lengths, mask=mask)
        if any(needs[1:5]):
            A, B = _fn.nc_grad_sums(dy, x, mean_nc, lengths=lengths, mask=mask)
            sum_dy, sum_dy_xmu = A.sum(0), B.sum(0)
            dw = r * sum_dy_xmu if weight is not None else None
            db = sum_dy
            # the statistics too, should they require grad (buffers do not)
            drm = -scale * sum_dy
            w = _vec(weight, mean.dtype)
            drv = -0.5 * r * r * r * sum_dy_xmu * (1.0 if w is None else w)
        grads = (dw, db, drm, drv)
        return (dx, *(_grad_as(g, t) if need else None
                      for g, t, need in zip(grads, (weight, bias, rm, rv), needs[1:5])),
                None, None, None)


# ----------------------------------------------------------------------------------------------
# the norms (fastnorm.functional.masked_* call these with a validity given)
# ----------------------------------------------------------------------------------------------
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
               momentum: Optional[float], eps: float, lengths, mask,
               num_batches_tracked: Optional[Tensor] = None,
               update_running_stats: bool = True) -> Tensor:
    """BatchNorm over the valid positions. num_batches_tracked and momentum=None (cumulative
    average) as fastnorm.functional._batch_norm; update_running_stats=False (a checkpoint
    recomputation) normalises the same way and updates nothing. Every check runs first."""
    name = "masked_batch_norm"
    check_one_validity(name, lengths, mask)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    problem = FN._batch_norm_problem(input, running_mean, running_var, weight, bias, training)
    if problem is not None:
        raise problem
    validity = prepare_validity(name, input, lengths, mask)
    updates = training and running_mean is not None and update_running_stats
    if updates and momentum is None and num_batches_tracked is None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
    if input.numel() == 0:
        # nothing to normalise, valid or not: the plain layer's answer (torch's: an empty output,
        # num_batches_tracked counted, the running statistics kept)
        if not update_running_stats:
            running_mean = None if running_mean is None else running_mean.clone()
            running_var = None if running_var is None else running_var.clone()
        return FN._batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, num_batches_tracked)
    x = _with_length_dim(input)
    if not training:
        return _like_input(MaskedFrozenNormFunction.apply(
            x, weight, bias, running_mean, running_var, eps, validity.lengths, validity.mask),
            input)
    total = validity.counts.sum()
    # torch's "more than 1 value per channel" check, on the valid values: T from lengths given
    # on the CPU (a data loader's) costs no sync; otherwise one host read of T. A compiled graph
    # skips it (no sync; T <= 1 then gives finite values, never NaN)
    if not torch.compiler.is_compiling():
        if lengths is not None and lengths.device.type == "cpu" and input.device.type != "cpu":
            t = int(lengths.clamp(0, input.shape[-1]).sum()) * math.prod(input.shape[2:-1])
        else:
            t = int(total.item())
        if t <= 1:
            raise ValueError(f"Expected more than 1 valid value per channel when training, got "
                             f"input of size {list(input.shape)} with {t} valid positions")
    y, mean, var = MaskedBatchNormFunction.apply(x, weight, bias, eps, *validity)
    if updates:
        with torch.no_grad():
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                  total, mean, var * total)
    return _like_input(y, input)


def _update_instance_running_stats(running_mean: Tensor, running_var: Tensor, momentum: float,
                                   m: Tensor, v: Tensor, counts: Tensor) -> None:
    """torch's InstanceNorm update (the average over samples of the per-(n, c) mean and unbiased
    variance) over the samples with at least 2 valid positions (the others have no unbiased
    variance); none: the buffers stay. On the device, no host sync."""
    sd = m.dtype
    eligible = (counts >= 2).to(sd).unsqueeze(1)
    k = eligible.sum()
    unbiased = v * (counts / (counts - 1).clamp_min(1)).unsqueeze(1)
    for buf, stat in ((running_mean, m), (running_var, unbiased)):
        old = buf.to(sd)
        batch = (eligible * stat).sum(0) / k.clamp_min(1)
        buf.copy_(torch.where(k > 0, old * (1 - momentum) + batch * momentum, old))


def instance_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  weight: Optional[Tensor], bias: Optional[Tensor], use_input_stats: bool,
                  momentum: float, eps: float, lengths, mask,
                  update_running_stats: bool = True) -> Tensor:
    """InstanceNorm over each sample's valid positions; checks in torch's order first."""
    name = "masked_instance_norm"
    check_one_validity(name, lengths, mask)
    if use_input_stats:
        FN._verify_spatial_size(input)
    elif running_mean is None or running_var is None:
        raise RuntimeError(f"{name}: expected running_mean and running_var to be defined when "
                           f"use_input_stats is false")
    FN._check_channel_dim(name, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must either both be None or "
                         f"neither be None")
    FN._check_floating(name, input)
    c = input.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        FN._check_vector(name, what, t, input, c, f"one per channel, C={c}")
    validity = prepare_validity(name, input, lengths, mask)
    x = _with_length_dim(input)
    if not use_input_stats:
        return _like_input(MaskedFrozenNormFunction.apply(
            x, weight, bias, running_mean, running_var, eps, validity.lengths, validity.mask),
            input)
    y, m, v = MaskedGroupNormFunction.apply(x, weight, bias, c, eps, *validity)
    if running_mean is not None and update_running_stats:
        with torch.no_grad():
            _update_instance_running_stats(running_mean, running_var, momentum, m, v,
                                           validity.counts)
    return _like_input(y, input)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, lengths, mask) -> Tensor:
    """GroupNorm over each group's channels x the sample's valid positions."""
    name = "masked_group_norm"
    check_one_validity(name, lengths, mask)
    FN._group_norm_checks("group_norm", input, num_groups, weight, bias)
    FN._check_floating(name, input)
    validity = prepare_validity(name, input, lengths, mask)
    y, _, _ = MaskedGroupNormFunction.apply(_with_length_dim(input), weight, bias, num_groups,
                                            eps, *validity)
    return _like_input(y, input)


# ----------------------------------------------------------------------------------------------
# module forwards (fastnorm.masked_modules, and SyncBatchNorm without a process group)
# ----------------------------------------------------------------------------------------------
def batch_norm_module_forward(module, input: Tensor, lengths, mask) -> Tensor:
    """torch.nn's _BatchNorm.forward decisions (fastnorm.modules.batch_norm_module_forward's)
    with a validity: num_batches_tracked is incremented after every check, only when training
    with tracked statistics, and a checkpoint recomputation updates nothing."""
    tracking = module.training and module.track_running_stats
    recompute = tracking and FN.in_checkpoint_recomputation()
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    use_buffers = not module.training or module.track_running_stats
    nbt = module.num_batches_tracked if tracking and not recompute else None
    momentum = module.momentum
    if momentum is None and nbt is None:
        momentum = 0.0  # nothing is updated: the factor is unused
    return batch_norm(input, module.running_mean if use_buffers else None,
                      module.running_var if use_buffers else None, module.weight, module.bias,
                      bn_training, momentum, module.eps, lengths, mask, num_batches_tracked=nbt,
                      update_running_stats=not recompute)


def instance_norm_module_forward(module, input: Tensor, lengths, mask) -> Tensor:
    """torch.nn's _InstanceNorm.forward (its input checks and channel-count warning) with a
    validity; an unbatched input has no N for the validity to index: ValueError."""
    module._check_input_dim(input)
    feature_dim = input.dim() - module._get_no_batch_dim()
    if input.size(feature_dim) != module.num_features:
        if module.affine:
            raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                             f" ({module.num_features}), but got: {input.size(feature_dim)}.")
        warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can "
                      f"silence this warning by not passing in num_features, which is not used "
                      f"because affine=False", stacklevel=3)
    if input.dim() == module._get_no_batch_dim():
        raise ValueError(f"{type(module).__name__}: mask and lengths need a batched input "
                         f"(N, C, *), but got an unbatched input of shape {tuple(input.shape)}")
    use_input_stats = module.training or not module.track_running_stats
    recompute = (module.training and module.track_running_stats
                 and FN.in_checkpoint_recomputation())
    return instance_norm(input, module.running_mean, module.running_var, module.weight,
                         module.bias, use_input_stats,
                         module.momentum if module.momentum is not None else 0.0, module.eps,
                         lengths, mask, update_running_stats=not recompute)
