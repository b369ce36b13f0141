"""fastnorm.FrozenBatchNorm2d and fastnorm.functional.frozen_batch_norm against torchvision's
FrozenBatchNorm2d (when installed) and an independent float64 reference.

torchvision computes scale = w * rsqrt(rv + eps) and shift = b - rm * scale in the buffers'
dtype, then x * scale + shift with torch's type promotion; fastnorm computes
(x - rm) * rsqrt(rv + eps) * w + b in float32 (float64 for float64) and rounds once. Outputs are
compared with the float64 reference at the output dtype's tolerance, and with torchvision at a
few of its units in the last place (torchvision's own rounding of scale and shift included).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnorm
import fastnorm.functional as FN
from conftest import TOL, assert_close_scaled, mentions_shape

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# (input dtype, buffer dtype): same-dtype models, the AMP pairs (half input, float32 buffers:
# torchvision's output is float32 by promotion), and the reverse promotions
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (F16, F32), (BF16, F32),
               (F32, F16), (F32, BF16), (F64, F32), (BF16, F16)]
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 13, 1, 9), (2, 8, 4, 4), (5, 17, 3, 2), (1, 19, 11, 1),
          (0, 4, 3, 3), (2, 5, 0, 3)]


@pytest.fixture(params=["fast_path", "op_path"])
def cpu_path(request):
    """CPU calls through ATen's batch_norm (the fast path) and through the fastnorm:: op (the
    path CUDA tensors, torch.compile and torch.func take)."""
    was = FN.set_cpu_fast_path(request.param == "fast_path")
    yield request.param
    FN.set_cpu_fast_path(was)


def _randomize(m, dtype=F32, mean_offset=0.0):
    """Non-trivial frozen statistics and affine buffers (positive variances)."""
    c = m.weight.numel()
    g = torch.Generator().manual_seed(c)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.3)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.5 + mean_offset)
        m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    return m.to(dtype)


def _reference(x, w, b, rm, rv, eps):
    """float64: (x - rm) / sqrt(rv + eps) * w + b from the values as stored."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    d = lambda t: t.detach().to(F64).reshape(shape)  # noqa: E731
    return (x.detach().to(F64) - d(rm)) / torch.sqrt(d(rv) + eps) * d(w) + d(b)


