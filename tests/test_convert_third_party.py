"""convert() of timm's LayerNorm / LayerNorm2d / GroupNorm / GroupNorm1 / RmsNorm, torchvision's
FrozenBatchNorm2d and torch.nn.RMSNorm: the same outputs and gradients before and after, the original class still true for isinstance,
parameters, buffers and hooks kept, revert(), converted_modules(), real timm and torchvision models.
fastnorm itself needs neither package (checked in a subprocess that hides them)."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastnorm
from conftest import TOL, assert_close_scaled, assert_grads_close

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def _timm_norms():
    norm = pytest.importorskip("timm.layers.norm")
    return norm.LayerNorm2d, norm.RmsNorm


def _tv_frozen():
    return pytest.importorskip("torchvision.ops").FrozenBatchNorm2d


def _randomize(model, seed=0):
    """Non-trivial affine parameters and frozen statistics in every norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if not t.is_floating_point():
                continue
            if leaf in ("running_var",):
                t.copy_(torch.rand(t.shape, generator=g) + 0.2)
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif leaf == "weight" and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif leaf == "bias":
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _fwd_bwd(model, x, g=None):
    """Output, input gradient and parameter gradients (by name)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y) if g is None else g
    y.backward(g)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _check_converted_model(model, x, originals, expected_count, factor=10.0):
    """convert() on `model` (an unconverted twin kept): every module of a class in `originals`
    swapped, nothing else; outputs and gradients equal; objects, classes, hooks kept; revert()."""
    twin = copy.deepcopy(model)
    targets = [(n, m) for n, m in model.named_modules() if type(m) in originals]
    assert len(targets) == expected_count, [n for n, _ in targets]
    types_before = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    calls = []
    first_name, first = targets[0]
    hook = first.register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    pre = targets[-1][1].register_forward_pre_hook(lambda mod, inp: calls.append("pre"))

    assert fastnorm.convert(model) is model
    converted = fastnorm.converted_modules(model)
    assert [n for n, _ in converted] == [n for n, _ in targets]
    for (n, m), (_, old) in zip(converted, targets):
        assert m is old
        assert type(m) is not types_before[n] and isinstance(m, types_before[n]), n
        assert type(m).__bases__ == (types_before[n],) or type(m) in fastnorm.modules.FASTNORM_TO_TORCH
        assert vars(type(m)).keys() <= {"forward", "__doc__", "__module__", "__qualname__",
                                        "__firstlineno__", "__static_attributes__", "__dict__",
                                        "__weakref__", "__orig_bases__", "__parameters__",
                                        "cls_to_become", "__annotations__"}, vars(type(m)).keys()
    for n, m in model.named_modules():
        if n not in dict(targets):
            assert type(m) is types_before[n], n
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers.items()}
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert list(model.state_dict()) == list(twin.state_dict())

    y, dx, grads = _fwd_bwd(model, x)
    yt, dxt, grads_t = _fwd_bwd(twin, x)
    assert y.dtype == yt.dtype and y.shape == yt.shape
    assert_close_scaled(y, yt, F32, factor=factor, msg="output")
    assert_close_scaled(dx, dxt, F32, factor=factor, msg="input grad")
    # at the scale of all the parameters' gradients: a bias before a norm that removes it, an
    # attention key's bias, have gradients zero in exact arithmetic (rounding noise here)
    assert_grads_close(grads, grads_t, F32, factor=factor)
    assert calls.count("pre") == 1 and calls.count(type(first)) == 1, calls
    hook.remove()
    pre.remove()

    assert fastnorm.revert(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert fastnorm.converted_modules(model) == []
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    y2, _, _ = _fwd_bwd(model, x)
    torch.testing.assert_close(y2, yt)  # the original forward again, bitwise

    # converted again, an optimizer step trains it as the original trains its twin
    fastnorm.convert(model)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (model, twin)]
    for m, opt in zip((model, twin), opts):
        _fwd_bwd(m, x)
        opt.step()
    y3, _, _ = _fwd_bwd(model, x)
    y3t, _, _ = _fwd_bwd(twin, x)
    assert torch.isfinite(y3t).all() and not torch.equal(y3t, yt)  # a real step was taken
    assert_close_scaled(y3, y3t, F32, factor=factor, msg="output after an optimizer step")
    fastnorm.revert(model)
    return model


# ----------------------------------------------------------------------------------------------
# without timm / torchvision
# ----------------------------------------------------------------------------------------------
def test_fastnorm_works_without_timm_and_torchvision():
    out = _run_python("""
        import sys
        sys.modules["timm"] = None          # import timm -> ImportError
        sys.modules["torchvision"] = None
        import torch, fastnorm
        m = torch.nn.Sequential(torch.nn.BatchNorm2d(3), fastnorm.FrozenBatchNorm2d(3),
                                torch.nn.LayerNorm(4))
        fastnorm.convert(m)
        assert type(m[0]) is fastnorm.BatchNorm2d and type(m[2]) is fastnorm.LayerNorm
        assert [n for n, _ in fastnorm.converted_modules(m)] == ["0", "2"]
        y = m(torch.randn(2, 3, 4, 4))
        assert y.shape == (2, 3, 4, 4)
        assert fastnorm.third_party.adapters() == {}
        fastnorm.revert(m)
        assert type(m[0]) is torch.nn.BatchNorm2d
        try:
            fastnorm.third_party.TimmLayerNorm2d
        except ImportError:
            pass
        else:
            raise AssertionError("an adapter without its package")
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_import_and_convert_do_not_import_timm_or_torchvision():
    out = _run_python("""
        import sys, torch, fastnorm
        fastnorm.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
        print(sorted(k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")))
    """)
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# timm LayerNorm2d
# ----------------------------------------------------------------------------------------------
def _ln2d_pair(c, dtype=F32, affine=True, **kw):
    LayerNorm2d, _ = _timm_norms()
    m = LayerNorm2d(c, affine=affine, **kw)
    _randomize(m, seed=c)
    m = m.to(dtype)
    conv = fastnorm.convert(copy.deepcopy(m))
    assert type(conv) is not LayerNorm2d and isinstance(conv, LayerNorm2d)
    return m, conv


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 13, 1, 9), (2, 64, 4, 4),
                                   (0, 5, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_timm_layer_norm2d(shape, dtype, channels_last):
    m, conv = _ln2d_pair(shape[1], dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y, dx, grads = _fwd_bwd(conv, x, g)
    yt, dxt, grads_t = _fwd_bwd(m, x, g)
    assert y.dtype == yt.dtype == dtype and y.shape == yt.shape
    # fastnorm keeps the input's memory format (timm's output is channels_last-strided always)
    if x.numel():
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt)
    assert_close_scaled(y, yt, dtype, factor=2, msg="output")
    assert_close_scaled(dx, dxt, dtype, factor=4, msg="input grad")
    for k in grads_t:
        assert_close_scaled(grads[k], grads_t[k], dtype, factor=4, msg=k)


def test_timm_layer_norm2d_options_and_fallback():
    for kw in (dict(affine=False), dict(bias=False), dict(eps=1e-3)):
        m, conv = _ln2d_pair(6, **kw)
        x = torch.randn(2, 6, 3, 3)
        assert_close_scaled(conv(x), m(x), F32, msg=str(kw))
    m, conv = _ln2d_pair(4)
    # timm's permute(0, 2, 3, 1) wants 4 dims: the same error after convert
    for shape in ((4, 3, 3), (2, 4, 3, 3, 3)):
        with pytest.raises(RuntimeError) as e_timm:
            m(torch.randn(shape))
        with pytest.raises(RuntimeError) as e_conv:
            conv(torch.randn(shape))
        assert str(e_conv.value) == str(e_timm.value)


@pytest.mark.parametrize("fast_norm", [False, True])
@pytest.mark.parametrize("xd", [F32, BF16], ids=str)
def test_timm_layer_norm2d_autocast(fast_norm, xd):
    """Under autocast timm's fast-norm mode casts to the autocast dtype and runs with autocast
    off (the output stays bfloat16); without it, torch's layer_norm autocast rule applies."""
    m, conv = _ln2d_pair(8)
    m._fast_norm = conv._fast_norm = fast_norm
    x = torch.randn(2, 8, 3, 5, dtype=xd)
    with torch.autocast("cpu", dtype=BF16):
        yt = m(x)
        y = conv(x)
    assert y.dtype == yt.dtype
    assert_close_scaled(y, yt, BF16 if BF16 in (y.dtype, xd) or fast_norm else F32, factor=2)
    if fast_norm:
        assert y.dtype == BF16


def test_timm_fast_norm_with_apex_stays_timm(monkeypatch):
    """timm's fast-norm mode with apex installed runs apex's kernels: the adapters leave it so."""
    fast_norm = pytest.importorskip("timm.layers.fast_norm")
    calls = []

    def fake_ln(x, weight, bias, shape, eps):
        calls.append("apex layer_norm")
        return nn.functional.layer_norm(x, shape, weight, bias, eps)

    def fake_rms(x, weight, shape, eps):
        calls.append("apex rms_norm")
        return nn.functional.rms_norm(x, shape, weight, eps)

    monkeypatch.setattr(fast_norm, "has_apex", True)
    monkeypatch.setattr(fast_norm, "has_apex_rmsnorm", True)
    monkeypatch.setattr(fast_norm, "fused_layer_norm_affine", fake_ln, raising=False)
    monkeypatch.setattr(fast_norm, "fused_rms_norm_affine", fake_rms, raising=False)
    _, ln = _ln2d_pair(4)
    _, rms = _rms_pair(4)
    ln._fast_norm = rms._fast_norm = True
    ln(torch.randn(2, 4, 3, 3))
    rms(torch.randn(2, 4))
    assert calls == ["apex layer_norm", "apex rms_norm"]
    ln._fast_norm = rms._fast_norm = False  # the usual mode: fastnorm's
    ln(torch.randn(2, 4, 3, 3))
    rms(torch.randn(2, 4))
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# timm RmsNorm
# ----------------------------------------------------------------------------------------------
def _rms_pair(channels, dtype=F32, **kw):
    _, RmsNorm = _timm_norms()
    m = RmsNorm(channels, **kw)
    _randomize(m, seed=3)
    if m.weight is not None:
        with torch.no_grad():
            m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
    m = m.to(dtype)
    conv = fastnorm.convert(copy.deepcopy(m))
    if type(conv) is RmsNorm:
        pytest.skip("this timm's RmsNorm does not run torch's rms_norm: not converted")
    assert isinstance(conv, RmsNorm)
    return m, conv


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("shape,channels", [((4, 7), 7), ((2, 3, 16), 16), ((1, 1), 1),
                                            ((0, 5), 5), ((2, 3, 4), (3, 4)), ((5, 2, 97), 97)],
                         ids=str)
def test_timm_rms_norm(shape, channels, dtype):
    m, conv = _rms_pair(channels, dtype)
    x = torch.randn(shape, dtype=dtype) * 3
    g = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, dx, grads = _fwd_bwd(conv, x, g)
    yt, dxt, grads_t = _fwd_bwd(m, x, g)
    assert y.dtype == yt.dtype and y.shape == yt.shape
    assert_close_scaled(y, yt, dtype, factor=2, msg="output")
    assert_close_scaled(dx, dxt, dtype, factor=4, msg="input grad")
    assert grads.keys() == grads_t.keys() == {"weight"}
    assert_close_scaled(grads["weight"], grads_t["weight"], dtype, factor=4, msg="weight grad")


def test_timm_rms_norm_options():
    m, conv = _rms_pair(6, affine=False)
    assert conv.weight is None
    x = torch.randn(3, 6)
    assert_close_scaled(conv(x), m(x), F32)
    m, conv = _rms_pair(6, eps=1e-2)
    assert conv.eps == 1e-2
    assert_close_scaled(conv(x * 0.01), m(x * 0.01), F32)


@pytest.mark.parametrize("fast_norm", [False, True])
@pytest.mark.parametrize("xd", [F32, BF16], ids=str)
def test_timm_rms_norm_autocast(fast_norm, xd):
    m, conv = _rms_pair(8)
    m._fast_norm = conv._fast_norm = fast_norm
    x = torch.randn(4, 8, dtype=xd)
    with torch.autocast("cpu", dtype=BF16):
        yt = m(x)
        y = conv(x)
    assert y.dtype == yt.dtype
    assert_close_scaled(y, yt, BF16 if BF16 in (y.dtype, xd) or fast_norm else F32, factor=2)


# ----------------------------------------------------------------------------------------------
# torchvision FrozenBatchNorm2d
# ----------------------------------------------------------------------------------------------
def _frozen_pair(c, dtype=F32):
    TVF = _tv_frozen()
    m = _randomize(TVF(c)).to(dtype)
    conv = fastnorm.convert(copy.deepcopy(m))
    assert type(conv) is not TVF and isinstance(conv, TVF)
    return m, conv


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("xd,bd", [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (F16, F32),
                                   (BF16, F32), (F32, F16)], ids=str)
def test_torchvision_frozen_batch_norm(xd, bd, channels_last):
    m, conv = _frozen_pair(6, bd)
    x = torch.randn(3, 6, 5, 4).to(xd)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(
        torch.promote_types(xd, bd))
    y, dx, grads = _fwd_bwd(conv, x, g)
    yt, dxt, _ = _fwd_bwd(m, x, g)
    assert y.dtype == yt.dtype == torch.promote_types(xd, bd)
    assert dx.dtype == dxt.dtype == xd and grads == {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and yt.is_contiguous(memory_format=fmt)
    tol = max((xd, bd), key=lambda d: TOL[d][0])
    assert_close_scaled(y, yt, tol, factor=4)
    assert_close_scaled(dx, dxt, tol, factor=4)


def test_torchvision_frozen_batch_norm_keeps_torchvision_broadcasting():
    """Inputs outside (N, C, H, W) with C channels go to torchvision's forward: its result (a
    broadcast one) or its error, unchanged."""
    m, conv = _frozen_pair(4)
    for x in (torch.randn(2, 1, 3, 3), torch.randn(4, 3, 3), torch.randint(0, 5, (2, 4, 3, 3))):
        yt, y = m(x), conv(x)
        assert y.shape == yt.shape and y.dtype == yt.dtype
        torch.testing.assert_close(y, yt)
    with pytest.raises(RuntimeError) as e_tv:
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(RuntimeError) as e_conv:
        conv(torch.randn(2, 3, 5, 5))
    assert str(e_conv.value) == str(e_tv.value)


def test_torchvision_frozen_batch_norm_state_dict_and_modes():
    m, conv = _frozen_pair(5)
    sd = dict(m.state_dict())
    sd["num_batches_tracked"] = torch.tensor(3)  # torchvision's _load_from_state_dict drops it
    conv.load_state_dict(sd)
    x = torch.randn(2, 5, 3, 3)
    conv.train()
    y_train = conv(x)
    conv.eval()
    assert torch.equal(conv(x), y_train)
    assert_close_scaled(y_train, m(x), F32)


# ----------------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------------
class _MixedNet(nn.Module):
    """A detector-style backbone with frozen BN, a ConvNeXt-style LayerNorm2d, an RmsNorm head,
    and subclasses of each third-party class (left alone by convert)."""

    def __init__(self):
        super().__init__()
        LayerNorm2d, RmsNorm = _timm_norms()
        TVF = _tv_frozen()

        class MyFrozen(TVF):
            pass

        class MyLN2d(LayerNorm2d):
            def forward(self, x):
                return super().forward(x) * 2

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fbn = TVF(8)
        self.ln2d = LayerNorm2d(8)
        self.sub_fbn = MyFrozen(8)
        self.sub_ln = MyLN2d(8)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.rms = RmsNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.ln2d(self.fbn(self.conv(x)))
        x = self.bn(self.sub_ln(self.sub_fbn(x)))
        return self.head(self.rms(self.pool(x).flatten(1)))


def test_mixed_model():
    model = _randomize(_MixedNet())
    LayerNorm2d, RmsNorm = _timm_norms()
    TVF = _tv_frozen()
    originals = {LayerNorm2d, RmsNorm, TVF, nn.BatchNorm2d}
    model = _check_converted_model(model, torch.randn(2, 3, 6, 6), originals, 4)
    assert type(model.sub_fbn).__name__ == "MyFrozen" and type(model.sub_ln).__name__ == "MyLN2d"
    fastnorm.convert(model)
    assert {type(m).__qualname__ for _, m in fastnorm.converted_modules(model)} == {
        "TorchvisionFrozenBatchNorm2d", "TimmLayerNorm2d", "TimmRmsNorm", "BatchNorm2d"}
    assert type(model.sub_fbn).__name__ == "MyFrozen" and type(model.sub_ln).__name__ == "MyLN2d"
    fastnorm.convert(model)  # idempotent
    assert len(fastnorm.converted_modules(model)) == 4


def test_timm_convnext_atto():
    timm = pytest.importorskip("timm")
    LayerNorm2d, _ = _timm_norms()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("convnext_atto", pretrained=False))
    # stem, 3 downsamples, 12 blocks (conv_mlp: the block norm is LayerNorm2d too), the head
    _check_converted_model(model, torch.randn(1, 3, 32, 32), {LayerNorm2d}, 17)


def test_timm_vit_with_rms_norm():
    timm = pytest.importorskip("timm")
    _, RmsNorm = _timm_norms()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                         depth=2, norm_layer=RmsNorm))
    conv = fastnorm.convert(copy.deepcopy(RmsNorm(4)))
    if type(conv) is RmsNorm:
        pytest.skip("this timm's RmsNorm does not run torch's rms_norm: not converted")
    # norm1 and norm2 of each block, the final norm
    _check_converted_model(model, torch.randn(2, 3, 32, 32), {RmsNorm}, 5)


