"""The CPU fast path (fastnorm/functional.py): eager calls on CPU tensors go straight to the ATen
function torch.nn.functional calls, instead of through the fastnorm:: ops.

What is checked here:
- it gives the op path's results: outputs and running statistics bitwise, every dtype, train and
  eval; gradients bitwise wherever the op path runs the same backward kernel (LayerNorm,
  GroupNorm, InstanceNorm without tracked statistics, BatchNorm in training); where the op path
  writes its own backward (BatchNorm with frozen statistics, InstanceNorm with tracked
  statistics) the fast path's gradients are torch.nn's, bitwise, and the op path's within
  rounding;
- it is taken only where it should be: CPU tensors with elements, eagerly; not under
  torch.compile, torch.func transforms, dispatch modes (FakeTensor), nor with the switch off;
- on bad arguments it raises fastnorm's documented exceptions and leaves every buffer untouched;
- the op path on CPU (switch off) still matches torch.nn through the shared protocol.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastnorm
import fastnorm.functional as FN
from conftest import assert_close_scaled, make_pair, run_protocol

CPU = torch.device("cpu")


@pytest.fixture
def op_path():
    """The fastnorm:: ops on CPU tensors too (the fast path switched off) for one test."""
    was = FN.set_cpu_fast_path(False)
    yield
    FN.set_cpu_fast_path(was)


def _modules(family, dtype, param_dtype):
    """(torch.nn module, fastnorm twin, input shape) with random parameters and statistics."""
    torch.manual_seed(0)
    if family == "LayerNorm":
        t, shape = nn.LayerNorm([4, 5]), (3, 2, 4, 5)
    elif family == "GroupNorm":
        t, shape = nn.GroupNorm(2, 4), (3, 4, 5, 6)
    elif family == "BatchNorm1d":
        t, shape = nn.BatchNorm1d(4), (6, 4)
    elif family == "BatchNorm2d":
        t, shape = nn.BatchNorm2d(4), (3, 4, 5, 6)
    elif family == "BatchNorm2d-cumulative":
        t, shape = nn.BatchNorm2d(4, momentum=None), (3, 4, 5, 6)
    elif family == "BatchNorm3d":
        t, shape = nn.BatchNorm3d(4), (2, 4, 3, 4, 2)
    elif family == "InstanceNorm2d":
        t, shape = nn.InstanceNorm2d(4, affine=True), (3, 4, 5, 6)
    elif family == "InstanceNorm2d-tracked":
        t, shape = nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 6)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for p in t.parameters():
            p.uniform_(0.5, 1.5)
        if getattr(t, "running_mean", None) is not None:
            t.running_mean.normal_(0.0, 0.5)
            t.running_var.uniform_(0.5, 2.0)
    t = t.to(param_dtype if family.startswith("BatchNorm") else dtype)
    return t, fastnorm.convert(copy.deepcopy(t)), shape


def _step(m, x, dy, fast, train, grad=True):
    """One call (twice in training: the statistics move) with the fast path on or off: outputs,
    gradients of x and the parameters, then the buffers."""
    was = FN.set_cpu_fast_path(fast)
    try:
        m = copy.deepcopy(m).train(train)
        outs = []
        for _ in range(2 if train else 1):
            xi = x.detach().clone().requires_grad_(grad)
            y = m(xi)
            outs.append(y.detach())
            if grad:
                outs += list(torch.autograd.grad(y, [xi, *m.parameters()], dy.to(y.dtype)))
        return outs, [b.clone() for b in m.buffers()], y.grad_fn
    finally:
        FN.set_cpu_fast_path(was)


FAMILIES = ["LayerNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm2d-cumulative",
            "BatchNorm3d", "InstanceNorm2d", "InstanceNorm2d-tracked"]
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32)]


def _own_backward(family, train):
    """Where the op path writes its own backward rather than calling ATen's."""
    return (family.startswith("BatchNorm") and not train) or family == "InstanceNorm2d-tracked"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,param_dtype", DTYPES,
                         ids=[f"{str(d)[6:]}-{str(p)[6:]}" for d, p in DTYPES])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_op_path(family, dtype, param_dtype, train):
    t, f, shape = _modules(family, dtype, param_dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    fast, fast_buf, fast_fn = _step(f, x, dy, True, train)
    op, op_buf, op_fn = _step(f, x, dy, False, train)
    ref, ref_buf, _ = _step(t, x, dy, True, train)
    # the paths really differ: ATen's autograd node against fastnorm's Function
    assert "Function" not in type(fast_fn).__name__, type(fast_fn).__name__
    assert "Function" in type(op_fn).__name__, type(op_fn).__name__
    for a, b in zip(fast_buf, op_buf):  # running statistics and the counter: bitwise
        assert torch.equal(a, b), (a, b)
    per_step = len(fast) // (2 if train else 1)
    for i, (a, b) in enumerate(zip(fast, op)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        if i % per_step == 0 or not _own_backward(family, train):
            assert torch.equal(a, b), f"output {i}: max diff {(a.double() - b.double()).abs().max()}"
        else:
            assert_close_scaled(a, b, dtype, msg=f"gradient {i}")
    if _own_backward(family, train):
        # there the fast path's gradients are torch.nn's own
        for i, (a, b) in enumerate(zip(fast, ref)):
            if i % per_step:
                assert torch.equal(a, b), f"gradient {i} differs from torch.nn's"
        for a, b in zip(fast_buf, ref_buf):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["LayerNorm", "GroupNorm", "BatchNorm2d", "InstanceNorm2d",
                                    "InstanceNorm2d-tracked"])
def test_fast_path_channels_last_and_no_grad(family):
    """channels_last keeps its layout on both paths with the same values; inference (no_grad)
    gives the same output as the op path."""
    t, f, shape = _modules(family, torch.float32, torch.float32)
    if len(shape) != 4:
        pytest.skip("a 4-d family only")
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    for train in (True, False):
        for grad in (True, False):
            fast, fast_buf, _ = _step(f, x, dy, True, train, grad)
            op, op_buf, _ = _step(f, x, dy, False, train, grad)
            # LayerNorm's output is contiguous (as torch's), the others keep channels_last
            assert fast[0].is_contiguous(memory_format=torch.channels_last) == (family != "LayerNorm")
            assert torch.equal(fast[0], op[0]) and fast[0].stride() == op[0].stride()
            for a, b in zip(fast_buf, op_buf):
                assert torch.equal(a, b)


def _grad_fn_name(fn, *args):
    y = fn(*args)
    return type(y.grad_fn).__name__


def _functional_calls():
    w, b = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    return {
        "layer_norm": lambda x: FN.layer_norm(x, x.shape[-1:], w[: x.shape[-1]], b[: x.shape[-1]]),
        "group_norm": lambda x: FN.group_norm(x, 2, w, b),
        "batch_norm": lambda x: FN.batch_norm(x, None, None, w, b, training=True),
        "instance_norm": lambda x: FN.instance_norm(x, None, None, w, b),
    }


@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "batch_norm", "instance_norm"])
def test_fast_path_taken_only_eagerly_on_cpu(name, fast_path):
    fn = _functional_calls()[name]
    x = torch.randn(2, 4, 3, 4, requires_grad=True)
    assert "Function" not in _grad_fn_name(fn, x)  # eager CPU: ATen's autograd node
    was = FN.set_cpu_fast_path(False)
    try:
        assert "Function" in _grad_fn_name(fn, x)
    finally:
        FN.set_cpu_fast_path(was)

    class Record(TorchDispatchMode):  # any dispatch mode: the op path, seen by the mode
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn(x)
    assert any(o.startswith("fastnorm.") for o in rec.ops), rec.ops

    # torch.func: the op path (fastnorm's batching rules), checked by the gate directly
    seen = []

    def probe(xi):
        seen.append(FN.cpu_fast_path(xi))
        return fn(xi)

    torch.func.vmap(probe)(torch.randn(3, 2, 4, 3, 4))
    torch.func.grad(lambda xi: probe(xi).sum())(x.detach())
    assert seen == [False, False]
    assert not FN.cpu_fast_path(torch.empty(0, 4))  # no elements: fastnorm's own handling
    assert not FN.cpu_fast_path(torch.empty(2, 4, device="meta"))
    if torch.cuda.is_available():
        assert not FN.cpu_fast_path(torch.empty(2, 4, device="cuda"))


