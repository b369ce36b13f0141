"""LayerNorm2d (channels-first LayerNorm, ConvNeXt's): fastnorm.LayerNorm2d and
fastnorm.functional.layer_norm2d against timm's permute + layer_norm composition (written here,
timm need not be installed) and an independent float64 reference; state_dict, memory formats,
gradients, the fastnorm::layer_norm2d_fwd/bwd ops (opcheck, fake kernels, vmap rules), gradcheck,
torch.compile(fullgraph=True), torch.func transforms and errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import fastnorm
from fastnorm import functional as FN
from conftest import TOL, assert_close_scaled, mentions_shape

ops = torch.ops.fastnorm
CL = torch.channels_last
CL3 = torch.channels_last_3d
HALF = (torch.float16, torch.bfloat16)


class TimmLayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d as timm writes it (the semantics fastnorm.LayerNorm2d copies)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def composition(x, weight, bias, eps):
    """timm's forward for any spatial rank: the channels moved last, layer_norm, moved back."""
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)


def reference(x, weight=None, bias=None, eps=1e-6):
    """float64, from the definition: mean and biased variance over dim 1 of each position."""
    x = x.detach().double()
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.detach().double().reshape(shape)
    if bias is not None:
        y = y + bias.detach().double().reshape(shape)
    return y


def memory_format(x):
    for fmt in (torch.contiguous_format, CL, CL3):
        if (fmt is CL and x.dim() != 4) or (fmt is CL3 and x.dim() != 5):
            continue
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return None


