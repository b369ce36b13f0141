"""Fused activation epilogues: fastnorm.activations against the kernels' header, the
ops' activation arguments (reference kernels against an independent float64 composition,
opcheck, vmap, unknown codes) and fastnorm.functional's batch_norm_act / group_norm_act /
layer_norm_act / layer_norm2d_act (both CPU paths, gradients, double backward, forward AD,
torch.compile, argument errors)."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
import fastnorm.functional as FN
from fastnorm import activations as A
from conftest import assert_close_scaled

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.fastnorm

# (name, param) of every activation, leaky_relu with a slope that is not torch's default
ACTS = [(n, 0.2 if n == "leaky_relu" else None) for n in A.NAMES]
SOME_ACTS = [("relu", None), ("leaky_relu", -0.3), ("gelu_tanh", None), ("mish", None)]


def _param(p):
    return 0.0 if p is None else p


def _torch_act(name, p):
    """torch's own activation module for a table name (an independent spelling of the table)."""
    return {"identity": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(),
            "leaky_relu": nn.LeakyReLU(0.01 if p is None else p), "silu": nn.SiLU(),
            "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(), "mish": nn.Mish(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[name]


@pytest.fixture(params=["aten", "op"])
def cpu_path(request):
    was = FN.set_cpu_fast_path(request.param == "aten")
    yield request.param
    FN.set_cpu_fast_path(was)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
def test_codes_match_the_kernel_header():
    with open(os.path.join(REPO, "csrc", "kernels", "activation.cuh")) as f:
        text = f.read()
    body = re.search(r"enum ActKind : int \{(.*?)\};", text, re.S).group(1)
    entries = re.findall(r"kAct(\w+)\s*=\s*(\d+)", body)
    codes = {re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower(): int(v) for n, v in entries}
    count = codes.pop("count")
    assert codes == {name: act.code for name, act in A.ACTIVATIONS.items()}
    assert count == len(A.NAMES) == len(set(codes.values()))
    assert [A.ACTIVATIONS[n].code for n in A.NAMES] == list(range(count))
    assert [n for n in A.NAMES if A.ACTIVATIONS[n].has_param] == ["leaky_relu"]


@pytest.mark.parametrize("name,p", ACTS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_table_forward_backward_and_derivative_are_torch(name, p, dtype):
    code = A.code_of(name)
    # values at the kinks of every piecewise activation, and a spread
    z = torch.tensor([-7.0, -6.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 7.0, 25.0, -25.0], dtype=dtype)
    z = torch.cat([z, torch.randn(50, dtype=dtype) * 4])
    zr = z.clone().requires_grad_()
    ref = _torch_act(name, p)(zr)
    dy = torch.randn_like(z)
    (dz_ref,) = torch.autograd.grad(ref, zr, dy)
    torch.testing.assert_close(A.apply(code, z, _param(p)), ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(A.grad(code, dy, z, _param(p)), dz_ref, rtol=0, atol=0)
    tol = 1e-12 if dtype == F64 else 2e-6
    torch.testing.assert_close(dy * A.derivative(code, z, _param(p)), dz_ref, rtol=tol, atol=tol)


def test_names_aliases_and_params():
    assert A.code_of("SiLU") == A.code_of("swish") == 4
    assert A.code_of("hard_swish") == 7 and A.code_of("none") == 0
    assert A.param_of("leaky_relu", None) == 0.01 and A.param_of("leaky_relu", 0.3) == 0.3
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        A.code_of("elu")
    with pytest.raises(TypeError, match="name"):
        A.code_of(nn.ReLU)
    with pytest.raises(ValueError, match="takes no activation_param"):
        A.param_of("relu", 0.5)
    with pytest.raises(ValueError, match=r"activation must be a code in \[0, 12\).*got 12"):
        A.check_code(12)


def test_from_module():
    timm_acts = pytest.importorskip("timm.layers.activations")
    known = {
        nn.Identity(): ("identity", 0.0), nn.ReLU(inplace=True): ("relu", 0.0),
        nn.ReLU6(): ("relu6", 0.0), nn.LeakyReLU(0.3, inplace=True): ("leaky_relu", 0.3),
        nn.SiLU(inplace=True): ("silu", 0.0), nn.GELU(): ("gelu", 0.0),
        nn.GELU(approximate="tanh"): ("gelu_tanh", 0.0), nn.Hardswish(): ("hardswish", 0.0),
        nn.Hardsigmoid(inplace=True): ("hardsigmoid", 0.0), nn.Mish(): ("mish", 0.0),
        nn.Sigmoid(): ("sigmoid", 0.0), nn.Tanh(): ("tanh", 0.0),
        timm_acts.Swish(inplace=True): ("silu", 0.0), timm_acts.Mish(): ("mish", 0.0),
        timm_acts.Sigmoid(inplace=True): ("sigmoid", 0.0), timm_acts.Tanh(): ("tanh", 0.0),
        timm_acts.GELU(): ("gelu", 0.0), timm_acts.GELUTanh(): ("gelu_tanh", 0.0),
        timm_acts.HardSigmoid(): ("hardsigmoid", 0.0),
        timm_acts.HardSigmoid(inplace=True): ("hardsigmoid", 0.0),
        timm_acts.HardSwish(): ("hardswish", 0.0), timm_acts.HardSwish(inplace=True): ("hardswish", 0.0),
    }
    for m, expected in known.items():
        assert A.from_module(m) == expected, m
        # the module computes what the table says (forward and gradient, at the kinks too),
        # in-place or not
        z = torch.cat([torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0], dtype=F64),
                       torch.randn(64, dtype=F64) * 4])
        zr = z.clone().requires_grad_()
        y = m(zr.clone())
        dy = torch.randn_like(z)
        (dz,) = torch.autograd.grad(y, zr, dy)
        code = A.code_of(expected[0])
        # (to rounding: timm's modules write the functions with other ops; torch's hardsigmoid
        # backward rounds its 1/6 to float32)
        torch.testing.assert_close(A.apply(code, z, expected[1]), y.detach(), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(A.grad(code, dy, z, expected[1]), dz, rtol=1e-7, atol=1e-14)

    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    unknown = [nn.ELU(), nn.PReLU(), nn.GELU(approximate="none"), MyReLU(), nn.Softplus(),
               timm_acts.HardMish(), timm_acts.QuickGELU(), timm_acts.PReLU(), nn.Dropout()]
    assert A.from_module(unknown[2]) == ("gelu", 0.0)
    for m in unknown[:2] + unknown[3:]:
        assert A.from_module(m) is None, m
    # hooks: fusing would skip them
    relu = nn.ReLU()
    h = relu.register_forward_hook(lambda *a: None)
    assert A.from_module(relu) is None
    h.remove()
    assert A.from_module(relu) == ("relu", 0.0)
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert A.from_module(relu) is None
    finally:
        h.remove()


# ----------------------------------------------------------------------------------------------
# the ops: references against an independent float64 composition
# ----------------------------------------------------------------------------------------------
def _cases():
    """(family, x shape, extra, channels_last) with an op-call builder each."""
    return [("bn_train", (3, 5, 4, 3), None, False), ("bn_train", (2, 7, 3, 5), None, True),
            ("bn_eval", (3, 5, 4, 3), None, True), ("bn_train", (4, 3), None, False),
            ("gn", (2, 6, 5, 3), 3, False), ("gn", (3, 6, 4, 4), 2, True), ("gn", (2, 4, 7), 4, False),
            ("ln", (4, 3, 7), [7], False), ("ln", (2, 3, 5), [3, 5], False), ("ln", (5, 1), [1], False),
            ("ln2d", (2, 6, 3, 4), None, False), ("ln2d", (2, 5, 3, 3), None, True),
            ("ln2d", (3, 4, 7), None, False)]


def _params(family, x, extra, dtype):
    c = x.shape[-1] if family == "ln" and len(extra) == 1 else x.shape[1]
    shape = extra if family == "ln" else [c]
    g = torch.Generator().manual_seed(5)
    w = (torch.rand(shape, generator=g, dtype=F64) + 0.5).to(dtype)
    b = (torch.randn(shape, generator=g, dtype=F64) * 0.5).to(dtype)
    return w, b


def _float64_reference(family, x, w, b, extra, rm, rv, name, p):
    """act(norm(x)) in float64 with torch.nn.functional (differentiable)."""
    x, w, b = x.double(), w.double(), b.double()
    if family == "bn_train":
        y = F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    elif family == "bn_eval":
        y = F.batch_norm(x, rm.double(), rv.double(), w, b, False, 0.0, 1e-5)
    elif family == "gn":
        y = F.group_norm(x, extra, w, b, 1e-5)
    elif family == "ln":
        y = F.layer_norm(x, extra, w, b, 1e-5)
    else:
        y = F.layer_norm(x.movedim(1, -1), [x.shape[1]], w, b, 1e-5).movedim(-1, 1)
    return _torch_act(name, p)(y)


def _run_op(family, x, w, b, extra, rm, rv, code, p, mask=(True, True, True), dy=None):
    """(y, mean, rstd) of the fwd op and (dx, dw, db) of the bwd op for grad_out dy."""
    if family.startswith("bn"):
        training = family == "bn_train"
        y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, None, training, 0.1, 1e-5, code, p)
        grads = ops.batch_norm_bwd(dy, x, mean, rstd, w, training, list(mask), b, code, p)
    elif family == "gn":
        y, mean, rstd = ops.group_norm_fwd(x, w, b, extra, 1e-5, None, code, p)
        grads = ops.group_norm_bwd(dy, x, mean, rstd, w, extra, list(mask), b, code, p)
    elif family == "ln":
        y, mean, rstd = ops.layer_norm_fwd(x, extra, w, b, 1e-5, None, code, p)
        grads = ops.layer_norm_bwd(dy, x, mean, rstd, w, extra, list(mask), b, code, p)
    else:
        y, mean, rstd = ops.layer_norm2d_fwd(x, w, b, 1e-5, None, code, p)
        grads = ops.layer_norm2d_bwd(dy, x, mean, rstd, w, list(mask), b, code, p)
    return y, mean, rstd, grads


def _input(shape, dtype, channels_last, seed=0):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 + 0.3)
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("name,p", ACTS)
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
def test_ops_against_float64_reference(name, p, dtype):
    code, pp = A.code_of(name), A.param_of(name, p)
    factor = {F64: 10, F32: 10, BF16: 2, F16: 2}[dtype]
    for family, shape, extra, cl in _cases():
        x = _input(shape, dtype, cl)
        w, b = _params(family, x, extra, dtype)
        rm = (torch.randn(x.shape[1], dtype=F64) * 0.3).to(dtype)
        rv = (torch.rand(x.shape[1], dtype=F64) + 0.5).to(dtype)
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(dtype)
        y, mean, rstd, (dx, dw, db) = _run_op(family, x, w, b, extra, rm.clone(), rv.clone(),
                                              code, pp, dy=dy)
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        yr = _float64_reference(family, xr, wr, br, extra, rm, rv, name, p)
        gr = torch.autograd.grad(yr, (xr, wr, br), dy.double())
        msg = f"{family} {shape} {dtype} {name}"
        assert y.dtype == dtype and y.shape == x.shape
        if family != "ln":
            assert y.is_contiguous(memory_format=torch.channels_last) == cl or x.dim() != 4, msg
            assert dx.is_contiguous(memory_format=torch.channels_last) == cl or x.dim() != 4, msg
        assert_close_scaled(y.double(), yr.detach(), dtype, factor=factor, msg=msg + " y")
        assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
        for got, exp, what in zip((dx, dw, db), gr, ("dx", "dw", "db")):
            assert_close_scaled(got.double(), exp, dtype, factor=factor * 4, msg=f"{msg} {what}")


