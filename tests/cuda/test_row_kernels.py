"""The row-family kernels (LayerNorm, GroupNorm / InstanceNorm), called as ops through the `target`
fixture (tests/conftest.py): the CUDA kernels on a GPU, the same kernel sources in the CPU
emulation (FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS=reference).

{layer,group}_norm_{fwd,bwd} are compared with a float64 reference (and with torch's own kernel on
the same device: ours may not be much worse than torch), for every dtype, layout and the shapes
that pick each kernel path. Also: bitwise repeatability, CUDA graphs, outputs poisoned through the
caching allocator (on the emulated target every allocation of an op is NaN-filled instead),
misaligned and non-contiguous inputs, empty inputs (as torch), fp16 values whose squares overflow
fp16, constant rows.

The CUDA target runs every case. The emulated one (every CUDA thread a fiber: slow) skips cases
above EMU_LIMIT elements; the small cases added for it cross every host decision of
csrc/layer_norm_*.cu, csrc/group_norm_*.cu and csrc/launch/groups.h (sm_count = 132, 16-byte packs
of V = 4 fp32, 8 fp16/bf16, 2 fp64 elements; "split" = Welford partials + finalize + apply):

  LayerNorm (n, m)  forward                               backward
  (1, 300)          cached, sub-warp, scalar              cached, sub-warp, scalar
  (31, 300)         cached, one warp per row, scalar      cached, scalar
  (32, 300)         cached, sub-warp, vector              cached, sub-warp, vector
  (33, 300)         cached, block per row, scalar         cached, scalar
  (1024, 8)         cached, block per row, vector         cached, block per row, vector
  (4096, 3)         cached, vector                        cached, vector
  (4097, 2)         split, scalar (no cached plan fits)   split, scalar, S > 1
  (8192, 2)         cached, vector (fp64: split, S > 1)   cached, vector (fp64: split)
  (8193, 2)         split, scalar (no cached plan fits)   split, scalar (no cached plan fits)
  (32776, 1)        split, vector, S > 1 (beyond the      split, vector, S > 1
                    registers: 16384 fp32, 32768 half)
  Cached or split, threads per row and chunks follow the row's length, dtype and pack width only,
  never the number of rows or SMs (tests/cuda/test_invariance.py).

  The cached backward puts several rows in a block when tpr > 32 and the rows give every SM more
  than one (rows per block <= 512 / tpr, a power of two): at 132 SMs only the CUDA-sized cases;
  test_layer_norm_backward_rows_per_block runs (40, 520) and (64, 1000) (tpr 128) on emulated
  devices of 8 SMs and of 1 SM (4 rows a block).

  GroupNorm: NCHW rows use the same plans with L = Cg*HW (vector packs inside one channel when
  HW % V == 0, else straddling channels); channels_last: plan_cl (K > 1 row chunks + finalize, or
  K == 1; several channel tiles when C/V > 256). See the comments on GN_CASES.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import grad_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute tolerance, scaled by max(1, |reference|): (forward, backward)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
       torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
EPS = 1e-5
EMU_LIMIT = 150_000  # elements: larger cases run on the CUDA target only


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(dev, shape, dtype, scale=1.0, shift=0.0):
    """Values drawn on the CPU (the global generator, seeded per test), then moved to `dev`."""
    t = torch.randn(shape, dtype=torch.float64) * scale + shift
    return t.to(dtype).to(dev)


def _check(actual, ref64, dtype, kind=0, torch_val=None, what="", scale=None):
    """|actual - ref64| <= max(tol * max(1, |ref|), 2 * |torch_val - ref64|). `scale` in place of
    |ref|: a gradient zero in exact arithmetic is judged at the scale of the whole gradient."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    r = ref64.detach().to("cpu", torch.float64)
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(a), finite), f"{what}: non-finite values where the reference has none"
    err = (a - r)[finite].abs().max().item() if finite.any() else 0.0
    if scale is None:
        scale = r[finite].abs().max().item() if finite.any() else 1.0
    bound = TOL[dtype][kind] * max(1.0, scale)
    if torch_val is not None:
        t = torch_val.detach().to("cpu", torch.float64)
        bound = max(bound, 2.0 * (t - r)[finite].abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def _zero_grad_scale(n, *grads):
    """Rows of one element: xhat == 0, so dx and dweight are zero in exact arithmetic and what a
    kernel returns is the rounding of terms like rstd * w * dy (rstd = 1 / sqrt(eps)): the scale
    to judge them at is the whole gradient's (None, their own, for longer rows)."""
    return grad_scale(*grads) if n == 1 else None


def _poison_allocator(target, *tensors_like, extra=(1 << 20,)):
    """CUDA: fill the caching allocator with NaN bytes (0xFF) in blocks of the sizes about to be
    allocated, so any output element a kernel leaves unwritten shows up as NaN. The emulated target
    needs nothing: the conftest NaN-fills every allocation of an op there."""
    if not target.is_cuda:
        return
    DEVICE = target.device
    sizes = set(extra)
    for t in tensors_like:
        n = t.numel() * t.element_size()
        sizes.update({n, 2 * n, max(1, n // 2), 4 * max(1, t.numel())})
    blocks = [torch.full((s,), 255, dtype=torch.uint8, device=DEVICE) for s in sorted(sizes) for _ in range(2)]
    del blocks


# ------------------------------------------------------------------------------------------------
# references (float64, CPU)
# ------------------------------------------------------------------------------------------------
def _ln_ref(x, shape, w, b, dy=None):
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    y = F.layer_norm(x64, shape, w64, b64, EPS)
    k = len(shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    m = x.numel() // max(1, math.prod(shape))
    mean = x64.detach().mean(dims).reshape(m)
    rstd = (x64.detach().var(dims, unbiased=False) + EPS).rsqrt().reshape(m)
    grads = (None, None, None)
    if dy is not None:
        y.backward(dy.detach().to("cpu", torch.float64))
        grads = (x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad)
    return y.detach(), mean, rstd, grads


def _gn_ref(x, G, w, b, dy=None):
    x64 = x.detach().to("cpu", torch.float64).contiguous().requires_grad_(dy is not None)
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_(dy is not None)
    y = F.group_norm(x64, G, w64, b64, EPS)
    xg = x64.detach().reshape(x.shape[0], G, -1)
    mean = xg.mean(-1)
    rstd = (xg.var(-1, unbiased=False) + EPS).rsqrt()
    grads = (None, None, None)
    if dy is not None:
        y.backward(dy.detach().to("cpu", torch.float64))
        grads = (x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad)
    return y.detach(), mean, rstd, grads


def _torch_ln(x, shape, w, b):
    try:
        wc = None if w is None else w.to(x.dtype)
        bc = None if b is None else b.to(x.dtype)
        return F.layer_norm(x, shape, wc, bc, EPS)
    except RuntimeError:
        return None


def _torch_gn(x, G, w, b):
    try:
        wc = None if w is None else w.to(x.dtype)
        bc = None if b is None else b.to(x.dtype)
        return F.group_norm(x, G, wc, bc, EPS)
    except RuntimeError:
        return None


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------
LN_N = [1, 31, 32, 33, 1023, 1024, 1025, 4096, 4097, 65536, 1048577]


def _ln_rows(n):
    return max(1, min(300, (1 << 21) // n))


def _params(dev, shape, dtype, param_dtype, affine):
    if affine == "none":
        return None, None
    w = _randn(dev, shape, param_dtype or dtype, 0.5, 1.0)
    b = _randn(dev, shape, param_dtype or dtype, 0.5) if affine == "wb" else None
    return w, b


# (n, m): the rows of LN_N, and the small cases that cross the same plans on the emulated target
# (table in the module docstring)
LN_CASES = [(n, _ln_rows(n)) for n in LN_N] + [(1024, 8), (4096, 3), (4097, 2), (8192, 2), (8193, 2),
                                               (32776, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", LN_CASES, ids=[f"n{n}-m{m}" for n, m in LN_CASES])
def test_layer_norm_fwd_bwd(target, dtype, n, m):
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), dtype, 2.0, 0.5)
    w, b = _params(dev, (n,), dtype, None, "wb")
    y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
    assert y.dtype == dtype and y.is_contiguous() and mean.dtype == _stat(dtype) and mean.shape == (m,)
    dy = _randn(dev, (m, n), dtype)
    ry, rmean, rrstd, (rdx, rdw, rdb) = _ln_ref(x, [n], w, b, dy)
    _check(y, ry, dtype, 0, _torch_ln(x, [n], w, b), "y")
    _check(mean, rmean, dtype, 0, None, "mean")
    _check(rstd / rrstd.to(rstd.device, rstd.dtype), torch.ones_like(rrstd), dtype, 0, None, "rstd (relative)")
    dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, True, True])
    assert dx.dtype == dtype and dw.dtype == w.dtype and dw.shape == (n,)
    zero = _zero_grad_scale(n, rdx, rdw, rdb)
    _check(dx, rdx, dtype, 1, None, "dx", zero)
    _check(dw, rdw, dtype, 1, None, "dweight", zero)
    _check(db, rdb, dtype, 1, None, "dbias")


# 33, 1024: cached plans (scalar / vector); 4097, 65536 and (emulation-sized) 32776: split plans
MIXED_LN = [(n, _ln_rows(n) // 4 + 1) for n in (33, 1024, 4097, 65536)] + [(32776, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n,m", MIXED_LN, ids=[f"n{n}-m{m}" for n, m in MIXED_LN])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_mixed_params_and_out_dtype(target, dtype, n, m, affine):
    """fp32 parameters with a half input (AMP), out_dtype=float32 (autocast), affine variants."""
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), dtype, 1.5, -0.3)
    w, b = _params(dev, (n,), dtype, torch.float32, affine)
    y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS, torch.float32)
    assert y.dtype == torch.float32
    dy = _randn(dev, (m, n), torch.float32)
    ry, _, _, (rdx, rdw, rdb) = _ln_ref(x, [n], w, b, dy)
    _check(y, ry, torch.float32, 0, None, "y(f32 out)")
    mask = [True, w is not None, b is not None]
    dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], mask)
    assert dx.dtype == dtype
    _check(dx, rdx, dtype, 1, None, "dx")
    if w is not None:
        assert dw.dtype == torch.float32
        _check(dw, rdw, torch.float32, 1, None, "dweight")
    else:
        assert dw.numel() == 0
    if b is not None:
        _check(db, rdb, torch.float32, 1, None, "dbias")
    else:
        assert db.numel() == 0
    # output mask: dx only / params only
    dx2, dw2, db2 = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, False, False])
    assert dw2.numel() == 0 and db2.numel() == 0 and torch.equal(dx2, dx)
    if w is not None:
        dx3, dw3, _ = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [False, True, False])
        assert dx3.numel() == 0 and torch.equal(dw3, dw)