def make_x(shape, device, dtype=torch.float32, fmt=None):
    x = (torch.randn(shape, device=device, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def make_params(c, device, dtype=torch.float32):
    w = (torch.rand(c, device=device, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, device=device, dtype=torch.float64).to(dtype)
    return w, b


def dtypes_for(device):
    return [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["fast_path", "op_path"])
def path(request):
    """Both CPU routes: the eager fast path (ATen directly) and the fastnorm:: ops."""
    was = FN.set_cpu_fast_path(request.param == "fast_path")
    yield request.param
    FN.set_cpu_fast_path(was)


@pytest.fixture(autouse=True)
def _dynamo_reset():
    yield
    torch._dynamo.reset()


SHAPES_4D = [(2, 5, 3, 4), (1, 1, 1, 1), (3, 7, 1, 1), (2, 13, 5, 7), (1, 3, 1, 5), (4, 64, 2, 3)]


# ----------------------------------------------------------------------------------------------
# forward: module vs timm, vs float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES_4D, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_module_matches_timm_and_float64(shape, fmt, dtype, path, device):
    c = shape[1]
    timm = TimmLayerNorm2d(c).to(device, dtype)
    ours = fastnorm.LayerNorm2d(c).to(device, dtype)
    w, b = make_params(c, device, dtype)
    with torch.no_grad():
        for m in (timm, ours):
            m.weight.copy_(w)
            m.bias.copy_(b)
    x = make_x(shape, device, dtype, fmt)
    y = ours(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert memory_format(y) == memory_format(x)
    assert_close_scaled(y, timm(x), dtype, msg="vs timm's permute composition")
    assert_close_scaled(y.double(), reference(x, w, b), dtype, msg="vs float64 reference")


@pytest.mark.parametrize("shape,fmt", [
    ((6, 5), None), ((3, 4, 7), None), ((2, 3, 5), None), ((2, 4, 3, 2, 5), None),
    ((2, 4, 3, 2, 5), CL3), ((1, 9, 1, 1, 1), None), ((2, 3, 1), None)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("affine", [True, False])
def test_functional_any_spatial_rank(shape, fmt, affine, path, device):
    x = make_x(shape, device, fmt=fmt)
    w, b = make_params(shape[1], device) if affine else (None, None)
    y = FN.layer_norm2d(x, w, b, eps=1e-5)
    assert memory_format(y) == memory_format(x)
    assert_close_scaled(y, composition(x, w, b, 1e-5), torch.float32)
    assert_close_scaled(y.double(), reference(x, w, b, 1e-5), torch.float32)


def test_constant_positions_and_large_values(path, device):
    """A position whose channels are equal gives 0 (+ bias), never NaN; fp16 values whose squares
    overflow fp16 are fine (statistics in float32)."""
    x = torch.full((2, 6, 3, 3), 3.0, device=device, dtype=torch.float16)
    x[1] = torch.linspace(-30000, 30000, 6, device=device).reshape(6, 1, 1).to(torch.float16)
    w, b = make_params(6, device, torch.float16)
    y = FN.layer_norm2d(x, w, b)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], b.reshape(6, 1, 1).expand(6, 3, 3))
    assert_close_scaled(y.double(), reference(x, w, b), torch.float16)


def test_mixed_parameter_dtype(path, device):
    """Half input with float32 parameters (the AMP case): output in the input's dtype."""
    x = make_x((2, 8, 3, 3), device, torch.bfloat16, CL)
    w, b = make_params(8, device)
    y = FN.layer_norm2d(x, w, b)
    assert y.dtype == torch.bfloat16 and memory_format(y) is CL
    assert_close_scaled(y.double(), reference(x, w, b), torch.bfloat16)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3), (2, 0, 3, 3), (0, 0, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_inputs(shape, path, device):
    x = make_x(shape, device).requires_grad_()
    w, b = (t.requires_grad_() for t in make_params(shape[1], device))
    y = FN.layer_norm2d(x, w, b)
    ref = composition(x, w, b, 1e-6)
    assert y.shape == ref.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


# ----------------------------------------------------------------------------------------------
# the module: constructor, state_dict, class relations
# ----------------------------------------------------------------------------------------------
def test_module_is_a_layer_norm_with_timm_arguments():
    m = fastnorm.LayerNorm2d(12)
    assert isinstance(m, nn.LayerNorm)
    assert m.normalized_shape == (12,) and m.eps == 1e-6 and m.elementwise_affine
    assert m.weight.shape == (12,) and m.bias.shape == (12,)
    assert torch.equal(m.weight, torch.ones(12)) and torch.equal(m.bias, torch.zeros(12))
    m = fastnorm.LayerNorm2d(12, eps=1e-5, affine=False)
    assert m.weight is None and m.bias is None and m.eps == 1e-5
    m = fastnorm.LayerNorm2d(4, dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    assert "LayerNorm2d" in fastnorm.__all__ and "layer_norm2d" in FN.__all__
    assert repr(fastnorm.LayerNorm2d(3)) == repr(TimmLayerNorm2d(3)).replace("Timm", "")


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_interchangeable_with_timm_and_layer_norm(affine):
    timm = TimmLayerNorm2d(7, affine=affine)
    plain = nn.LayerNorm((7,), eps=1e-6, elementwise_affine=affine)
    ours = fastnorm.LayerNorm2d(7, affine=affine)
    if affine:
        with torch.no_grad():
            timm.weight.uniform_(0.5, 1.5)
            timm.bias.normal_()
    for other in (timm, plain):
        sd = other.state_dict()
        assert list(ours.state_dict()) == list(sd)
        assert all(ours.state_dict()[k].shape == v.shape for k, v in sd.items())
    ours.load_state_dict(timm.state_dict())
    plain.load_state_dict(ours.state_dict())
    x = make_x((2, 7, 3, 4), "cpu")
    torch.testing.assert_close(ours(x), timm(x))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v)


def test_swapping_the_class_of_a_timm_module():
    """convert() of timm's LayerNorm2d swaps module.__class__: fastnorm's class adds no state."""
    timm = TimmLayerNorm2d(5)
    with torch.no_grad():
        timm.weight.uniform_(0.5, 1.5)
        timm.bias.normal_()
    x = make_x((2, 5, 4, 3), "cpu")
    expected = timm(x)
    weight = timm.weight
    timm.__class__ = fastnorm.LayerNorm2d
    torch.testing.assert_close(timm(x), expected)
    assert timm.weight is weight


def test_layer_norm2d_is_not_in_the_torch_nn_table():
    """There is no torch.nn.LayerNorm2d: convert()'s table of torch.nn twins leaves it out."""
    assert fastnorm.LayerNorm2d not in fastnorm.modules.TORCH_TO_FASTNORM.values()


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,fmt", [
    ((2, 5, 3, 4), None), ((2, 5, 3, 4), CL), ((3, 7, 1, 1), None), ((3, 7, 1, 1), CL),
    ((2, 13, 5, 7), None), ((2, 13, 5, 7), CL), ((3, 6, 5), None)],
    ids=["2x5x3x4", "2x5x3x4-nhwc", "3x7x1x1", "3x7x1x1-nhwc", "2x13x5x7", "2x13x5x7-nhwc", "3x6x5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gradients_match_timm(shape, fmt, dtype, path, device):
    c = shape[1]
    w0, b0 = make_params(c, device, dtype)
    x0 = make_x(shape, device, dtype, fmt)
    g = make_x(shape, device, dtype, fmt)
    results = []
    for fn in (FN.layer_norm2d, composition):
        x = x0.clone().requires_grad_()
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        fn(x, w, b, 1e-6).backward(g)
        results.append((x.grad, w.grad, b.grad))
    for got, exp, what in zip(results[0], results[1], ("dx", "dweight", "dbias")):
        assert_close_scaled(got, exp, dtype, factor=4 if dtype in HALF else 1, msg=what)


def test_gradients_masks_on_op_path():
    """Only some inputs need gradients; bias without weight; no affine."""
    was = FN.set_cpu_fast_path(False)
    try:
        x0 = make_x((2, 6, 3, 3), "cpu", torch.float64, CL)
        w0, b0 = make_params(6, "cpu", torch.float64)
        for needs in itertools.product((False, True), repeat=3):
            for use_w, use_b in ((True, True), (False, True), (True, False), (False, False)):
                if not any(n and u for n, u in zip(needs, (True, use_w, use_b))):
                    continue
                args = [x0.clone().requires_grad_(needs[0]),
                        w0.clone().requires_grad_(needs[1]) if use_w else None,
                        b0.clone().requires_grad_(needs[2]) if use_b else None]
                ref_args = [None if a is None else a.detach().clone().requires_grad_(a.requires_grad)
                            for a in args]
                FN.layer_norm2d(*args).pow(2).sum().backward()
                composition(*ref_args, 1e-6).pow(2).sum().backward()
                for a, r in zip(args, ref_args):
                    if a is not None:
                        assert (a.grad is None) == (r.grad is None)
                        if a.grad is not None:
                            torch.testing.assert_close(a.grad, r.grad)
    finally:
        FN.set_cpu_fast_path(was)


@pytest.mark.parametrize("shape,fmt", [((2, 4, 3, 2), None), ((2, 4, 3, 2), CL), ((3, 5, 4), None),
                                       ((2, 3), None), ((1, 3, 2, 1, 2), CL3)],
                         ids=["nchw", "nhwc", "ncl", "nc", "ncdhw-cl3"])
def test_gradcheck_and_gradgradcheck_float64(shape, fmt, device):
    was = FN.set_cpu_fast_path(False)
    try:
        x = make_x(shape, device, torch.float64, fmt).requires_grad_()
        w, b = (t.requires_grad_() for t in make_params(shape[1], device, torch.float64))
        f = lambda x, w, b: FN.layer_norm2d(x, w, b, 1e-3)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))
        # a direct call of the op is differentiable too (its register_autograd formula)
        g = lambda x, w, b: ops.layer_norm2d_fwd(x, w, b, 1e-3)[0]  # noqa: E731
        assert torch.autograd.gradcheck(g, (x, w, b))
    finally:
        FN.set_cpu_fast_path(was)


def test_forward_ad(device):
    was = FN.set_cpu_fast_path(False)
    try:
        import torch.autograd.forward_ad as fwAD
        x = make_x((2, 5, 3, 3), device, torch.float64, CL)
        w, b = make_params(5, device, torch.float64)
        tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
        with fwAD.dual_level():
            y = FN.layer_norm2d(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), fwAD.make_dual(b, tb))
            t = fwAD.unpack_dual(y).tangent
        _, expected = jvp(lambda x, w, b: composition(x, w, b, 1e-6), (x, w, b), (tx, tw, tb))
        torch.testing.assert_close(t, expected)
    finally:
        FN.set_cpu_fast_path(was)


# ----------------------------------------------------------------------------------------------
# the ops: opcheck, fake kernels, stats layout, out_dtype (autocast's fused cast)
# ----------------------------------------------------------------------------------------------
def fwd_cases(device):
    def x(shape, dtype=torch.float32, fmt=None):
        return make_x(shape, device, dtype, fmt).requires_grad_()

    def p(c, dtype=torch.float32):
        return tuple(t.requires_grad_() for t in make_params(c, device, dtype))

    return {
        "nchw": (x((2, 6, 3, 4)), *p(6), 1e-6),
        "nhwc": (x((2, 6, 3, 4), fmt=CL), *p(6), 1e-6),
        "noaffine": (x((2, 6, 3, 4)), None, None, 1e-5),
        "bias-only": (x((2, 6, 3, 4), fmt=CL), None, p(6)[1], 1e-5),
        "ncl": (x((3, 5, 7)), *p(5), 1e-6),
        "nc": (x((4, 5)), *p(5), 1e-6),
        "ncdhw-cl3": (x((2, 3, 2, 2, 3), fmt=CL3), *p(3), 1e-6),
        "bf16-fp32-params": (x((2, 6, 3, 4), torch.bfloat16, CL), *p(6), 1e-6),
        "fp64": (x((2, 3, 2, 5), torch.float64), *p(3, torch.float64), 1e-6),
        "out-fp32": (x((2, 6, 3, 4), torch.bfloat16), *p(6), 1e-6, torch.float32),
        "empty-batch": (x((0, 6, 3, 4)), *p(6), 1e-6),
    }


@pytest.mark.parametrize("case", list(fwd_cases("cpu")))
def test_opcheck_layer_norm2d_fwd(case, device):
    torch.library.opcheck(ops.layer_norm2d_fwd.default, fwd_cases(device)[case])


@pytest.mark.parametrize("case", list(fwd_cases("cpu")))
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=lambda m: "".join("1" if v else "0" for v in m))
def test_opcheck_layer_norm2d_bwd(case, mask, device):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_cases(device)[case]]
    x, w, b = args[:3]
    y, mean, rstd = ops.layer_norm2d_fwd(*args)
    dy = torch.randn_like(y)
    m = [mask[0], mask[1] and w is not None, mask[2] and b is not None]
    torch.library.opcheck(ops.layer_norm2d_bwd.default, (dy, x, mean, rstd, w, m))


