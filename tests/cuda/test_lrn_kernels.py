"""The LocalResponseNorm kernels (fastnorm::local_response_norm_fwd / _bwd), called as ops through
the `target` fixture (tests/conftest.py): the CUDA kernels on a GPU, the same sources in the CPU
emulation (FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS=reference); compared with
a float64 reference written here from the formula, for every dtype, NCHW and channels_last.

Host decisions of csrc/local_response_norm.cu and csrc/launch/positions.h (lrn), and the cases
that cross them (V = 16-byte pack: 4 fp32, 8 fp16/bf16, 2 fp64; G = channels a thread owns,
G x V = 16 elements (8 in fp64); S = prod(spatial)):

  layout   channels_last (4-D) / channels_last_3d (5-D) / S == 1 -> rows kernels (CL = true):
           (2, 16, 3, 3) CL, (2, 13, 2, 3) CL, (2, 16, 2, 2, 3) CL3, (3, 13, 1, 1), (2, 16, 1)
           NCHW-contiguous (or made contiguous: a transposed input) -> NCHW kernels (CL = false)
  packs    NCHW: S % V == 0 and x / dy / out 16-byte aligned: vector (S = 16, 8); S = 15, 7 or x
           / dy one element off alignment: single positions. Rows: C % G == 0 (C = 16): the
           group's outputs stored as one pack; C = 13: single stores
  groups   C not a multiple of G (a partial last group); C = 1; windows wider than C (size 30);
           size 1, 2 (even: one channel before, none after), 3, 5, 8
  grid     one wave of 256-thread blocks walking the units grid-stride: several units per thread
           on the 1-SM schedule
  empty    N = 0, C = 0, S = 0
"""
from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute tolerance, scaled by max(1, |reference|): (forward, backward)
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (2e-6, 1e-5),
       torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}
CL = torch.channels_last
CL3 = torch.channels_last_3d
ALPHA, BETA, K = 0.3, 0.75, 1.2  # alpha large enough that every window matters


def _randn(dev, shape, dtype, scale=1.0, fmt=None):
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(dev)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _misaligned(t):
    """The same values one element off a 16-byte boundary (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def _ref(x, dy, size, alpha=ALPHA, beta=BETA, k=K):
    """float64 y and dx from the definition (the zero-padded channel window), by autograd."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    c = x.shape[1]
    cols = []
    for ch in range(c):
        lo, hi = max(0, ch - size // 2), min(c - 1, ch + (size - 1) // 2)
        s = (x64[:, lo:hi + 1] ** 2).sum(1)
        cols.append(x64[:, ch] * (k + alpha / size * s) ** -beta)
    y = torch.stack(cols, 1) if c else x64 * 1
    if x.numel() == 0:
        return y.detach(), torch.zeros_like(y)
    y.backward(dy.detach().to("cpu", torch.float64))
    return y.detach(), x64.grad


def _layout(t):
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=CL):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=CL3):
        return "channels_last_3d"
    return "other"


def _check(actual, ref64, dtype, kind, what):
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - ref64).abs().max().item()
    bound = TOL[dtype][kind] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def _same(target, a, b):
    """Bitwise in the emulation; on a GPU the compiler may contract a different multiply-add
    into an FMA in another instantiation: within a rounding or two."""
    if target.emulated:
        return torch.equal(a, b)
    return torch.allclose(a.double(), b.double(), rtol=1e-2 if a.element_size() == 2 else 1e-5,
                          atol=1e-6)


def _run(target, x, dy, size, dtype, alpha=ALPHA, beta=BETA, k=K):
    y = target.ops.local_response_norm_fwd(x, size, alpha, beta, k)
    dx = target.ops.local_response_norm_bwd(dy, x, size, alpha, beta, k)
    want = _layout(x) if _layout(x) != "other" else "contiguous"
    assert y.dtype == dtype and _layout(y) == want
    assert dx.dtype == dtype and _layout(dx) == want
    ry, rdx = _ref(x, dy, size, alpha, beta, k)
    _check(y, ry, dtype, 0, "y")
    _check(dx, rdx, dtype, 1, "dx")
    return y, dx


# (N, C, *spatial), memory format: the table of the module docstring
CASES = {
    "nchw-vec": ((2, 13, 4, 4), None),
    "nchw-vec-s8": ((3, 16, 2, 4), None),
    "nchw-scalar": ((2, 13, 3, 5), None),
    "nchw-scalar-s7": ((2, 5, 7), None),
    "ncl-vec": ((2, 6, 16), None),
    "ncdhw": ((2, 7, 2, 2, 4), None),
    "c1": ((3, 1, 4, 4), None),
    "c3": ((2, 3, 3, 3), None),
    "rows-nhwc-vec": ((2, 16, 3, 3), CL),
    "rows-nhwc-scalar": ((2, 13, 2, 3), CL),
    "rows-cl3": ((2, 16, 2, 2, 3), CL3),
    "rows-cl3-13": ((1, 13, 2, 1, 3), CL3),
    "rows-s1": ((3, 13, 1, 1), None),
    "rows-s1-3d": ((2, 16, 1), None),
    "rows-c1": ((2, 1, 2, 3), CL),
}
SIZES = [1, 2, 3, 5, 8, 30]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_lrn_fwd_bwd(target, dtype, size, case):
    shape, fmt = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, fmt)
    dy = _randn(target.device, shape, dtype, 1.0, fmt)
    _run(target, x, dy, size, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["nchw-vec", "ncl-vec", "rows-nhwc-vec"])
