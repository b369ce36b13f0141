"""torch.func transforms on every fastnorm module and functional, against torch.nn (float64).

grad, vjp, jacrev, jacfwd, jvp, vmap, per-sample gradients (vmap of grad, the Opacus pattern),
hessians (jacfwd of jacrev) and model ensembles (vmap over stacked parameters and buffers), each
module called through torch.func.functional_call. Where torch.nn refuses (vmap over in-place
running-statistics updates) fastnorm must refuse with the same exception type, and leave its
buffers untouched.

vmap must use fastnorm's batching rules: functorch's per-sample fallback is disabled for the
whole module (it raises instead of warning), and its "performance drop" warning is an error too.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import fastnorm
from conftest import assert_close_scaled

DT = torch.float64

pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def _no_vmap_fallback():
    """An op without a batching rule raises instead of looping over the batch."""
    was = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(was)


# ----------------------------------------------------------------------------------------------
# the module matrix: (id, torch.nn class name, constructor args, kwargs, input shape, training)
# ----------------------------------------------------------------------------------------------
SPECS = [
    ("LayerNorm", "LayerNorm", (5,), {}, (3, 4, 5), True),
    ("LayerNorm-2d-shape", "LayerNorm", ((4, 5),), {}, (3, 4, 5), True),
    ("LayerNorm-noaffine", "LayerNorm", (5,), dict(elementwise_affine=False), (3, 4, 5), True),
    ("LayerNorm-nobias", "LayerNorm", (5,), dict(bias=False), (3, 4, 5), True),
    ("GroupNorm", "GroupNorm", (2, 4), {}, (3, 4, 5), True),
    ("GroupNorm-4d", "GroupNorm", (2, 4), {}, (3, 4, 2, 3), True),
    ("GroupNorm-noaffine", "GroupNorm", (4, 4), dict(affine=False), (3, 4, 5), True),
]
for _r, _shape in ((1, (3, 4, 5)), (2, (3, 4, 2, 3)), (3, (2, 4, 2, 2, 3))):
    for _affine, _track, _train in itertools.product((False, True), (False, True), (True, False)):
        if not _track and not _train:
            continue  # identical to training without tracked statistics
        SPECS.append((f"InstanceNorm{_r}d-{'affine' if _affine else 'noaffine'}-"
                      f"{'track' if _track else 'notrack'}-{'train' if _train else 'eval'}",
                      f"InstanceNorm{_r}d", (4,), dict(affine=_affine, track_running_stats=_track),
                      _shape, _train))
for _r, _shape in ((1, (3, 4, 5)), (1, (6, 4)), (2, (3, 4, 2, 3)), (3, (2, 4, 2, 2, 3))):
    _s = "x".join(map(str, _shape))
    SPECS += [
        (f"BatchNorm{_r}d-{_s}-eval", f"BatchNorm{_r}d", (4,), {}, _shape, False),
        (f"BatchNorm{_r}d-{_s}-notrack", f"BatchNorm{_r}d", (4,), dict(track_running_stats=False),
         _shape, True),
        (f"BatchNorm{_r}d-{_s}-track-train", f"BatchNorm{_r}d", (4,), {}, _shape, True),
        (f"BatchNorm{_r}d-{_s}-track-momentum-None", f"BatchNorm{_r}d", (4,), dict(momentum=None),
         _shape, True),
    ]
SPEC_BY_ID = {s[0]: s for s in SPECS}


def make_twins(spec, device):
    """(torch module, fastnorm module): float64, equal random parameters and buffers."""
    _, name, args, kwargs, _, train = spec
    torch.manual_seed(1)
    t = getattr(nn, name)(*args, **kwargs).to(device, DT)
    with torch.no_grad():
        for p in t.parameters():
            p.uniform_(0.5, 1.5)
        if getattr(t, "running_mean", None) is not None:
            t.running_mean.normal_(0, 0.5)
            t.running_var.uniform_(0.5, 2.0)
            t.num_batches_tracked.fill_(3)
    f = fastnorm.convert(copy.deepcopy(t))
    assert type(f) is getattr(fastnorm, name)
    t.train(train)
    f.train(train)
    return t, f


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _inputs(spec, device):
    shape = spec[4]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=DT) * 2 + 0.5
    r = torch.randn(shape, generator=g, dtype=DT)
    return x.to(device), r.to(device)


# ----------------------------------------------------------------------------------------------
# the transforms; each takes (module, x, r) and returns a pytree of tensors
# ----------------------------------------------------------------------------------------------
def _params(m):
    return {k: v.detach() for k, v in m.named_parameters()}


def _buffers(m):
    return dict(m.named_buffers())


def _call(m, p, x):
    return functional_call(m, (p, _buffers(m)), (x,))


def _loss(m, p, x, r):
    y = _call(m, p, x)
    return (y * r).sum() + (y ** 3).mean()


def t_grad_params(m, x, r):
    return grad(lambda p: _loss(m, p, x, r))(_params(m))


def t_grad_input(m, x, r):
    return grad(lambda xx: _loss(m, _params(m), xx, r))(x)


def t_vjp(m, x, r):
    p = _params(m)
    y, fn = vjp(lambda xx, pp: _call(m, pp, xx), x, p)
    return y, fn(r)


def t_vjp_nograd_vmapped(m, x, r):
    """vmap over a vjp_fn run in no_grad: the fused backward ops run batched (their vmap rules)."""
    p = _params(m)
    y, fn = vjp(lambda xx, pp: _call(m, pp, xx), x, p)
    cot = torch.stack([r, r.flip(0), r * 0.5])
    with torch.no_grad():
        return y, vmap(fn)(cot)


def t_jacrev(m, x, r):
    return jacrev(lambda xx: _call(m, _params(m), xx))(x)


def t_jacrev_params(m, x, r):
    return jacrev(lambda p: _call(m, p, x))(_params(m))


def t_jacfwd(m, x, r):
    return jacfwd(lambda xx: _call(m, _params(m), xx))(x)


def t_jacfwd_params(m, x, r):
    return jacfwd(lambda p: _call(m, p, x))(_params(m))


def t_jvp(m, x, r):
    p = _params(m)
    g = torch.Generator().manual_seed(8)
    tp = {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for k, v in p.items()}
    return jvp(lambda xx, pp: _call(m, pp, xx), (x, p), (r, tp))


def t_forward_ad(m, x, r):
    """Forward mode outside torch.func: dual tensors (torch.autograd.forward_ad)."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        y = m(fwAD.make_dual(x, r))
        return fwAD.unpack_dual(y).tangent


