"""convert() of timm's norm + activation layers: BatchNormAct2d, SyncBatchNormAct,
FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act, LayerNormAct, LayerNormAct2d, the Fp32
variants and RmsNormAct. For each class and each activation: outputs, input and parameter
gradients and running buffers equal to timm's original over two training steps and in eval
(float64 tight, float32 / bfloat16 with tolerances), NCHW and channels_last, both CPU paths;
the fused / unfused decision (drop layers, unknown activations, hooks); state kept, revert();
torch.compile(fullgraph=True); pickling; whole timm models with the count of swapped layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnorm
import fastnorm.functional as FN
from fastnorm import third_party
from conftest import assert_close_scaled, assert_grads_close
from test_convert_third_party import _check_converted_model, _randomize, _run_python

NA = pytest.importorskip("timm.layers.norm_act")
TA = pytest.importorskip("timm.layers.activations")
timm = pytest.importorskip("timm")

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
C = 6

# (id, act_layer, act_kwargs, fused): timm's names (its factory picks torch's modules), timm's
# own classes, and activations fastnorm does not fuse (they run as modules after the norm)
ACTS = [
    ("none", None, None, True), ("relu", "relu", None, True), ("relu6", "relu6", None, True),
    ("leaky_relu", "leaky_relu", {"negative_slope": 0.2}, True), ("silu", "silu", None, True),
    ("gelu", "gelu", None, True), ("gelu_tanh", "gelu_tanh", None, True),
    ("hard_swish", "hard_swish", None, True), ("hard_sigmoid", "hard_sigmoid", None, True),
    ("mish", "mish", None, True), ("sigmoid", "sigmoid", None, True), ("tanh", "tanh", None, True),
    ("timm.Swish", TA.Swish, None, True), ("timm.Mish", TA.Mish, None, True),
    ("timm.HardSwish", TA.HardSwish, None, True), ("timm.GELU", TA.GELU, None, True),
    ("elu", "elu", None, False), ("prelu", "prelu", None, False),
    ("timm.HardMish", TA.HardMish, None, False),
]

LOW_PRECISION_ACTS = {"none", "leaky_relu", "silu", "gelu_tanh", "hard_swish", "mish", "sigmoid",
                      "elu"}

# class name -> (constructor, input shape, has channel dim 1 (channels_last applies))
CLASSES = {
    "BatchNormAct2d": (lambda **kw: NA.BatchNormAct2d(C, **kw), (4, C, 3, 5), True),
    "GroupNormAct": (lambda **kw: NA.GroupNormAct(C, num_groups=3, **kw), (2, C, 3, 5), True),
    "GroupNorm1Act": (lambda **kw: NA.GroupNorm1Act(C, **kw), (2, C, 4, 3), True),
    "LayerNormAct": (lambda **kw: NA.LayerNormAct(C, **kw), (2, 3, 5, C), False),
    "LayerNormAct2d": (lambda **kw: NA.LayerNormAct2d(C, **kw), (2, C, 3, 5), True),
    "FrozenBatchNormAct2d": (lambda **kw: NA.FrozenBatchNormAct2d(C, **kw), (2, C, 3, 5), True),
    "LayerNormActFp32": (lambda **kw: NA.LayerNormActFp32(C, **kw), (2, 3, 5, C), False),
    "LayerNormAct2dFp32": (lambda **kw: NA.LayerNormAct2dFp32(C, **kw), (2, C, 3, 5), True),
    "RmsNormAct": (lambda **kw: NA.RmsNormAct(C, **kw), (2, 3, 5, C), False),
}
NO_FUSION = {"RmsNormAct"}  # no fused epilogue for RMSNorm: act always runs after the norm


def _act_kwargs(act_layer, act_kwargs):
    if act_layer is None:
        return {"apply_act": False}
    kw = {"act_layer": act_layer}
    if act_kwargs:
        kw["act_kwargs"] = act_kwargs
    return kw


def _pair(cls_name, act_layer, act_kwargs, dtype, **kw):
    ctor = CLASSES[cls_name][0]
    m = _randomize(ctor(**_act_kwargs(act_layer, act_kwargs), **kw), seed=3).to(dtype)
    conv = fastnorm.convert(copy.deepcopy(m))
    base = getattr(NA, cls_name)
    assert type(m) is base and type(conv) is not base and isinstance(conv, base)
    assert type(conv).__bases__ == (base,) and type(conv).__qualname__ == "Timm" + cls_name
    return m, conv


@pytest.fixture(params=["aten", "op"])
def cpu_path(request):
    was = FN.set_cpu_fast_path(request.param == "aten")
    yield request.param
    FN.set_cpu_fast_path(was)


def _step(m, conv, x, dtype, factor, msg, tol_dtype=None):
    """One forward/backward of both; outputs, gradients and buffers compared (at tol_dtype's
    tolerance: the dtype the layers compute in, x's by default)."""
    tol = tol_dtype or dtype
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=F64).to(dtype)
    outs = []
    for mod in (m, conv):
        mod.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        y = mod(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in mod.named_parameters()}))
    (yt, dxt, gt), (y, dx, gr) = outs
    assert y.dtype == yt.dtype and y.shape == yt.shape, msg
    assert_close_scaled(y, yt, tol, factor=factor, msg=msg + " output")
    assert_close_scaled(dx, dxt, tol, factor=4 * factor, msg=msg + " input grad")
    assert gr.keys() == gt.keys()
    for k in gt:
        assert_close_scaled(gr[k], gt[k], tol, factor=4 * factor, msg=f"{msg} {k}.grad")
    bt, b = dict(m.named_buffers()), dict(conv.named_buffers())
    assert bt.keys() == b.keys()
    for k in bt:
        if bt[k].is_floating_point():
            assert_close_scaled(b[k], bt[k], tol, factor=factor, msg=f"{msg} buffer {k}")
        else:
            assert torch.equal(b[k], bt[k]), f"{msg} buffer {k}"
    return y


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_class_each_activation(cls_name, dtype, cpu_path):
    """Two training steps, then eval: timm's module and its converted copy agree, for every
    activation, NCHW and channels_last."""
    _, shape, channels = CLASSES[cls_name]
    factor = {F64: 10, F32: 10, BF16: 2}[dtype]
    # timm's *Fp32 classes normalise in float32 whatever the input: float32's tolerance
    tol_dtype = F32 if "Fp32" in cls_name and dtype == F64 else None
    # every activation in float64; a spread of them in the lower precisions (CI time)
    acts = ACTS if dtype == F64 else [a for a in ACTS if a[0] in LOW_PRECISION_ACTS]
    for act_id, act_layer, act_kwargs, fused in acts:
        layouts = (False, True) if channels else (False,)
        for channels_last in layouts:
            m, conv = _pair(cls_name, act_layer, act_kwargs, dtype)
            if cls_name not in NO_FUSION:
                assert (third_party._fused_act(conv) is not None) == fused, act_id
            msg = f"{cls_name} {act_id} {dtype} cl={channels_last} {cpu_path}"
            for step in range(3):
                if step == 2:
                    m.eval()
                    conv.eval()
                x = torch.randn(shape, generator=torch.Generator().manual_seed(step),
                                dtype=F64) * 2 + 0.5
                x = x.to(dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                elif not channels:
                    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided rows
                y = _step(m, conv, x, dtype, factor, f"{msg} step {step}", tol_dtype)
                if channels_last and cls_name != "LayerNormAct2d" and "Fp32" not in cls_name:
                    assert y.is_contiguous(memory_format=torch.channels_last), msg


@pytest.mark.parametrize("options", [
    {"momentum": None}, {"track_running_stats": False}, {"affine": False},
    {"momentum": None, "affine": False}, {"eps": 1e-3, "momentum": 0.3}], ids=str)
def test_batch_norm_act_options(options, cpu_path):
    for act_layer in ("silu", "elu"):
        m, conv = _pair("BatchNormAct2d", act_layer, None, F64, **options)
        for step in range(4):
            x = torch.randn(3, C, 4, 3, dtype=F64) + step
            if step == 3:
                m.eval()
                conv.eval()
            _step(m, conv, x, F64, 10, f"{options} {act_layer} step {step}")
    # eval without running statistics: batch statistics, as timm's (torch's) forward
    m, conv = _pair("BatchNormAct2d", "relu", None, F64, track_running_stats=False)
    m.eval()
    conv.eval()
    _step(m, conv, torch.randn(3, C, 4, 3, dtype=F64), F64, 10, "eval without statistics")


@pytest.mark.parametrize("cls_name", ["BatchNormAct2d", "GroupNormAct", "LayerNormAct2d",
                                      "LayerNormAct"])
def test_drop_layer_runs_unfused_with_torch_rng(cls_name, cpu_path):
    """A drop layer: norm -> drop -> act as timm runs them; dropout draws the same numbers."""
    _, shape, _ = CLASSES[cls_name]
    m, conv = _pair(cls_name, "silu", None, F64, drop_layer=lambda: nn.Dropout(0.3))
    assert third_party._fused_act(conv) is None
    x = torch.randn(shape, dtype=F64)
    g = torch.randn(shape, dtype=F64)
    res = []
    for mod in (m, conv):
        torch.manual_seed(5)
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(g)
        res.append((y, xi.grad, torch.rand(1)))  # the RNG state after the call, too
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-10, atol=1e-10)
    assert torch.equal(res[1][2], res[0][2])
    assert (res[0][0] == 0).any()  # dropout did drop


