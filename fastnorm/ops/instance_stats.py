"""Per-(n, c) primitives: SwitchNorm, AdaIN and IBN are each y = x * scale[n, c] + shift[n, c]
with (scale, shift) a small function of the per-(n, c) moments, so four ops carry them:
nc_moments (one read of x), nc_affine (one read, one write), nc_grad_sums (one read of x and
dy) and nc_affine_grad (one read of x and dy, one write: the gradient through the statistics
and through the affine in one pass). [N, C] tensors are in the statistics dtype, contiguous.
No autograd is registered: the layers' autograd.Functions (fastnorm/instance_stats_autograd.py)
call these forward and backward.

The references compute with ATen ops in the statistics dtype and round once, as the kernels do.

Validity (the masked norms, fastnorm/masked.py): every op takes an optional `lengths` (int64
[N], on the input's device: position s of sample n counts when s % W < lengths[n], W the last
dimension's size, so a length outside [0, W] acts as clamped) or `mask` (bool [N, *spatial],
contiguous, True = valid), at most one. Statistics and sums then run over the valid positions
only (a row with none: mean 0, variance 0, sums 0; never NaN), and the two ops that write a
full-size tensor write 0 at the invalid positions.
"""
from __future__ import annotations

import math

import torch

from .common import _in_input_format, define, lib, memory_format_of, stat_dtype

_VALIDITY = "Tensor? lengths=None, Tensor? mask=None"
SCHEMAS = {
    "nc_moments": f"(Tensor input, {_VALIDITY}) -> (Tensor, Tensor)",
    "nc_affine": f"(Tensor input, Tensor scale, Tensor shift, {_VALIDITY}) -> Tensor",
    "nc_grad_sums": f"(Tensor grad_out, Tensor input, Tensor mean, {_VALIDITY}) -> (Tensor, Tensor)",
    "nc_affine_grad": "(Tensor? grad_out, Tensor input, Tensor mean, Tensor a, Tensor b, "
                      f"Tensor c, {_VALIDITY}) -> Tensor",
}
define(SCHEMAS)


def _nc_check_input(name: str, input: torch.Tensor) -> None:
    if input.dim() < 3:
        raise RuntimeError(f"{name}: expected an input of rank >= 3 (N, C, *spatial), but got "
                           f"input of shape {list(input.shape)}")
    if not input.is_floating_point():
        raise RuntimeError(f"{name}: expected a floating-point input, but got {input.dtype}")


def _nc_check_stat(name: str, what: str, t: torch.Tensor, input: torch.Tensor) -> None:
    """An [N, C] per-(n, c) tensor against an (N, C, *) input."""
    nc = list(input.shape[:2])
    if list(t.shape) != nc:
        raise RuntimeError(f"{name}: expected {what} of shape {nc} (N, C of the input), but got "
                           f"{what} of shape {list(t.shape)}")
    if not t.is_floating_point():
        raise RuntimeError(f"{name}: expected {what} of a floating-point dtype, but got {t.dtype}")


def _nc_check_like(name: str, what: str, t: torch.Tensor, input: torch.Tensor) -> None:
    """grad_out: input's shape, input's dtype or float32."""
    if t.shape != input.shape:
        raise RuntimeError(f"{name}: expected {what} of the input's shape {list(input.shape)}, but "
                           f"got {what} of shape {list(t.shape)}")
    if t.dtype not in (input.dtype, torch.float32):
        raise RuntimeError(f"{name}: expected {what} of the input's dtype ({input.dtype}) or "
                           f"torch.float32, but got {t.dtype}")


def _nc_dims(input: torch.Tensor) -> list:
    return list(range(2, input.dim()))