def t_vmap(m, x, r):
    """A batch of inputs, each one sample shorter in its first dim: (B, N-1, ...)."""
    xs = torch.stack([x[1:], x[:-1], x[1:] * 0.5])
    return vmap(lambda xx: _call(m, _params(m), xx))(xs)


def t_vmap_in_dim_last(m, x, r):
    xs = torch.stack([x, x.flip(0) * 0.5 - 1], dim=-1)
    return vmap(lambda xx: _call(m, _params(m), xx), in_dims=-1)(xs)


def t_vmap_nested(m, x, r):
    xs = torch.stack([torch.stack([x, x * 2]), torch.stack([x - 1, x.flip(0)])])
    return vmap(vmap(lambda xx: _call(m, _params(m), xx)))(xs)


def t_per_sample_grads(m, x, r):
    """Opacus: gradients of each sample's loss w.r.t. the parameters (the input w.r.t. when the
    module has none), each sample run as a batch of one."""
    p = _params(m)

    def loss(pp, xi, ri):
        y = _call(m, pp, xi.unsqueeze(0))
        return (y * ri.unsqueeze(0)).sum() + (y ** 3).mean()

    if p:
        return vmap(grad(loss), in_dims=(None, 0, 0))(p, x, r)
    return vmap(grad(loss, argnums=1), in_dims=(None, 0, 0))(p, x, r)


def t_hessian(m, x, r):
    return jacfwd(jacrev(lambda xx: _loss(m, _params(m), xx, r)))(x)


def t_hessian_rev(m, x, r):
    return jacrev(jacrev(lambda xx: _loss(m, _params(m), xx, r)))(x)


