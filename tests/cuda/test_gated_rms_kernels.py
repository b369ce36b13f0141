"""Gated RMSNorm on the row kernels (fastnorm::gated_rms_norm_fwd / _bwd: the cached RMS kernels
with the GATE flag of kernels/groups_forward.cuh and groups_backward.cuh, one launch per group
column), called as ops through the `target` fixture (tests/conftest.py): the CUDA kernels on a GPU,
the same sources in the CPU emulation, or the reference ops.

Both modes, against float64:
  gate first  (Mamba-2)     y = w * round?(rms(x * a(gate)))  per group of group_size elements
  gate after  (Qwen3-Next)  y = round(n * a(gate)), n = w * round?(rms(x))
with a = silu or sigmoid. The forward's statistics (rstd, group-major [G, M]) against float64; the
output against the formula evaluated from the kernel's own rstd in the accumulation type with the
roundings the contract names (equal to within the gate activation's few ulps); the gradients of
input, gate and weight against float64 autograd of the unrounded formula (the roundings are the
identity to autograd).

Shapes cross the host's decisions (csrc/launch/groups.h gated_forward / gated_backward, sm_count
132): group_size 1 and 7 (single elements), 8 and 48 (16-byte packs for half, 2 packs for fp64),
1024, 2048 and 2047 (a block per group row, up to the backward's 256-thread blocks of the
variants that need 255 registers: groups of 2048); G = 1, 2 and 3 group columns (the pitch); M = 1,
2, 5 and 40 rows; a misaligned view (the scalar
kernels), output masks, no weight, float32 weights and the promoted float32 output, empty inputs.
"""
from __future__ import annotations

import pytest
import torch

from test_row_kernels import EMU_LIMIT, TOL, _check, _randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SILU, SIGMOID = 4, 10
EPS = 1e-5
# (M, H, group_size)
CASES = [(5, 1, 1), (5, 21, 7), (40, 8, 8), (5, 144, 48), (3, 3072, 1024), (2, 4096, 2048),
         (1, 96, 32), (2, 2047, 2047)]


def _ids(cases):
    return [f"m{m}-h{h}-g{g}" for m, h, g in cases]


def _act(code, g):
    return torch.nn.functional.silu(g) if code == SILU else torch.sigmoid(g)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference(x, gate, w, gs, gate_first, code, dy=None):
    """float64 y (no rounding), rstd [G, M], and with dy the gradients of x, gate and w."""
    m, h = x.shape
    g = h // gs
    need = dy is not None
    x64 = x.detach().cpu().double().requires_grad_(need)
    g64 = gate.detach().cpu().double().requires_grad_(need)
    w64 = None if w is None else w.detach().cpu().double().requires_grad_(need)
    src = x64 * _act(code, g64) if gate_first else x64
    grouped = src.view(m, g, gs)
    rstd = torch.rsqrt(grouped.square().mean(-1, keepdim=True) + EPS)
    n = (grouped * rstd).view(m, h)
    if w64 is not None:
        n = n * w64
    y = n if gate_first else n * _act(code, g64)
    grads = None
    if need:
        inputs = [x64, g64] + ([w64] if w64 is not None else [])
        grads = torch.autograd.grad(y, inputs, dy.detach().cpu().double())
    return y.detach(), rstd.view(m, g).t().reshape(-1).detach(), grads


