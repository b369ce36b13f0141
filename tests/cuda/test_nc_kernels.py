"""The per-(n, c) primitives of SwitchNorm, AdaIN and IBN (fastnorm::nc_moments, nc_affine,
nc_grad_sums, nc_affine_grad; contract in docs/ops.md), called as ops through the `target` fixture
(tests/conftest.py): the CUDA kernels on a GPU, the same sources in the CPU emulation
(FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS=reference); compared with a float64
reference written here, for every dtype, NCHW / NCDHW, channels_last and channels_last_3d.

Host decisions of csrc/nc_norm.cu and the cases that cross them (V = pack: 16 bytes (4 fp32, 8
fp16/bf16, 2 fp64) or 8 bytes (2 fp32, 4 fp16/bf16); 132 SMs):

  layout   contiguous (rank 3, 4, 5) -> rows family: rows (n, c) of L = prod(spatial) elements
           (launch/groups.h plan_items); channels_last / channels_last_3d -> channels family
           (launch/channels.h plan_cl, G = C); other strides (a transposed input) -> contiguous
           copy, output contiguous. A tensor both contiguous and channels_last (C = 1, or L = 1)
           reads as contiguous.
  packs    the widest V that divides the run (rows: L; channels: C) and whose alignment x / y /
           dy / dx have: 16 bytes (L = 32; C = 16), 8 bytes (fp16 L = 196 = 14 x 14 and L = 36,
           fp32 L = 14; fp16 C = 12, fp32 C = 6; tensors 8 bytes off a 16-byte boundary), else
           single elements (L = 7, 13 * 3, 2311; C = 3, 5, 13; one element off alignment).
  rows     S partials per row: S == 1 (whole rows per item), S > 1 (rows of more than 4 warp
           steps, 512 packs, and too few rows to fill the device: (1, 2, 72, 72) and L = 2311).
  channels K row chunks per (n, tile): K == 1 (small L), K > 1 ((1, 8, 32, 32), (1, 3, 20, 20)).
  sums     always a finalize (the two outputs are separate tensors), over S (K) partials.
  dx       grad_out given or None (the a * dy term drops); grad_out float32 with a half input.
  inputs   [N, C] tensors in another float dtype (cast to the statistics dtype).
  empty    N = 0, C = 0 (empty [N, C] outputs), L = 0 (NaN moments, zero sums, empty y / dx).

test_plan_decisions checks on the emulated target that each case takes the path claimed for it.
"""
from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute tolerance of an output rounded to the input's dtype, scaled by max(1, |reference|)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# statistics and sums (statistics dtype), scaled by max(1, |reference|)
STAT_TOL = {torch.float64: 1e-10, torch.float32: 3e-5}
CL = torch.channels_last
CL3 = torch.channels_last_3d


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t):
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=CL):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=CL3):
        return "channels_last_3d"
    return "other"


def _randn(dev, shape, dtype, scale=1.0, shift=0.0, fmt=None):
    t = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(dev)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _misaligned(t, nbytes=None):
    """The same values and strides one element (or nbytes) off a 16-byte boundary."""
    off = 1 if nbytes is None else nbytes // t.element_size()
    buf = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
    v = torch.as_strided(buf, t.shape, t.stride(), off)
    v.copy_(t)
    return v


