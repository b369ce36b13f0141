"""torch's own test samples for these ops and modules, through fastnorm.

`torch.testing._internal.common_methods_invocations.op_db` (the OpInfos of
torch.nn.functional.batch_norm / layer_norm / group_norm / instance_norm: sample inputs and error
inputs) and `common_modules.module_db` (the ModuleInfos of BatchNorm*, InstanceNorm*, LayerNorm,
GroupNorm: constructor and forward inputs in training and eval, and error inputs): every input
torch accepts fastnorm accepts, with torch's result, gradients and buffers; every input torch
refuses fastnorm refuses, with the same exception type (or a subclass, as tests/test_errors.py:
NotImplementedError for an integer input where torch's mixed-dtype check raises RuntimeError),
leaving its buffers untouched.

A second table adds the edge cases found reading torch.nn.functional (empty inputs of every
shape, 1-D inputs, eps, group sizes, one running statistic) that the OpInfos do not sample.
"""
from __future__ import annotations

import copy
import sys
import types
import unittest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from conftest import assert_close_scaled

try:
    import expecttest  # noqa: F401  (torch's testing helpers import it; only its TestCase base)
except ImportError:
    _shim = types.ModuleType("expecttest")
    _shim.TestCase = unittest.TestCase
    sys.modules["expecttest"] = _shim

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

FUNCTIONALS = {
    "nn.functional.batch_norm": fastnorm.functional.batch_norm,
    "nn.functional.layer_norm": fastnorm.functional.layer_norm,
    "nn.functional.group_norm": fastnorm.functional.group_norm,
    "nn.functional.instance_norm": fastnorm.functional.instance_norm,
    "nn.functional.local_response_norm": fastnorm.functional.local_response_norm,
}
OPS = [op for op in op_db if op.name in FUNCTIONALS]
MODULES = [m for m in module_db if hasattr(fastnorm, m.module_cls.__name__)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
_DT_ID = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}


def test_torch_samples_found():
    """The sweep below covers every op and module fastnorm replaces."""
    assert {op.name for op in OPS} == set(FUNCTIONALS)
    assert {m.module_cls.__name__ for m in MODULES} == {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm"}


def _clone(tree, requires_grad=False):
    def f(t):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        return c.requires_grad_() if requires_grad and t.requires_grad else c
    return torch.utils._pytree.tree_map(f, tree)


def _run(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 (compared with torch's below)
        return None, e


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _close(actual, expected, dtype, msg):
    factor = 1.0 if dtype == torch.float64 else 4.0
    if expected.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} vs {expected.dtype}"
        nan = expected.isnan()
        if nan.any():  # a negative eps: NaN where torch has NaN, the rest equal
            assert torch.equal(actual.isnan(), nan), f"{msg}: NaN pattern"
            actual, expected = actual[~nan], expected[~nan]
        assert_close_scaled(actual, expected, dtype, factor, msg=msg)
    else:
        assert torch.equal(actual, expected), msg


def _compare_call(torch_fn, fast_fn, args, dtype, what):
    """Runs both on clones of args = (input, args, kwargs); compares acceptance, outputs, the
    tensors they mutate (running statistics) and, where inputs require grad, the gradients."""
    grad_on = any(t.requires_grad for t in _tensors(args))
    targs, fargs = _clone(args, grad_on), _clone(args, grad_on)
    yt, et = _run(lambda: torch_fn(targs[0], *targs[1], **targs[2]))
    yf, ef = _run(lambda: fast_fn(fargs[0], *fargs[1], **fargs[2]))
    if et is not None:
        assert ef is not None, f"{what}: torch raises {et!r}, fastnorm accepts"
        assert isinstance(ef, type(et)), f"{what}: fastnorm raises {ef!r}, torch {et!r}"
        return
    assert ef is None, f"{what}: torch accepts, fastnorm raises {ef!r}"
    assert yf.shape == yt.shape, f"{what}: shape {tuple(yf.shape)} vs {tuple(yt.shape)}"
    _close(yf, yt, dtype, f"{what}: output")
    for a, e, orig in zip(_tensors(fargs), _tensors(targs), _tensors(args)):
        # mutated arguments (running statistics) as torch leaves them; except that where torch
        # writes NaN into a finite statistic (instance_norm of an empty batch: the mean of no
        # rows) fastnorm keeps it: see test_modules_parity.py::test_instance_norm_tracked_empty_batch
        a, e = a.detach(), e.detach()
        nan_by_torch = e.isnan() & ~orig.isnan() if e.is_floating_point() else None
        if nan_by_torch is not None and nan_by_torch.any():
            assert torch.equal(a[nan_by_torch], orig.detach()[nan_by_torch]), what
            a, e = a[~nan_by_torch], e[~nan_by_torch]
        _close(a, e, dtype, f"{what}: argument after the call")
    if grad_on and yt.requires_grad:
        r = torch.randn(yt.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        leaves_t = [t for t in _tensors(targs) if t.requires_grad]
        leaves_f = [t for t in _tensors(fargs) if t.requires_grad]
        gt = torch.autograd.grad((yt * r.to(yt.dtype)).sum(), leaves_t, allow_unused=True)
        gf = torch.autograd.grad((yf * r.to(yf.dtype)).sum(), leaves_f, allow_unused=True)
        for a, e in zip(gf, gt):
            if e is None:
                assert a is None or not a.any(), f"{what}: gradient where torch has none"
            else:
                _close(a, e, dtype, f"{what}: gradient")


# ----------------------------------------------------------------------------------------------
# OpInfo samples: torch.nn.functional
# ----------------------------------------------------------------------------------------------
# gradients compared in float64
_OP_DTYPES = [(d, False) for d in DTYPES] + [(torch.float64, True)]


@pytest.mark.parametrize("dtype,requires_grad", _OP_DTYPES,
                         ids=[_DT_ID[d] + ("-grad" if g else "") for d, g in _OP_DTYPES])
@pytest.mark.parametrize("op", OPS, ids=[f"{o.name}-{o.variant_test_name}".rstrip("-") for o in OPS])
def test_opinfo_samples(op, dtype, requires_grad):
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=requires_grad))
    assert samples, "torch has samples for this op"
    for i, s in enumerate(samples):
        what = (f"{op.name} sample {i}: input {tuple(s.input.shape)}, args "
                f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in s.args]}, "
                f"kwargs { {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in s.kwargs.items()} }")
        _compare_call(op.op, FUNCTIONALS[op.name], (s.input, s.args, s.kwargs), dtype, what)