def _expected_y(x, gate, w, rstd, gs, gate_first, code, rounded, out_dtype):
    """The contract's output from the kernel's own rstd, in the accumulation type with its roundings."""
    m, h = x.shape
    g = h // gs
    a = _acc(x.dtype)
    r = rstd.to("cpu", a).view(g, m).t().reshape(m, g, 1)
    xa, ga = x.cpu().to(a), gate.cpu().to(a)
    src = xa * _act(code, ga) if gate_first else xa
    n = (src.view(m, g, gs) * r).view(m, h)
    if rounded:
        n = n.to(x.dtype).to(a)
    if w is not None:
        n = n * w.cpu().to(a)
    if gate_first:
        return n.to(out_dtype)
    if rounded and (w is None or w.dtype == x.dtype):
        n = n.to(x.dtype).to(a)
    return (n * _act(code, ga)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,h,gs", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "gate_after"])
@pytest.mark.parametrize("code", [SILU, SIGMOID], ids=["silu", "sigmoid"])
def test_forward_backward(target, dtype, m, h, gs, gate_first, code):
    target.skip_if_emulated_above(m * h, EMU_LIMIT)
    dev = target.device
    x = _randn(dev, (m, h), dtype, 1.5, 0.3)
    gate = _randn(dev, (m, h), dtype, 1.0, 0.2)
    w = _randn(dev, (h,), dtype, 0.5, 1.0)
    dy = _randn(dev, (m, h), dtype)
    ry, rrstd, (rdx, rdg, rdw) = _reference(x, gate, w, gs, gate_first, code, dy)
    for rounded in (False, True):
        y, rstd = target.ops.gated_rms_norm_fwd(x, gate, w, EPS, gs, not gate_first, code, rounded)
        assert y.dtype == dtype and rstd.shape == (m * (h // gs),)
        _check(rstd, rrstd, dtype, 0, None, "rstd")
        want = _expected_y(x, gate, w, rstd, gs, gate_first, code, rounded, dtype)
        # the kernel's silu / sigmoid and its order of the products (x * (rstd * w) unrounded)
        # differ from ATen's by a few ulps of the accumulation type; a stored half value then by
        # at most one unit of its rounding
        ulp = torch.finfo(dtype).eps + 8 * torch.finfo(_acc(dtype)).eps
        err = (y.cpu().to(torch.float64) - want.to(torch.float64)).abs()
        bound = ulp * want.to(torch.float64).abs().clamp_min(1.0)
        assert bool((err <= bound).all()), f"y (rounded={rounded}): max err {err.max().item()}"
        _check(y, ry.to(y.device), dtype, 0 if not rounded else 1, None, "y vs float64")
    dx, dg, dw = target.ops.gated_rms_norm_bwd(dy, x, gate, rstd, w, gs, not gate_first, code,
                                               [True, True, True])
    _check(dx, rdx, dtype, 1, None, "dx")
    _check(dg, rdg, dtype, 1, None, "dgate")
    _check(dw, rdw, dtype, 1, None, "dweight")
    # each gradient alone: the same values
    for i, mask in enumerate(([True, False, False], [False, True, False], [False, False, True])):
        alone = target.ops.gated_rms_norm_bwd(dy, x, gate, rstd, w, gs, not gate_first, code, mask)
        for j, (t, full) in enumerate(zip(alone, (dx, dg, dw))):
            if j == i:
                assert torch.equal(t, full), f"output {j} alone"
            else:
                assert t.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "gate_after"])
@pytest.mark.parametrize("wkind", ["f32", "none"])
def test_float32_weight_and_no_weight(target, dtype, gate_first, wkind):
    """A float32 weight (AMP) with the Llama rounding promotes gate-first's output to float32
    (`weight * x_n.to(dtype)`), gate-after's stays half (n in float32, not rounded); float32
    grad_out; no weight."""
    dev = target.device
    m, h, gs = 6, 96, 32
    x = _randn(dev, (m, h), dtype, 1.5)
    gate = _randn(dev, (m, h), dtype)
    w = _randn(dev, (h,), torch.float32, 0.5, 1.0) if wkind == "f32" else None
    y, rstd = target.ops.gated_rms_norm_fwd(x, gate, w, EPS, gs, not gate_first, SILU, True)
    out = torch.float32 if gate_first and w is not None else dtype
    assert y.dtype == out
    want = _expected_y(x, gate, w, rstd, gs, gate_first, SILU, True, out)
    torch.testing.assert_close(y.cpu().float(), want.float(),
                               rtol=torch.finfo(out).eps + 8 * torch.finfo(torch.float32).eps, atol=0)
    dy = _randn(dev, (m, h), out)
    _, _, grads = _reference(x, gate, w, gs, gate_first, SILU, dy)
    dx, dg, dw = target.ops.gated_rms_norm_bwd(dy, x, gate, rstd, w, gs, not gate_first, SILU,
                                               [True, True, True])
    _check(dx, grads[0], dtype, 1, None, "dx")
    _check(dg, grads[1], dtype, 1, None, "dgate")
    if w is None:
        assert dw.numel() == 0
    else:
        assert dw.dtype == torch.float32
        _check(dw, grads[2], torch.float32, 1, None, "dweight")


def test_misaligned_takes_the_scalar_kernels(target):
    """Views one element into their storage: no 16-byte packs, the VEC = 1 kernels."""
    dev = target.device
    m, h, gs = 4, 64, 16
    for dtype in (torch.float32, torch.bfloat16):
        xs = _randn(dev, (m * h + 1,), dtype, 1.5)
        gs_ = _randn(dev, (m * h + 1,), dtype)
        x, gate = xs[1:].view(m, h), gs_[1:].view(m, h)
        w = _randn(dev, (h,), dtype, 0.5, 1.0)
        dy = _randn(dev, (m, h), dtype)
        for gate_first in (True, False):
            y, rstd = target.ops.gated_rms_norm_fwd(x, gate, w, EPS, gs, not gate_first, SILU, False)
            ry, rrstd, grads = _reference(x, gate, w, gs, gate_first, SILU, dy)
            _check(y, ry, dtype, 0, None, "y")
            dx, dg, dw = target.ops.gated_rms_norm_bwd(dy, x, gate, rstd, w, gs, not gate_first,
                                                       SILU, [True, True, True])
            for t, r, what in zip((dx, dg, dw), grads, ("dx", "dgate", "dweight")):
                _check(t, r, dtype, 1, None, what)


def test_empty_and_errors(target):
    dev = target.device
    x = torch.empty(0, 32, device=dev)
    y, rstd = target.ops.gated_rms_norm_fwd(x, x, None, EPS, 16, True, SILU, False)
    assert y.shape == (0, 32) and rstd.shape == (0,)
    w = torch.ones(32, device=dev)
    dx, dg, dw = target.ops.gated_rms_norm_bwd(x, x, x, rstd, w, 16, True, SILU, [True, True, True])
    assert dx.shape == (0, 32) and dg.shape == (0, 32) and torch.equal(dw, torch.zeros_like(w))
    x = _randn(dev, (3, 32), torch.float32)
    with pytest.raises(RuntimeError, match="group_size dividing the last dim \\(32\\)"):
        target.ops.gated_rms_norm_fwd(x, x, None, EPS, 5, True, SILU, False)
    with pytest.raises(RuntimeError, match="gate of the input's shape"):
        target.ops.gated_rms_norm_fwd(x, x[:, :16], None, EPS, 16, True, SILU, False)
    with pytest.raises(ValueError, match="silu .4. or sigmoid .10."):
        target.ops.gated_rms_norm_fwd(x, x, None, EPS, 16, True, 1, False)
    if target.name != "reference":
        big = _randn(dev, (1, 4096), torch.float32)
        with pytest.raises(RuntimeError, match="longer than the 2048 elements"):
            target.ops.gated_rms_norm_fwd(big, big, None, EPS, 4096, True, SILU, False)


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "gate_after"])
def test_rows_are_batch_invariant(target, gate_first):
    """A row's output, statistics and input gradients are the same bits alone and in a batch (the
    plan follows group_size and dtype only)."""
    dev = target.device
    m, h, gs = 24, 256, 64
    x = _randn(dev, (m, h), torch.bfloat16, 1.5)
    gate = _randn(dev, (m, h), torch.bfloat16)
    w = _randn(dev, (h,), torch.bfloat16, 0.5, 1.0)
    dy = _randn(dev, (m, h), torch.bfloat16)
    y, rstd = target.ops.gated_rms_norm_fwd(x, gate, w, EPS, gs, not gate_first, SILU, True)
    dx, dg, _ = target.ops.gated_rms_norm_bwd(dy, x, gate, rstd, w, gs, not gate_first, SILU,
                                              [True, True, False])
    for i in (0, 13, m - 1):
        y1, r1 = target.ops.gated_rms_norm_fwd(x[i:i + 1], gate[i:i + 1], w, EPS, gs,
                                               not gate_first, SILU, True)
        assert torch.equal(y1, y[i:i + 1])
        assert torch.equal(r1, rstd.view(h // gs, m)[:, i])
        dx1, dg1, _ = target.ops.gated_rms_norm_bwd(dy[i:i + 1], x[i:i + 1], gate[i:i + 1], r1, w,
                                                    gs, not gate_first, SILU, [True, True, False])
        assert torch.equal(dx1, dx[i:i + 1]) and torch.equal(dg1, dg[i:i + 1])