def test_fast_path_not_taken_under_compile(fast_path):
    """torch.compile traces the op path: the fastnorm:: ops are in the graph."""
    graphs = []

    def backend(gm, example_inputs):
        # the autograd.Function's forward is a subgraph of the traced graph
        graphs.append("\n".join(str(sub.graph) for sub in gm.modules() if hasattr(sub, "graph")))
        return gm

    m = fastnorm.LayerNorm(8)
    x = torch.randn(3, 8)
    y = torch.compile(m, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1 and "fastnorm.layer_norm_fwd" in graphs[0], graphs
    assert "aten" not in graphs[0] and "torch.layer_norm" not in graphs[0], graphs[0]
    assert torch.equal(y, m(x))  # and the same result as the eager fast path


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fast_path_error_leaves_buffers_untouched(momentum, fast_path):
    """A call ATen refuses raises fastnorm's exception, and writes nothing."""
    m = fastnorm.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="expected running_mean with 4 elements"):
        FN._batch_norm(torch.randn(3, 4, 5, 5), m.running_mean[:3], m.running_var[:3], m.weight,
                       m.bias, True, momentum, m.eps, m.num_batches_tracked)
    with pytest.raises(RuntimeError, match="expected weight with 5 elements"):
        m(torch.randn(3, 5, 5, 5))
    with pytest.raises(NotImplementedError, match="floating-point"):
        m(torch.ones(3, 4, 5, 5, dtype=torch.long))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m(torch.randn(3, 4, 5, 5))  # and then it counts from where it was
    assert int(m.num_batches_tracked) == 1


