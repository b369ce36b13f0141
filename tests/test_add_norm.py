"""fastnorm.functional.add_rms_norm / add_layer_norm (the fused pre-norm step, (output,
residual_out)) against a composition of torch ops and an independent float64 formula: every
dtype, the float32-residual + half-input pair, pairs the op does not take, awkward shapes, with
and without weight/bias, gradients to input, residual, weight and bias from both outputs, on the
op path and the CPU fast path; opcheck of add_norm_fwd/bwd, gradcheck/gradgradcheck, forward
AD, torch.compile, torch.func, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import fastnorm.functional as FN
from conftest import assert_close_scaled, assert_compiled_matches_eager, mentions_shape

ops = torch.ops.fastnorm
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# (input dtype, residual dtype): one dtype, the float32 residual stream, pairs the op refuses
PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (BF16, F32), (F16, F32),
         (F32, BF16), (BF16, F16), (F16, F64)]
SHAPES = [((4, 8), [8]), ((3, 1), [1]), ((2, 5, 7), [7]), ((1, 131), [131]), ((0, 6), [6]),
          ((2, 3, 4, 5), [4, 5]), ((6,), [6])]
SHAPE_IDS = ["x".join(map(str, s)) + "-" + "x".join(map(str, n)) for s, n in SHAPES]


@pytest.fixture(params=["op", "fast"])
def path(request):
    was = FN.set_cpu_fast_path(request.param == "fast")
    yield request.param
    FN.set_cpu_fast_path(was)


def _call(rms, x, res, ns, w, b, eps):
    if rms:
        return FN.add_rms_norm(x, res, ns, w, eps)
    return FN.add_layer_norm(x, res, ns, w, b, 1e-5 if eps is None else eps)


def _torch_composition(rms, x, res, ns, w, b, eps):
    """residual_out = input + residual (float32 sum, residual's dtype), output = torch's norm of
    it, computed in float32 (float64 for float64 data) and cast to input's dtype."""
    acc = F64 if F64 in (x.dtype, res.dtype) else F32
    r = (x.to(acc) + res.to(acc)).to(res.dtype)
    wa = None if w is None else w.to(acc)
    if rms:
        y = F.rms_norm(r.to(acc), ns, wa, eps)
    else:
        y = F.layer_norm(r.to(acc), ns, wa, None if b is None else b.to(acc),
                         1e-5 if eps is None else eps)
    return y.to(x.dtype), r


def _float64_ref(rms, x, res, ns, w, b, eps):
    """The formula in float64 from residual_out as stored (its rounding is the op's too)."""
    r = (x.double() + res.double()).to(res.dtype).double()
    dims = list(range(r.dim() - len(ns), r.dim()))
    if rms:
        e = torch.finfo(F64 if x.dtype == F64 else F32).eps if eps is None else eps
        y = r / torch.sqrt((r * r).mean(dims, keepdim=True) + e)
    else:
        mu = r.mean(dims, keepdim=True)
        y = (r - mu) / torch.sqrt(((r - mu) ** 2).mean(dims, keepdim=True) + (1e-5 if eps is None else eps))
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def _tol(*dts):
    for d in (BF16, F16, F32):
        if d in dts:
            return d
    return F64


@pytest.mark.parametrize("rms,affine", [(True, "none"), (True, "weight"), (False, "none"),
                                        (False, "weight"), (False, "both")],
                         ids=["rms", "rms-weight", "ln", "ln-weight", "ln-weight-bias"])
@pytest.mark.parametrize("xd,rd", PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("shape,ns", SHAPES, ids=SHAPE_IDS)
def test_matches_composition_and_float64(rms, xd, rd, shape, ns, affine, path):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=F64) * 2).to(xd).requires_grad_()
    res = (torch.randn(shape, dtype=F64) + 0.5).to(rd).requires_grad_()
    pd = F32 if xd in (F16, BF16) else xd  # float32 parameters with half activations (AMP)
    w = (torch.rand(ns, dtype=F64) + 0.5).to(pd).requires_grad_() if affine != "none" else None
    b = torch.randn(ns, dtype=F64).to(pd).requires_grad_() if affine == "both" else None
    eps = None if rms else 1e-5
    out, r = _call(rms, x, res, ns, w, b, eps)
    assert out.dtype == xd and r.dtype == rd and out.shape == r.shape == x.shape
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, res, w, b)]
    out_t, r_t = _torch_composition(rms, *leaves[:2], ns, *leaves[2:], eps)
    tol = _tol(xd, rd)
    assert_close_scaled(r, r_t, rd, msg="residual_out")
    assert_close_scaled(out, out_t, tol, msg="output vs torch")
    assert_close_scaled(out.double(), _float64_ref(rms, x, res, ns, w, b, eps), tol, msg="vs float64")
    go = torch.randn(shape, dtype=F64).to(xd)
    gr = torch.randn(shape, dtype=F64).to(rd)
    ins = [t for t in (x, res, w, b) if t is not None]
    ins_t = [t for t in leaves if t is not None]
    got = torch.autograd.grad((out, r), ins, (go, gr))
    want = torch.autograd.grad((out_t, r_t), ins_t, (go, gr))
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.dtype == e.dtype == ins[i].dtype
        assert_close_scaled(a, e, tol, factor=4, msg=f"grad {i}")


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_one_output_used(rms, path):
    """Gradients when only output, or only residual_out, reaches the loss."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    res = torch.randn(3, 8, dtype=F64, requires_grad=True)
    w = (torch.rand(8, dtype=F64) + 0.5).requires_grad_()
    for pick in (0, 1):
        o = _call(rms, x, res, [8], w, None, 1e-5)[pick]
        e = _torch_composition(rms, x, res, [8], w, None, 1e-5)[pick]
        g = torch.randn_like(o)
        a = torch.autograd.grad(o, (x, res, w), g, allow_unused=True, materialize_grads=True)
        b = torch.autograd.grad(e, (x, res, w), g, allow_unused=True, materialize_grads=True)
        for p, q in zip(a, b):
            assert_close_scaled(p, q, F64)


def test_same_dtype_grads_are_separate_tensors():
    """One dtype: the backward computes one gradient for input and residual; the two leaves
    must still get tensors that do not alias (an in-place update of one leaves the other)."""
    FN.set_cpu_fast_path(False)
    try:
        x = torch.randn(4, 8, requires_grad=True)
        res = torch.randn(4, 8, requires_grad=True)
        out, r = FN.add_rms_norm(x, res, [8])
        (out.sum() + r.sum()).backward()
        assert torch.equal(x.grad, res.grad)
        x.grad.add_(1)
        assert not torch.equal(x.grad, res.grad)
    finally:
        FN.set_cpu_fast_path(True)


def test_autocast_cpu_bf16(path):
    """Under CPU autocast a Linear gives bf16 activations; the float32 residual stream stays
    float32 and the output is bf16."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    res = torch.randn(4, 16)
    w = torch.rand(16) + 0.5
    with torch.autocast("cpu", dtype=BF16):
        h = lin(torch.randn(4, 16))
        assert h.dtype == BF16
        out, r = FN.add_rms_norm(h, res, [16], w)
        out_t, r_t = _torch_composition(True, h, res, [16], w, None, None)
        ln, rl = FN.add_layer_norm(h, res, [16], w, w)
    assert out.dtype == ln.dtype == BF16 and r.dtype == rl.dtype == F32
    assert_close_scaled(out, out_t, BF16)
    assert_close_scaled(r, r_t, F32)