def test_layer_norm_multi_dim_shape_and_many_rows(target):
    dev = target.device
    x = _randn(dev, (3, 5, 7, 6, 4), torch.float32)
    w, b = _params(dev, (6, 4), torch.float32, None, "wb")
    y, mean, rstd = target.ops.layer_norm_fwd(x, [6, 4], w, b, EPS)
    dy = _randn(dev, x.shape, torch.float32)
    ry, rmean, _, (rdx, rdw, rdb) = _ln_ref(x, [6, 4], w, b, dy)
    _check(y, ry, torch.float32, 0, None, "y")
    assert mean.shape == (105,)
    dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [6, 4], [True, True, True])
    assert dw.shape == (6, 4)
    _check(dx, rdx, torch.float32, 1, None, "dx")
    _check(dw, rdw, torch.float32, 1, None, "dw")
    _check(db, rdb, torch.float32, 1, None, "db")
    # tiny rows, many of them: several rows per warp
    for n in (1, 2, 3, 8):
        x = _randn(dev, (5000, n), torch.float16)
        w, b = _params(dev, (n,), torch.float16, None, "wb")
        y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
        dy = _randn(dev, x.shape, torch.float16)
        ry, _, _, (rdx, rdw, rdb) = _ln_ref(x, [n], w, b, dy)
        _check(y, ry, torch.float16, 0, None, f"y n={n}")
        dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, True, True])
        zero = _zero_grad_scale(n, rdx, rdw, rdb)
        _check(dx, rdx, torch.float16, 1, None, f"dx n={n}", zero)
        _check(dw, rdw, torch.float16, 1, None, f"dw n={n}", zero)
        _check(db, rdb, torch.float16, 1, None, f"db n={n}")