@pytest.mark.parametrize("family", ["bn_train", "gn", "ln", "ln2d"])
def test_activation_zero_is_the_plain_op_and_ignores_the_bias_argument(family):
    shape, extra = {"bn_train": ((3, 5, 4, 3), None), "gn": ((2, 6, 5, 3), 3),
                    "ln": ((4, 3, 7), [7]), "ln2d": ((2, 6, 3, 4), None)}[family]
    x = _input(shape, F32, False)
    w, b = _params(family, x, extra, F32)
    dy = torch.randn(shape)
    y0, m0, r0, g0 = _run_op(family, x, w, b, extra, None, None, 0, 0.0, dy=dy)
    # the plain op called without the new arguments
    if family == "bn_train":
        y1, m1, r1 = ops.batch_norm_fwd(x, w, b, None, None, None, True, 0.1, 1e-5)
        g1 = ops.batch_norm_bwd(dy, x, m1, r1, w, True, [True, True, True])
    elif family == "gn":
        y1, m1, r1 = ops.group_norm_fwd(x, w, b, extra, 1e-5)
        g1 = ops.group_norm_bwd(dy, x, m1, r1, w, extra, [True, True, True])
    elif family == "ln":
        y1, m1, r1 = ops.layer_norm_fwd(x, extra, w, b, 1e-5)
        g1 = ops.layer_norm_bwd(dy, x, m1, r1, w, extra, [True, True, True])
    else:
        y1, m1, r1 = ops.layer_norm2d_fwd(x, w, b, 1e-5)
        g1 = ops.layer_norm2d_bwd(dy, x, m1, r1, w, [True, True, True])
    for a, e in zip((y0, m0, r0, *g0), (y1, m1, r1, *g1)):
        assert torch.equal(a, e)


