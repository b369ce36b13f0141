"""Masked BatchNorm / InstanceNorm / GroupNorm (fastnorm.functional.masked_*, fastnorm.Masked*):
every result against an independent float64 reference written here, which gathers the valid
positions of each sample and normalises them with torch.nn.functional (BatchNorm: the valid
positions of all samples concatenated, F.batch_norm / torch.nn.BatchNorm1d; InstanceNorm and
GroupNorm: F.layer_norm of each (sample, group)'s valid values), then scatters them back with
zeros at the invalid positions.

The contract (fastnorm/masked.py): lengths [N] (positions w < lengths[n] of the last dimension
valid, clamped to [0, W]) or a bool mask broadcastable to (N, *spatial), at most one; outputs and
input gradients 0 at the invalid positions; statistics over the valid positions only (InstanceNorm
per (n, c), GroupNorm per (n, group), BatchNorm per channel over the batch); BatchNorm training
needs more than one valid value per channel; no NaN from a sample with no valid position or from
garbage in the padding; without a validity, exactly the plain fastnorm layer.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from conftest import TOL, assert_close_scaled, mentions_shape

FN = fastnorm.functional
CL = torch.channels_last
CL3 = torch.channels_last_3d
HALF = (torch.float16, torch.bfloat16)


# ==============================================================================================
# the reference (independent of the implementation)
# ==============================================================================================
def valid_of(shape, lengths=None, mask=None):
    """bool [N, *spatial] (CPU): which positions count, from the contract's definitions."""
    n, sp = shape[0], tuple(shape[2:])
    if mask is not None:
        return mask.cpu().to(torch.bool).expand(n, *sp).clone()
    if lengths is None:
        return torch.ones((n, *sp), dtype=torch.bool)
    if not sp:
        raise AssertionError("lengths need a length dimension")
    w = sp[-1]
    lens = lengths.cpu().to(torch.int64).clamp(0, w)
    return (torch.arange(w) < lens.view(-1, *([1] * len(sp)))).expand(n, *sp).clone()


def _gather(x64, valid):
    """Per sample: (index of its valid flat positions, x[n] at them as (C, L_n))."""
    n, c = x64.shape[:2]
    flat = x64.reshape(n, c, -1)
    vflat = valid.reshape(n, -1).to(x64.device)
    out = []
    for i in range(n):
        idx = vflat[i].nonzero().squeeze(1)
        out.append((idx, flat[i].index_select(1, idx)))
    return out


def _scatter(x64, parts, ys):
    """The full tensor: ys[n] (C, L_n) at sample n's valid positions, 0 elsewhere."""
    n, c = x64.shape[:2]
    s = math.prod(x64.shape[2:])
    rows = [x64.new_zeros(c, s).index_copy(1, idx, y) for (idx, _), y in zip(parts, ys)]
    if not rows:
        return x64.new_zeros(x64.shape) + 0 * x64.sum()
    return torch.stack(rows).reshape(x64.shape)


def _per_sample(x64, valid, fn):
    parts = _gather(x64, valid)
    return _scatter(x64, parts, [fn(v) if v.shape[1] else v for _, v in parts])


