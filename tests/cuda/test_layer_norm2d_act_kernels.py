"""LayerNorm2d with a fused activation epilogue on NCHW input: the positions kernels
(ln2d_fwd_kernel<T, V, CACHED, ACT>, ln2d_bwd_kernel<T, V, ACT>, kernels/channels_positions.cuh)
through fastnorm::layer_norm2d_fwd / layer_norm2d_bwd with `activation`, on the `target` fixture
(tests/conftest.py). Reference: float64 torch autograd of act(LayerNorm over C) with torch's own
activation functions.

Cases (as tests/cuda/test_layer_norm2d_kernels.py's table): 16-byte packs of positions (S = 16)
or single positions (S = 15); C = 5 (8 lanes, cached forward), C = 300 (32 lanes, not cached);
every activation code x dtype on the cached vector case, the others rotating over the codes;
masks (dx alone: no first pass; dweight / dbias alone), no affine parameters, float32 parameters,
output and dy with a half input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute tolerance, scaled by max(1, |reference|): (forward, backward)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
       torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
EPS = 1e-6
LEAKY_SLOPE = 0.2
ACTS = {
    0: ("identity", lambda z: z),
    1: ("relu", F.relu),
    2: ("relu6", F.relu6),
    3: ("leaky_relu", None),  # F.leaky_relu(z, param_of(...)): act_fn
    4: ("silu", F.silu),
    5: ("gelu", F.gelu),
    6: ("gelu_tanh", lambda z: F.gelu(z, approximate="tanh")),
    7: ("hardswish", F.hardswish),
    # torch's own: its backward multiplies by 1/6 rounded to float32 in every dtype, as the kernel
    # does (kernels/activation.cuh)
    8: ("hardsigmoid", F.hardsigmoid),
    9: ("mish", F.mish),
    10: ("sigmoid", torch.sigmoid),
    11: ("tanh", torch.tanh),
}
CASES = {  # NCHW-contiguous: the positions family
    "c5-vec-cached": (2, 5, 4, 4),
    "c5-scalar-cached": (2, 5, 3, 5),
    "c300-vec-uncached": (2, 300, 4, 4),
    "c300-scalar-uncached": (1, 300, 3, 5),
    "tiles-tail": (5, 7, 8, 8),
}


def act_fn(code, p):
    return (lambda z: F.leaky_relu(z, p)) if code == 3 else ACTS[code][1]


def param_of(code, dtype=None):
    """leaky_relu's negative_slope: 0.2, which float32 does not hold exactly (1.5e-9 off), so
    float64 data checks that the kernels use torch's float64 slope."""
    return LEAKY_SLOPE if code == 3 else 0.0


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(dev, shape, dtype, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float64, generator=g) * scale + shift).to(dtype).to(dev)


def _ref(x, w, b, dy, code, p):
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_()
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_()
    mean = x64.mean(1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(1, keepdim=True)
    z = (x64 - mean) / torch.sqrt(var + EPS)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if w64 is not None:
        z = z * w64.reshape(shape)
    if b64 is not None:
        z = z + b64.reshape(shape)
    y = act_fn(code, p)(z)
    y.backward(dy.detach().to("cpu", torch.float64))
    return (y.detach(), mean.detach().reshape(-1), (var.detach() + EPS).rsqrt().reshape(-1),
            x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad)


def _check(actual, ref64, dtype, kind, what, factor=1.0):
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - ref64).abs().max().item()
    bound = TOL[dtype][kind] * factor * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def _run(target, x, w, b, code, dtype, out_dtype=None, dy_dtype=None, mask=(True, True, True),
         seed=0):
    ops, p = target.ops, param_of(code, dtype)
    y, mean, rstd = ops.layer_norm2d_fwd(x, w, b, EPS, out_dtype, code, p)
    assert y.dtype == (out_dtype or dtype) and y.is_contiguous()
    assert mean.dtype == _stat(dtype) and mean.shape == (x.shape[0] * x[0, 0].numel(),)
    dy = _randn(target.device, x.shape, dy_dtype or dtype, seed=seed + 1)
    mask = [mask[0], mask[1] and w is not None, mask[2] and b is not None]
    dx, dw, db = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, mask, b, code, p)
    ry, rmean, rrstd, rdx, rdw, rdb = _ref(x, w, b, dy, code, p)
    _check(y, ry, dtype, 0, "y")
    _check(mean, rmean, dtype, 0, "mean")
    _check(rstd / rrstd.to(rstd.dtype), torch.ones_like(rrstd), dtype, 0, "rstd (relative)")
    if mask[0]:
        assert dx.dtype == dtype and dx.is_contiguous()
        _check(dx, rdx, dtype, 1, "dx", max(1.0, rrstd.max().item() / 100))
    else:
        assert dx.numel() == 0
    for got, ref, on, what in ((dw, rdw, mask[1], "dweight"), (db, rdb, mask[2], "dbias")):
        if on:
            assert got.dtype == (dtype if w is None else w.dtype) and got.shape == (x.shape[1],)
            _check(got, ref, dtype, 1, what)
        else:
            assert got.numel() == 0


