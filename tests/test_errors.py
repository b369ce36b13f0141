"""Error cases: fastnorm raises the exception type torch raises (or a subclass), with a message
naming the expected and actual shape/dtype, and leaves every buffer untouched (better than torch,
which has already incremented num_batches_tracked when it raises)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
import fastnorm.functional as FN
from conftest import MODULE_NAMES, base_kind, is_lazy, mentions_shape, spatial_rank


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()} if m is not None else {}


def expect_same_error(torch_call, fast_call, mention=None, fast_module=None):
    """Runs the bad call on torch, then on fastnorm: fastnorm must raise the same type (or a
    subclass); `mention(msg)` must hold for fastnorm's message; fast_module's state is unchanged.
    Returns fastnorm's exception."""
    with pytest.raises(Exception) as ti:
        torch_call()
    torch_type = type(ti.value)
    before = _state(fast_module)
    with pytest.raises(Exception) as fi:
        fast_call()
    assert isinstance(fi.value, torch_type), (
        f"fastnorm raised {type(fi.value).__name__}({fi.value}) where torch raises "
        f"{torch_type.__name__}({ti.value})")
    if mention is not None:
        assert mention(str(fi.value)), f"message does not name the shapes/dtypes: {fi.value}"
    if fast_module is not None:
        after = fast_module.state_dict()
        assert list(after) == list(before)
        for k, v in before.items():
            assert torch.equal(after[k], v), f"{k} changed by a call that raised: {v} -> {after[k]}"
    return fi.value


def _pair(name, *args, device, **kw):
    return (getattr(nn, name)(*args, **kw).to(device), getattr(fastnorm, name)(*args, **kw).to(device))


def _mentions_dtype(dtype):
    short = {torch.int64: "Long", torch.int32: "Int", torch.uint8: "Byte", torch.bool: "Bool"}[dtype]
    return lambda m: str(dtype).replace("torch.", "") in m or short in m


# ----------------------------------------------------------------------------------------------
# BatchNorm: wrong channel count
# ----------------------------------------------------------------------------------------------
BN_WRONG_C = [("BatchNorm1d", (4, 5)), ("BatchNorm1d", (4, 5, 6)), ("BatchNorm2d", (2, 5, 4, 4)),
              ("BatchNorm3d", (2, 5, 2, 2, 2))]