def test_fast_path_functional_errors_match_checked_path():
    """The same exception type and message with the fast path on and off."""
    x = torch.randn(2, 4, 3)
    calls = [
        lambda: FN.layer_norm(x, [4]),                                # wrong normalized_shape
        lambda: FN.layer_norm(x, 3, torch.ones(4)),                   # wrong weight
        lambda: FN.group_norm(x, 3),                                  # 4 channels, 3 groups
        lambda: FN.group_norm(torch.randn(1, 2, 1), 2),               # one value per group
        lambda: FN.group_norm(x, 2, torch.ones(3)),
        lambda: FN.batch_norm(x, torch.zeros(3), torch.ones(3), training=True),
        lambda: FN.batch_norm(x, None, None, training=False),
        lambda: FN.batch_norm(torch.randn(1, 4), None, None, training=True),
        lambda: FN.instance_norm(x, torch.zeros(3), torch.ones(3)),
        lambda: FN.instance_norm(x.long()),
    ]
    for i, call in enumerate(calls):
        errors = []
        for fast in (True, False):
            was = FN.set_cpu_fast_path(fast)
            try:
                with pytest.raises(Exception) as info:
                    call()
                errors.append((type(info.value), str(info.value)))
            finally:
                FN.set_cpu_fast_path(was)
        assert errors[0] == errors[1], f"call {i}: {errors}"


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d-tracked"])
def test_fast_path_checkpoint_updates_once(name, use_reentrant, fast_path):
    """Under checkpoint the statistics move once per forward, as without checkpoint, and the
    recomputation saves what the first forward saved (non-reentrant checkpoint checks it)."""
    _, f, shape = _modules(name, torch.float32, torch.float32)
    plain = copy.deepcopy(f)
    x = torch.randn(shape, requires_grad=True)
    for _ in range(2):
        y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=use_reentrant)
        (y * y).sum().backward()
        plain(x)
    for (k, a), b in zip(f.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d",
                                  "InstanceNorm1d"])
def test_op_path_on_cpu_matches_torch(name, op_path):
    """With the fast path off, the CPU runs the fastnorm:: ops: still torch.nn's semantics."""
    kw = {"num_groups": 2} if name == "GroupNorm" else {}
    if name.startswith("InstanceNorm"):
        kw.update(affine=True, track_running_stats=True)
    shape = {"BatchNorm2d": (3, 4, 5, 3), "LayerNorm": (3, 5, 4), "GroupNorm": (3, 4, 5, 3),
             "InstanceNorm2d": (3, 4, 5, 3), "InstanceNorm1d": (3, 4, 7)}[name]
    t, f = make_pair(name, shape[-1] if name == "LayerNorm" else 4, CPU, **kw)
    outs = run_protocol(t, f, shape, CPU)
    assert outs
    x = torch.randn(shape, requires_grad=True)
    assert "Function" in type(f.train()(x).grad_fn).__name__
