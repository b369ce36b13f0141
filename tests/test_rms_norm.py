"""fastnorm.RMSNorm and fastnorm.functional.rms_norm against torch.nn.RMSNorm / F.rms_norm and an
independent float64 formula: every float dtype, awkward shapes, with and without weight, eps None
and given, outputs and gradients, on the op path (the fastnorm:: ops) and the CPU fast path;
autocast, opcheck, gradcheck/gradgradcheck, forward AD, torch.compile, torch.func, state_dict,
convert(), errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

import fastnorm
import fastnorm.functional as FN
from conftest import assert_close_scaled, mentions_shape

ops = torch.ops.fastnorm
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (input shape, normalized_shape): widths 1, odd, prime, an empty batch, multi-dim shapes
SHAPES = [((4, 8), [8]), ((3, 1), [1]), ((2, 5, 7), [7]), ((1, 131), [131]), ((0, 6), [6]),
          ((2, 3, 4, 5), [4, 5]), ((6,), [6]), ((2, 3, 5), [3, 5]), ((2, 0, 3), [3])]
SHAPE_IDS = ["x".join(map(str, s)) + "-" + "x".join(map(str, n)) for s, n in SHAPES]


@pytest.fixture(params=["op", "fast"])
def path(request):
    """The fastnorm:: ops (CPU fast path off) or the CPU fast path (ATen's own rms_norm)."""
    was = FN.set_cpu_fast_path(request.param == "fast")
    yield request.param
    FN.set_cpu_fast_path(was)


def ref_rms_norm(x, shape, weight, eps):
    """float64: x / sqrt(mean(x^2) + eps) * weight, eps=None -> the computation dtype's eps."""
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    dims = list(range(x.dim() - len(shape), x.dim()))
    xd = x.detach().double()
    y = xd / torch.sqrt((xd * xd).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight.detach().double()


def _ref_grads(x, shape, weight, eps, g):
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.detach().double().requires_grad_()
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    dims = list(range(x.dim() - len(shape), x.dim()))
    y = xd * torch.rsqrt((xd * xd).mean(dims, keepdim=True) + eps)
    if wd is not None:
        y = y * wd
    return torch.autograd.grad(y, [xd] + ([wd] if wd is not None else []), g.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_matches_torch_and_float64(dtype, shape, ns, affine, eps, path):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.3).to(dtype).requires_grad_()
    w = (torch.rand(ns, dtype=torch.float64) + 0.5).to(dtype).requires_grad_() if affine else None
    y = FN.rms_norm(x, ns, w, eps)
    xt = x.detach().clone().requires_grad_()
    wt = None if w is None else w.detach().clone().requires_grad_()
    yt = F.rms_norm(xt, ns, wt, eps)
    assert y.dtype == yt.dtype == dtype and y.shape == yt.shape
    assert_close_scaled(y, yt, dtype, msg="vs torch")
    assert_close_scaled(y.double(), ref_rms_norm(x, ns, w, eps), dtype, msg="vs float64")
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [x] + ([w] if affine else []), g)
    want = torch.autograd.grad(yt, [xt] + ([wt] if affine else []), g)
    ref = _ref_grads(x, ns, w, eps, g)
    for name, a, b, r in zip(("input", "weight"), got, want, ref):
        assert a.dtype == b.dtype
        assert_close_scaled(a, b, dtype, factor=4, msg=f"{name} grad vs torch")
        assert_close_scaled(a.double(), r, dtype, factor=4, msg=f"{name} grad vs float64")


@pytest.mark.parametrize("xd,wd", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                   (torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                   (torch.bfloat16, torch.float16), (torch.float32, torch.float64)],
                         ids=str)
def test_mixed_dtypes_as_torch(xd, wd, path):
    """Output in the input's dtype whatever the weight's (torch's rule); gradients in each
    tensor's own dtype. Pairs the op does not take run ATen's own rms_norm."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, dtype=xd, requires_grad=True)
    w = (torch.rand(9) + 0.5).to(wd).requires_grad_()
    y = FN.rms_norm(x, [9], w)
    yt = F.rms_norm(x, [9], w)
    assert y.dtype == yt.dtype == xd
    assert_close_scaled(y, yt, xd)
    g = torch.randn_like(y)
    a = torch.autograd.grad(y, (x, w), g)
    b = torch.autograd.grad(yt, (x, w), g)
    for p, q in zip(a, b):
        assert p.dtype == q.dtype
        assert_close_scaled(p, q, torch.bfloat16 if torch.bfloat16 in (xd, wd) else
                            torch.float16 if torch.float16 in (xd, wd) else torch.float32, factor=4)


def test_eps_default_is_computation_dtype_epsilon():
    """torch uses float32's epsilon for half inputs (not float16's): visible on tiny inputs."""
    for dt in DTYPES:
        x = torch.full((2, 4), 1e-4, dtype=dt)
        for p in (True, False):
            was = FN.set_cpu_fast_path(p)
            try:
                y = FN.rms_norm(x, [4])
            finally:
                FN.set_cpu_fast_path(was)
            assert_close_scaled(y, F.rms_norm(x, [4]), dt)
            assert_close_scaled(y.double(), ref_rms_norm(x, [4], None, None), dt)
            # float16's own epsilon would give a visibly different result
            wrong = ref_rms_norm(x, [4], None, torch.finfo(dt).eps)
            assert dt not in (torch.float16, torch.bfloat16) or not torch.allclose(
                y.double(), wrong, rtol=1e-2)


def test_autocast_cpu_bf16(path):
    """CPU autocast leaves rms_norm alone (no cast policy): dtypes as torch's."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    w = torch.rand(16) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for xx, ww in ((x, w), (x.bfloat16(), w), (x.bfloat16(), w.bfloat16())):
            y, yt = FN.rms_norm(xx, [16], ww), F.rms_norm(xx, [16], ww)
            assert y.dtype == yt.dtype
            assert_close_scaled(y, yt, yt.dtype)
        lin = nn.Linear(16, 16)
        h = lin(x)  # bf16 under autocast
        y = FN.rms_norm(h, [16], w)
        assert y.dtype == F.rms_norm(h, [16], w).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------
