"""AdaIN (fastnorm.functional.adaptive_instance_norm, fastnorm.AdaptiveInstanceNorm) against a
float64 reference written here from the formula AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) +
mu(y), sigma = sqrt(var + eps): outputs and both gradients; content and style of different
spatial sizes; awkward sizes; every float dtype; NCHW and channels_last; gradcheck; compile;
errors."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fastnorm
from conftest import assert_close_scaled

FN = fastnorm.functional
CL = torch.channels_last
CL3 = torch.channels_last_3d
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def ref_adain(content, style, eps=1e-5, unbiased=True):
    n, c = content.shape[:2]
    cf, sf = content.reshape(n, c, -1), style.reshape(n, c, -1)
    c_mean = cf.mean(-1, keepdim=True)
    c_std = (cf.var(-1, keepdim=True, unbiased=unbiased) + eps).sqrt()
    s_mean = sf.mean(-1, keepdim=True)
    s_std = (sf.var(-1, keepdim=True, unbiased=unbiased) + eps).sqrt()
    return ((cf - c_mean) / c_std * s_std + s_mean).reshape(content.shape)


def _t(shape, dtype, fmt=None, scale=2.0, offset=0.5):
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def compare(cshape, sshape, dtype, fmt=None, eps=1e-5, unbiased=True, module=False):
    content = _t(cshape, dtype, fmt).requires_grad_()
    style = _t(sshape, dtype, fmt, scale=3.0, offset=-1.0).requires_grad_()
    g = _t(cshape, dtype, offset=0.0)
    if module:
        y = fastnorm.AdaptiveInstanceNorm(eps, unbiased)(content, style)
    else:
        y = FN.adaptive_instance_norm(content, style, eps, unbiased)
    assert y.dtype == dtype and y.shape == content.shape
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)
    y.backward(g)
    c64 = content.detach().double().requires_grad_()
    s64 = style.detach().double().requires_grad_()
    yr = ref_adain(c64, s64, eps, unbiased)
    dc, ds = torch.autograd.grad(yr, (c64, s64), g.double())
    msg = f"{cshape} {sshape} {dtype} unbiased={unbiased}"
    assert_close_scaled(y.double(), yr, dtype, msg=msg + ": y")
    assert_close_scaled(content.grad.double(), dc, dtype, factor=4, msg=msg + ": dcontent")
    assert_close_scaled(style.grad.double(), ds, dtype, factor=4, msg=msg + ": dstyle")
    assert content.grad.dtype == style.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cshape,sshape", [
    ((2, 3, 8, 8), (2, 3, 8, 8)),
    ((2, 13, 5, 7), (2, 13, 9, 3)),     # different spatial sizes
    ((1, 1, 4, 6), (1, 1, 3, 3)),       # N = 1, C = 1
    ((3, 5, 11), (3, 5, 4)),            # (N, C, L)
    ((2, 3, 2, 3, 4), (2, 3, 3, 3, 3)), # (N, C, D, H, W)
])
@pytest.mark.parametrize("unbiased", [True, False])
def test_matches_reference(cshape, sshape, dtype, unbiased):
    compare(cshape, sshape, dtype, unbiased=unbiased)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,cshape,sshape", [(CL, (2, 13, 5, 6), (2, 13, 7, 4)),
                                               (CL3, (2, 5, 2, 3, 4), (2, 5, 3, 2, 2))])
def test_channels_last(fmt, cshape, sshape, dtype):
    compare(cshape, sshape, dtype, fmt)


def test_mixed_layouts_and_module():
    """channels_last content with a contiguous style (and the module form, other eps)."""
    content = _t((2, 3, 5, 6), torch.float32, CL).requires_grad_()
    style = _t((2, 3, 4, 4), torch.float32).requires_grad_()
    y = fastnorm.AdaptiveInstanceNorm(eps=1e-3)(content, style)
    assert y.is_contiguous(memory_format=CL)
    assert_close_scaled(y.double(), ref_adain(content.double(), style.double(), 1e-3), torch.float32)
    compare((2, 4, 3, 3), (2, 4, 5, 5), torch.float32, eps=1e-2, module=True)


def test_spatial_one():
    """One position: the biased variance is 0 (y = mu(style) exactly); the unbiased one is NaN,
    as the reference's var() of one value."""
    content, style = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 4, 4)
    y = FN.adaptive_instance_norm(content, style, unbiased=False)
    # scale = sigma(style) / sqrt(eps) is ~1e3 here, and nc_affine's y = x * scale + shift
    # (shift = mu(style) - mu(content) * scale) rounds terms of that size in float32
    assert_close_scaled(y, ref_adain(content, style, unbiased=False), factor=30)
    assert_close_scaled(y.flatten(1), style.mean((2, 3)), factor=30)
    assert torch.isnan(FN.adaptive_instance_norm(content, style)).all()
    assert torch.isnan(ref_adain(content, style)).all()


