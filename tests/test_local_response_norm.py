"""LocalResponseNorm: fastnorm.LocalResponseNorm and
fastnorm.functional.local_response_norm against torch.nn.LocalResponseNorm /
F.local_response_norm and an independent float64 reference written here from the formula; both
CPU routes (torch's composition on the eager fast path, the fastnorm:: ops), every float dtype,
3-D to 5-D inputs, channels_last, windows of 1, even and odd sizes and wider than C, C = 1,
spatial size 1, empty inputs; gradients (gradcheck, gradgradcheck, forward AD, torch.func),
the ops (opcheck, fake kernels, vmap rules), torch.compile(fullgraph=True), convert()/revert()
and the errors torch raises."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import fastnorm
from fastnorm import functional as FN
from conftest import EMU_ROUTED, assert_close_scaled, mentions_shape

ops = torch.ops.fastnorm
CL = torch.channels_last
CL3 = torch.channels_last_3d
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ARGS = dict(alpha=0.3, beta=0.75, k=1.2)  # alpha large enough that the window matters


def reference(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """float64 from the definition: b_c = a_c (k + alpha / size * sum_{c' in [c - size // 2,
    c + (size - 1) // 2], 0 <= c' < C} a_c'^2)^-beta."""
    x = x.detach().double()
    c = x.shape[1]
    out = torch.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - size // 2), min(c - 1, ch + (size - 1) // 2)
        s = (x[:, lo:hi + 1] ** 2).sum(1)
        out[:, ch] = x[:, ch] * (k + alpha / size * s) ** -beta
    return out


def reference_grad(x, dy, size, alpha=1e-4, beta=0.75, k=1.0):
    """float64 d(sum(dy * y))/dx by autograd through the definition above."""
    x64 = x.detach().double().requires_grad_()
    c = x.shape[1]
    cols = []
    for ch in range(c):
        lo, hi = max(0, ch - size // 2), min(c - 1, ch + (size - 1) // 2)
        s = (x64[:, lo:hi + 1] ** 2).sum(1)
        cols.append(x64[:, ch] * (k + alpha / size * s) ** -beta)
    y = torch.stack(cols, 1)
    (g,) = torch.autograd.grad(y, x64, dy.detach().double())
    return g


def make_x(shape, device="cpu", dtype=torch.float32, fmt=None, scale=2.0):
    x = (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def fmt_of(x):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=CL):
        return CL
    if x.dim() == 5 and x.is_contiguous(memory_format=CL3):
        return CL3
    return None


@pytest.fixture(params=["fast_path", "op_path"])
def path(request):
    """Both CPU routes: the eager fast path (torch's composition) and the fastnorm:: ops."""
    was = FN.set_cpu_fast_path(request.param == "fast_path")
    yield request.param
    FN.set_cpu_fast_path(was)


@pytest.fixture(autouse=True)
def _dynamo_reset():
    yield
    torch._dynamo.reset()


# (shape, memory format): 3-D to 5-D, C = 1, 3, 13, spatial size 1, channels_last
CASES = [
    ((2, 13, 6), None),
    ((3, 1, 5), None),
    ((2, 3, 4, 5), None),
    ((2, 13, 3, 5), None),
    ((2, 13, 3, 5), CL),
    ((4, 3, 1, 1), None),
    ((1, 13, 1, 1), CL),
    ((2, 1, 3, 3), CL),
    ((2, 5, 2, 3, 2), None),
    ((2, 13, 2, 3, 2), CL3),
    ((2, 4, 2, 1, 3, 2), None),
]
SIZES = [1, 2, 3, 5, 8, 30]  # even and odd; 8 and 30 wider than C in some cases


def _ids(c):
    shape, fmt = c
    return "x".join(map(str, shape)) + {None: "", CL: "-cl", CL3: "-cl3"}[fmt]


# ----------------------------------------------------------------------------------------------
# forward and backward against torch and the float64 reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_and_float64(case, size, dtype, path):
    shape, fmt = case
    x = make_x(shape, dtype=dtype, fmt=fmt).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y = FN.local_response_norm(x, size, **ARGS)
    half = dtype in (torch.float16, torch.bfloat16)
    # torch's CPU pooling has no float16 / bfloat16 kernel at rank >= 4: its float32 result then
    yt = F.local_response_norm(xt.float() if half else xt, size, **ARGS)
    assert y.dtype == dtype and y.shape == x.shape and fmt_of(y) == fmt_of(x)
    ref = reference(x, size, **ARGS)
    assert_close_scaled(y.double(), ref, dtype, msg="y vs float64")
    if not half and EMU_ROUTED:
        # the ops on the emulated CUDA kernels (FASTNORM_EMU_OPS): their window sums, not torch's
        assert_close_scaled(y, yt, dtype, msg="y vs torch")
    elif not half:
        # torch's composition on the fast path; the op's reference runs it in the same dtype
        assert torch.equal(y, yt), "not torch's bits"
    else:  # computed in float32, rounded once
        assert torch.equal(y, yt.to(dtype)), "not float32 rounded once"
    dy = make_x(shape, dtype=dtype, fmt=fmt, scale=1.0)
    (dx,) = torch.autograd.grad(y, x, dy)
    (dxt,) = torch.autograd.grad(yt, xt, dy)
    assert dx.dtype == dtype and fmt_of(dx) == fmt_of(x)
    assert_close_scaled(dx.double(), reference_grad(x, dy, size, **ARGS), dtype,
                        factor=2.0, msg="dx vs float64")
    assert_close_scaled(dx.float(), dxt.float(), dtype, factor=4.0, msg="dx vs torch")


def test_torch_refuses_half_at_rank_4_on_cpu_and_fastnorm_does_not():
    x = make_x((2, 6, 3, 3), dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError):
        F.local_response_norm(x, 3)
    assert_close_scaled(FN.local_response_norm(x, 3).double(), reference(x, 3), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_defaults_alexnet_like(dtype, path):
    """torch.nn's defaults (alpha 1e-4, beta 0.75, k 1), AlexNet's size 5, a larger C."""
    torch.manual_seed(3)
    t, f = nn.LocalResponseNorm(5), fastnorm.LocalResponseNorm(5)
    x = make_x((2, 24, 5, 5), dtype=dtype, scale=10.0)
    assert_close_scaled(f(x).double(), reference(x, 5), dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    assert_close_scaled(f(x).double(), t(x.float() if half else x).double(), dtype)


def test_non_contiguous_input(path):
    """Other stride patterns: a contiguous output with the same values."""
    base = make_x((3, 6, 4, 5), dtype=torch.float64)
    x = base.transpose(2, 3)  # neither contiguous nor channels_last
    y = FN.local_response_norm(x, 3, **ARGS)
    torch.testing.assert_close(y, reference(x, 3, **ARGS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 3, 4), (0, 5, 2, 2), (2, 0, 3, 3), (2, 3, 0), (0, 3, 2, 2, 2)])
def test_empty_input_returned_as_torch_does(shape, path):
    x = torch.empty(shape)
    assert F.local_response_norm(x, 3) is x
    assert FN.local_response_norm(x, 3) is x
    assert fastnorm.LocalResponseNorm(3)(x) is x


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 3, 3)])
def test_empty_ops(shape):
    """The ops on no elements: a fresh empty tensor (ops never alias their inputs)."""
    x = torch.empty(shape)
    y = ops.local_response_norm_fwd(x, 3, 1e-4, 0.75, 1.0)
    assert y.shape == x.shape and y.data_ptr() != x.data_ptr() or y.numel() == 0
    dx = ops.local_response_norm_bwd(x, x, 3, 1e-4, 0.75, 1.0)
    assert dx.shape == x.shape


def test_integer_input_is_torchs():
    """torch's composition accepts integer input (the division gives floats): the same."""
    x = torch.randint(-3, 4, (2, 4, 3))
    torch.testing.assert_close(FN.local_response_norm(x, 3), F.local_response_norm(x, 3))


def test_bigger_values_and_beta_variants(path):
    x = make_x((2, 7, 3, 3), dtype=torch.float64, scale=50.0)
    for alpha, beta, k in ((1e-4, 0.75, 1.0), (1.0, 0.5, 2.0), (0.01, 1.0, 0.5), (0.2, 2.0, 1.0)):
        y = FN.local_response_norm(x, 4, alpha, beta, k)
        torch.testing.assert_close(y, reference(x, 4, alpha, beta, k), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# module, convert / revert
# ----------------------------------------------------------------------------------------------
def test_module_is_torchs_class_with_torchs_arguments():
    m = fastnorm.LocalResponseNorm(5, alpha=2e-4, beta=0.5, k=2.0)
    t = nn.LocalResponseNorm(5, alpha=2e-4, beta=0.5, k=2.0)
    assert isinstance(m, nn.LocalResponseNorm)
    assert repr(m) == repr(t)
    assert (m.size, m.alpha, m.beta, m.k) == (5, 2e-4, 0.5, 2.0)
    assert m.state_dict() == {} and list(m.parameters()) == []


def test_convert_and_revert():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(5, k=2.0),
                          nn.Conv2d(8, 4, 1), nn.LocalResponseNorm(3))
    x = make_x((2, 3, 7, 7))
    expected = model(x)
    lrn = model[2]
    fastnorm.convert(model)
    assert type(model[2]) is fastnorm.LocalResponseNorm and model[2] is lrn
    assert type(model[4]) is fastnorm.LocalResponseNorm
    assert model[2].k == 2.0
    names = [n for n, _ in fastnorm.converted_modules(model)]
    assert "2" in names and "4" in names
    torch.testing.assert_close(model(x), expected)
    fastnorm.revert(model)
    assert type(model[2]) is nn.LocalResponseNorm and type(model[4]) is nn.LocalResponseNorm


# ----------------------------------------------------------------------------------------------
# gradients: gradcheck, gradgradcheck, forward AD, torch.func
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [((2, 5, 3), None), ((2, 4, 2, 3), CL), ((1, 6, 2, 1, 2), None)],
                         ids=_ids)
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_gradcheck_gradgradcheck_float64(case, size):
    shape, fmt = case
    x = make_x(shape, dtype=torch.float64, fmt=fmt, scale=1.5).requires_grad_()

    def fn(t):
        return FN.local_response_norm(t, size, 0.5, 0.75, 1.0)

    was = FN.set_cpu_fast_path(False)
    try:
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
        assert torch.autograd.gradcheck(fn, (x,), check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False)
    finally:
        FN.set_cpu_fast_path(was)