def _nc_view(t: torch.Tensor, input: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """An [N, C] tensor in the statistics dtype, viewed as [N, C, 1, ...] against input."""
    return t.to(sd).reshape(*t.shape, *([1] * (input.dim() - 2)))


def _nc_check_validity(name: str, input: torch.Tensor, lengths, mask) -> None:
    """lengths: integer [N] on the input's device; mask: bool [N, *spatial] on the input's device;
    at most one."""
    if lengths is not None and mask is not None:
        raise RuntimeError(f"{name}: expected at most one of lengths and mask, got both")
    if lengths is not None:
        if lengths.dtype != torch.int64:
            raise RuntimeError(f"{name}: expected lengths of dtype torch.int64, but got {lengths.dtype}")
        if list(lengths.shape) != [input.shape[0]]:
            raise RuntimeError(f"{name}: expected lengths of shape [{input.shape[0]}] (N of the "
                               f"input), but got lengths of shape {list(lengths.shape)}")
        if lengths.device != input.device:
            raise RuntimeError(f"{name}: lengths is on {lengths.device} but input is on "
                               f"{input.device}")
    if mask is not None:
        want = [input.shape[0], *input.shape[2:]]
        if mask.dtype != torch.bool:
            raise RuntimeError(f"{name}: expected a mask of dtype torch.bool, but got {mask.dtype}")
        if list(mask.shape) != want:
            raise RuntimeError(f"{name}: expected a mask of shape {want} (N and the spatial sizes "
                               f"of the input), but got mask of shape {list(mask.shape)}")
        if mask.device != input.device:
            raise RuntimeError(f"{name}: mask is on {mask.device} but input is on {input.device}")


def _nc_valid(input: torch.Tensor, lengths, mask):
    """The validity as a bool tensor [N, 1, *spatial] against input, or None (all valid)."""
    if mask is not None:
        return mask.unsqueeze(1)
    if lengths is None:
        return None
    w = input.shape[-1]
    pos = torch.arange(w, device=input.device)
    v = pos < lengths.reshape(-1, *([1] * (input.dim() - 1)))  # [N, 1, ..., 1, W]
    return v.expand(input.shape[0], 1, *input.shape[2:])


@torch.library.impl(lib, "nc_moments", "CompositeExplicitAutograd")
def _nc_moments_ref(input, lengths=None, mask=None):
    _nc_check_input("nc_moments", input)
    _nc_check_validity("nc_moments", input, lengths, mask)
    sd = stat_dtype(input.dtype)
    valid = _nc_valid(input, lengths, mask)
    if valid is not None:
        dims = _nc_dims(input)
        xs = input.to(sd)
        cnt = valid.to(sd).sum(dims)  # [N, 1]
        denom = cnt.clamp_min(1)
        mean = torch.where(valid, xs, 0).sum(dims) / denom
        xc = torch.where(valid, xs - _nc_view(mean, input, sd), 0)
        var = (xc * xc).sum(dims) / denom
        return mean.contiguous(), var.contiguous()
    if input.numel() == 0:  # no (n, c), or no positions: NaN statistics (torch's, unwarned)
        nan = input.new_full(tuple(input.shape[:2]), math.nan, dtype=sd)
        return nan, nan.clone()
    # correction=0: the biased variance m2 / L
    var, mean = torch.var_mean(input.to(sd), _nc_dims(input), correction=0)
    return mean.contiguous(), var.contiguous()


@torch.library.impl(lib, "nc_affine", "CompositeExplicitAutograd")
def _nc_affine_ref(input, scale, shift, lengths=None, mask=None):
    _nc_check_input("nc_affine", input)
    _nc_check_stat("nc_affine", "scale", scale, input)
    _nc_check_stat("nc_affine", "shift", shift, input)
    _nc_check_validity("nc_affine", input, lengths, mask)
    sd = stat_dtype(input.dtype)
    y = input.to(sd) * _nc_view(scale, input, sd) + _nc_view(shift, input, sd)
    valid = _nc_valid(input, lengths, mask)
    if valid is not None:
        y = torch.where(valid, y, 0)
    return _in_input_format(y.to(input.dtype), input)


@torch.library.impl(lib, "nc_grad_sums", "CompositeExplicitAutograd")
def _nc_grad_sums_ref(grad_out, input, mean, lengths=None, mask=None):
    _nc_check_input("nc_grad_sums", input)
    _nc_check_like("nc_grad_sums", "grad_out", grad_out, input)
    _nc_check_stat("nc_grad_sums", "mean", mean, input)
    _nc_check_validity("nc_grad_sums", input, lengths, mask)
    sd = stat_dtype(input.dtype)
    dims = _nc_dims(input)
    dy = grad_out.to(sd)
    prod = dy * (input.to(sd) - _nc_view(mean, input, sd))
    valid = _nc_valid(input, lengths, mask)
    if valid is not None:
        dy = torch.where(valid, dy, 0)
        prod = torch.where(valid, prod, 0)
    sum_dy = dy.sum(dims)
    sum_dy_xc = prod.sum(dims)
    return sum_dy.contiguous(), sum_dy_xc.contiguous()


@torch.library.impl(lib, "nc_affine_grad", "CompositeExplicitAutograd")
def _nc_affine_grad_ref(grad_out, input, mean, a, b, c, lengths=None, mask=None):
    name = "nc_affine_grad"
    _nc_check_input(name, input)
    if grad_out is not None:
        _nc_check_like(name, "grad_out", grad_out, input)
    for what, t in (("mean", mean), ("a", a), ("b", b), ("c", c)):
        _nc_check_stat(name, what, t, input)
    _nc_check_validity(name, input, lengths, mask)
    sd = stat_dtype(input.dtype)
    dx = _nc_view(b, input, sd) * (input.to(sd) - _nc_view(mean, input, sd)) + _nc_view(c, input, sd)
    if grad_out is not None:
        dx = dx + _nc_view(a, input, sd) * grad_out.to(sd)
    valid = _nc_valid(input, lengths, mask)
    if valid is not None:
        dx = torch.where(valid, dx, 0)
    return _in_input_format(dx.to(input.dtype), input)


def _nc_stat_like(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty(tuple(input.shape[:2]), dtype=stat_dtype(input.dtype))


@torch.library.register_fake("fastnorm::nc_moments")
def _nc_moments_fake(input, lengths=None, mask=None):
    _nc_check_input("nc_moments", input)
    _nc_check_validity("nc_moments", input, lengths, mask)
    return _nc_stat_like(input), _nc_stat_like(input)


@torch.library.register_fake("fastnorm::nc_affine")
def _nc_affine_fake(input, scale, shift, lengths=None, mask=None):
    _nc_check_input("nc_affine", input)
    _nc_check_stat("nc_affine", "scale", scale, input)
    _nc_check_stat("nc_affine", "shift", shift, input)
    _nc_check_validity("nc_affine", input, lengths, mask)
    return torch.empty_like(input, memory_format=memory_format_of(input))


@torch.library.register_fake("fastnorm::nc_grad_sums")
def _nc_grad_sums_fake(grad_out, input, mean, lengths=None, mask=None):
    _nc_check_input("nc_grad_sums", input)
    _nc_check_like("nc_grad_sums", "grad_out", grad_out, input)
    _nc_check_stat("nc_grad_sums", "mean", mean, input)
    _nc_check_validity("nc_grad_sums", input, lengths, mask)
    return _nc_stat_like(input), _nc_stat_like(input)


@torch.library.register_fake("fastnorm::nc_affine_grad")
def _nc_affine_grad_fake(grad_out, input, mean, a, b, c, lengths=None, mask=None):
    name = "nc_affine_grad"
    _nc_check_input(name, input)
    if grad_out is not None:
        _nc_check_like(name, "grad_out", grad_out, input)
    for what, t in (("mean", mean), ("a", a), ("b", b), ("c", c)):
        _nc_check_stat(name, what, t, input)
    _nc_check_validity(name, input, lengths, mask)
    return torch.empty_like(input, memory_format=memory_format_of(input))