# ----------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------
def _fwd_cases():
    torch.manual_seed(0)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    x, res = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    return {
        "ln": (x, res, [6], w, b, 1e-5, False),
        "rms": (x, res, [6], w, None, 1e-6, True),
        "ln-noaffine": (x, res, [5, 6], None, None, 1e-5, False),
        "rms-multidim": (x, res, [5, 6], torch.rand(5, 6), None, 1e-6, True),
        "bf16-fp32res": (x.bfloat16(), res, [6], w, b, 1e-5, False),
        "fp16-fp32res-rms": (x.half(), res, [6], w.half(), None, 1e-5, True),
        "fp64": (x.double(), res.double(), [6], w.double(), b.double(), 1e-5, False),
        "noncontig": (x.transpose(0, 1), res.transpose(0, 1), [6], w, b, 1e-5, False),
        "empty-rows": (torch.randn(0, 6), torch.randn(0, 6), [6], w, None, 1e-5, True),
    }


@pytest.mark.parametrize("case", list(_fwd_cases()))
def test_opcheck_fwd(case):
    args = list(_fwd_cases()[case])
    for i in (0, 1, 3, 4):
        if args[i] is not None and case != "empty-rows":
            args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(ops.add_norm_fwd.default, tuple(args))


MASKS = [[True, True, True, True], [False, True, True, True], [True, False, False, False],
         [False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("case", ["ln", "rms", "ln-noaffine", "rms-multidim", "bf16-fp32res",
                                  "fp16-fp32res-rms", "fp64"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("with_dres", [True, False])
def test_opcheck_bwd(case, mask, with_dres):
    x, res, ns, w, b, eps, rms = _fwd_cases()[case]
    out, r, mean, rstd = ops.add_norm_fwd(x, res, ns, w, b, eps, rms)
    sd = F64 if x.dtype == F64 else F32
    assert mean.dtype == rstd.dtype == sd
    rows = x.numel() // r[(0,) * (x.dim() - len(ns))].numel()
    assert rstd.shape == (rows,) and mean.shape == ((0,) if rms else (rows,))
    m = [mask[0], mask[1], mask[2] and w is not None, mask[3] and b is not None and not rms]
    args = (torch.randn_like(out), torch.randn_like(r) if with_dres else None, r, mean, rstd, w, ns,
            rms, x.dtype, m)
    grads = ops.add_norm_bwd(*args)
    for t, on in zip(grads, m):
        if not on:
            assert t.shape == (0,)
    if m[0]:
        assert grads[0].dtype == x.dtype
    if m[1]:
        assert grads[1].dtype == r.dtype
    torch.library.opcheck(ops.add_norm_bwd.default, args)


def test_op_dtype_and_shape_errors():
    x = torch.randn(2, 4, dtype=BF16)
    with pytest.raises(RuntimeError, match="bfloat16.*float16|float16.*bfloat16"):
        ops.add_norm_fwd(x, torch.randn(2, 4, dtype=F16), [4], None, None, 1e-5, True)
    with pytest.raises(RuntimeError) as e:
        ops.add_norm_fwd(x, torch.randn(2, 5, dtype=BF16), [4], None, None, 1e-5, True)
    assert mentions_shape(str(e.value), (2, 4)) and mentions_shape(str(e.value), (2, 5))


# ----------------------------------------------------------------------------------------------
# autograd: gradcheck, double backward, forward AD
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("ns", [[5], [3, 5]], ids=str)
def test_gradcheck_gradgradcheck_forward_ad(rms, ns):
    FN.set_cpu_fast_path(False)
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
        res = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
        w = (torch.rand(ns, dtype=F64) + 0.5).requires_grad_()
        b = torch.randn(ns, dtype=F64, requires_grad=True)
        if rms:
            fn, args = (lambda x, res, w: FN.add_rms_norm(x, res, ns, w, 1e-4)), (x, res, w)
        else:
            fn, args = (lambda x, res, w, b: FN.add_layer_norm(x, res, ns, w, b, 1e-4)), (x, res, w, b)
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, args)
    finally:
        FN.set_cpu_fast_path(True)


# ----------------------------------------------------------------------------------------------
# torch.compile, torch.func
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_compile_fullgraph(rms):
    torch.manual_seed(0)
    x, res = torch.randn(3, 8, dtype=BF16), torch.randn(3, 8)
    w, b = torch.rand(8) + 0.5, torch.randn(8)

    def step(x, res, w, b):
        out, r = FN.add_rms_norm(x, res, [8], w) if rms else FN.add_layer_norm(x, res, [8], w, b)
        return out.float().sum() + r.sum()

    assert_compiled_matches_eager(step, (x, res, w, b), BF16)


@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("xb,rb,pb", [(True, True, False), (True, False, False), (False, True, True),
                                      (True, True, True)], ids=str)
def test_vmap_and_per_sample_grads(rms, xb, rb, pb, no_vmap_fallback):
    torch.manual_seed(0)
    B = 3
    x = torch.randn(*((B,) if xb else ()), 4, 5, dtype=F64)
    res = torch.randn(*((B,) if rb else ()), 4, 5, dtype=F64)
    w = torch.rand(*((B,) if pb else ()), 5, dtype=F64) + 0.5
    b = torch.randn(*((B,) if pb else ()), 5, dtype=F64)
    dims = (0 if xb else None, 0 if rb else None, 0 if pb else None, 0 if pb else None)

    def fn(x, res, w, b):
        return FN.add_rms_norm(x, res, [5], w, 1e-5) if rms else FN.add_layer_norm(x, res, [5], w, b)

    def pick(t, on, i):
        return t[i] if on else t

    out, r = vmap(fn, in_dims=dims)(x, res, w, b)
    for i in range(B):
        e_out, e_r = _torch_composition(rms, pick(x, xb, i), pick(res, rb, i), [5], pick(w, pb, i),
                                        None if rms else pick(b, pb, i), 1e-5 if rms else None)
        assert_close_scaled(out[i], e_out, F64)
        assert_close_scaled(r[i], e_r, F64)

    def loss(x, res, w, b):
        o, rr = fn(x, res, w, b)
        return (o.sin() * rr).sum()

    gs = vmap(grad(loss, argnums=(0, 1, 2, 3)), in_dims=dims)(x, res, w, b)
    for i in range(B):
        leaves = [pick(t, on, i).clone().requires_grad_() for t, on in
                  ((x, xb), (res, rb), (w, pb), (b, pb))]
        o, rr = _torch_composition(rms, *leaves[:2], [5], leaves[2], None if rms else leaves[3],
                                   1e-5 if rms else None)
        want = torch.autograd.grad((o.sin() * rr).sum(), leaves, allow_unused=True,
                                   materialize_grads=True)
        for g, e in zip(gs, want):
            assert_close_scaled(g[i], e, F64)


def test_jvp():
    torch.manual_seed(0)
    x, res = torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)
    w, b = torch.rand(6, dtype=F64) + 0.5, torch.randn(6, dtype=F64)
    tangents = tuple(torch.randn_like(t) for t in (x, res, w, b))
    for rms in (True, False):
        def ours(x, res, w, b):
            return FN.add_rms_norm(x, res, [6], w) if rms else FN.add_layer_norm(x, res, [6], w, b)

        def theirs(x, res, w, b):
            return _torch_composition(rms, x, res, [6], w, None if rms else b, None)

        _, got = jvp(ours, (x, res, w, b), tangents)
        _, want = jvp(theirs, (x, res, w, b), tangents)
        for a, e in zip(got, want):
            assert_close_scaled(a, e, F64)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [True, False], ids=["fast", "op"])
def test_errors(p):
    was = FN.set_cpu_fast_path(p)
    try:
        x = torch.randn(3, 8)
        for fn in (FN.add_rms_norm, FN.add_layer_norm):
            with pytest.raises(RuntimeError) as e:
                fn(x, torch.randn(3, 7), [8])
            assert mentions_shape(str(e.value), (3, 8)) and mentions_shape(str(e.value), (3, 7))
            with pytest.raises(RuntimeError) as e:
                fn(x, torch.randn(8), [8])  # broadcastable is not enough: shapes must match
            assert mentions_shape(str(e.value), (8,))
            with pytest.raises(RuntimeError) as e:
                fn(x, x, [7])
            assert mentions_shape(str(e.value), (3, 8))
            with pytest.raises(RuntimeError):
                fn(x, x, [])
            with pytest.raises(RuntimeError) as e:
                fn(x, x, [8], torch.ones(7))
            assert mentions_shape(str(e.value), (7,))
            with pytest.raises(NotImplementedError):
                fn(x.long(), x, [8])
            with pytest.raises(NotImplementedError):
                fn(x, x.long(), [8])
        with pytest.raises(RuntimeError) as e:
            FN.add_layer_norm(x, x, [8], None, torch.ones(1, 8))
        assert mentions_shape(str(e.value), (1, 8))
    finally:
        FN.set_cpu_fast_path(was)