def test_direct_op_call_is_differentiable():
    x = make_x((2, 5, 3), dtype=torch.float64).requires_grad_()
    y = ops.local_response_norm_fwd(x, 3, 0.3, 0.75, 1.2)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, reference_grad(x, torch.ones_like(x), 3, **ARGS))


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
@pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")
def test_func_transforms(fmt, no_vmap_fallback):
    x = make_x((3, 5, 2, 3), dtype=torch.float64, fmt=fmt)

    def loss(f):
        return lambda t: f(t, 3, **ARGS).pow(2).sum()

    ours, theirs = loss(FN.local_response_norm), loss(F.local_response_norm)
    torch.testing.assert_close(grad(ours)(x), grad(theirs)(x))
    # per-sample gradients
    torch.testing.assert_close(vmap(grad(ours))(x.unsqueeze(1)), vmap(grad(theirs))(x.unsqueeze(1)))
    xs = x[:1, :, :1]
    torch.testing.assert_close(jacrev(lambda t: FN.local_response_norm(t, 3, **ARGS))(xs),
                               jacrev(lambda t: F.local_response_norm(t, 3, **ARGS))(xs))
    torch.testing.assert_close(jacfwd(lambda t: FN.local_response_norm(t, 3, **ARGS))(xs),
                               jacfwd(lambda t: F.local_response_norm(t, 3, **ARGS))(xs))
    t = torch.randn_like(x)
    _, a = jvp(lambda u: FN.local_response_norm(u, 3, **ARGS), (x,), (t,))
    _, b = jvp(lambda u: F.local_response_norm(u, 3, **ARGS), (x,), (t,))
    torch.testing.assert_close(a, b)


