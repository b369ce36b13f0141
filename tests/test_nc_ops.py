"""The per-(n, c) primitive ops of SwitchNorm, AdaIN and IBN (nc_moments, nc_affine, nc_grad_sums,
nc_affine_grad): values against float64 formulas, dtypes and memory formats of the outputs,
argument errors, and torch.library.opcheck (schema, fake kernel, compile paths)."""
from __future__ import annotations

import pytest
import torch

import fastnorm  # noqa: F401  (registers the ops)
from conftest import assert_close_scaled
from fastnorm.ops import OP_NAMES

ops = torch.ops.fastnorm
CL = torch.channels_last
CL3 = torch.channels_last_3d
NC_OPS = ("nc_moments", "nc_affine", "nc_grad_sums", "nc_affine_grad")

CASES = [  # shape, dtype, memory format
    ((2, 3, 5), torch.float32, None),
    ((3, 13, 4, 7), torch.float32, None),
    ((3, 13, 4, 7), torch.float32, CL),
    ((2, 5, 3, 2, 4), torch.float64, CL3),
    ((2, 3, 1, 1), torch.float16, CL),
    ((1, 1, 9, 3), torch.bfloat16, None),
    ((4, 8, 3, 5), torch.float16, None),
    ((2, 3, 4, 5), torch.float32, "transposed"),
]


def _x(shape, dtype, fmt, device, offset=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(device=device, dtype=dtype)
    if fmt == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)  # neither layout: made contiguous
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _sd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(shape, device, dtype=torch.float32):
    return torch.randn(shape[:2], dtype=torch.float64).to(device=device, dtype=dtype)


def _bc(t, x):
    return t.double().reshape(*t.shape, *([1] * (x.dim() - 2)))


def _fmt_kept(y, x, fmt):
    if fmt in (CL, CL3):
        assert y.is_contiguous(memory_format=fmt)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("shape,dtype,fmt", CASES)
def test_values_and_layouts(shape, dtype, fmt, device):
    torch.manual_seed(0)
    x = _x(shape, dtype, fmt, device)
    sd = _sd(dtype)
    dims = list(range(2, x.dim()))
    x64 = x.double()
    mean, var = ops.nc_moments(x)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == shape[:2]
    assert_close_scaled(mean.double(), x64.mean(dims), sd, msg="mean")
    assert_close_scaled(var.double(), x64.var(dims, correction=0), sd, msg="biased var")

    scale, shift = _stats(shape, device, sd), _stats(shape, device)  # shift cast from fp32
    y = ops.nc_affine(x, scale, shift)
    assert y.dtype == dtype and y.shape == x.shape
    _fmt_kept(y, x, fmt)
    assert_close_scaled(y.double(), x64 * _bc(scale, x) + _bc(shift, x), dtype, msg="affine")

    for dy_dtype in {dtype, torch.float32}:
        dy = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dy_dtype)
        s_dy, s_dyxc = ops.nc_grad_sums(dy, x, mean)
        assert s_dy.dtype == s_dyxc.dtype == sd and s_dy.shape == shape[:2]
        dy64 = dy.double()
        assert_close_scaled(s_dy.double(), dy64.sum(dims), sd, factor=10, msg="sum dy")
        assert_close_scaled(s_dyxc.double(), (dy64 * (x64 - _bc(mean, x))).sum(dims), sd,
                            factor=10, msg="sum dy (x - mean)")
        a, b, c = _stats(shape, device, sd), _stats(shape, device, sd), _stats(shape, device, sd)
        dx = ops.nc_affine_grad(dy, x, mean, a, b, c)
        assert dx.dtype == dtype
        _fmt_kept(dx, x, fmt)
        ref = _bc(a, x) * dy64 + _bc(b, x) * (x64 - _bc(mean, x)) + _bc(c, x)
        assert_close_scaled(dx.double(), ref, dtype, msg="affine grad")
        dx0 = ops.nc_affine_grad(None, x, mean, a, b, c)
        assert_close_scaled(dx0.double(), _bc(b, x) * (x64 - _bc(mean, x)) + _bc(c, x), dtype,
                            msg="affine grad without grad_out")


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4, 4), (2, 3, 0), (2, 3, 0, 5)])
def test_empty(shape, device):
    x = torch.randn(shape, device=device)
    mean, var = ops.nc_moments(x)
    assert mean.shape == shape[:2]
    if mean.numel():  # no positions: NaN, as torch.var_mean
        assert torch.isnan(mean).all() and torch.isnan(var).all()
    st = torch.zeros(shape[:2], device=device)
    assert ops.nc_affine(x, st, st).shape == x.shape
    s1, s2 = ops.nc_grad_sums(torch.zeros_like(x), x, st)
    assert torch.equal(s1, torch.zeros_like(st)) and torch.equal(s2, torch.zeros_like(st))
    assert ops.nc_affine_grad(x, x, st, st, st, st).shape == x.shape


def test_errors(device):
    x = torch.randn(2, 3, 4, device=device)
    st = torch.zeros(2, 3, device=device)
    with pytest.raises(RuntimeError, match=r"rank >= 3.*\[2, 3\]"):
        ops.nc_moments(torch.randn(2, 3, device=device))
    with pytest.raises(RuntimeError, match=r"scale of shape \[2, 3\].*\[3, 2\]"):
        ops.nc_affine(x, st.t(), st)
    with pytest.raises(RuntimeError, match=r"grad_out of the input's shape \[2, 3, 4\].*\[2, 3, 5\]"):
        ops.nc_grad_sums(torch.randn(2, 3, 5, device=device), x, st)
    with pytest.raises(RuntimeError, match=r"float32.*float64"):
        ops.nc_affine_grad(x.double(), x, st, st, st, st)
    with pytest.raises(RuntimeError, match=r"c of shape \[2, 3\].*\[3\]"):
        ops.nc_affine_grad(None, x, st, st, st, st[0])


def test_registered():
    for name in NC_OPS:
        assert f"fastnorm::{name}" in OP_NAMES
        assert hasattr(ops, name)


def _opcheck_cases(device):
    out = []
    for shape, dtype, fmt in CASES[:7]:
        x = _x(shape, dtype, fmt, device)
        sd = _sd(dtype)
        st = [_stats(shape, device, sd) for _ in range(4)]
        dy = torch.randn(shape, device=device).to(dtype)
        out += [("nc_moments", (x,)), ("nc_affine", (x, st[0], st[1])),
                ("nc_grad_sums", (dy, x, st[0])),
                ("nc_affine_grad", (dy, x, *st)), ("nc_affine_grad", (None, x, *st))]
    return out


@pytest.mark.parametrize("i", range(len(_opcheck_cases("cpu"))))
def test_opcheck(i, device):
    torch.manual_seed(0)
    name, args = _opcheck_cases(device)[i]
    torch.library.opcheck(getattr(ops, name).default, args)