@pytest.mark.parametrize("n", [1000, 1024, 8192, 65536])  # 8192: split forward and backward
def test_layer_norm_misaligned_and_noncontiguous(target, n):
    dev = target.device
    m = 7
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    buf = _randn(dev, (m * n + 8,), torch.float16)
    x = buf[1:1 + m * n].view(m, n)  # 2-byte offset: scalar path
    w, b = _params(dev, (n,), torch.float16, None, "wb")
    wbuf = _randn(dev, (n + 1,), torch.float32)
    w32 = wbuf[1:]  # misaligned fp32 weight
    y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w32, b, EPS)
    ry, _, _, _ = _ln_ref(x, [n], w32, b)
    _check(y, ry, torch.float16, 0, None, "y misaligned")
    dybuf = _randn(dev, (m * n + 8,), torch.float16)
    dy = dybuf[3:3 + m * n].view(m, n)
    _, _, _, (rdx, rdw, rdb) = _ln_ref(x, [n], w32, b, dy)
    dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w32, [n], [True, True, True])
    _check(dx, rdx, torch.float16, 1, None, "dx misaligned")
    _check(dw, rdw, torch.float32, 1, None, "dw misaligned")
    # non-contiguous input and grad (a transpose)
    xt = _randn(dev, (n, m), torch.float32).t()
    dyt = _randn(dev, (n, m), torch.float32).t()
    y, mean, rstd = target.ops.layer_norm_fwd(xt, [n], None, None, EPS)
    ry, _, _, (rdx, _, _) = _ln_ref(xt, [n], None, None, dyt)
    _check(y, ry, torch.float32, 0, None, "y transposed")
    dx, _, _ = target.ops.layer_norm_bwd(dyt, xt, mean, rstd, None, [n], [True, False, False])
    _check(dx, rdx, torch.float32, 1, None, "dx transposed")
    # expanded (stride 0) grad
    dye = torch.ones((1, n), dtype=torch.float32, device=dev).expand(m, n)
    dx, _, _ = target.ops.layer_norm_bwd(dye, xt, mean, rstd, None, [n], [True, False, False])
    _, _, _, (rdx, _, _) = _ln_ref(xt, [n], None, None, dye)
    _check(dx, rdx, torch.float32, 1, None, "dx expanded grad")


@pytest.mark.parametrize("shape,ns", [((0, 16), [16]), ((4, 0), [0]), ((2, 0, 3), [3]),
                                      ((2, 3, 0), [3, 0]), ((2, 3, 0), [0])],
                         ids=["no-rows", "empty-rows", "no-rows-3d", "empty-rows-2d-shape", "empty-rows-3d"])
def test_layer_norm_empty(target, shape, ns):
    """Shapes and statistics as torch.native_layer_norm on the CPU: no rows give empty mean/rstd;
    rows of zero elements give mean 0 and rstd NaN there (torch 2.14)."""
    dev = target.device
    x = torch.randn(shape, device=dev)
    w = torch.randn(ns, device=dev)
    y, mean, rstd = target.ops.layer_norm_fwd(x, ns, w, w, EPS)
    _, tmean, trstd = torch.native_layer_norm(x.cpu(), ns, w.cpu(), w.cpu(), EPS)
    m = math.prod(shape[:x.dim() - len(ns)])
    assert y.shape == x.shape and mean.shape == (m,) and rstd.shape == (m,)
    assert mean.dtype == tmean.dtype and rstd.dtype == trstd.dtype
    torch.testing.assert_close(mean.cpu(), tmean.reshape(m), rtol=0, atol=0, equal_nan=True,
                               msg=lambda e: f"mean differs from torch.native_layer_norm: {e}")
    torch.testing.assert_close(rstd.cpu(), trstd.reshape(m), rtol=0, atol=0, equal_nan=True,
                               msg=lambda e: f"rstd differs from torch.native_layer_norm: {e}")
    dx, dw, db = target.ops.layer_norm_bwd(torch.randn_like(x), x, mean, rstd, w, ns, [True, True, True])
    assert dx.shape == x.shape and dw.shape == tuple(ns) and db.shape == tuple(ns)
    assert (dw == 0).all() and (db == 0).all()


@pytest.mark.parametrize("n", [64, 1000, 4096, 8192, 100000])  # 8192: split forward
def test_layer_norm_fp16_large_values_and_constant_rows(target, n):
    dev = target.device
    m = 9
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), torch.float16, 10.0, 300.0)  # x*x overflows fp16
    w, b = _params(dev, (n,), torch.float16, None, "wb")
    y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
    ry, rmean, _, _ = _ln_ref(x, [n], w, b)
    assert torch.isfinite(y).all()
    _check(y, ry, torch.float16, 0, None, "y (values ~300)")
    _check(mean, rmean, torch.float32, 0, None, "mean (values ~300)")
    # constant rows: xhat == 0 exactly, y == bias, no NaN
    c = torch.full((m, n), 0.1, dtype=torch.float16, device=dev)
    c[3] = 300.0
    y, mean, rstd = target.ops.layer_norm_fwd(c, [n], w, b, EPS)
    assert torch.equal(y, b.expand(m, n)), "constant rows must give exactly the bias"
    assert torch.equal(mean, c[:, 0].float())
    dx, dw, db = target.ops.layer_norm_bwd(torch.ones_like(c), c, mean, rstd, w, [n], [True, True, True])
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("device", [dict(sm_count=8), dict(sm_count=1, blocks_per_sm=1)], ids=["8sm", "1sm-1block"])
@pytest.mark.parametrize("n,m", [(520, 40), (1000, 64)])
@pytest.mark.parametrize("mask", [(True, True, True), (True, True, False), (False, False, True)], ids=["all", "dx-dw", "db"])
def test_layer_norm_backward_rows_per_block(target, device, n, m, mask):
    """Several rows per cached backward block (tpr 128, 4 rows a block of 512 on the emulated
    8-SM and 1-SM devices; the 1-SM grid loops over row groups) and the column partials of dweight
    and / or dbias combined across the block's rows through dynamic shared memory."""
    target.require("emu", why="the emulated device sizes")
    dev = target.device
    with target.schedule(**device):
        for dtype in (torch.float32, torch.float16, torch.float64):
            x = _randn(dev, (m, n), dtype, 2.0, 0.5)
            w, b = _params(dev, (n,), dtype, None, "wb")
            dy = _randn(dev, (m, n), dtype)
            y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
            _, _, _, (rdx, rdw, rdb) = _ln_ref(x, [n], w, b, dy)
            dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], list(mask))
            if mask[0]:
                _check(dx, rdx, dtype, 1, None, "dx")
            if mask[1]:
                _check(dw, rdw, dtype, 1, None, "dweight")
            if mask[2]:
                _check(db, rdb, dtype, 1, None, "dbias")
            assert (dw.numel() == 0) != mask[1] and (db.numel() == 0) != mask[2]


@pytest.mark.parametrize("n,m", [(32, 3000), (1024, 700), (4097, 64), (65536, 4), (1048577, 2),
                                 (1024, 8), (4096, 3)])  # emulation-sized: cached / split backward