def test_activation_hooks_and_replaced_activation():
    m, conv = _pair("BatchNormAct2d", "relu", None, F64)
    x = torch.randn(3, C, 4, 3, dtype=F64)
    calls = []
    h = conv.act.register_forward_hook(lambda mod, i, o: calls.append(type(mod)))
    assert third_party._fused_act(conv) is None  # a hook: the module runs (and the hook)
    y = conv(x)
    assert calls == [nn.ReLU]
    torch.testing.assert_close(y, m(x))
    h.remove()
    assert third_party._fused_act(conv) == (1, 0.0)
    # an activation swapped after convert() is looked up at the call
    conv.act = nn.GELU(approximate="tanh")
    m.act = nn.GELU(approximate="tanh")
    assert third_party._fused_act(conv) == (6, 0.0)
    torch.testing.assert_close(conv(x), m(x), rtol=1e-12, atol=1e-12)
    conv.act = nn.ELU()
    m.act = nn.ELU()
    assert third_party._fused_act(conv) is None
    torch.testing.assert_close(conv(x), m(x), rtol=1e-12, atol=1e-12)
    # hooks on the norm module itself still run once
    calls.clear()
    conv.register_forward_hook(lambda mod, i, o: calls.append("norm"))
    conv(x)
    assert calls == ["norm"]


