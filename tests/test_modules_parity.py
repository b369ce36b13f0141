"""Every fastnorm module against its torch.nn twin (identical init): outputs, input/weight/bias
gradients, running buffers and num_batches_tracked over two training steps then an eval step;
plus an independent float64 reference for a subset."""
from __future__ import annotations

import math
import pytest
import torch
from torch import nn

import fastnorm
import reference as ref
from conftest import (MODULE_NAMES, assert_close_scaled, base_kind, default_input_shape, is_lazy,
                      make_input, make_pair, run_protocol, twin_step)

BN_NAMES = [n for n in MODULE_NAMES if base_kind(n) == "bn"]
IN_NAMES = [n for n in MODULE_NAMES if base_kind(n) == "in"]
NONLAZY = [n for n in MODULE_NAMES if not is_lazy(n)]


# ----------------------------------------------------------------------------------------------
# defaults, every module, fp32 and fp64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_default_parity(name, dtype, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 3, device, dtype)
    run_protocol(t, f, default_input_shape(name), device, dtype)
    if is_lazy(name):
        assert type(f) is getattr(fastnorm, name.replace("Lazy", ""))
        assert type(t) is getattr(nn, name.replace("Lazy", ""))
        assert f.num_features == 3


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_bf16_amp_params(name, device):
    """bf16 input, fp32 parameters and buffers (the AMP case)."""
    torch.manual_seed(0)
    t, f = make_pair(name, 5, device, torch.float32)
    run_protocol(t, f, default_input_shape(name, c=5), device, torch.bfloat16)
    for p in f.parameters():
        assert p.dtype == torch.float32 and p.grad is None  # grads were compared then cleared


@pytest.mark.parametrize("name", NONLAZY + ["LazyBatchNorm2d", "LazyInstanceNorm2d"])
def test_bf16_module_cast(name, device):
    """module.to(bfloat16) with bf16 input."""
    torch.manual_seed(0)
    t, f = make_pair(name, 5, device, torch.bfloat16)
    run_protocol(t, f, default_input_shape(name, c=5), device, torch.bfloat16)
    for p in f.parameters():
        assert p.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BN_NAMES + ["InstanceNorm2d", "LazyInstanceNorm1d"])
def test_momentum_none_cumulative_average(name, device):
    torch.manual_seed(0)
    kw = dict(momentum=None)
    if base_kind(name) == "in":
        kw["track_running_stats"] = True
    t, f = make_pair(name, 3, device, **kw)
    shape = default_input_shape(name)
    outs = run_protocol(t, f, shape, device, train_steps=3)
    if base_kind(name) == "bn" and not is_lazy(name):
        assert int(f.num_batches_tracked) == 3
    if base_kind(name) == "bn":
        # cumulative average of the three batches' statistics (factor 1/num_batches_tracked);
        # the initial running values drop out after the first step (factor 1).
        xs = [x for x, _ in outs[:3]]
        means = torch.stack([ref.batch_norm_train(x)[1] for x in xs]).mean(0)
        uvars = torch.stack([ref.batch_norm_train(x)[3] for x in xs]).mean(0)
        assert_close_scaled(f.running_mean.double(), means, torch.float32)
        assert_close_scaled(f.running_var.double(), uvars, torch.float32)


@pytest.mark.parametrize("name", NONLAZY)
def test_affine_off(name, device):
    torch.manual_seed(0)
    kind = base_kind(name)
    kw = {"ln": dict(elementwise_affine=False), "in": dict(affine=False)}.get(kind, dict(affine=False))
    t, f = make_pair(name, 5, device, **kw)
    assert f.weight is None and f.bias is None
    run_protocol(t, f, default_input_shape(name, c=5), device)


def test_layernorm_bias_false(device):
    torch.manual_seed(0)
    t, f = make_pair("LayerNorm", 6, device, bias=False)
    assert f.bias is None and f.weight is not None
    run_protocol(t, f, (3, 4, 6), device)


@pytest.mark.parametrize("name", BN_NAMES)
def test_bn_no_running_stats_eval_uses_batch_stats(name, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 3, device, track_running_stats=False)
    assert f.running_mean is None and f.running_var is None and f.num_batches_tracked is None
    outs = run_protocol(t, f, default_input_shape(name), device)
    x, y = outs[-1]  # the eval step: batch statistics
    expect = ref.batch_norm_train(x, f.weight, f.bias, f.eps)[0]
    assert_close_scaled(y.double(), expect, torch.float32)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("name", IN_NAMES)
