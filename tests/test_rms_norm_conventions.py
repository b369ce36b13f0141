"""fastnorm.functional.rms_norm's conventions (weight_offset: Gemma's `1 + w`; normalized_dtype: the
Llama / T5 rounding of the normalised value before the weight) and fastnorm.functional.gated_rms_norm
(Mamba-2's norm(x * silu(gate)) in groups, Qwen3-Next's norm(x) * silu(gate), the sigmoid gate).

Each is compared with the formula spelled as the modules that define the convention spell it (the
same ATen ops in the same order: bitwise on CPU, on the fast path and on the op path alike, since
the op's reference computes x * rstd as they do and the product of two half values is exact in
float32; on the emulated kernels, FASTNORM_EMU_OPS, to within one rounding), with an independent
float64 formula for the gradients, then checked for its dtype rules,
errors, gradcheck / gradgradcheck, opcheck and torch.compile. The classes of transformers themselves
are compared in tests/test_convert_huggingface.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastnorm.functional as FN
from conftest import EMU_ROUTED, assert_close_scaled

ops = torch.ops.fastnorm
HALF = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *HALF, torch.float64]
SHAPES = [((4, 8), 8), ((3, 1), 1), ((2, 5, 7), 7), ((1, 131), 131), ((2, 3, 64), 64), ((0, 6), 6)]
SHAPE_IDS = ["x".join(map(str, s)) for s, _ in SHAPES]


@pytest.fixture(params=["op", "fast"])
def path(request):
    """The fastnorm:: ops (CPU fast path off) or the CPU fast path."""
    was = FN.set_cpu_fast_path(request.param == "fast")
    yield request.param
    FN.set_cpu_fast_path(was)


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_bitwise(actual, expected, msg, on_kernels=False):
    """Bit for bit; on the emulated kernels (FASTNORM_EMU_OPS, the op path) within one rounding of
    the output dtype: the kernels reduce the statistics in another order than ATen's mean."""
    assert actual.dtype == expected.dtype, msg
    if on_kernels and EMU_ROUTED:
        eps = torch.finfo(expected.dtype).eps
        torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=2 * eps, msg=msg)
    else:
        assert torch.equal(actual, expected), msg


# The conventions as the modules spell them (transformers' LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm).
def llama(x, w, eps):
    h = x.to(_stat(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def gemma(x, w, eps):
    h = x.to(_stat(x.dtype))
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.to(_stat(x.dtype)))).type_as(x)


def t5(x, w, eps):
    var = x.to(_stat(x.dtype)).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    if w.dtype in HALF:
        h = h.to(w.dtype)
    return w * h


def f64_rms(x, w, eps, offset=0.0):
    xd = x.double()
    y = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w.double() + offset)


# ----------------------------------------------------------------------------------------------
# rms_norm(weight_offset=, normalized_dtype=)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wdtype", ["same", "f32"])
@pytest.mark.parametrize("shape,h", SHAPES, ids=SHAPE_IDS)
def test_conventions_bitwise(dtype, wdtype, shape, h, path):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.3
    w = (torch.randn(h) * 0.5 + 1).to(dtype if wdtype == "same" else torch.float32)
    eps = 1e-6
    op = path == "op"
    y = FN.rms_norm(x, [h], w, eps, normalized_dtype=x.dtype)
    want = llama(x, w, eps)
    assert y.dtype == want.dtype == torch.promote_types(dtype, w.dtype)
    assert_bitwise(y, want, "Llama convention", op)
    y = FN.rms_norm(x, [h], w, eps, weight_offset=1.0)
    want = gemma(x, w, eps)
    assert y.dtype == dtype
    assert_bitwise(y, want, "Gemma convention", op)
    d = w.dtype if w.dtype in HALF else torch.float32
    if dtype == torch.float64 and d == torch.float32:
        d = torch.float64  # T5 on float64 data: rsqrt of a float32 variance times float64 x
        want = t5(x, w, eps)
        y = FN.rms_norm(x, [h], w, eps, normalized_dtype=d)
        assert_close_scaled(y, want.to(y.dtype), torch.float32, msg="T5 convention, float64")
        return
    y = FN.rms_norm(x, [h], w, eps, normalized_dtype=d)
    want = t5(x, w, eps)
    assert y.dtype == want.dtype
    assert_bitwise(y, want, "T5 convention", op)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("rounded", [False, True])