def _input(shape, dtype, device, channels_last, offset=0.0):
    x = (torch.randn(shape, device=device) * 2 + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _same_format(y, x):
    if x.dim() == 4 and x.numel() and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    else:
        assert y.is_contiguous(), y.stride()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("xd,bd", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_forward_matches_reference_and_torchvision(xd, bd, shape, channels_last, device, cpu_path):
    c = shape[1]
    m = _randomize(fastnorm.FrozenBatchNorm2d(c, eps=1e-4), bd).to(device)
    x = _input(shape, xd, device, channels_last)
    y = m(x)
    out_dtype = torch.promote_types(xd, bd)
    assert y.dtype == out_dtype and y.shape == x.shape
    _same_format(y, x)
    ref = _reference(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    assert_close_scaled(y.to(F64), ref, out_dtype, factor=2, msg="vs float64 reference")
    try:
        tv_cls = __import__("torchvision.ops", fromlist=["FrozenBatchNorm2d"]).FrozenBatchNorm2d
    except ImportError:
        return
    tv = tv_cls(c, eps=1e-4).to(device, bd)
    tv.load_state_dict(m.state_dict())
    yt = tv(x)
    assert yt.dtype == y.dtype and yt.shape == y.shape
    # torchvision rounds scale and shift to the buffers' dtype (float16: 2**-11, bfloat16: 2**-8
    # relative) before multiplying: its error bound is the larger of the two dtypes'
    tol_dtype = max((out_dtype, bd), key=lambda d: TOL[d][0])
    assert_close_scaled(y, yt, tol_dtype, factor=4, msg="vs torchvision")
    if x.numel():
        _same_format(yt, x)  # torchvision's elementwise ops keep the format too


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("xd,bd", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_gradient_to_input_only(xd, bd, channels_last, device, cpu_path):
    shape = (3, 7, 5, 3)
    m = _randomize(fastnorm.FrozenBatchNorm2d(7), bd).to(device)
    x = _input(shape, xd, device, channels_last).requires_grad_()
    y = m(x)
    g = torch.randn(y.shape, device=device, dtype=y.dtype)
    (dx,) = torch.autograd.grad(y, x, g)
    assert dx.dtype == xd and dx.shape == x.shape
    _same_format(dx, x)
    assert all(b.grad is None and not b.requires_grad for b in m.buffers())
    assert list(m.parameters()) == []
    shape1 = [1, -1, 1, 1]
    ref = (g.to(F64) * m.weight.to(F64).reshape(shape1)
           / torch.sqrt(m.running_var.to(F64).reshape(shape1) + m.eps))
    assert_close_scaled(dx.to(F64), ref, max((xd, bd), key=lambda d: TOL[d][0]), factor=2)
    try:
        tv_cls = __import__("torchvision.ops", fromlist=["FrozenBatchNorm2d"]).FrozenBatchNorm2d
    except ImportError:
        return
    tv = tv_cls(7).to(device, bd)
    tv.load_state_dict(m.state_dict())
    (dxt,) = torch.autograd.grad(tv(x), x, g)
    assert dxt.dtype == dx.dtype
    assert_close_scaled(dx, dxt, max((xd, bd), key=lambda d: TOL[d][0]), factor=4)


def test_train_and_eval_identical_and_nothing_updated(device):
    m = _randomize(fastnorm.FrozenBatchNorm2d(6)).to(device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = _input((4, 6, 3, 5), F32, device, False)
    m.train()
    y_train = m(x)
    m.eval()
    y_eval = m(x)
    assert torch.equal(y_train, y_eval)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_buffers_state_dict_and_repr():
    m = fastnorm.FrozenBatchNorm2d(5, eps=1e-3)
    assert [n for n, _ in m.named_buffers()] == ["weight", "bias", "running_mean", "running_var"]
    assert list(m.parameters()) == []
    assert torch.equal(m.weight, torch.ones(5)) and torch.equal(m.bias, torch.zeros(5))
    assert torch.equal(m.running_mean, torch.zeros(5)) and torch.equal(m.running_var, torch.ones(5))
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert repr(m) == "FrozenBatchNorm2d(5, eps=0.001)"
    tv_cls = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d
    assert repr(m) == repr(tv_cls(5, eps=1e-3))
    assert list(tv_cls(5).state_dict()) == list(m.state_dict())


@pytest.mark.parametrize("with_counter", [True, False])
def test_load_state_dict_from_torchvision_and_batchnorm(with_counter):
    tv_cls = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d
    tv = _randomize(tv_cls(4))
    sd = dict(tv.state_dict())
    if with_counter:  # a checkpoint written by a BatchNorm2d (torchvision's detection weights)
        sd["num_batches_tracked"] = torch.tensor(7)
    kept = dict(sd)
    m = fastnorm.FrozenBatchNorm2d(4)
    result = m.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sd.keys() == kept.keys()  # the caller's dict is not modified
    for k, v in m.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    # and back: torchvision loads fastnorm's
    tv2 = tv_cls(4)
    tv2.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert_close_scaled(m(x), tv2(x), F32)


def test_load_state_dict_of_a_batchnorm2d_model():
    """A backbone trained with BatchNorm2d, loaded for fine-tuning with frozen norms."""
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    src(torch.randn(8, 3, 6, 6))  # real running statistics, num_batches_tracked = 1
    dst = nn.Sequential(nn.Conv2d(3, 4, 3), fastnorm.FrozenBatchNorm2d(4))
    res = dst.load_state_dict(src.state_dict(), strict=True)
    assert res.missing_keys == [] and res.unexpected_keys == []
    src.eval()
    x = torch.randn(2, 3, 6, 6)
    assert_close_scaled(dst(x), src(x), F32)


def test_wrong_keys_still_reported():
    m = fastnorm.FrozenBatchNorm2d(4)
    sd = {k: v for k, v in m.state_dict().items() if k != "running_var"}
    sd["extra"] = torch.ones(1)
    res = m.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["running_var"] and res.unexpected_keys == ["extra"]
    with pytest.raises(RuntimeError, match="running_var"):
        m.load_state_dict(sd)


def test_autocast_keeps_torchvision_dtype():
    """mul and add are not autocast ops: the output dtype is type promotion's, as torchvision's."""
    tv_cls = pytest.importorskip("torchvision.ops").FrozenBatchNorm2d
    m = _randomize(fastnorm.FrozenBatchNorm2d(3))
    tv = tv_cls(3)
    tv.load_state_dict(m.state_dict())
    for xd in (F32, BF16):
        x = torch.randn(2, 3, 4, 4).to(xd)
        with torch.autocast("cpu", dtype=BF16):
            y, yt = m(x), tv(x)
        assert y.dtype == yt.dtype == F32
        assert_close_scaled(y, yt, xd)
    m16 = copy.deepcopy(m).to(BF16)
    tv.to(BF16)
    x = torch.randn(2, 3, 4, 4, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        y, yt = m16(x), tv(x)
    assert y.dtype == yt.dtype == BF16
    assert_close_scaled(y, yt, BF16, factor=2)


def test_large_running_mean_no_cancellation():
    """(x - rm) first: fastnorm stays accurate where torchvision's x*scale + (b - rm*scale)
    cancels (both compared with float64)."""
    m = fastnorm.FrozenBatchNorm2d(3)
    with torch.no_grad():
        m.running_mean.fill_(1000.0)
        m.running_var.fill_(4.0)
    x = 1000.0 + torch.randn(2, 3, 4, 4)
    ref = _reference(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    torch.testing.assert_close(m(x).to(F64), ref, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the functional
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (2, 3, 4, 5), (1, 2, 3, 2, 3), (0, 3, 2)])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_functional_any_rank_and_optional_affine(shape, affine, device, cpu_path):
    c = shape[1]
    w = torch.rand(c, device=device) + 0.5 if affine in ("both", "weight") else None
    b = torch.randn(c, device=device) if affine in ("both", "bias") else None
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.2
    x = torch.randn(shape, device=device)
    y = FN.frozen_batch_norm(x, w, b, rm, rv, eps=1e-3)
    ref = _reference(x, torch.ones(c) if w is None else w, torch.zeros(c) if b is None else b,
                     rm, rv, 1e-3)
    assert y.shape == x.shape and y.dtype == F32
    assert_close_scaled(y.to(F64), ref, F32)


def test_functional_gradients_weight_bias_and_running_stats(device):
    """weight and bias get gradients when they require them; running statistics that require
    grad get theirs through torchvision's formula."""
    c = 4
    x = torch.randn(2, c, 3, 2, device=device, dtype=F64, requires_grad=True)
    w = (torch.rand(c, device=device, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(c, device=device, dtype=F64, requires_grad=True)
    rm = torch.randn(c, device=device, dtype=F64)
    rv = torch.rand(c, device=device, dtype=F64) + 0.2
    torch.autograd.gradcheck(lambda x, w, b: FN.frozen_batch_norm(x, w, b, rm, rv, 1e-5),
                             (x, w, b))
    torch.autograd.gradgradcheck(lambda x, w, b: FN.frozen_batch_norm(x, w, b, rm, rv, 1e-5),
                                 (x, w, b))
    rm_, rv_ = rm.clone().requires_grad_(), rv.clone().requires_grad_()
    torch.autograd.gradcheck(lambda x, w, b, rm, rv: FN.frozen_batch_norm(x, w, b, rm, rv, 1e-5),
                             (x, w, b, rm_, rv_))
    g = torch.randn_like(x)
    got = torch.autograd.grad(FN.frozen_batch_norm(x, w, b, rm_, rv_), (x, w, b, rm_, rv_), g)
    shape = [1, c, 1, 1]
    scale = w.reshape(shape) * (rv_.reshape(shape) + 1e-5).rsqrt()
    want = torch.autograd.grad(x * scale + (b.reshape(shape) - rm_.reshape(shape) * scale),
                               (x, w, b, rm_, rv_), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_functional_batched_dims_and_vmap():
    x = torch.randn(3, 2, 4, 5, 5)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.2
    y = torch.func.vmap(lambda t: FN.frozen_batch_norm(t, w, b, rm, rv))(x)
    for i in range(3):
        assert_close_scaled(y[i], FN.frozen_batch_norm(x[i], w, b, rm, rv), F32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_fullgraph(channels_last, device):
    torch._dynamo.reset()
    m = _randomize(fastnorm.FrozenBatchNorm2d(5)).to(device)
    opt = torch.compile(m, backend="aot_eager", fullgraph=True)
    for step, xd in enumerate((F32, F16)):
        x = _input((2, 5, 3, 4), xd, device, channels_last, offset=step).requires_grad_()
        g = torch.randn(x.shape, device=device)
        y = opt(x)
        (dx,) = torch.autograd.grad(y, x, g)
        ye = m(x)
        (dxe,) = torch.autograd.grad(ye, x, g)
        assert y.dtype == ye.dtype == F32
        _same_format(y, x)
        assert_close_scaled(y, ye, F32)
        assert_close_scaled(dx, dxe, xd)
    torch._dynamo.reset()


def test_compile_inductor(device):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fastnorm.FrozenBatchNorm2d(4), nn.ReLU()).to(device)
    _randomize(model[1])
    opt = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 6, 6, device=device)
    assert_close_scaled(opt(x), model(x), F32)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_wrong_channel_count_names_shapes():
    m = fastnorm.FrozenBatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError) as e:
        m(x)
    assert mentions_shape(str(e.value), (2, 3, 5, 5)) and "4" in str(e.value)
    # torchvision broadcasts a single channel to C channels; fastnorm refuses
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 1, 5, 5))


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 4), (1, 4, 2, 2, 2)])
def test_module_wants_4d(shape):
    with pytest.raises(ValueError, match=r"expected 4D input \(got %dD" % len(shape)):
        fastnorm.FrozenBatchNorm2d(4)(torch.randn(shape))


def test_functional_errors():
    c = 3
    ok = dict(weight=torch.ones(c), bias=torch.zeros(c), running_mean=torch.zeros(c),
              running_var=torch.ones(c))
    x = torch.randn(2, c, 4)
    for what in ok:
        bad = dict(ok, **{what: torch.ones(c + 2)})
        with pytest.raises(RuntimeError, match=what) as e:
            FN.frozen_batch_norm(x, **bad)
        assert mentions_shape(str(e.value), (c + 2,)) and mentions_shape(str(e.value), x.shape)
    for what in ("running_mean", "running_var"):
        with pytest.raises(RuntimeError, match=what):
            FN.frozen_batch_norm(x, **dict(ok, **{what: None}))
    with pytest.raises(RuntimeError, match=r"at least 2 dimensions.*\(3,\)"):
        FN.frozen_batch_norm(torch.randn(3), **ok)
    with pytest.raises(NotImplementedError, match="floating"):
        FN.frozen_batch_norm(torch.ones(2, c, 2, dtype=torch.int64), **ok)
    with pytest.raises(RuntimeError, match="floating"):
        FN.frozen_batch_norm(x, **dict(ok, running_var=torch.ones(c, dtype=torch.int64)))


def test_exported():
    assert "FrozenBatchNorm2d" in fastnorm.__all__ and fastnorm.FrozenBatchNorm2d is fastnorm.modules.FrozenBatchNorm2d
    assert "frozen_batch_norm" in FN.__all__