def test_instance_norm_tracked_stats(name, affine, device):
    """track_running_stats=True: batch average of per-instance stats in training, running stats
    in eval."""
    torch.manual_seed(0)
    t, f = make_pair(name, 3, device, track_running_stats=True, affine=affine)
    shape = default_input_shape(name)
    outs = run_protocol(t, f, shape, device)
    x_eval, y_eval = outs[-1]
    expect = ref.batch_norm_eval(x_eval, f.running_mean, f.running_var, f.weight, f.bias, f.eps)
    assert_close_scaled(y_eval.double(), expect, torch.float32)


@pytest.mark.parametrize("name", [n for n in IN_NAMES if not is_lazy(n)])
def test_instance_norm_running_stats_reference(name, device):
    torch.manual_seed(0)
    _, f = make_pair(name, 4, device, randomize=False, track_running_stats=True, momentum=0.3)
    x = make_input(default_input_shape(name, c=4), device)
    f.train()
    f(x)
    _, mean, uvar = ref.instance_norm(x)
    zeros, ones = torch.zeros(4, device=device), torch.ones(4, device=device)
    assert_close_scaled(f.running_mean.double(), ref.running_update(zeros, mean.mean(0), 0.3), torch.float32)
    assert_close_scaled(f.running_var.double(), ref.running_update(ones, uvar.mean(0), 0.3), torch.float32)


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("name", [n for n in IN_NAMES if not is_lazy(n)])  # lazy infers C from dim 1
def test_instance_norm_unbatched(name, track, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 3, device, track_running_stats=track, affine=True)
    shape = default_input_shape(name)[1:]
    run_protocol(t, f, shape, device)
    x = make_input(shape, device)
    f.train()
    y = f(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 7), (2, 5, 1)], ids=["NC", "NCL", "NCL1"])
@pytest.mark.parametrize("name", ["BatchNorm1d", "LazyBatchNorm1d"])
def test_batchnorm1d_shapes(name, shape, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 5, device)
    run_protocol(t, f, shape, device)


# ----------------------------------------------------------------------------------------------
# empty batch
# ----------------------------------------------------------------------------------------------
EMPTY_CASES = [("BatchNorm1d", (0, 3)), ("BatchNorm1d", (0, 3, 4)), ("BatchNorm2d", (0, 3, 4, 4)),
               ("BatchNorm3d", (0, 3, 2, 2, 2)), ("LayerNorm", (0, 4, 3)), ("GroupNorm", (0, 3, 4, 4)),
               ("InstanceNorm2d", (0, 3, 4, 4))]