def test_torchvision_resnet18_frozen_batch_norm():
    models = pytest.importorskip("torchvision.models")
    TVF = _tv_frozen()
    torch.manual_seed(0)
    model = _randomize(models.resnet18(norm_layer=TVF))
    # bn1, two per BasicBlock (8 blocks), three downsample norms
    _check_converted_model(model, torch.randn(2, 3, 32, 32), {TVF}, 20)


def test_torch_rms_norm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.GELU(), nn.Linear(8, 8),
                          nn.RMSNorm([8], eps=1e-3, elementwise_affine=False), nn.Linear(8, 2),
                          nn.LayerNorm(2))
    _randomize(model)
    model = _check_converted_model(model, torch.randn(3, 5, 6), {nn.RMSNorm, nn.LayerNorm}, 3)
    fastnorm.convert(model)
    assert type(model[1]) is fastnorm.RMSNorm and type(model[4]) is fastnorm.RMSNorm


def test_compiled_converted_model_fullgraph():
    torch._dynamo.reset()
    model = fastnorm.convert(_randomize(_MixedNet()))
    x = torch.randn(2, 3, 6, 6)
    opt = torch.compile(model, backend="aot_eager", fullgraph=True)
    y, dx, grads = _fwd_bwd(opt, x)
    ye, dxe, grads_e = _fwd_bwd(model, x)
    assert_close_scaled(y, ye, F32)
    assert_close_scaled(dx, dxe, F32)
    grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
    # sub_ln's bias feeds a BatchNorm in training: its gradient is zero in exact arithmetic, and
    # compiled and eager round it differently: judged against the scale of all the gradients
    assert_grads_close(grads, grads_e, F32)
    torch._dynamo.reset()