def test_batch_norm_op_running_statistics_with_activation():
    x = _input((4, 5, 3, 3), F32, True)
    w, b = _params("bn_train", x, None, F32)
    for momentum in (0.1, None):
        stats = [(torch.zeros(5), torch.ones(5), torch.tensor(2)) for _ in range(2)]
        ops.batch_norm_fwd(x, w, b, *stats[0], True, momentum, 1e-5)
        ops.batch_norm_fwd(x, w, b, *stats[1], True, momentum, 1e-5, A.code_of("silu"), 0.0)
        for a, e in zip(*stats):
            assert torch.equal(a, e)
        assert int(stats[1][2]) == 3


@pytest.mark.parametrize("family", ["bn_train", "bn_eval", "gn", "ln", "ln2d"])
def test_ops_masks_and_no_weight_or_bias(family):
    shape, extra = {"bn_train": ((3, 5, 4, 3), None), "bn_eval": ((3, 5, 4, 3), None),
                    "gn": ((2, 6, 5, 3), 3), "ln": ((4, 3, 7), [7]),
                    "ln2d": ((2, 6, 3, 4), None)}[family]
    x = _input(shape, F64, False)
    w, b = _params(family, x, extra, F64)
    rm, rv = torch.zeros(x.shape[1], dtype=F64), torch.ones(x.shape[1], dtype=F64)
    dy = torch.randn(shape, dtype=F64)
    code = A.code_of("silu")
    for wi, bi in ((w, None), (None, b), (None, None)):
        # autograd asks for dweight / dbias only of the parameters that exist
        have = (True, wi is not None, bi is not None)
        _, _, _, full = _run_op(family, x, wi, bi, extra, rm.clone(), rv.clone(), code, 0.0,
                                mask=have, dy=dy)
        xr = x.clone().requires_grad_()
        yr = _float64_reference(family, xr, torch.ones_like(w) if wi is None else wi,
                                torch.zeros_like(b) if bi is None else bi, extra, rm, rv, "silu",
                                None)
        (dxr,) = torch.autograd.grad(yr, xr, dy)
        torch.testing.assert_close(full[0], dxr, rtol=1e-10, atol=1e-10)
        for mask in ((True, False, False), (False, True, True), (False, False, True)):
            mask = tuple(m and h for m, h in zip(mask, have))
            _, _, _, part = _run_op(family, x, wi, bi, extra, rm.clone(), rv.clone(), code, 0.0,
                                    mask=mask, dy=dy)
            for on, a, e in zip(mask, part, full):
                if on:
                    torch.testing.assert_close(a, e, rtol=0, atol=0)
                else:
                    assert a.numel() == 0


