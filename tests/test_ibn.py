"""fastnorm.IBN (IBN-Net's IBN block) against (a) a float64 reference written here the way IBN-Net
composes it - torch.nn.InstanceNorm2d(affine=True) on the first int(planes * ratio) channels,
torch.nn.BatchNorm2d on the rest, split and cat - and (b) fastnorm's own InstanceNorm2d and
BatchNorm2d on the two halves in the same dtype (BatchNorm semantics: running statistics,
momentum None, num_batches_tracked, eval, track_running_stats). Two training steps then eval:
outputs, every gradient, buffers; state_dict; any ratio; dtypes; layouts; gradcheck; compile;
errors leaving the state alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import fastnorm
from conftest import assert_close_scaled

CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class SplitIBN(nn.Module):
    """IBN-Net's composition (split, two norms, cat) for any ratio, on the given classes."""

    def __init__(self, planes, ratio, in_cls, bn_cls):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = in_cls(self.half, affine=True)
        self.BN = bn_cls(planes - self.half)

    def forward(self, x):
        a, b = x[:, :self.half], x[:, self.half:]
        parts = []
        if self.half:
            parts.append(self.IN(a.contiguous()))
        if x.shape[1] - self.half:
            parts.append(self.BN(b.contiguous()))
        return torch.cat(parts, 1)


def randomize(mod):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g, dtype=torch.float64)
                t.copy_(r + 0.5 if ("weight" in name or "var" in name) else r - 0.5)
    return mod


def twins(planes, ratio, bn_kw=None):
    mod = randomize(fastnorm.IBN(planes, ratio))
    for m in (mod.BN,):
        for k, v in (bn_kw or {}).items():
            setattr(m, k, v)
        if bn_kw and bn_kw.get("track_running_stats") is False:
            m.running_mean = m.running_var = m.num_batches_tracked = None
    ref64 = SplitIBN(planes, ratio, nn.InstanceNorm2d, nn.BatchNorm2d)
    same = SplitIBN(planes, ratio, fastnorm.InstanceNorm2d, fastnorm.BatchNorm2d)
    for r in (ref64, same):
        for k, v in (bn_kw or {}).items():
            setattr(r.BN, k, v)
        if bn_kw and bn_kw.get("track_running_stats") is False:
            r.BN.running_mean = r.BN.running_var = r.BN.num_batches_tracked = None
        r.load_state_dict(mod.state_dict())
    return mod, ref64.double(), same


def _x(shape, dtype, fmt=None, offset=0.5):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _grads(mod):
    out = {k: p.grad.clone() for k, p in mod.named_parameters() if p.grad is not None}
    mod.zero_grad(set_to_none=True)
    return out


