"""fastnorm.functional.modulated_layer_norm / modulated_rms_norm / gated_residual_modulated_norm
(the AdaLN and AdaLN-Zero steps of diffusion transformers) against an independent float64
evaluation of their formulas: outputs and every gradient, every broadcast layout of the
modulation (per sample, per frame, per token, shared, odd broadcasts, scale and shift of different
layouts), every dtype and the mixed ones (half input with float32 modulation and weights, a float32
residual stream with a half branch), absent operands, awkward shapes, on the op path and the CPU
fast path. The fast path is bit for bit diffusers' spelling. Also: errors, opcheck of
fastnorm::modulated_norm_fwd / _bwd, gradcheck / gradgradcheck, torch.compile, torch.func."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import fastnorm.functional as FN
from conftest import assert_close_scaled, assert_compiled_matches_eager, mentions_shape

ops = torch.ops.fastnorm
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
EPS = 1e-6


@pytest.fixture(params=["op", "fast"])
def path(request):
    was = FN.set_cpu_fast_path(request.param == "fast")
    yield request.param
    FN.set_cpu_fast_path(was)


@pytest.fixture
def op_path():
    was = FN.set_cpu_fast_path(False)
    yield
    FN.set_cpu_fast_path(was)


def _rand(shape, dtype, scale=1.0, shift=0.0, grad=True):
    t = (torch.randn(shape, dtype=F64) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def _tol(*dts):
    for d in (BF16, F16, F32):
        if d in dts:
            return d
    return F64


def _d64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _ref64(x, scale, shift, w, b, eps, c, rms, residual=None, gate=None):
    """(y, residual_out) in float64 from float64 leaves, spelled out: the norm's rows are the
    branch added to the residual (times gate), rounded to the residual's dtype as stored (a
    straight-through rounding: the identity to autograd), or the input."""
    if residual is not None:
        r = residual.double() + (x.double() if gate is None else gate.double() * x.double())
        stored = r.detach().to(residual.dtype).double()
        r = r + (stored - r).detach()
    else:
        r = x.double()
    if rms:
        n = r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps)
    else:
        mu = r.mean(-1, keepdim=True)
        n = (r - mu) / torch.sqrt(((r - mu) ** 2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w.double()
    if b is not None:
        n = n + b.double()
    y = n * (c + scale.double()) if scale is not None else n * c
    if shift is not None:
        y = y + shift.double()
    return y, (r if residual is not None else None)


def _grads(outs, leaves, gos):
    """Gradients of the leaves that require grad (None for the others)."""
    want = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad([o for o in outs if o is not None], want,
                                   [g for o, g in zip(outs, gos) if o is not None]))
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


def _check_grads(got, want, leaves, tol, factor, names):
    for g, e, t, name in zip(got, want, leaves, names):
        if t is None or not t.requires_grad:
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, (name, g.dtype, g.shape)
        assert_close_scaled(g.double(), e, tol, factor=factor, msg=f"d{name}")


# ----------------------------------------------------------------------------------------------
# modulated_layer_norm / modulated_rms_norm
# ----------------------------------------------------------------------------------------------
# name: (x shape, scale shape, shift shape); D = 13 throughout (not a multiple of 8). "unsq":
# [B, D] unsqueezed to [B, 1, D] (the leaf is [B, D]).
D = 13
LAYOUTS = {
    "sample": ((2, 6, D), (2, 1, D), (2, 1, D)),
    "sample-unsq": ((3, 5, D), "unsq", "unsq"),
    "frame": ((2, 3, 4, D), (2, 3, 1, D), (2, 3, 1, D)),
    "token": ((2, 6, D), (2, 6, D), (2, 6, D)),
    "shared": ((2, 6, D), (D,), (D,)),
    "odd-1SD": ((2, 6, D), (1, 6, D), (1, 6, D)),
    "odd-BS1": ((2, 6, D), (2, 6, 1), (2, 6, 1)),
    "sample-token": ((2, 6, D), (2, 1, D), (2, 6, D)),
    "shared-frame": ((2, 3, 4, D), (D,), (2, 3, 1, D)),
    "frame-sample": ((2, 3, 4, D), (2, 3, 1, D), (2, 1, 1, D)),
}
# (input dtype, modulation / parameter dtype)
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F64, F64), (BF16, F32), (F16, F32)]


def _mod(spec, xshape, dtype, scale, shift=0.0):
    """(leaf, the tensor passed): "unsq" makes a [B, D] leaf passed as [B, 1, D]."""
    if spec == "unsq":
        leaf = _rand((xshape[0], xshape[-1]), dtype, scale, shift)
        return leaf, leaf.unsqueeze(1)
    leaf = _rand(spec, dtype, scale, shift)
    return leaf, leaf


def _plain(rms, x, scale, shift, w, b, eps=EPS, c=1.0):
    if rms:
        return FN.modulated_rms_norm(x, scale, shift, w, eps, c)
    return FN.modulated_layer_norm(x, scale, shift, w, b, eps, c)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("xd,md", DTYPE_PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in DTYPE_PAIRS])
@pytest.mark.parametrize("rms,affine", [(False, True), (False, False), (True, True), (True, False)],
                         ids=["ln-wb", "ln", "rms-w", "rms"])
def test_plain_matches_float64(layout, xd, md, rms, affine, path):
    xs, ss, ts = LAYOUTS[layout]
    x = _rand(xs, xd, 1.5, 0.3)
    scale_leaf, scale = _mod(ss, xs, md, 0.3)
    shift_leaf, shift = _mod(ts, xs, md, 0.5)
    w = _rand((D,), md, 0.2, 1.0) if affine else None
    b = _rand((D,), md, 0.2) if affine and not rms else None
    y = _plain(rms, x, scale, shift, w, b)
    assert y.dtype == xd and y.shape == x.shape
    leaves = [x, scale_leaf, shift_leaf, w, b]
    l64 = [_d64(t) for t in leaves]
    s64 = l64[1].unsqueeze(1) if ss == "unsq" else l64[1]
    t64 = l64[2].unsqueeze(1) if ts == "unsq" else l64[2]
    y64, _ = _ref64(l64[0], s64, t64, l64[3], l64[4], EPS, 1.0, rms)
    tol = _tol(xd, md)
    assert_close_scaled(y.double(), y64, tol, msg="y")
    go = torch.randn(xs, dtype=F64)
    got = _grads([y], leaves, [go.to(xd)])
    want = _grads([y64], l64, [go.to(xd).double()])
    _check_grads(got, want, leaves, tol, 4, ("input", "scale", "shift", "weight", "bias"))


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("absent", ["scale", "shift", "both", "weight"])
def test_absent_operands(rms, absent, path):
    x = _rand((2, 5, 8), F32, 1.5, 0.3)
    scale = None if absent in ("scale", "both") else _rand((2, 1, 8), F32, 0.3)
    shift = None if absent in ("shift", "both") else _rand((2, 1, 8), F32, 0.5)
    w = None if absent == "weight" else _rand((8,), F32, 0.2, 1.0)
    b = None if rms or absent == "weight" else _rand((8,), F32, 0.2)
    for c in (1.0, 0.0, 0.5):  # the scale offset: diffusers' 1, a plain multiply, other
        y = _plain(rms, x, scale, shift, w, b, EPS, c)
        leaves = [x, scale, shift, w, b]
        l64 = [_d64(t) for t in leaves]
        y64, _ = _ref64(*l64, EPS, c, rms)
        assert_close_scaled(y.double(), y64, F32)
        go = torch.randn(2, 5, 8)
        _check_grads(_grads([y], leaves, [go]), _grads([y64], l64, [go.double()]), leaves, F32, 4,
                     ("input", "scale", "shift", "weight", "bias"))


# (x shape, scale shape, shift shape): D = 1, 7, 8; one token; one row; empty batches (with
# operands of different layouts: per-sample segments of no rows against a shared row)
SHAPES = [((3, 4, 1), (3, 1, 1), (3, 1, 1)), ((2, 5, 7), (2, 1, 7), (2, 5, 7)),
          ((2, 5, 8), (2, 5, 8), (2, 5, 8)), ((2, 1, 13), (2, 1, 13), (2, 1, 13)),
          ((1, 1, 7), (7,), (7,)), ((4, 7), (4, 7), (7,)), ((0, 5, 8), (0, 1, 8), (0, 1, 8)),
          ((0, 5, 8), (8,), (0, 1, 8)), ((0, 5, 8), (8,), (0, 5, 8)), ((2, 0, 8), (2, 1, 8), (8,))]


def _factor(d, rms):
    """Rows of one element: LayerNorm's xhat is 0 and the input's gradient zero in exact
    arithmetic; ATen's (the fast path's) is the rounding of terms of size rstd * |dy| with
    rstd = 1 / sqrt(eps): judged at that scale."""
    return 40 if d == 1 and not rms else 4


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("xs,ss,ts", SHAPES, ids=["-".join("x".join(map(str, s)) for s in c)
                                                   for c in SHAPES])
def test_shapes(rms, dtype, xs, ss, ts, path):
    d = xs[-1]
    x = _rand(xs, dtype, 1.5, 0.3)
    scale, shift = _rand(ss, dtype, 0.3), _rand(ts, dtype, 0.5)
    w, b = _rand((d,), dtype, 0.2, 1.0), None if rms else _rand((d,), dtype, 0.2)
    y = _plain(rms, x, scale, shift, w, b)
    assert y.shape == x.shape and y.dtype == dtype
    leaves = [x, scale, shift, w, b]
    l64 = [_d64(t) for t in leaves]
    y64, _ = _ref64(*l64, EPS, 1.0, rms)
    assert_close_scaled(y.double(), y64, _tol(dtype))
    go = torch.randn(xs, dtype=F64).to(dtype)
    got = _grads([y], leaves, [go])
    want = _grads([y64], l64, [go.double()])
    if x.numel() == 0:  # nothing reaches the parameters: zero gradients of their own shapes
        for g, t in zip(got[1:], leaves[1:]):
            if t is not None:
                assert g.shape == t.shape and not g.any()
    _check_grads(got, want, leaves, _tol(dtype), _factor(d, rms),
                 ("input", "scale", "shift", "weight", "bias"))


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=str)
@pytest.mark.parametrize("layout", ["sample", "frame", "token", "shared", "odd-BS1"])
@pytest.mark.parametrize("path", ["fast"], indirect=True)
def test_fast_path_is_diffusers_spelling(rms, dtype, layout, path):
    """CPU fast path: bit for bit `F.layer_norm(x, (D,), w, b, eps) * (1 + scale) + shift` (or
    F.rms_norm), as diffusers' AdaLayerNorm* modules spell it; the op path is the same formula
    in float32, rounded once."""
    xs, ss, ts = LAYOUTS[layout]
    x = _rand(xs, dtype, 1.5, 0.3, grad=False)
    scale, shift = _rand(ss, dtype, 0.3, grad=False), _rand(ts, dtype, 0.5, grad=False)
    w, b = _rand((D,), dtype, 0.2, 1.0, grad=False), _rand((D,), dtype, 0.2, grad=False)
    if rms:
        want = F.rms_norm(x, (D,), w, EPS) * (1 + scale) + shift
        got = FN.modulated_rms_norm(x, scale, shift, w, EPS)
        plain = F.rms_norm(x, (D,), None, EPS) * (1 + scale)
        got_plain = FN.modulated_rms_norm(x, scale, None, None, EPS)
    else:
        want = F.layer_norm(x, (D,), w, b, EPS) * (1 + scale) + shift
        got = FN.modulated_layer_norm(x, scale, shift, w, b, EPS)
        plain = F.layer_norm(x, (D,), None, None, EPS) + shift
        got_plain = FN.modulated_layer_norm(x, None, shift, None, None, EPS)
    assert torch.equal(got, want)
    assert torch.equal(got_plain, plain)
    was = FN.set_cpu_fast_path(False)
    try:
        op = _plain(rms, x, scale, shift, w, None if rms else b)
    finally:
        FN.set_cpu_fast_path(was)
    assert_close_scaled(op, want, _tol(dtype))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("path", ["fast"], indirect=True)
def test_fast_path_mixed_dtypes(dtype, path):
    """A half input with float32 modulation and weights (a float32 adaLN linear): diffusers'
    spelling promotes to float32; fastnorm rounds that result to the input's dtype."""
    x = _rand((2, 5, 16), dtype, 1.5, 0.3, grad=False)
    scale, shift = _rand((2, 1, 16), F32, 0.3, grad=False), _rand((2, 1, 16), F32, 0.5, grad=False)
    w, b = _rand((16,), F32, 0.2, 1.0, grad=False), _rand((16,), F32, 0.2, grad=False)
    want = F.layer_norm(x, (16,), w, b, EPS) * (1 + scale) + shift
    assert want.dtype == F32
    assert torch.equal(FN.modulated_layer_norm(x, scale, shift, w, b, EPS), want.to(dtype))