def test_layer_norm_backward_bitwise_repeatable(target, n, m):
    dev = target.device
    target.skip_if_emulated_above(m * n, EMU_LIMIT)
    x = _randn(dev, (m, n), torch.float32)
    w, b = _params(dev, (n,), torch.float32, None, "wb")
    dy = _randn(dev, (m, n), torch.float32)
    y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
    r1 = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, True, True])
    _poison_allocator(target, x, w)
    y2, mean2, rstd2 = target.ops.layer_norm_fwd(x, [n], w, b, EPS)
    r2 = target.ops.layer_norm_bwd(dy, x, mean2, rstd2, w, [n], [True, True, True])
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm
# ------------------------------------------------------------------------------------------------
def _layout(x, layout):
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "cl3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def _fmt(layout):
    return {"cl": torch.channels_last, "cl3d": torch.channels_last_3d}.get(layout, torch.contiguous_format)


GN_CASES = [
    # (shape, groups, layout)
    ((2, 6, 7, 9), 3, "nchw"),
    ((2, 6, 7, 9), 3, "cl"),
    ((3, 64, 8, 8), 32, "nchw"),
    ((3, 64, 8, 8), 32, "cl"),
    ((2, 96, 64, 64), 32, "cl"),      # HW 4096
    ((2, 96, 64, 64), 32, "nchw"),
    ((2, 7, 5, 5), 7, "cl"),          # InstanceNorm, odd C, odd HW
    ((2, 7, 5, 5), 7, "nchw"),
    ((2, 7, 5, 5), 1, "nchw"),
    ((2, 7, 5, 5), 1, "cl"),
    ((4, 10, 1, 1), 2, "cl"),         # HW = 1
    ((4, 10, 1, 1), 5, "nchw"),
    ((5, 12), 4, "nchw"),             # rank 2: HW = 1
    ((3, 9, 7), 3, "nchw"),           # rank 3
    ((2, 16, 4, 6, 5), 4, "cl3d"),
    ((2, 16, 4, 6, 5), 16, "cl3d"),
    ((2, 16, 4, 6, 5), 2, "nchw"),
    ((1, 8, 16, 16, 16), 8, "cl3d"),  # one sample, long instance rows
    ((1, 8, 16, 16, 16), 8, "nchw"),
    ((2, 3, 40, 40), 1, "cl"),        # C = 3: scalar channels_last path, K > 1 row chunks
    ((2, 24, 1024), 2, "nchw"),       # long rows, few of them: split forward
    # emulation-sized (every dtype):
    ((2, 16, 3, 3), 2, "nchw"),       # 16-byte packs straddling channels (HW = 9, Cg * HW = 72)
    ((1, 8, 33, 33), 1, "nchw"),      # cached forward, packs straddling channels (L = 8712); backward
                                      # channel sums scalar (HW = 1089), several chunks (S > 1)
    ((1, 8, 65, 65), 1, "nchw"),      # split forward (L = 33800), packs straddling channels
    ((2, 3, 61, 61), 1, "nchw"),      # split forward scalar (L = 11163 odd), scalar sums S > 1
    ((1, 2, 72, 72), 1, "nchw"),      # backward channel sums vector, S > 1 for every dtype (HW = 5184)
    ((1, 1032, 3, 3), 8, "cl"),       # channels_last: 2-3 channel tiles (fp32/fp64), bx * by = 129 x 1
                                      # (fp16), packs straddling groups (Cg = 129), K == 1
    ((2, 6, 14, 14), 2, "nchw"),      # backward channel sums in 8-byte packs for fp16/bf16 (HW = 196)
    ((2, 6, 2, 7), 3, "nchw"),        # backward channel sums in 8-byte packs for fp32 (HW = 14)
]
# Which channels_last plan the other cases take (plan_cl, sm = 132): (3, 64, 8, 8) vector K > 1;
# (2, 16, 4, 6, 5) vector K == 1 (fp64 K = 3); (4, 10, 1, 1) vector (fp64 only) K == 1;
# (2, 7, 5, 5) scalar K == 1; (2, 3, 40, 40) scalar K > 1. NCHW: (3, 64, 8, 8), (2, 16, 4, 6, 5)
# vector in-channel packs; (2, 6, 7, 9), (4, 10, 1, 1) fp64 packs straddling channels;
# (1, 8, 16, 16, 16) cached forward, backward sums S > 1 (fp16 S == 1); rank 2 and 3 inputs.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G,layout", GN_CASES)
def test_group_norm_fwd_bwd(target, dtype, shape, G, layout):
    dev = target.device
    target.skip_if_emulated_above(math.prod(shape), EMU_LIMIT)
    x = _layout(_randn(dev, shape, dtype, 1.5, 0.25), layout)
    C = shape[1]
    w, b = _params(dev, (C,), dtype, None, "wb")
    _poison_allocator(target, x)
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=_fmt(layout))
    assert mean.shape == (shape[0], G) and mean.dtype == _stat(dtype)
    dy = _layout(_randn(dev, shape, dtype), layout)
    ry, rmean, rrstd, (rdx, rdw, rdb) = _gn_ref(x, G, w, b, dy)
    _check(y, ry, dtype, 0, _torch_gn(x, G, w, b), "y")
    _check(mean, rmean, dtype, 0, None, "mean")
    _check(rstd / rrstd.to(rstd.device, rstd.dtype), torch.ones_like(rrstd), dtype, 0, None, "rstd (relative)")
    _poison_allocator(target, x)
    dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True])
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=_fmt(layout))
    _check(dx, rdx, dtype, 1, None, "dx")
    _check(dw, rdw, dtype, 1, None, "dweight")
    _check(db, rdb, dtype, 1, None, "dbias")


# (shape, dtype, 8 bytes off a 16-byte boundary) -> the pack of the NCHW backward's per-(n, c)
# sums (row_sums_partial_kernel<T, V, ...>): the widest of 16 and 8 bytes dividing HW and allowed
# by x's and dy's alignment
GN_SUM_PACKS = [((2, 6, 14, 14), torch.float16, False, 4), ((2, 6, 14, 14), torch.bfloat16, False, 4),
                ((2, 6, 14, 14), torch.float32, False, 4), ((2, 6, 2, 7), torch.float32, False, 2),
                ((2, 6, 2, 7), torch.float16, False, 1), ((2, 6, 4, 4), torch.float16, False, 8),
                ((2, 6, 4, 4), torch.float16, True, 4), ((2, 6, 4, 4), torch.float64, True, 1)]


@pytest.mark.parametrize("shape,dtype,off8,pack", GN_SUM_PACKS,
                         ids=[f"{'x'.join(map(str, s))}-{str(d).split('.')[-1]}{'-off8' if o else ''}"
                              for s, d, o, _ in GN_SUM_PACKS])