def _check(actual, ref64, tol, what):
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    r = ref64.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - r).abs().max().item()
    bound = tol * max(1.0, r.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def _bcast(t, x):
    """[N, C] -> [N, C, 1, ...] against x, float64 on the CPU."""
    return t.detach().to("cpu", torch.float64).reshape(*t.shape, *([1] * (x.dim() - 2)))


# ------------------------------------------------------------------------------------------------
# float64 references (CPU)
# ------------------------------------------------------------------------------------------------
def _ref_moments(x):
    x64 = x.detach().to("cpu", torch.float64)
    dims = tuple(range(2, x.dim()))
    mean = x64.mean(dims)
    var = ((x64 - _bcast(mean, x)) ** 2).mean(dims)
    return mean, var


def _ref_affine(x, scale, shift):
    return x.detach().to("cpu", torch.float64) * _bcast(scale, x) + _bcast(shift, x)


def _ref_grad_sums(dy, x, mean):
    dims = tuple(range(2, x.dim()))
    dy64 = dy.detach().to("cpu", torch.float64)
    xc = x.detach().to("cpu", torch.float64) - _bcast(mean, x)
    return dy64.sum(dims), (dy64 * xc).sum(dims)


def _ref_affine_grad(dy, x, mean, a, b, c):
    dx = _bcast(b, x) * (x.detach().to("cpu", torch.float64) - _bcast(mean, x)) + _bcast(c, x)
    if dy is not None:
        dx = dx + _bcast(a, x) * dy.detach().to("cpu", torch.float64)
    return dx


# ------------------------------------------------------------------------------------------------
# the cases: (shape, memory format or "transposed", misaligned)
# ------------------------------------------------------------------------------------------------
CASES = {
    # contiguous: rows (n, c)
    "rows-vec": ((2, 3, 4, 8), None, False),          # L = 32: vector for every dtype, S == 1
    "rows-L7": ((3, 5, 7), None, False),              # rank 3, L = 7: single elements
    "rows-L1": ((2, 13, 1, 1), None, False),          # L = 1 (also channels_last-contiguous)
    "rows-C1": ((4, 1, 5, 5), None, False),           # C = 1, L = 25: single elements
    "rows-N1-C3": ((1, 3, 6, 6), None, False),        # L = 36: vector fp32/fp64, 8-byte fp16/bf16
    "rows-5d": ((2, 3, 2, 3, 4), None, False),        # NCDHW, L = 24: vector but fp16/bf16
    "rows-split-vec": ((1, 2, 72, 72), None, False),  # L = 5184: vector, S > 1
    "rows-split-scalar": ((1, 1, 2311), None, False),  # L = 2311 (prime): single, S > 1
    "rows-misaligned": ((2, 3, 4, 8), None, True),    # vector shape one element off: single
    "rows-L196": ((2, 3, 14, 14), None, False),       # fp16/bf16: 8-byte packs (196 % 8 = 4)
    "rows-L14": ((2, 3, 2, 7), None, False),          # fp32: 8-byte packs
    "rows-off8": ((2, 3, 4, 8), None, 8),             # 8 bytes off: 8-byte packs (fp64: single)
    "transposed": ((2, 5, 4, 6), "transposed", False),  # other strides: a contiguous copy
    # channels_last: x[n] an [L, C] matrix, G = C
    "cl-vec": ((2, 16, 3, 5), CL, False),             # C = 16: vector for every dtype, K == 1
    "cl-C5": ((3, 5, 4, 3), CL, False),               # single, K == 1
    "cl-C13": ((2, 13, 3, 3), CL, False),             # single, K == 1
    "cl-split-vec": ((1, 8, 32, 32), CL, False),      # C = 8 (vector but fp64: 4 packs), K > 1
    "cl-split-scalar": ((1, 3, 20, 20), CL, False),   # single, K > 1
    "cl-misaligned": ((2, 16, 3, 5), CL, True),       # vector shape one element off: single
    "cl-C12": ((2, 12, 3, 3), CL, False),             # fp16/bf16: 8-byte packs
    "cl-C6": ((2, 6, 3, 3), CL, False),               # fp32: 8-byte packs
    "cl-off8": ((2, 16, 3, 5), CL, 8),                # 8 bytes off: 8-byte packs (fp64: single)
    "cl3d-vec": ((2, 16, 2, 3, 2), CL3, False),
    "cl3d-C5": ((2, 5, 2, 2, 3), CL3, False),
}


def _make(dev, shape, fmt, dtype, misalign, scale=1.5, shift=0.5):
    if fmt == "transposed":
        x = _randn(dev, shape, dtype, scale, shift).transpose(2, 3)
        assert _layout(x) == "other"
        return x
    x = _randn(dev, shape, dtype, scale, shift, fmt=fmt)
    if not misalign:
        return x
    return _misaligned(x, None if misalign is True else misalign)


def _expected_layout(x):
    lay = _layout(x)
    return "contiguous" if lay == "other" else lay


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_nc_ops(target, case, dtype):
    shape, fmt, misalign = CASES[case]
    dev = target.device
    ops = target.ops
    sd = _stat(dtype)
    x = _make(dev, shape, fmt, dtype, misalign)
    n, c = x.shape[:2]

    # nc_moments
    mean, var = ops.nc_moments(x)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == (n, c)
    assert mean.is_contiguous() and var.is_contiguous()
    rmean, rvar = _ref_moments(x)
    _check(mean, rmean, STAT_TOL[sd], "mean")
    _check(var, rvar, STAT_TOL[sd], "var")

    # nc_affine: the coefficients of an instance norm with a per-(n, c) affine
    scale = (torch.rand(n, c, dtype=torch.float64) + 0.5).to(sd).to(dev)
    shift = torch.randn(n, c, dtype=torch.float64).to(sd).to(dev)
    y = ops.nc_affine(x, scale, shift)
    assert y.dtype == dtype and y.shape == x.shape and _layout(y) == _expected_layout(x)
    _check(y, _ref_affine(x, scale, shift), TOL[dtype], "y")

    # nc_grad_sums (dy misaligned with x when x is)
    dy = _make(dev, shape, fmt, dtype, misalign, scale=1.0, shift=0.0)
    sum_dy, sum_dy_xc = ops.nc_grad_sums(dy, x, mean)
    assert sum_dy.dtype == sum_dy_xc.dtype == sd and sum_dy.shape == sum_dy_xc.shape == (n, c)
    r_dy, r_xc = _ref_grad_sums(dy, x, mean)
    _check(sum_dy, r_dy, STAT_TOL[sd], "sum_dy")
    _check(sum_dy_xc, r_xc, STAT_TOL[sd], "sum_dy_xc")

    # nc_affine_grad, with and without grad_out
    a, b, cc = (torch.randn(n, c, dtype=torch.float64).to(sd).to(dev) for _ in range(3))
    for g in (dy, None):
        dx = ops.nc_affine_grad(g, x, mean, a, b, cc)
        assert dx.dtype == dtype and dx.shape == x.shape and _layout(dx) == _expected_layout(x)
        _check(dx, _ref_affine_grad(g, x, mean, a, b, cc), TOL[dtype],
               f"dx ({'with' if g is not None else 'without'} grad_out)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["rows-vec", "rows-L7", "rows-L196", "cl-vec", "cl-C5", "cl-C12"])
def test_float32_grad_out_and_cast_inputs(target, case, dtype):
    """grad_out in float32 with a half / bf16 / fp64 input; [N, C] inputs given in another float
    dtype than the statistics dtype (cast); grad_out in another layout than x (read in x's)."""
    shape, fmt, _ = CASES[case]
    dev = target.device
    ops = target.ops
    x = _make(dev, shape, fmt, dtype, False)
    n, c = x.shape[:2]
    other = torch.float16 if dtype == torch.float64 else torch.float64
    mean = _ref_moments(x)[0].to(other).to(dev)
    a, b, cc = (torch.randn(n, c, dtype=torch.float64).to(other).to(dev) for _ in range(3))
    dy = _randn(dev, shape, torch.float32)  # contiguous whatever x's layout
    sum_dy, sum_dy_xc = ops.nc_grad_sums(dy, x, mean)
    assert sum_dy.dtype == _stat(dtype)
    r_dy, r_xc = _ref_grad_sums(dy, x, mean)
    _check(sum_dy, r_dy, STAT_TOL[_stat(dtype)], "sum_dy")
    _check(sum_dy_xc, r_xc, STAT_TOL[_stat(dtype)], "sum_dy_xc")
    dx = ops.nc_affine_grad(dy, x, mean, a, b, cc)
    assert dx.dtype == dtype and _layout(dx) == _expected_layout(x)
    _check(dx, _ref_affine_grad(dy, x, mean, a, b, cc), TOL[dtype], "dx")
    y = ops.nc_affine(x, a, b)
    _check(y, _ref_affine(x, a, b), TOL[dtype], "y")


def test_large_mean_is_centred(target):
    """Data far from zero (1e4 + N(0, 1)) in float32: Welford moments and the centred sums keep
    the precision a two-moment formula (E[x^2] - E[x]^2) would lose: that one is off by units
    here (1e8 x 2^-24), Welford in float32 by ~1e-4 (means rounded to 2^-11 at 1e4, merged)."""
    dev = target.device
    for fmt in (None, CL):
        x = _randn(dev, (2, 8, 16, 16), torch.float32, 1.0, 1e4, fmt=fmt)
        mean, var = target.ops.nc_moments(x)
        rmean, rvar = _ref_moments(x)
        _check(mean, rmean, 1e-6, "mean")
        _check(var, rvar, 1e-3, "var")
        dy = _randn(dev, x.shape, torch.float32, fmt=fmt)
        _, sum_dy_xc = target.ops.nc_grad_sums(dy, x, mean)
        _check(sum_dy_xc, _ref_grad_sums(dy, x, mean)[1], 1e-4, "sum_dy_xc")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 0), (0, 0, 0)])