OPS_WITH_ERRORS = [op for op in OPS if op.error_inputs_func is not None]


@pytest.mark.parametrize("op", OPS_WITH_ERRORS, ids=[o.name for o in OPS_WITH_ERRORS])
def test_opinfo_error_inputs(op):
    errors = list(op.error_inputs("cpu"))
    assert errors
    for ei in errors:
        s = ei.sample_input
        with pytest.raises(ei.error_type):
            op.op(s.input, *s.args, **s.kwargs)
        with pytest.raises(ei.error_type):
            FUNCTIONALS[op.name](s.input, *s.args, **s.kwargs)


def test_batch_norm_empty_1d_input():
    """A 1-D input of shape (0,) with 0-size running statistics, training and
    eval: torch returns an empty tensor connected to autograd; so does fastnorm."""
    for training in (True, False):
        outs = []
        for M in (F, fastnorm.functional):
            x = torch.empty(0, dtype=torch.float64, requires_grad=True)
            rm, rv = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
            y = M.batch_norm(x, rm, rv, training=training)
            y.sum().backward()
            outs.append((y, x.grad, rm, rv))
        (yt, gt, *_), (yf, gf, rmf, rvf) = outs
        assert yf.shape == yt.shape == (0,) and yf.dtype == yt.dtype
        assert yf.grad_fn is not None and gf.shape == gt.shape
        assert rmf.shape == rvf.shape == (0,)


# ----------------------------------------------------------------------------------------------
# ModuleInfo samples: torch.nn modules (and their Lazy twins on the same inputs)
# ----------------------------------------------------------------------------------------------
def _module_pairs(mi, ctor):
    """(torch module, fastnorm module) pairs for this constructor input: the class itself and,
    for BatchNorm/InstanceNorm, its Lazy variant (num_features inferred)."""
    name = mi.module_cls.__name__
    yield getattr(nn, name), getattr(fastnorm, name), ctor.args, ctor.kwargs
    lazy = "Lazy" + name
    if hasattr(nn, lazy) and ctor.args:
        yield getattr(nn, lazy), getattr(fastnorm, lazy), ctor.args[1:], ctor.kwargs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mi", MODULES, ids=[m.module_cls.__name__ for m in MODULES])