@pytest.mark.parametrize("act", [0, 5], ids=["plain", "gelu"])
def test_group_norm_backward_sum_packs(target, shape, dtype, off8, pack, act):
    """The backward's channel sums take 8-byte packs where 16 bytes do not divide HW (or x and dy
    are 8 bytes off a 16-byte boundary), the same results as the reference either way."""
    target.require("emu", why="the launched kernels are recorded by the emulator")
    dev = target.device
    x = _randn(dev, shape, dtype, 1.5, 0.25)
    dy = _randn(dev, shape, dtype)
    if off8:
        shift = 8 // x.element_size()
        bx = torch.empty(x.numel() + shift, dtype=dtype)
        bd = torch.empty(x.numel() + shift, dtype=dtype)
        x = bx[shift:].view(shape).copy_(x)
        dy = bd[shift:].view(shape).copy_(dy)
    C, G = shape[1], 2
    w, b = _params(dev, (C,), dtype, None, "wb")
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS, None, act, 0.0)
    rec = target.emu.record_launches(
        lambda: target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True], b, act, 0.0))
    sums = [k.split("(")[0] for k, *_ in rec if "row_sums_partial_kernel" in k]
    assert len(sums) == 1 and f", {pack}, " in sums[0], sums
    dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True], b, act, 0.0)
    if act:
        norm = lambda x64, w64, b64: F.group_norm(x64, G, w64, b64, EPS)  # noqa: E731
        ry, rdx, rdw, rdb = _act_ref(norm, act, x, w, b, dy)  # gelu: no kink to step off
    else:
        ry, _, _, (rdx, rdw, rdb) = _gn_ref(x, G, w, b, dy)
    _check(y, ry, dtype, 0, None, "y")
    _check(dx, rdx, dtype, 1, None, "dx")
    _check(dw, rdw, dtype, 1, None, "dweight")
    _check(db, rdb, dtype, 1, None, "dbias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# (2, 40, 12, 12): NCHW cached forward; channels_last K > 1. (1, 8, 33, 33): NCHW split forward.
@pytest.mark.parametrize("shape,G,layout", [((2, 40, 12, 12), 8, "nchw"), ((2, 40, 12, 12), 8, "cl"),
                                            ((1, 8, 33, 33), 1, "nchw")])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_group_norm_mixed_params_and_out_dtype(target, dtype, shape, G, layout, affine):
    dev = target.device
    C = shape[1]
    x = _layout(_randn(dev, shape, dtype, 1.0, 0.5), layout)
    w, b = _params(dev, (C,), dtype, torch.float32, affine)
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS, torch.float32)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=_fmt(layout))
    dy = _layout(_randn(dev, shape, torch.float32), layout)
    ry, _, _, (rdx, rdw, rdb) = _gn_ref(x, G, w, b, dy)
    _check(y, ry, torch.float32, 0, None, "y f32 out")
    mask = [True, w is not None, b is not None]
    dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, mask)
    assert dx.dtype == dtype
    _check(dx, rdx, dtype, 1, None, "dx")
    if w is not None:
        assert dw.dtype == torch.float32
        _check(dw, rdw, torch.float32, 1, None, "dweight")
    if b is not None:
        _check(db, rdb, torch.float32, 1, None, "dbias")
    # masks
    dx2, dw2, db2 = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, False, False])
    assert torch.equal(dx2, dx) and dw2.numel() == 0 and db2.numel() == 0
    if w is not None:
        dx3, dw3, _ = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [False, True, False])
        assert dx3.numel() == 0 and torch.equal(dw3, dw)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_fp16_large_values_and_constant_groups(target, layout):
    dev = target.device
    shape, G = (2, 16, 10, 10), 4
    x = _layout(_randn(dev, shape, torch.float16, 8.0, 300.0), layout)
    w, b = _params(dev, (16,), torch.float16, None, "wb")
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS)
    ry, rmean, _, _ = _gn_ref(x, G, w, b)
    assert torch.isfinite(y).all()
    _check(y, ry, torch.float16, 0, None, "y (values ~300)")
    c = _layout(torch.full(shape, 0.1, dtype=torch.float16, device=dev), layout)
    y, mean, rstd = target.ops.group_norm_fwd(c, w, b, G, EPS)
    assert torch.equal(y, b.view(1, -1, 1, 1).expand(shape)), "constant groups must give exactly the bias"
    dx, dw, db = target.ops.group_norm_bwd(torch.ones_like(c), c, mean, rstd, w, G, [True, True, True])
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_misaligned(target, layout):
    dev = target.device
    shape, G = (2, 16, 6, 6), 4
    n = math.prod(shape)
    buf = _randn(dev, (n + 8,), torch.float16)
    if layout == "cl":
        N, C, H, W = shape
        x = buf[1:1 + n].as_strided(shape, (H * W * C, 1, W * C, C))
        assert x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = buf[1:1 + n].view(shape)
    w, b = _params(dev, (16,), torch.float16, None, "wb")
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS)
    assert y.is_contiguous(memory_format=_fmt(layout))
    dy = _layout(_randn(dev, shape, torch.float16), layout)
    ry, _, _, (rdx, rdw, rdb) = _gn_ref(x, G, w, b, dy)
    _check(y, ry, torch.float16, 0, None, "y misaligned")
    dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True])
    _check(dx, rdx, torch.float16, 1, None, "dx misaligned")
    _check(dw, rdw, torch.float16, 1, None, "dw misaligned")
    # aligned x with misaligned fp32 weight and bias: GroupNorm reads them one element at a
    # time, so the 16-byte path still runs (UBSan, in the sanitizer tier, checks the accesses)
    xa = _layout(_randn(dev, shape, torch.float16), layout)
    pbuf = _randn(dev, (2 * 16 + 2,), torch.float32)
    w32, b32 = pbuf[1:17], pbuf[18:34]
    y, mean, rstd = target.ops.group_norm_fwd(xa, w32, b32, G, EPS)
    _check(y, _gn_ref(xa, G, w32, b32)[0], torch.float16, 0, None, "y misaligned fp32 params")
    # other strides (a permuted view that is neither layout): contiguous output
    xp = _randn(dev, (2, 6, 6, 16), torch.float32).permute(0, 3, 2, 1)
    assert not xp.is_contiguous() and not xp.is_contiguous(memory_format=torch.channels_last)
    y, _, _ = target.ops.group_norm_fwd(xp, None, None, G, EPS)
    assert y.is_contiguous()
    _check(y, _gn_ref(xp, G, None, None)[0], torch.float32, 0, None, "y permuted")


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (0, 8), (2, 8, 0, 4), (2, 8, 0)],
                         ids=["no-samples", "no-samples-2d", "empty-groups", "empty-groups-3d"])