def test_pickled_converted_model_loads_in_a_fresh_process(tmp_path):
    _timm_norms()
    _tv_frozen()
    LayerNorm2d, RmsNorm = _timm_norms()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _tv_frozen()(4), LayerNorm2d(4), nn.BatchNorm2d(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), RmsNorm(4))
    model = fastnorm.convert(_randomize(model).eval())
    x = torch.randn(1, 3, 4, 4)
    path = tmp_path / "model.pt"
    torch.save({"model": model, "x": x, "y": model(x)}, path)
    pickle.dumps(model)  # the adapters are found by name in this process too
    out = _run_python(f"""
        import torch, fastnorm
        d = torch.load({str(path)!r}, weights_only=False)
        m = d["model"]
        print(sorted(type(mod).__qualname__ for _, mod in fastnorm.converted_modules(m)))
        torch.testing.assert_close(m(d["x"]), d["y"])
    """)
    assert out.strip() == str(sorted(["TorchvisionFrozenBatchNorm2d", "TimmLayerNorm2d",
                                      "TimmRmsNorm", "BatchNorm2d"]))


# ----------------------------------------------------------------------------------------------
# timm LayerNorm, GroupNorm, GroupNorm1
# ----------------------------------------------------------------------------------------------
def _timm_ln_gn():
    norm = pytest.importorskip("timm.layers.norm")
    return norm.LayerNorm, norm.GroupNorm, norm.GroupNorm1