def _group_rows(v, groups, w, b, eps):
    """One sample's valid values v (C, L) normalised per group of C / groups channels x L
    positions: F.layer_norm over each group's row (F.group_norm refuses a single value), then
    the per-channel affine."""
    c, n = v.shape
    y = F.layer_norm(v.reshape(groups, -1), ((c // groups) * n,), eps=eps).reshape(c, n)
    if w is not None:
        y = y * w[:, None]
    if b is not None:
        y = y + b[:, None]
    return y


def ref_group_norm(x64, valid, groups, w, b, eps):
    """GroupNorm of each sample over its group's channels x its valid positions."""
    return _per_sample(x64, valid, lambda v: _group_rows(v, groups, w, b, eps))


def ref_instance_norm(x64, valid, w, b, eps, running=None, use_input_stats=True, momentum=0.1):
    """InstanceNorm per (n, c) over the valid positions; running = (rm, rv) float64 tensors,
    updated in place (use_input_stats) with the mean over the samples with >= 2 valid positions
    of their per-(n, c) mean and unbiased variance, or used (not use_input_stats)."""
    c = x64.shape[1]
    if not use_input_stats:
        rm, rv = running
        return _per_sample(x64, valid, lambda v: F.batch_norm(v.t(), rm, rv, w, b, False, 0.0,
                                                              eps).t())
    parts = _gather(x64, valid)
    if running is not None:
        with torch.no_grad():
            ok = [v for _, v in parts if v.shape[1] >= 2]
            if ok:
                mean = torch.stack([v.mean(1) for v in ok]).mean(0)
                var = torch.stack([v.var(1, correction=1) for v in ok]).mean(0)
                running[0].mul_(1 - momentum).add_(momentum * mean)
                running[1].mul_(1 - momentum).add_(momentum * var)
    return _scatter(x64, parts, [_group_rows(v, c, w, b, eps) if v.shape[1] else v
                                 for _, v in parts])


def ref_batch_norm(x64, valid, bn):
    """BatchNorm over the valid positions of the whole batch: `bn` (a float64 torch.nn.BatchNorm1d,
    or a function of (T, C) data) on the concatenation of every sample's valid positions."""
    squeeze = x64.dim() == 2
    if squeeze:  # (N, C) with a mask (N,): the samples that count
        x64, valid = x64.unsqueeze(-1), valid.unsqueeze(-1)
    parts = _gather(x64, valid)
    cat = torch.cat([v for _, v in parts], 1) if parts else x64.new_zeros(x64.shape[1], 0)
    y = bn(cat.t()).t()
    ys = list(torch.split(y, [v.shape[1] for _, v in parts], 1))
    out = _scatter(x64, parts, ys)
    return out.squeeze(-1) if squeeze else out


# ----------------------------------------------------------------------------------------------
# tolerances that follow the conditioning
# ----------------------------------------------------------------------------------------------
# The contract's math is y = x * scale + shift with scale = rstd * w and shift = b - mean * scale,
# and dx = a dy + b (x - mean) + c, in the statistics dtype: where a group's variance is tiny (a
# single valid value: rstd = 1 / sqrt(eps); two close values) those terms are large and cancel,
# so float32 rounds to eps32 * rstd * |w| * |x| in y and eps32 * rstd^2 * |w| * |dy| * |x| in dx
# (torch's own float32 layers round alike there). The comparisons allow that much on top of the
# dtype's tolerance, per (sample, group): nothing extra for well-conditioned groups.
EPS_STAT = {torch.float64: 2.0 ** -52}
COND_MARGIN = 4.0


def _eps_stat(dtype):
    return EPS_STAT.get(dtype, 2.0 ** -23)


def conditioning(kind, dtype, x64, valid, dy64, w, groups=1, eps=1e-5, running_var=None):
    """(out, dx, dw): the extra absolute tolerances of the output and the input gradient (x's
    shape) and of the weight gradient ([C]) of a computation on `dtype` input (statistics in
    float32, float64 for float64), from rstd per (sample, group) (BatchNorm: per channel;
    running_var: the frozen statistics' rstd)."""
    x64 = x64.detach()
    squeeze = x64.dim() == 2
    if squeeze:
        x64, valid, dy64 = x64.unsqueeze(-1), valid.unsqueeze(-1), dy64.unsqueeze(-1)
    n, c = x64.shape[:2]
    xf = x64.reshape(n, c, -1)
    v = valid.reshape(n, 1, -1).to(xf.dtype).expand_as(xf)
    ax = xf.abs() * v
    if running_var is not None:
        r = (running_var.detach().double().cpu() + eps).rsqrt().view(1, c, 1).expand(n, c, 1)
        xmax = (ax.amax((0, 2), keepdim=True).expand(n, c, 1) if ax.numel()
                else ax.sum(2, keepdim=True))
    elif kind == "bn":
        cnt = v.sum((0, 2)).clamp_min(1)
        mean = (xf * v).sum((0, 2)) / cnt
        var = (((xf - mean.view(1, c, 1)) ** 2) * v).sum((0, 2)) / cnt
        r = (var + eps).rsqrt().view(1, c, 1).expand(n, c, 1)
        xmax = (ax.amax((0, 2), keepdim=True).expand(n, c, 1) if ax.numel()
                else ax.sum(2, keepdim=True))
    else:
        g = c if kind == "in" else groups
        xg, vg = xf.reshape(n, g, -1), v.reshape(n, g, -1)
        cnt = vg.sum(-1, keepdim=True).clamp_min(1)
        mean = (xg * vg).sum(-1, keepdim=True) / cnt
        var = (((xg - mean) ** 2) * vg).sum(-1, keepdim=True) / cnt
        r = (var + eps).rsqrt().expand(n, g, c // g).reshape(n, c, 1)
        xmax = (xg.abs() * vg).amax(-1, keepdim=True).expand(n, g, c // g).reshape(n, c, 1) \
            if xg.shape[-1] else torch.zeros(n, c, 1, dtype=xf.dtype)
    aw = torch.ones(c, dtype=xf.dtype) if w is None else w.detach().double().cpu().abs()
    aw = aw.view(1, c, 1)
    dyf = dy64.detach().reshape(n, c, -1).abs() * v
    dymax = dyf.amax((0, 2), keepdim=True) if dyf.numel() else dyf.sum((0, 2), keepdim=True)
    e = COND_MARGIN * _eps_stat(dtype)
    out = (e * r * aw * xmax).expand(n, c, xf.shape[-1]).reshape(x64.shape)
    dx = (e * r * r * aw * dymax * xmax).expand(n, c, xf.shape[-1]).reshape(x64.shape)
    dw = (e * r * dyf * xmax).sum((0, 2))
    if squeeze:
        out, dx = out.squeeze(-1), dx.squeeze(-1)
    return out, dx, dw


def assert_close_cond(actual, expected, dtype, extra=None, factor=1.0, msg=""):
    """|actual - expected| <= rtol |expected| + atol max(1, max|expected|) + extra, elementwise
    (TOL of dtype, times factor; extra: conditioning's allowance); NaN fails."""
    assert actual is not None and expected is not None, msg
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    allowed = rtol * factor * e.abs() + atol * factor * scale
    if extra is not None:
        allowed = allowed + extra
    diff = (a - e).abs()
    ok = diff <= allowed
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{msg}: {int((~ok).sum())} / {ok.numel()} elements off, max |diff| "
                             f"{float(diff.nan_to_num(math.inf).max()):.3g}; first at {bad}: "
                             f"{float(a[tuple(bad)]):.6g} vs {float(e[tuple(bad)]):.6g} "
                             f"(allowed {float(allowed[tuple(bad)]):.3g})")


# ==============================================================================================
# inputs
# ==============================================================================================
def make_x(shape, dtype=torch.float32, device="cpu", fmt=None, offset=0.5):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(device=device, dtype=dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def lengths_for(n, w, dtype=torch.int64, special=(0, 1, None)):
    """Random lengths in [0, W] with 0, 1 and W (None) among them when N allows, shuffled."""
    lens = torch.randint(0, w + 1, (n,))
    fixed = [w if s is None else s for s in special][:n]
    lens[:len(fixed)] = torch.tensor(fixed, dtype=torch.int64)
    return lens[torch.randperm(n)].to(dtype)


def random_mask(n, sp, p=0.6, empty=True, full=True):
    """A random bool mask (N, *sp), with one whole sample invalid and one whole sample valid."""
    m = torch.rand((n, *sp)) < p
    if n >= 3 and empty:
        m[1] = False
    if n >= 3 and full:
        m[2] = True
    return m


def validity(kind, shape, device, bn_train=False):
    """(lengths, mask) for a validity kind: "lengths", "lengths_oob" (values outside [0, W]:
    clamped), "mask", "mask_bcast_n1w" ((N, 1, .., W)), "mask_bcast_1hw" ((1, *spatial)), "none".
    bn_train: at least two valid positions overall (the first sample's or the mask's first
    two entries made valid when the draw has fewer)."""
    n, sp = shape[0], tuple(shape[2:])
    lengths = mask = None
    if kind == "lengths":
        lengths = lengths_for(n, sp[-1])
    elif kind == "lengths_oob":
        lengths = lengths_for(n, sp[-1], special=(-3, sp[-1] + 5, 1))
    elif kind == "mask":
        mask = random_mask(n, sp)
    elif kind == "mask_bcast_n1w":
        mask = torch.rand((n, *([1] * (len(sp) - 1)), sp[-1])) < 0.7
    elif kind == "mask_bcast_1hw":
        mask = torch.rand((1, *sp)) < 0.7
    elif kind != "none":
        raise ValueError(kind)
    if bn_train and int(valid_of(shape, lengths, mask).sum()) < 2:
        if lengths is not None:
            lengths[0] = sp[-1]
        else:
            mask.view(-1)[:2] = True
        assert int(valid_of(shape, lengths, mask).sum()) >= 2
    return (None if lengths is None else lengths.to(device),
            None if mask is None else mask.to(device))


def params(c, dtype=torch.float32, device="cpu"):
    w = (torch.rand(c, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    b = torch.randn(c, dtype=torch.float64).to(device=device, dtype=dtype)
    return w, b


def leaf64(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


def assert_zero_at_invalid(t, valid, what):
    """t (N, C, *spatial) is exactly 0 wherever the position is invalid."""
    v = valid.to(t.device)
    if t.dim() == 2:
        v = v.unsqueeze(-1) if v.dim() == 1 else v
        bad = t.masked_select(~v.expand_as(t) if v.dim() == 2 else ~v)
    else:
        bad = t.masked_select(~v.unsqueeze(1).expand_as(t))
    assert bool((bad == 0).all()), \
        f"{what}: {int((bad != 0).sum())} nonzero values at invalid positions"


def assert_layout(y, x, what="output"):
    if x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=CL), f"{what} lost channels_last"
    elif x.dim() == 5 and x.is_contiguous(memory_format=CL3) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=CL3), f"{what} lost channels_last_3d"
    else:
        assert y.is_contiguous(), f"{what} not contiguous"


def vkw(lengths, mask):
    return {"lengths": lengths, "mask": mask}


# ==============================================================================================
# the three functions against the reference: outputs, input / weight / bias gradients
# ==============================================================================================
def call_masked(kind, x, w, b, lengths, mask, groups=1, eps=1e-5):
    if kind == "bn":
        return FN.masked_batch_norm(x, None, None, w, b, True, 0.1, eps, lengths=lengths, mask=mask)
    if kind == "in":
        return FN.masked_instance_norm(x, None, None, w, b, True, 0.1, eps, lengths=lengths,
                                       mask=mask)
    return FN.masked_group_norm(x, groups, w, b, eps, lengths=lengths, mask=mask)


def call_ref(kind, x64, valid, w64, b64, groups=1, eps=1e-5):
    if kind == "bn":
        return ref_batch_norm(x64, valid, lambda t: F.batch_norm(t, None, None, w64, b64, True,
                                                                 0.1, eps))
    if kind == "in":
        return ref_instance_norm(x64, valid, w64, b64, eps)
    return ref_group_norm(x64, valid, groups, w64, b64, eps)


def check_function(kind, x, w, b, lengths, mask, groups=1, factor=1.0):
    """One call of the masked function and its backward against the reference (gradients: the
    input dtype's tolerance, x4 in float32 / float64 where sums of many terms round; plus the
    conditioning's allowance)."""
    dtype = x.dtype
    grad_factor = 1.0 if dtype in HALF else 4.0
    valid = valid_of(x.shape, lengths, mask)
    xa = x.detach().clone().requires_grad_()
    wa = None if w is None else w.detach().clone().requires_grad_()
    ba = None if b is None else b.detach().clone().requires_grad_()
    y = call_masked(kind, xa, wa, ba, lengths, mask, groups)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_layout(y, x)
    x64, w64, b64 = leaf64(x), leaf64(w), leaf64(b)
    y64 = call_ref(kind, x64, valid, w64, b64, groups)
    g = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=dtype)
    c_out, c_dx, c_dw = conditioning(kind, dtype, x64, valid, g.double().cpu(), w, groups)
    msg = f"{kind} {tuple(x.shape)} {dtype} groups={groups}"
    assert_close_cond(y, y64, dtype, c_out, factor, msg=f"{msg}: output")
    assert_zero_at_invalid(y.detach(), valid, f"{msg}: output")
    assert torch.isfinite(y).all(), msg
    y.backward(g)
    y64.backward(g.double().cpu())
    assert_layout(xa.grad, x, "input grad")
    assert_close_cond(xa.grad, x64.grad, dtype, c_dx, grad_factor, msg=f"{msg}: input grad")
    assert_zero_at_invalid(xa.grad, valid, f"{msg}: input grad")
    for what, p, p64, extra in (("weight", wa, w64, c_dw), ("bias", ba, b64, None)):
        if p is not None:
            assert p.grad is not None and p.grad.dtype == p.dtype, what
            want = p64.grad if p64.grad is not None else torch.zeros_like(p64)  # every sample empty
            assert_close_cond(p.grad, want, dtype, extra, grad_factor, msg=f"{msg}: {what} grad")
    return y, xa.grad


# shape, validity kind, memory format, groups (GroupNorm)
FUNCTION_CASES = [
    ((5, 3, 11), "lengths", None, 3),                  # lengths with 0, 1 and W
    ((4, 7, 5, 6), "mask", None, 7),                   # C/G = 1, a sample with no valid position
    ((4, 7, 5, 6), "mask", CL, 1),                     # channels_last, one group of all channels
    ((4, 6, 5, 7), "lengths_oob", CL, 3),              # lengths < 0 and > W: clamped
    ((3, 1, 4, 5), "mask_bcast_1hw", None, 1),         # C = 1, mask (1, H, W)
    ((4, 3, 5, 6), "mask_bcast_n1w", CL, 3),           # mask (N, 1, W)
    ((3, 4, 2, 3, 5), "lengths", None, 2),             # 3-d, lengths along W
    ((3, 5, 2, 3, 4), "mask", CL3, 5),                 # channels_last_3d
    ((1, 7, 13), "lengths", None, 7),                  # N = 1 (its length random), primes
    ((2, 3, 17, 1), "mask", None, 1),                  # W = 1, prime H
]


@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
@pytest.mark.parametrize("shape,vkind,fmt,groups", FUNCTION_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}{'-cl' if c[2] else ''}"
                              for c in FUNCTION_CASES])
def test_function_matches_reference(kind, shape, vkind, fmt, groups, device):
    torch.manual_seed(zlib.crc32(repr((kind, shape, vkind)).encode()))
    x = make_x(shape, device=device, fmt=fmt)
    lengths, mask = validity(vkind, shape, device, bn_train=(kind == "bn"))
    w, b = params(shape[1], device=device)
    check_function(kind, x, w, b, lengths, mask, groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
def test_dtypes(kind, dtype, device):
    """Output in the input's dtype; half inputs with float32 weight/bias (AMP), float64 with
    float64 parameters; tolerances of the input's dtype. Layouts alternate: channels_last for
    float32 and bfloat16."""
    torch.manual_seed(1)
    fmt = CL if dtype in (torch.float32, torch.bfloat16) else None
    shape = (4, 6, 5, 7)
    x = make_x(shape, dtype, device, fmt)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = params(6, pdtype, device)
    lengths, mask = validity("lengths" if dtype in (torch.float32, torch.float16) else "mask",
                             shape, device, True)
    check_function(kind, x, w, b, lengths, mask, groups=3, factor=2.0)
    if dtype in HALF:  # also with parameters in the input's dtype (a model cast with .to())
        check_function(kind, x, w.to(dtype), b.to(dtype), lengths, mask, groups=3, factor=2.0)


@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
def test_no_affine(kind, device):
    torch.manual_seed(2)
    shape = (4, 4, 3, 5)
    lengths, mask = validity("mask", shape, device, True)
    check_function(kind, make_x(shape, device=device), None, None, lengths, mask, groups=2)


# ==============================================================================================
# validity spellings: lengths == the equivalent mask, bitwise; broadcast == expanded mask
# ==============================================================================================
@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "cl"])
def test_lengths_equal_mask_bitwise(kind, fmt, device):
    torch.manual_seed(3)
    shape = (5, 6, 3, 8)
    x = make_x(shape, device=device, fmt=fmt)
    w, b = params(6, device=device)
    g = torch.randn(shape, device=device)
    lens = torch.tensor([8, 0, 1, 5, 11])  # 11 > W: clamped
    results = []
    spellings = [
        dict(lengths=lens.to(device)),                           # int64 on the input's device
        dict(lengths=lens.to(torch.int32)),                      # int32 on the CPU
        dict(lengths=lens.to(torch.int16).to(device)),
        dict(mask=valid_of(shape, lengths=lens).to(device)),     # the full (N, H, W) mask
        dict(mask=(torch.arange(8) < lens.clamp(max=8)[:, None])[:, None, :].to(device)),  # N1W
    ]
    for kw in spellings:
        xa = x.clone().requires_grad_()
        wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = call_masked(kind, xa, wa, ba, kw.get("lengths"), kw.get("mask"), groups=3)
        y.backward(g)
        results.append((y.detach(), xa.grad, wa.grad, ba.grad))
    for i, r in enumerate(results[1:], 1):
        for what, a, e in zip(("output", "input grad", "weight grad", "bias grad"), r, results[0]):
            assert torch.equal(a, e), f"{kind}: spelling {i} ({list(spellings[i])}) {what} differs"


def test_broadcast_mask_equals_expanded_bitwise(device):
    torch.manual_seed(4)
    shape = (3, 4, 5, 6)
    x = make_x(shape, device=device)
    w, b = params(4, device=device)
    for m in (torch.rand(1, 5, 6) < 0.5, torch.rand(3, 1, 6) < 0.5, torch.rand(5, 1) < 0.5,
              torch.tensor(True)):
        m = m.to(device)
        full = m.expand(3, 5, 6).contiguous()
        for kind in ("bn", "in", "gn"):
            a = call_masked(kind, x, w, b, None, m, groups=2)
            e = call_masked(kind, x, w, b, None, full, groups=2)
            assert torch.equal(a, e), (kind, tuple(m.shape))


# ==============================================================================================
# garbage in the padding, samples with no valid position
# ==============================================================================================
@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
@pytest.mark.parametrize("vkind", ["lengths", "mask"])
def test_padding_garbage_does_not_leak(kind, vkind, device):
    """NaN / inf in the input's padding and any gradient there: the same output and gradients
    (bitwise) as with zeros there, all finite; a sample with no valid position is all 0."""
    torch.manual_seed(5)
    shape = (4, 6, 3, 7)
    x = make_x(shape, device=device)
    w, b = params(6, device=device)
    if vkind == "lengths":
        lengths, mask = torch.tensor([7, 0, 3, 1], device=device), None
    else:
        lengths, mask = None, random_mask(4, (3, 7)).to(device)
    valid = valid_of(shape, lengths, mask).to(device).unsqueeze(1).expand(shape)
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30], device=device)
    junk = garbage[torch.randint(0, 4, shape, device=device)]
    x_dirty = torch.where(valid, x, junk)
    x_clean = torch.where(valid, x, torch.zeros_like(x))
    g = torch.randn(shape, device=device)
    g_dirty = torch.where(valid, g, torch.randn(shape, device=device) * 1e6)
    g_clean = torch.where(valid, g, torch.zeros_like(g))
    outs = []
    for xi, gi in ((x_dirty, g_dirty), (x_clean, g_clean)):
        xa = xi.clone().requires_grad_()
        wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = call_masked(kind, xa, wa, ba, lengths, mask, groups=3)
        y.backward(gi)
        for t in (y, xa.grad, wa.grad, ba.grad):
            assert torch.isfinite(t).all(), f"{kind}: non-finite values"
        outs.append((y.detach(), xa.grad, wa.grad, ba.grad))
        assert not outs[-1][0][1].any() and not outs[-1][1][1].any(), "the empty sample is not 0"
    for what, a, e in zip(("output", "input grad", "weight grad", "bias grad"), *outs):
        assert torch.equal(a, e), f"{kind}: the padding changed the {what}"