def test_group_norm_empty(target, shape):
    """As torch.native_group_norm on the CPU (torch 2.14): no samples give empty [0, G]
    statistics; HW == 0 raises ("Expected HxW to be greater than 0")."""
    dev = target.device
    G = 4
    x = torch.randn(shape, device=dev)
    w = torch.randn(8, device=dev)
    N, C, HW = shape[0], shape[1], math.prod(shape[2:])
    try:
        _, tmean, trstd = torch.native_group_norm(x.cpu(), w.cpu(), w.cpu(), N, C, HW, G, EPS)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            target.ops.group_norm_fwd(x, w, w, G, EPS)
        return  # torch raises: so must the kernel target
    y, mean, rstd = target.ops.group_norm_fwd(x, w, w, G, EPS)
    assert y.shape == x.shape and mean.shape == tmean.shape and rstd.shape == trstd.shape
    torch.testing.assert_close(mean.cpu(), tmean, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rstd.cpu(), trstd, rtol=0, atol=0, equal_nan=True)
    dx, dw, db = target.ops.group_norm_bwd(torch.randn_like(x), x, mean, rstd, w, G, [True, True, True])
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all() and dw.shape == (8,)


@pytest.mark.parametrize("shape,G,layout", [((8, 64, 32, 32), 32, "nchw"), ((8, 64, 32, 32), 32, "cl"),
                                            ((1, 8, 33, 33), 1, "nchw"), ((1, 1032, 3, 3), 8, "cl"),
                                            ((2, 8, 16, 16, 16), 8, "cl3d"), ((2, 8, 16, 16, 16), 8, "nchw")])
def test_group_norm_backward_bitwise_repeatable(target, shape, G, layout):
    dev = target.device
    target.skip_if_emulated_above(math.prod(shape), EMU_LIMIT)
    x = _layout(_randn(dev, shape, torch.float32), layout)
    w, b = _params(dev, (shape[1],), torch.float32, None, "wb")
    dy = _layout(_randn(dev, shape, torch.float32), layout)
    y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS)
    r1 = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True])
    _poison_allocator(target, x)
    y2, mean2, rstd2 = target.ops.group_norm_fwd(x, w, b, G, EPS)
    r2 = target.ops.group_norm_bwd(dy, x, mean2, rstd2, w, G, [True, True, True])
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# CUDA only: graphs, realistic sizes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ln_small", "ln_long", "gn_nchw", "gn_cl"])
def test_cuda_graph_capture_and_replay(target, which):
    target.require("cuda", why="CUDA graph capture")
    dev = target.device
    if which.startswith("ln"):
        n = 1024 if which == "ln_small" else 65536
        x = _randn(dev, (64, n), torch.float16)
        w, b = _params(dev, (n,), torch.float32, None, "wb")
        dy = _randn(dev, (64, n), torch.float16)
        fwd = lambda: target.ops.layer_norm_fwd(x, [n], w, b, EPS)  # noqa: E731
        bwd = lambda m, r: target.ops.layer_norm_bwd(dy, x, m, r, w, [n], [True, True, True])  # noqa: E731
    else:
        layout = "nchw" if which == "gn_nchw" else "cl"
        x = _layout(_randn(dev, (4, 64, 24, 24), torch.bfloat16), layout)
        w, b = _params(dev, (64,), torch.float32, None, "wb")
        dy = _layout(_randn(dev, (4, 64, 24, 24), torch.bfloat16), layout)
        fwd = lambda: target.ops.group_norm_fwd(x, w, b, 16, EPS)  # noqa: E731
        bwd = lambda m, r: target.ops.group_norm_bwd(dy, x, m, r, w, 16, [True, True, True])  # noqa: E731

    def step():
        y, m, r = fwd()
        return (y, m, r) + tuple(bwd(m, r))

    expected = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        for a, e in zip(out, expected):
            assert torch.equal(a, e)


def test_realistic_shapes(target):
    """Realistic shapes: SD-UNet GroupNorm (few long rows) and InstanceNorm3d."""
    target.require("cuda", why="large realistic shapes")
    dev = target.device
    for shape, G, layout, dtype in [((8, 320, 64, 64), 32, "nchw", torch.float16),
                                    ((8, 320, 64, 64), 32, "cl", torch.float16),
                                    ((2, 32, 64, 64, 64), 32, "nchw", torch.float32),
                                    ((2, 32, 64, 64, 64), 32, "cl3d", torch.float32)]:
        x = _layout(_randn(dev, shape, dtype), layout)
        w, b = _params(dev, (shape[1],), torch.float32, None, "wb")
        y, mean, rstd = target.ops.group_norm_fwd(x, w, b, G, EPS)
        ref = _torch_gn(x.float(), G, w, b)
        _check(y, ref.double(), dtype, 0, None, f"y {shape} {layout}")
        dy = _layout(_randn(dev, shape, dtype), layout)
        dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, G, [True, True, True])
        xr = x.float().detach().requires_grad_()
        wr = w.detach().clone().requires_grad_()
        br = b.detach().clone().requires_grad_()
        F.group_norm(xr, G, wr, br, EPS).backward(dy.float())
        _check(dx, xr.grad.double(), dtype, 1, None, f"dx {shape} {layout}")
        _check(dw, wr.grad.double(), torch.float32, 1, None, f"dw {shape} {layout}")
        _check(db, br.grad.double(), torch.float32, 1, None, f"db {shape} {layout}")


# ------------------------------------------------------------------------------------------------
# Fused activation epilogues: the ACT instantiations of the row kernels (LayerNorm,
# GroupNorm NCHW) and of GroupNorm's channels_last kernels. y = act(z), z = xhat * w + b; the
# backward recomputes z and uses dz = dy * act'(z) in place of dy. Reference: float64 torch (the
# norm, then torch's own activation; gradients by autograd through both).
# ------------------------------------------------------------------------------------------------
# A slope float32 does not hold exactly: fp64 data checks that the kernels take torch's float64
# slope (fp32 / half data: its float32 rounding, as ATen's opmath type).
LEAKY_SLOPE = 0.2
ACT_CODES = {  # code -> (name, float64 reference)
    1: ("relu", F.relu),
    2: ("relu6", F.relu6),
    3: ("leaky_relu", lambda t: F.leaky_relu(t, LEAKY_SLOPE)),
    4: ("silu", F.silu),
    5: ("gelu", F.gelu),
    6: ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
    7: ("hardswish", F.hardswish),
    8: ("hardsigmoid", F.hardsigmoid),
    9: ("mish", F.mish),
    10: ("sigmoid", torch.sigmoid),
    11: ("tanh", torch.tanh),
}
ACT_IDS = [v[0] for v in ACT_CODES.values()]


