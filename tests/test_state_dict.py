"""state_dict compatibility with torch.nn, isinstance, lazy materialisation, repr, and
SyncBatchNorm conversion."""
from __future__ import annotations

import inspect
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fastnorm
from conftest import MODULE_NAMES, base_kind, default_input_shape, is_lazy, make_input, make_pair

NONLAZY = [n for n in MODULE_NAMES if not is_lazy(n)]


def _ctor(name, **kw):
    kind = base_kind(name)
    if is_lazy(name):
        return (), kw
    if kind == "gn":
        return (2, 4), kw
    return (4,), kw


OPTION_SETS = {
    "bn": [dict(), dict(affine=False), dict(track_running_stats=False), dict(momentum=None, eps=1e-3)],
    "in": [dict(), dict(affine=True), dict(track_running_stats=True), dict(affine=True, track_running_stats=True)],
    "ln": [dict(), dict(elementwise_affine=False), dict(bias=False)],
    "gn": [dict(), dict(affine=False), dict(eps=1e-3)],
}


def _cases(names):
    return [(n, kw) for n in names for kw in OPTION_SETS[base_kind(n)]]


CASES = _cases(NONLAZY)
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_state_dict_keys_and_metadata(name, kw):
    args, kw = _ctor(name, **kw)
    t = getattr(nn, name)(*args, **kw)
    f = getattr(fastnorm, name)(*args, **kw)
    st, sf = t.state_dict(), f.state_dict()
    assert list(sf) == list(st)
    for k in st:
        assert sf[k].shape == st[k].shape and sf[k].dtype == st[k].dtype, k
        assert torch.equal(sf[k], st[k]), k  # default init identical
    assert sf._metadata == st._metadata  # version numbers included
    assert type(f)._version == type(t)._version


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_load_both_directions(name, kw, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 4, device, **({"num_groups": 2} if base_kind(name) == "gn" else {}), **kw)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
        for k, b in t.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
            else:
                b.fill_(7)
    # torch -> fastnorm
    f.load_state_dict(t.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(f.state_dict()[k], v), k
    # fastnorm -> torch
    t2 = getattr(nn, name)(*_ctor(name, **kw)[0], **kw).to(device)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(1.0)
    t2.load_state_dict(f.state_dict(), strict=True)
    for k, v in f.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k
    # and they compute the same
    x = make_input(default_input_shape(name, c=4), device)
    for m in (f, t2):
        m.eval()
    torch.testing.assert_close(f(x), t2(x))


def test_roundtrip_through_torch_save(tmp_path):
    torch.manual_seed(0)
    t = nn.BatchNorm2d(3)
    t(torch.randn(4, 3, 2, 2))
    path = tmp_path / "bn.pt"
    torch.save(t.state_dict(), path)
    f = fastnorm.BatchNorm2d(3)
    f.load_state_dict(torch.load(path, weights_only=True))
    assert int(f.num_batches_tracked) == 1
    torch.testing.assert_close(f.running_mean, t.running_mean)
    # whole-module pickling keeps the fastnorm class
    buf = io.BytesIO()
    torch.save(f, buf)
    buf.seek(0)
    g = torch.load(buf, weights_only=False)
    assert type(g) is fastnorm.BatchNorm2d
    torch.testing.assert_close(g.running_var, f.running_var)


@pytest.mark.parametrize("version", [None, 1])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_old_checkpoint_without_num_batches_tracked(name, version):
    """A checkpoint from before num_batches_tracked existed (version < 2 or no version) loads,
    exactly as into torch.nn (num_batches_tracked reset to 0)."""
    torch.manual_seed(0)
    src = getattr(nn, name)(3)
    with torch.no_grad():
        src.running_mean.normal_()
        src.weight.normal_()
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    meta = OrderedDict()
    if version is not None:
        meta[""] = {"version": version}
    sd._metadata = meta
    t = getattr(nn, name)(3)
    f = getattr(fastnorm, name)(3)
    t.num_batches_tracked.fill_(5)
    f.num_batches_tracked.fill_(5)
    t.load_state_dict(sd, strict=True)
    f.load_state_dict(sd, strict=True)
    assert int(f.num_batches_tracked) == int(t.num_batches_tracked)
    assert torch.equal(f.running_mean, src.running_mean) and torch.equal(f.weight, src.weight)


def test_missing_num_batches_tracked_with_current_version_is_an_error():
    """With the current version recorded, a missing key is reported, as torch does."""
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError) as ti:
        nn.BatchNorm2d(3).load_state_dict(sd, strict=True)
    with pytest.raises(type(ti.value), match="num_batches_tracked"):
        fastnorm.BatchNorm2d(3).load_state_dict(sd, strict=True)