TRANSFORMS = {f.__name__[2:]: f for f in (
    t_grad_params, t_grad_input, t_vjp, t_vjp_nograd_vmapped, t_jacrev, t_jacrev_params,
    t_jacfwd, t_jacfwd_params, t_jvp, t_forward_ad, t_vmap, t_vmap_in_dim_last, t_vmap_nested,
    t_per_sample_grads, t_hessian, t_hessian_rev)}


def _run(fn, m, x, r):
    try:
        return fn(m, x, r), None
    except Exception as e:  # noqa: BLE001 (compared with torch's below)
        return None, e


def _is_counter_mutation(exc):
    """torch.nn's _BatchNorm.forward increments num_batches_tracked in Python, at the transform's
    level; grad transforms refuse that in-place update of a captured buffer. fastnorm increments
    it inside its op, below the transform (as torch does the running statistics themselves)."""
    return exc is not None and "mutate a captured Tensor" in str(exc)


def _has_params(spec):
    kwargs = spec[3]
    return kwargs.get("affine", not spec[1].startswith("InstanceNorm")) and \
        kwargs.get("elementwise_affine", True)


CASES = [(s[0], t) for s in SPECS for t in TRANSFORMS
         if _has_params(s) or not t.endswith("_params")]  # no parameters: nothing to differentiate


@pytest.mark.parametrize("spec_id,transform", CASES)
def test_transform_matches_torch(spec_id, transform, device):
    spec = SPEC_BY_ID[spec_id]
    fn = TRANSFORMS[transform]
    t, f = make_twins(spec, device)
    assert bool(_params(f)) == _has_params(spec)
    x, r = _inputs(spec, device)
    before = _state(f)
    expected, t_exc = _run(fn, t, x, r)
    if _is_counter_mutation(t_exc):
        # torch.nn's module refuses only because of its counter: the reference is then torch's
        # functional batch_norm, which updates the running statistics inside the op as
        # fastnorm does, with the counter kept outside the transform.
        t = _BatchNormFunctionalTwin(before, t)
        expected, t_exc = _run(fn, t, x, r)
        with torch.no_grad():
            t.num_batches_tracked += t.calls
    actual, f_exc = _run(fn, f, x, r)
    if t_exc is not None:
        assert f_exc is not None, f"torch.nn raised {t_exc!r}; fastnorm returned a result"
        assert type(f_exc) is type(t_exc), f"fastnorm raised {f_exc!r}, torch.nn {t_exc!r}"
        if "running_mean or running_var" in str(t_exc):
            # vmap over in-place running-statistics updates: refused before anything is written
            # (torch.nn has already incremented num_batches_tracked by then)
            assert "running_mean or running_var" in str(f_exc), str(f_exc)
            for k, v in _state(f).items():
                assert torch.equal(v, before[k]), f"{k} changed by a call that raised"
        else:
            for k, v in _state(t).items():
                assert_close_scaled(_state(f)[k], v, DT, msg=f"buffer {k}")
        return
    assert f_exc is None, f"fastnorm raised where torch.nn does not: {f_exc!r}"
    _compare(actual, expected)
    for k, v in _state(t).items():
        assert_close_scaled(_state(f)[k], v, DT, msg=f"buffer {k}")


def _compare(actual, expected):
    fa, sa = torch.utils._pytree.tree_flatten(actual)
    fe, se = torch.utils._pytree.tree_flatten(expected)
    assert sa == se, f"structure: {sa} vs {se}"
    for a, e in zip(fa, fe):
        assert a.shape == e.shape, f"shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert a.dtype == e.dtype
        assert_close_scaled(a, e, DT)