@pytest.mark.parametrize("kind", ["in", "gn"])
def test_every_sample_empty(kind, device):
    """IN / GN with no valid position anywhere: zeros, zero gradients, nothing non-finite."""
    x = make_x((3, 4, 5), device=device)
    w, b = params(4, device=device)
    for lengths, mask in ((torch.zeros(3, dtype=torch.long, device=device), None),
                          (None, torch.zeros(3, 5, dtype=torch.bool, device=device))):
        xa = x.clone().requires_grad_()
        wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = call_masked(kind, xa, wa, ba, lengths, mask, groups=2)
        y.sum().backward()
        assert torch.equal(y, torch.zeros_like(y))
        for t in (xa.grad, wa.grad, ba.grad):
            assert torch.equal(t, torch.zeros_like(t))


# ==============================================================================================
# modules: two training steps then an eval step, running statistics included
# ==============================================================================================
def _randomize(m):
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return m


class _Ref:
    """The reference of a masked module, in float64, from the module's initial state."""

    def __init__(self, m, kind):
        self.kind = kind
        self.m = m
        self.w, self.b = leaf64(getattr(m, "weight", None)), leaf64(getattr(m, "bias", None))
        if kind == "bn":
            self.bn = nn.BatchNorm1d(m.num_features, m.eps, m.momentum, m.affine,
                                     m.track_running_stats, dtype=torch.float64)
            self.bn.load_state_dict(m.state_dict())
            if m.affine:
                self.bn.weight, self.bn.bias = nn.Parameter(self.w), nn.Parameter(self.b)
        elif kind == "in":
            self.running = None
            if m.track_running_stats:
                self.running = (m.running_mean.detach().double().clone(),
                                m.running_var.detach().double().clone())

    def __call__(self, x64, valid, training):
        m = self.m
        if self.kind == "bn":
            self.bn.train(training)
            return ref_batch_norm(x64, valid, self.bn)
        if self.kind == "in":
            use_input = training or not m.track_running_stats
            return ref_instance_norm(x64, valid, self.w, self.b, m.eps, self.running, use_input,
                                     m.momentum)
        return ref_group_norm(x64, valid, m.num_groups, self.w, self.b, m.eps)

    def grads(self):
        """The float64 weight and bias gradients (None without affine parameters; zeros when the
        reference had nothing to differentiate: every sample empty)."""
        if self.kind == "bn":
            if not self.m.affine:
                return None, None
            w, b = self.bn.weight, self.bn.bias
        else:
            w, b = self.w, self.b
        return tuple(None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t))
                     for t in (w, b))

    def frozen_var(self, training):
        """The running variance the step normalises with (None: batch statistics)."""
        m = self.m
        if training or not getattr(m, "track_running_stats", False):
            return None
        return self.bn.running_var if self.kind == "bn" else self.running[1]

    def zero_grad(self):
        for t in (self.w, self.b):
            if t is not None:
                t.grad = None
        if self.kind == "bn" and self.m.affine:
            self.bn.weight.grad = self.bn.bias.grad = None

    def buffers(self):
        if self.kind == "bn" and self.m.track_running_stats:
            return {"running_mean": self.bn.running_mean, "running_var": self.bn.running_var,
                    "num_batches_tracked": self.bn.num_batches_tracked}
        if self.kind == "in" and self.running is not None:
            return {"running_mean": self.running[0], "running_var": self.running[1]}
        return {}