BN_OPTS = [dict(), dict(affine=False), dict(track_running_stats=False)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("opts", BN_OPTS, ids=["default", "noaffine", "notrack"])
@pytest.mark.parametrize("name,shape", BN_WRONG_C, ids=[f"{n}-{len(s)}d" for n, s in BN_WRONG_C])
def test_batchnorm_wrong_channels(name, shape, opts, training, device):
    torch.manual_seed(0)
    t, f = _pair(name, 3, device=device, **opts)
    t.train(training)
    f.train(training)
    x = torch.randn(shape, device=device)
    expect_same_error(lambda: t(x), lambda: f(x),
                      lambda m: mentions_shape(m, shape) and mentions_shape(m, (3,)), fast_module=f)
    if f.num_batches_tracked is not None:
        assert int(f.num_batches_tracked) == 0


def test_batchnorm_wrong_channels_then_recovers(device):
    """After the failed call the module works and counts from 0 exactly like a fresh torch one."""
    torch.manual_seed(0)
    t, f = _pair("BatchNorm2d", 3, device=device)
    with pytest.raises(RuntimeError):
        f(torch.randn(2, 4, 3, 3, device=device))
    x = torch.randn(2, 3, 3, 3, device=device)
    torch.testing.assert_close(f(x), t(x))
    assert int(f.num_batches_tracked) == 1 == int(t.num_batches_tracked)
    torch.testing.assert_close(f.running_mean, t.running_mean)


# ----------------------------------------------------------------------------------------------
# BatchNorm: a single value per channel in training
# ----------------------------------------------------------------------------------------------
SINGLE = [("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)), ("BatchNorm2d", (1, 3, 1, 1)),
          ("BatchNorm3d", (1, 3, 1, 1, 1))]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name,shape", SINGLE, ids=[f"{n}-{len(s)}d" for n, s in SINGLE])
def test_batchnorm_single_value_per_channel(name, shape, momentum, device):
    t, f = _pair(name, 3, device=device, momentum=momentum)
    x = torch.randn(shape, device=device)
    err = expect_same_error(lambda: t(x), lambda: f(x), lambda m: mentions_shape(m, shape), fast_module=f)
    assert isinstance(err, ValueError)
    assert int(f.num_batches_tracked) == 0
    # eval is fine with a single value
    f.eval()
    t.eval()
    torch.testing.assert_close(f(x), t(x))


def test_batchnorm_single_value_functional(device):
    x = torch.randn(1, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    expect_same_error(lambda: F.batch_norm(x, rm.clone(), rv.clone(), training=True),
                      lambda: FN.batch_norm(x, rm, rv, training=True), lambda m: mentions_shape(m, (1, 3)))
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))


def test_lazy_batchnorm_single_value(device):
    f = fastnorm.LazyBatchNorm1d(device=device)
    t = nn.LazyBatchNorm1d(device=device)
    x = torch.randn(1, 3, device=device)
    expect_same_error(lambda: t(x), lambda: f(x), lambda m: mentions_shape(m, (1, 3)))
    assert int(f.num_batches_tracked) == 0
    assert torch.equal(f.running_mean, torch.zeros(3, device=device))
    assert torch.equal(f.running_var, torch.ones(3, device=device))


@pytest.mark.parametrize("name,shape", [("BatchNorm2d", (1, 3, 7, 7)), ("BatchNorm1d", (1, 3, 2)),
                                        ("BatchNorm3d", (1, 3, 1, 1, 2)), ("BatchNorm1d", (2, 3))])
def test_batchnorm_more_than_one_value_is_fine(name, shape, device):
    torch.manual_seed(0)
    t, f = _pair(name, 3, device=device)
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(f(x), t(x))
    assert int(f.num_batches_tracked) == 1
    torch.testing.assert_close(f.running_var, t.running_var)


# ----------------------------------------------------------------------------------------------
# wrong input rank
# ----------------------------------------------------------------------------------------------
def _bad_rank_shape(name):
    kind, r = base_kind(name), spatial_rank(name)
    if kind == "bn":
        return {1: (2, 3, 4, 4), 2: (2, 3, 4), 3: (2, 3, 4, 4)}[r]
    if kind == "in":
        return {1: (2, 3, 4, 4), 2: (3, 4), 3: (2, 3, 4)}[r]
    if kind == "gn":
        return (3,)
    return (4,)  # LayerNorm(normalized_shape=[3, 4]) with a 1-D input


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_wrong_input_rank(name, device):
    kind = base_kind(name)
    if is_lazy(name):
        args = ()
    elif kind == "gn":
        args = (1, 3)
    elif kind == "ln":
        args = ([3, 4],)
    else:
        args = (3,)
    kw = dict(track_running_stats=True) if kind == "in" else {}
    t, f = _pair(name, *args, device=device, **kw)
    shape = _bad_rank_shape(name)
    x = torch.randn(shape, device=device)
    if kind in ("bn", "in"):
        mention = lambda m: (f"{len(shape)}D" in m or mentions_shape(m, shape))  # noqa: E731
    else:
        mention = lambda m: mentions_shape(m, shape)  # noqa: E731
    err = expect_same_error(lambda: t(x), lambda: f(x), mention, fast_module=None if is_lazy(name) else f)
    if kind in ("bn", "in"):
        assert isinstance(err, ValueError)


# ----------------------------------------------------------------------------------------------
# integer inputs
# ----------------------------------------------------------------------------------------------



def _module_for(name, c, device, **kw):
    kind = base_kind(name)
    if is_lazy(name):
        args = ()
    elif kind == "gn":
        args = (1, c)
    else:
        args = (c,)
    return _pair(name, *args, device=device, **kw)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_integer_input_module(name, dtype, device):
    kind = base_kind(name)
    r = spatial_rank(name) or 2
    shape = (2, 3) + (4,) * r
    if kind == "ln":
        shape = (2, 3)
    t, f = _module_for(name, 3, device)
    x = torch.randint(0, 5, shape, device=device, dtype=dtype)
    expect_same_error(lambda: t(x), lambda: f(x), _mentions_dtype(dtype),
                      fast_module=None if is_lazy(name) else f)
    if getattr(f, "num_batches_tracked", None) is not None:
        assert int(f.num_batches_tracked) == 0


@pytest.mark.parametrize("name", ["InstanceNorm2d", "BatchNorm2d"])
def test_integer_input_eval_tracked(name, device):
    t, f = _module_for(name, 3, device, track_running_stats=True)
    t.eval()
    f.eval()
    x = torch.randint(0, 5, (2, 3, 4, 4), device=device)
    expect_same_error(lambda: t(x), lambda: f(x), _mentions_dtype(torch.int64), fast_module=f)


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
def test_integer_input_functional(fn, device):
    x = torch.randint(0, 5, (2, 3, 4), device=device)
    args = {"batch_norm": (None, None, None, None, True), "layer_norm": ([4],), "group_norm": (3,),
            "instance_norm": ()}[fn]
    kind = {"batch_norm": "bn", "layer_norm": "ln", "group_norm": "gn", "instance_norm": "in"}[fn]
    expect_same_error(lambda: getattr(F, fn)(x, *args), lambda: getattr(FN, fn)(x, *args),
                      _mentions_dtype(torch.int64))


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------
LN_BAD = [(5, (2, 3, 4)), ([3, 5], (2, 4, 5)), ([3, 5], (2, 3, 4)), ([2, 3, 5], (3, 5))]


@pytest.mark.parametrize("nshape,shape", LN_BAD, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in LN_BAD])
def test_layernorm_shape_mismatch(nshape, shape, device):
    t, f = _pair("LayerNorm", nshape, device=device)
    x = torch.randn(shape, device=device)
    ns = [nshape] if isinstance(nshape, int) else nshape
    mention = lambda m: mentions_shape(m, shape) and mentions_shape(m, ns)  # noqa: E731
    err = expect_same_error(lambda: t(x), lambda: f(x), mention, fast_module=f)
    assert isinstance(err, RuntimeError)
    expect_same_error(lambda: F.layer_norm(x, ns), lambda: FN.layer_norm(x, ns), mention)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_layernorm_functional_param_mismatch(which, device):
    x = torch.randn(2, 3, 4, device=device)
    p = torch.ones(5, device=device)
    kw = {which: p}
    expect_same_error(lambda: F.layer_norm(x, [4], **kw), lambda: FN.layer_norm(x, [4], **kw),
                      lambda m: mentions_shape(m, (5,)) and mentions_shape(m, (4,)))