def _fwd_cases():
    torch.manual_seed(0)
    w = torch.rand(6) + 0.5
    return {
        "affine": (torch.randn(4, 5, 6, requires_grad=True), [6], w.requires_grad_(), 1e-6),
        "noweight": (torch.randn(4, 6, requires_grad=True), [6], None, 1e-5),
        "multidim": (torch.randn(3, 5, 6, requires_grad=True), [5, 6],
                     (torch.rand(5, 6) + 0.5).requires_grad_(), 1e-3),
        "bf16-fp32w": (torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True), [6],
                       (torch.rand(6) + 0.5).requires_grad_(), 1e-6),
        "bf16-out-fp32": (torch.randn(4, 6, dtype=torch.bfloat16), [6], torch.rand(6), 1e-6,
                          torch.float32),
        "fp64": (torch.randn(3, 6, dtype=torch.float64, requires_grad=True), [6],
                 torch.rand(6, dtype=torch.float64).requires_grad_(), 1e-5),
        "noncontig": (torch.randn(6, 4).t(), [6], w.detach(), 1e-5),
        "empty-rows": (torch.randn(0, 6), [6], w.detach(), 1e-5),
    }


@pytest.mark.parametrize("case", list(_fwd_cases()))
def test_opcheck_fwd(case):
    torch.library.opcheck(ops.rms_norm_fwd.default, _fwd_cases()[case])