def run_module_protocol(m, kind, shape, vkind, device, fmt=None, dtype=torch.float32, steps=2):
    """`steps` training steps then an eval step (fresh inputs and validity each time): output,
    input grad, weight/bias grads, running statistics and num_batches_tracked against _Ref."""
    ref = _Ref(m, kind)
    m.to(device)
    for step in range(steps + 1):
        training = step < steps
        m.train(training)
        x = make_x(shape, dtype, device, fmt, offset=0.5 + step)
        lengths, mask = validity(vkind, shape, device, bn_train=(kind == "bn"))
        valid = valid_of(shape, lengths, mask)
        xa = x.clone().requires_grad_()
        y = m(xa, mask=mask, lengths=lengths)
        x64 = leaf64(x)
        y64 = ref(x64, valid, training)
        msg = f"{type(m).__name__} {shape} {vkind} step {step} ({'train' if training else 'eval'})"
        assert y.dtype == dtype and y.shape == x.shape
        assert_layout(y, x)
        g = torch.randn(shape, device=device).to(dtype)
        frozen = ref.frozen_var(training)
        c_out, c_dx, c_dw = conditioning(kind, dtype, x64, valid, g.double().cpu(),
                                         getattr(m, "weight", None), getattr(m, "num_groups", 1),
                                         m.eps, frozen)
        assert_close_cond(y, y64, dtype, c_out, msg=f"{msg}: output")
        assert_zero_at_invalid(y.detach(), valid, f"{msg}: output")
        y.backward(g)
        y64.backward(g.double().cpu())
        gf = 1.0 if dtype in HALF else 4.0
        assert_close_cond(xa.grad, x64.grad, dtype, c_dx, gf, msg=f"{msg}: input grad")
        assert_zero_at_invalid(xa.grad, valid, f"{msg}: input grad")
        for what, p, e, extra in zip(("weight", "bias"), (getattr(m, "weight", None),
                                                          getattr(m, "bias", None)),
                                     ref.grads(), (c_dw, None)):
            if p is None:
                assert e is None, what
                continue
            e = torch.zeros(p.shape, dtype=torch.float64) if e is None else e
            assert_close_cond(p.grad, e, dtype, extra, gf, msg=f"{msg}: {what} grad")
            p.grad = None
        ref.zero_grad()
        for name, e in ref.buffers().items():
            got = getattr(m, name)
            if name == "num_batches_tracked":
                assert got.dtype == torch.long and int(got) == int(e), f"{msg}: {name} {got} vs {e}"
            else:
                assert got.dtype == torch.float32
                assert_close_scaled(got.double().cpu(), e, torch.float32, 4.0, msg=f"{msg}: {name}")
        if kind in ("bn", "in") and not getattr(m, "track_running_stats", False):
            assert m.running_mean is None and m.running_var is None