# ----------------------------------------------------------------------------------------------
# gated_residual_modulated_norm
# ----------------------------------------------------------------------------------------------
# (residual dtype, branch dtype): one dtype, and a float32 residual stream with half branches
RES_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F64, F64), (F32, BF16), (F32, F16)]
# gate layouts against x [2, 6, D] (None: residual + branch)
GATES = {"none": None, "sample": (2, 1, D), "token": (2, 6, D), "shared": (D,), "odd-1SD": (1, 6, D)}


@pytest.mark.parametrize("rd,bd", RES_PAIRS, ids=[f"{a}-{b}".replace("torch.", "") for a, b in RES_PAIRS])
@pytest.mark.parametrize("gate_layout", list(GATES))
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gated_residual_matches_float64(rd, bd, gate_layout, kind, path):
    xs = (2, 6, D)
    md = F32 if bd in (BF16, F16) and rd == F32 else bd  # float32 modulation with half branches
    residual = _rand(xs, rd, 1.0, 0.5)
    branch = _rand(xs, bd, 1.5, 0.3)
    gs = GATES[gate_layout]
    gate = _rand(gs, md, 0.5, 0.2) if gs is not None else None
    scale, shift = _rand((2, 1, D), md, 0.3), _rand((2, 6, D), md, 0.5)
    w = _rand((D,), md, 0.2, 1.0)
    b = _rand((D,), md, 0.2) if kind == "layer" else None
    out, r = FN.gated_residual_modulated_norm(residual, branch, gate, scale, shift, w, b, EPS,
                                              kind=kind)
    assert out.dtype == bd and r.dtype == rd and out.shape == r.shape == xs
    # residual_out: summed in float32 (float64 for float64), stored once in the residual's dtype
    sd = F64 if F64 in (rd, bd) else F32
    with torch.no_grad():
        gb = branch.to(sd) if gate is None else gate.to(sd) * branch.to(sd)
        assert torch.equal(r, (residual.to(sd) + gb).to(rd))
    leaves = [residual, branch, gate, scale, shift, w, b]
    l64 = [_d64(t) for t in leaves]
    y64, r64 = _ref64(l64[1], l64[3], l64[4], l64[5], l64[6], EPS, 1.0, kind == "rms",
                      residual=l64[0], gate=l64[2])
    tol = _tol(rd, bd)
    assert_close_scaled(out.double(), y64, tol, msg="out (the norm of the stored residual_out)")
    go, gr = torch.randn(xs, dtype=F64).to(bd), torch.randn(xs, dtype=F64).to(rd)
    names = ("residual", "branch", "gate", "scale", "shift", "weight", "bias")
    # from both outputs, and from each alone
    for outs, outs64, gos in (((out, r), (y64, r64), (go, gr)), ((out, None), (y64, None), (go, None)),
                              ((None, r), (None, r64), (None, gr))):
        live = [t for t in leaves if t is not None]
        got = torch.autograd.grad([o for o in outs if o is not None], live,
                                  [g for g in gos if g is not None], retain_graph=True,
                                  allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad([o for o in outs64 if o is not None],
                                   [t for t in l64 if t is not None],
                                   [g.double() for g in gos if g is not None], retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        _check_grads(got, want, live, tol, 4, [n for n, t in zip(names, leaves) if t is not None])


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gated_residual_shapes_and_absent(kind, path):
    """D = 1 and 7, one token, an empty batch, no scale / shift / weight."""
    for xs, ms in (((3, 4, 1), (3, 1, 1)), ((2, 5, 7), (2, 1, 7)), ((2, 1, 8), (2, 1, 8)),
                   ((0, 5, 8), (0, 1, 8)), ((0, 5, 8), (8,))):  # shift: per token
        for absent in ((), ("scale", "shift"), ("weight", "bias"), ("gate",)):
            d = xs[-1]
            residual, branch = _rand(xs, F32, 1.0, 0.5), _rand(xs, F32, 1.5, 0.3)
            mk = {"gate": (ms, 0.5, 0.2), "scale": (ms, 0.3, 0.0), "shift": (xs, 0.5, 0.0),
                  "weight": ((d,), 0.2, 1.0), "bias": ((d,), 0.2, 0.0)}
            t = {k: None if k in absent or (k == "bias" and kind == "rms") else _rand(s, F32, a, o)
                 for k, (s, a, o) in mk.items()}
            out, r = FN.gated_residual_modulated_norm(residual, branch, t["gate"], t["scale"],
                                                      t["shift"], t["weight"], t["bias"], EPS,
                                                      kind=kind)
            leaves = [residual, branch, t["gate"], t["scale"], t["shift"], t["weight"], t["bias"]]
            l64 = [_d64(v) for v in leaves]
            y64, r64 = _ref64(l64[1], *l64[3:], EPS, 1.0, kind == "rms", residual=l64[0],
                              gate=l64[2])
            assert_close_scaled(out.double(), y64, F32, msg=f"{xs} {absent}")
            assert_close_scaled(r.double(), r64, F32, msg=f"{xs} {absent}")
            go, gr = torch.randn(xs), torch.randn(xs)
            live = [v for v in leaves if v is not None]
            got = torch.autograd.grad((out, r), live, (go, gr))
            want = torch.autograd.grad((y64, r64), [v for v in l64 if v is not None],
                                       (go.double(), gr.double()))
            for g, e, v in zip(got, want, live):
                assert g.shape == v.shape and g.dtype == v.dtype
                assert_close_scaled(g.double(), e, F32, factor=_factor(d, kind == "rms"),
                                    msg=f"{xs} {absent}")


def test_gated_residual_gradients_do_not_alias(op_path):
    """No gate: the residual's and the branch's gradients are equal but distinct tensors."""
    residual, branch = _rand((2, 3, 8), F32), _rand((2, 3, 8), F32)
    out, r = FN.gated_residual_modulated_norm(residual, branch, None, _rand((2, 1, 8), F32))
    (out.sum() + r.sum()).backward()
    assert torch.equal(residual.grad, branch.grad)
    residual.grad.add_(1)
    assert not torch.equal(residual.grad, branch.grad)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [True, False], ids=["fast", "op"])
def test_errors(p):
    was = FN.set_cpu_fast_path(p)
    try:
        x = torch.randn(2, 5, 8)
        for fn in (FN.modulated_layer_norm, FN.modulated_rms_norm):
            for bad in ((2, 8), (3, 1, 8), (2, 1, 7), (1, 2, 5, 8)):  # [B, D] not unsqueezed, ...
                for where in ("scale", "shift"):
                    with pytest.raises(RuntimeError) as e:
                        fn(x, **{where: torch.randn(bad)})
                    msg = str(e.value)
                    assert where in msg and mentions_shape(msg, bad) and mentions_shape(msg, (2, 5, 8)), msg
            with pytest.raises(RuntimeError) as e:
                fn(x, torch.randn(2, 1, 8), None, torch.ones(7))
            assert "weight" in str(e.value) and mentions_shape(str(e.value), (7,))
            with pytest.raises(RuntimeError, match="floating-point"):
                fn(x, torch.ones(2, 1, 8, dtype=torch.long))
            with pytest.raises(NotImplementedError):
                fn(x.long())
        with pytest.raises(RuntimeError) as e:
            FN.modulated_layer_norm(x, None, None, None, torch.ones(1, 8))
        assert "bias" in str(e.value) and mentions_shape(str(e.value), (1, 8))
        g = FN.gated_residual_modulated_norm
        with pytest.raises(RuntimeError) as e:
            g(x, torch.randn(2, 4, 8))
        msg = str(e.value)
        assert "residual" in msg and mentions_shape(msg, (2, 5, 8)) and mentions_shape(msg, (2, 4, 8))
        with pytest.raises(RuntimeError) as e:
            g(x, x, torch.randn(2, 8))
        assert "gate" in str(e.value) and mentions_shape(str(e.value), (2, 8))
        with pytest.raises(ValueError, match="'layer' or 'rms'.*'group'"):
            g(x, x, kind="group")
        with pytest.raises(ValueError, match="rms.*bias"):
            g(x, x, None, None, None, None, torch.ones(8), kind="rms")
        with pytest.raises(TypeError, match="residual"):
            g(None, x)
    finally:
        FN.set_cpu_fast_path(was)


def test_op_errors():
    x = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="seg_rows >= 1 dividing the 6 rows"):
        ops.modulated_norm_fwd(x, None, None, None, None, None, None, EPS, 1.0, 4, False)
    with pytest.raises(RuntimeError) as e:
        ops.modulated_norm_fwd(x, torch.randn(3, 8), None, None, None, None, None, EPS, 1.0, 3, False)
    assert mentions_shape(str(e.value), (2, 8)) and mentions_shape(str(e.value), (3, 8))
    with pytest.raises(RuntimeError, match="takes no bias"):
        ops.modulated_norm_fwd(x, None, None, None, torch.ones(8), None, None, EPS, 1.0, 1, True)
    with pytest.raises(RuntimeError, match="gate without a residual"):
        ops.modulated_norm_fwd(x, None, None, None, None, None, x, EPS, 1.0, 1, False)
    with pytest.raises(RuntimeError) as e:
        ops.modulated_norm_fwd(x, None, None, None, None, torch.randn(6, 7), None, EPS, 1.0, 1, False)
    assert mentions_shape(str(e.value), (6, 7))


