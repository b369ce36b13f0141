"""RMSNorm and the fused residual-add norms (add_norm: LayerNorm or RMSNorm of input + residual) on
the row kernels, called as ops through the `target` fixture (tests/conftest.py): the CUDA kernels on
a GPU, the same kernel sources in the CPU emulation (FASTNORM_EMU), or the reference ops
(FASTNORM_KERNEL_TARGETS=reference).

rms_norm_{fwd,bwd} and add_norm_{fwd,bwd} are compared with a float64 reference written here (the
norm of the rounded sum r = round_X(input + residual) that the contract defines, differentiated by
autograd in float64), for every dtype and every dtype pair of add_norm: residual of the input's
dtype (fp32, fp16, bf16, fp64) or an fp32 residual stream with a half / bf16 input. residual_out
must equal the sum formed in the accumulation type and rounded to the residual's dtype bit for bit.
Also: output masks, absent weight, fp32 weight and float32 grad_out / out_dtype, misaligned inputs,
empty inputs (M = 0, L = 0, as the reference ops), bad dtype pairs, bitwise repeatability.

The emulated target skips cases above EMU_LIMIT elements; the small cases cross every host decision
of csrc/layer_norm_*.cu and csrc/launch/groups.h (sm_count = 132; 16-byte packs of V = 4 fp32, 8
fp16/bf16, 2 fp64 elements; "X = fp32": a half input with an fp32 residual, held as floats: 4 packs
per thread instead of 8; "split" forward = partials + finalize + apply, backward = row sums
(+ row finalize when S > 1) + column-chunked dx pass):

  (m, n)       forward (RMS and add_norm)                backward
  (7, 1)       cached, sub-warp, scalar                  cached, sub-warp, scalar
  (40, 31)     cached, one warp per row, scalar          cached, one warp per row, scalar
  (40, 32)     cached, sub-warp, vector                  cached, sub-warp, vector
  (40, 33)     cached, block per row (64), scalar        cached, block per row (64), scalar
  (8, 1024)    cached, block per row, vector             cached, block per row, vector
  (3, 1001)    cached, block per row (512), scalar       cached, block per row (512), scalar
  (3, 4096)    cached, block per row, vector             cached, vector
  (2, 4097)    split, scalar (no cached plan fits)       split, scalar, S > 1
  (1, 32776)   split, vector (beyond the registers:      split, vector, S > 1
               16384 fp32 / X = fp32, 32768 half)
Cached or split and the chunks follow the row's length, dtype and pack width only, never the
number of rows or SMs (tests/cuda/test_invariance.py).
Misaligned inputs (an element offset) take the scalar kernels of the same shapes.
"""
from __future__ import annotations

import math

import pytest
import torch