@pytest.fixture(params=["aten", "op"])
def cpu_path(request):
    """Both CPU paths of fastnorm.functional: ATen called directly, and fastnorm's op (the path
    a CUDA tensor takes, here on its CPU implementation)."""
    FN = fastnorm.functional
    was = FN.set_cpu_fast_path(request.param == "aten")
    yield request.param
    FN.set_cpu_fast_path(was)


def _timm_pair(kind, c, dtype=F32, **kw):
    """(timm's module, a converted deep copy) of kind "ln", "gn" or "gn1", random affine."""
    LayerNorm, GroupNorm, GroupNorm1 = _timm_ln_gn()
    cls = {"ln": LayerNorm, "gn": GroupNorm, "gn1": GroupNorm1}[kind]
    m = _randomize(cls(c, **kw), seed=7)
    m = m.to(dtype)
    conv = fastnorm.convert(copy.deepcopy(m))
    assert type(conv) is not cls and isinstance(conv, cls) and type(conv).__bases__ == (cls,)
    assert type(conv).__qualname__ == {"ln": "TimmLayerNorm", "gn": "TimmGroupNorm",
                                       "gn1": "TimmGroupNorm1"}[kind]
    return m, conv


def _compare(m, conv, x, dtype, out_factor=2, grad_factor=4):
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    y, dx, grads = _fwd_bwd(conv, x, g)
    yt, dxt, grads_t = _fwd_bwd(m, x, g)
    assert y.dtype == yt.dtype and y.shape == yt.shape
    assert_close_scaled(y, yt, dtype, factor=out_factor, msg="output")
    assert_close_scaled(dx, dxt, dtype, factor=grad_factor, msg="input grad")
    assert grads.keys() == grads_t.keys()
    for k in grads_t:
        assert_close_scaled(grads[k], grads_t[k], dtype, factor=grad_factor, msg=k)
    return y, yt


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("shape,channels", [((4, 7), 7), ((2, 3, 16), 16), ((1, 1), 1),
                                            ((0, 5), 5), ((2, 3, 4), (3, 4)), ((5, 2, 97), 97),
                                            ((2, 3, 5, 192), 192)], ids=str)
