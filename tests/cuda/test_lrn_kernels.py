"""The LocalResponseNorm kernels (fastnorm::local_response_norm_fwd / _bwd), called as ops through
the `target` fixture (tests/conftest.py): the CUDA kernels on a GPU, the same sources in the CPU
emulation (FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS=reference); compared with
a float64 reference written here from the formula, for every dtype, NCHW and channels_last.

Host decisions of csrc/local_response_norm.cu and csrc/launch/positions.h (lrn), and the cases
that cross them (V = pack: 16 bytes (4 fp32, 8 fp16/bf16, 2 fp64) or 8 bytes (2 fp32, 4
fp16/bf16); G = channels an NCHW thread owns, G x V = 16 elements (8 in fp64); S =
prod(spatial); tile = a rows kernel's shared array: 4096 forward / 2048 backward elements of
the accumulation type, half that in fp64):

  layout   channels_last (4-D) / channels_last_3d (5-D) / S == 1 -> rows kernels:
           (2, 16, 3, 3) CL, (2, 13, 2, 3) CL, (2, 16, 2, 2, 3) CL3, (3, 13, 1, 1), (2, 16, 1)
           NCHW-contiguous (or made contiguous: a transposed input) -> NCHW kernels
  packs    NCHW: the widest pack that divides S and x / dy / out's alignment: 16 bytes (S = 16,
           8), 8 bytes (fp16 at S = 196 = 14 x 14, fp32 at S = 14; or 8-byte-aligned tensors),
           single positions (S = 15, 7; x / dy one element off). Rows: the same on C for the
           staging loads of x and dy (C = 16; C = 12 fp16 and C = 6 fp32: 8 bytes; C = 13: single)
  groups   C not a multiple of G (a partial last group); C = 1; windows wider than C (size 30);
           size 1, 2 (even: one channel before, none after), 3, 5, 8
  tiles    rows: C below, at and above the window; C at and above each tile (whole rows, then
           one row's channel chunks with the halo their windows reach); windows too wide for a
           chunk beside its halo: the NCHW kernels on a contiguous copy (x itself when S == 1)
  grid     one wave of 256-thread blocks walking the units (NCHW) or tiles (rows) grid-stride:
           several per block on the 1-SM schedule; rows' tiles depend on the batch and the SM
           count, their results do not (bitwise)
  empty    N = 0, C = 0, S = 0; N = 0 with C above 2^31 (no channel limit)
"""
from __future__ import annotations

