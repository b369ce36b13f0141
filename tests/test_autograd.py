"""gradcheck / gradgradcheck in float64 for every module and functional, and double backward
(a gradient penalty) against torch.nn's."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import fastnorm
import fastnorm.functional as FN
from conftest import MODULE_NAMES, assert_close_scaled, base_kind, is_lazy, spatial_rank

DT = torch.float64


def _small_shape(name):
    kind, r = base_kind(name), spatial_rank(name)
    if kind == "ln":
        return (2, 2, 3)
    if kind == "gn":
        return (2, 4, 3)
    return (2, 3) + {1: (3,), 2: (2, 2), 3: (1, 2, 2)}[r]


def _module(name, device, **kw):
    kind = base_kind(name)
    if kind == "in":
        kw.setdefault("affine", True)
    if is_lazy(name):
        m = getattr(fastnorm, name)(device=device, dtype=DT, **kw)
    elif kind == "ln":
        m = fastnorm.LayerNorm(3, device=device, dtype=DT, **kw)
    elif kind == "gn":
        m = fastnorm.GroupNorm(2, 4, device=device, dtype=DT, **kw)
    else:
        m = getattr(fastnorm, name)(3, device=device, dtype=DT, **kw)
    return m


def _inputs(m, shape, device):
    x = (torch.randn(shape, device=device, dtype=DT) * 2 + 0.5).requires_grad_()
    m(x.detach())  # materialise lazy modules
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    params = {k: p.detach().clone().requires_grad_() for k, p in m.named_parameters()}
    return x, params


def _as_fn(m, params):
    names = list(params)

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))
    return fn


MODES = []
for _n in MODULE_NAMES:
    _k = base_kind(_n)
    if _k == "bn":
        MODES += [(_n, "train", {}), (_n, "eval", {})]
        if not is_lazy(_n):
            MODES.append((_n, "train", dict(track_running_stats=False)))
    elif _k == "in":
        MODES += [(_n, "train", {})]
        if not is_lazy(_n):
            MODES += [(_n, "train", dict(track_running_stats=True)), (_n, "eval", dict(track_running_stats=True))]
    else:
        MODES.append((_n, "train", {}))
MODE_IDS = [f"{n}-{m}{'-notrack' if kw.get('track_running_stats') is False else ''}"
            f"{'-track' if kw.get('track_running_stats') else ''}" for n, m, kw in MODES]


@pytest.mark.parametrize("name,mode,kw", MODES, ids=MODE_IDS)
def test_module_gradcheck(name, mode, kw, device):
    torch.manual_seed(0)
    m = _module(name, device, **kw)
    x, params = _inputs(m, _small_shape(name), device)
    m.train(mode == "train")
    fn = _as_fn(m, params)
    assert gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


# gradgradcheck is costlier: one case per module family and mode
GG = [("BatchNorm2d", "train", {}), ("BatchNorm1d", "eval", {}), ("LayerNorm", "train", {}),
      ("GroupNorm", "train", {}), ("InstanceNorm1d", "train", {}),
      ("InstanceNorm2d", "eval", dict(track_running_stats=True)), ("LazyBatchNorm1d", "train", {})]


@pytest.mark.parametrize("name,mode,kw", GG, ids=[f"{n}-{m}" for n, m, _ in GG])
def test_module_gradgradcheck(name, mode, kw, device):
    torch.manual_seed(0)
    m = _module(name, device, **kw)
    x, params = _inputs(m, _small_shape(name), device)
    m.train(mode == "train")
    fn = _as_fn(m, params)
    assert gradgradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# functional
# ----------------------------------------------------------------------------------------------
def _vec(c, device, lo=None):
    t = torch.rand(c, device=device, dtype=DT) + 0.5 if lo else torch.randn(c, device=device, dtype=DT)
    return t.requires_grad_()


FUNCTIONAL = ["bn-train-nostats", "bn-train-stats", "bn-train-momentum-none", "bn-eval", "ln-1d", "ln-2d",
              "ln-noaffine", "gn", "gn-noaffine", "in", "in-stats", "in-frozen"]


def _functional_case(case, device):
    x = (torch.randn(2, 4, 3, device=device, dtype=DT) * 2 + 0.5).requires_grad_()
    w, b = _vec(4, device, lo=True), _vec(4, device)
    rm = torch.randn(4, device=device, dtype=DT) * 0.5
    rv = torch.rand(4, device=device, dtype=DT) + 0.5
    if case == "bn-train-nostats":
        return (lambda x, w, b: FN.batch_norm(x, None, None, w, b, True)), (x, w, b)
    if case == "bn-train-stats":
        return (lambda x, w, b: FN.batch_norm(x, rm, rv, w, b, True, 0.1)), (x, w, b)
    if case == "bn-train-momentum-none":
        nbt = torch.zeros((), dtype=torch.long, device=device)
        return (lambda x, w, b: FN._batch_norm(x, rm, rv, w, b, True, None, 1e-5, nbt)), (x, w, b)
    if case == "bn-eval":
        return (lambda x, w, b: FN.batch_norm(x, rm, rv, w, b, False)), (x, w, b)
    if case == "ln-1d":
        w3, b3 = _vec(3, device, lo=True), _vec(3, device)
        return (lambda x, w, b: FN.layer_norm(x, [3], w, b)), (x, w3, b3)
    if case == "ln-2d":
        w2 = (torch.rand(4, 3, device=device, dtype=DT) + 0.5).requires_grad_()
        b2 = torch.randn(4, 3, device=device, dtype=DT).requires_grad_()
        return (lambda x, w, b: FN.layer_norm(x, (4, 3), w, b)), (x, w2, b2)
    if case == "ln-noaffine":
        return (lambda x: FN.layer_norm(x, [3])), (x,)
    if case == "gn":
        return (lambda x, w, b: FN.group_norm(x, 2, w, b)), (x, w, b)
    if case == "gn-noaffine":
        return (lambda x: FN.group_norm(x, 4)), (x,)
    if case == "in":
        return (lambda x, w, b: FN.instance_norm(x, None, None, w, b)), (x, w, b)
    if case == "in-stats":
        return (lambda x, w, b: FN.instance_norm(x, rm, rv, w, b, True)), (x, w, b)
    if case == "in-frozen":
        return (lambda x, w, b: FN.instance_norm(x, rm, rv, w, b, False)), (x, w, b)
    raise AssertionError(case)


@pytest.mark.parametrize("case", FUNCTIONAL)
def test_functional_gradcheck(case, device):
    torch.manual_seed(0)
    fn, inputs = _functional_case(case, device)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["bn-train-stats", "bn-eval", "ln-2d", "gn", "in", "in-frozen"])
def test_functional_gradgradcheck(case, device):
    torch.manual_seed(0)
    fn, inputs = _functional_case(case, device)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_grad_of_subset_of_inputs(device):
    """Only the input requires grad (frozen affine), and only the weight requires grad."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, device=device, dtype=DT)
    w, b = torch.rand(4, device=device, dtype=DT) + 0.5, torch.randn(4, device=device, dtype=DT)
    for fn in (lambda x, w, b: FN.batch_norm(x, None, None, w, b, True),
               lambda x, w, b: FN.group_norm(x, 2, w, b)):
        assert gradcheck(lambda x_: fn(x_, w, b), (x.clone().requires_grad_(),))
        assert gradcheck(lambda w_: fn(x, w_, b), (w.clone().requires_grad_(),))
        assert gradcheck(lambda b_: fn(x, w, b_), (b.clone().requires_grad_(),))