def test_timm_layer_norm(shape, channels, dtype, cpu_path):
    m, conv = _timm_pair("ln", channels, dtype)
    assert conv.eps == 1e-6  # timm's default, not torch's
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    _compare(m, conv, x, dtype)


def _layouts(cases, shape_of=lambda case: case):
    """(case, channels_last) for each case: contiguous, and channels_last too when 4-d."""
    return [(case, cl) for case in cases for cl in (False, True) if not cl or len(shape_of(case)) == 4]


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("case,channels_last", _layouts([
    ((2, 6, 5), 3), ((2, 8, 3, 3), 4), ((1, 4, 1), 2), ((3, 15, 7, 1), 5), ((2, 64, 2, 2), 32),
    ((0, 6, 3, 3), 3), ((2, 13, 3, 5), 13)], lambda case: case[0]), ids=str)
def test_timm_group_norm(case, channels_last, dtype, cpu_path):
    shape, groups = case
    m, conv = _timm_pair("gn", shape[1], dtype, num_groups=groups)
    assert conv.num_groups == groups and conv.eps == 1e-5
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, yt = _compare(m, conv, x, dtype)
    if x.numel() and channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64], ids=str)
@pytest.mark.parametrize("shape,channels_last", _layouts([
    (2, 5, 3, 3), (1, 1, 2), (3, 13, 1, 9), (2, 64, 4, 4), (0, 4, 3, 3), (4, 3, 11)]), ids=str)