def run_steps(planes, ratio, shape, dtype, fmt=None, bn_kw=None, modes=("train", "train", "eval")):
    mod, ref64, same = twins(planes, ratio, bn_kw)
    if dtype == torch.float64:
        mod.double()
        same.double()
    for i, mode in enumerate(modes):
        for m in (mod, ref64, same):
            m.train(mode == "train")
        x = _x(shape, dtype, fmt, offset=0.5 + i)
        g = _x(shape, dtype, offset=0.0)
        msg = f"IBN({planes}, {ratio}) {dtype} {bn_kw} step {i} ({mode})"
        xs = x.clone().requires_grad_()
        y = mod(xs)
        assert y.dtype == dtype and y.shape == x.shape
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt), "output keeps the input's memory format"
        y.backward(g)
        dx, grads = xs.grad, _grads(mod)
        # (a) float64 torch.nn reference
        x64 = x.detach().double().requires_grad_()
        y64 = ref64(x64)
        y64.backward(g.double())
        assert_close_scaled(y.double(), y64, dtype, msg=msg + ": y vs float64 torch.nn")
        assert_close_scaled(dx.double(), x64.grad, dtype, factor=4, msg=msg + ": dx vs float64")
        g64 = _grads(ref64)
        # an empty half (ratio 0 or 1): its parameters have no elements, and gradients of no
        # elements here where the split reference never touches them
        assert set(g64) <= set(grads), msg
        assert all(grads[k].numel() == 0 for k in set(grads) - set(g64)), msg
        for k in g64:
            assert grads[k].dtype == dict(mod.named_parameters())[k].dtype
            assert_close_scaled(grads[k].double(), g64[k], dtype, factor=4, msg=f"{msg}: d{k}")
        for k, b in mod.named_buffers():
            rb = dict(ref64.named_buffers())[k]
            if b.is_floating_point():
                assert_close_scaled(b.double(), rb, dtype, msg=f"{msg}: {k} vs float64")
            else:
                assert torch.equal(b, rb), f"{msg}: {k}"
        # (b) fastnorm's InstanceNorm2d / BatchNorm2d on the halves, same dtype
        xs2 = x.clone().requires_grad_()
        y2 = same(xs2)
        y2.backward(g)
        assert_close_scaled(y.float(), y2.float(), dtype, msg=msg + ": y vs fastnorm halves")
        gs = _grads(same)
        for k in g64:
            assert_close_scaled(grads[k].float(), gs[k].float(), dtype, factor=4,
                                msg=f"{msg}: d{k} vs fastnorm halves")
        for k, b in mod.named_buffers():
            rb = dict(same.named_buffers())[k]
            if b.is_floating_point():
                assert_close_scaled(b.float(), rb.float(), dtype, msg=f"{msg}: {k} vs fastnorm")
            else:
                assert torch.equal(b, rb), f"{msg}: {k}"