@pytest.mark.parametrize("family", ["bn_train", "gn", "ln", "ln2d"])
def test_ops_unknown_activation_code_raises_value_error(family):
    shape, extra = {"bn_train": ((3, 5, 4, 3), None), "gn": ((2, 6, 5, 3), 3),
                    "ln": ((4, 3, 7), [7]), "ln2d": ((2, 6, 3, 4), None)}[family]
    x = _input(shape, F32, False)
    w, b = _params(family, x, extra, F32)
    _, mean, rstd, _ = _run_op(family, x, w, b, extra, None, None, 1, 0.0, dy=torch.ones(shape))
    for bad in (-1, 12, 99):
        with pytest.raises(ValueError, match=rf"activation must be a code in \[0, 12\).*got {bad}"):
            _run_op(family, x, w, b, extra, None, None, bad, 0.0, dy=torch.ones(shape))
    # the backward op alone
    nbt = torch.tensor(0)
    with pytest.raises(ValueError, match="_bwd: activation"):
        if family == "bn_train":
            ops.batch_norm_bwd(torch.ones(shape), x, mean, rstd, w, True, [True] * 3, b, 12, 0.0)
        elif family == "gn":
            ops.group_norm_bwd(torch.ones(shape), x, mean, rstd, w, extra, [True] * 3, b, 12, 0.0)
        elif family == "ln":
            ops.layer_norm_bwd(torch.ones(shape), x, mean, rstd, w, extra, [True] * 3, b, 12, 0.0)
        else:
            ops.layer_norm2d_bwd(torch.ones(shape), x, mean, rstd, w, [True] * 3, b, 12, 0.0)
    assert int(nbt) == 0