def test_state_classes_and_revert():
    model = nn.Sequential(NA.BatchNormAct2d(C, act_layer="silu"), NA.GroupNormAct(C, 2),
                          NA.LayerNormAct2d(C, act_layer="gelu"), NA.FrozenBatchNormAct2d(C),
                          NA.GroupNorm1Act(C, act_layer="mish"))
    _randomize(model)
    twin = copy.deepcopy(model)
    params = {n: id(p) for n, p in model.named_parameters()}
    buffers = {n: id(b) for n, b in model.named_buffers()}
    types = [type(m) for m in model]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fastnorm.convert(model)
    assert [n for n, _ in fastnorm.converted_modules(model)] == ["0", "1", "2", "3", "4"]
    for mod, t in zip(model, types):
        assert isinstance(mod, t) and type(mod).__bases__ == (t,)
        assert set(vars(type(mod))) <= {"forward", "__doc__", "__module__", "__qualname__",
                                        "__firstlineno__", "__static_attributes__", "__dict__",
                                        "__weakref__"}, vars(type(mod)).keys()
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert {n: id(b) for n, b in model.named_buffers()} == buffers
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    assert model[0].act is not None and type(model[0].act) is nn.SiLU
    x = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(model.eval()(x), twin.eval()(x), rtol=1e-5, atol=1e-5)
    # the timm modules' own state_dict loading
    twin.load_state_dict(model.state_dict())
    fastnorm.revert(model)
    assert [type(m) for m in model] == types
    assert fastnorm.converted_modules(model) == []