from test_row_kernels import EMU_LIMIT, TOL, _check, _poison_allocator, _randn, _stat, _zero_grad_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (input dtype, residual dtype): the pairs the kernels take
PAIRS = [(d, d) for d in DTYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
EPS = 1e-5
CASES = [(7, 1), (40, 31), (40, 32), (40, 33), (8, 1024), (3, 1001), (3, 4096), (2, 4097), (1, 32776)]
CUDA_CASES = [(4096, 768), (512, 4096), (16, 65536), (3, 1048577)]  # realistic sizes: CUDA only


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ids(cases):
    return [f"m{m}-n{n}" for m, n in cases]


def _pair_id(p):
    return f"{str(p[0]).split('.')[-1]}+{str(p[1]).split('.')[-1]}"


# ------------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------------
def _norm_ref(r, w, b, rms, dy=None):
    """y = norm(r) * w + b over the last dim in float64, rstd (and mean), and the gradients of
    (r, w, b) for dy by autograd."""
    r64 = r.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    if rms:
        mean = None
        rstd = (r64.square().mean(-1, keepdim=True) + EPS).rsqrt()
        y = r64 * rstd
    else:
        mean = r64.mean(-1, keepdim=True)
        rstd = ((r64 - mean).square().mean(-1, keepdim=True) + EPS).rsqrt()
        y = (r64 - mean) * rstd
    if w64 is not None:
        y = y * w64
    if b64 is not None:
        y = y + b64
    grads = (None, None, None)
    if dy is not None:
        y.backward(dy.detach().to("cpu", torch.float64))
        grads = (r64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad)
    m = r.shape[0]
    return (y.detach(), None if mean is None else mean.detach().reshape(m),
            rstd.detach().reshape(m), grads)


def _rounded_sum(x, res):
    """r = x + residual in the accumulation type, rounded to the residual's dtype (the contract)."""
    a = _acc(x.dtype)
    return (x.to(a) + res.to(a)).to(res.dtype)


def _check_rstd(rstd, ref, dtype):
    _check(rstd / ref.to(rstd.device, rstd.dtype), torch.ones_like(ref), dtype, 0, None, "rstd (relative)")


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", CASES + CUDA_CASES, ids=_ids(CASES + CUDA_CASES))
def test_rms_norm_fwd_bwd(target, dtype, m, n):
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), dtype, 2.0, 0.5)
    w = _randn(dev, (n,), dtype, 0.5, 1.0)
    _poison_allocator(target, x)
    y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert rstd.dtype == _stat(dtype) and rstd.shape == (m,)
    dy = _randn(dev, (m, n), dtype)
    ry, _, rrstd, (rdx, rdw, _) = _norm_ref(x, w, None, True, dy)
    _check(y, ry, dtype, 0, None, "y")
    _check_rstd(rstd, rrstd, dtype)
    _poison_allocator(target, x)
    dx, dw = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, True])
    assert dx.dtype == dtype and dw.dtype == dtype and dw.shape == (n,)
    _check(dx, rdx, dtype, 1, None, "dx")
    _check(dw, rdw, dtype, 1, None, "dweight")
    # output masks: dx only, dweight only (the same values)
    dx2, dw2 = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, False])
    assert dw2.numel() == 0 and torch.equal(dx2, dx)
    dx3, dw3 = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [False, True])
    assert dx3.numel() == 0 and torch.equal(dw3, dw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("m,n", [(40, 33), (8, 1024), (1, 32776), (64, 4097)], ids=_ids([(40, 33), (8, 1024), (1, 32776), (64, 4097)]))
@pytest.mark.parametrize("affine", [True, False], ids=["w", "none"])
def test_rms_norm_mixed_params_and_out_dtype(target, dtype, m, n, affine):
    """fp32 weight with a half input (AMP), out_dtype=float32 (autocast), float32 grad_out, no weight."""
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), dtype, 1.5, -0.3)
    w = _randn(dev, (n,), torch.float32, 0.5, 1.0) if affine else None
    y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS, torch.float32)
    assert y.dtype == torch.float32
    dy = _randn(dev, (m, n), torch.float32)
    ry, _, _, (rdx, rdw, _) = _norm_ref(x, w, None, True, dy)
    _check(y, ry, torch.float32, 0, None, "y (f32 out)")
    dx, dw = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, affine])
    assert dx.dtype == dtype
    _check(dx, rdx, dtype, 1, None, "dx")
    if affine:
        assert dw.dtype == torch.float32
        _check(dw, rdw, torch.float32, 1, None, "dweight")
    else:
        assert dw.numel() == 0


ROUND_CASES = [(7, 1), (40, 31), (40, 32), (8, 1024), (3, 1001), (2, 4097), (1, 32776)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", ROUND_CASES, ids=_ids(ROUND_CASES))
@pytest.mark.parametrize("wdt", ["same", "f32", "none"])
def test_rms_norm_round_normalized(target, dtype, m, n, wdt):
    """round_normalized=True, Hugging Face's Llama convention `weight * (x * rstd).to(dtype)`: the
    normalised value rounded to the input dtype before the weight multiplies it (kernels/
    groups_forward.cuh rms_z), in the cached and the split (apply pass) kernels, vector and scalar.
    Given the kernel's own rstd the output is exact: x * rstd rounds the same in any IEEE unit and
    the product of two values of a half dtype is exact in float32, so y must equal the formula
    bit for bit; rstd itself is checked against float64. A float32 weight gives a float32 output
    (out_dtype, as the convention promotes); the backward is the plain one (the rounding is the
    identity to autograd)."""
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), dtype, 1.5, -0.3)
    w = None if wdt == "none" else _randn(dev, (n,), dtype if wdt == "same" else torch.float32, 0.5, 1.0)
    out = torch.float32 if wdt == "f32" else None
    y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS, out, True)
    a = _acc(dtype)
    xhat = (x.to(a) * rstd.to(a).view(m, 1)).to(dtype).to(a)
    want = (xhat if w is None else xhat * w.to(a)).to(out or dtype)
    assert y.dtype == (out or dtype)
    assert torch.equal(y, want), f"max |diff| {(y.to(a) - want.to(a)).abs().max().item()}"
    _, _, rrstd, _ = _norm_ref(x, None, None, True)
    _check_rstd(rstd, rrstd, dtype)
    if dtype in (torch.float16, torch.bfloat16) and w is not None and n >= 8:
        # the rounding is real: the plain kernel (one rounding) differs somewhere
        y0, _ = target.ops.rms_norm_fwd(x, [n], w, EPS, out, False)
        assert not torch.equal(y0, y)