@pytest.mark.parametrize("fmt", [None, CL])
def test_empty(target, shape, fmt):
    if fmt is not None and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    dev = target.device
    ops = target.ops
    x = torch.empty(shape, device=dev)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    n, c = shape[:2]
    mean, var = ops.nc_moments(x)
    assert mean.shape == var.shape == (n, c) and mean.dtype == torch.float32
    if mean.numel():  # L == 0: NaN, as torch.var_mean
        assert torch.isnan(mean).all() and torch.isnan(var).all()
    st = torch.zeros(n, c, device=dev)
    y = ops.nc_affine(x, st, st)
    assert y.shape == x.shape and y.dtype == x.dtype
    sum_dy, sum_dy_xc = ops.nc_grad_sums(torch.empty_like(x), x, st)
    assert sum_dy.shape == (n, c) and (sum_dy == 0).all() and (sum_dy_xc == 0).all()
    dx = ops.nc_affine_grad(None, x, st, st, st, st)
    assert dx.shape == x.shape


def test_bad_inputs(target):
    """RuntimeError naming the expected and actual shapes / dtypes."""
    dev = target.device
    ops = target.ops
    x = torch.randn(2, 3, 4, 4, device=dev)
    st = torch.zeros(2, 3, device=dev)
    with pytest.raises(RuntimeError, match=r"rank >= 3"):
        ops.nc_moments(torch.randn(2, 3, device=dev))
    with pytest.raises(RuntimeError, match=r"float|floating"):
        ops.nc_moments(torch.ones(2, 3, 4, dtype=torch.int32, device=dev))
    with pytest.raises(RuntimeError, match=r"scale.*\[2, 3\].*\[3, 2\]"):
        ops.nc_affine(x, st.t(), st)
    with pytest.raises(RuntimeError, match=r"shift.*\[2, 3\].*\[6\]"):
        ops.nc_affine(x, st, st.reshape(6))
    with pytest.raises(RuntimeError, match=r"grad_out.*\[2, 3, 4, 4\].*\[2, 3, 4, 5\]"):
        ops.nc_grad_sums(torch.randn(2, 3, 4, 5, device=dev), x, st)
    with pytest.raises(RuntimeError, match=r"grad_out.*(Double|float64)"):
        ops.nc_grad_sums(x.double(), x, st)
    with pytest.raises(RuntimeError, match=r"mean.*\[2, 3\].*\[2, 4\]"):
        ops.nc_affine_grad(x, x, torch.zeros(2, 4, device=dev), st, st, st)
    with pytest.raises(RuntimeError, match=r"\bc\b.*\[2, 3\].*\[1, 3\]"):
        ops.nc_affine_grad(None, x, st, st, st, st[:1])