def test_sync_batch_norm_act_single_process(cpu_path):
    """timm's SyncBatchNormAct (from timm's convert_sync_batchnorm): fastnorm.SyncBatchNorm's
    forward (no process group: the BatchNorm path), then drop and act."""
    bn = _randomize(NA.BatchNormAct2d(C, act_layer="hard_swish")).double()
    m = NA.convert_sync_batchnorm(copy.deepcopy(bn))
    assert type(m) is NA.SyncBatchNormAct
    conv = fastnorm.convert(copy.deepcopy(m))
    assert type(conv).__qualname__ == "TimmSyncBatchNormAct"
    for step in range(3):
        if step == 2:
            m.eval()
            conv.eval()
        _step(m, conv, torch.randn(3, C, 4, 3, dtype=F64), F64, 10, f"sync step {step}")


def test_fast_norm_mode_and_autocast():
    """timm's fast-norm mode (set at construction) runs the norm in the autocast dtype; the
    adapters do the same, the activation fused."""
    fast_norm = pytest.importorskip("timm.layers.fast_norm")
    was = fast_norm.is_fast_norm()
    fast_norm.set_fast_norm(True)
    try:
        mods = [NA.GroupNormAct(C, 3, act_layer="silu"), NA.LayerNormAct(C, act_layer="gelu"),
                NA.LayerNormAct2d(C, act_layer="relu")]
    finally:
        fast_norm.set_fast_norm(was)
    for m, shape in zip(mods, ((2, C, 3, 5), (2, 3, C), (2, C, 3, 5))):
        assert m._fast_norm
        _randomize(m)
        conv = fastnorm.convert(copy.deepcopy(m))
        for autocast in (False, True):
            x = torch.randn(shape)
            with torch.autocast("cpu", dtype=BF16, enabled=autocast):
                xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
                y, yt = conv(xi), m(xt)
            assert y.dtype == yt.dtype
            dt = BF16 if autocast else F32
            assert_close_scaled(y, yt, dt, factor=2)
            g = torch.randn(y.shape).to(y.dtype)
            y.backward(g)
            yt.backward(g)
            assert_close_scaled(xi.grad, xt.grad, dt, factor=4)


def test_shape_errors_are_timm_s():
    for cls_name, bad in (("BatchNormAct2d", torch.randn(2, C, 3)),
                          ("GroupNormAct", torch.randn(2, C + 1, 3)),
                          ("LayerNormAct", torch.randn(2, 3, C + 1)),
                          ("LayerNormAct2d", torch.randn(2, C, 3))):
        m, conv = _pair(cls_name, "relu", None, F32)
        with pytest.raises(Exception) as ref:
            m(bad)
        with pytest.raises(type(ref.value)):
            conv(bad)


class _ActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = NA.BatchNormAct2d(8, act_layer="silu")
        self.gn = NA.GroupNormAct(8, 4, act_layer="gelu")
        self.ln2d = NA.LayerNormAct2d(8, act_layer="hard_swish")
        self.frozen = NA.FrozenBatchNormAct2d(8, act_layer="relu6")
        self.ln = NA.LayerNormAct(8, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.1})
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.frozen(self.ln2d(self.gn(self.bn(self.conv(x)))))
        return self.head(self.ln(x.flatten(2).transpose(1, 2))).mean(1)