# ----------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------
def _fwd_cases():
    torch.manual_seed(0)
    x, res = torch.randn(12, 8), torch.randn(12, 8)
    w, b = torch.rand(8) + 0.5, torch.randn(8)

    def m(q, dtype=F32):
        return torch.randn(q, 8, dtype=dtype)

    # (input, scale, shift, weight, bias, residual, gate, eps, scale_offset, seg_rows, rms)
    return {
        "ln-token": (x, m(12), m(12), w, b, None, None, EPS, 1.0, 1, False),
        "ln-seg4": (x, m(3), m(3), w, b, None, None, EPS, 1.0, 4, False),
        "ln-one-row": (x, m(1), m(1), None, None, None, None, EPS, 1.0, 12, False),
        "rms-seg3-offset0": (x, m(4), None, w, None, None, None, 1e-5, 0.0, 3, True),
        "no-mod": (x, None, None, w, b, None, None, EPS, 1.0, 2, False),
        "residual-gate": (x, m(2), m(2), w, b, res, m(2), EPS, 1.0, 6, False),
        "residual-nogate-rms": (x, m(6), m(6), w, None, res, None, EPS, 1.0, 2, True),
        "bf16-fp32res-gate": (x.bfloat16(), m(4), m(4), w, b, res, m(4), EPS, 1.0, 3, False),
        "fp16-fp32mod-rms": (x.half(), m(12), m(12), w, None, None, None, EPS, 1.0, 1, True),
        "fp64": (x.double(), m(3, F64), m(3, F64), w.double(), b.double(), res.double(),
                 m(3, F64), EPS, 1.0, 4, False),
        "empty-rows": (torch.randn(0, 8), m(0), m(0), w, b, torch.randn(0, 8), m(0), EPS, 1.0, 1,
                       False),
    }