# ----------------------------------------------------------------------------------------------
# opcheck: every op x a few activations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,p", SOME_ACTS)
@pytest.mark.parametrize("family", ["bn_train", "bn_eval", "gn", "ln", "ln2d"])
def test_opcheck(family, name, p):
    shape, extra, cl = {"bn_train": ((3, 5, 4, 3), None, True), "bn_eval": ((3, 5, 4, 3), None, False),
                        "gn": ((2, 6, 5, 3), 3, True), "ln": ((4, 3, 7), [7], False),
                        "ln2d": ((2, 6, 3, 4), None, True)}[family]
    code, pp = A.code_of(name), A.param_of(name, p)
    x = _input(shape, F32, cl)
    w, b = _params(family, x, extra, F32)
    w.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(shape)
    if family.startswith("bn"):
        training = family == "bn_train"
        rm, rv, nbt = torch.zeros(x.shape[1]), torch.ones(x.shape[1]), torch.tensor(0)
        # no autograd registration (the Function wraps it): inputs without requires_grad
        fwd = (ops.batch_norm_fwd.default,
               (x, w.detach(), b.detach(), rm, rv, nbt, training, 0.1, 1e-5, code, pp))
        _, mean, rstd = ops.batch_norm_fwd(x, w.detach(), b.detach(), rm.clone(), rv.clone(),
                                           None, training, 0.1, 1e-5, code, pp)
        bwd = (ops.batch_norm_bwd.default,
               (dy, x, mean, rstd, w.detach(), training, [True] * 3, b.detach(), code, pp))
        fwd_tests = ("test_schema", "test_autograd_registration", "test_faketensor",
                     "test_aot_dispatch_dynamic")
    else:
        if family == "gn":
            fwd = (ops.group_norm_fwd.default, (x, w, b, extra, 1e-5, None, code, pp))
        elif family == "ln":
            fwd = (ops.layer_norm_fwd.default, (x, extra, w, b, 1e-5, None, code, pp))
        else:
            fwd = (ops.layer_norm2d_fwd.default, (x, w, b, 1e-5, None, code, pp))
        _, mean, rstd = fwd[0](*fwd[1])
        mean, rstd = mean.detach(), rstd.detach()
        if family == "gn":
            bwd = (ops.group_norm_bwd.default,
                   (dy, x, mean, rstd, w.detach(), extra, [True] * 3, b.detach(), code, pp))
        elif family == "ln":
            bwd = (ops.layer_norm_bwd.default,
                   (dy, x, mean, rstd, w.detach(), extra, [True] * 3, b.detach(), code, pp))
        else:
            bwd = (ops.layer_norm2d_bwd.default,
                   (dy, x, mean, rstd, w.detach(), [True] * 3, b.detach(), code, pp))
        fwd_tests = ("test_schema", "test_autograd_registration", "test_faketensor",
                     "test_aot_dispatch_dynamic")
    torch.library.opcheck(*fwd, test_utils=fwd_tests)
    torch.library.opcheck(*bwd, test_utils=("test_schema", "test_faketensor",
                                            "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------------------------
# fastnorm.functional's *_act
# ----------------------------------------------------------------------------------------------
def _functional(family, x, w, b, extra, name, p, rm=None, rv=None):
    if family == "bn_train":
        return FN.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, name, p)
    if family == "bn_eval":
        return FN.batch_norm_act(x, rm, rv, w, b, False, 0.1, 1e-5, activation=name,
                                 activation_param=p)
    if family == "gn":
        return FN.group_norm_act(x, extra, w, b, 1e-5, activation=name, activation_param=p)
    if family == "ln":
        return FN.layer_norm_act(x, extra, w, b, 1e-5, activation=name, activation_param=p)
    return FN.layer_norm2d_act(x, w, b, 1e-5, activation=name, activation_param=p)


def _unfused(family, x, w, b, extra, name, p, rm=None, rv=None):
    """The composition timm runs: the plain function, then torch's activation module."""
    if family == "bn_train":
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    elif family == "bn_eval":
        y = F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    elif family == "gn":
        y = F.group_norm(x, extra, w, b, 1e-5)
    elif family == "ln":
        y = F.layer_norm(x, extra, w, b, 1e-5)
    else:
        y = F.layer_norm(x.movedim(1, -1), [x.shape[1]], w, b, 1e-5).movedim(-1, 1)
    return _torch_act(name, p)(y)


FAMILIES = ["bn_train", "bn_eval", "gn", "ln", "ln2d"]


@pytest.mark.parametrize("name,p", ACTS)
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
def test_functional_matches_the_unfused_composition(name, p, dtype, cpu_path):
    factor = {F64: 10, F32: 10, BF16: 2}[dtype]
    for family, shape, extra, cl in _cases():
        x = _input(shape, dtype, cl)
        w, b = _params(family, x, extra, dtype)
        stats = [(torch.randn(x.shape[1], dtype=dtype) * 0.3, torch.rand(x.shape[1], dtype=dtype) + 0.5)
                 for _ in range(2)]
        stats[1] = (stats[0][0].clone(), stats[0][1].clone())
        ins = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
        y = _functional(family, *ins[0], extra, name, p, *stats[0])
        yt = _unfused(family, *ins[1], extra, name, p, *stats[1])
        dy = torch.randn(y.shape, dtype=F64).to(dtype)
        g = torch.autograd.grad(y, ins[0], dy)
        gt = torch.autograd.grad(yt, ins[1], dy)
        msg = f"{family} {shape} {name} {dtype} {cpu_path}"
        assert y.dtype == yt.dtype and y.shape == yt.shape
        if cpu_path == "aten" or dtype == F64:
            # the same ATen kernel and activation function on the CPU fast path
            assert_close_scaled(y, yt, dtype, factor=factor, msg=msg)
        else:  # fused: rounded once instead of twice
            assert_close_scaled(y, yt, dtype, factor=2 * factor, msg=msg)
        for a, e, what in zip(g, gt, ("dx", "dw", "db")):
            assert_close_scaled(a, e, dtype, factor=4 * factor, msg=f"{msg} {what}")
        for a, e in zip(stats[0], stats[1]):  # running statistics, updated the same way
            assert_close_scaled(a, e, dtype, factor=factor, msg=msg + " running stats")


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_gradcheck_double_backward_and_forward_ad(family, cpu_path):
    shape, extra = {"bn_train": ((3, 4, 3), None), "bn_eval": ((3, 4, 3), None),
                    "gn": ((2, 4, 3), 2), "ln": ((3, 5), [5]), "ln2d": ((2, 4, 3), None)}[family]
    x = _input(shape, F64, False).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(family, x, extra, F64))
    rm, rv = torch.zeros(x.shape[1], dtype=F64), torch.ones(x.shape[1], dtype=F64) * 2
    for name, p in (("silu", None), ("leaky_relu", 0.2), ("gelu_tanh", None), ("tanh", None)):
        def fn(x, w, b):
            return _functional(family, x, w, b, extra, name, p, rm.clone(), rv.clone())
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
        assert torch.autograd.gradcheck(fn, (x, w, b), check_forward_ad=True,
                                        check_backward_ad=False, check_undefined_grad=False,
                                        check_batched_grad=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_vmap_and_per_sample_grads(family):
    """torch.func.vmap over the op path: per-sample calls, batched affine parameters too."""
    shape, extra = {"bn_train": ((3, 4, 3), None), "bn_eval": ((3, 4, 3), None),
                    "gn": ((2, 4, 3), 2), "ln": ((3, 5), [5]), "ln2d": ((2, 4, 3), None)}[family]
    B = 3
    xs = torch.randn(B, *shape, dtype=F64)
    w, b = _params(family, xs[0], extra, F64)
    ws = torch.stack([w * (1 + 0.1 * i) for i in range(B)])
    bs = torch.stack([b - 0.1 * i for i in range(B)])
    rm, rv = torch.zeros(shape[1], dtype=F64), torch.ones(shape[1], dtype=F64) * 2
    name, p = "mish", None
    # train-mode BatchNorm without running statistics: vmap cannot update shared buffers
    stats = (rm, rv) if family == "bn_eval" else (None, None)

    def fn(x, w, b):
        return _functional(family, x, w, b, extra, name, p, *stats)

    def ref(x, w, b):
        return _unfused(family, x, w, b, extra, name, p, *stats)

    for in_dims, args in (((0, None, None), (xs, w, b)), ((0, 0, 0), (xs, ws, bs)),
                          ((None, 0, 0), (xs[0], ws, bs))):
        got = torch.func.vmap(fn, in_dims)(*args)
        exp = torch.stack([ref(*[a[i] if d == 0 else a for a, d in zip(args, in_dims)])
                           for i in range(B)])
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)

        def loss(x, w, b):
            return (fn(x, w, b) * torch.linspace(-1, 1, x.numel(), dtype=F64).view(x.shape)).sum()

        def loss_ref(x, w, b):
            return (ref(x, w, b) * torch.linspace(-1, 1, x.numel(), dtype=F64).view(x.shape)).sum()

        grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims)(*args)
        for i in range(B):
            one = [a[i] if d == 0 else a for a, d in zip(args, in_dims)]
            one = [t.clone().requires_grad_() for t in one]
            exp_g = torch.autograd.grad(loss_ref(*one), one)
            for gg, e in zip(grads, exp_g):
                torch.testing.assert_close(gg[i], e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_compiled_fullgraph(family):
    torch._dynamo.reset()
    shape, extra = {"bn_train": ((3, 4, 5, 3), None), "bn_eval": ((3, 4, 5, 3), None),
                    "gn": ((2, 4, 5, 3), 2), "ln": ((3, 5), [5]), "ln2d": ((2, 4, 5, 3), None)}[family]
    x = _input(shape, F32, False)
    w, b = _params(family, x, extra, F32)
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1]) * 2
    stats = [(rm.clone(), rv.clone()) for _ in range(2)]

    def fn(x, w, b, rm, rv):
        return _functional(family, x, w, b, extra, "silu", None, rm, rv)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ins = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    y = compiled(*ins[0], *stats[0])
    yt = fn(*ins[1], *stats[1])
    assert_close_scaled(y, yt, F32, factor=2)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, ins[0], dy), torch.autograd.grad(yt, ins[1], dy)):
        assert_close_scaled(a, e, F32, factor=4)
    for a, e in zip(stats[0], stats[1]):
        torch.testing.assert_close(a, e)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_errors_are_the_plain_functions(family, cpu_path):
    shape, extra = {"bn_train": ((3, 4, 3), None), "bn_eval": ((3, 4, 3), None),
                    "gn": ((2, 4, 3), 2), "ln": ((3, 5), [5]), "ln2d": ((2, 4, 3), None)}[family]
    x = torch.randn(shape)
    w, b = _params(family, x, extra, F32)
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    bad_w = torch.ones(w.numel() + 1)
    nbt_before = (rm.clone(), rv.clone())
    for args in ((x, bad_w, b), (x.to(torch.int64), w, b)):
        plain_exc = act_exc = None
        try:
            _unfused(family, *args, extra, "identity", None, rm, rv)
        except Exception as e:  # noqa: BLE001
            plain_exc = e
        try:
            _functional(family, *args, extra, "relu", None, rm, rv)
        except Exception as e:  # noqa: BLE001
            act_exc = e
        assert plain_exc is not None and act_exc is not None
        assert isinstance(act_exc, type(plain_exc)) or isinstance(plain_exc, type(act_exc)), (
            plain_exc, act_exc)
    for a, e in zip((rm, rv), nbt_before):
        assert torch.equal(a, e)  # nothing updated by a call that raised
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        _functional(family, x, w, b, extra, "elu", None, rm, rv)
    with pytest.raises(ValueError, match="takes no activation_param"):
        _functional(family, x, w, b, extra, "relu", 0.1, rm, rv)
    if family.startswith("bn"):
        with pytest.raises(TypeError, match="momentum"):
            FN.batch_norm_act(x, rm, rv, w, b, True, None)