def test_moduleinfo_samples(mi, dtype, training):
    inputs = list(mi.module_inputs_func(mi, device="cpu", dtype=dtype,
                                        requires_grad=dtype == torch.float64, training=training))
    assert inputs
    for i, mod_in in enumerate(inputs):
        for t_cls, f_cls, args, kwargs in _module_pairs(mi, mod_in.constructor_input):
            what = f"{t_cls.__name__}{args}{kwargs} sample {i} ({'train' if training else 'eval'})"
            torch.manual_seed(0)
            t = t_cls(*args, **kwargs).to(dtype=dtype)
            torch.manual_seed(0)
            f = f_cls(*args, **kwargs).to(dtype=dtype)
            f.load_state_dict(t.state_dict()) if not t_cls.__name__.startswith("Lazy") else None
            t.train(training)
            f.train(training)
            fwd = mod_in.forward_input
            _compare_module(t, f, fwd.args, fwd.kwargs, dtype, what)


def _compare_module(t, f, args, kwargs, dtype, what):
    grad_on = any(a.requires_grad for a in _tensors(args))
    targs, fargs = _clone(args, grad_on), _clone(args, grad_on)
    before = {k: v.clone() for k, v in f.state_dict().items()
              if not isinstance(v, nn.parameter.UninitializedTensorMixin)}
    yt, et = _run(lambda: t(*targs, **kwargs))
    yf, ef = _run(lambda: f(*fargs, **kwargs))
    if et is not None:
        assert ef is not None, f"{what}: torch raises {et!r}, fastnorm accepts"
        assert isinstance(ef, type(et)), f"{what}: fastnorm raises {ef!r}, torch {et!r}"
        for k, v in before.items():
            assert torch.equal(f.state_dict()[k], v), f"{what}: {k} changed by a call that raised"
        return
    assert ef is None, f"{what}: torch accepts, fastnorm raises {ef!r}"
    assert yf.shape == yt.shape
    _close(yf, yt, dtype, f"{what}: output")
    st, sf = t.state_dict(), f.state_dict()
    assert list(st) == list(sf)
    for k in st:
        _close(sf[k], st[k], dtype, f"{what}: {k}")
    if grad_on:
        r = torch.randn(yt.shape, generator=torch.Generator().manual_seed(0), dtype=yt.dtype)
        pt, pf = list(t.parameters()), list(f.parameters())
        lt = [a for a in _tensors(targs) if a.requires_grad] + pt
        lf = [a for a in _tensors(fargs) if a.requires_grad] + pf
        gt = torch.autograd.grad((yt * r).sum(), lt, allow_unused=True)
        gf = torch.autograd.grad((yf * r).sum(), lf, allow_unused=True)
        for a, e in zip(gf, gt):
            if e is not None:
                _close(a, e, dtype, f"{what}: gradient")


MODULES_WITH_ERRORS = [m for m in MODULES if m.module_error_inputs_func is not None]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mi", MODULES_WITH_ERRORS,
                         ids=[m.module_cls.__name__ for m in MODULES_WITH_ERRORS])
def test_moduleinfo_error_inputs(mi, training):
    errors = list(mi.module_error_inputs_func(mi, device="cpu", dtype=torch.float64,
                                               requires_grad=False, training=training))
    assert errors
    for ei in errors:
        mod_in = ei.module_error_input
        ctor, fwd = mod_in.constructor_input, mod_in.forward_input
        for t_cls, f_cls, args, kwargs in _module_pairs(mi, ctor):
            if ei.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(ei.error_type):
                    t_cls(*args, **kwargs)
                with pytest.raises(ei.error_type):
                    f_cls(*args, **kwargs)
                continue
            t = t_cls(*args, **kwargs).to(torch.float64).train(training)
            f = f_cls(*args, **kwargs).to(torch.float64).train(training)
            _compare_module(t, f, fwd.args, fwd.kwargs, torch.float64,
                            f"{t_cls.__name__}{args}{kwargs} error input")


# ----------------------------------------------------------------------------------------------
# edge cases beyond torch's samples (found reading torch.nn.functional and probing torch)
# ----------------------------------------------------------------------------------------------
def _z(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _stats(c):
    return torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)


EDGE = []
for _tr in (True, False):
    for _eps in (0.0, -1.0):
        EDGE.append((f"batch_norm-eps={_eps}-{_tr}", "batch_norm",
                     lambda eps=_eps, tr=_tr: ((_z(4, 3), *_stats(3)), dict(training=tr, eps=eps))))
    for _shape in [(0,), (0, 3), (0, 3, 4), (2, 0), (2, 3, 0), (1, 0), (1, 3), (1, 3, 1), (3,), (1,)]:
        _c = _shape[1] if len(_shape) > 1 else 0
        EDGE.append((f"batch_norm-{_shape}-stats-{_tr}", "batch_norm",
                     lambda s=_shape, c=_c, tr=_tr: ((_z(*s), *_stats(c)), dict(training=tr))))
        EDGE.append((f"batch_norm-{_shape}-nostats-{_tr}", "batch_norm",
                     lambda s=_shape, tr=_tr: ((_z(*s), None, None), dict(training=tr))))
        EDGE.append((f"batch_norm-{_shape}-weight5-{_tr}", "batch_norm",
                     lambda s=_shape, tr=_tr: ((_z(*s), None, None, _z(5), _z(5)), dict(training=tr))))
    EDGE.append((f"batch_norm-one-statistic-{_tr}", "batch_norm",
                 lambda tr=_tr: ((_z(4, 3), torch.zeros(3, dtype=torch.float64), None), dict(training=tr))))
    EDGE.append((f"batch_norm-momentum-None-{_tr}", "batch_norm",
                 lambda tr=_tr: ((_z(4, 3), *_stats(3)), dict(training=tr, momentum=None))))