@pytest.mark.parametrize("case", list(_fwd_cases()))
def test_opcheck_fwd(case):
    args = list(_fwd_cases()[case])
    for i in range(7):
        if args[i] is not None and case != "empty-rows":
            args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(ops.modulated_norm_fwd.default, tuple(args))


MASKS = [[True] * 6, [True, False, False, False, False, False],
         [False, True, True, False, False, False], [False, False, False, True, True, True]]


@pytest.mark.parametrize("case", ["ln-token", "ln-seg4", "rms-seg3-offset0", "no-mod",
                                  "residual-gate", "residual-nogate-rms", "bf16-fp32res-gate",
                                  "fp64"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
def test_opcheck_bwd(case, mask):
    x, scale, shift, w, b, res, gate, eps, c, seg, rms = _fwd_cases()[case]
    y, r, mean, rstd = ops.modulated_norm_fwd(x, scale, shift, w, b, res, gate, eps, c, seg, rms)
    sd = F64 if x.dtype == F64 else F32
    m = x.shape[0]
    assert y.dtype == x.dtype and rstd.dtype == sd and rstd.shape == (m,)
    assert mean.shape == ((0,) if rms else (m,))
    has_res = res is not None
    mod_dtype = (scale if scale is not None else x).dtype
    mask = [mask[0], mask[1] and scale is not None, mask[2] and shift is not None,
            mask[3] and w is not None, mask[4] and b is not None, mask[5] and has_res,
            mask[5] and gate is not None]
    args = (torch.randn_like(y), torch.randn_like(r) if has_res else None, r if has_res else x,
            x if mask[6] else None, scale, w, b, gate, mean, rstd, c, seg, rms, has_res, x.dtype,
            mod_dtype, mask)
    grads = ops.modulated_norm_bwd(*args)
    q = m // seg
    shapes = ((m, 8), (q, 8), (q, 8), (8,), (8,), (m, 8), (q, 8))
    for t, on, s in zip(grads, mask, shapes):
        assert t.shape == (s if on else (0,))
    torch.library.opcheck(ops.modulated_norm_bwd.default, args)


# ----------------------------------------------------------------------------------------------
# autograd, torch.compile, torch.func
# ----------------------------------------------------------------------------------------------
def test_gradcheck_gradgradcheck(op_path):
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    res = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    scale, gate = (torch.randn(2, 1, 5, dtype=F64, requires_grad=True) for _ in range(2))
    shift = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    w = (torch.rand(5, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=F64, requires_grad=True)
    cases = [
        (lambda x, s, t, w, b: FN.modulated_layer_norm(x, s, t, w, b, 1e-4), (x, scale, shift, w, b)),
        (lambda x, s, t, w: FN.modulated_rms_norm(x, s, t, w, 1e-4), (x, scale, shift, w)),
        (lambda r, x, g, s, t, w, b: FN.gated_residual_modulated_norm(r, x, g, s, t, w, b, 1e-4),
         (res, x, gate, scale, shift, w, b)),
        (lambda r, x, g, s, w: FN.gated_residual_modulated_norm(r, x, g, s, None, w, None, 1e-4,
                                                                kind="rms"),
         (res, x, gate, scale, w)),
    ]
    for fn, args in cases:
        assert torch.autograd.gradcheck(fn, args, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, args)


def test_compile_fullgraph(op_path):
    """One function calling the three (a DiT block's norms), compiled whole, against eager."""
    x, res = torch.randn(2, 6, 16, dtype=BF16), torch.randn(2, 6, 16)
    mods = [torch.randn(2, 1, 16) * 0.3 for _ in range(5)]
    w, b = torch.rand(16) + 0.5, torch.randn(16)

    def step(x, res, s1, t1, g, s2, t2, w, b):
        h = FN.modulated_layer_norm(x, s1, t1, w, b)
        out, r = FN.gated_residual_modulated_norm(res, h, g, s2, t2, w, b)
        z = FN.modulated_rms_norm(out, s2, None, w)
        return z.float().sum() + (r * r).sum()

    assert_compiled_matches_eager(step, (x, res, *mods, w, b), BF16)


def test_vmap_grad_jacrev(no_vmap_fallback):
    B = 3
    x = torch.randn(B, 4, 6, dtype=F64)
    scale, shift = torch.randn(B, 1, 6, dtype=F64) * 0.3, torch.randn(B, 4, 6, dtype=F64)
    w, b = torch.rand(6, dtype=F64) + 0.5, torch.randn(6, dtype=F64)

    def fn(x, s, t, w, b):
        return FN.modulated_layer_norm(x, s, t, w, b)

    def ref(x, s, t, w, b):
        return _ref64(x, s, t, w, b, EPS, 1.0, False)[0]

    y = vmap(fn, in_dims=(0, 0, 0, None, None))(x, scale, shift, w, b)
    for i in range(B):
        assert_close_scaled(y[i], ref(x[i], scale[i], shift[i], w, b), F64)

    def loss(f):
        return lambda *a: (f(*a).sin() * a[0]).sum()

    gs = vmap(grad(loss(fn), argnums=(0, 1, 2, 3, 4)), in_dims=(0, 0, 0, None, None))(
        x, scale, shift, w, b)
    for i in range(B):
        leaves = [t.clone().requires_grad_() for t in (x[i], scale[i], shift[i], w, b)]
        want = torch.autograd.grad(loss(ref)(*leaves), leaves)
        for g, e in zip(gs, want):
            assert_close_scaled(g[i], e, F64)
    # the Jacobian with respect to the input and the scale
    jx, js = jacrev(fn, argnums=(0, 1))(x, scale, shift, w, b)
    ex, es = torch.autograd.functional.jacobian(lambda x, s: ref(x, s, shift, w, b), (x, scale))
    assert_close_scaled(jx, ex, F64)
    assert_close_scaled(js, es, F64)