@pytest.mark.parametrize("case", list(fwd_cases("cpu")))
def test_op_outputs_and_fake_metadata(case, device):
    """Statistics [N * positions] in (n, position) order, outputs in the input's layout, the
    fake kernels' shapes, dtypes and strides equal to the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_cases(device)[case]]
    x, w, b, eps = args[:4]
    out_dtype = args[4] if len(args) > 4 else None
    y, mean, rstd = ops.layer_norm2d_fwd(*args)
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = x.shape[0] * (x[0, 0].numel() if x.shape[0] else 0)
    assert mean.shape == (m,) and rstd.shape == (m,) and mean.dtype == sd and rstd.dtype == sd
    if m:
        xd = x.double()
        assert_close_scaled(mean.double(), xd.mean(1).reshape(-1), torch.float32)
        var = xd.var(1, correction=0).reshape(-1)
        assert_close_scaled(rstd.double(), torch.rsqrt(var + eps), torch.float32)
    assert y.dtype == (out_dtype or x.dtype)
    assert memory_format(y) == memory_format(x)
    if out_dtype is not None:
        torch.testing.assert_close(y, composition(x.to(out_dtype), w, b, eps))
    dy = torch.randn_like(y)
    real = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, w is not None, b is not None])
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fy, fmean, frstd = ops.layer_norm2d_fwd(*fargs)
        fake = ops.layer_norm2d_bwd(mode.from_tensor(dy), fargs[0], fmean, frstd, fargs[1],
                                    [True, w is not None, b is not None])
    for r, f in zip((y, mean, rstd, *real), (fy, fmean, frstd, *fake)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_backward_op_with_float32_grad_out():
    """Under autocast the forward wrote float32 (out_dtype): the backward takes a float32 dy and
    returns dx in the input's dtype."""
    x = make_x((2, 6, 3, 4), "cpu", torch.bfloat16, CL)
    w, b = make_params(6, "cpu")
    y, mean, rstd = ops.layer_norm2d_fwd(x, w, b, 1e-6, torch.float32)
    dy = torch.randn_like(y)
    dx, dw, db = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, [True, True, True])
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32 and memory_format(dx) is CL
    xr = x.float().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    composition(xr, wr, br, 1e-6).backward(dy)
    assert_close_scaled(dx, xr.grad.to(torch.bfloat16), torch.bfloat16)
    torch.testing.assert_close(dw, wr.grad)
    torch.testing.assert_close(db, br.grad)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(fmt, backend, device):
    torch._dynamo.reset()
    eager = fastnorm.LayerNorm2d(6).to(device)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    compiled_mod = fastnorm.LayerNorm2d(6).to(device)
    compiled_mod.load_state_dict(eager.state_dict())
    opt = torch.compile(compiled_mod, backend=backend, fullgraph=True)
    for step in range(2):
        x = make_x((2, 6, 5, 3), device, fmt=fmt)
        g = torch.randn_like(x)
        outs = []
        for m, owner in ((eager, eager), (opt, compiled_mod)):
            xx = x.clone().requires_grad_()
            y = m(xx)
            y.backward(g)
            outs.append((y.detach(), xx.grad, owner.weight.grad.clone(), owner.bias.grad.clone()))
            owner.zero_grad(set_to_none=True)
        assert memory_format(outs[1][0]) == memory_format(x)
        for a, e in zip(outs[1], outs[0]):
            assert_close_scaled(a, e, torch.float32, msg=f"step {step}")