def test_vmap_rules_of_the_ops_directly(no_vmap_fallback):
    x = make_x((4, 2, 5, 3), dtype=torch.float64)
    dy = make_x((4, 2, 5, 3), dtype=torch.float64)
    y = vmap(lambda t: ops.local_response_norm_fwd(t, 3, 0.3, 0.75, 1.2))(x)
    torch.testing.assert_close(y, torch.stack([reference(t, 3, **ARGS) for t in x]))
    dx = vmap(lambda g, t: ops.local_response_norm_bwd(g, t, 3, 0.3, 0.75, 1.2))(dy, x)
    torch.testing.assert_close(dx, torch.stack([reference_grad(t, g, 3, **ARGS)
                                                for g, t in zip(dy, x)]))
    dx1 = vmap(lambda g: ops.local_response_norm_bwd(g, x[0], 3, 0.3, 0.75, 1.2))(dy)  # x unbatched
    torch.testing.assert_close(dx1, torch.stack([reference_grad(x[0], g, 3, **ARGS) for g in dy]))


# ----------------------------------------------------------------------------------------------
# the ops: opcheck, fake kernels
# ----------------------------------------------------------------------------------------------
OP_CASES = [((2, 5, 3), None, 3, torch.float32), ((2, 6, 3, 4), CL, 5, torch.float32),
            ((2, 3, 2, 2, 2), CL3, 2, torch.float64), ((1, 7, 2, 2), None, 1, torch.bfloat16),
            ((2, 4, 3), None, 9, torch.float16)]


@pytest.mark.parametrize("shape,fmt,size,dtype", OP_CASES,
                         ids=[f"{len(c[0])}d-{c[2]}-{c[3]}" for c in OP_CASES])