def test_timm_group_norm1(shape, channels_last, dtype, cpu_path):
    m, conv = _timm_pair("gn1", shape[1], dtype)
    assert conv.num_groups == 1 and conv.num_channels == shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # one group: a reduction over all of C*H*W, longer than the LayerNorm rows
    _compare(m, conv, x, dtype, grad_factor=8)


def test_timm_ln_gn_options(cpu_path):
    x = torch.randn(3, 4, 6)
    for kw in (dict(affine=False), dict(bias=False), dict(eps=1e-2)):
        m, conv = _timm_pair("ln", 6, **kw)
        assert (conv.weight is None) == (kw.get("affine") is False)
        assert (conv.bias is None) == (kw.get("affine") is False or kw.get("bias") is False)
        assert conv.eps == kw.get("eps", 1e-6)
        _compare(m, conv, x * 0.1, F32)
    x = torch.randn(2, 6, 5)
    for kind, kw in (("gn", dict(num_groups=2, affine=False)), ("gn", dict(num_groups=3, eps=0.5)),
                     ("gn1", dict(affine=False)), ("gn1", dict(eps=1e-2))):
        m, conv = _timm_pair(kind, 6, **kw)
        assert (conv.weight is None) == (kw.get("affine") is False)
        assert conv.eps == kw.get("eps", 1e-5)
        _compare(m, conv, x * 0.1, F32)


def test_timm_ln_gn_gradcheck_float64():
    FN = fastnorm.functional
    was = FN.set_cpu_fast_path(False)  # fastnorm's op and its backward, not ATen's
    try:
        for kind, c, shape, kw in (("ln", 5, (3, 2, 5), {}), ("gn", 6, (2, 6, 3), dict(num_groups=3)),
                                   ("gn1", 4, (2, 4, 2, 3), {})):
            _, conv = _timm_pair(kind, c, F64, **kw)
            x = torch.randn(shape, dtype=F64, requires_grad=True)
            w = conv.weight.detach().clone().requires_grad_()
            b = conv.bias.detach().clone().requires_grad_()

            def f(x, w, b, conv=conv):
                conv.weight, conv.bias = nn.Parameter(w), nn.Parameter(b)
                return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,))

            assert torch.autograd.gradcheck(f, (x, w, b)), kind
    finally:
        FN.set_cpu_fast_path(was)


def test_timm_ln_gn_fallback_errors():
    """Inputs that do not fit the layer go to timm's forward: the same errors."""
    cases = [("ln", 4, {}, [(2, 3), (3,), (2, 4, 3)]),
             ("ln", (3, 4), {}, [(2, 4, 3), (4,)]),
             ("gn", 6, dict(num_groups=3), [(2, 4, 3), (6,), (2, 5)]),
             ("gn", 6, dict(num_groups=6), [(1, 6)]),   # one value per group
             ("gn1", 4, {}, [(2, 3, 5), (4,), (2, 5, 3)])]
    for kind, c, kw, shapes in cases:
        m, conv = _timm_pair(kind, c, **kw)
        for shape in shapes:
            x = torch.randn(shape)
            with pytest.raises((RuntimeError, ValueError)) as e_timm:
                m(x)
            with pytest.raises(e_timm.type) as e_conv:
                conv(x)
            if kind == "ln" or x.dim() < 2 or x.shape[1] != c:  # the original forward ran
                assert str(e_conv.value) == str(e_timm.value), (kind, shape)