@pytest.mark.parametrize("device", [dict(sm_count=8), dict(sm_count=1, blocks_per_sm=1)], ids=["8sm", "1sm-1block"])
@pytest.mark.parametrize("m,n", [(40, 520), (64, 1000)], ids=_ids([(40, 520), (64, 1000)]))
def test_backward_rows_per_block(target, device, m, n):
    """Cached backward blocks of several rows (tpr > 32: 128 threads a row, 4 rows a block of 512
    on the emulated devices of 8 SMs and of 1 SM, whose grid loops over the row groups) and their
    column partials combined through shared memory, for RMSNorm and add_norm (LayerNorm's in
    test_row_kernels.py). The CUDA target runs the shapes on its own device."""
    target.require("emu", why="the emulated device sizes")
    with target.schedule(**device):
        for dt in (torch.float32, torch.bfloat16):
            x = _randn(target.device, (m, n), dt, 1.5)
            w = _randn(target.device, (n,), dt, 0.5, 1.0)
            dy = _randn(target.device, (m, n), dt)
            y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS)
            _, _, _, (rdx, rdw, _) = _norm_ref(x, w, None, True, dy)
            dx, dw = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, True])
            _check(dx, rdx, dt, 1, None, "dx")
            _check(dw, rdw, dt, 1, None, "dweight")
            for rms in (False, True):
                _add_norm_case(target, (dt, dt), rms, m, n)


def test_rms_norm_fp16_large_values(target):
    """Squares of fp16 values ~300 overflow fp16 (> 65504): accumulated in fp32 they do not."""
    dev = target.device
    m, n = 16, 200
    x = _randn(dev, (m, n), torch.float16, 8.0, 300.0)
    y, rstd = target.ops.rms_norm_fwd(x, [n], None, EPS)
    ry, _, rrstd, _ = _norm_ref(x, None, None, True)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    _check(y, ry, torch.float16, 0, None, "y (values ~300)")
    _check_rstd(rstd, rrstd, torch.float16)


# ------------------------------------------------------------------------------------------------
# add_norm: LayerNorm / RMSNorm of input + residual
# ------------------------------------------------------------------------------------------------
def _add_norm_case(target, pair, rms, m, n, x=None, res=None, w=None, b=None):
    dt, rdt = pair
    dev = target.device
    x = _randn(dev, (m, n), dt, 2.0, 0.5) if x is None else x
    res = _randn(dev, (m, n), rdt, 1.0, -0.25) if res is None else res
    if w is None:
        w = _randn(dev, (n,), dt, 0.5, 1.0)
    if b is None and not rms:
        b = _randn(dev, (n,), dt, 0.5)
    _poison_allocator(target, x, res)
    y, r, mean, rstd = target.ops.add_norm_fwd(x, res, [n], w, b, EPS, rms)
    assert y.dtype == dt and y.shape == x.shape and r.dtype == rdt and r.shape == x.shape
    assert rstd.dtype == _stat(dt) and rstd.shape == (m,)
    assert mean.dtype == _stat(dt) and mean.shape == ((0,) if rms else (m,))
    # residual_out: the sum in the accumulation type rounded to the residual's dtype, exactly
    assert torch.equal(r.cpu(), _rounded_sum(x.cpu(), res.cpu())), "residual_out is not the rounded sum"
    dy = _randn(dev, (m, n), dt)
    gro = _randn(dev, (m, n), rdt)
    ry, rmean, rrstd, (rdr, rdw, rdb) = _norm_ref(r, w, b, rms, dy)
    _check(y, ry, dt, 0, None, "y")
    if not rms:
        _check(mean, rmean, dt, 0, None, "mean")
    _check_rstd(rstd, rrstd, dt)
    d_r = rdr + gro.to("cpu", torch.float64)
    _poison_allocator(target, x, res)
    dx, dres, dw, db = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt,
                                               [True, True, True, True])
    assert dx.dtype == dt and dres.dtype == rdt and dx.shape == dres.shape == x.shape
    _check(dx, d_r, dt, 1, None, "grad_input")
    _check(dres, d_r, rdt if rdt != torch.float32 else dt, 1, None, "grad_residual")
    # LayerNorm of one-element rows: dweight is zero in exact arithmetic (RMSNorm's is not)
    _check(dw, rdw, dt, 1, None, "dweight", None if rms else _zero_grad_scale(n, d_r, rdw, rdb))
    if rms:
        assert db.numel() == 0
    else:
        _check(db, rdb, dt, 1, None, "dbias")
    return (y, r, mean, rstd), (dy, gro, w), (dx, dres, dw, db)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("pair", PAIRS, ids=[_pair_id(p) for p in PAIRS])