@pytest.mark.parametrize("name,shape", EMPTY_CASES, ids=[f"{n}-{len(s)}d" for n, s in EMPTY_CASES])
def test_empty_batch(name, shape, device):
    torch.manual_seed(0)
    t, f = make_pair(name, 3, device)
    before = {k: v.clone() for k, v in f.state_dict().items()}
    f.train()
    t.train()
    twin_step(t, f, make_input(shape, device), msg="empty batch")
    x = make_input(shape, device).requires_grad_()
    y = f(x)
    assert y.shape == x.shape and y.numel() == 0
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for k, v in before.items():
        if k.endswith("num_batches_tracked"):
            assert int(f.state_dict()[k]) == int(v) + 2  # incremented, as torch's module does
        else:
            assert torch.equal(f.state_dict()[k], v), f"{k} changed on an empty batch"
    for p in f.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_tracked_empty_batch(affine, device):
    """N=0 with tracked statistics: empty output, running statistics untouched (torch 2.14 writes
    NaN into them without affine and raises IndexError with it; fastnorm does better)."""
    torch.manual_seed(0)
    _, f = make_pair("InstanceNorm2d", 3, device, affine=affine, track_running_stats=True)
    before = {k: v.clone() for k, v in f.state_dict().items()}
    x = make_input((0, 3, 4, 4), device).requires_grad_()
    y = f(x)
    assert y.shape == x.shape and y.grad_fn is not None
    y.sum().backward()
    for k, v in before.items():
        assert torch.equal(f.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------
# awkward shapes
# ----------------------------------------------------------------------------------------------
AWKWARD = [
    ("BatchNorm2d", (1, 3, 7, 7)),  # N=1 is fine with spatial > 1
    ("BatchNorm2d", (4, 5, 1, 1)),
    ("BatchNorm2d", (3, 13, 3, 5)),
    ("BatchNorm2d", (2, 13, 7, 7)),
    ("BatchNorm1d", (7, 13)),
    ("BatchNorm1d", (2, 3, 1)),
    ("BatchNorm3d", (2, 5, 1, 1, 1)),
    ("BatchNorm3d", (1, 3, 3, 5, 7)),
    ("LayerNorm", (1, 1, 13)),
    ("LayerNorm", (7, 3, 5)),
    ("LayerNorm", (1, 1)),  # a single element per row: y = bias
    ("GroupNorm", (1, 13, 7, 7)),
    ("GroupNorm", (3, 5, 1, 1)),
    ("GroupNorm", (2, 3, 7)),
    ("GroupNorm", (2, 3)),
    ("InstanceNorm1d", (1, 5, 13)),
    ("InstanceNorm2d", (3, 13, 3, 5)),
    ("InstanceNorm2d", (1, 3, 7, 7)),
    ("InstanceNorm3d", (2, 3, 3, 1, 5)),
]


@pytest.mark.parametrize("name,shape", AWKWARD, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in AWKWARD])
def test_awkward_shapes(name, shape, device):
    torch.manual_seed(0)
    c = shape[-1] if base_kind(name) == "ln" else shape[1]
    kw = {}
    if name == "GroupNorm":
        kw["num_groups"] = {13: 13, 5: 5, 3: 1}[c]
    if base_kind(name) == "in":
        kw.update(affine=True, track_running_stats=True)
    t, f = make_pair(name, c, device, **kw)
    # One element per normalised group (LayerNorm over 1 value, GroupNorm with 1 channel of 1
    # position per group): xhat is 0 exactly and y = bias, dx = 0 exactly, which the kernels
    # return; torch's own result there carries its rounding amplified by rstd = 1/sqrt(eps) ~ 316
    # (up to ~3e-5 in float32). Judged at the scale of that error.
    one_per_group = ((base_kind(name) == "ln" and c == 1) or
                     (name == "GroupNorm" and c // kw["num_groups"] * math.prod(shape[2:]) == 1))
    run_protocol(t, f, shape, device, factor=32.0 if one_per_group else 1.0)


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_groupnorm_group_counts(groups, device):
    torch.manual_seed(0)
    t, f = make_pair("GroupNorm", 6, device, num_groups=groups)
    run_protocol(t, f, (3, 6, 5), device, train_steps=1)


@pytest.mark.parametrize("shape", [[5], [4, 5], [3, 4, 5]], ids=["1d", "2d", "3d"])
def test_layernorm_multidim(shape, device):
    torch.manual_seed(0)
    t = nn.LayerNorm(shape)
    f = fastnorm.LayerNorm(shape)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
    f.load_state_dict(t.state_dict())
    t.to(device)
    f.to(device)
    assert f.weight.shape == tuple(shape)
    run_protocol(t, f, (2, 3, 4, 5), device, train_steps=1)


# ----------------------------------------------------------------------------------------------
# memory formats
# ----------------------------------------------------------------------------------------------
CL_CASES = [("BatchNorm2d", (2, 5, 3, 5)), ("BatchNorm3d", (2, 5, 2, 3, 3)), ("GroupNorm", (2, 5, 3, 5)),
            ("GroupNorm", (2, 5, 2, 3, 3)), ("InstanceNorm2d", (2, 5, 3, 5)),
            ("InstanceNorm3d", (2, 5, 2, 3, 3)), ("LazyBatchNorm2d", (2, 5, 7, 7))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,shape", CL_CASES, ids=[f"{n}-{len(s)}d" for n, s in CL_CASES])
def test_channels_last(name, shape, dtype, device):
    torch.manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    kw = dict(num_groups=5) if name == "GroupNorm" else {}
    if base_kind(name) == "in":
        kw.update(affine=True, track_running_stats=True)
    t, f = make_pair(name, 5, device, **kw)
    outs = run_protocol(t, f, shape, device, dtype, memory_format=fmt)
    for x, y in outs:
        assert x.is_contiguous(memory_format=fmt) and not x.is_contiguous()
        assert y.is_contiguous(memory_format=fmt), f"output lost {fmt}: strides {y.stride()}"
    if base_kind(name) in ("bn", "gn"):  # the ops' dx keeps the input's layout too
        f.train()
        x = make_input(shape, device, dtype, fmt).requires_grad_()
        f(x).backward(torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt))
        assert x.grad.is_contiguous(memory_format=fmt), f"grad strides {x.grad.stride()}"


@pytest.mark.parametrize("name,shape", CL_CASES[:3], ids=[f"{n}-{len(s)}d" for n, s in CL_CASES[:3]])
def test_contiguous_stays_contiguous(name, shape, device):
    torch.manual_seed(0)
    kw = dict(num_groups=5) if name == "GroupNorm" else {}
    _, f = make_pair(name, 5, device, **kw)
    y = f(make_input(shape, device))
    assert y.is_contiguous()


def test_layernorm_channels_last_input(device):
    """LayerNorm over the last dim of a channels_last tensor: values and grads equal torch's."""
    torch.manual_seed(0)
    t, f = make_pair("LayerNorm", 5, device)
    run_protocol(t, f, (2, 3, 4, 5), device, memory_format=torch.channels_last, train_steps=1)


def test_non_dense_input(device):
    """A strided (sliced) input works and gives torch's values."""
    torch.manual_seed(0)
    t, f = make_pair("BatchNorm2d", 3, device)
    x = make_input((4, 6, 5, 8), device)[:, ::2, :, 1::2]
    twin_step(t, f, x)
    t2, f2 = make_pair("GroupNorm", 3, device, num_groups=3)
    twin_step(t2, f2, x)


# ----------------------------------------------------------------------------------------------
# independent float64 reference (not torch.nn.functional)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 5, 7), (2, 13, 3, 5), (2, 3, 2, 3, 5)])
def test_batchnorm_vs_reference(shape, dtype, device):
    torch.manual_seed(0)
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    c = shape[1]
    _, f = make_pair(name, c, device, dtype, momentum=0.3)
    rm0, rv0 = f.running_mean.clone(), f.running_var.clone()
    buffers = (f.running_mean, f.running_var, f.num_batches_tracked)
    ptrs = [b.data_ptr() for b in buffers]
    x = make_input(shape, device, dtype)
    f.train()
    y = f(x)
    # updated in place: the same tensor objects and storage
    assert all(a is b for a, b in zip(buffers, (f.running_mean, f.running_var, f.num_batches_tracked)))
    assert [b.data_ptr() for b in buffers] == ptrs
    assert f.num_batches_tracked.device == x.device and f.num_batches_tracked.dim() == 0
    y_ref, mean, _, uvar = ref.batch_norm_train(x, f.weight, f.bias, f.eps)
    assert_close_scaled(y.double(), y_ref, dtype)
    assert_close_scaled(f.running_mean.double(), ref.running_update(rm0, mean, 0.3), dtype)
    assert_close_scaled(f.running_var.double(), ref.running_update(rv0, uvar, 0.3), dtype)
    assert int(f.num_batches_tracked) == 1
    f.eval()
    x2 = make_input(shape, device, dtype)
    y2 = f(x2)
    assert_close_scaled(y2.double(), ref.batch_norm_eval(x2, f.running_mean, f.running_var, f.weight,
                                                         f.bias, f.eps), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("nshape", [[7], [3, 7], 7], ids=["list1", "list2", "int"])
def test_layernorm_vs_reference(nshape, dtype, device):
    torch.manual_seed(0)
    f = fastnorm.LayerNorm(nshape, eps=1e-3, device=device, dtype=dtype)
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)
        f.bias.normal_()
    x = make_input((2, 4, 3, 7), device, dtype, scale=3.0, offset=2.0)
    assert_close_scaled(f(x).double(), ref.layer_norm(x, nshape, f.weight, f.bias, 1e-3), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5), 3), ((3, 13, 3, 5), 13), ((2, 4, 2, 3, 3), 2), ((5, 6), 2)])
def test_groupnorm_vs_reference(shape, groups, dtype, device):
    torch.manual_seed(0)
    f = fastnorm.GroupNorm(groups, shape[1], device=device, dtype=dtype)
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)
        f.bias.normal_()
    x = make_input(shape, device, dtype)
    assert_close_scaled(f(x).double(), ref.group_norm(x, groups, f.weight, f.bias, f.eps), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 5, 3, 5), (2, 3, 2, 3, 3)])
def test_instancenorm_vs_reference(shape, dtype, device):
    torch.manual_seed(0)
    name = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}[len(shape)]
    _, f = make_pair(name, shape[1], device, dtype, affine=True)
    x = make_input(shape, device, dtype)
    for mode in (True, False):  # instance statistics in eval too
        f.train(mode)
        assert_close_scaled(f(x).double(), ref.instance_norm(x, f.weight, f.bias, f.eps)[0], dtype)