def test_empty_batch():
    content = torch.randn(0, 3, 4, 4, requires_grad=True)
    style = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = FN.adaptive_instance_norm(content, style)
    assert y.shape == content.shape
    y.sum().backward()
    assert content.grad.shape == content.shape and style.grad.shape == style.shape


def test_only_one_input_requires_grad():
    content = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    style = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    FN.adaptive_instance_norm(content, style).sum().backward()
    assert content.grad is not None
    content = content.detach()
    style.requires_grad_()
    g = torch.randn_like(content)
    FN.adaptive_instance_norm(content, style).backward(g)
    s64 = style.detach().requires_grad_()
    (ds,) = torch.autograd.grad(ref_adain(content, s64), s64, g)
    assert_close_scaled(style.grad, ds)


@pytest.mark.parametrize("unbiased", [True, False])
def test_gradcheck(unbiased):
    content = _t((2, 3, 4, 3), torch.float64).requires_grad_()
    style = _t((2, 3, 2, 5), torch.float64, offset=1.0).requires_grad_()

    def f(c, s):
        return FN.adaptive_instance_norm(c, s, 1e-5, unbiased)

    assert torch.autograd.gradcheck(f, (content, style))
    assert torch.autograd.gradgradcheck(f, (content, style))


@pytest.mark.parametrize("fmt", [None, CL])
def test_compile_fullgraph(fmt):
    torch._dynamo.reset()
    mod = fastnorm.AdaptiveInstanceNorm()
    opt = torch.compile(mod, backend="aot_eager", fullgraph=True)
    content = _t((2, 5, 6, 4), torch.float32, fmt)
    style = _t((2, 5, 3, 7), torch.float32, fmt, offset=-1.0)
    g = torch.randn(2, 5, 6, 4)
    res = []
    for call in (mod, opt):
        c, s = content.clone().requires_grad_(), style.clone().requires_grad_()
        y = call(c, s)
        y.backward(g)
        res.append((y.detach(), c.grad, s.grad))
    for a, b in zip(*res):
        assert_close_scaled(b, a)
    torch._dynamo.reset()


@pytest.mark.parametrize("content,style,exc,words", [
    ((2, 3, 4, 4), (2, 4, 4, 4), RuntimeError, ["(2, 3)", "(2, 4, 4, 4)"]),
    ((2, 3, 4, 4), (3, 3, 4, 4), RuntimeError, ["(2, 3)", "(3, 3, 4, 4)"]),
    ((2, 3), (2, 3, 4), ValueError, ["content", "(2, 3)"]),
    ((2, 3, 4), (2, 3), ValueError, ["style", "(2, 3)"]),
])
def test_shape_errors(content, style, exc, words):
    with pytest.raises(exc) as e:
        FN.adaptive_instance_norm(torch.randn(content), torch.randn(style))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_dtype_errors():
    with pytest.raises(RuntimeError, match="float32.*float64"):
        FN.adaptive_instance_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="floating-point.*int64"):
        FN.adaptive_instance_norm(torch.ones(2, 3, 4, dtype=torch.int64), torch.randn(2, 3, 4))