def test_old_checkpoint_nested_in_a_model():
    sd = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)).state_dict()
    del sd["1.num_batches_tracked"]
    sd._metadata["1"]["version"] = 1
    model = nn.Sequential(nn.Conv2d(1, 3, 1), fastnorm.BatchNorm2d(3))
    model.load_state_dict(sd, strict=True)
    assert int(model[1].num_batches_tracked) == 0


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_isinstance_of_torch_class(name):
    args, kw = _ctor(name)
    f = getattr(fastnorm, name)(*args, **kw)
    assert isinstance(f, getattr(nn, name))
    assert issubclass(getattr(fastnorm, name), getattr(nn, name))
    if base_kind(name) == "bn":
        assert isinstance(f, _BatchNorm)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_constructor_signature_matches_torch(name):
    ours = inspect.signature(getattr(fastnorm, name)).parameters
    theirs = inspect.signature(getattr(nn, name)).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.values()]


@pytest.mark.parametrize("name", [n for n in MODULE_NAMES if is_lazy(n)])
def test_lazy_becomes_fastnorm_class(name, device):
    torch.manual_seed(0)
    kw = dict(affine=True, track_running_stats=True) if base_kind(name) == "in" else {}
    f = getattr(fastnorm, name)(device=device, **kw)
    t = getattr(nn, name)(device=device, **kw)
    rank = int(name[-2])
    x = make_input((2, 5) + (3,) * rank, device)
    yf, yt = f(x), t(x)
    target = getattr(fastnorm, name.replace("Lazy", ""))
    assert type(f) is target
    assert isinstance(f, getattr(nn, name.replace("Lazy", "")))
    assert f.num_features == 5 == t.num_features
    assert f.weight.shape == (5,) and f.running_mean.shape == (5,)
    torch.testing.assert_close(yf, yt)
    assert list(f.state_dict()) == list(t.state_dict())
    # materialised lazy module loads a torch checkpoint
    f.load_state_dict(t.state_dict())


def test_lazy_load_state_dict_before_first_call():
    """Loading a checkpoint into an uninitialised lazy module materialises its parameters, as
    torch does (torch leaves num_features at 0 there: so must we)."""
    src = nn.BatchNorm2d(6)
    with torch.no_grad():
        src.weight.normal_()
    f, t = fastnorm.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    f.load_state_dict(src.state_dict())
    t.load_state_dict(src.state_dict())
    assert not f.has_uninitialized_params()
    x = torch.randn(2, 6, 3, 3)
    y = f(x)
    yt = t(x)
    assert type(f) is fastnorm.BatchNorm2d and type(t) is nn.BatchNorm2d
    assert f.num_features == t.num_features
    torch.testing.assert_close(f.weight, src.weight)
    torch.testing.assert_close(y, yt)
    torch.testing.assert_close(f.running_mean, t.running_mean)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_repr_matches_torch(name, kw):
    args, kw = _ctor(name, **kw)
    rt = repr(getattr(nn, name)(*args, **kw))
    rf = repr(getattr(fastnorm, name)(*args, **kw))
    assert rf.split("(", 1)[1] == rt.split("(", 1)[1]
    assert rf.split("(", 1)[0] == name  # same class name too


def test_repr_lazy_after_materialisation():
    f, t = fastnorm.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    x = torch.randn(2, 3, 4, 4)
    f(x), t(x)
    assert repr(f) == repr(t)


def test_convert_sync_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), fastnorm.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(fastnorm.BatchNorm1d(4, momentum=0.3)), fastnorm.LayerNorm(4))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].running_mean.normal_()
    w, rm = model[1].weight, model[1].running_mean
    out = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(out[1]) is nn.SyncBatchNorm
    assert type(out[3][0]) is nn.SyncBatchNorm and out[3][0].momentum == 0.3
    assert type(out[4]) is fastnorm.LayerNorm  # not a batch norm: untouched
    assert out[1].weight is w  # convert_sync_batchnorm reuses the Parameter
    assert torch.equal(out[1].running_mean, rm)
    assert out[1].num_features == 4