def _params(dev, C, dtype, seed):
    return (_randn(dev, (C,), dtype, 0.5, 1.0, seed=seed + 2),
            _randn(dev, (C,), dtype, 0.5, seed=seed + 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", list(ACTS), ids=[ACTS[c][0] for c in ACTS])
def test_every_activation(target, code, dtype):
    """Every code x dtype on the cached forward, 16-byte and single-position packs."""
    for i, case in enumerate(("c5-vec-cached", "c5-scalar-cached")):
        shape = CASES[case]
        seed = 20 * code + i
        x = _randn(target.device, shape, dtype, 2.0, 0.5, seed=seed)
        w, b = _params(target.device, shape[1], dtype, seed)
        try:
            _run(target, x, w, b, code, dtype, seed=seed)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None


PATHS = [(d, c) for d in DTYPES for c in CASES]


@pytest.mark.parametrize("dtype,case", PATHS, ids=[f"{d}-{c}" for d, c in PATHS])
def test_paths(target, dtype, case):
    """Every dtype x case (cached / uncached, vector / single positions, a partial last tile);
    the activation rotates over the codes."""
    i = PATHS.index((dtype, case))
    code = 1 + i % 11
    shape = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, 0.5, seed=50 + i)
    w, b = _params(target.device, shape[1], dtype, 50 + i)
    _run(target, x, w, b, code, dtype, seed=50 + i)


# 8-byte packs of positions (S a multiple of 4 for fp16 / bf16, of 2 for fp32, but not of the
# 16-byte pack): cached (C = 5) and uncached (C = 300) forward, the backward
PACK8 = {torch.float32: (2, 3), torch.float16: (3, 4), torch.bfloat16: (3, 4)}
PACK8_CASES = [(d, c) for d in PACK8 for c in (5, 300)]


@pytest.mark.parametrize("dtype,c", PACK8_CASES, ids=[f"{d}-c{c}" for d, c in PACK8_CASES])
def test_eight_byte_packs(target, dtype, c):
    i = PACK8_CASES.index((dtype, c))
    code = (5, 2, 9, 7, 3, 11)[i]  # gelu, relu6, mish, hardswish, leaky_relu, tanh
    x = _randn(target.device, (2, c, *PACK8[dtype]), dtype, 2.0, 0.5, seed=60 + i)
    w, b = _params(target.device, c, dtype, 60 + i)
    _run(target, x, w, b, code, dtype, seed=60 + i)


MASKS = [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("case", ["c5-vec-cached", "c300-scalar-uncached"])
def test_masks(target, case, mask):
    """dx alone (no parameter sums), dweight / dbias alone (no first pass): dz either way."""
    shape = CASES[case]
    x = _randn(target.device, shape, torch.float32, 2.0, 0.5, seed=7)
    w, b = _params(target.device, shape[1], torch.float32, 7)
    _run(target, x, w, b, 7, torch.float32, mask=mask, seed=7)  # hardswish


@pytest.mark.parametrize("affine", ["none", "w", "b"])
def test_partial_affine(target, affine):
    """Absent weight (1) or bias (0) in z; the backward's bias argument None with the bias."""
    shape = CASES["c5-vec-cached"]
    x = _randn(target.device, shape, torch.float32, 2.0, 0.5, seed=8)
    w, b = _params(target.device, shape[1], torch.float32, 8)
    w = w if "w" in affine else None
    b = b if "b" in affine else None
    _run(target, x, w, b, 1, torch.float32, seed=8)  # relu: z = xhat has its kink at the mean
    _run(target, x, w, b, 9, torch.float32, seed=8)  # mish


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["c5-vec-cached", "c300-scalar-uncached"])
def test_half_with_float32_params_out_and_dy(target, dtype, case):
    shape = CASES[case]
    x = _randn(target.device, shape, dtype, 2.0, 0.5, seed=9)
    w, b = _params(target.device, shape[1], torch.float32, 9)
    _run(target, x, w, b, 5, dtype, seed=9)  # gelu
    _run(target, x, w, b, 5, dtype, out_dtype=torch.float32, dy_dtype=torch.float32, seed=9)


def test_identity_ignores_the_bias(target):
    shape = CASES["c5-vec-cached"]
    x = _randn(target.device, shape, torch.float32, 2.0, 0.5, seed=10)
    w, b = _params(target.device, shape[1], torch.float32, 10)
    ops = target.ops
    y, mean, rstd = ops.layer_norm2d_fwd(x, w, b, EPS)
    dy = _randn(target.device, shape, torch.float32, seed=11)
    plain = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, True, True])
    with_bias = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, True, True], b * 100, 0, 0.0)
    for p, q in zip(plain, with_bias):
        assert torch.equal(p, q)