def _act_param(code):
    return LEAKY_SLOPE if code == 3 else 0.0


# The activations' kinks (derivative jumps): relu, relu6, leaky_relu, hardswish, hardsigmoid.
ACT_KINKS = {1: (0.0,), 2: (0.0, 6.0), 3: (0.0,), 7: (-3.0, 3.0), 8: (-3.0, 3.0)}


def _away_from_kinks(code, x, norm, w, b):
    """The test data moved off the activation's kinks. Where z is within the accumulation type's
    rounding of a kink, dz = dy * act'(z) may take the other side of it in the kernel than in the
    float64 reference (relu, bf16 rows of 8193: z = 1.2e-8 in fp64, -3.0e-8 in fp32: that element
    of dx off by dy * w * rstd, and dweight / dbias with it). Such elements of x are stepped by
    0.05 (a few rounds, until none is left within 1e-4, fp64: 1e-9, of a kink)."""
    kinks = ACT_KINKS.get(code)
    if not kinks:
        return x
    band = 1e-9 if x.dtype == torch.float64 else 1e-4
    w64 = None if w is None else w.detach().to("cpu", torch.float64)
    b64 = None if b is None else b.detach().to("cpu", torch.float64)
    for _ in range(8):
        z = norm(x.detach().to("cpu", torch.float64), w64, b64)
        near = torch.zeros(z.shape, dtype=torch.bool)
        for k in kinks:
            near |= (z - k).abs() < band * max(1.0, abs(k))
        if not near.any():
            return x
        stepped = (x.detach().to("cpu", torch.float64) + 0.05).to(x.dtype)
        x = torch.where(near, stepped, x.detach().cpu()).to(x.device)
    raise AssertionError("test data: elements stay at an activation's kink")


def _act_ref(norm, code, x, w, b, dy):
    """norm(x64, w64, b64) -> act -> backward(dy): (y, dx, dw, db) in float64."""
    x64 = x.detach().to("cpu", torch.float64).contiguous().requires_grad_()
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_()
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_()
    y = ACT_CODES[code][1](norm(x64, w64, b64))
    y.backward(dy.detach().to("cpu", torch.float64))
    return y.detach(), x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad


def _act_case(target, dtype, code, family, shape, groups=None, layout="nchw", affine="wb"):
    """Forward and backward of one fused case against the float64 reference; returns the outputs."""
    dev = target.device
    p = _act_param(code)
    if family == "ln":
        m, n = shape
        x = _randn(dev, (m, n), dtype, 2.0, 0.5)
        w, b = _params(dev, (n,), dtype, None, affine)
        norm = lambda x64, w64, b64: F.layer_norm(x64, [n], w64, b64, EPS)  # noqa: E731
        x = _away_from_kinks(code, x, norm, w, b).contiguous()
        y, mean, rstd = target.ops.layer_norm_fwd(x, [n], w, b, EPS, None, code, p)
        dy = _randn(dev, (m, n), dtype)
        dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, w is not None, b is not None],
                                               b, code, p)
    else:
        x = _layout(_randn(dev, shape, dtype, 1.5, 0.25), layout)
        w, b = _params(dev, (shape[1],), dtype, None, affine)
        norm = lambda x64, w64, b64: F.group_norm(x64, groups, w64, b64, EPS)  # noqa: E731
        x = _layout(_away_from_kinks(code, x, norm, w, b), layout)
        y, mean, rstd = target.ops.group_norm_fwd(x, w, b, groups, EPS, None, code, p)
        assert y.is_contiguous(memory_format=_fmt(layout))
        dy = _layout(_randn(dev, shape, dtype), layout)
        dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, groups,
                                               [True, w is not None, b is not None], b, code, p)
        assert dx.is_contiguous(memory_format=_fmt(layout))
    ry, rdx, rdw, rdb = _act_ref(norm, code, x, w, b, dy)
    what = f"{ACT_CODES[code][0]} {family} {tuple(shape)} {layout}"
    assert y.dtype == dtype and dx.dtype == dtype
    _check(y, ry, dtype, 0, None, f"y ({what})")
    _check(dx, rdx, dtype, 1, None, f"dx ({what})")
    if w is not None:
        _check(dw, rdw, dtype, 1, None, f"dweight ({what})")
    if b is not None:
        _check(db, rdb, dtype, 1, None, f"dbias ({what})")
    return y, dx, dw, db


# Every activation, every dtype, each family on its 16-byte-pack cached plan (small shapes).
ACT_SMALL = [("ln", (20, 32), None, "nchw"),        # LayerNorm cached, sub-warp, vector
             ("gn", (2, 16, 4, 4), 4, "nchw"),      # GroupNorm NCHW cached, vector, packs in a channel
             ("gn", (2, 16, 4, 4), 4, "cl")]        # GroupNorm channels_last, vector (C % 8 == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", list(ACT_CODES), ids=ACT_IDS)
@pytest.mark.parametrize("family,shape,groups,layout", ACT_SMALL,
                         ids=[f"{f}-{layout}" for f, _, _, layout in ACT_SMALL])
def test_act_every_code(target, dtype, code, family, shape, groups, layout):
    _act_case(target, dtype, code, family, shape, groups, layout)


# Every plan path of the ACT kernels (see the tables above: cached / split, 16-byte packs / single
# elements, per family), every dtype, each with every activation in turn.
ACT_PATHS = [
    ("ln", (16, 33), None, "nchw"),        # cached fwd / bwd, scalar
    ("ln", (1, 32776), None, "nchw"),      # split fwd (row_apply) / bwd (row_sums_partial, ln_bwd_split), vector
    ("ln", (2, 8193), None, "nchw"),       # split fwd / bwd, scalar
    ("gn", (2, 7, 5, 5), 7, "nchw"),       # NCHW cached fwd, scalar; sums and dx scalar
    ("gn", (2, 6, 7, 9), 3, "nchw"),       # NCHW fp64 packs straddling channels (HW = 63)
    ("gn", (1, 8, 33, 33), 1, "nchw"),     # NCHW cached fwd (packs straddling channels), sums scalar S > 1
    ("gn", (1, 8, 65, 65), 1, "nchw"),     # NCHW split fwd (vector, packs straddling channels: L = 33800)
    ("gn", (2, 3, 61, 61), 1, "nchw"),     # NCHW split fwd scalar, sums scalar, dx scalar
    ("gn", (1, 2, 72, 72), 1, "nchw"),     # NCHW sums vector S > 1, dx vector
    ("gn", (2, 6, 14, 14), 2, "nchw"),     # NCHW sums in 8-byte packs (fp16/bf16: HW = 196)
    ("gn", (2, 7, 5, 5), 7, "cl"),         # channels_last scalar
    ("gn", (3, 64, 8, 8), 32, "cl"),       # channels_last vector, K > 1 row chunks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family,shape,groups,layout", ACT_PATHS,
                         ids=[f"{f}-{'x'.join(map(str, s))}-{layout}" for f, s, _, layout in ACT_PATHS])