class _BatchNormFunctionalTwin(nn.Module):
    """torch.nn.BatchNorm*d's forward in training written with torch.nn.functional.batch_norm,
    its counter incremented outside every transform: the reference for fastnorm's BatchNorm in
    training with running statistics under grad transforms (torch.nn's module refuses those)."""

    def __init__(self, state, t):
        super().__init__()
        self.weight = nn.Parameter(state["weight"].clone())
        self.bias = nn.Parameter(state["bias"].clone())
        self.register_buffer("running_mean", state["running_mean"].clone())
        self.register_buffer("running_var", state["running_var"].clone())
        self.register_buffer("num_batches_tracked", state["num_batches_tracked"].clone())
        self.momentum, self.eps, self.calls = t.momentum, t.eps, 0

    def forward(self, x):
        # the calls that succeed are counted in Python; num_batches_tracked is advanced by that
        # count after the transform (a call that raises counts nothing, as in fastnorm)
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / (int(self.num_batches_tracked) + self.calls + 1)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                         momentum, self.eps)
        self.calls += 1
        return y


# ----------------------------------------------------------------------------------------------
# functionals
# ----------------------------------------------------------------------------------------------
def _functional_cases():
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    w4, b4, w5, b5 = rnd(4).abs() + 0.5, rnd(4), rnd(5).abs() + 0.5, rnd(5)
    rm, rv = rnd(4) * 0.5, rnd(4).abs() + 0.5
    return {
        "layer_norm": (lambda M, x: M.layer_norm(x, (5,), w5, b5), (3, 4, 5)),
        "layer_norm-noaffine": (lambda M, x: M.layer_norm(x, (4, 5)), (3, 4, 5)),
        "group_norm": (lambda M, x: M.group_norm(x, 2, w4, b4), (3, 4, 5)),
        "group_norm-3d": (lambda M, x: M.group_norm(x, 4, w4, None, 1e-3), (2, 4, 2, 3)),
        "instance_norm": (lambda M, x: M.instance_norm(x, weight=w4, bias=b4), (3, 4, 5)),
        "instance_norm-eval-stats": (lambda M, x: M.instance_norm(x, rm, rv, w4, b4,
                                                                  use_input_stats=False), (3, 4, 5)),
        "batch_norm-eval": (lambda M, x: M.batch_norm(x, rm, rv, w4, b4), (3, 4, 5)),
        "batch_norm-train-nostats": (lambda M, x: M.batch_norm(x, None, None, w4, b4, True),
                                     (3, 4, 5)),
    }


FUNCTIONAL_CASES = _functional_cases()


@pytest.mark.parametrize("transform", ["grad_input", "jacrev", "jacfwd", "jvp", "vmap",
                                       "per_sample", "hessian"])
@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_transform_matches_torch(case, transform):
    call, shape = FUNCTIONAL_CASES[case]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=DT) * 2 + 0.5
    r = torch.randn(shape, generator=g, dtype=DT)
    out = []
    for M in (F, fastnorm.functional):
        fn = lambda xx, M=M: call(M, xx)  # noqa: E731
        if transform == "grad_input":
            res = grad(lambda xx: (fn(xx) * r).sum() + fn(xx).pow(3).mean())(x)
        elif transform == "jacrev":
            res = jacrev(fn)(x)
        elif transform == "jacfwd":
            res = jacfwd(fn)(x)
        elif transform == "jvp":
            res = jvp(fn, (x,), (r,))
        elif transform == "vmap":
            res = vmap(fn)(torch.stack([x, x * 0.5 + 1]))
        elif transform == "per_sample":
            res = vmap(grad(lambda xi, ri: (fn(xi[None]) * ri).sum() + fn(xi[None]).pow(3).mean()))(x, r)
        else:
            res = jacfwd(jacrev(lambda xx: (fn(xx) * r).sum() + fn(xx).pow(3).mean()))(x)
        out.append(res)
    _compare(out[1], out[0])


