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
LEAKY_SLOPE_F64 = 0.125
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
    """leaky_relu's negative_slope. The kernels hold it as a float (Activation::param), so for
    float64 the test takes a slope float32 represents exactly (0.2 would be 1.5e-9 off)."""
    if code != 3:
        return 0.0
    return LEAKY_SLOPE_F64 if dtype == torch.float64 else LEAKY_SLOPE


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
