"""The LayerNorm2d kernels (fastnorm::layer_norm2d_fwd / layer_norm2d_bwd), called as ops through the
`target` fixture (tests/conftest.py): the CUDA kernels on a GPU, the same sources in the CPU
emulation (FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS=reference); compared with
a float64 reference written here, for every dtype, NCHW and channels_last.

Host decisions of csrc/layer_norm2d_*.cu and csrc/launch/positions.h, and the cases that cross them
(V = 16-byte pack: 4 fp32, 8 fp16/bf16, 2 fp64; 8-byte pack: 2 fp32, 4 fp16/bf16; S =
prod(spatial); lanes = channel lanes per block, positions per block = 256 / lanes; cached = the
forward keeps a lane's packs in registers, C <= lanes * 8):

  layout   channels_last (4-D) / channels_last_3d (5-D) / S == 1 -> rows family (groups.h):
           (2, 24, 4, 4) CL, (2, 6, 2, 3, 4) CL3, (3, 6, 1, 1), (4, 6)
           NCHW-contiguous (or made contiguous: a transposed input) -> positions family
  packs    S % V == 0 and 16-byte aligned: 16-byte packs (S = 16); S a multiple of the 8-byte
           pack but not of the 16-byte one (fp16 S = 12, fp32 S = 6), or a pointer 8 bytes off a
           16-byte boundary: 8-byte packs; S = 15, or x / dy / dx / y one element off alignment:
           single positions
  lanes    C = 5 (8 lanes, cached), 100 (16, cached), 200 (32, cached), 300 (32, not cached)
  tiles    (5, 7, 8, 8): several tiles per block with one resident block (the 1-SM schedule),
           partial last tile (positions not a multiple of the tile)
  backward dweight/dbias wanted or not, dx wanted or not (first pass skipped), weight absent; a
           block's dweight/dbias sums in dynamic shared memory up to kBwdSumsSmem (C <= 3072
           fp32-accumulated, 1536 fp64), in its rows of the workspaces beyond (no shared memory)
  dtypes   out_dtype=float32 with a half input (autocast's fused cast), float32 dy, float32
           parameters with a half input
  empty    N = 0, C = 0, S = 0
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import grad_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute tolerance, scaled by max(1, |reference|): (forward, backward)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
       torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
EPS = 1e-6
CL = torch.channels_last
CL3 = torch.channels_last_3d


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(dev, shape, dtype, scale=1.0, shift=0.0, fmt=None):
    t = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(dev)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _misaligned(t, elems=1):
    """The same values `elems` elements off a 16-byte boundary (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    v = buf[elems:].view(t.shape)
    v.copy_(t)
    return v


def _ref(x, w, b, dy):
    """float64: y, mean, rstd (per position, (n, position) order) and the three gradients."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_()
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_()
    mean = x64.mean(1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + EPS)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if w64 is not None:
        y = y * w64.reshape(shape)
    if b64 is not None:
        y = y + b64.reshape(shape)
    y.backward(dy.detach().to("cpu", torch.float64))
    stats = (mean.detach().reshape(-1), (var.detach() + EPS).rsqrt().reshape(-1))
    return (y.detach(), *stats, x64.grad, None if w64 is None else w64.grad,
            None if b64 is None else b64.grad)


def _check(actual, ref64, dtype, kind, what, factor=1.0):
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - ref64).abs().max().item()
    bound = TOL[dtype][kind] * factor * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def _layout(t):
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=CL):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=CL3):
        return "channels_last_3d"
    return "other"


def _run(target, x, w, b, dtype, out_dtype=None, dy_dtype=None, mask=(True, True, True),
         misalign=0):
    dev = target.device
    y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS, out_dtype)
    assert y.dtype == (out_dtype or dtype) and _layout(y) == _layout(x)
    m = x.shape[0] * (x[0, 0].numel() if x.shape[0] and x.shape[1] else
                      int(torch.tensor(x.shape[2:]).prod().item()))
    assert mean.shape == (m,) and rstd.shape == (m,) and mean.dtype == _stat(dtype)
    dy = _randn(dev, x.shape, dy_dtype or dtype, fmt=CL if _layout(x) == "channels_last" else None)
    if misalign:
        dy = _misaligned(dy, misalign)
    mask = [mask[0], mask[1] and w is not None, mask[2] and b is not None]
    dx, dw, db = target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, mask)
    if x.numel() == 0:
        return
    ry, rmean, rrstd, rdx, rdw, rdb = _ref(x, w, b, dy)
    _check(y, ry, dtype, 0, "y")
    _check(mean, rmean, dtype, 0, "mean")
    _check(rstd / rrstd.to(rstd.dtype), torch.ones_like(rrstd), dtype, 0, "rstd (relative)")
    if mask[0]:
        assert dx.dtype == dtype and _layout(dx) == _layout(x)
        # dx's rounding error grows with rstd: 1 / sqrt(eps) = 1000 where a position's channels
        # are all equal (C = 1), where ATen's own kernel (the reference target) is 5e-4 off
        _check(dx, rdx, dtype, 1, "dx", max(1.0, rrstd.max().item() / 100))
    else:
        assert dx.numel() == 0
    # C = 1: xhat == 0, dweight is zero in exact arithmetic: judged at the whole gradient's scale
    zero = max(1.0, grad_scale(rdx, rdw, rdb)) if x.shape[1] == 1 else 1.0
    for got, ref, on, what, factor in ((dw, rdw, mask[1], "dweight", zero),
                                       (db, rdb, mask[2], "dbias", 1.0)):
        if on:
            assert got.dtype == (dtype if w is None else w.dtype) and got.shape == (x.shape[1],)
            _check(got, ref, dtype, 1, what, factor)
        else:
            assert got.numel() == 0


# (N, C, *spatial), memory format: the table of the module docstring
CASES = {
    "c5-vec": ((2, 5, 4, 4), None),
    "c5-scalar": ((2, 5, 3, 5), None),
    "c100-vec": ((3, 100, 4, 4), None),
    "c100-scalar": ((1, 100, 3, 5), None),
    "c200-vec": ((2, 200, 4, 4), None),
    "c300-vec-uncached": ((2, 300, 4, 4), None),
    "c300-scalar-uncached": ((1, 300, 3, 5), None),
    "tiles-tail": ((5, 7, 8, 8), None),
    "ncl": ((2, 6, 10), None),
    "ncdhw": ((2, 6, 2, 3, 4), None),
    "c1": ((3, 1, 4, 4), None),
    "rows-nhwc": ((2, 24, 4, 4), CL),
    "rows-nhwc-scalar": ((2, 7, 3, 3), CL),
    "rows-cl3": ((2, 6, 2, 3, 4), CL3),
    "rows-s1": ((3, 6, 1, 1), None),
    "rows-nc": ((4, 6), None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_norm2d_fwd_bwd(target, dtype, case):
    shape, fmt = CASES[case]
    dev = target.device
    x = _randn(dev, shape, dtype, 2.0, 0.5, fmt)
    w = _randn(dev, (shape[1],), dtype, 0.5, 1.0)
    b = _randn(dev, (shape[1],), dtype, 0.5)
    _run(target, x, w, b, dtype)


# every dtype with and without affine parameters; weight-only and bias-only in fp32 and bf16
AFFINE = ([(d, a) for d in DTYPES for a in ("wb", "none")]
          + [(d, a) for d in (torch.float32, torch.bfloat16) for a in ("w", "b")])


@pytest.mark.parametrize("dtype,affine", AFFINE, ids=[f"{d}-{a}" for d, a in AFFINE])
@pytest.mark.parametrize("case", ["c5-vec", "c300-vec-uncached", "c100-scalar", "rows-nhwc"])
@pytest.mark.parametrize("mask", list(itertools.product((True, False), repeat=3)),
                         ids=lambda m: "".join("1" if v else "0" for v in m))
def test_masks_and_affine(target, dtype, affine, case, mask):
    """Every output mask with every affine combination: the backward with and without its
    parameter sums (dynamic shared memory or none) and with or without its first pass."""
    shape, fmt = CASES[case]
    dev = target.device
    x = _randn(dev, shape, dtype, 2.0, 0.5, fmt)
    w = _randn(dev, (shape[1],), dtype, 0.5, 1.0) if "w" in affine else None
    b = _randn(dev, (shape[1],), dtype, 0.5) if "b" in affine else None
    _run(target, x, w, b, dtype, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["c5-vec", "c5-scalar", "c300-vec-uncached", "rows-nhwc"])
def test_half_with_float32_params_out_and_dy(target, dtype, case):
    """AMP parameters (float32), autocast's float32 output (out_dtype) and float32 dy."""
    shape, fmt = CASES[case]
    dev = target.device
    x = _randn(dev, shape, dtype, 2.0, 0.5, fmt)
    w = _randn(dev, (shape[1],), torch.float32, 0.5, 1.0)
    b = _randn(dev, (shape[1],), torch.float32, 0.5)
    _run(target, x, w, b, dtype)
    _run(target, x, w, b, dtype, out_dtype=torch.float32, dy_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["c5-vec", "c300-vec-uncached"])
def test_misaligned_pointers_take_single_positions(target, dtype, case):
    shape, fmt = CASES[case]
    dev = target.device
    x = _misaligned(_randn(dev, shape, dtype, 2.0, 0.5, fmt))
    w = _randn(dev, (shape[1],), dtype, 0.5, 1.0)
    b = _randn(dev, (shape[1],), dtype, 0.5)
    _run(target, x, w, b, dtype, misalign=1)


def _launched(target, fn):
    """Emulation: [(kernel name, template arguments, dynamic shared memory)] fn launches."""
    out = []
    for k, _, _, smem in target.emu.record_launches(fn):
        head = k.split("(")[0]
        name, _, args = head.partition("<")
        out.append((name.split("::")[-1], [a.strip() for a in args.rstrip(">").split(",")], smem))
    return out


# 8-byte packs: S a multiple of the 8-byte pack but not of the 16-byte one, or every tensor 8 bytes
# off a 16-byte boundary (S = 16): 4 positions a pack for fp16 / bf16, 2 for fp32
PACK8 = {torch.float32: (2, 3), torch.float16: (3, 4), torch.bfloat16: (3, 4)}


@pytest.mark.parametrize("dtype", list(PACK8), ids=str)
@pytest.mark.parametrize("c", [5, 300], ids=["cached", "uncached"])
@pytest.mark.parametrize("how", ["shape", "pointer"])
def test_eight_byte_packs(target, dtype, c, how):
    dev = target.device
    v8 = 8 // torch.tensor([], dtype=dtype).element_size()
    spatial = PACK8[dtype] if how == "shape" else (4, 4)
    x = _randn(dev, (2, c, *spatial), dtype, 2.0, 0.5)
    if how == "pointer":
        x = _misaligned(x, v8)
    w = _randn(dev, (c,), dtype, 0.5, 1.0)
    b = _randn(dev, (c,), dtype, 0.5)
    _run(target, x, w, b, dtype, misalign=v8 if how == "pointer" else 0)
    _run(target, x, w, b, dtype, mask=(True, False, False), misalign=v8 if how == "pointer" else 0)
    if target.emulated:  # the 8-byte pack kernels ran
        dy = x.clone()
        for name, args, _ in _launched(target, lambda: (
                target.ops.layer_norm2d_fwd(x, w, b, EPS),
                target.ops.layer_norm2d_bwd(dy, x, *target.ops.layer_norm2d_fwd(x, w, b, EPS)[1:],
                                            w, [True, True, True]))):
            if name.startswith("ln2d_"):
                assert int(args[1]) == v8, (name, args)


def _wide_case(dev, dtype, c):
    x = _randn(dev, (1, c, 2, 1), dtype, 2.0, 0.5)
    w = _randn(dev, (c,), dtype, 0.5, 1.0)
    b = _randn(dev, (c,), dtype, 0.5)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_channels_backward_sums_in_workspace(target, dtype):
    """C above the backward's shared-memory sums: each block keeps its dweight / dbias sums in
    its rows of the workspaces (the positions kernel all the same, no copies)."""
    x, w, b = _wide_case(target.device, dtype, 4100)
    _run(target, x, w, b, dtype)
    for mask in ((True, False, False), (False, True, False), (False, False, True)):
        _run(target, x, w, b, dtype, mask=mask)


# the widest C whose [2, C] sums take kBwdSumsSmem (24 KB) of shared memory, and one more
SUMS_EDGE = [(torch.float32, 3072, 24576), (torch.float32, 3073, 0), (torch.float64, 1536, 24576),
             (torch.float64, 1537, 0), (torch.float16, 3073, 0)]


@pytest.mark.parametrize("dtype,c,smem", SUMS_EDGE, ids=[f"{d}-c{c}" for d, c, _ in SUMS_EDGE])
def test_backward_sums_shared_or_workspace(target, dtype, c, smem):
    """The same results either side of the shared-memory budget; the launches: the positions
    backward alone for dx (no dynamic shared memory, no finalize), with the column-sum finalize
    when dweight / dbias are wanted, and no other kernel (no copies to other layouts)."""
    x, w, b = _wide_case(target.device, dtype, c)
    _run(target, x, w, b, dtype)
    if not target.emulated:
        return
    _, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS)
    dy = x.clone()
    for mask, want in (([True, False, False], [("ln2d_bwd_kernel", 0)]),
                       ([True, True, True], [("ln2d_bwd_kernel", smem),
                                             ("col_sum_finalize_kernel", 0)]),
                       ([False, False, True], [("ln2d_bwd_kernel", smem),
                                               ("col_sum_finalize_kernel", 0)])):
        got = _launched(target, lambda: target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, mask))
        assert [(n, sm) for n, _, sm in got] == want, (mask, got)