def test_compile_counts_one_graph():
    torch._dynamo.reset()
    m = fastnorm.LayerNorm2d(4)
    explanation = torch._dynamo.explain(m)(make_x((2, 4, 3, 3), "cpu", fmt=CL))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


# ----------------------------------------------------------------------------------------------
# torch.func (as tests/test_func_transforms.py: no vmap fallback, float64 against timm's)
# ----------------------------------------------------------------------------------------------
def _twins(device, c=4):
    torch.manual_seed(1)
    timm = TimmLayerNorm2d(c).to(device, torch.float64)
    with torch.no_grad():
        timm.weight.uniform_(0.5, 1.5)
        timm.bias.normal_()
    ours = fastnorm.LayerNorm2d(c).to(device, torch.float64)
    ours.load_state_dict(timm.state_dict())
    return timm, ours


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
@pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")
def test_func_transforms(fmt, device, no_vmap_fallback):
    timm, ours = _twins(device)
    x = make_x((3, 4, 2, 3), device, torch.float64, fmt)
    params = {k: v.detach() for k, v in timm.named_parameters()}

    def loss(m):
        return lambda p, x: functional_call(m, p, (x,)).pow(2).sum()

    # grad, over parameters and input
    for argnums in (0, 1):
        got = grad(loss(ours), argnums=argnums)(params, x)
        exp = grad(loss(timm), argnums=argnums)(params, x)
        torch.testing.assert_close(got, exp)
    # jvp
    t = torch.randn_like(x)
    got = jvp(lambda x: functional_call(ours, params, (x,)), (x,), (t,))
    exp = jvp(lambda x: functional_call(timm, params, (x,)), (x,), (t,))
    torch.testing.assert_close(got, exp)
    # jacrev / jacfwd on a small input
    xs = x[:1, :, :1]
    for jac in (jacrev, jacfwd):
        got = jac(lambda x: functional_call(ours, params, (x,)))(xs)
        exp = jac(lambda x: functional_call(timm, params, (x,)))(xs)
        torch.testing.assert_close(got, exp)
    # vmap over the input (in_dims 0 and 1) and per-sample gradients (the Opacus pattern)
    xb = make_x((5, 2, 4, 2, 3), device, torch.float64)
    for d in (0, 1):
        xin = xb.movedim(0, d)
        got = vmap(lambda x: functional_call(ours, params, (x,)), in_dims=d)(xin)
        exp = vmap(lambda x: functional_call(timm, params, (x,)), in_dims=d)(xin)
        torch.testing.assert_close(got, exp)

    def per_sample(m):
        def f(p, x):
            return loss(m)(p, x.unsqueeze(0))
        return vmap(grad(f), in_dims=(None, 0))(params, x)

    torch.testing.assert_close(per_sample(ours), per_sample(timm))


@pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")
def test_vmap_over_parameters_ensemble(device, no_vmap_fallback):
    """Batched weight and bias (a model ensemble): the batching rules' affine branch, forward
    and backward, against timm's."""
    x = make_x((2, 4, 3, 3), device, torch.float64, CL)
    ws = torch.rand(3, 4, device=device, dtype=torch.float64) + 0.5
    bs = torch.randn(3, 4, device=device, dtype=torch.float64)

    def f(fn):
        return lambda w, b, x: fn(x, w, b, 1e-6)

    for in_dims in ((0, 0, None), (0, None, None), (None, 0, None), (0, 0, 0)):
        xin = x if in_dims[2] is None else x.expand(3, *x.shape)
        args = (ws if in_dims[0] is not None else ws[0], bs if in_dims[1] is not None else bs[0], xin)
        got = vmap(f(FN.layer_norm2d), in_dims=in_dims)(*args)
        exp = vmap(f(composition), in_dims=in_dims)(*args)
        torch.testing.assert_close(got, exp)

        def loss(fn):
            return lambda w, b, x: fn(w, b, x).pow(3).sum()

        got = vmap(grad(loss(f(FN.layer_norm2d)), argnums=(0, 1, 2)), in_dims=in_dims)(*args)
        exp = vmap(grad(loss(f(composition)), argnums=(0, 1, 2)), in_dims=in_dims)(*args)
        torch.testing.assert_close(got, exp)


