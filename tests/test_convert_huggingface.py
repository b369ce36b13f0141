"""convert() of Hugging Face transformers' and diffusers' norm classes (fastnorm.huggingface):
recognised by probing, never by name.

- per convention, a real transformers / diffusers class against its converted twin: outputs
  (bit for bit on CPU with the fast path on where fastnorm's CPU computation is spelled as the
  original; within rounding where it is not, each case says why) and every gradient (input,
  gate, weight) within tolerance, for float32 / bfloat16 / float16 inputs with float32 and half
  weights, with the CPU fast path on and off (off: the ops' reference path, within rounding);
- look-alikes whose numerics differ (names copied from real classes) are not swapped;
- inputs an adapter does not take go to the original forward (float64, autocast for the
  native conventions, other shapes, other arguments: the same results and errors);
- convert() over tiny models built from configs (no downloads): every norm module swapped, the
  same outputs and gradients; revert(), converted_modules(), pickling in another process,
  state_dict, parameter identity, hooks;
- fastnorm imports neither package.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fastnorm
from fastnorm import functional as FN
from fastnorm import huggingface as H
from conftest import assert_close_scaled, assert_grads_close

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import hf_coverage  # noqa: E402  (the tiny configs, shared with the coverage measurement)

warnings.filterwarnings("ignore", message=".*Mismatch dtype between input and weight.*")


def _diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than a pool of them on a busy
    machine (the tiny models' convolutions most of all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["fast", "ops"])
def fast_path(request):
    was = FN.set_cpu_fast_path(request.param)
    yield request.param
    FN.set_cpu_fast_path(was)


# ----------------------------------------------------------------------------------------------
# the conventions, on real classes
# ----------------------------------------------------------------------------------------------
def _tf(module: str, name: str):
    import importlib
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def _df(name: str):
    return getattr(importlib_module("diffusers.models.normalization"), name)


def importlib_module(name):
    import importlib
    if name.startswith("diffusers"):
        _diffusers()
    return importlib.import_module(name)


H_ = 48  # the normalised size (divisible by the group sizes below)

# id -> (factory, convention, gated, layout, bitwise on CPU with the fast path on, why not)
CASES = {
    "llama": (lambda: _tf("llama.modeling_llama", "LlamaRMSNorm")(H_, eps=1e-6),
              "rms_llama", False, "last", True, ""),
    "llama4_text": (lambda: _tf("llama4.modeling_llama4", "Llama4TextRMSNorm")(H_),
                           "rms_llama", False, "last", True, ""),
    "nemotron_h": (lambda: _tf("nemotron_h.modeling_nemotron_h", "NemotronHRMSNorm")(H_),
                   "rms_wcast", False, "last", True, ""),
    "gemma3n_pow": (lambda: _tf("gemma3n.modeling_gemma3n", "Gemma3nRMSNorm")(H_),
                    "rms_wcast", False, "last", True, ""),
    "gemma": (lambda: _tf("gemma.modeling_gemma", "GemmaRMSNorm")(H_), "rms_offset", False,
              "last", True, ""),
    "t5": (lambda: _tf("t5.modeling_t5", "T5LayerNorm")(H_), "rms_t5", False, "last", True, ""),
    "diffusers_rms": (lambda: _df("RMSNorm")(H_, eps=1e-6), "rms_t5", False, "last", True, ""),
    "llama4_weightless": (lambda: _tf("llama4.modeling_llama4", "Llama4TextWeightlessRMSNorm")(),
                          "rms_none", False, "last", True, ""),
    "gemma3n_no_scale": (lambda: _tf("gemma3n.modeling_gemma3n", "Gemma3nRMSNorm")(
        H_, with_scale=False), "rms_none", False, "last", True, ""),
    "diffusers_rms_no_affine": (lambda: _df("RMSNorm")(H_, eps=1e-6, elementwise_affine=False),
                                "rms_none", False, "last", True, ""),
    "mamba2_gated": (lambda: _tf("mamba2.modeling_mamba2", "Mamba2RMSNormGated")(
        H_, group_size=16), "gated_late_d", True, "last", True, ""),
    "falcon_h1_late": (lambda: _tf("falcon_h1.modeling_falcon_h1", "FalconH1RMSNormGated")(
        H_, n_groups=3, norm_before_gate=False), "gated_late", True, "last", True, ""),
    "qwen3_next_gated": (lambda: _tf("qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNormGated")(
        H_), "gated_early_d", True, "last", True, ""),
    "kimi_gated": (lambda: _tf("kimi_linear.modeling_kimi_linear", "KimiLinearRMSNormGated")(
        H_), "gated_early", True, "last", True, ""),
    "falcon_h1_early": (lambda: _tf("falcon_h1.modeling_falcon_h1", "FalconH1RMSNormGated")(
        H_, n_groups=2, norm_before_gate=True), "gated_early", True, "last", True, ""),
    "olmo": (lambda: _tf("olmo.modeling_olmo", "OlmoLayerNorm")(H_), "ln_f32", False, "last",
             False, "half inputs: ATen's CPU LayerNorm kernel of a half input does not round "
                    "like F.layer_norm(x.float()).to(dtype) does (fastnorm calls the former)"),
    "fp32_layer_norm": (lambda: _df("FP32LayerNorm")(H_, eps=1e-6), "ln_f32", False, "last",
                        False, "half inputs: as OLMo's"),
    "cohere": (lambda: _tf("cohere.modeling_cohere", "CohereLayerNorm")(H_), "ln_f32", False,
               "last", False, "Cohere spells out mean and variance (two passes); fastnorm calls "
                              "ATen's LayerNorm"),
    "convnext_last": (lambda: _tf("convnext.modeling_convnext", "ConvNextLayerNorm")(H_),
                      "ln_native", False, "last", True, ""),
    "gradium_flow": (lambda: _tf("gradium_phonon_tts.modeling_gradium_phonon_tts",
                                 "GradiumPhononTTSFlowLayerNorm")(H_), "ln_fp32_only", False,
                     "last", False, "spelled out with mean / var; half inputs go to the original"),
    "convnext_first": (lambda: _tf("convnext.modeling_convnext", "ConvNextLayerNorm")(
        H_, data_format="channels_first"), "ln2d", False, "first", True, ""),
    "squeezebert": (lambda: _tf("squeezebert.modeling_squeezebert", "SqueezeBertLayerNorm")(H_),
                    "ln2d", False, "first3", True, ""),
    "emu3_group_norm": (lambda: _tf("emu3.modeling_emu3", "Emu3VQVAEGroupNorm")(
        num_groups=4, num_channels=H_), "group_norm", False, "first", True, ""),
    "detr_frozen_bn": (lambda: _tf("detr.modeling_detr", "DetrFrozenBatchNorm2d")(H_),
                       "frozen_bn", False, "first", False,
                       "fastnorm's frozen_batch_norm rounds once (torchvision's formula twice)"),
}


def _randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            positive = "var" in name or (name == "weight" and "Gemma" not in type(m).__name__)
            t.copy_(r.abs() + 0.5 if positive else r * 0.3)
    return m


def _input(layout: str, dtype, seed=1, batch=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    if layout == "last":
        shape = (*batch, H_)
    elif layout == "first3":
        shape = (batch[0], H_, 5)
    else:
        shape = (batch[0], H_, 3, 4)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x[0].mul_(1e-3)  # rows where eps matters
    return x.to(dtype)


def _make(case, wdt):
    factory, conv, gated, layout, bitwise, why = CASES[case]
    m = _randomize(factory()).to(wdt)
    c = copy.deepcopy(m)
    fastnorm.convert(c)
    assert type(c) is not type(m) and isinstance(c, type(m)), case
    assert type(c)._fastnorm_recipe.conv == conv, (case, type(c)._fastnorm_recipe)
    assert [n for n, _ in fastnorm.converted_modules(c)] == [""]
    return m, c


def _fwd_bwd(m, x, gate=None):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    g = None if gate is None else gate.detach().clone().requires_grad_()
    y = m(x) if g is None else m(x, g)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(dy)
    grads = {n: p.grad for n, p in m.named_parameters()}
    return y.detach(), x.grad, None if g is None else g.grad, grads


def _tol(*dtypes):
    """The tolerance of the least precise dtype among these."""
    return BF16 if BF16 in dtypes else F16 if F16 in dtypes else F32


@pytest.mark.parametrize("wkind", ["w32", "whalf"])
@pytest.mark.parametrize("xd", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_convention(case, xd, wkind, fast_path):
    factory, conv, gated, layout, bitwise, why = CASES[case]
    wdt = F32 if wkind == "w32" else (xd if xd != F32 else BF16)
    if conv in ("ln_native", "ln2d", "group_norm") and xd == F32 and wdt != F32:
        pytest.skip("torch's layer_norm / group_norm refuse half parameters with a float32 input")
    m, c = _make(case, wdt)
    x = _input(layout, xd)
    gate = (torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 2).to(xd) \
        if gated else None
    if case == "detr_frozen_bn" and wdt not in (xd, F32):
        # half buffers under a float32 input: DETR rounds scale and shift to the buffers' dtype,
        # fastnorm would not (a difference above float32's precision): the original's forward
        spy = []
        real = FN.frozen_batch_norm
        FN.frozen_batch_norm = lambda *a, **k: spy.append(1) or real(*a, **k)
        try:
            assert torch.equal(c(x), m(x)) and not spy
        finally:
            FN.frozen_batch_norm = real
        return
    yt, dxt, dgt, gt = _fwd_bwd(m, x, gate)
    y, dx, dg, gr = _fwd_bwd(c, x, gate)
    assert y.dtype == yt.dtype and y.shape == yt.shape
    if fast_path and bitwise:
        assert torch.equal(y, yt), f"{case}: not bitwise ({(y.float() - yt.float()).abs().max()})"
    else:
        # within a unit or two in the last place of the output's dtype (why: CASES)
        assert_close_scaled(y, yt, _tol(xd, yt.dtype), factor=2, msg=f"{case} output ({why})")
    tol = _tol(xd, wdt)
    assert_close_scaled(dx, dxt, tol, factor=4, msg=f"{case} input grad")
    if gated:
        assert_close_scaled(dg, dgt, tol, factor=4, msg=f"{case} gate grad")
    assert gr.keys() == gt.keys()
    assert_grads_close(gr, gt, tol, factor=8, msg=f"{case} parameter grads")


@pytest.mark.parametrize("case", ["mamba2_gated", "falcon_h1_late"])
def test_gated_without_gate(case, fast_path):
    """Mamba-style gated norms take gate=None (a plain grouped RMSNorm)."""
    m, c = _make(case, F32)
    for xd in (F32, BF16):
        x = _input("last", xd)
        y, dx, _, g = _fwd_bwd(c, x)
        yt, dxt, _, gt = _fwd_bwd(m.to(F32), x)
        if fast_path:
            assert torch.equal(y, yt), case
        assert_close_scaled(y, yt, xd, factor=2)
        assert_close_scaled(dx, dxt, xd, factor=4)
        assert_grads_close(g, gt, xd, factor=8)


@pytest.mark.parametrize("case", ["llama", "gemma", "t5"])
def test_per_head_qk_norm(case, fast_path):
    """QK-norm: the head_dim norm applied to (B, S, heads, head_dim) and to its transposed
    (B, heads, S, head_dim) view, as attention layers do."""
    factory = CASES[case][0]
    m = _randomize(factory())
    c = fastnorm.convert(copy.deepcopy(m))
    g = torch.Generator().manual_seed(5)
    for xd in (F32, BF16):
        q = (torch.randn(2, 5, 4, H_, generator=g) * 3).to(xd)
        for x in (q, q.transpose(1, 2)):
            y, dx, _, gr = _fwd_bwd(c, x)
            yt, dxt, _, gt = _fwd_bwd(m, x)
            if fast_path:
                assert torch.equal(y, yt)
            assert_close_scaled(y, yt, xd, factor=2)
            assert_close_scaled(dx, dxt, xd, factor=4)
            assert_grads_close(gr, gt, xd, factor=8)


# ----------------------------------------------------------------------------------------------
# what goes to the original forward
# ----------------------------------------------------------------------------------------------
def _spy(monkeypatch, name):
    calls = []
    real = getattr(FN, name)

    def spy(*a, **k):
        calls.append(name)
        return real(*a, **k)
    monkeypatch.setattr(FN, name, spy)
    return calls


def test_inputs_left_to_the_original(monkeypatch):
    m, c = _make("llama", F32)
    calls = _spy(monkeypatch, "rms_norm")
    c(_input("last", F32))
    assert calls == ["rms_norm"]
    calls.clear()
    # float64: the original computes in float32 (x.to(float32)); fastnorm would in float64
    x64 = _input("last", F64)
    assert torch.equal(c(x64), m(x64)) and not calls
    # a shape that does not fit: the original's error
    bad = torch.randn(2, H_ + 1)
    with pytest.raises(RuntimeError) as e1:
        m(bad)
    with pytest.raises(RuntimeError) as e2:
        c(bad)
    assert str(e1.value) == str(e2.value) and not calls
    # x by keyword works; an argument the original does not take raises its error
    x = _input("last", BF16)
    assert torch.equal(c(hidden_states=x), m(hidden_states=x)) and calls == ["rms_norm"]
    with pytest.raises(TypeError):
        c(x, 1)
    # a weight replaced by one of another size: the original's broadcasting or error
    c2 = copy.deepcopy(c)
    m2 = copy.deepcopy(m)
    for mod in (c2, m2):
        mod.weight = nn.Parameter(torch.ones(1))
    calls.clear()
    assert torch.equal(c2(x), m2(x)) and not calls


def test_gate_required_and_extra_argument(monkeypatch):
    m, c = _make("qwen3_next_gated", F32)
    x = _input("last", F32)
    with pytest.raises(AttributeError) as e1:
        m(x, None)
    with pytest.raises(AttributeError) as e2:
        c(x, None)  # the gate is required: the original's error
    assert str(e1.value) == str(e2.value)
    g = torch.randn_like(x)
    assert torch.equal(c(x, gate=g), m(x, gate=g))
    # a gate of another dtype than x: the original's promotion
    calls = _spy(monkeypatch, "gated_rms_norm")
    assert torch.equal(c(x, g.to(BF16)), m(x, g.to(BF16))) and not calls
    # Emu3's GroupNorm takes an unused second argument: fastnorm only without it
    m, c = _make("emu3_group_norm", F32)
    calls = _spy(monkeypatch, "group_norm")
    x = _input("first", F32)
    assert torch.equal(c(x), m(x)) and calls == ["group_norm"]
    assert torch.equal(c(x, torch.ones(1)), m(x, torch.ones(1))) and calls == ["group_norm"]


def test_autocast(monkeypatch):
    """The RMS conventions' originals cast to float32 explicitly (autocast changes nothing):
    fastnorm runs with autocast off. torch's layer_norm on the input as it is (ConvNext) follows
    autocast's rules: those calls go to the original forward."""
    m, c = _make("llama", F32)
    x = _input("last", BF16)
    calls = _spy(monkeypatch, "rms_norm")
    with torch.autocast("cpu", dtype=BF16):
        y, yt = c(x), m(x)
    assert calls == ["rms_norm"] and y.dtype == yt.dtype and torch.equal(y, yt)
    m, c = _make("convnext_last", F32)
    calls = _spy(monkeypatch, "layer_norm")
    with torch.autocast("cpu", dtype=BF16):
        y, yt = c(x), m(x)
    assert not calls and torch.equal(y, yt)
    c(x)
    assert calls == ["layer_norm"]