@pytest.mark.parametrize("kind", ["ln", "gn", "gn1"])
@pytest.mark.parametrize("fast_norm", [False, True])
@pytest.mark.parametrize("xd", [F32, BF16], ids=str)
def test_timm_ln_gn_autocast(kind, fast_norm, xd, cpu_path):
    """Under autocast timm's fast-norm mode casts the input and parameters to the autocast dtype
    and runs with autocast off (bfloat16 output); without it, torch's autocast rule applies."""
    m, conv = _timm_pair(kind, 8, **({"num_groups": 4} if kind == "gn" else {}))
    m._fast_norm = conv._fast_norm = fast_norm
    x = torch.randn(2, 8, 3, 8, dtype=xd)
    g = torch.randn(2, 8, 3, 8, generator=torch.Generator().manual_seed(2))
    outs = []
    for mod in (conv, m):
        mod.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            y = mod(xi)
        y.backward(g.to(y.dtype))
        outs.append((y, xi.grad, mod.weight.grad, mod.bias.grad))
    (y, dx, dw, db), (yt, dxt, dwt, dbt) = outs
    assert y.dtype == yt.dtype and dx.dtype == dxt.dtype == xd
    assert dw.dtype == dwt.dtype == F32
    if fast_norm:
        assert y.dtype == BF16
    tol = BF16 if BF16 in (y.dtype, xd) or fast_norm else F32
    assert_close_scaled(y, yt, tol, factor=2, msg="output")
    for a, b, what in ((dx, dxt, "input grad"), (dw, dwt, "weight grad"), (db, dbt, "bias grad")):
        assert_close_scaled(a, b, tol, factor=4, msg=what)


def test_timm_ln_gn_fast_norm_with_apex(monkeypatch):
    """With apex installed timm's fast LayerNorm runs apex's kernel (the adapter leaves it to
    timm); timm's fast GroupNorm never uses apex, so the adapters compute it."""
    fast_norm = pytest.importorskip("timm.layers.fast_norm")
    calls = []

    def fake_ln(x, weight, bias, shape, eps):
        calls.append("apex layer_norm")
        return nn.functional.layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(fast_norm, "has_apex", True)
    monkeypatch.setattr(fast_norm, "fused_layer_norm_affine", fake_ln, raising=False)
    mods = [_timm_pair("ln", 4)[1], _timm_pair("gn", 4, num_groups=2)[1], _timm_pair("gn1", 4)[1]]
    for mod in mods:
        mod._fast_norm = True
    x = torch.randn(2, 3, 4)
    y_ln = mods[0](x)
    for mod in mods[1:]:
        mod(torch.randn(2, 4, 3))
    assert calls == ["apex layer_norm"]
    mods[0]._fast_norm = False  # the usual mode: fastnorm's
    assert_close_scaled(mods[0](x), y_ln, F32)
    assert calls == ["apex layer_norm"]


def test_timm_ln_gn_set_fast_norm_at_construction():
    """timm reads is_fast_norm() when a layer is built: the flag travels with the module."""
    fast_norm = pytest.importorskip("timm.layers.fast_norm")
    was = fast_norm.is_fast_norm()
    fast_norm.set_fast_norm(True)
    try:
        pairs = [_timm_pair("ln", 8), _timm_pair("gn", 8, num_groups=2), _timm_pair("gn1", 8)]
    finally:
        fast_norm.set_fast_norm(was)
    x = torch.randn(2, 8, 4, 8)
    for m, conv in pairs:
        assert m._fast_norm and conv._fast_norm
        with torch.autocast("cpu", dtype=BF16):
            y, yt = conv(x), m(x)
        assert y.dtype == yt.dtype == BF16
        assert_close_scaled(y, yt, BF16, factor=2)


class _TimmLnGnNet(nn.Module):
    def __init__(self):
        super().__init__()
        LayerNorm, GroupNorm, GroupNorm1 = _timm_ln_gn()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = GroupNorm(8, num_groups=4)
        self.gn1 = GroupNorm1(8)
        self.ln = LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.gn1(self.gn(self.conv(x)))
        return self.head(self.ln(x.flatten(2).transpose(1, 2))).mean(1)