@pytest.mark.parametrize("case", ["affine", "noweight", "multidim", "bf16-fp32w", "fp64", "noncontig"])
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]], ids=str)
def test_opcheck_bwd(case, mask):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _fwd_cases()[case]]
    x, ns, w = args[0], args[1], args[2]
    y, rstd = ops.rms_norm_fwd(*args)
    assert rstd.shape == (x.numel() // x.shape[-1] if len(ns) == 1 else x.shape[0],)
    assert rstd.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    m = [mask[0], mask[1] and w is not None]
    dx, dw = ops.rms_norm_bwd(torch.randn_like(y), x, rstd, w, ns, m)
    if not m[1]:
        assert dw.shape == (0,)
    if not m[0]:
        assert dx.shape == (0,)
    torch.library.opcheck(ops.rms_norm_bwd.default, (torch.randn_like(y), x, rstd, w, ns, m))


def test_op_bad_out_dtype():
    with pytest.raises(RuntimeError, match="out_dtype"):
        ops.rms_norm_fwd(torch.randn(2, 4), [4], None, 1e-5, torch.float16)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("ns", [[5], [3, 5]], ids=str)
def test_gradcheck_gradgradcheck_forward_ad(affine, ns):
    FN.set_cpu_fast_path(False)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(ns, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
        args = (x, w) if affine else (x,)

        def fn(x, w=None):
            return FN.rms_norm(x, ns, w, 1e-4)

        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, args)
        # the direct op call is differentiable too (torch.library.register_autograd)
        assert torch.autograd.gradcheck(lambda x, *w: ops.rms_norm_fwd(x, ns, w[0] if w else None,
                                                                        1e-4)[0], args)
    finally:
        FN.set_cpu_fast_path(True)


# ----------------------------------------------------------------------------------------------
# module: parity, state_dict, convert
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(eps=1e-3), dict(elementwise_affine=False)], ids=str)
def test_module_parity(dtype, kw, path):
    torch.manual_seed(0)
    t = nn.RMSNorm([3, 7], **kw)
    f = fastnorm.RMSNorm([3, 7], **kw)
    assert isinstance(f, nn.RMSNorm)
    if t.weight is not None:
        with torch.no_grad():
            t.weight.uniform_(0.5, 1.5)
    f.load_state_dict(t.state_dict())
    t.to(dtype)
    f.to(dtype)
    x = torch.randn(4, 3, 7, dtype=dtype)
    xt, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yf = t(xt), f(xf)
    assert yf.dtype == yt.dtype
    assert_close_scaled(yf, yt, dtype)
    g = torch.randn_like(yt)
    yt.backward(g)
    yf.backward(g)
    assert_close_scaled(xf.grad, xt.grad, dtype, factor=4)
    if t.weight is not None:
        assert_close_scaled(f.weight.grad, t.weight.grad, dtype, factor=4)
    assert repr(f).replace("fastnorm.", "") == repr(t) or f.extra_repr() == t.extra_repr()


def test_module_int_shape_and_factory_kwargs():
    f = fastnorm.RMSNorm(8, device="cpu", dtype=torch.float64)
    t = nn.RMSNorm(8, device="cpu", dtype=torch.float64)
    assert f.normalized_shape == t.normalized_shape == (8,) and f.eps is None
    assert f.weight.dtype == torch.float64
    x = torch.randn(2, 8, dtype=torch.float64) * 1e-5  # eps=None matters at this scale
    assert_close_scaled(f(x), t(x), torch.float64)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    t = nn.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
    f = fastnorm.RMSNorm(6, eps=1e-5)
    f.load_state_dict(t.state_dict())
    sd = f.state_dict()
    assert list(sd) == list(t.state_dict()) == ["weight"]
    t2 = nn.RMSNorm(6, eps=1e-5)
    t2.load_state_dict(sd)
    assert torch.equal(t2.weight, t.weight)
    x = torch.randn(3, 6)
    assert_close_scaled(f(x), t(x), torch.float32)


def test_convert_and_revert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Sequential(nn.RMSNorm([2, 4], eps=1e-3)))
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model[2](model[1](model[0](x)).view(5, 2, 4))
    params = [p for p in model.parameters()]
    fastnorm.convert(model)
    assert type(model[1]) is fastnorm.RMSNorm and type(model[2][0]) is fastnorm.RMSNorm
    assert [p for p in model.parameters()] == params  # same Parameter objects
    assert [n for n, _ in fastnorm.converted_modules(model)] == ["1", "2.0"]
    with torch.no_grad():
        got = model[2](model[1](model[0](x)).view(5, 2, 4))
    assert_close_scaled(got, want, torch.float32)
    fastnorm.revert(model)
    assert type(model[1]) is nn.RMSNorm


# ----------------------------------------------------------------------------------------------
# torch.compile, torch.func
# ----------------------------------------------------------------------------------------------
def test_compile_fullgraph_module_and_function():
    torch.manual_seed(0)
    f = fastnorm.RMSNorm([4, 6])
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)
    t = nn.RMSNorm([4, 6])
    t.load_state_dict(f.state_dict())
    x = torch.randn(3, 4, 6)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yt = cf(xf), t(xt)
    assert_close_scaled(yf, yt, torch.float32)
    yf.sum().backward()
    yt.sum().backward()
    assert_close_scaled(xf.grad, xt.grad, torch.float32)
    assert_close_scaled(f.weight.grad, t.weight.grad, torch.float32)
    fn = torch.compile(lambda x, w: FN.rms_norm(x, [6], w, 1e-5), fullgraph=True, backend="aot_eager")
    w = torch.rand(6) + 0.5
    assert_close_scaled(fn(x, w), F.rms_norm(x, [6], w, 1e-5), torch.float32)