def test_functional_empty_inputs():
    x = torch.randn(0, 4, 3)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    for name in ("relu", "sigmoid"):
        y = FN.batch_norm_act(x, None, None, w, b, True, activation=name)
        assert y.shape == x.shape
        y = FN.layer_norm2d_act(x, w, b, activation=name)
        assert y.shape == x.shape
        y = FN.group_norm_act(x, 2, w, b, activation=name)
        assert y.shape == x.shape
    y = FN.layer_norm_act(torch.randn(3, 0), [0], activation="sigmoid")
    assert y.shape == (3, 0)


def test_functional_exported_names():
    for n in ("batch_norm_act", "group_norm_act", "layer_norm_act", "layer_norm2d_act"):
        assert n in FN.__all__ and getattr(FN, n).__doc__


def test_vmap_batch_norm_unbatched_input_batched_parameters_updates_statistics_once():
    x = torch.randn(4, 3, 5, dtype=F64)
    ws, bs = torch.rand(2, 3, dtype=F64) + 0.5, torch.randn(2, 3, dtype=F64)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    rm_t, rv_t = rm.clone(), rv.clone()
    was = FN.set_cpu_fast_path(False)
    try:
        y = torch.func.vmap(lambda w, b: FN.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5,
                                                           "silu"))(ws, bs)
    finally:
        FN.set_cpu_fast_path(was)
    F.batch_norm(x, rm_t, rv_t, None, None, True, 0.1, 1e-5)
    expected = torch.stack([F.silu(F.batch_norm(x, None, None, ws[i], bs[i], True, 0.1, 1e-5))
                            for i in range(2)])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, rm_t, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_t, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bn_train", "gn", "ln", "ln2d"])
def test_fused_activation_saves_no_pre_activation_tensor(family):
    """The fused op path saves x, the parameters and the statistics for backward; the unfused
    composition saves the activation's input (an x-sized tensor) on top."""
    shape, extra = {"bn_train": ((8, 4, 6, 6), None), "gn": ((8, 4, 6, 6), 2),
                    "ln": ((8, 4, 36), [36]), "ln2d": ((8, 4, 6, 6), None)}[family]
    x = torch.randn(shape, requires_grad=True)
    w, b = (t.requires_grad_() for t in _params(family, x, extra, F32))

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    was = FN.set_cpu_fast_path(False)
    try:
        fused = saved_bytes(lambda: _functional(family, x, w, b, extra, "silu", None))
        plain = saved_bytes(lambda: _functional(family, x, w, b, extra, "identity", None))
        unfused = saved_bytes(lambda: F.silu(_functional(family, x, w, b, extra, "identity", None)))
    finally:
        FN.set_cpu_fast_path(was)
    assert fused == plain
    assert unfused - fused == x.numel() * x.element_size()