for _shape, _g in [((1, 3), 3), ((1, 3), 1), ((1, 3, 1), 3), ((0, 4), 2), ((0, 4, 3), 2),
                   ((4,), 2), ((2, 4), 0), ((2, 4), -2), ((2, 4), 8), ((2, 4), 3), ((1, 4, 1, 1), 4)]:
    EDGE.append((f"group_norm-{_shape}-g{_g}", "group_norm",
                 lambda s=_shape, g=_g: ((_z(*s), g), {})))
for _shape in [(0, 4), (0, 4, 3), (2, 4, 0), (2, 0), (0, 4, 0)]:
    for _dt in (torch.float64, torch.int64):
        EDGE.append((f"group_norm-{_shape}-{_dt}", "group_norm",
                     lambda s=_shape, dt=_dt: ((_z(*s).to(dt), 2 if s[1] else 1), {})))
        EDGE.append((f"group_norm-{_shape}-{_dt}-affine", "group_norm",
                     lambda s=_shape, dt=_dt: ((_z(*s).to(dt), 2 if s[1] else 1, _z(s[1]), _z(s[1])), {})))
for _shape, _ns in [((0, 3), (3,)), ((2, 0), (0,)), ((0,), (0,)), ((2, 3), ()), ((3,), (3,)),
                    ((2, 3, 0), (3, 0))]:
    EDGE.append((f"layer_norm-{_shape}-{_ns}", "layer_norm",
                 lambda s=_shape, ns=_ns: ((_z(*s), ns), {})))
EDGE.append(("layer_norm-empty-shape-affine", "layer_norm",
             lambda: ((_z(2, 0), (0,), _z(0), _z(0)), {})))
for _shape in [(0, 3, 4), (2, 3, 0), (2, 0, 4), (0, 3), (0,), (3,), (3, 4), (1, 3, 1), (2, 3, 1)]:
    for _uis in (True, False):
        _c = _shape[1] if len(_shape) > 1 else 0
        EDGE.append((f"instance_norm-{_shape}-stats-{_uis}", "instance_norm",
                     lambda s=_shape, c=_c, u=_uis: ((_z(*s), *_stats(c)), dict(use_input_stats=u))))
        EDGE.append((f"instance_norm-{_shape}-nostats-{_uis}", "instance_norm",
                     lambda s=_shape, u=_uis: ((_z(*s),), dict(use_input_stats=u))))
        EDGE.append((f"instance_norm-{_shape}-stats5-{_uis}", "instance_norm",
                     lambda s=_shape, u=_uis: ((_z(*s), *_stats(5)), dict(use_input_stats=u))))
EDGE.append(("instance_norm-one-statistic", "instance_norm",
             lambda: ((_z(4, 3, 2), torch.zeros(3, dtype=torch.float64), None), {})))
EDGE.append(("instance_norm-eps-negative", "instance_norm", lambda: ((_z(4, 3, 2),), dict(eps=-1.0))))


@pytest.mark.parametrize("case", [e[0] for e in EDGE])
def test_edge_inputs(case):
    _, fn_name, make = next(e for e in EDGE if e[0] == case)
    args, kwargs = make()
    _compare_call(getattr(F, fn_name), getattr(fastnorm.functional, fn_name),
                  (args[0], args[1:], kwargs), torch.float64, case)


def test_batchnorm_module_empty_batch_any_channels():
    """torch's BatchNorm accepts an empty batch whatever its channel count (the kernel is
    skipped) and still counts it; so does fastnorm."""
    for shape in [(0, 5), (0, 5, 4), (0, 3)]:
        t = nn.BatchNorm1d(3).double()
        f = fastnorm.convert(copy.deepcopy(t))
        _compare_module(t, f, (_z(*shape),), {}, torch.float64, f"BatchNorm1d(3) on {shape}")
        assert int(f.num_batches_tracked) == 1