# ----------------------------------------------------------------------------------------------
# double backward against torch.nn: a gradient penalty
# ----------------------------------------------------------------------------------------------
GP = [("BatchNorm2d", (4, 3, 3, 3), "train"), ("BatchNorm2d", (4, 3, 3, 3), "eval"),
      ("BatchNorm1d", (6, 3), "train"), ("LayerNorm", (4, 5, 3), "train"), ("GroupNorm", (3, 4, 5), "train"),
      ("InstanceNorm2d", (3, 3, 3, 3), "train"), ("InstanceNorm1d", (3, 3, 5), "eval")]


def _gp_run(m, x, r):
    x = x.clone().requires_grad_()
    y = m(x)
    (g,) = torch.autograd.grad((y * r).sum(), x, create_graph=True)
    loss = (g ** 2).sum() + (y ** 3).mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    return y.detach(), g.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,shape,mode", GP, ids=[f"{n}-{m}" for n, _, m in GP])
def test_double_backward_matches_torch(name, shape, mode, dtype, device):
    torch.manual_seed(0)
    kind = base_kind(name)
    args = {"ln": (shape[-1],), "gn": (2, shape[1])}.get(kind, (shape[1],))
    kw = dict(affine=True, track_running_stats=True) if kind == "in" else {}
    t = getattr(nn, name)(*args, **kw).to(device, dtype)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
        if getattr(t, "running_mean", None) is not None:
            t.running_mean.normal_(0, 0.5)
            t.running_var.uniform_(0.5, 1.5)
    f = getattr(fastnorm, name)(*args, **kw).to(device, dtype)
    f.load_state_dict(t.state_dict())
    t.train(mode == "train")
    f.train(mode == "train")
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    r = torch.randn(shape, device=device, dtype=dtype)
    yt, gt, xgt, pgt = _gp_run(t, x, r)
    yf, gf, xgf, pgf = _gp_run(f, x, r)
    factor = 10.0 if dtype == torch.float32 else 1.0  # second-order sums in fp32
    assert_close_scaled(yf, yt, dtype, factor, "output")
    assert_close_scaled(gf, gt, dtype, factor, "first-order grad")
    assert_close_scaled(xgf, xgt, dtype, factor, "x.grad of the penalty")
    for k in pgt:
        assert_close_scaled(pgf[k], pgt[k], dtype, factor, f"{k}.grad of the penalty")
    for k, v in t.state_dict().items():
        assert_close_scaled(f.state_dict()[k], v, dtype, factor, k) if v.is_floating_point() else None