def test_non_contiguous_input(target):
    """Neither NCHW nor channels_last (a transposed view): made contiguous, output contiguous."""
    dev = target.device
    x = _randn(dev, (2, 6, 5, 4), torch.float32, 2.0, 0.5).transpose(2, 3)
    w = _randn(dev, (6,), torch.float32, 0.5, 1.0)
    b = _randn(dev, (6,), torch.float32, 0.5)
    y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS)
    assert y.is_contiguous()
    ry, rmean, rrstd, *_ = _ref(x, w, b, torch.zeros(x.shape))
    _check(y, ry, torch.float32, 0, "y")
    _check(mean, rmean, torch.float32, 0, "mean")


@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 0, 4, 4), (2, 6, 0, 4)],
                         ids=["n0", "c0", "s0"])
def test_empty(target, shape):
    dev = target.device
    x = _randn(dev, shape, torch.float32)
    w = _randn(dev, (shape[1],), torch.float32)
    b = _randn(dev, (shape[1],), torch.float32)
    y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS)
    ry, rmean, rrstd = torch.ops.fastnorm.layer_norm2d_fwd(x.cpu(), w.cpu(), b.cpu(), EPS)
    assert y.shape == ry.shape and mean.shape == rmean.shape
    torch.testing.assert_close(mean.cpu(), rmean, equal_nan=True)
    torch.testing.assert_close(rstd.cpu(), rrstd, equal_nan=True)
    dy = torch.zeros_like(y)
    dx, dw, db = target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, True, True])
    assert dx.shape == x.shape
    assert torch.equal(dw.cpu(), torch.zeros(shape[1])) and torch.equal(db.cpu(), torch.zeros(shape[1]))