@pytest.mark.parametrize("which", ["x", "dy"])
def test_misaligned_pointers(target, dtype, case, which):
    """x or dy one element off a 16-byte boundary: NCHW takes single positions (the same
    results as the vector path, bitwise: the sums run in the same order); rows read scalars
    anyway."""
    shape, fmt = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, fmt)
    dy = _randn(target.device, shape, dtype, 1.0, fmt)
    y0, dx0 = _run(target, x, dy, 5, dtype)
    if fmt is None:
        if which == "x":
            x = _misaligned(x)
        else:
            dy = _misaligned(dy)
    y1, dx1 = _run(target, x, dy, 5, dtype)
    assert _same(target, y0, y1) and _same(target, dx0, dx1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_agree_bitwise(target, dtype):
    """NCHW and channels_last run different kernels with the same per-output sums (channel order):
    the same bits."""
    x = _randn(target.device, (2, 16, 3, 4), dtype, 2.0)
    dy = _randn(target.device, (2, 16, 3, 4), dtype)
    y0, dx0 = _run(target, x, dy, 5, dtype)
    y1, dx1 = _run(target, x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL), 5, dtype)
    assert _same(target, y0, y1.contiguous()) and _same(target, dx0, dx1.contiguous())


# (shape, layout, units = position packs (rows) x channel groups): more units than 256 threads
GRID_STRIDE = {"nchw-vec": ((8, 16, 8, 8), None, 8 * 16 * 4),        # V = 4, G = 4
               "nchw-scalar": ((8, 16, 7, 7), None, 8 * 49 * 1),     # V = 1, G = 16
               "rows-nhwc": ((8, 40, 4, 4), CL, 8 * 16 * 3)}         # G = 16: 3 groups a row


@pytest.mark.parametrize("case", list(GRID_STRIDE))
def test_grid_stride_on_a_small_device(target, case):
    """One 256-thread block on one SM: every thread walks more than one unit."""
    shape, fmt, units = GRID_STRIDE[case]
    assert units > 256
    x = _randn(target.device, shape, torch.float32, 2.0, fmt)
    dy = _randn(target.device, shape, torch.float32, 1.0, fmt)
    with target.schedule(sm_count=1, blocks_per_sm=1):
        y1, dx1 = _run(target, x, dy, 5, torch.float32)
        if target.emulated:  # one block of 256 threads each way
            rec = target.emu.record_launches(lambda: (
                target.ops.local_response_norm_fwd(x, 5, ALPHA, BETA, K),
                target.ops.local_response_norm_bwd(dy, x, 5, ALPHA, BETA, K)))
            assert [(r[1], r[2]) for r in rec] == [((1, 1, 1), (256, 1, 1))] * 2, rec
    y0, dx0 = _run(target, x, dy, 5, torch.float32)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)  # no thread interacts: the same bits


def test_transposed_input_made_contiguous(target):
    base = _randn(target.device, (2, 6, 4, 5), torch.float32, 2.0)
    x = base.transpose(2, 3)
    dy = _randn(target.device, x.shape, torch.float32).transpose(2, 3).contiguous().transpose(2, 3)
    _run(target, x, dy, 3, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_defaults_and_other_constants(target, dtype):
    x = _randn(target.device, (2, 24, 2, 4), dtype, 20.0)
    dy = _randn(target.device, x.shape, dtype)
    for alpha, beta, k in ((1e-4, 0.75, 1.0), (1.0, 0.5, 2.0), (0.05, 1.5, 0.5)):
        _run(target, x, dy, 5, dtype, alpha, beta, k)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0), (0, 4, 3, 3, 2)])
def test_empty(target, shape):
    x = torch.empty(shape, device=target.device)
    y = target.ops.local_response_norm_fwd(x, 3, ALPHA, BETA, K)
    dx = target.ops.local_response_norm_bwd(x, x, 3, ALPHA, BETA, K)
    assert y.shape == x.shape and dx.shape == x.shape


def test_errors(target):
    x = torch.randn(2, 3, 4, device=target.device)
    with pytest.raises(ValueError):
        target.ops.local_response_norm_fwd(torch.randn(2, 3, device=target.device), 2, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="size"):
        target.ops.local_response_norm_fwd(x, 0, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        target.ops.local_response_norm_bwd(torch.randn(2, 3, 5, device=target.device), x, 2,
                                           1e-4, 0.75, 1.0)


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_large_shapes_gpu_only(target, fmt):
    """AlexNet's first LRN (N = 8 here) and GoogLeNet's: real sizes (the CUDA target)."""
    for shape in ((8, 96, 55, 55), (8, 64, 56, 56), (8, 192, 56, 56)):
        n = 1
        for d in shape:
            n *= d
        target.skip_if_emulated_above(n, 200_000)
        x = _randn(target.device, shape, torch.float32, 2.0, fmt)
        dy = _randn(target.device, shape, torch.float32, 1.0, fmt)
        y = target.ops.local_response_norm_fwd(x, 5, 1e-4, 0.75, 1.0)
        dx = target.ops.local_response_norm_bwd(dy, x, 5, 1e-4, 0.75, 1.0)
        ry, rdx = _ref(x[:2], dy[:2], 5, 1e-4, 0.75, 1.0)
        _check(y[:2], ry, torch.float32, 0, "y")
        _check(dx[:2], rdx, torch.float32, 1, "dx")