def test_act_plan_paths(target, dtype, family, shape, groups, layout):
    target.skip_if_emulated_above(math.prod(shape), EMU_LIMIT)
    for code in ACT_CODES:
        _act_case(target, dtype, code, family, shape, groups, layout)


@pytest.mark.parametrize("family,shape,groups,layout", [("ln", (20, 32), None, "nchw"),
                                                        ("gn", (2, 16, 4, 4), 4, "nchw"),
                                                        ("gn", (2, 16, 4, 4), 4, "cl")])
@pytest.mark.parametrize("affine", ["w", "none"])
def test_act_without_bias_or_weight(target, family, shape, groups, layout, affine):
    """z without a bias (0) or without any affine (xhat); fp32 parameters with a half input."""
    for code in (1, 5, 9):
        _act_case(target, torch.float32, code, family, shape, groups, layout, affine)
    dev = target.device
    if family == "ln":
        x = _randn(dev, shape, torch.bfloat16)
        w, b = _params(dev, (shape[1],), torch.bfloat16, torch.float32, "wb")
        y, mean, rstd = target.ops.layer_norm_fwd(x, [shape[1]], w, b, EPS, None, 4, 0.0)
        norm = lambda x64, w64, b64: F.layer_norm(x64, [shape[1]], w64, b64, EPS)  # noqa: E731
        dy = _randn(dev, shape, torch.bfloat16)
        dx, dw, db = target.ops.layer_norm_bwd(dy, x, mean, rstd, w, [shape[1]], [True, True, True], b, 4, 0.0)
    else:
        x = _layout(_randn(dev, shape, torch.bfloat16), layout)
        w, b = _params(dev, (shape[1],), torch.bfloat16, torch.float32, "wb")
        y, mean, rstd = target.ops.group_norm_fwd(x, w, b, groups, EPS, None, 4, 0.0)
        norm = lambda x64, w64, b64: F.group_norm(x64, groups, w64, b64, EPS)  # noqa: E731
        dy = _layout(_randn(dev, shape, torch.bfloat16), layout)
        dx, dw, db = target.ops.group_norm_bwd(dy, x, mean, rstd, w, groups, [True, True, True], b, 4, 0.0)
    ry, rdx, rdw, rdb = _act_ref(norm, 4, x, w, b, dy)
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32 and db.dtype == torch.float32
    _check(y, ry, torch.bfloat16, 0, None, "y (fp32 params)")
    _check(dx, rdx, torch.bfloat16, 1, None, "dx (fp32 params)")
    _check(dw, rdw, torch.bfloat16, 1, None, "dweight (fp32 params)")
    _check(db, rdb, torch.bfloat16, 1, None, "dbias (fp32 params)")


@pytest.mark.parametrize("family,layout", [("ln", "nchw"), ("gn", "nchw"), ("gn", "cl")])
def test_act_identity_is_the_plain_op(target, family, layout):
    """activation=0 takes the plain kernels: bitwise the op without the activation arguments, and
    the backward's bias is ignored (not even read: a bias of the wrong size is no error)."""
    dev = target.device
    if family == "ln":
        x = _randn(dev, (20, 32), torch.float16)
        w, b = _params(dev, (32,), torch.float16, None, "wb")
        dy = _randn(dev, (20, 32), torch.float16)
        plain = target.ops.layer_norm_fwd(x, [32], w, b, EPS)
        fused = target.ops.layer_norm_fwd(x, [32], w, b, EPS, None, 0, 0.0)
        gplain = target.ops.layer_norm_bwd(dy, x, plain[1], plain[2], w, [32], [True, True, True])
        gfused = target.ops.layer_norm_bwd(dy, x, plain[1], plain[2], w, [32], [True, True, True],
                                           b[:3], 0, 0.0)
    else:
        x = _layout(_randn(dev, (2, 16, 4, 4), torch.float16), layout)
        w, b = _params(dev, (16,), torch.float16, None, "wb")
        dy = _layout(_randn(dev, (2, 16, 4, 4), torch.float16), layout)
        plain = target.ops.group_norm_fwd(x, w, b, 4, EPS)
        fused = target.ops.group_norm_fwd(x, w, b, 4, EPS, None, 0, 0.0)
        gplain = target.ops.group_norm_bwd(dy, x, plain[1], plain[2], w, 4, [True, True, True])
        gfused = target.ops.group_norm_bwd(dy, x, plain[1], plain[2], w, 4, [True, True, True], b[:3], 0, 0.0)
    for a, c in zip(tuple(plain) + tuple(gplain), tuple(fused) + tuple(gfused)):
        assert torch.equal(a, c)


def test_act_bad_arguments(target):
    """An unknown activation code is a ValueError; with an activation the backward checks its bias
    as the forward does."""
    target.require("cuda", "emu", why="the C++ wrappers' checks")
    dev = target.device
    x = _randn(dev, (4, 8), torch.float32)
    w, b = _params(dev, (8,), torch.float32, None, "wb")
    for code in (-1, 12):
        with pytest.raises(ValueError, match=r"activation must be a code in \[0, 12\).*got " + str(code)):
            target.ops.layer_norm_fwd(x, [8], w, b, EPS, None, code, 0.0)
        with pytest.raises(ValueError, match="activation"):
            target.ops.group_norm_fwd(x.view(4, 8, 1), w, b, 2, EPS, None, code, 0.0)
    y, mean, rstd = target.ops.layer_norm_fwd(x, [8], w, b, EPS, None, 4, 0.0)
    with pytest.raises(ValueError, match="activation"):
        target.ops.layer_norm_bwd(x, x, mean, rstd, w, [8], [True, True, True], b, 99, 0.0)
    with pytest.raises(RuntimeError, match=r"bias must have 8 elements, got 3"):
        target.ops.layer_norm_bwd(x, x, mean, rstd, w, [8], [True, True, True], b[:3], 4, 0.0)
    xg = x.view(4, 8, 1)
    y, mean, rstd = target.ops.group_norm_fwd(xg, w, b, 2, EPS, None, 4, 0.0)
    with pytest.raises(RuntimeError, match=r"bias must have 8 elements, got 3"):
        target.ops.group_norm_bwd(xg, xg, mean, rstd, w, 2, [True, True, True], b[:3], 4, 0.0)