# ----------------------------------------------------------------------------------------------
# GroupNorm
# ----------------------------------------------------------------------------------------------
def test_groupnorm_not_divisible_construction():
    with pytest.raises(ValueError) as ti:
        nn.GroupNorm(3, 4)
    with pytest.raises(type(ti.value)) as fi:
        fastnorm.GroupNorm(3, 4)
    assert "4" in str(fi.value) and "3" in str(fi.value)


@pytest.mark.parametrize("shape,groups", [((2, 4, 5), 3), ((2, 6, 3, 3), 4), ((2, 5), 2)])
def test_groupnorm_not_divisible_functional(shape, groups, device):
    x = torch.randn(shape, device=device)
    err = expect_same_error(lambda: F.group_norm(x, groups), lambda: FN.group_norm(x, groups),
                            lambda m: mentions_shape(m, shape) and str(groups) in m)
    assert isinstance(err, RuntimeError)


@pytest.mark.parametrize("which,size", [("weight", 5), ("bias", 3), ("weight", 8)])
def test_groupnorm_param_size_mismatch(which, size, device):
    x = torch.randn(2, 4, 5, device=device)
    w = torch.ones(4, device=device)
    b = torch.zeros(4, device=device)
    kw = dict(weight=w, bias=b)
    kw[which] = torch.ones(size, device=device)
    expect_same_error(lambda: F.group_norm(x, 2, **kw), lambda: FN.group_norm(x, 2, **kw),
                      lambda m: mentions_shape(m, (size,)) and mentions_shape(m, (2, 4, 5)))


def test_groupnorm_module_wrong_channels(device):
    t, f = _pair("GroupNorm", 2, 4, device=device)
    x = torch.randn(2, 6, 5, device=device)
    expect_same_error(lambda: t(x), lambda: f(x), lambda m: mentions_shape(m, (2, 6, 5)), fast_module=f)