def test_group_size_read_at_call_time():
    """The group size, the number of groups and eps are attributes, read at every call."""
    m, c = _make("mamba2_gated", F32)
    x, g = _input("last", F32), torch.randn(2, 3, H_)
    for gs in (8, 48, 5):  # 5 does not divide 48: the original's error
        m.group_size = c.group_size = gs
        m.variance_epsilon = c.variance_epsilon = 1e-3 * gs
        if 48 % gs:
            with pytest.raises(RuntimeError):
                c(x, g)
            continue
        assert torch.equal(c(x, g), m(x, g))


# ----------------------------------------------------------------------------------------------
# refusals: look-alikes whose numerics differ are left alone
# ----------------------------------------------------------------------------------------------
def _lookalike(name, forward, init=None, module="transformers.models.fake.modeling_fake"):
    """A class named like a real one, defined "in transformers" (only those are probed)."""

    def __init__(self, hidden_size=H_, eps=1e-6):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        if init:
            init(self)

    cls = type(name, (nn.Module,), {"__init__": __init__, "forward": forward})
    cls.__module__ = module
    return cls


def _h(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


LOOKALIKES = {
    "eps_outside_sqrt": lambda self, x: self.weight * (
        x.float() / (x.float().pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)
    ).to(x.dtype),
    "eps_squared": lambda self, x: self.weight * _h(x.float(), self.variance_epsilon ** 2).to(
        x.dtype),
    "hard_coded_eps": lambda self, x: self.weight * _h(x.float(), 1e-5).to(x.dtype),
    "mean_not_rms": lambda self, x: self.weight * (
        x.float() - x.float().mean(-1, keepdim=True)).to(x.dtype),
    "centered_rms": lambda self, x: self.weight * _h(
        x.float() - x.float().mean(-1, keepdim=True), self.variance_epsilon).to(x.dtype),
    "rstd_rounded": lambda self, x: self.weight * (x * torch.rsqrt(
        x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon).to(x.dtype)),
    "sqrt_h_scaled": lambda self, x: self.weight * (
        _h(x.float(), self.variance_epsilon) * x.shape[-1] ** 0.5).to(x.dtype),
    "offset_of_half_sum": lambda self, x: (
        _h(x.float(), self.variance_epsilon) * (1.0 + self.weight).float()).type_as(x),
    "weight_twice": lambda self, x: self.weight * self.weight * _h(
        x.float(), self.variance_epsilon).to(x.dtype),
    "div_by_sqrt": lambda self, x: self.weight * (x.float() / torch.sqrt(
        x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype),
    "dropout_in_training": lambda self, x: nn.functional.dropout(
        self.weight * _h(x.float(), self.variance_epsilon).to(x.dtype), 0.5, self.training),
    "native_torch_rms": lambda self, x: torch.rms_norm(x, (x.shape[-1],), self.weight,
                                                       self.variance_epsilon),
}


@pytest.mark.parametrize("kind", list(LOOKALIKES))
def test_lookalike_not_swapped(kind):
    cls = _lookalike("LlamaRMSNorm", LOOKALIKES[kind])
    m = _randomize(cls())
    m.train()
    v = H.recognise(m)
    assert v.recipe is None, (kind, v)
    fastnorm.convert(m)
    assert type(m) is cls and fastnorm.converted_modules(m) == []


def test_recognised_by_numerics_not_name():
    """A class named LlamaRMSNorm that rounds after the weight is Cohere2 / NemotronH's
    convention, and converted as that; one named T5LayerNorm computing Gemma's 1 + w as Gemma."""
    cls = _lookalike("LlamaRMSNorm", lambda self, x: (
        self.weight * _h(x.float(), self.variance_epsilon)).to(x.dtype))
    m = _randomize(cls())
    c = fastnorm.convert(copy.deepcopy(m))
    assert type(c)._fastnorm_recipe.conv == "rms_wcast"
    x = _input("last", BF16)
    assert torch.equal(c(x), m(x))
    cls = _lookalike("T5LayerNorm", lambda self, x: (
        _h(x.float(), self.variance_epsilon) * (1.0 + self.weight.float())).type_as(x))
    c = fastnorm.convert(_randomize(cls()))
    assert type(c)._fastnorm_recipe.conv == "rms_offset"


def test_other_refusals():
    # not transformers' or diffusers': never probed, even computing Llama's norm
    cls = _lookalike("LlamaRMSNorm", lambda self, x: self.weight * _h(
        x.float(), self.variance_epsilon).to(x.dtype), module="mypackage.layers")
    assert H.adapter_for(cls()) is None and H.recognise(cls()).recipe is None
    # a child module, a non-plain attribute, a tensor attribute, forward replaced on the
    # instance (accelerate's hooks): not candidates
    llama = CASES["llama"][0]
    for change in (lambda m: m.add_module("child", nn.Identity()),
                   lambda m: setattr(m, "config", object()),
                   lambda m: setattr(m, "scale", torch.ones(1)),
                   lambda m: setattr(m, "forward", m.forward)):
        m = llama()
        change(m)
        assert H.recognise(m).recipe is None and H.adapter_for(m) is None
    # a bias the RMS conventions do not read (diffusers' RMSNorm with bias=True)
    m = _randomize(_df("RMSNorm")(H_, eps=1e-6, bias=True))
    assert H.recognise(m).recipe is None


def test_ambiguous_is_refused(monkeypatch):
    """Two conventions that both match every probe: neither is chosen."""
    twin = H.CONVENTIONS["rms_llama"]._replace(doc="a copy")
    monkeypatch.setitem(H.CONVENTIONS, "rms_llama_copy", twin)
    monkeypatch.setattr(H, "_verdicts", {})
    m = CASES["llama"][0]()
    v = H.recognise(m)
    assert v.recipe is None and v.reason.startswith("ambiguous"), v


# ----------------------------------------------------------------------------------------------
# probing leaves the module alone
# ----------------------------------------------------------------------------------------------
def test_probe_touches_nothing(monkeypatch):
    monkeypatch.setattr(H, "_verdicts", {})
    m = _randomize(CASES["llama"][0]())
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = {n: id(p) for n, p in m.named_parameters()}
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    assert H.recognise(m).recipe is not None
    assert not calls and torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    assert {n: id(p) for n, p in m.named_parameters()} == ids
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    # meta modules are probed alike (their tensors are never read)
    with torch.device("meta"):
        mm = CASES["gemma"][0]()
    monkeypatch.setattr(H, "_verdicts", {})
    assert H.recognise(mm).recipe.conv == "rms_offset"
    fastnorm.convert(mm)
    assert mm.weight.is_meta and isinstance(mm, CASES["gemma"][0]().__class__)


def test_verdict_cached_per_configuration(monkeypatch):
    monkeypatch.setattr(H, "_verdicts", {})
    runs = []
    real = H._probe_module
    monkeypatch.setattr(H, "_probe_module", lambda m: runs.append(1) or real(m))
    llama = _tf("llama.modeling_llama", "LlamaRMSNorm")
    for _ in range(3):
        H.recognise(llama(H_))
    H.recognise(llama(H_, eps=1e-5))
    H.recognise(llama(16))
    assert len(runs) == 3


def test_adapter_names_round_trip():
    recipe = H.Recipe("gated_late_d", "a:variance_epsilon", "a:group_size", "silu", "234",
                      0x1ff, "gn", "")
    base = _tf("mamba2.modeling_mamba2", "Mamba2RMSNormGated")
    name = H.adapter_name(base, recipe)
    assert name.isidentifier() and name.count("__") == 3
    assert H._parse_name(name) == (base.__module__, base.__qualname__, recipe)
    for s in ("a_b.c~d:e-f+g__h", "Qwen3_5MoeRMSNormGated", "c:1e-05", "é"):
        assert H._unescape(H._escape(s)) == s and "__" not in H._escape(s)
    assert getattr(H, name).__bases__ == (base,)


# ----------------------------------------------------------------------------------------------
# convert() over tiny models
# ----------------------------------------------------------------------------------------------
def _tiny(mt):
    overrides = dict(hf_coverage.TRANSFORMERS_MODELS.get(mt) or {})
    if mt == "vit":
        overrides.update(image_size=32, patch_size=8)
    return hf_coverage.build_transformers(mt, overrides, "cpu")


def _lm_inputs(model, mt):
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    if mt == "t5":
        return dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    if mt in ("convnext", "vit"):
        return dict(pixel_values=torch.randn(2, 3, 32, 32,
                                             generator=torch.Generator().manual_seed(0)))
    return dict(input_ids=ids)


def _output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _check_model(model, inputs, expect_bitwise, run=None, tol=F32):
    """convert() on model (a deep copy kept): every norm module swapped and nothing else, the
    same outputs and gradients, objects kept, revert()."""
    run = run or (lambda m: _output(m(**inputs)))
    model.eval()  # no dropout
    _randomize_norms(model)
    twin = copy.deepcopy(model)
    norms = [n for n, m in model.named_modules() if hf_coverage.is_norm_module(m)]
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert fastnorm.convert(model) is model
    swapped = [n for n, _ in fastnorm.converted_modules(model)]
    assert swapped == norms, sorted(set(norms) ^ set(swapped))
    for n, m in model.named_modules():
        assert isinstance(m, types[n]) and (type(m) is types[n]) == (n not in norms), n
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    outs = []
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        y = run(m)
        y.float().square().mean().backward()
        outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()
                                  if p.grad is not None}))
    (y, g), (yt, gt) = outs
    assert y.dtype == yt.dtype
    if expect_bitwise and FN._cpu_fast_path_enabled:
        assert torch.equal(y, yt), (y - yt).abs().max()
    assert_close_scaled(y, yt, tol, factor=10, msg="output")
    assert g.keys() == gt.keys()
    assert_grads_close(g, gt, tol, factor=10)
    fastnorm.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert fastnorm.converted_modules(model) == []
    return len(swapped)