def test_functional_batch_norm_vmap_over_running_stats():
    """Training with running statistics batched alongside the input (one set per vmapped sample,
    one of them carrying the vmapped dim last): each set is updated in place as a separate
    torch.nn.functional.batch_norm call would. (torch's own batching rule leaves a running_var
    whose vmapped dim is not 0 unchanged, so the reference is the loop over samples.)"""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 4, 5, generator=g, dtype=DT)
    w = torch.rand(4, generator=g, dtype=DT) + 0.5
    rm0 = torch.randn(3, 4, generator=g, dtype=DT)
    rv0 = torch.rand(3, 4, generator=g, dtype=DT) + 0.5
    rm, rv = rm0.clone(), rv0.t().contiguous()  # rv: (C, B), vmapped dim 1
    y = vmap(lambda xx, m, v: fastnorm.functional.batch_norm(xx, m, v, w, None, True, 0.2),
             in_dims=(0, 0, 1))(x, rm, rv)
    e_rm, e_rv = rm0.clone(), rv0.clone()
    e_y = torch.stack([F.batch_norm(x[i], e_rm[i], e_rv[i], w, None, True, 0.2) for i in range(3)])
    _compare((y, rm, rv.t()), (e_y, e_rm, e_rv))


def test_functional_batch_norm_vmap_unbatched_stats_refused():
    x = torch.randn(3, 6, 4, dtype=DT)
    for M in (F, fastnorm.functional):
        rm, rv = torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT)
        with pytest.raises(RuntimeError, match="running_mean or running_var"):
            vmap(lambda xx: M.batch_norm(xx, rm, rv, training=True))(x)
    assert torch.equal(rm, torch.zeros(4, dtype=DT)) and torch.equal(rv, torch.ones(4, dtype=DT))


# ----------------------------------------------------------------------------------------------
# model ensembles: vmap over stacked parameters and buffers (torch.func.stack_module_state)
# ----------------------------------------------------------------------------------------------
ENSEMBLE_SPECS = ["LayerNorm", "LayerNorm-nobias", "GroupNorm", "GroupNorm-4d",
                  "InstanceNorm2d-affine-track-train", "InstanceNorm1d-affine-track-eval",
                  "InstanceNorm1d-affine-notrack-train", "BatchNorm2d-3x4x2x3-eval",
                  "BatchNorm2d-3x4x2x3-track-train", "BatchNorm1d-3x4x5-track-momentum-None",
                  "BatchNorm1d-6x4-notrack"]