def test_gradients_against_float64(dtype, offset, rounded, path):
    """Gradients of input and weight against float64 autograd of the unrounded formula (the rounding
    of the normalised value is the identity to autograd, as through `.to()`)."""
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 40, dtype=dtype) * 1.5).requires_grad_()
    w = (torch.randn(40) * 0.5 + 0.5).to(dtype).requires_grad_()
    y = FN.rms_norm(x, [40], w, 1e-5, weight_offset=offset,
                    normalized_dtype=x.dtype if rounded else None)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = f64_rms(xd, wd, 1e-5, offset)
    rdx, rdw = torch.autograd.grad(ref, [xd, wd], g.double())
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_close_scaled(dx, rdx.to(dtype), dtype, factor=2, msg="dx")
    assert_close_scaled(dw, rdw.to(dtype), dtype, factor=2, msg="dweight")
    assert_close_scaled(y, ref.to(y.dtype), dtype, factor=2, msg="y")


def test_no_weight_and_empty(path):
    x = torch.randn(4, 9, dtype=torch.bfloat16)
    y = FN.rms_norm(x, [9], None, 1e-6, normalized_dtype=torch.bfloat16)
    h = x.float()
    assert_bitwise(y, (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16(),
                   "no weight", path == "op")
    e = FN.rms_norm(torch.randn(0, 9), [9], torch.ones(9), None, weight_offset=1.0)
    assert e.shape == (0, 9)
    e = FN.rms_norm(torch.randn(3, 0), [0], torch.ones(0), None, normalized_dtype=torch.float32)
    assert e.shape == (3, 0)


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight_offset=1.0 needs a weight"):
        FN.rms_norm(x, [8], None, weight_offset=1.0)
    with pytest.raises(TypeError, match="floating-point normalized_dtype.*torch.int32"):
        FN.rms_norm(x, [8], torch.ones(8), normalized_dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"weight of shape \[8\].*\[7\]"):
        FN.rms_norm(x, [8], torch.ones(7), weight_offset=1.0)
    with pytest.raises(NotImplementedError, match="torch.int64"):
        FN.rms_norm(torch.ones(2, 8, dtype=torch.long), [8], None, normalized_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_round_normalized(dtype):
    x = torch.randn(3, 5, 16, dtype=dtype)
    for w in (None, torch.randn(16, dtype=dtype), torch.randn(16)):
        out = torch.float32 if w is not None and w.dtype != dtype else None
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, [16], w, 1e-5, out, True))


def test_gradcheck_gradgradcheck():
    was = FN.set_cpu_fast_path(False)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
        for kw in (dict(weight_offset=1.0), dict(normalized_dtype=torch.float64),
                   dict(weight_offset=-0.25, normalized_dtype=torch.float64)):
            def fn(x, w, kw=kw):
                return FN.rms_norm(x, [6], w, 1e-4, **kw)
            assert torch.autograd.gradcheck(fn, (x, w), check_forward_ad=True)
            assert torch.autograd.gradgradcheck(fn, (x, w))
    finally:
        FN.set_cpu_fast_path(was)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)

    def fn(x, w):
        return (FN.rms_norm(x, [32], w, 1e-6, normalized_dtype=x.dtype),
                FN.rms_norm(x, [32], w, 1e-6, weight_offset=1.0),
                FN.gated_rms_norm(x, x.flip(-1), w, 1e-6, normalized_dtype=x.dtype))

    eager = fn(x, w)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")(x, w)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# gated_rms_norm