# class, constructor kwargs, shape, validity kind, memory format
MODULE_CASES = [
    ("MaskedBatchNorm1d", {}, (5, 4, 9), "lengths", None),
    ("MaskedBatchNorm1d", {"momentum": None}, (6, 3), "mask", None),          # (N, C), mask (N,)
    ("MaskedBatchNorm1d", {"track_running_stats": False}, (4, 3, 7), "mask", None),
    ("MaskedBatchNorm2d", {}, (4, 5, 3, 6), "mask", CL),
    ("MaskedBatchNorm2d", {"momentum": None}, (4, 3, 5, 4), "lengths", None),
    ("MaskedBatchNorm2d", {"track_running_stats": False, "affine": False}, (3, 3, 4, 5),
     "mask_bcast_1hw", None),
    ("MaskedBatchNorm3d", {}, (3, 3, 2, 3, 4), "lengths", CL3),
    ("MaskedBatchNorm3d", {"momentum": None}, (3, 2, 2, 3, 4), "mask", None),
    ("MaskedInstanceNorm1d", {"affine": True, "track_running_stats": True}, (5, 4, 9), "lengths",
     None),
    ("MaskedInstanceNorm1d", {"affine": True}, (4, 3, 7), "mask", None),
    ("MaskedInstanceNorm2d", {"affine": True, "track_running_stats": True}, (4, 5, 3, 6), "mask",
     CL),
    ("MaskedInstanceNorm2d", {}, (4, 3, 4, 5), "mask_bcast_n1w", None),
    ("MaskedInstanceNorm3d", {"track_running_stats": True}, (3, 3, 2, 3, 4), "lengths", None),
    ("MaskedInstanceNorm3d", {"affine": True}, (3, 2, 2, 3, 4), "mask", CL3),
    ("MaskedGroupNorm", {"num_groups": 3, "num_channels": 6}, (5, 6, 9), "lengths", None),
    ("MaskedGroupNorm", {"num_groups": 1, "num_channels": 7}, (4, 7, 3, 5), "mask", CL),
    ("MaskedGroupNorm", {"num_groups": 7, "num_channels": 7}, (4, 7, 3, 5), "lengths", None),
    ("MaskedGroupNorm", {"num_groups": 2, "num_channels": 4, "affine": False}, (3, 4, 2, 3, 4),
     "mask", None),
]


def build(name, shape, **kw):
    kw = dict(kw)
    cls = getattr(fastnorm, name)
    if name == "MaskedGroupNorm":
        return _randomize(cls(kw.pop("num_groups"), kw.pop("num_channels"), **kw))
    return _randomize(cls(shape[1], **kw))


@pytest.mark.parametrize("name,kw,shape,vkind,fmt", MODULE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MODULE_CASES)])
def test_module_protocol(name, kw, shape, vkind, fmt, device):
    torch.manual_seed(6)
    m = build(name, shape, **kw)
    kind = {"B": "bn", "I": "in", "G": "gn"}[name[len("Masked")]]
    run_module_protocol(m, kind, shape, vkind, device, fmt)


@pytest.mark.parametrize("name,kw,shape,vkind,fmt,dtype", [
    ("MaskedBatchNorm2d", {}, (4, 5, 3, 6), "mask", CL, torch.bfloat16),
    ("MaskedBatchNorm1d", {"momentum": None}, (5, 4, 9), "lengths", None, torch.float16),
    ("MaskedInstanceNorm1d", {"affine": True, "track_running_stats": True}, (5, 4, 9), "lengths",
     None, torch.float16),
    ("MaskedGroupNorm", {"num_groups": 2, "num_channels": 4}, (3, 4, 5, 6), "mask_bcast_n1w", CL,
     torch.bfloat16)], ids=["bn2d-bf16-cl", "bn1d-fp16", "in1d-fp16", "gn-bf16-cl"])