@pytest.mark.parametrize("shared_input", [True, False], ids=["shared-x", "batched-x"])
@pytest.mark.parametrize("spec_id", ENSEMBLE_SPECS)
def test_ensemble_matches_torch(spec_id, shared_input, device):
    """Three models, stacked: one vmapped forward, then one vmapped forward+grad. The reference
    runs each torch.nn model on its own (torch's vmap refuses some of these: momentum=None reads
    num_batches_tracked on the host)."""
    spec = SPEC_BY_ID[spec_id]
    torch_models, fast_models = [], []
    for i in range(3):
        pair = make_twins(spec, device)
        for m in pair:
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 + 0.1 * i)
                for _, b in m.named_buffers():
                    b.add_(0.05 * i if b.is_floating_point() else i)
        torch_models.append(pair[0])
        fast_models.append(pair[1])
    x, r = _inputs(spec, device)
    xs = [x if shared_input else x * (1 - 0.25 * i) for i in range(3)]

    expected_y, expected_g = [], []
    for m, xi in zip(torch_models, xs):
        expected_y.append(m(xi))
        y = m(xi)
        names = [k for k, _ in m.named_parameters()]
        gs = torch.autograd.grad((y * r).sum(), [p for _, p in m.named_parameters()]) if names else []
        expected_g.append(dict(zip(names, gs)))
    expected = (torch.stack(expected_y).detach(),
                {k: torch.stack([g[k] for g in expected_g]) for k in expected_g[0]},
                {k: torch.stack([dict(m.named_buffers())[k] for m in torch_models])
                 for k, _ in torch_models[0].named_buffers()})

    params, buffers = stack_module_state(fast_models)
    base = fast_models[0]
    in_x = None if shared_input else 0
    xb = x if shared_input else torch.stack(xs)

    def call(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    y = vmap(call, in_dims=(0, 0, in_x))(params, buffers, xb)
    gp = vmap(grad(lambda p, b, xx: (call(p, b, xx) * r).sum()), in_dims=(0, 0, in_x))(params, buffers, xb)
    _compare((y.detach(), gp, buffers), expected)


# ----------------------------------------------------------------------------------------------
# the ops' batching rules, directly: vmap(op) equals stacking the op over the samples, for every
# combination of batched arguments
# ----------------------------------------------------------------------------------------------
def _vmap_vs_loop(op, args, batched, bdims, nonbatched_kwargs=(), mutated=()):
    """args: per-argument batched stacks (B, ...) or plain values; batched: which args are
    batched; bdims: where each batched arg carries its vmapped dim."""
    b = next(a.shape[0] for a, on in zip(args, batched) if on)
    in_dims = tuple(d if on else None for on, d in zip(batched, bdims))
    phys = [a.movedim(0, d).contiguous() if on else a for a, on, d in zip(args, batched, bdims)]
    loop_args = [a.clone() if (on and i in mutated) else a for i, (a, on) in enumerate(zip(args, batched))]
    loop_out = []
    for i in range(b):
        loop_out.append(op(*[a[i] if on else a for a, on in zip(loop_args, batched)]))
    stacked = [torch.stack(ts) for ts in zip(*loop_out)]
    out = vmap(op, in_dims=in_dims)(*phys)
    for o, e in zip(out, stacked):  # masked-off outputs: [0] per sample, (B, 0) stacked
        assert o.shape == e.shape, f"{tuple(o.shape)} vs {tuple(e.shape)}"
        assert_close_scaled(o, e, DT)
    for i in mutated:  # in-place updates reached each sample's buffer
        if batched[i]:
            assert_close_scaled(phys[i].movedim(bdims[i], 0), loop_args[i], DT, msg=f"arg {i}")


COMBOS = [c for c in itertools.product((False, True), repeat=3) if any(c)]


def _rand(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)


@pytest.mark.parametrize("xb,wb,bb", COMBOS)
def test_layer_norm_fwd_vmap_rule(xb, wb, bb, device):
    ops = torch.ops.fastnorm
    x, w, b = (_rand(3, 2, 4, 5, device=device), _rand(3, 4, 5, seed=1, device=device).abs() + .5,
               _rand(3, 4, 5, seed=2, device=device))
    args = (x if xb else x[0], w if wb else w[0], b if bb else b[0])
    _vmap_vs_loop(lambda xx, ww, bb_: ops.layer_norm_fwd(xx, [4, 5], ww, bb_, 1e-5),
                  args, (xb, wb, bb), (1, 0, 2))


@pytest.mark.parametrize("xb,wb,bb", COMBOS)
def test_group_norm_fwd_vmap_rule(xb, wb, bb, device):
    ops = torch.ops.fastnorm
    x, w, b = (_rand(3, 2, 6, 5, device=device), _rand(3, 6, seed=1, device=device).abs() + .5,
               _rand(3, 6, seed=2, device=device))
    args = (x if xb else x[0], w if wb else w[0], b if bb else b[0])
    _vmap_vs_loop(lambda xx, ww, bb_: ops.group_norm_fwd(xx, ww, bb_, 3, 1e-5),
                  args, (xb, wb, bb), (2, 1, 0))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("xb,wb,sb", COMBOS)
def test_batch_norm_fwd_vmap_rule(xb, wb, sb, training, device):
    ops = torch.ops.fastnorm
    x, w = _rand(3, 4, 6, 5, device=device), _rand(3, 6, seed=1, device=device).abs() + .5
    rm, rv = _rand(3, 6, seed=2, device=device), _rand(3, 6, seed=3, device=device).abs() + .5
    if training and (xb or wb) and not sb:
        if not xb:  # only the weight batched: one shared update, then each sample's affine
            t_rm, t_rv = rm[0].clone(), rv[0].clone()
            y = vmap(lambda ww: ops.batch_norm_fwd(x[0], ww, None, t_rm, t_rv, None, True, 0.1,
                                                   1e-5)[0])(w)
            r_rm, r_rv = rm[0].clone(), rv[0].clone()
            e = ops.batch_norm_fwd(x[0], None, None, r_rm, r_rv, None, True, 0.1, 1e-5)[0]
            assert_close_scaled(y, e * w[:, None, :, None], DT)
            assert_close_scaled(t_rm, r_rm, DT)
            return
        s_rm, s_rv = rm[0].clone(), rv[0].clone()
        with pytest.raises(RuntimeError, match="running_mean or running_var"):
            vmap(lambda xx, ww: ops.batch_norm_fwd(xx, ww, None, s_rm, s_rv, None, True, 0.1, 1e-5),
                 in_dims=(0 if xb else None, 0 if wb else None))(x if xb else x[0], w if wb else w[0])
        assert torch.equal(s_rm, rm[0]) and torch.equal(s_rv, rv[0])
        return
    args = (x if xb else x[0], w if wb else w[0], rm if sb else rm[0], rv if sb else rv[0])
    _vmap_vs_loop(lambda xx, ww, m, v: ops.batch_norm_fwd(xx, ww, None, m, v, None, training, 0.1, 1e-5),
                  args, (xb, wb, sb, sb), (1, 0, 1, 0), mutated=(2, 3) if training else ())


def test_batch_norm_fwd_vmap_rule_counters(device):
    """Batched counters (an ensemble's num_batches_tracked) with momentum=None: each sample
    averages with its own factor 1 / num_batches_tracked."""
    ops = torch.ops.fastnorm
    x = _rand(3, 4, 6, 5, device=device)
    rm, rv = _rand(3, 6, seed=2, device=device), _rand(3, 6, seed=3, device=device).abs() + .5
    nbt = torch.tensor([0, 4, 9], device=device)
    _vmap_vs_loop(lambda xx, m, v, n: ops.batch_norm_fwd(xx, None, None, m, v, n, True, None, 1e-5),
                  (x, rm, rv, nbt), (True, True, True, True), (0, 0, 0, 0), mutated=(1, 2, 3))
    nbt2 = torch.tensor([0, 4, 9], device=device)
    _vmap_vs_loop(lambda xx, m, v, n: ops.batch_norm_fwd(xx, None, None, m, v, n, True, 0.3, 1e-5),
                  (x, rm.clone(), rv.clone(), nbt2), (True, True, True, True), (0, 0, 0, 0),
                  mutated=(1, 2, 3))


BWD_COMBOS = [c for c in itertools.product((False, True), repeat=3) if any(c)]  # (dy, x, w)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "dx", "dwdb"])
@pytest.mark.parametrize("gb,xb,wb", BWD_COMBOS)
@pytest.mark.parametrize("kind", ["layer", "group", "batch-train", "batch-eval"])
def test_bwd_vmap_rules(kind, gb, xb, wb, mask, device):
    ops = torch.ops.fastnorm
    dy, x = _rand(3, 2, 6, 5, device=device), _rand(3, 2, 6, 5, seed=1, device=device)
    w = _rand(3, 6, seed=2, device=device).abs() + .5
    if kind == "layer":
        w = _rand(3, 6, 5, seed=2, device=device).abs() + .5
        stats = [ops.layer_norm_fwd(xi, [6, 5], None, None, 1e-5)[1:] for xi in x]

        def op(g, xx, ww, m, r):
            return ops.layer_norm_bwd(g, xx, m, r, ww, [6, 5], list(mask))
    elif kind == "group":
        stats = [ops.group_norm_fwd(xi, None, None, 3, 1e-5)[1:] for xi in x]

        def op(g, xx, ww, m, r):
            return ops.group_norm_bwd(g, xx, m, r, ww, 3, list(mask))
    else:
        training = kind == "batch-train"
        rm, rv = _rand(6, seed=4, device=device), _rand(6, seed=5, device=device).abs() + .5
        stats = [ops.batch_norm_fwd(xi, None, None, None if training else rm, None if training else rv,
                                    None, training, 0.1, 1e-5)[1:] for xi in x]

        def op(g, xx, ww, m, r):
            return ops.batch_norm_bwd(g, xx, m, r, ww, training, list(mask))
    m, r = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    # x unbatched: its statistics are not batched either (sample 0's)
    args = (dy if gb else dy[0], x if xb else x[0], w if wb else w[0],
            m if xb else m[0], r if xb else r[0])
    _vmap_vs_loop(op, args, (gb, xb, wb, xb, xb), (0, 1, 0, 0, 0))