@pytest.mark.parametrize("m,n", CASES + CUDA_CASES, ids=_ids(CASES + CUDA_CASES))
def test_add_norm_fwd_bwd(target, pair, rms, m, n):
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    (y, r, mean, rstd), (dy, gro, w), (dx, dres, dw, db) = _add_norm_case(target, pair, rms, m, n)
    dt, rdt = pair
    # the autograd's request: grad_residual alone when the dtypes agree (one tensor serves both
    # inputs), both tensors otherwise; the same values as the all-outputs call
    mask = [dt != rdt, True, False, False]
    dx2, dres2, dw2, db2 = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt, mask)
    assert torch.equal(dres2, dres) and dw2.numel() == 0 and db2.numel() == 0
    assert (dx2.numel() == 0) == (dt == rdt)
    if dt != rdt:
        assert torch.equal(dx2, dx)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("pair", PAIRS, ids=[_pair_id(p) for p in PAIRS])
@pytest.mark.parametrize("m,n", [(40, 32), (3, 4096)], ids=_ids([(40, 32), (3, 4096)]))
def test_add_norm_masks_and_no_grad_residual(target, pair, rms, m, n):
    """Masks against the all-outputs call: grad_residual alone, grad_input alone, parameters alone;
    grad_residual_out absent (zero); no weight / bias; fp32 weight with a half input."""
    dt, rdt = pair
    dev = target.device
    x = _randn(dev, (m, n), dt, 1.5, 0.25)
    res = _randn(dev, (m, n), rdt, 1.0)
    w = _randn(dev, (n,), torch.float32 if dt != torch.float64 else dt, 0.5, 1.0)
    b = None if rms else _randn(dev, (n,), w.dtype, 0.5)
    y, r, mean, rstd = target.ops.add_norm_fwd(x, res, [n], w, b, EPS, rms)
    dy = _randn(dev, (m, n), dt)
    gro = _randn(dev, (m, n), rdt)
    full = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt, [True, True, True, True])
    assert full[2].dtype == w.dtype
    only_res = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt, [False, True, False, False])
    assert only_res[0].numel() == 0 and torch.equal(only_res[1], full[1])
    assert only_res[2].numel() == 0 and only_res[3].numel() == 0
    only_in = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt, [True, False, False, False])
    assert torch.equal(only_in[0], full[0]) and only_in[1].numel() == 0
    params = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt, [False, False, True, True])
    assert params[0].numel() == 0 and params[1].numel() == 0
    assert torch.equal(params[2], full[2])
    assert torch.equal(params[3], full[3]) if not rms else params[3].numel() == 0
    # grad_residual_out absent: d_r is the norm's dx alone
    none_gr = target.ops.add_norm_bwd(dy, None, r, mean, rstd, w, [n], rms, dt, [True, True, False, False])
    _, _, _, (rdr, _, _) = _norm_ref(r, w, b, rms, dy)
    _check(none_gr[0], rdr, dt, 1, None, "grad_input without grad_residual_out")
    _check(none_gr[1], rdr, dt, 1, None, "grad_residual without grad_residual_out")
    # no weight, no bias
    y0, r0, mean0, rstd0 = target.ops.add_norm_fwd(x, res, [n], None, None, EPS, rms)
    assert torch.equal(r0, r)
    ry0, _, _, (rdr0, _, _) = _norm_ref(r, None, None, rms, dy)
    _check(y0, ry0, dt, 0, None, "y (no affine)")
    g0 = target.ops.add_norm_bwd(dy, gro, r0, mean0, rstd0, None, [n], rms, dt, [True, True, True, True])
    _check(g0[0], rdr0 + gro.to("cpu", torch.float64), dt, 1, None, "grad_input (no affine)")
    assert g0[2].dtype == dt