# ----------------------------------------------------------------------------------------------
# semantics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes,ratio,shape", [
    (8, 0.5, (4, 8, 5, 6)),
    (13, 0.3, (3, 13, 4, 7)),      # half = 3, odd widths
    (3, 0.5, (1, 3, 5, 5)),        # half = 1, N = 1
    (4, 0.0, (2, 4, 3, 3)),        # BatchNorm only
    (4, 1.0, (2, 4, 3, 3)),        # InstanceNorm only
])
def test_matches_references(planes, ratio, shape, dtype):
    run_steps(planes, ratio, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last(dtype):
    run_steps(13, 0.5, (3, 13, 5, 6), dtype, CL)


@pytest.mark.parametrize("bn_kw", [dict(momentum=None), dict(momentum=0.3, eps=1e-3),
                                   dict(track_running_stats=False)])
def test_batch_norm_options(bn_kw):
    run_steps(6, 0.5, (3, 6, 4, 4), torch.float32, bn_kw=bn_kw,
              modes=("train", "train", "train", "eval"))


def test_spatial_one_batch_norm_only():
    """Spatial 1 is fine for the BatchNorm channels (N > 1); the InstanceNorm ones refuse it
    (test_errors)."""
    run_steps(5, 0.0, (4, 5, 1, 1), torch.float32)


def test_eval_only_and_frozen_gradients():
    run_steps(7, 0.5, (2, 7, 3, 4), torch.float64, modes=("eval", "eval"))


def test_empty_batch_like_batch_norm():
    mod, _, same = twins(6, 0.5)
    x = torch.randn(0, 6, 4, 4, requires_grad=True)
    y = mod(x)
    y2 = same(torch.randn(0, 6, 4, 4))
    assert y.shape == x.shape == y2.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for (k, b), (_, rb) in zip(mod.named_buffers(), same.named_buffers()):
        assert torch.equal(b, rb), k  # counter advanced, statistics untouched, as BatchNorm2d


# ----------------------------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------------------------
def test_state_dict_matches_ibn_net():
    mod = fastnorm.IBN(64, 0.5)
    ref = SplitIBN(64, 0.5, nn.InstanceNorm2d, nn.BatchNorm2d)
    assert {k: v.shape for k, v in mod.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    assert set(mod.state_dict()) == {"IN.weight", "IN.bias", "BN.weight", "BN.bias",
                                     "BN.running_mean", "BN.running_var",
                                     "BN.num_batches_tracked"}
    assert mod.IN.weight.shape == (32,) and mod.BN.weight.shape == (32,)
    assert isinstance(mod.IN, fastnorm.InstanceNorm2d) and isinstance(mod.BN, fastnorm.BatchNorm2d)
    randomize(ref)
    ref.BN.num_batches_tracked.fill_(7)
    mod.load_state_dict(ref.state_dict(), strict=True)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    x = torch.randn(2, 64, 5, 5)
    ref.eval()
    mod.eval()
    assert_close_scaled(mod(x), ref(x))


def test_uneven_ratio_state_dict():
    mod = fastnorm.IBN(13, 0.3)
    assert mod.half == 3 and mod.IN.num_features == 3 and mod.BN.num_features == 10


# ----------------------------------------------------------------------------------------------
# gradcheck, compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(training):
    mod = randomize(fastnorm.IBN(5, 0.4)).double().train(training)
    names = [k for k, _ in mod.named_parameters()]
    x = _x((3, 5, 3, 4), torch.float64).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in mod.parameters())

    def f(x, *ps):
        state = dict(zip(names, ps))
        state.update(dict(mod.named_buffers()))
        return torch.func.functional_call(mod, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("fmt", [None, CL])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(fmt, momentum):
    torch._dynamo.reset()
    eager = randomize(fastnorm.IBN(6, 0.5))
    eager.BN.momentum = momentum
    comp = copy.deepcopy(eager)
    opt = torch.compile(comp, backend="aot_eager", fullgraph=True)
    for i, mode in enumerate(["train", "train", "eval"]):
        eager.train(mode == "train")
        comp.train(mode == "train")
        x = _x((3, 6, 4, 5), torch.float32, fmt, offset=i)
        g = torch.randn(3, 6, 4, 5)
        res = []
        for call, owner in ((eager, eager), (opt, comp)):
            xi = x.clone().requires_grad_()
            y = call(xi)
            y.backward(g)
            res.append((y.detach(), xi.grad, _grads(owner)))
        (ye, dxe, ge), (yc, dxc, gc) = res
        assert_close_scaled(yc, ye, msg=f"{mode} {i}: y")
        assert_close_scaled(dxc, dxe, msg=f"{mode} {i}: dx")
        for k in ge:
            assert_close_scaled(gc[k], ge[k], msg=f"{mode} {i}: d{k}")
        for (k, b), (_, be) in zip(comp.named_buffers(), eager.named_buffers()):
            assert torch.allclose(b, be, rtol=1e-6, atol=1e-7), f"{mode} {i}: {k} updated once"
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# errors: torch's exception types, expected and actual in the message, state untouched
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("planes,ratio,shape,exc,words", [
    (6, 0.5, (6, 4, 4), ValueError, ["4D", "3D"]),
    (6, 0.5, (2, 5, 4, 4), RuntimeError, ["6 channels", "(2, 5, 4, 4)"]),
    (6, 0.5, (2, 6, 1, 1), ValueError, ["spatial", "[2, 6, 1, 1]"]),
    (6, 0.0, (1, 6, 1, 1), ValueError, ["per channel", "[1, 6, 1, 1]"]),
])
def test_errors_leave_state_alone(planes, ratio, shape, exc, words):
    mod = randomize(fastnorm.IBN(planes, ratio))
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(exc) as e:
        mod(torch.randn(shape))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_integer_input_raises():
    mod = fastnorm.IBN(4)
    with pytest.raises(RuntimeError, match="floating-point"):
        mod(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    assert int(mod.BN.num_batches_tracked) == 0


def test_checkpoint_updates_running_statistics_once():
    from torch.utils.checkpoint import checkpoint

    mod = randomize(fastnorm.IBN(6, 0.5))
    twin = copy.deepcopy(mod)
    x = _x((4, 6, 5, 5), torch.float32).requires_grad_()
    checkpoint(mod, x, use_reentrant=False).sum().backward()
    twin(x.detach())
    for (k, b), (_, bt) in zip(mod.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, bt) if not b.is_floating_point() else torch.allclose(b, bt), k