def test_module_protocol_half_input(name, kw, shape, vkind, fmt, dtype, device):
    """Half activations through float32 layers (AMP): output in the input's dtype, float32
    parameters' gradients and running statistics."""
    torch.manual_seed(6)
    m = build(name, shape, **kw)
    kind = {"B": "bn", "I": "in", "G": "gn"}[name[len("Masked")]]
    run_module_protocol(m, kind, shape, vkind, device, fmt, dtype)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_instance_norm_running_stats_skip_short_samples(device):
    """Samples with fewer than 2 valid positions do not enter the running statistics; when no
    sample has 2, the buffers stay as they were (bitwise)."""
    m = _randomize(fastnorm.MaskedInstanceNorm1d(3, track_running_stats=True)).to(device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = make_x((3, 3, 6), device=device)
    m(x, lengths=torch.tensor([0, 1, 1], device=device))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved with no sample of 2 valid positions"
    # one sample of 4: the update is that sample's alone (the others' mean and var are ignored)
    m(x, lengths=torch.tensor([1, 4, 0], device=device))
    v4 = x[1, :, :4].double().cpu()
    want_mean = 0.9 * before["running_mean"].double().cpu() + 0.1 * v4.mean(1)
    want_var = 0.9 * before["running_var"].double().cpu() + 0.1 * v4.var(1)
    assert_close_scaled(m.running_mean.double().cpu(), want_mean, torch.float32)
    assert_close_scaled(m.running_var.double().cpu(), want_var, torch.float32)


# ==============================================================================================
# unmasked: exactly the plain fastnorm layer; torch.nn within tolerance; torch checkpoints load
# ==============================================================================================
PLAIN = [("MaskedBatchNorm1d", "BatchNorm1d", (4, 3, 7), {}),
         ("MaskedBatchNorm2d", "BatchNorm2d", (4, 3, 5, 6), {"momentum": None}),
         ("MaskedBatchNorm3d", "BatchNorm3d", (2, 3, 2, 3, 4), {}),
         ("MaskedInstanceNorm1d", "InstanceNorm1d", (4, 3, 7), {"affine": True}),
         ("MaskedInstanceNorm2d", "InstanceNorm2d", (4, 3, 5, 6),
          {"affine": True, "track_running_stats": True}),
         ("MaskedInstanceNorm3d", "InstanceNorm3d", (2, 3, 2, 3, 4), {"track_running_stats": True}),
         ("MaskedGroupNorm", "GroupNorm", (4, 6, 5, 6), {"num_groups": 3, "num_channels": 6})]


def _pair(masked, plain, shape, kw, device):
    if masked == "MaskedGroupNorm":
        args = (kw["num_groups"], kw["num_channels"])
        kw = {k: v for k, v in kw.items() if k not in ("num_groups", "num_channels")}
    else:
        args = (shape[1],)
    t = _randomize(getattr(nn, plain)(*args, **kw))
    p = getattr(fastnorm, plain)(*args, **kw)
    m = getattr(fastnorm, masked)(*args, **kw)
    p.load_state_dict(t.state_dict())
    m.load_state_dict(t.state_dict())
    return t.to(device), p.to(device), m.to(device)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "op_path"])
@pytest.mark.parametrize("masked,plain,shape,kw", PLAIN, ids=[p[0] for p in PLAIN])
def test_unmasked_equals_plain_layer_bitwise(masked, plain, shape, kw, fast, device):
    was = FN.set_cpu_fast_path(fast)
    try:
        torch.manual_seed(7)
        t, p, m = _pair(masked, plain, shape, kw, device)
        assert isinstance(m, type(p)) and isinstance(m, type(t))
        for step, training in enumerate((True, True, False)):
            for mod in (t, p, m):
                mod.train(training)
            fmt = CL if len(shape) == 4 and step == 1 else None
            x = make_x(shape, device=device, fmt=fmt, offset=step)
            g = torch.randn(shape, device=device)
            outs = []
            for mod in (p, m, t):
                xa = x.clone().requires_grad_()
                y = mod(xa) if mod is not m else mod(xa, mask=None, lengths=None)
                y.backward(g)
                outs.append((y.detach(), xa.grad,
                             *[q.grad for q in mod.parameters()], *[b for b in mod.buffers()]))
                for q in mod.parameters():
                    q.grad = None
            (po, mo, to) = outs
            assert len(po) == len(mo)
            for i, (a, e) in enumerate(zip(mo, po)):
                assert torch.equal(a, e), f"{masked} step {step}: item {i} differs from {plain}"
            for i, (a, e) in enumerate(zip(mo, to)):
                if a.is_floating_point():
                    assert_close_scaled(a, e, torch.float32, 4.0,
                                        msg=f"{masked} vs torch.nn.{plain} item {i}")
                else:
                    assert torch.equal(a, e)
    finally:
        FN.set_cpu_fast_path(was)


def test_unmasked_functions_equal_plain_bitwise(device):
    torch.manual_seed(8)
    x = make_x((4, 6, 3, 5), device=device)
    w, b = params(6, device=device)
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    for training in (True, False):
        r1, r2 = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
        a = FN.masked_batch_norm(x, *r1, w, b, training, 0.2, 1e-4)
        e = FN.batch_norm(x, *r2, w, b, training, 0.2, 1e-4)
        assert torch.equal(a, e) and torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
        a = FN.masked_instance_norm(x, *r1, w, b, training, 0.2, 1e-4)
        e = FN.instance_norm(x, *r2, w, b, training, 0.2, 1e-4)
        assert torch.equal(a, e) and torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert torch.equal(FN.masked_group_norm(x, 3, w, b, 1e-4), FN.group_norm(x, 3, w, b, 1e-4))
    assert torch.equal(FN.masked_group_norm(x, 2, mask=None, lengths=None), FN.group_norm(x, 2))


@pytest.mark.parametrize("masked,plain,shape,kw", [PLAIN[1], PLAIN[4], PLAIN[6]],
                         ids=["bn2d", "in2d", "gn"])
def test_torch_checkpoint_loads(masked, plain, shape, kw, device):
    """A torch.nn checkpoint (trained a step) loads strictly into the masked class; with no
    validity it computes what torch does; with a mask, BatchNorm / InstanceNorm in eval are
    per position: torch's output at the valid positions, 0 elsewhere."""
    torch.manual_seed(9)
    t, _, _ = _pair(masked, plain, shape, kw, "cpu")
    t.train()
    t(make_x(shape))
    sd = t.state_dict()
    args = (kw["num_groups"], kw["num_channels"]) if masked == "MaskedGroupNorm" else (shape[1],)
    rest = {k: v for k, v in kw.items() if k not in ("num_groups", "num_channels")}
    m = getattr(fastnorm, masked)(*args, **rest)
    assert list(m.state_dict()) == list(sd)
    m.load_state_dict(sd, strict=True)
    assert m.extra_repr() == t.extra_repr()
    assert repr(m).split("(", 1)[1] == repr(t).split("(", 1)[1]
    assert inspect.signature(type(m).__init__) == inspect.signature(type(t).__init__)
    m, t = m.to(device).eval(), t.to(device).eval()
    x = make_x(shape, device=device)
    assert_close_scaled(m(x), t(x), torch.float32)
    per_position = masked.startswith("MaskedBatch") or kw.get("track_running_stats")
    if per_position:
        mask = random_mask(shape[0], shape[2:]).to(device)
        y = m(x, mask=mask)
        want = torch.where(mask.unsqueeze(1), t(x), torch.zeros(()))
        assert_close_scaled(y, want, torch.float32)
        assert_zero_at_invalid(y, mask, "eval output")


def test_classes_are_subclasses_with_torch_constructors():
    for plain in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                  "InstanceNorm3d", "GroupNorm"):
        masked = "Masked" + plain
        cls = getattr(fastnorm, masked)
        assert masked in fastnorm.__all__
        assert issubclass(cls, getattr(fastnorm, plain)) and issubclass(cls, getattr(nn, plain))
        assert inspect.signature(cls) == inspect.signature(getattr(nn, plain))
        params_ = list(inspect.signature(cls.forward).parameters)
        assert params_[:2] == ["self", "input"] and {"mask", "lengths"} <= set(params_), params_
    for fn in ("masked_batch_norm", "masked_instance_norm", "masked_group_norm"):
        sig = inspect.signature(getattr(FN, fn)).parameters
        assert sig["lengths"].kind == sig["mask"].kind == inspect.Parameter.KEYWORD_ONLY