def test_compile_inductor_keeps_op():
    """The fastnorm:: op stays in the graph under the default backend (inductor)."""
    torch._dynamo.reset()
    x, w = torch.randn(5, 8), torch.rand(8) + 0.5
    fn = torch.compile(lambda x, w: FN.rms_norm(x, [8], w) * 2, fullgraph=True)
    assert_close_scaled(fn(x, w), F.rms_norm(x, [8], w) * 2, torch.float32)


@pytest.mark.parametrize("xb,wb", [(True, False), (True, True), (False, True)], ids=str)
def test_vmap(xb, wb, no_vmap_fallback):
    torch.manual_seed(0)
    B = 3
    x = torch.randn(B, 4, 5, dtype=torch.float64) if xb else torch.randn(4, 5, dtype=torch.float64)
    w = torch.rand(B, 5, dtype=torch.float64) + 0.5 if wb else torch.rand(5, dtype=torch.float64) + 0.5
    fn = lambda x, w: FN.rms_norm(x, [5], w, 1e-5)  # noqa: E731
    got = vmap(fn, in_dims=(0 if xb else None, 0 if wb else None))(x, w)
    want = torch.stack([F.rms_norm(x[i] if xb else x, [5], w[i] if wb else w, 1e-5) for i in range(B)])
    assert_close_scaled(got, want, torch.float64)
    # per-sample gradients (vmap of grad) through the backward op's batching rule
    gfn = grad(lambda x, w: (FN.rms_norm(x, [5], w, 1e-5) ** 2).sum(), argnums=(0, 1))
    gx, gw = vmap(gfn, in_dims=(0 if xb else None, 0 if wb else None))(x, w)
    for i in range(B):
        xi = (x[i] if xb else x).clone().requires_grad_()
        wi = (w[i] if wb else w).clone().requires_grad_()
        ex, ew = torch.autograd.grad((F.rms_norm(xi, [5], wi, 1e-5) ** 2).sum(), (xi, wi))
        assert_close_scaled(gx[i], ex, torch.float64)
        assert_close_scaled(gw[i], ew, torch.float64)


def test_jvp_and_grad():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    _, got = jvp(lambda x, w: FN.rms_norm(x, [6], w), (x, w), (tx, tw))
    _, want = jvp(lambda x, w: F.rms_norm(x, [6], w), (x, w), (tx, tw))
    assert_close_scaled(got, want, torch.float64)
    g = grad(lambda x: FN.rms_norm(x, [6], w).sin().sum())(x)
    e = grad(lambda x: F.rms_norm(x, [6], w).sin().sum())(x)
    assert_close_scaled(g, e, torch.float64)


# ----------------------------------------------------------------------------------------------
# errors: torch's exception types, the shapes in the message
# ----------------------------------------------------------------------------------------------
def _both_raise(exc, fn_args):
    with pytest.raises(exc) as ours:
        FN.rms_norm(*fn_args)
    with pytest.raises(exc):
        F.rms_norm(*fn_args)
    return str(ours.value)


@pytest.mark.parametrize("p", [True, False], ids=["fast", "op"])
def test_errors(p):
    was = FN.set_cpu_fast_path(p)
    try:
        x = torch.randn(3, 8)
        msg = _both_raise(RuntimeError, (x, [7]))
        assert mentions_shape(msg, (3, 8)) and "7" in msg
        msg = _both_raise(RuntimeError, (x, [8], torch.ones(7)))
        assert mentions_shape(msg, (7,)) and mentions_shape(msg, (8,))
        _both_raise(RuntimeError, (x, [8], torch.ones(1, 8)))
        _both_raise(RuntimeError, (x, []))
        msg = _both_raise(ValueError, (x, [2, 3, 8]))
        _both_raise(NotImplementedError, (x.long(), [8]))
        _both_raise(TypeError, (x, 8))
        assert not x.requires_grad
    finally:
        FN.set_cpu_fast_path(was)
