"""torch.compile(fullgraph=True): forward+backward of every module without graph breaks, equal to
eager, BatchNorm running statistics updated exactly once per compiled call."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import fastnorm
from conftest import (MODULE_NAMES, assert_close_scaled, assert_grads_close, base_kind,
                      default_input_shape, is_lazy, make_input, make_pair)


@pytest.fixture(autouse=True)
def _dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kwargs(name):
    return dict(affine=True, track_running_stats=True) if base_kind(name) == "in" else {}


def _fwd_bwd(call, x, g, owner=None):
    owner = owner or call
    x = x.clone().requires_grad_()
    y = call(x)
    y.backward(g)
    grads = {k: p.grad.clone() for k, p in owner.named_parameters()}
    for p in owner.parameters():
        p.grad = None
    return y.detach(), x.grad, grads


def _compare_compiled(name, device, backend, steps=2, eval_step=True, x_shape=None, dynamic=False):
    """Compiled fastnorm module vs its eager fastnorm twin (and the eager torch.nn one), step by
    step: outputs, grads, buffers."""
    torch.manual_seed(0)
    t, eager = make_pair(name, 3, device, **_kwargs(name))
    if is_lazy(name):
        compiled_mod = getattr(fastnorm, name)(device=device, **_kwargs(name))
    else:
        compiled_mod = copy.deepcopy(eager)
    opt = torch.compile(compiled_mod, backend=backend, fullgraph=True, dynamic=dynamic)
    shape = x_shape or default_input_shape(name)
    modes = ["train"] * steps + (["eval"] if eval_step else [])
    for i, mode in enumerate(modes):
        for m in (t, eager, compiled_mod):
            m.train(mode == "train")
        x = make_input(shape, device, offset=0.5 + i)
        g = torch.randn(shape, device=device)
        ye, xge, pge = _fwd_bwd(eager, x, g)
        yc, xgc, pgc = _fwd_bwd(opt, x, g, compiled_mod)
        yt, xgt, pgt = _fwd_bwd(t, x, g)
        for ref_, tag in ((ye, "eager fastnorm"), (yt, "torch.nn")):
            assert_close_scaled(yc, ref_, torch.float32, msg=f"{mode} step {i}: output vs {tag}")
        assert_close_scaled(xgc, xge, torch.float32, msg=f"step {i}: x.grad")
        assert_close_scaled(xgc, xgt, torch.float32, msg=f"step {i}: x.grad vs torch")
        for k in pge:
            assert_close_scaled(pgc[k], pge[k], torch.float32, msg=f"step {i}: {k}.grad")
        sc, se = compiled_mod.state_dict(), eager.state_dict()
        assert list(sc) == list(se)
        for k in se:
            if k.endswith("num_batches_tracked"):
                assert torch.equal(sc[k], se[k]), f"step {i}: {k} {sc[k]} vs eager {se[k]}"
            else:
                assert_close_scaled(sc[k], se[k], torch.float32, msg=f"step {i}: {k}")
    return compiled_mod


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_compile_aot_eager(name, device):
    m = _compare_compiled(name, device, "aot_eager")
    if is_lazy(name):
        assert type(m) is getattr(fastnorm, name.replace("Lazy", ""))


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "GroupNorm"])
def test_compile_inductor(name, device):
    _compare_compiled(name, device, "inductor", steps=1)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_bn_updates_running_stats_once(momentum, device):
    torch.manual_seed(0)
    t, f = make_pair("BatchNorm2d", 3, device, momentum=momentum)
    opt = torch.compile(f, backend="aot_eager", fullgraph=True)
    for step in range(1, 4):
        x = make_input((4, 3, 3, 5), device, offset=step)
        opt(x)
        t(x)
        assert int(f.num_batches_tracked) == step == int(t.num_batches_tracked)
        assert_close_scaled(f.running_mean, t.running_mean, torch.float32)
        assert_close_scaled(f.running_var, t.running_var, torch.float32)
    f.eval()
    t.eval()
    x = make_input((4, 3, 3, 5), device)
    assert_close_scaled(opt(x), t(x), torch.float32)
    assert int(f.num_batches_tracked) == 3


def test_compile_no_graph_breaks_counted(device):
    """Beyond fullgraph=True: dynamo's own accounting shows one graph and zero breaks."""
    torch.manual_seed(0)
    model = nn.Sequential(fastnorm.BatchNorm1d(4), nn.ReLU(), fastnorm.LayerNorm(4),
                          fastnorm.GroupNorm(2, 4)).to(device)
    x = torch.randn(5, 4, device=device)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    opt = torch.compile(model, backend="aot_eager")
    opt(x).sum().backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_compile_model_with_several_norms(device):
    """A small CNN under fullgraph compile: grads and running stats equal eager."""
    torch.manual_seed(0)

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), fastnorm.BatchNorm2d(6), nn.ReLU(),
                             fastnorm.GroupNorm(3, 6), fastnorm.InstanceNorm2d(6, affine=True),
                             nn.Flatten(), fastnorm.LayerNorm(6 * 16)).to(device)
    eager, comp = build(), build()
    opt = torch.compile(comp, backend="aot_eager", fullgraph=True)
    for i in range(2):
        x = torch.randn(2, 3, 4, 4, device=device)
        eager(x).pow(2).sum().backward()
        opt(x).pow(2).sum().backward()
    # the conv's bias (before BatchNorm) and GroupNorm's (before InstanceNorm) have gradients zero
    # in exact arithmetic: judged against the scale of all the gradients
    assert_grads_close({k: p.grad for k, p in comp.named_parameters()},
                       {k: p.grad for k, p in eager.named_parameters()}, torch.float32, factor=10)
    for (k, be), (_, bc) in zip(eager.named_buffers(), comp.named_buffers()):
        if be.is_floating_point():
            assert_close_scaled(bc, be, torch.float32, msg=k)
        else:
            assert torch.equal(bc, be), k


def test_compile_dynamic_shapes(device):
    """dynamic=True: a second batch size reuses the graph and stays correct."""
    torch.manual_seed(0)
    t, f = make_pair("BatchNorm1d", 3, device)
    opt = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (4, 7, 5):
        x = make_input((n, 3, 5), device)
        assert_close_scaled(opt(x), t(x), torch.float32)
        assert_close_scaled(f.running_var, t.running_var, torch.float32)
    assert int(f.num_batches_tracked) == 3


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d"])
def test_torch_export(name, device):
    """torch.export traces the ops (fake kernels, declared mutations): the exported program
    computes what eager does, BN running statistics included."""
    torch.manual_seed(0)
    kw = dict(affine=True, track_running_stats=True) if name == "InstanceNorm2d" else {}
    t, f = make_pair(name, 3, device, **kw)
    shape = (4, 5, 3) if name == "LayerNorm" else (4, 3, 3, 5)
    x = make_input(shape, device)
    for mode in (True, False):
        t.train(mode)
        f.train(mode)
        ep = torch.export.export(f, (x,))
        mod = ep.module()
        y = mod(x)
        yt = t(x)
        assert_close_scaled(y, yt, torch.float32)
        exported_state = dict(mod.state_dict())
        for k, v in t.state_dict().items():
            if "running" in k or "num_batches" in k:
                if v.is_floating_point():
                    assert_close_scaled(exported_state[k], v, torch.float32, msg=k)
                else:
                    assert torch.equal(exported_state[k], v), k
        f.load_state_dict(t.state_dict())  # next mode starts from the same buffers
        fast_ops = [n for n in ep.graph.nodes if n.op == "call_function" and "fastnorm" in str(n.target)]
        assert fast_ops, "the exported graph does not call the fastnorm ops"
