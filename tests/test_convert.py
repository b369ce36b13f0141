"""fastnorm.convert / revert / converted_modules on built models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnorm
from conftest import assert_close_scaled, assert_grads_close


class MyLN(nn.LayerNorm):
    """A subclass with its own forward (like timm's LayerNorm2d): must be left alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


class MyBN(nn.BatchNorm2d):
    pass


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.block = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.custom = MyBN(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn1d = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.inorm(self.gn(self.conv2(x)))
        x = self.custom(self.block(x))
        return self.head(self.bn1d(self.pool(x).flatten(1)))


class SmallTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.my = MyLN(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(self.my(self.norm(self.layer(self.embed(x)))))


TORCH_NORMS = tuple(fastnorm.modules.TORCH_TO_FASTNORM)


def _exact_torch_norms(model):
    return [(n, m) for n, m in model.named_modules() if type(m) in TORCH_NORMS]


def _build(kind, device):
    torch.manual_seed(0)
    model = SmallCNN() if kind == "cnn" else SmallTransformer()
    model.to(device)
    with torch.no_grad():  # non-trivial affine params and buffers
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    return model


def _input(kind, device):
    return torch.randn(4, 3, 6, 6, device=device) if kind == "cnn" else torch.randn(3, 5, 6, device=device)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_convert_swaps_exact_classes_only(kind, device):
    model = _build(kind, device)
    expected = _exact_torch_norms(model)
    assert expected
    subclasses = [(n, m, type(m)) for n, m in model.named_modules() if type(m) in (MyLN, MyBN)]
    out = fastnorm.convert(model)
    assert out is model
    converted = fastnorm.converted_modules(model)
    assert [n for n, _ in converted] == [n for n, _ in expected]
    for (n, m), (_, old) in zip(converted, expected):
        assert m is old  # same module object, class swapped in place
        assert type(m) in fastnorm.modules.FASTNORM_TO_TORCH
        assert fastnorm.modules.FASTNORM_TO_TORCH[type(m)] in TORCH_NORMS
    for n, m, cls in subclasses:
        assert type(m) is cls, f"{n}: subclass {cls.__name__} was swapped"
    assert not _exact_torch_norms(model)
    if kind == "transformer":
        assert type(model.layer.norm1) is fastnorm.LayerNorm and type(model.layer.norm2) is fastnorm.LayerNorm
        assert type(model.my) is MyLN


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_convert_keeps_parameter_and_buffer_objects(kind, device):
    model = _build(kind, device)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    fastnorm.convert(model)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers.items()}
    assert set(model.state_dict()) == set(params) | set(buffers)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_optimizer_built_before_convert(kind, device):
    """An optimizer created before convert() keeps updating the converted model; outputs equal an
    unconverted twin trained identically."""
    model = _build(kind, device)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    fastnorm.convert(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        torch.manual_seed(step)
        x = _input(kind, device)
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert not torch.equal(p, before[n]) or p.grad is None, f"{n} was not updated"
        assert_close_scaled(p, q, torch.float32, factor=10, msg=n)
    for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        if b.is_floating_point():
            assert_close_scaled(b, c, torch.float32, factor=10, msg=n)
        else:
            assert torch.equal(b, c), n
    x = _input(kind, device)
    model.eval()
    twin.eval()
    assert_close_scaled(model(x), twin(x), torch.float32, factor=10)


def test_convert_preserves_mode_requires_grad_hooks_device_dtype(device):
    model = _build("cnn", device).to(torch.float64)
    model.bn1.weight.requires_grad_(False)  # a frozen BN weight
    model.block.eval()  # mixed training modes
    calls = []
    h = model.gn.register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    pre = model.bn1.register_forward_pre_hook(lambda mod, inp: calls.append("pre"))
    modes = {n: m.training for n, m in model.named_modules()}
    fastnorm.convert(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.block[1].training is False and model.bn1.training is True
    assert model.bn1.weight.requires_grad is False and model.bn1.bias.requires_grad is True
    for p in model.parameters():
        assert p.dtype == torch.float64 and p.device.type == device.type
    for b in model.buffers():
        assert b.device.type == device.type
    model(_input("cnn", device).double()).sum().backward()
    assert calls == ["pre", fastnorm.GroupNorm]
    assert model.bn1.weight.grad is None and model.bn1.bias.grad is not None
    h.remove()
    pre.remove()


def test_converted_model_matches_unconverted_forward_backward(device):
    model = _build("cnn", device)
    twin = copy.deepcopy(model)
    fastnorm.convert(model)
    x = _input("cnn", device)
    y, yt = model(x), twin(x)
    assert_close_scaled(y, yt, torch.float32)
    y.pow(2).sum().backward()
    yt.pow(2).sum().backward()
    # conv1's, the block's conv's, gn's and custom's biases feed norms that remove a per-channel
    # shift: gradients zero in exact arithmetic, judged against the scale of all the gradients
    assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                       {n: p.grad for n, p in twin.named_parameters()}, torch.float32, factor=10)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_revert_restores_torch_classes(kind, device):
    model = _build(kind, device)
    types_before = {n: type(m) for n, m in model.named_modules()}
    params = {n: id(p) for n, p in model.named_parameters()}
    fastnorm.convert(model)
    assert fastnorm.converted_modules(model)
    out = fastnorm.revert(model)
    assert out is model
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert fastnorm.converted_modules(model) == []
    assert {n: id(p) for n, p in model.named_parameters()} == params
    if kind == "cnn":
        assert type(model.bn1) is nn.BatchNorm2d
    model(_input(kind, device))  # still runs


def test_convert_is_idempotent_and_handles_lazy_and_root(device):
    root = nn.LayerNorm(4)
    assert fastnorm.convert(root) is root and type(root) is fastnorm.LayerNorm
    fastnorm.convert(root)
    assert type(root) is fastnorm.LayerNorm
    lazy = nn.Sequential(nn.LazyBatchNorm2d(), nn.LazyInstanceNorm1d())
    fastnorm.convert(lazy)
    assert type(lazy[0]) is fastnorm.LazyBatchNorm2d and type(lazy[1]) is fastnorm.LazyInstanceNorm1d
    lazy[0](torch.randn(2, 3, 2, 2))
    assert type(lazy[0]) is fastnorm.BatchNorm2d


def test_subclass_forward_left_alone_gives_subclass_output():
    torch.manual_seed(0)
    m = nn.Sequential(MyLN(5))
    x = torch.randn(2, 5)
    y0 = m(x)
    fastnorm.convert(m)
    torch.testing.assert_close(m(x), y0)
    torch.testing.assert_close(y0, 2 * nn.functional.layer_norm(x, [5], m[0].weight, m[0].bias))