# ------------------------------------------------------------------------------------------------
# validity (the masked norms): lengths or a mask; statistics and sums over the valid positions,
# 0 written at the invalid ones, which hold NaN here (padding may hold anything)
# ------------------------------------------------------------------------------------------------
def _validity(x, form, gen):
    """(lengths, mask, valid64): lengths int64 [N] (0, 1, full, past the end, random; negative
    for N > 4) or mask bool [N, *spatial] (a random pattern, one sample all invalid), and the
    float64 [N, 1, *spatial] validity of the reference."""
    n, w = x.shape[0], x.shape[-1]
    spatial = tuple(x.shape[2:])
    if form == "lengths":
        pick = [0, 1, w, w + 3, -2]
        lengths = torch.tensor([pick[i] if i < len(pick) else int(torch.randint(0, w + 1, (1,),
                                                                               generator=gen))
                                for i in range(n)], dtype=torch.int64)
        if n >= 2:
            lengths[1] = max(1, w // 2)
        col = torch.arange(w)
        valid = (col < lengths.reshape(-1, *([1] * len(spatial)))).expand(n, *spatial)
        return lengths.to(x.device), None, valid.unsqueeze(1).double()
    mask = torch.rand((n, *spatial), generator=gen) < 0.6
    mask[0] = False
    return None, mask.to(x.device), mask.unsqueeze(1).double()


def _masked_ref(x, dy, valid, a, b, c):
    dims = tuple(range(2, x.dim()))
    x64 = torch.where(valid.bool(), x.detach().to("cpu", torch.float64), 0)
    cnt = valid.sum(dims)
    mean = (x64 * valid).sum(dims) / cnt.clamp_min(1)
    var = (((x64 - _bcast(mean, x)) * valid) ** 2).sum(dims) / cnt.clamp_min(1)
    dy64 = torch.where(valid.bool(), dy.detach().to("cpu", torch.float64), 0)
    s_dy = (dy64 * valid).sum(dims)
    s_xc = (dy64 * (x64 - _bcast(mean, x)) * valid).sum(dims)
    y = (x64 * _bcast(a, x) + _bcast(b, x)) * valid
    dx = (_bcast(a, x) * dy64 + _bcast(b, x) * (x64 - _bcast(mean, x)) + _bcast(c, x)) * valid
    return mean, var, s_dy, s_xc, y, dx


def _poison(t, valid):
    """NaN at the invalid positions of t, in place (its layout and alignment kept)."""
    return t.masked_fill_((~valid.bool()).to(t.device).expand_as(t), float("nan"))


@pytest.mark.parametrize("form", ["lengths", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", [c for c in CASES if c != "transposed"])
def test_nc_ops_masked(target, case, dtype, form):
    shape, fmt, misalign = CASES[case]
    dev = target.device
    ops = target.ops
    sd = _stat(dtype)
    gen = torch.Generator().manual_seed(hash((case, form)) % 2**31)
    x = _make(dev, shape, fmt, dtype, misalign)
    dy = _make(dev, shape, fmt, dtype, misalign, scale=1.0, shift=0.0)
    lengths, mask, valid = _validity(x, form, gen)
    n, c = x.shape[:2]
    a = (torch.rand(n, c, dtype=torch.float64) + 0.5).to(sd).to(dev)
    b, cc = (torch.randn(n, c, dtype=torch.float64).to(sd).to(dev) for _ in range(2))
    rmean, rvar, r_dy, r_xc, ry, rdx = _masked_ref(x, dy, valid, a, b, cc)
    xp = _poison(x, valid)
    dyp = _poison(dy, valid)
    assert _layout(xp) == _layout(x)
    vk = dict(lengths=lengths, mask=mask)

    mean, var = ops.nc_moments(xp, **vk)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == (n, c)
    _check(mean, rmean, STAT_TOL[sd], "mean")
    _check(var, rvar, STAT_TOL[sd], "var")
    y = ops.nc_affine(xp, a, b, **vk)
    assert y.dtype == dtype and _layout(y) == _expected_layout(x)
    _check(y, ry, TOL[dtype], "y")
    # the sums around the reference mean (the kernels' own is checked above)
    m_in = rmean.to(sd).to(dev)
    sum_dy, sum_dy_xc = ops.nc_grad_sums(dyp, xp, m_in, **vk)
    _check(sum_dy, r_dy, STAT_TOL[sd], "sum_dy")
    _check(sum_dy_xc, r_xc, STAT_TOL[sd], "sum_dy_xc")
    dx = ops.nc_affine_grad(dyp, xp, m_in, a, b, cc, **vk)
    assert dx.dtype == dtype and _layout(dx) == _expected_layout(x)
    _check(dx, rdx, TOL[dtype], "dx")
    dx0 = ops.nc_affine_grad(None, xp, m_in, a, b, cc, **vk)
    _check(dx0, _masked_ref(x, torch.zeros_like(dy), valid, a, b, cc)[5], TOL[dtype], "dx without dy")


@pytest.mark.parametrize("case", ["rows-vec", "rows-L7", "cl-vec", "cl-C5"])
def test_masked_lengths_equal_mask_bitwise(target, case):
    """lengths and the mask it stands for give the same bits (the same reduction order: a
    reduction bounded at its length adds the same elements in the same order)."""
    shape, fmt, misalign = CASES[case]
    dev = target.device
    ops = target.ops
    x = _make(dev, shape, fmt, torch.float32, misalign)
    dy = _make(dev, shape, fmt, torch.float32, misalign, scale=1.0, shift=0.0)
    n, c, w = x.shape[0], x.shape[1], x.shape[-1]
    lengths = torch.randint(0, w + 1, (n,), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(w) < lengths.reshape(-1, *([1] * (x.dim() - 2)))).expand(n, *x.shape[2:])
    st = torch.rand(n, c).to(dev)
    for op, args in (("nc_moments", (x,)), ("nc_affine", (x, st, st)),
                     ("nc_grad_sums", (dy, x, st)), ("nc_affine_grad", (dy, x, st, st, st, st))):
        fn = getattr(ops, op)
        by_len = fn(*args, lengths=lengths.to(dev))
        by_mask = fn(*args, mask=mask.contiguous().to(dev))
        for u, v in zip(*(t if isinstance(t, tuple) else (t,) for t in (by_len, by_mask))):
            assert torch.equal(u.cpu(), v.cpu()), op


@pytest.mark.parametrize("fmt", [None, CL])
def test_masked_empty_and_no_valid(target, fmt):
    """No positions (L = 0) or no valid one: statistics 0 (not NaN), sums 0, outputs 0."""
    dev = target.device
    ops = target.ops
    x = torch.empty(2, 3, 0, 4, device=dev)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    mean, var = ops.nc_moments(x, lengths=torch.tensor([0, 3], device=dev))
    assert (mean == 0).all() and (var == 0).all()
    x = torch.randn(2, 3, 4, 4, device=dev)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    none = torch.zeros(2, 4, 4, dtype=torch.bool, device=dev)
    mean, var = ops.nc_moments(x, mask=none)
    assert (mean == 0).all() and (var == 0).all()
    st = torch.ones(2, 3, device=dev)
    assert (ops.nc_affine(x, st, st, mask=none) == 0).all()
    s1, s2 = ops.nc_grad_sums(x, x, st, mask=none)
    assert (s1 == 0).all() and (s2 == 0).all()
    assert (ops.nc_affine_grad(x, x, st, st, st, st, mask=none) == 0).all()


def test_masked_bad_inputs(target):
    """RuntimeError naming the expected and actual shape / dtype."""
    dev = target.device
    ops = target.ops
    x = torch.randn(2, 3, 4, 5, device=dev)
    with pytest.raises(RuntimeError, match=r"at most one of lengths and mask"):
        ops.nc_moments(x, lengths=torch.tensor([1, 2], device=dev),
                       mask=torch.ones(2, 4, 5, dtype=torch.bool, device=dev))
    with pytest.raises(RuntimeError, match=r"lengths.*\[2\].*\[3\]"):
        ops.nc_moments(x, lengths=torch.tensor([1, 2, 3], device=dev))
    with pytest.raises(RuntimeError, match=r"lengths.*(int64|Long).*(int32|Int)"):
        ops.nc_moments(x, lengths=torch.tensor([1, 2], dtype=torch.int32, device=dev))
    with pytest.raises(RuntimeError, match=r"mask.*\[2, 4, 5\].*\[2, 5, 4\]"):
        ops.nc_moments(x, mask=torch.ones(2, 5, 4, dtype=torch.bool, device=dev))
    with pytest.raises(RuntimeError, match=r"mask.*bool.*(uint8|Byte)"):
        ops.nc_moments(x, mask=torch.ones(2, 4, 5, dtype=torch.uint8, device=dev))


# ------------------------------------------------------------------------------------------------
# the plan decisions the cases claim (emulated target: launches recorded, not executed)
# ------------------------------------------------------------------------------------------------
SMS = 132


def _items_s(m, length, vec, target=SMS * 64):
    """Partials per row of launch/groups.h plan_items (restated: the cases must keep crossing
    both sides of S == 1 if the plan changes)."""
    lp = max(1, length // vec)
    step = 32 * 4
    cp = max(-(-m * lp // target), 4 * step)
    cp = lp if cp >= lp else min(lp, -(-cp // step) * step)
    return -(-lp // cp)


# case -> (dtype, pack bytes (16, 8, or 0: single elements), more than one partial per row /
# chunk per (n, tile))
DECISIONS = [
    ("rows-vec", torch.float32, 16, False), ("rows-vec", torch.float16, 16, False),
    ("rows-L7", torch.float32, 0, False), ("rows-N1-C3", torch.float16, 8, False),
    ("rows-N1-C3", torch.float64, 16, False),
    ("rows-split-vec", torch.float32, 16, True), ("rows-split-vec", torch.bfloat16, 16, True),
    ("rows-split-scalar", torch.float32, 0, True),
    ("rows-misaligned", torch.float32, 0, False),
    ("rows-L196", torch.float16, 8, False), ("rows-L196", torch.bfloat16, 8, False),
    ("rows-L196", torch.float32, 16, False), ("rows-L14", torch.float32, 8, False),
    ("rows-L14", torch.float16, 0, False), ("rows-off8", torch.float16, 8, False),
    ("rows-off8", torch.float32, 8, False), ("rows-off8", torch.float64, 0, False),
    ("cl-vec", torch.float16, 16, False), ("cl-vec", torch.float64, 16, False),
    ("cl-C5", torch.float32, 0, False),
    ("cl-split-vec", torch.float32, 16, True), ("cl-split-vec", torch.float16, 16, True),
    ("cl-split-scalar", torch.float32, 0, True),
    ("cl-misaligned", torch.float32, 0, False), ("cl3d-vec", torch.float32, 16, False),
    ("cl-C12", torch.float16, 8, False), ("cl-C12", torch.float32, 16, False),
    ("cl-C6", torch.float32, 8, False), ("cl-off8", torch.bfloat16, 8, False),
]


@pytest.mark.parametrize("case,dtype,pack,split", DECISIONS,
                         ids=[f"{c}-{str(d).split('.')[-1]}" for c, d, *_ in DECISIONS])
def test_plan_decisions(target, case, dtype, pack, split):
    target.require("emu", why="launch records of the emulated target")
    shape, fmt, misalign = CASES[case]
    x = _make(target.device, shape, fmt, dtype, misalign)
    n, c = x.shape[:2]
    st = torch.zeros(n, c, dtype=_stat(dtype))
    V = max(1, pack // x.element_size())
    rows = fmt is None
    launches = {}
    for name, fn in (("moments", lambda: target.ops.nc_moments(x)),
                     ("affine", lambda: target.ops.nc_affine(x, st, st)),
                     ("sums", lambda: target.ops.nc_grad_sums(x, x, st)),
                     ("dx", lambda: target.ops.nc_affine_grad(x, x, st, st, st, st))):
        launches[name] = target.emu.record_launches(fn)
    want = {"moments": ("row_welford_partial_kernel", "row_welford_finalize_kernel") if rows else
            ("cl_welford_partial_kernel", "cl_welford_finalize_kernel"),
            "affine": ("row_apply_kernel",) if rows else ("cl_apply_kernel",),
            "sums": ("row_sums_partial_kernel", "row_sums_finalize_kernel") if rows else
            ("cl_bwd_sums_kernel", "row_sums_finalize_kernel"),
            "dx": ("gn_dx_nchw_kernel",) if rows else ("cl_dx_kernel",)}
    for name, ks in want.items():
        got = [k.split("(")[0] for k, *_ in launches[name]]
        assert [g.split("<")[0].split("::")[-1] for g in got] == list(ks), (name, got)
        # the streaming kernel's pack width: the second template argument
        args = [a.strip() for a in got[0].split("<", 1)[1].rsplit(">", 1)[0].split(",")]
        assert args[1] == str(V), (name, got[0])
        if name in ("affine", "dx"):  # the per-(n, c) instantiations (GnMap of N * C rows, NC)
            # row_apply<T, V, GN, X, ACT>: GN; cl_apply / gn_dx_nchw / cl_dx<T, V, ACT, NC>: NC,
            # never with ACT
            if name == "affine" and rows:
                assert args[2] == "true" and args[4] == "false", (name, got[0])
            else:
                assert args[2:4] == ["false", "true"], (name, got[0])
    length = x[0, 0].numel()
    if rows:
        assert (_items_s(n * c, length, V) > 1) == split
    else:
        # channels: the partial grid is N x K x tiles, one tile for C / V <= 256 channel packs
        grid = launches["moments"][0][1][0]
        assert grid % n == 0 and ((grid // n) > 1) == split, grid