def test_compiled_fullgraph():
    torch._dynamo.reset()
    model = _randomize(_ActNet())
    twin = copy.deepcopy(model)
    fastnorm.convert(model)
    assert len(fastnorm.converted_modules(model)) == 5
    opt = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(3):
        if step == 2:
            model.eval()
            twin.eval()
        x = torch.randn(2, 3, 5, 6)
        xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, yt = opt(xi), twin(xt)
        assert_close_scaled(y, yt, F32, factor=4)
        g = torch.randn_like(y)
        y.backward(g)
        yt.backward(g)
        assert_close_scaled(xi.grad, xt.grad, F32, factor=10)
        # conv's bias feeds a BatchNorm: in the training steps its gradient is zero in exact
        # arithmetic (rounding noise), so the gradients are judged against the scale of all of them
        assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                           {n: p.grad for n, p in twin.named_parameters()}, F32, factor=10,
                           msg=f"step {step}")
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
            assert_close_scaled(b, c, F32, factor=4, msg=n)
    torch._dynamo.reset()


def test_pickled_in_a_fresh_process(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), NA.BatchNormAct2d(8, act_layer="silu"),
                          NA.GroupNormAct(8, 4, act_layer="gelu"),
                          NA.LayerNormAct2d(8, act_layer="hard_swish"),
                          NA.FrozenBatchNormAct2d(8, act_layer="relu6"),
                          NA.LayerNormAct(4, act_layer="leaky_relu"))  # over W
    model = fastnorm.convert(_randomize(model).eval())
    x = torch.randn(1, 3, 4, 4)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "x": x, "y": model(x)}, path)
    out = _run_python(f"""
        import torch, fastnorm
        d = torch.load({str(path)!r}, weights_only=False)
        m = d["model"]
        print(sorted(type(mod).__qualname__ for _, mod in fastnorm.converted_modules(m)))
        torch.testing.assert_close(m(d["x"]), d["y"])
    """)
    assert out.strip() == str(sorted(["TimmBatchNormAct2d", "TimmGroupNormAct",
                                      "TimmLayerNormAct2d", "TimmFrozenBatchNormAct2d",
                                      "TimmLayerNormAct"]))


def test_subclasses_left_alone():
    class MyBN(NA.BatchNormAct2d):
        pass

    model = nn.Sequential(MyBN(4), NA.BatchNormAct2d(4))
    fastnorm.convert(model)
    assert type(model[0]) is MyBN
    assert [n for n, _ in fastnorm.converted_modules(model)] == ["1"]


# ----------------------------------------------------------------------------------------------
# whole timm models: every timm norm class counted, so the count is everything convert() swaps
# ----------------------------------------------------------------------------------------------
def _timm_norm_classes():
    norm = pytest.importorskip("timm.layers.norm")
    classes = {norm.LayerNorm, norm.LayerNorm2d, norm.GroupNorm, norm.GroupNorm1, norm.RmsNorm}
    classes |= {getattr(NA, n) for n in CLASSES} | {NA.SyncBatchNormAct}
    return classes


def _norm_counts(model):
    counts = {}
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or type(
                m) in _timm_norm_classes():
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


@pytest.mark.parametrize("name,kwargs,expected", [
    # (model, create_model kwargs, {norm class: count}); all are swapped
    ("efficientnet_b0", {}, {"BatchNormAct2d": 49}),
    ("mobilenetv3_small_050", {}, {"BatchNormAct2d": 34}),
    ("regnetx_002", {}, {"BatchNormAct2d": 44}),
    ("resnet18", {"norm_layer": "groupnormact"}, None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_timm_models(name, kwargs, expected):
    torch.manual_seed(0)
    if name == "resnet18":
        kwargs = {"norm_layer": lambda c, **kw: NA.GroupNormAct(c, 2, apply_act=False)}
    model = _randomize(timm.create_model(name, pretrained=False, **kwargs))
    counts = _norm_counts(model)
    if expected is not None:
        assert counts == expected, counts
    total = sum(counts.values())
    if name == "resnet18":
        assert counts == {"GroupNormAct": total} and total == 20
    originals = {getattr(NA, n) for n in counts if hasattr(NA, n)}
    _check_converted_model(model, torch.randn(2, 3, 32, 32), originals, total, factor=20)