# ==============================================================================================
# empty batch
# ==============================================================================================
@pytest.mark.parametrize("kind", ["in", "gn", "bn_eval"])
@pytest.mark.parametrize("vkind", ["lengths", "mask"])
def test_empty_batch(kind, vkind, device):
    shape = (0, 4, 3, 5)
    x = make_x(shape, device=device).requires_grad_()
    w, b = params(4, device=device)
    lengths = torch.zeros(0, dtype=torch.long, device=device) if vkind == "lengths" else None
    mask = torch.zeros(0, 3, 5, dtype=torch.bool, device=device) if vkind == "mask" else None
    if kind == "bn_eval":
        y = FN.masked_batch_norm(x, torch.zeros(4, device=device), torch.ones(4, device=device),
                                 w, b, False, lengths=lengths, mask=mask)
    else:
        y = call_masked(kind, x, w, b, lengths, mask, groups=2)
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape


# ==============================================================================================
# errors: what is raised, with the expected and actual named; state untouched
# ==============================================================================================
def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_untouched(m, before, what):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{what}: {k} changed"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_training_needs_two_valid_values(momentum, device):
    m = _randomize(fastnorm.MaskedBatchNorm2d(3, momentum=momentum)).to(device).train()
    m.num_batches_tracked.fill_(5)
    before = _snapshot(m)
    x = make_x((3, 3, 4, 5), device=device)
    cases = [(dict(lengths=torch.tensor([1, 0, 0], device=device)), 4),     # 4 rows x 1 column
             (dict(lengths=torch.zeros(3, dtype=torch.long, device=device)), 0)]
    one = torch.zeros(3, 4, 5, dtype=torch.bool, device=device)
    one[2, 1, 3] = True
    none = torch.zeros(1, 4, 5, dtype=torch.bool, device=device)  # broadcast: nothing valid
    cases += [(dict(mask=one), 1), (dict(mask=none), 0)]
    for kw, t in cases:
        if t >= 2:  # a column of 4 rows is 4 values: that one is allowed
            m(x, **kw)
            before = _snapshot(m)
            continue
        with pytest.raises(ValueError, match=r"Expected more than 1 valid value per channel when "
                                             r"training.*\b%d valid positions" % t) as e:
            m(x, **kw)
        assert mentions_shape(str(e.value), x.shape), str(e.value)
        _assert_untouched(m, before, f"T={t}")
    # (N, C) input, mask of the samples: one sample counts
    m1 = _randomize(fastnorm.MaskedBatchNorm1d(3, momentum=momentum)).to(device).train()
    before = _snapshot(m1)
    with pytest.raises(ValueError, match="more than 1 valid value per channel"):
        m1(make_x((4, 3), device=device),
           mask=torch.tensor([False, True, False, False], device=device))
    _assert_untouched(m1, before, "(N, C) with one valid sample")
    # the functional, running statistics given
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="more than 1 valid value per channel"):
        FN.masked_batch_norm(x, rm, rv, training=True, mask=one)
    assert not rm.any() and bool((rv == 1).all())
    # eval needs no batch statistics: fine with a single valid value
    m.eval()
    y = m(x, mask=one)
    assert_zero_at_invalid(y, one, "eval")


@pytest.mark.parametrize("vkind", ["lengths", "mask"])
def test_bn_training_empty_batch_is_the_plain_layer(vkind, device):
    """N = 0 in training: nothing to normalise, valid or not; the plain layer's (and torch's)
    answer: an empty output, num_batches_tracked counted, the running statistics kept."""
    x = torch.randn(0, 3, 5, device=device)
    kw = (dict(lengths=torch.zeros(0, dtype=torch.long, device=device)) if vkind == "lengths"
          else dict(mask=torch.zeros(0, 5, dtype=torch.bool, device=device)))
    m = _randomize(fastnorm.MaskedBatchNorm1d(3)).to(device)
    ref = _randomize(torch.nn.BatchNorm1d(3)).to(device)
    ref.load_state_dict(m.state_dict())
    y = m(x, **kw)
    assert y.shape == x.shape
    ref(x)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def _bad_inputs(device):
    """(module builder, input, kwargs, exception, regexes the message must match)."""
    x = make_x((4, 3, 5, 6), device=device)
    x1 = make_x((4, 3, 7), device=device)
    x2 = make_x((4, 3), device=device)
    L = torch.tensor([6, 2, 0, 3], device=device)
    M = torch.rand(4, 5, 6, device=device) < 0.5
    bn2 = lambda: fastnorm.MaskedBatchNorm2d(3)  # noqa: E731
    in2 = lambda: fastnorm.MaskedInstanceNorm2d(  # noqa: E731
        3, affine=True, track_running_stats=True)
    gn = lambda: fastnorm.MaskedGroupNorm(3, 3)  # noqa: E731
    bn1 = lambda: fastnorm.MaskedBatchNorm1d(3)  # noqa: E731
    out = []
    for mk in (bn2, in2, gn):
        out += [
            (mk, x, dict(lengths=L, mask=M), ValueError, [r"lengths", r"mask"]),
            (mk, x, dict(mask=torch.ones(4, 5, 7, dtype=torch.bool, device=device)), RuntimeError,
             [("shape", (4, 5, 6)), ("shape", (4, 5, 7))]),
            (mk, x, dict(mask=torch.ones(3, 5, 6, dtype=torch.bool, device=device)), RuntimeError,
             [("shape", (4, 5, 6)), ("shape", (3, 5, 6))]),
            (mk, x, dict(mask=M.float()), RuntimeError, [r"bool", r"float32"]),
            (mk, x, dict(mask=M.to(torch.uint8)), RuntimeError, [r"bool", r"uint8"]),
            (mk, x, dict(lengths=L.float()), RuntimeError, [r"int", r"float32"]),
            (mk, x, dict(lengths=L.bool()), RuntimeError, [r"int", r"bool"]),
            (mk, x, dict(lengths=torch.tensor([6, 2, 0], device=device)), RuntimeError,
             [("shape", (4,)), ("shape", (3,))]),
            (mk, x, dict(lengths=L[:, None]), RuntimeError, [("shape", (4,)), ("shape", (4, 1))]),
        ]
    out += [
        (bn1, x2, dict(lengths=L), ValueError, [r"lengths", r"2-?D|\(N, C\)|length dimension"]),
        (bn1, x2, dict(mask=torch.ones(4, 3, dtype=torch.bool, device=device)), RuntimeError,
         [("shape", (4,)), ("shape", (4, 3))]),
        (bn1, x1, dict(mask=torch.ones(4, 6, dtype=torch.bool, device=device)), RuntimeError,
         [("shape", (4, 7)), ("shape", (4, 6))]),
    ]
    return out