@pytest.mark.parametrize("which", ["input", "residual", "grad"])
@pytest.mark.parametrize("pair", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                  (torch.float32, torch.float32)], ids=_pair_id)
def test_add_norm_misaligned(target, which, pair):
    """One misaligned operand sends the call to the scalar kernels (cached and split shapes)."""
    dt, rdt = pair
    dev = target.device
    for m, n in [(5, 64), (1, 32776)]:
        k = m * n
        x = _randn(dev, (k + 1,), dt)[1 if which == "input" else 0:][:k].view(m, n)
        res = _randn(dev, (k + 1,), rdt)[1 if which == "residual" else 0:][:k].view(m, n)
        for rms in (False, True):
            if which == "grad":
                (y, r, mean, rstd), _, full = _add_norm_case(target, pair, rms, m, n, x=x, res=res)
                dy = _randn(dev, (k + 1,), dt)[1:].view(m, n)
                gro = _randn(dev, (k + 1,), rdt)[1:].view(m, n)
                w = _randn(dev, (n,), dt, 0.5, 1.0)
                ry, _, _, (rdr, rdw, _) = _norm_ref(r, w, None, rms, dy)
                dx, dres, dw, _ = target.ops.add_norm_bwd(dy, gro, r, mean, rstd, w, [n], rms, dt,
                                                          [True, True, True, False])
                d_r = rdr + gro.to("cpu", torch.float64)
                _check(dx, d_r, dt, 1, None, "grad_input (misaligned grads)")
                _check(dres, d_r, dt, 1, None, "grad_residual (misaligned grads)")
                _check(dw, rdw, dt, 1, None, "dweight (misaligned grads)")
            else:
                _add_norm_case(target, pair, rms, m, n, x=x, res=res)


def test_rms_norm_misaligned(target):
    dev = target.device
    for m, n in [(5, 64), (1, 32776)]:
        k = m * n
        x = _randn(dev, (k + 1,), torch.bfloat16)[1:].view(m, n)
        w = _randn(dev, (n + 1,), torch.bfloat16, 0.5, 1.0)[1:]
        dy = _randn(dev, (m, n), torch.bfloat16)
        y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS)
        ry, _, _, (rdx, rdw, _) = _norm_ref(x, w, None, True, dy)
        _check(y, ry, torch.bfloat16, 0, None, "y (misaligned)")
        dx, dw = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, True])
        _check(dx, rdx, torch.bfloat16, 1, None, "dx (misaligned)")
        _check(dw, rdw, torch.bfloat16, 1, None, "dweight (misaligned)")


# ------------------------------------------------------------------------------------------------
# empty inputs, bad inputs, repeatability
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,ns", [((0, 8), [8]), ((3, 0), [0]), ((2, 0, 4), [0, 4]), ((0, 3, 5), [3, 5])],
                         ids=["no-rows", "empty-rows", "empty-rows-2d", "no-rows-2d"])