def _randomize_norms(model):
    """Weights away from their initial ones / zeros, so that a wrong convention would show."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, m in model.named_modules():
            if hf_coverage.is_norm_module(m):
                for p in m.parameters(recurse=False):
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


# model type -> bitwise with the fast path on (float32): what is not says why in CASES
MODELS = {
    "llama": True, "mistral": True, "qwen2": True, "qwen3": True, "qwen3_moe": True,
    "gemma": True, "gemma2": True, "gemma3_text": True, "phi3": True, "olmo": True,
    "olmo2": True, "cohere": False, "granite": True, "deepseek_v3": True, "t5": True,
    "mamba2": True, "convnext": True, "gpt2": True, "bert": True, "vit": True,
}


@pytest.mark.parametrize("mt", list(MODELS))
def test_tiny_transformers_model(mt):
    model = _tiny(mt)
    n = _check_model(model, _lm_inputs(model, mt), MODELS[mt])
    assert n >= 3


def test_tiny_model_in_bfloat16():
    """bfloat16 weights and activations (Llama, Gemma, T5 conventions in one pass each)."""
    for mt in ("qwen3", "gemma2", "t5"):
        model = _tiny(mt).to(BF16)
        _check_model(model, _lm_inputs(model, mt), True, tol=BF16)


def _diffusers_run(name):
    d = _diffusers()
    g = torch.Generator().manual_seed(0)
    build = hf_coverage._diffusers_models()[name]
    model = build()

    def randn(*s):
        return torch.randn(*s, generator=g)
    t = torch.tensor([3, 500])
    if name == "UNet2DModel":
        args = dict(sample=randn(2, 3, 16, 16), timestep=t)
    elif name == "AutoencoderKL":
        args = dict(sample=randn(2, 3, 16, 16), sample_posterior=False)
    elif name == "SD3Transformer2DModel":
        args = dict(hidden_states=randn(2, 4, 16, 16), encoder_hidden_states=randn(2, 5, 32),
                    pooled_projections=randn(2, 16), timestep=t)
    elif name == "FluxTransformer2DModel":
        args = dict(hidden_states=randn(2, 16, 8), encoder_hidden_states=randn(2, 4, 16),
                    pooled_projections=randn(2, 16), timestep=t.float() / 1000,
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=None)
    elif name == "WanTransformer3DModel":
        args = dict(hidden_states=randn(2, 4, 1, 8, 8), timestep=t,
                    encoder_hidden_states=randn(2, 5, 16))
    else:
        raise KeyError(name)
    return model, (lambda m: m(**args, return_dict=False)[0]) if name != "AutoencoderKL" else (
        lambda m: m(**args).sample)


# diffusers model -> bitwise with the fast path on (float32)
DIFFUSERS = {"UNet2DModel": True, "AutoencoderKL": True, "SD3Transformer2DModel": True,
             "FluxTransformer2DModel": True, "WanTransformer3DModel": True}


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_tiny_diffusers_model(name):
    model, run = _diffusers_run(name)
    norms_before = [n for n, m in model.named_modules() if hf_coverage.is_norm_module(m)]
    probed = [n for n, m in model.named_modules() if hf_coverage.is_norm_module(m)
              and type(m).__module__.startswith("diffusers")]
    n = _check_model(model, None, DIFFUSERS[name], run=run)
    assert n == len(norms_before)
    if name in ("SD3Transformer2DModel", "WanTransformer3DModel"):
        assert probed  # diffusers' own RMSNorm / FP32LayerNorm classes among them


def test_coverage_tool_counts():
    """tools/hf_coverage.py's count on a model with a class left alone (MobileBERT's NoNorm is
    x * w + b, not a normalisation)."""
    c = hf_coverage.count(hf_coverage.build_transformers(
        "mobilebert", hf_coverage.TRANSFORMERS_MODELS["mobilebert"]))
    assert c.missed.keys() == {"NoNorm"} and c.total - c.swapped == c.missed["NoNorm"][0]
    assert c.probed == c.swapped == 0


# ----------------------------------------------------------------------------------------------
# pickling, state_dict, hooks
# ----------------------------------------------------------------------------------------------
def _run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_pickle_in_another_process(tmp_path):
    """A converted module pickles (torch.save too) and unpickles in a fresh process: the module
    -level __getattr__ rebuilds each adapter from its name."""
    m = nn.Sequential(_randomize(CASES["gemma"][0]()), _randomize(CASES["mamba2_gated"][0]()),
                      _randomize(CASES["convnext_last"][0]()))
    fastnorm.convert(m)
    names = [type(c).__qualname__ for c in m]
    x = _input("last", F32)
    expected = m[2](m[0](x))
    torch.save(dict(model=m, x=x, y=expected, names=names), tmp_path / "m.pt")
    out = _run_python(f"""
        import torch, fastnorm
        d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
        m = d["model"]
        assert [type(c).__qualname__ for c in m] == d["names"], [type(c) for c in m]
        assert [n for n, _ in fastnorm.converted_modules(m)] == ["0", "1", "2"]
        assert torch.equal(m[2](m[0](d["x"])), d["y"])
        fastnorm.revert(m)
        assert type(m[0]).__name__ == "GemmaRMSNorm"
        assert type(m[0]).__module__.startswith("transformers")
        print("ok")
    """)
    assert out.strip().endswith("ok")
    m2 = pickle.loads(pickle.dumps(m))
    assert [type(c) for c in m2] == [type(c) for c in m]
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert list(m.state_dict()) == ["0.weight", "1.weight", "2.weight", "2.bias"]


def test_hooks_and_optimizer_kept():
    m = _randomize(CASES["llama"][0]())
    calls = []
    m.register_forward_hook(lambda mod, i, o: calls.append(type(mod)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    fastnorm.convert(m)
    x = _input("last", F32)
    m(x).sum().backward()
    opt.step()
    assert calls == [type(m)] and not torch.equal(m.weight, CASES["llama"][0]().weight)


# ----------------------------------------------------------------------------------------------
# fastnorm needs neither package
# ----------------------------------------------------------------------------------------------
def test_fastnorm_does_not_import_them():
    out = _run_python("""
        import sys, torch, fastnorm
        fastnorm.convert(torch.nn.Sequential(torch.nn.LayerNorm(3)))
        print(sorted(k for k in sys.modules if k.split(".")[0] in ("transformers", "diffusers")))
    """)
    assert out.strip() == "[]"
    out = _run_python("""
        import sys
        sys.modules["transformers"] = None
        sys.modules["diffusers"] = None
        import torch, fastnorm
        m = torch.nn.Sequential(torch.nn.LayerNorm(4))
        fastnorm.convert(m)
        assert fastnorm.huggingface.originals() == {} and not fastnorm.huggingface.active()
        print("ok")
    """)
    assert out.strip().endswith("ok")