@pytest.mark.parametrize("i", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_raise_and_leave_state(i, device):
    mk, x, kw, exc, wants = _bad_inputs(device)[i]
    m = _randomize(mk()).to(device).train()
    before = _snapshot(m)
    with pytest.raises(exc) as e:
        m(x, **kw)
    msg = str(e.value)
    for want in wants:
        if isinstance(want, tuple):
            assert mentions_shape(msg, want[1]), \
                f"{type(m).__name__} {list(kw)}: {want[1]} not in {msg!r}"
        else:
            assert re.search(want, msg), f"{type(m).__name__} {list(kw)}: {want!r} not in {msg!r}"
    _assert_untouched(m, before, msg)


def test_functional_errors_leave_running_stats(device):
    x = make_x((4, 3, 5, 6), device=device)
    for fn in (FN.masked_batch_norm, FN.masked_instance_norm):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        with pytest.raises(ValueError):
            fn(x, rm, rv, None, None, True, lengths=torch.tensor([1, 2, 3, 4], device=device),
               mask=torch.ones(4, 5, 6, dtype=torch.bool, device=device))
        with pytest.raises(RuntimeError):
            fn(x, rm, rv, None, None, True, mask=torch.ones(4, 5, 6, device=device))
        assert not rm.any() and bool((rv == 1).all()), fn.__name__
    with pytest.raises(ValueError):
        FN.masked_group_norm(x, 3, lengths=torch.tensor([1, 2, 3, 4]),
                             mask=torch.ones(4, 5, 6, dtype=torch.bool))


# ==============================================================================================
# gradcheck / gradgradcheck, opcheck, torch.compile
# ==============================================================================================
@pytest.mark.parametrize("kind", ["bn", "in", "gn"])
@pytest.mark.parametrize("vkind", ["lengths", "mask"])
def test_gradcheck(kind, vkind):
    torch.manual_seed(10)
    shape = (3, 4, 2, 3) if vkind == "mask" else (3, 4, 5)
    x = make_x(shape, torch.float64).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    if vkind == "lengths":
        lengths, mask = torch.tensor([5, 2, 0]), None
    else:
        lengths = None
        mask = torch.tensor([[[1, 1, 0], [1, 0, 1]], [[0, 0, 0], [0, 0, 0]],
                             [[0, 1, 0], [0, 0, 0]]], dtype=torch.bool)  # 4, 0 and 1 valid
        if kind == "bn":
            mask[2, 1, 2] = True

    def fn(x, w, b):
        return call_masked(kind, x, w, b, lengths, mask, groups=2, eps=1e-3)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # the first derivatives of a create_graph backward (the differentiable recomputation) are
    # those of the plain backward (the ops): gradgradcheck alone checks the recomputation only
    # against itself
    g = torch.randn(shape, dtype=torch.float64)
    plain = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
    graph = torch.autograd.grad(fn(x, w, b), (x, w, b), g, create_graph=True)
    for a, e, what in zip(graph, plain, ("input", "weight", "bias")):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"{kind} {what} grad")


def test_bn_eval_gradcheck():
    torch.manual_seed(11)
    x = make_x((3, 2, 4), torch.float64).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return FN.masked_batch_norm(x, rm, rv, w, b, False, lengths=torch.tensor([4, 1, 0]))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    g = torch.randn(x.shape, dtype=torch.float64)
    plain = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
    graph = torch.autograd.grad(fn(x, w, b), (x, w, b), g, create_graph=True)
    for a, e in zip(graph, plain):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


NC_OPS = ("nc_moments", "nc_affine", "nc_grad_sums", "nc_affine_grad")


def _opcheck_args(name, vkind):
    torch.manual_seed(12)
    if vkind == "lengths":
        x = make_x((3, 4, 5, 6)).contiguous(memory_format=CL)
        val = dict(lengths=torch.tensor([6, 0, 2]))
    else:
        x = make_x((3, 2, 2, 3, 4), torch.float64)
        val = dict(mask=random_mask(3, (2, 3, 4)))
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    st = [torch.randn(x.shape[:2], dtype=sd) for _ in range(4)]
    dy = torch.randn_like(x)
    args = {"nc_moments": (x,), "nc_affine": (x, st[0], st[1]), "nc_grad_sums": (dy, x, st[0]),
            "nc_affine_grad": (dy, x, *st)}[name]
    return args, val


@pytest.mark.parametrize("vkind", ["lengths", "mask"])
@pytest.mark.parametrize("name", NC_OPS)
def test_opcheck_with_validity(name, vkind):
    args, val = _opcheck_args(name, vkind)
    torch.library.opcheck(getattr(torch.ops.fastnorm, name).default, args, val)


COMPILE_CASES = [("MaskedBatchNorm1d", {}, (4, 3, 7)),
                 ("MaskedBatchNorm2d", {"momentum": None}, (4, 3, 4, 5)),
                 ("MaskedBatchNorm3d", {}, (3, 2, 2, 3, 4)),
                 ("MaskedInstanceNorm1d", {"affine": True, "track_running_stats": True}, (4, 3, 7)),
                 ("MaskedInstanceNorm2d", {"affine": True}, (4, 3, 4, 5)),
                 ("MaskedInstanceNorm3d", {"track_running_stats": True}, (3, 2, 2, 3, 4)),
                 ("MaskedGroupNorm", {"num_groups": 2, "num_channels": 4}, (4, 4, 4, 5))]


@pytest.mark.parametrize("vkind", ["lengths", "mask"])
@pytest.mark.parametrize("name,kw,shape", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_fullgraph_matches_eager(name, kw, shape, vkind):
    """torch.compile(fullgraph=True) of the module (aot_eager) against eager: output, input and
    parameter gradients, buffers after the step."""
    torch._dynamo.reset()  # a fresh cache: the forwards are shared by the classes (recompile limit)
    torch.manual_seed(13)
    m = build(name, shape, **kw).train()
    m_c = copy.deepcopy(m)
    lengths, mask = validity(vkind, shape, "cpu", bn_train=True)
    x = make_x(shape)
    g = torch.randn(shape)
    compiled = torch.compile(m_c, fullgraph=True, backend="aot_eager")
    outs = []
    for mod, fn in ((m, m), (m_c, compiled)):
        xa = x.clone().requires_grad_()
        y = fn(xa, mask=mask, lengths=lengths)
        y.backward(g)
        outs.append((y.detach(), xa.grad, [p.grad for p in mod.parameters()],
                     dict(mod.named_buffers())))
    (ye, dxe, pe, be), (yc, dxc, pc, bc) = outs
    assert_close_scaled(yc, ye, torch.float32, msg=f"{name}: output")
    assert_close_scaled(dxc, dxe, torch.float32, msg=f"{name}: input grad")
    for a, e in zip(pc, pe):
        assert_close_scaled(a, e, torch.float32, 4.0, msg=f"{name}: parameter grad")
    assert be.keys() == bc.keys()
    for k in be:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(bc[k], be[k]), k
        else:
            assert_close_scaled(bc[k], be[k], torch.float32, msg=f"{name}: {k}")
    valid = valid_of(shape, lengths, mask)
    assert_zero_at_invalid(yc, valid, "compiled output")