def test_opcheck(shape, fmt, size, dtype):
    x = make_x(shape, dtype=dtype, fmt=fmt)
    dy = make_x(shape, dtype=dtype, fmt=fmt)
    torch.library.opcheck(ops.local_response_norm_fwd.default, (x, size, 0.3, 0.75, 1.2))
    torch.library.opcheck(ops.local_response_norm_bwd.default, (dy, x, size, 0.3, 0.75, 1.2))


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_fake_metadata_matches(fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = make_x((2, 6, 3, 4), fmt=fmt)
    y = ops.local_response_norm_fwd(x, 3, 1e-4, 0.75, 1.0)
    dx = ops.local_response_norm_bwd(x, x, 3, 1e-4, 0.75, 1.0)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fy = ops.local_response_norm_fwd(fx, 3, 1e-4, 0.75, 1.0)
        fdx = ops.local_response_norm_bwd(fx, fx, 3, 1e-4, 0.75, 1.0)
    for real, fake in ((y, fy), (dx, fdx)):
        assert fake.shape == real.shape and fake.dtype == real.dtype
        assert fake.stride() == real.stride()


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_meta_accepts_more_than_2_31_channels(fmt):
    """No channel limit on any path (the CUDA kernels index channels in 64 bits): the meta
    kernels take C above 2^31 without allocating, in the input's layout (the emulation tier's
    test_channel_count_above_2_31 checks the CUDA host code)."""
    x = torch.empty(1, (1 << 31) + 5, 1, 2, device="meta")
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    y = ops.local_response_norm_fwd(x, 5, 1e-4, 0.75, 1.0)
    dx = ops.local_response_norm_bwd(x, x, 5, 1e-4, 0.75, 1.0)
    for t in (y, dx):
        assert t.device.type == "meta" and t.shape == x.shape and t.stride() == x.stride()


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(fmt, backend):
    torch._dynamo.reset()
    eager = fastnorm.LocalResponseNorm(3, alpha=0.3, k=1.2)
    opt = torch.compile(fastnorm.LocalResponseNorm(3, alpha=0.3, k=1.2), backend=backend,
                        fullgraph=True)
    for step in range(2):
        x = make_x((2, 6, 5, 3), fmt=fmt)
        g = torch.randn_like(x)
        outs = []
        for m in (eager, opt):
            xx = x.clone().requires_grad_()
            y = m(xx)
            y.backward(g)
            outs.append((y.detach(), xx.grad))
        assert fmt_of(outs[1][0]) == fmt_of(x)
        for a, e in zip(outs[1], outs[0]):
            assert_close_scaled(a, e, torch.float32, msg=f"step {step}")


def test_compile_counts_one_graph_with_the_op():
    torch._dynamo.reset()
    m = fastnorm.LocalResponseNorm(5)
    explanation = torch._dynamo.explain(m)(make_x((2, 7, 3, 3)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    code = "\n".join(g.code for g in explanation.graphs)
    assert "local_response_norm_fwd" in code


# ----------------------------------------------------------------------------------------------
# errors: torch's exception types, with the shapes named
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda f: f(torch.randn(2, 3), 2),           # rank 2: ValueError
    lambda f: f(torch.randn(4), 2),              # rank 1
    lambda f: f(torch.randn(2, 3, 4), 0),        # size 0: RuntimeError (torch's pooling)
    lambda f: f(torch.randn(2, 3, 4, 4), -1),    # negative size
    lambda f: f(torch.randn(2, 3, 4), 2.5),      # size not an int: TypeError
], ids=["rank2", "rank1", "size0", "size-neg", "size-float"])
def test_errors_as_torch(call, path):
    with pytest.raises(Exception) as ti:
        call(F.local_response_norm)
    with pytest.raises(type(ti.value)) as fi:
        call(FN.local_response_norm)
    msg = str(fi.value)
    assert "dimensions" in msg or "size" in msg


def test_rank_error_names_the_shape(path):
    with pytest.raises(ValueError) as e:
        fastnorm.LocalResponseNorm(3)(torch.randn(2, 5))
    assert mentions_shape(str(e.value), (2, 5))


def test_op_level_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        ops.local_response_norm_fwd(torch.randn(2, 3), 2, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="size"):
        ops.local_response_norm_fwd(x, 0, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError) as e:
        ops.local_response_norm_bwd(torch.randn(2, 3, 5), x, 2, 1e-4, 0.75, 1.0)
    assert mentions_shape(str(e.value), (2, 3, 5)) and mentions_shape(str(e.value), (2, 3, 4))
    with pytest.raises(RuntimeError, match="dtype"):
        ops.local_response_norm_bwd(x.double(), x, 2, 1e-4, 0.75, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_output_dtype_as_torch(dtype):
    """Under CUDA autocast torch's pow runs in float32, so torch's output is float32: the same."""
    x = make_x((2, 6, 5, 5), "cuda", dtype)
    with torch.autocast("cuda", dtype=dtype):
        y = FN.local_response_norm(x, 5, **ARGS)
        yt = F.local_response_norm(x, 5, **ARGS)
    assert y.dtype == yt.dtype == torch.float32
    assert_close_scaled(y.double(), reference(x, 5, **ARGS), dtype)