def test_empty_inputs_as_reference(target, shape, ns):
    """M = 0 and L = 0 as the reference ops (torch.ops.fastnorm on the CPU): empty statistics for
    no rows; rows of no elements give rstd NaN and, for LayerNorm, mean 0 as layer_norm_fwd (ATen),
    zero parameter gradients."""
    dev = target.device
    n = math.prod(ns)
    x = torch.randn(shape, device=dev)
    w = torch.randn(ns, device=dev)
    ref = torch.ops.fastnorm
    y, rstd = target.ops.rms_norm_fwd(x, ns, w, EPS)
    ty, trstd = ref.rms_norm_fwd(x.cpu(), ns, w.cpu(), EPS)
    assert y.shape == ty.shape
    torch.testing.assert_close(rstd.cpu(), trstd, rtol=0, atol=0, equal_nan=True)
    dx, dw = target.ops.rms_norm_bwd(torch.ones_like(x), x, rstd, w, ns, [True, True])
    assert dx.shape == x.shape and dw.shape == tuple(ns) and (dw == 0).all()
    for rms in (False, True):
        res = torch.randn(shape, device=dev)
        out = target.ops.add_norm_fwd(x, res, ns, w, None if rms else w, EPS, rms)
        tout = list(ref.add_norm_fwd(x.cpu(), res.cpu(), ns, w.cpu(), None if rms else w.cpu(), EPS, rms))
        if not rms:  # the statistics of layer_norm_fwd (as ATen: rows of no elements have mean 0)
            tout[2] = ref.layer_norm_fwd(tout[1], ns, None, None, EPS)[1]
        for a, t in zip(out, tout):
            assert a.shape == t.shape and a.dtype == t.dtype
            torch.testing.assert_close(a.cpu(), t, rtol=0, atol=0, equal_nan=True)
        g = target.ops.add_norm_bwd(torch.ones_like(x), None, out[1], out[2], out[3], w, ns, rms,
                                    x.dtype, [True, True, True, True])
        assert g[0].shape == g[1].shape == x.shape and (g[2] == 0).all() and g[2].shape == tuple(ns)
        assert (g[3].numel() == 0) if rms else bool((g[3] == 0).all())
    assert n == 0 or shape[0] == 0


def test_bad_inputs_raise(target):
    dev = target.device
    x = torch.randn(4, 8, device=dev, dtype=torch.float16)
    w = torch.randn(8, device=dev, dtype=torch.float16)
    ops = target.ops
    with pytest.raises(RuntimeError, match=r"(?s)Half.*BFloat16|float16.*bfloat16"):
        ops.add_norm_fwd(x, x.to(torch.bfloat16), [8], w, None, EPS, False)
    with pytest.raises(RuntimeError, match=r"shape"):
        ops.add_norm_fwd(x, torch.randn(4, 9, device=dev, dtype=torch.float16), [8], w, None, EPS, False)
    if not target.name == "reference":  # no kernel for an fp64 input with an fp32 residual
        x64 = x.double()
        with pytest.raises(RuntimeError, match=r"(?s)Double.*Float"):
            ops.add_norm_fwd(x64, x64.float(), [8], None, None, EPS, False)
    with pytest.raises(RuntimeError, match=r"bias"):
        ops.add_norm_fwd(x, x, [8], w, w, EPS, True)
    with pytest.raises(RuntimeError, match=r"out_dtype"):
        ops.rms_norm_fwd(x, [8], w, EPS, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"8"):
        ops.rms_norm_fwd(x, [9], w, EPS)
    with pytest.raises(RuntimeError):
        ops.rms_norm_fwd(x, [8], torch.randn(7, device=dev, dtype=torch.float16), EPS)


@pytest.mark.parametrize("m,n", [(40, 33), (3, 4096), (1, 32776), (4096, 768), (16, 65536)],
                         ids=_ids([(40, 33), (3, 4096), (1, 32776), (4096, 768), (16, 65536)]))
def test_bitwise_repeatable(target, m, n):
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), torch.bfloat16)
    res = _randn(dev, (m, n), torch.float32)
    w = _randn(dev, (n,), torch.float32, 0.5, 1.0)
    dy = _randn(dev, (m, n), torch.bfloat16)

    def run():
        y, rstd = target.ops.rms_norm_fwd(x, [n], w, EPS)
        g = target.ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, True])
        o = target.ops.add_norm_fwd(x, res, [n], w, None, EPS, True)
        h = target.ops.add_norm_bwd(dy, res, o[1], o[2], o[3], w, [n], True, x.dtype, [True, True, True, False])
        return (y, rstd, *g, *o, *h)

    a = run()
    _poison_allocator(target, x, res)
    b = run()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