def test_vmap_rules_of_the_ops_directly(no_vmap_fallback):
    """The registered batching rules, with grad mode off (no autograd.Function in between)."""
    x = make_x((3, 2, 4, 5), "cpu", torch.float64)  # vmapped dim 0
    w = torch.rand(3, 4, dtype=torch.float64) + 0.5
    b = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        y, mean, rstd = vmap(lambda x, w, b: ops.layer_norm2d_fwd(x, w, b, 1e-6))(x, w, b)
        for i in range(3):
            yi, mi, ri = ops.layer_norm2d_fwd(x[i], w[i], b[i], 1e-6)
            torch.testing.assert_close(y[i], yi)
            torch.testing.assert_close(mean[i], mi)
            torch.testing.assert_close(rstd[i], ri)
        dy = torch.randn_like(x)
        got = vmap(lambda dy, x, m, r, w: ops.layer_norm2d_bwd(dy, x, m, r, w, [True, True, True]))(
            dy, x, mean, rstd, w)
        for i in range(3):
            exp = ops.layer_norm2d_bwd(dy[i], x[i], mean[i], rstd[i], w[i], [True, True, True])
            for g, e in zip(got, exp):
                torch.testing.assert_close(g[i], e)


# ----------------------------------------------------------------------------------------------
# errors: torch's exception types for the permute + layer_norm composition, with shapes/dtypes
# ----------------------------------------------------------------------------------------------
def _torch_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("case", ["rank1", "rank0", "weight-shape", "bias-shape", "int-input",
                                  "weight-2d"])
def test_errors_as_torch(case, path):
    x = make_x((2, 4, 3, 3), "cpu")
    w, b = make_params(4, "cpu")
    args = {
        "rank1": (make_x((4,), "cpu"), None, None),
        "rank0": (torch.tensor(1.0), None, None),
        "weight-shape": (x, torch.ones(5), b),
        "bias-shape": (x, w, torch.ones(3)),
        "int-input": (torch.ones(2, 4, 3, 3, dtype=torch.long), None, None),
        "weight-2d": (x, torch.ones(4, 1), b),
    }[case]
    timm_like = (lambda: F.layer_norm(args[0].permute(0, 2, 3, 1), (args[0].shape[1],),
                                      args[1], args[2], 1e-6))
    expected = _torch_error(timm_like)
    assert expected is not None
    with pytest.raises(type(expected)) as info:
        FN.layer_norm2d(*args)
    msg = str(info.value)
    if case.startswith(("weight", "bias")):
        bad = args[1] if case.startswith("weight") else args[2]
        assert mentions_shape(msg, bad.shape) and mentions_shape(msg, [4]), msg
    elif case == "int-input":
        assert "Long" in msg or "int64" in msg, msg
    else:
        assert mentions_shape(msg, args[0].shape) or "dimensions" in msg, msg


def test_module_errors_name_the_shapes():
    m = fastnorm.LayerNorm2d(4)
    with pytest.raises(RuntimeError) as info:
        m(make_x((2, 5, 3, 3), "cpu"))
    assert mentions_shape(str(info.value), (2, 5, 3, 3)) or mentions_shape(str(info.value), [4])


def test_op_level_errors():
    x = make_x((2, 4, 3, 3), "cpu")
    y, mean, rstd = ops.layer_norm2d_fwd(x, None, None, 1e-6)
    with pytest.raises(RuntimeError):
        ops.layer_norm2d_fwd(x, torch.ones(3), None, 1e-6)
    with pytest.raises(RuntimeError) as info:
        ops.layer_norm2d_bwd(torch.randn(2, 4, 3, 2), x, mean, rstd, None, [True, False, False])
    assert mentions_shape(str(info.value), (2, 4, 3, 2)) and mentions_shape(str(info.value), x.shape)