@pytest.mark.parametrize("fast_norm", [False, True])
def test_timm_ln_gn_compiled_fullgraph(fast_norm):
    torch._dynamo.reset()
    model = _randomize(_TimmLnGnNet())
    for mod in (model.gn, model.gn1, model.ln):
        mod._fast_norm = fast_norm
    twin = copy.deepcopy(model)
    fastnorm.convert(model)
    assert len(fastnorm.converted_modules(model)) == 3
    x = torch.randn(2, 3, 5, 6)
    opt = torch.compile(model, backend="aot_eager", fullgraph=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            y, dx, grads = _fwd_bwd(opt, x)
            yt, dxt, grads_t = _fwd_bwd(twin, x)
        tol = BF16 if autocast else F32
        assert y.dtype == yt.dtype
        assert_close_scaled(y, yt, tol, factor=2)
        assert_close_scaled(dx, dxt, tol, factor=4)
        grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
        assert grads.keys() == grads_t.keys()
        for k in grads_t:
            assert_close_scaled(grads[k], grads_t[k], tol, factor=4, msg=k)
    torch._dynamo.reset()


def test_timm_ln_gn_pickled_in_a_fresh_process(tmp_path):
    LayerNorm, GroupNorm, GroupNorm1 = _timm_ln_gn()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), GroupNorm(4, num_groups=2), GroupNorm1(4),
                          LayerNorm(4))
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
    assert out.strip() == str(sorted(["TimmLayerNorm", "TimmGroupNorm", "TimmGroupNorm1"]))


def test_timm_ln_gn_subclasses_left_alone():
    LayerNorm, GroupNorm, GroupNorm1 = _timm_ln_gn()

    class MyLN(LayerNorm):
        pass

    class MyGN1(GroupNorm1):
        pass

    model = nn.Sequential(MyLN(4), MyGN1(4), GroupNorm1(4))
    fastnorm.convert(model)
    assert type(model[0]) is MyLN and type(model[1]) is MyGN1
    assert [n for n, _ in fastnorm.converted_modules(model)] == ["2"]


# whole timm models: every timm norm class in `originals`, so the count is everything swapped
def _all_timm_norms():
    LayerNorm, GroupNorm, GroupNorm1 = _timm_ln_gn()
    LayerNorm2d, RmsNorm = _timm_norms()
    return {LayerNorm, GroupNorm, GroupNorm1, LayerNorm2d, RmsNorm}


def test_timm_vit_layer_norm():
    timm = pytest.importorskip("timm")
    LayerNorm, _, _ = _timm_ln_gn()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                         depth=2))
    # norm1 and norm2 of each block, the final norm: timm's LayerNorm
    assert {type(m) for m in model.modules()} & _all_timm_norms() == {LayerNorm}
    _check_converted_model(model, torch.randn(2, 3, 32, 32), _all_timm_norms(), 5)


def test_timm_convnext_atto_block_layer_norm():
    timm = pytest.importorskip("timm")
    LayerNorm, _, _ = _timm_ln_gn()
    LayerNorm2d, _ = _timm_norms()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("convnext_atto", pretrained=False, conv_mlp=False,
                                         depths=(1, 2, 1, 1)))
    # without conv_mlp the block norms are timm's LayerNorm (channels-last blocks; 5 blocks with
    # these depths, 12 in convnext_atto's); stem, 3 downsamples and the head stay LayerNorm2d
    counts = {cls: sum(type(m) is cls for m in model.modules()) for cls in (LayerNorm, LayerNorm2d)}
    assert counts == {LayerNorm: 5, LayerNorm2d: 5}
    _check_converted_model(model, torch.randn(1, 3, 32, 32), _all_timm_norms(), 10)


def test_timm_resnet18_group_norm():
    timm = pytest.importorskip("timm")
    _, GroupNorm, _ = _timm_ln_gn()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("resnet18", pretrained=False, norm_layer=GroupNorm))
    # bn1, two per BasicBlock (8 blocks), three downsample norms: GroupNorm(C, 32 groups)
    assert {type(m) for m in model.modules()} & _all_timm_norms() == {GroupNorm}
    _check_converted_model(model, torch.randn(2, 3, 32, 32), _all_timm_norms(), 20)


def test_timm_poolformer_s12_group_norm1():
    timm = pytest.importorskip("timm")
    _, _, GroupNorm1 = _timm_ln_gn()
    LayerNorm2d, _ = _timm_norms()
    torch.manual_seed(0)
    model = _randomize(timm.create_model("poolformer_s12", pretrained=False))
    # norm1 and norm2 of each of the 12 blocks (GroupNorm1), the head's LayerNorm2d
    counts = {cls: sum(type(m) is cls for m in model.modules()) for cls in (GroupNorm1, LayerNorm2d)}
    assert counts == {GroupNorm1: 24, LayerNorm2d: 1}
    _check_converted_model(model, torch.randn(1, 3, 32, 32), _all_timm_norms(), 25)