import math

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
    """float64 y and dx (None without dy) from the definition (the zero-padded channel window),
    by autograd."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    if x.numel() == 0:
        return x64.detach().clone(), torch.zeros_like(x64.detach())
    sq = (x64 * x64).flatten(2)  # (N, C, S)
    padded = torch.nn.functional.pad(sq, (0, 0, size // 2, (size - 1) // 2))
    s = padded.unfold(1, size, 1).sum(-1).view(x64.shape)  # window c: channels c - size//2 ..
    y = x64 * (k + alpha / size * s) ** -beta
    if dy is None:
        return y.detach(), None
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
    "nchw-s196": ((2, 9, 14, 14), None),   # fp16/bf16: 8-byte packs (196 % 8 = 4)
    "nchw-s14": ((2, 9, 2, 7), None),      # fp32: 8-byte packs (14 % 4 = 2)
    "ncl-vec": ((2, 6, 16), None),
    "ncdhw": ((2, 7, 2, 2, 4), None),
    "c1": ((3, 1, 4, 4), None),
    "c3": ((2, 3, 3, 3), None),
    "rows-nhwc-vec": ((2, 16, 3, 3), CL),
    "rows-nhwc-scalar": ((2, 13, 2, 3), CL),
    "rows-nhwc-c12": ((2, 12, 3, 3), CL),  # fp16/bf16: 8-byte packs
    "rows-nhwc-c6": ((2, 6, 3, 3), CL),    # fp32: 8-byte packs
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


def _kernels(target, fn):
    """The kernels fn() launches on the emulated target: 'name<T, V>' each."""
    return [r[0].split("(")[0].replace("void ", "").replace("fastnorm::positions::", "")
            .replace("c10::", "") for r in target.emu.record_launches(fn)]


def _pack(shape, rows, dtype):
    """The pack (elements) lrn picks for aligned tensors: the widest of 16 and 8 bytes that
    divides the run (C for rows, S for NCHW)."""
    run = shape[1] if rows else math.prod(shape[2:])
    elem = torch.empty((), dtype=dtype).element_size()
    return next((b // elem for b in (16, 8) if b // elem >= 1 and run % (b // elem) == 0), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["nchw-vec", "nchw-s196", "nchw-s14", "nchw-scalar",
                                  "rows-nhwc-vec", "rows-nhwc-c12", "rows-nhwc-c6",
                                  "rows-nhwc-scalar", "rows-s1"])
def test_pack_paths(target, dtype, case):
    """Each case runs the kernels of the pack the host should pick (16 bytes, 8 bytes or single
    elements), per dtype: 8-byte packs where 16 bytes do not divide S (NCHW) or C (rows)."""
    target.require("emu", why="the launched kernels are recorded by the emulator")
    shape, fmt = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, fmt)
    dy = _randn(target.device, shape, dtype, 1.0, fmt)
    rows = fmt is not None or math.prod(shape[2:]) == 1
    v = _pack(shape, rows, dtype)
    t = {torch.float32: "float", torch.float64: "double", torch.float16: "Half",
         torch.bfloat16: "BFloat16"}[dtype]
    kind = "_rows_kernel" if rows else "_kernel"
    got = _kernels(target, lambda: (target.ops.local_response_norm_fwd(x, 5, ALPHA, BETA, K),
                                    target.ops.local_response_norm_bwd(dy, x, 5, ALPHA, BETA, K)))
    assert got == [f"lrn_fwd{kind}<{t}, {v}>", f"lrn_bwd{kind}<{t}, {v}>"], got
    _run(target, x, dy, 5, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ["nchw-vec", "rows-nhwc-vec"])
def test_eight_byte_aligned_tensors(target, dtype, case):
    """x and dy 8 bytes off a 16-byte boundary: 8-byte packs (NCHW S = 16, rows C = 16), the same
    bits as the 16-byte packs of aligned tensors (the sums run in the same order)."""
    shape, fmt = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, fmt)
    dy = _randn(target.device, shape, dtype, 1.0, fmt)
    y0, dx0 = _run(target, x, dy, 5, dtype)

    def off8(t):
        shift = 8 // t.element_size()
        buf = torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)
        v = buf[shift:].as_strided(t.shape, t.stride())
        v.copy_(t)
        return v

    x1, dy1 = off8(x), off8(dy)
    if target.emulated:
        t = "Half" if dtype == torch.float16 else "float"
        kind = "_rows_kernel" if fmt is not None else "_kernel"
        v = 8 // x.element_size()
        got = _kernels(target, lambda: (target.ops.local_response_norm_fwd(x1, 5, ALPHA, BETA, K),
                                        target.ops.local_response_norm_bwd(dy1, x1, 5, ALPHA, BETA, K)))
        assert got == [f"lrn_fwd{kind}<{t}, {v}>", f"lrn_bwd{kind}<{t}, {v}>"], got
    y1, dx1 = _run(target, x1, dy1, 5, dtype)
    assert _same(target, y0, y1) and _same(target, dx0, dx1)


# channels_last rows: C below, at and above the window (size 5) and each shared tile (forward
# 4096, backward 2048 accumulation-type elements; half that in fp64): whole-row tiles, then one
# row's channel chunks whose windows reach into the neighbouring chunks (the halo)
ROW_CHANNELS = [3, 5, 13, 1024, 1025, 2048, 2049, 4096, 4097]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", ROW_CHANNELS)
@pytest.mark.parametrize("size", [5, 30])
def test_rows_tiles(target, dtype, c, size):
    shape = (1, c, 1, 3) if c > 64 else (2, c, 3, 2)
    x = _randn(target.device, shape, dtype, 2.0, CL)
    dy = _randn(target.device, shape, dtype, 1.0, CL)
    _run(target, x, dy, size, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c,size", [(13, 5), (2049, 30), (4097, 5)])
def test_rows_match_nchw_bitwise(target, dtype, c, size):
    """Whole rows and channel chunks give the NCHW kernels' bits: every output's window and twin
    sums run in channel order, whatever the tile."""
    shape = (1, c, 2, 2) if c > 64 else (2, c, 3, 4)
    x = _randn(target.device, shape, dtype, 2.0)
    dy = _randn(target.device, shape, dtype)
    y0, dx0 = _run(target, x, dy, size, dtype)
    y1, dx1 = _run(target, x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL), size,
                   dtype)
    assert _same(target, y0, y1.contiguous()) and _same(target, dx0, dx1.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rows_independent_of_batch_and_sm_count(target, dtype):
    """The rows kernels' tiles follow the rows and the wave (tile_rows), the results do not: a
    sample alone, in a batch, and on a one-SM device give the same bits."""
    x = _randn(target.device, (6, 24, 5, 7), dtype, 2.0, CL)
    dy = _randn(target.device, x.shape, dtype, 1.0, CL)
    y, dx = _run(target, x, dy, 5, dtype)
    y1, dx1 = _run(target, x[2:3], dy[2:3], 5, dtype)
    assert torch.equal(y[2:3], y1) and torch.equal(dx[2:3], dx1)
    with target.schedule(sm_count=1, blocks_per_sm=1):
        y2, dx2 = _run(target, x, dy, 5, dtype)
    assert torch.equal(y, y2) and torch.equal(dx, dx2)


# windows too wide for a chunk beside its halo (C above the tile): the NCHW kernels on a
# contiguous copy (channels_last) or on x itself (S == 1). fp64 backward: tile 1024, halo
# 2 * (size - 1); fp64 forward: tile 2048, halo size - 1.
WIDE = {"bwd-cl": ((1, 1100, 1, 2), CL, 520, True),
        "bwd-s1": ((2, 1100, 1), None, 520, True),
        "fwd-cl": ((1, 2100, 1, 2), CL, 2040, False)}


@pytest.mark.parametrize("case", list(WIDE))
def test_windows_wider_than_a_rows_tile(target, case):
    shape, fmt, size, bwd = WIDE[case]
    dtype = torch.float64
    x = _randn(target.device, shape, dtype, 2.0, fmt)
    dy = _randn(target.device, shape, dtype, 1.0, fmt)
    if target.emulated:
        calls = [lambda: target.ops.local_response_norm_fwd(x, size, ALPHA, BETA, K)]
        if bwd:
            calls.append(lambda: target.ops.local_response_norm_bwd(dy, x, size, ALPHA, BETA, K))
        got = _kernels(target, lambda: [f() for f in calls])
        v = _pack(shape, False, dtype)  # the contiguous layout's pack
        want = [f"lrn_bwd_kernel<double, {v}>"] if bwd else [f"lrn_fwd_kernel<double, {v}>"]
        assert want[0] in got, got
    y = target.ops.local_response_norm_fwd(x, size, ALPHA, BETA, K)
    ry, rdx = _ref(x, dy if bwd else None, size)
    want = "contiguous" if fmt is None else "channels_last"
    assert _layout(y) == want
    _check(y, ry, dtype, 0, "y")
    if bwd:
        dx = target.ops.local_response_norm_bwd(dy, x, size, ALPHA, BETA, K)
        assert _layout(dx) == want
        _check(dx, rdx, dtype, 1, "dx")


def test_channel_count_above_2_31(target):
    """No channel limit: the kernels' channel arithmetic is 64-bit (the window spans are checked
    at C > 2^31 by a static_assert in kernels/channels_positions.cuh); an empty batch with more
    than 2^31 channels allocates nothing and returns empty outputs."""
    x = torch.empty(0, (1 << 31) + 5, 2, device=target.device)
    y = target.ops.local_response_norm_fwd(x, 5, ALPHA, BETA, K)
    dx = target.ops.local_response_norm_bwd(x, x, 5, ALPHA, BETA, K)
    assert y.shape == x.shape and dx.shape == x.shape


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
