"""fastnorm.functional against torch.nn.functional: signatures, values, gradients, in-place
running-statistics updates."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import fastnorm.functional as FN
import reference as ref
from conftest import assert_close_scaled, make_input

NAMES = ["batch_norm", "layer_norm", "group_norm", "instance_norm"]


@pytest.mark.parametrize("name", NAMES)
def test_signature_matches_torch(name):
    ours = inspect.signature(getattr(FN, name)).parameters
    theirs = inspect.signature(getattr(F, name)).parameters
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].default == theirs[k].default, k
        assert ours[k].kind == theirs[k].kind, k


def _twin_call(fn_name, tensors, grad_idx, *args, dtype=None, **kwargs):
    """Calls torch's and fastnorm's `fn_name` on separate clones of `tensors` (positional, then
    *args/**kwargs); compares outputs, grads of tensors[grad_idx], and every tensor afterwards
    (in-place running statistics). Returns the fastnorm clones and output."""
    sides = []
    for mod in (F, FN):
        ts = [None if t is None else t.detach().clone() for t in tensors]
        for i in grad_idx:
            ts[i].requires_grad_()
        y = getattr(mod, fn_name)(*ts, *args, **kwargs)
        sides.append((ts, y))
    (tt, yt), (tf, yf) = sides
    dtype = dtype or tensors[0].dtype
    assert yf.dtype == yt.dtype and yf.shape == yt.shape
    assert_close_scaled(yf, yt, dtype, msg="output")
    g = torch.randn_like(yt)
    yt.backward(g)
    yf.backward(g)
    for i in grad_idx:
        assert_close_scaled(tf[i].grad, tt[i].grad, dtype, msg=f"grad of argument {i}")
    for i, (a, b) in enumerate(zip(tf, tt)):
        if a is not None:
            assert_close_scaled(a.detach(), b.detach(), dtype, msg=f"argument {i} after the call")
    return tf, yf


def _params(c, device, dtype=torch.float32):
    w = torch.rand(c, device=device, dtype=dtype) + 0.5
    b = torch.randn(c, device=device, dtype=dtype)
    rm = torch.randn(c, device=device, dtype=dtype) * 0.5
    rv = torch.rand(c, device=device, dtype=dtype) + 0.5
    return w, b, rm, rv


# ----------------------------------------------------------------------------------------------
# batch_norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 3, 5)])
def test_batch_norm(shape, training, affine, device):
    torch.manual_seed(0)
    x = make_input(shape, device)
    w, b, rm, rv = _params(3, device)
    if not affine:
        w = b = None
    grad_idx = [0] + ([3, 4] if affine else [])
    tf, _ = _twin_call("batch_norm", [x, rm, rv, w, b], grad_idx, training, 0.2, 1e-4)
    if training:  # updated in place: the very tensors passed
        _, mean, _, uvar = ref.batch_norm_train(x)
        assert_close_scaled(tf[1].double(), ref.running_update(rm, mean, 0.2), torch.float32)
        assert_close_scaled(tf[2].double(), ref.running_update(rv, uvar, 0.2), torch.float32)
    else:
        assert torch.equal(tf[1], rm) and torch.equal(tf[2], rv)


def test_batch_norm_running_stats_in_place(device):
    torch.manual_seed(0)
    x = make_input((4, 3, 5), device)
    rm = torch.zeros(3, device=device)
    rv = torch.ones(3, device=device)
    rm_ptr, rv_ptr = rm.data_ptr(), rv.data_ptr()
    FN.batch_norm(x, rm, rv, training=True)
    assert rm.data_ptr() == rm_ptr and rv.data_ptr() == rv_ptr
    assert not torch.equal(rm, torch.zeros_like(rm)) and not torch.equal(rv, torch.ones_like(rv))
    rm_t, rv_t = torch.zeros(3, device=device), torch.ones(3, device=device)
    F.batch_norm(x, rm_t, rv_t, training=True)
    assert_close_scaled(rm, rm_t)
    assert_close_scaled(rv, rv_t)


def test_batch_norm_no_running_stats_training(device):
    torch.manual_seed(0)
    x = make_input((4, 3, 5), device)
    w, b, _, _ = _params(3, device)
    _twin_call("batch_norm", [x, None, None, w, b], [0, 3, 4], True)


def test_batch_norm_defaults(device):
    """Defaults: training=False (running stats), momentum 0.1, eps 1e-5."""
    torch.manual_seed(0)
    x = make_input((4, 3, 5), device)
    _, _, rm, rv = _params(3, device)
    _twin_call("batch_norm", [x, rm, rv], [0])
    _twin_call("batch_norm", [x, rm, rv], [0], training=True)


# ----------------------------------------------------------------------------------------------
# layer_norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nshape", [5, [5], (4, 5), [3, 4, 5]], ids=["int", "list1", "tuple2", "list3"])
def test_layer_norm(nshape, device):
    torch.manual_seed(0)
    x = make_input((2, 3, 4, 5), device)
    shp = [nshape] if isinstance(nshape, int) else list(nshape)
    w = torch.rand(shp, device=device) + 0.5
    b = torch.randn(shp, device=device)
    if isinstance(nshape, int):
        # torch.nn.functional.layer_norm rejects a bare int (TypeError); fastnorm accepts it
        # like nn.LayerNorm does, and gives the same result as [int]
        y = FN.layer_norm(x, nshape, w, b, 1e-3)
        assert_close_scaled(y, F.layer_norm(x, shp, w, b, 1e-3))
    else:
        _twin_call("layer_norm", [x], [0], nshape)
        _, y = _twin_call("layer_norm", [x], [0], nshape, w, b, 1e-3)
    assert_close_scaled(y.double(), ref.layer_norm(x, nshape, w, b, 1e-3), torch.float32)


def test_layer_norm_params_as_grad_inputs(device):
    torch.manual_seed(0)
    x = make_input((3, 4, 6), device)
    w = torch.rand(4, 6, device=device) + 0.5
    b = torch.randn(4, 6, device=device)
    # normalized_shape sits between input and weight: weight and bias passed as keywords
    tensors = [x, w, b]
    sides = []
    for mod in (F, FN):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        y = getattr(mod, "layer_norm")(ts[0], [4, 6], weight=ts[1], bias=ts[2])
        y.backward(torch.ones_like(y) * torch.arange(y.numel(), device=device).reshape(y.shape).sin())
        sides.append((ts, y))
    (tt, yt), (tf, yf) = sides
    assert_close_scaled(yf, yt)
    for a, b_ in zip(tf, tt):
        assert_close_scaled(a.grad, b_.grad)


def test_layer_norm_bias_none(device):
    """bias=None with a weight (LayerNorm(bias=False))."""
    torch.manual_seed(0)
    x = make_input((3, 7), device)
    w = torch.rand(7, device=device) + 0.5
    y = FN.layer_norm(x, [7], w, None)
    assert_close_scaled(y, F.layer_norm(x, [7], w, None))
    assert_close_scaled(y.double(), ref.layer_norm(x, [7], w, None), torch.float32)


# ----------------------------------------------------------------------------------------------
# group_norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 6), 3), ((2, 6, 5), 2), ((3, 6, 3, 5), 6), ((2, 4, 2, 3, 3), 1)])
def test_group_norm(shape, groups, affine, device):
    torch.manual_seed(0)
    x = make_input(shape, device)
    w, b, _, _ = _params(shape[1], device)
    if affine:
        _twin_call("group_norm", [x], [0], groups, w, b, 1e-3)
        ws = []  # gradients wrt weight and bias
        for mod in (F, FN):
            wc, bc = w.clone().requires_grad_(), b.clone().requires_grad_()
            mod.group_norm(x, groups, wc, bc).pow(2).sum().backward()
            ws.append((wc.grad, bc.grad))
        assert_close_scaled(ws[1][0], ws[0][0])
        assert_close_scaled(ws[1][1], ws[0][1])
    else:
        _twin_call("group_norm", [x], [0], groups)


def test_group_norm_defaults(device):
    torch.manual_seed(0)
    x = make_input((2, 4, 5), device)
    assert_close_scaled(FN.group_norm(x, 2), F.group_norm(x, 2))
    assert_close_scaled(FN.group_norm(x, 2).double(), ref.group_norm(x, 2), torch.float32)


# ----------------------------------------------------------------------------------------------
# instance_norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 3, 3, 5), (2, 3, 2, 2, 3)])
def test_instance_norm_input_stats(shape, device):
    torch.manual_seed(0)
    x = make_input(shape, device)
    w, b, _, _ = _params(3, device)
    _twin_call("instance_norm", [x], [0])
    _twin_call("instance_norm", [x, None, None, w, b], [0, 3, 4])


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_running_stats_in_place(affine, device):
    torch.manual_seed(0)
    x = make_input((4, 3, 3, 5), device)
    w, b, rm, rv = _params(3, device)
    if not affine:
        w = b = None
    tf, _ = _twin_call("instance_norm", [x, rm, rv, w, b], [0], True, 0.3, 1e-5)
    _, mean, uvar = ref.instance_norm(x)
    assert_close_scaled(tf[1].double(), ref.running_update(rm, mean.mean(0), 0.3), torch.float32)
    assert_close_scaled(tf[2].double(), ref.running_update(rv, uvar.mean(0), 0.3), torch.float32)
    # and in place on the caller's tensors
    rm2, rv2 = rm.clone(), rv.clone()
    ptrs = (rm2.data_ptr(), rv2.data_ptr())
    FN.instance_norm(x, rm2, rv2, w, b, True, 0.3)
    assert (rm2.data_ptr(), rv2.data_ptr()) == ptrs
    assert_close_scaled(rm2, tf[1])
    assert_close_scaled(rv2, tf[2])


def test_instance_norm_frozen_running_stats(device):
    torch.manual_seed(0)
    x = make_input((2, 3, 3, 5), device)
    w, b, rm, rv = _params(3, device)
    tf, y = _twin_call("instance_norm", [x, rm, rv, w, b], [0, 3, 4], False)
    assert torch.equal(tf[1], rm) and torch.equal(tf[2], rv)
    assert_close_scaled(y.double(), ref.batch_norm_eval(x, rm, rv, w, b), torch.float32)