@pytest.mark.parametrize("code", [-1, 12])
def test_unknown_activation_is_a_value_error(target, code):
    shape = CASES["c5-vec-cached"]
    x = _randn(target.device, shape, torch.float32, seed=12)
    w, b = _params(target.device, shape[1], torch.float32, 12)
    with pytest.raises(ValueError, match="activation"):
        target.ops.layer_norm2d_fwd(x, w, b, EPS, None, code, 0.0)
    m = torch.zeros(shape[0] * 16, device=target.device)
    with pytest.raises(ValueError, match="activation"):
        target.ops.layer_norm2d_bwd(x, x, m, m + 1, w, [True, True, True], b, code, 0.0)


def test_leaky_relu_slope_exact(target):
    """y = leaky_relu(z) where z is exact (C = 2 channels of +-1: mean 0, rstd 1 with eps = 0;
    z = -3 for the second): the kernels' product z * slope is torch's bit for bit, in float32
    (slope rounded to float32, ATen's opmath type) and float64 (the slope as a double)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([1.0, -1.0], dtype=dtype).reshape(1, 2, 1, 1).expand(2, 2, 4, 4)
        x = x.contiguous().to(target.device)
        w = torch.tensor([1.0, 3.0], dtype=dtype, device=target.device)
        y, _, rstd = target.ops.layer_norm2d_fwd(x, w, None, 0.0, None, 3, LEAKY_SLOPE)
        assert torch.equal(rstd.cpu(), torch.ones_like(rstd.cpu()))
        want = F.leaky_relu(torch.tensor(-3.0, dtype=dtype), LEAKY_SLOPE)
        if dtype == torch.float64:  # a float32 slope would give another product
            assert want.item() != -3.0 * torch.tensor(LEAKY_SLOPE, dtype=torch.float32).item()
        assert torch.equal(y[:, 1].cpu(), want.expand(2, 4, 4)), (dtype, y[0, 1, 0, 0].item())


# The kinks of relu: 0, and of relu6: 0 and 6.
def _kink_bias(x, w, kink):
    """A bias that puts z = xhat * w + b within rounding of `kink` at the first position of every
    channel (float64 statistics): z's sign there is decided by the last bit of the kernel's
    arithmetic."""
    x64 = x.detach().to("cpu", torch.float64)
    mean = x64.mean(1, keepdim=True)
    rstd = (((x64 - mean) ** 2).mean(1, keepdim=True) + EPS).rsqrt()
    xhat0 = ((x64 - mean) * rstd)[0, :, 0, 0]
    return (kink - xhat0 * w.detach().to("cpu", torch.float64)).to(x.dtype).to(x.device)


KINKS = [(1, 0.0), (2, 0.0), (2, 6.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("code,kink", KINKS, ids=[f"{ACTS[c][0]}-{k:g}" for c, k in KINKS])
@pytest.mark.parametrize("c,fmt", [(300, None), (4100, None), (300, torch.channels_last)],
                         ids=["c300", "c4100-wide", "c300-rows"])
def test_backward_mask_is_the_forwards(target, dtype, code, kink, c, fmt):
    """Near a kink the backward's derivative mask is the one the forward's output shows: the
    backward recomputes z bit for bit (kernels/pack.cuh affine_z), the wide-C backward (sums in
    the workspace) and the channels_last rows included. Checked exactly with integer dy: dbias =
    sum over positions of dy where 0 < y < 6 (relu6) / 0 < y (relu)."""
    dev = target.device
    x = _randn(dev, (1, c, 1, 2), dtype, 2.0, 0.5, seed=13)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    w = _randn(dev, (c,), dtype, 0.5, 1.0, seed=14)
    b = _kink_bias(x, w, kink)
    y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS, None, code, 0.0)
    g = torch.Generator().manual_seed(15)
    dy = torch.randint(1, 9, x.shape, generator=g).to(dtype).to(dev)
    dy = dy.contiguous(memory_format=fmt) if fmt is not None else dy
    _, _, db = target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [False, False, True], b, code, 0.0)
    y64, dy64 = y.detach().to("cpu", torch.float64), dy.to("cpu", torch.float64)
    live = (y64 > 0) & (y64 < 6) if code == 2 else y64 > 0
    want = (dy64 * live).sum((0, 2, 3))
    near = (y64[0, :, 0, 0] - kink).abs() < 1e-4
    assert near.sum() > c // 4, "the test data is not near the kink"
    assert torch.equal(db.to("cpu", torch.float64), want), \
        f"{int((db.cpu().double() != want).sum())} channels' masks differ from the forward's"


@pytest.mark.parametrize("code", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("c,fmt", [(5, None), (300, None), (4100, None), (5, torch.channels_last)],
                         ids=["c5", "c300", "c4100-wide", "c5-rows"])
def test_nan_z_passes_dy_as_torch(target, code, c, fmt):
    """A NaN z (here: a NaN bias of channel 0) passes dy, as torch's relu / relu6 backward
    (threshold_backward; hardtanh_backward's CUDA kernel and its CPU scalar path) zero only
    z <= 0 (and z >= 6): every gradient stays finite. Reference: float64 autograd of the norm,
    fed dz by those formulas (torch's CPU hardtanh_backward gives 0 for a NaN in its vectorized
    path)."""
    dev = target.device
    x = _randn(dev, (2, c, 2, 2), torch.float32, 2.0, 0.5, seed=16)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    w, b = _params(dev, c, torch.float32, 16)
    b[0] = float("nan")
    dy = _randn(dev, x.shape, torch.float32, seed=17)
    dy = dy.contiguous(memory_format=fmt) if fmt is not None else dy
    y, mean, rstd = target.ops.layer_norm2d_fwd(x, w, b, EPS, None, code, 0.0)
    assert torch.isnan(y[:, 0]).all()
    dx, dw, db = target.ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, True, True], b, code,
                                             0.0)
    x64, w64, b64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (x, w, b))
    mu = x64.mean(1, keepdim=True)
    xhat = (x64 - mu) / (((x64 - mu) ** 2).mean(1, keepdim=True) + EPS).sqrt()
    z = xhat * w64.reshape(1, -1, 1, 1) + b64.reshape(1, -1, 1, 1)
    dy64 = dy.detach().to("cpu", torch.float64)
    off = (z <= 0) | (z >= 6) if code == 2 else z <= 0
    z.backward(dy64.masked_fill(off, 0))
    # all of dy reached the NaN z
    torch.testing.assert_close(b64.grad[0], dy64[:, 0].sum(), rtol=1e-12, atol=0)
    _check(dx, x64.grad, torch.float32, 1, "dx")
    _check(dw, w64.grad, torch.float32, 1, "dweight")
    _check(db, b64.grad, torch.float32, 1, "dbias")