# ----------------------------------------------------------------------------------------------
def mamba_gated(x, gate, w, eps, group_size):
    """transformers' MambaRMSNormGated.forward, spelled as it is."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    if gate is not None:
        h = h * F.silu(gate.to(torch.float32))
    *prefix, last = h.shape
    g = h.view(*prefix, last // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return w * g.view(*prefix, last).to(input_dtype)


def qwen3next_gated(x, gate, w, eps):
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = w * h.to(input_dtype)
    h = h * F.silu(gate.to(torch.float32))
    return h.to(input_dtype)


def kimi_gated(x, gate, w, eps):
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = w.to(torch.float32) * h
    h = h * torch.sigmoid(gate.to(torch.float32))
    return h.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("wdtype", ["same", "f32"])
@pytest.mark.parametrize("shape", [(2, 3, 48), (1, 48), (5, 1, 48), (0, 48)], ids=str)
def test_gated_bitwise(dtype, wdtype, shape):
    """The CPU fast path: the ATen composition, spelled as the modules spell it."""
    was = FN.set_cpu_fast_path(True)
    try:
        _gated_bitwise(dtype, wdtype, shape)
    finally:
        FN.set_cpu_fast_path(was)


def _gated_bitwise(dtype, wdtype, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=dtype) * 2
    gate = torch.randn(shape, dtype=dtype)
    w = (torch.randn(48) * 0.5 + 1).to(dtype if wdtype == "same" else torch.float32)
    for gs in (48, 16, 1):
        y = FN.gated_rms_norm(x, gate, w, 1e-6, group_size=gs, norm_before_gate=False,
                              normalized_dtype=dtype)
        assert torch.equal(y, mamba_gated(x, gate, w, 1e-6, gs)), f"Mamba, group_size {gs}"
    y = FN.gated_rms_norm(x, None, w, 1e-6, group_size=16, norm_before_gate=False,
                          normalized_dtype=dtype)
    assert torch.equal(y, mamba_gated(x, None, w, 1e-6, 16)), "Mamba without a gate"
    y = FN.gated_rms_norm(x, gate, w, 1e-6, normalized_dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, qwen3next_gated(x, gate, w, 1e-6)), "Qwen3-Next"
    y = FN.gated_rms_norm(x, gate, w, 1e-6, activation="sigmoid")
    assert y.dtype == dtype and torch.equal(y, kimi_gated(x, gate, w, 1e-6)), "sigmoid gate"


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_gated_gradients_and_gradcheck(norm_before_gate, activation):
    torch.manual_seed(3)
    act = F.silu if activation == "silu" else torch.sigmoid
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(12, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x, gate, w):
        return FN.gated_rms_norm(x, gate, w, 1e-5, group_size=4, norm_before_gate=norm_before_gate,
                                 activation=activation)

    assert torch.autograd.gradcheck(fn, (x, gate, w))
    assert torch.autograd.gradgradcheck(fn, (x, gate, w))
    # an independent spelling in float64
    h = x if norm_before_gate else x * act(gate)
    g = h.view(2, 3, 3, 4)
    n = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + 1e-5)).view(2, 3, 12) * w
    ref = n * act(gate) if norm_before_gate else n
    torch.testing.assert_close(fn(x, gate, w), ref, rtol=1e-12, atol=1e-12)


def test_gated_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="a gate is needed"):
        FN.gated_rms_norm(x, None)
    with pytest.raises(RuntimeError, match=r"gate of the input's shape \[2, 8\].*\[2, 7\]"):
        FN.gated_rms_norm(x, torch.randn(2, 7))
    with pytest.raises(ValueError, match="group_size dividing the last dim \\(8\\).*group_size=3"):
        FN.gated_rms_norm(x, x, group_size=3)
    with pytest.raises(ValueError, match="'silu' or 'sigmoid'.*'relu'"):
        FN.gated_rms_norm(x, x, activation="relu")
    with pytest.raises(RuntimeError, match=r"weight of shape \[8\].*\[4\]"):
        FN.gated_rms_norm(x, x, torch.ones(4))
    with pytest.raises(NotImplementedError, match="torch.int64"):
        FN.gated_rms_norm(torch.ones(2, 8, dtype=torch.long), None, norm_before_gate=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("wdtype", ["same", "f32", "none"])
def test_gated_op_path_matches_the_composition(dtype, norm_before_gate, wdtype):
    """The fastnorm:: ops (CPU fast path off: the reference ops here, the kernels on CUDA) against
    the ATen composition of the fast path: the forward bitwise (the op's reference spells the same
    ops), the gradients within rounding (the op's backward formula against autograd's graph)."""
    torch.manual_seed(4)
    x = (torch.randn(2, 5, 48, dtype=dtype) * 1.5).requires_grad_()
    gate = torch.randn(2, 5, 48, dtype=dtype).requires_grad_()
    w = None if wdtype == "none" else (torch.randn(48) * 0.5 + 1).to(
        dtype if wdtype == "same" else torch.float32).requires_grad_()
    for activation in ("silu", "sigmoid"):
        for nd in (None, dtype):
            kw = dict(group_size=16, norm_before_gate=norm_before_gate, activation=activation,
                      normalized_dtype=nd)
            was = FN.set_cpu_fast_path(False)
            try:
                y = FN.gated_rms_norm(x, gate, w, 1e-6, **kw)
            finally:
                FN.set_cpu_fast_path(was)
            want = FN.gated_rms_norm(x, gate, w, 1e-6, **kw)
            assert_bitwise(y, want, str(kw), on_kernels=True)
            params = [x, gate] + ([w] if w is not None else [])
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, params, g)
            ref = torch.autograd.grad(want, params, g)
            for a, b, what in zip(got, ref, ("dx", "dgate", "dweight")):
                assert_close_scaled(a, b, dtype, factor=2, msg=f"{what} {kw}")


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_opcheck(norm_before_gate):
    x, gate = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    for w in (None, torch.randn(32), torch.randn(32, dtype=torch.float64)):
        if w is not None and w.dtype == torch.float64:
            continue
        for rounded in (False, True):
            args = (x, gate, w, 1e-5, 8, norm_before_gate, 4, rounded)
            torch.library.opcheck(ops.gated_rms_norm_fwd.default, args)
            y, rstd = ops.gated_rms_norm_fwd(*args)
            assert rstd.shape == (3 * 4 * 4,)
            torch.library.opcheck(ops.gated_rms_norm_bwd.default,
                                  (torch.randn_like(y), x, gate, rstd, w, 8, norm_before_gate, 10,
                                   [True, True, w is not None]))


def test_gated_compile_on_the_op_path():
    """torch.compile(fullgraph=True) of the op path (fast path off: the fake kernels trace it)."""
    torch._dynamo.reset()
    was = FN.set_cpu_fast_path(False)
    try:
        x = torch.randn(4, 64, requires_grad=True)
        gate = torch.randn(4, 64, requires_grad=True)
        w = torch.randn(64, requires_grad=True)

        def fn(x, gate, w):
            return FN.gated_rms_norm(x, gate, w, 1e-6, group_size=32, norm_before_gate=False)

        eager = fn(x, gate, w)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, gate, w)
        # the same op both times; on the emulated kernels (FASTNORM_EMU_OPS) the compiled graph
        # may meet the reference instead of the routed CPU kernel: within one rounding there
        assert_bitwise(compiled, eager, "compiled", on_kernels=True)
        g1 = torch.autograd.grad(compiled.sum(), [x, gate, w])
        g2 = torch.autograd.grad(eager.sum(), [x, gate, w])
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    finally:
        FN.set_cpu_fast_path(was)