# ----------------------------------------------------------------------------------------------
# torch.func transforms (per-sample gradients, jacobians): torch.nn's norms support them
# ----------------------------------------------------------------------------------------------
# (the full matrix, with forward mode, vmap without the batching fallback and per-sample
# gradients, is tests/test_func_transforms.py)
FUNC_MODULES = {
    "LayerNorm": lambda M: M.LayerNorm(3),
    "GroupNorm": lambda M: M.GroupNorm(2, 4),
    "InstanceNorm1d": lambda M: M.InstanceNorm1d(4, affine=True),
    "BatchNorm1d-notrack": lambda M: M.BatchNorm1d(4, track_running_stats=False),
    "BatchNorm1d-eval": lambda M: M.BatchNorm1d(4).eval(),
}
FUNC_CASES = [pytest.param(_mod, _tr, id=f"{_mod}-{_tr}")
              for _mod in FUNC_MODULES for _tr in ("grad", "jacrev", "vmap")]


@pytest.mark.parametrize("mod,transform", FUNC_CASES)
def test_torch_func_transforms(mod, transform, device):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, device=device, dtype=DT)
    results = []
    for M in (nn, fastnorm):
        torch.manual_seed(1)
        m = FUNC_MODULES[mod](M).to(device, DT)
        with torch.no_grad():
            for p in m.parameters():
                p.uniform_(0.5, 1.5)
        if transform == "grad":
            out = torch.func.grad(lambda xx: m(xx).pow(3).sum())(x)
        elif transform == "jacrev":
            out = torch.func.jacrev(m)(x)
        else:  # a batch of 2 inputs of shape (1, 4, 3)
            out = torch.func.vmap(m)(x[:, None])
        results.append(out)
    assert_close_scaled(results[1], results[0], DT)