def test_constant_positions_and_large_half_values(target):
    """Equal channels give 0 (+ bias), never NaN; fp16 values whose squares overflow fp16."""
    dev = target.device
    x = torch.full((2, 6, 4, 4), 3.0, dtype=torch.float16)
    x[1] = torch.linspace(-30000, 30000, 6).reshape(6, 1, 1).to(torch.float16)
    x = x.to(dev)
    b = _randn(dev, (6,), torch.float16)
    y, _, _ = target.ops.layer_norm2d_fwd(x, None, b, EPS)
    assert torch.isfinite(y.cpu()).all()
    torch.testing.assert_close(y[0].cpu(), b.cpu().reshape(6, 1, 1).expand(6, 4, 4))
    ry, *_ = _ref(x, None, b, torch.zeros(x.shape))
    _check(y, ry, torch.float16, 0, "y")


@pytest.mark.parametrize("case", ["tiles-tail", "c300-vec-uncached", "c100-scalar"])
def test_bitwise_repeatable_under_schedules(target, case):
    """Fixed-order reductions: the same bits under other thread and block orders, on an H100-sized
    device, 8 SMs, and 1 SM with one resident block (which forces the grid-stride loops)."""
    target.require("emu", why="schedules are an emulation control")
    shape, fmt = CASES[case]
    dev = target.device
    x = _randn(dev, shape, torch.float32, 2.0, 0.5, fmt)
    w = _randn(dev, (shape[1],), torch.float32, 0.5, 1.0)
    b = _randn(dev, (shape[1],), torch.float32, 0.5)
    dy = _randn(dev, shape, torch.float32)

    def run():
        y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS)
        return (y, mean, rstd, *target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True] * 3))

    # per device size (the grid, hence the dweight/dbias partials, follow the SM count): the same
    # bits under every thread and block order
    for device in (dict(sm_count=132), dict(sm_count=8), dict(sm_count=1, blocks_per_sm=1)):
        with target.schedule(**device):
            base = run()
        for order in (dict(thread_order="reverse", block_order="reverse"),
                      dict(thread_order="random", seed=3),
                      dict(thread_order="random", block_order="reverse", seed=4)):
            with target.schedule(**device, **order):
                got = run()
            for a, e in zip(got, base):
                assert torch.equal(a, e), f"{device} {order}: results differ"