# ----------------------------------------------------------------------------------------------
# InstanceNorm
# ----------------------------------------------------------------------------------------------
IN_WRONG_C = [("InstanceNorm1d", (2, 4, 5)), ("InstanceNorm2d", (2, 4, 3, 3)), ("InstanceNorm3d", (2, 4, 2, 2, 2)),
              ("InstanceNorm2d", (4, 3, 3))]


@pytest.mark.parametrize("name,shape", IN_WRONG_C, ids=[f"{n}-{len(s)}d" for n, s in IN_WRONG_C])
def test_instancenorm_wrong_channels_warns_without_affine(name, shape, device):
    torch.manual_seed(0)
    t, f = _pair(name, 3, device=device)
    x = torch.randn(shape, device=device)
    with pytest.warns(UserWarning, match="num_features"):
        yt = t(x)
    with pytest.warns(UserWarning, match="num_features"):
        yf = f(x)
    torch.testing.assert_close(yf, yt)


@pytest.mark.parametrize("name,shape", IN_WRONG_C, ids=[f"{n}-{len(s)}d" for n, s in IN_WRONG_C])
def test_instancenorm_wrong_channels_errors_with_affine(name, shape, device):
    t, f = _pair(name, 3, device=device, affine=True, track_running_stats=True)
    x = torch.randn(shape, device=device)
    names_both = lambda m: re.search(r"\b3\b", m) and re.search(r"\b4\b", m)  # noqa: E731
    err = expect_same_error(lambda: t(x), lambda: f(x), names_both, fast_module=f)
    assert isinstance(err, ValueError)


def test_instancenorm_wrong_channels_tracked_stats_no_affine(device):
    """Warns (channel count), then cannot use the running buffers: raises, buffers untouched."""
    t, f = _pair("InstanceNorm2d", 3, device=device, track_running_stats=True)
    x = torch.randn(2, 4, 3, 3, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expect_same_error(lambda: t(x), lambda: f(x),
                          lambda m: mentions_shape(m, (3,)) and mentions_shape(m, (2, 4, 3, 3)), fast_module=f)


IN_SPATIAL1 = [("InstanceNorm1d", (2, 3, 1)), ("InstanceNorm1d", (3, 1)), ("InstanceNorm2d", (2, 3, 1, 1)),
               ("InstanceNorm3d", (2, 3, 1, 1, 1)), ("LazyInstanceNorm2d", (2, 3, 1, 1))]


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("name,shape", IN_SPATIAL1, ids=[f"{n}-{len(s)}d" for n, s in IN_SPATIAL1])
def test_instancenorm_spatial_size_one_training(name, shape, track, device):
    args = () if is_lazy(name) else (3,)
    t, f = _pair(name, *args, device=device, track_running_stats=track)
    x = torch.randn(shape, device=device)
    err = expect_same_error(lambda: t(x), lambda: f(x),
                            lambda m: re.search(r"\b1\b", m) is not None and "spatial" in m,
                            fast_module=None if is_lazy(name) else f)
    assert isinstance(err, ValueError)
    if track and not is_lazy(name):
        # eval with tracked statistics is fine
        t.eval()
        f.eval()
        torch.testing.assert_close(f(x), t(x))


def test_instancenorm_functional_spatial_one(device):
    x = torch.randn(2, 3, 1, device=device)
    err = expect_same_error(lambda: F.instance_norm(x), lambda: FN.instance_norm(x),
                            lambda m: mentions_shape(m, (2, 3, 1)))
    assert isinstance(err, ValueError)


# ----------------------------------------------------------------------------------------------
# functional batch_norm / instance_norm: buffer sizes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_functional_wrong_running_stats(training, device):
    x = torch.randn(2, 3, 4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    expect_same_error(lambda: F.batch_norm(x, rm.clone(), rv.clone(), training=training),
                      lambda: FN.batch_norm(x, rm, rv, training=training),
                      lambda m: mentions_shape(m, (4,)) and mentions_shape(m, (2, 3, 4)))
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))


def test_instance_norm_functional_wrong_running_stats(device):
    x = torch.randn(2, 3, 4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    expect_same_error(lambda: F.instance_norm(x, rm.clone(), rv.clone()),
                      lambda: FN.instance_norm(x, rm, rv),
                      lambda m: mentions_shape(m, (4,)) and mentions_shape(m, (2, 3, 4)))
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))
