"""convert() of diffusers' modulated norm layers (fastnorm.diffusers_modulated): AdaLayerNorm,
AdaLayerNormZero(Single), SD35AdaLayerNormZeroX, AdaLayerNormContinuous, CogVideoXLayerNormZero,
HunyuanVideo's token-replace AdaLN-Zero, SanaModulatedNorm, Mochi's and Lumina's modulated
RMSNorms, HunyuanDiT's AdaLayerNormShift.

- one tiny random model per family (DiT, PixArt, SD3 with SD3.5's dual attention, Flux, Wan,
  CogVideoX, HunyuanVideo, LTX-Video, Sana, Mochi, Lumina2, HunyuanDiT, Allegro): every norm
  module and modulated layer swapped (the count asserted), fastnorm's modulated norm called,
  the output and every parameter's gradient bit for bit the original's (float32, CPU fast
  path), within tolerance with the fast path off; revert();
- a look-alike class (same module and name, other numerics) is left alone; the original
  forward is never called through an adapter; the inner norm child converted or not, hooked or
  not; children, parameters and state_dict kept; pickling in another process.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from fastnorm import diffusers_modulated as DM
from fastnorm import functional as FN
from conftest import assert_close_scaled, assert_grads_close

D = pytest.importorskip("diffusers")
from diffusers.models import normalization as N  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import hf_coverage  # noqa: E402  (the tiny configs, shared with the coverage measurement)

warnings.filterwarnings("ignore")
F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a pool is slower on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch):
    """Counts of fastnorm's modulated norm calls (the adapters look them up at call time)."""
    n = {"layer": 0, "rms": 0}
    layer, rms = FN.modulated_layer_norm, FN.modulated_rms_norm

    def counted_layer(*a, **k):
        n["layer"] += 1
        return layer(*a, **k)

    def counted_rms(*a, **k):
        n["rms"] += 1
        return rms(*a, **k)
    monkeypatch.setattr(FN, "modulated_layer_norm", counted_layer)
    monkeypatch.setattr(FN, "modulated_rms_norm", counted_rms)
    return n


def _inputs(name: str):
    """Keyword arguments of one forward of the tiny model `name` (tools/hf_coverage.py)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)
    t = torch.tensor([3, 500])
    ones = torch.ones
    if name == "DiTTransformer2DModel":
        return dict(hidden_states=r(2, 4, 8, 8), timestep=t, class_labels=torch.tensor([1, 7]))
    if name == "PixArtTransformer2DModel":
        return dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 16), timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=r(2, 4, 16, 16), encoder_hidden_states=r(2, 5, 32),
                    pooled_projections=r(2, 16), timestep=t)
    if name == "FluxTransformer2DModel":
        return dict(hidden_states=r(2, 16, 8), encoder_hidden_states=r(2, 4, 16),
                    pooled_projections=r(2, 16), timestep=t.float() / 1000,
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=None)
    if name == "WanTransformer3DModel":
        return dict(hidden_states=r(2, 4, 1, 8, 8), timestep=t, encoder_hidden_states=r(2, 5, 16))
    if name == "CogVideoXTransformer3DModel":
        return dict(hidden_states=r(2, 2, 4, 8, 8), encoder_hidden_states=r(2, 8, 16), timestep=t)
    if name == "HunyuanVideoTransformer3DModel/i2v":
        return dict(hidden_states=r(2, 4, 2, 4, 4), timestep=t, encoder_hidden_states=r(2, 5, 16),
                    encoder_attention_mask=ones(2, 5), pooled_projections=r(2, 8),
                    guidance=torch.tensor([3.0, 3.0]) * 1000)
    if name == "LTXVideoTransformer3DModel":
        return dict(hidden_states=r(2, 2 * 4 * 4, 8), encoder_hidden_states=r(2, 5, 16),
                    timestep=t, encoder_attention_mask=ones(2, 5), num_frames=2, height=4,
                    width=4)
    if name == "SanaTransformer2DModel":
        return dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 16), timestep=t)
    if name == "MochiTransformer3DModel":
        return dict(hidden_states=r(2, 4, 2, 8, 8), encoder_hidden_states=r(2, 5, 16),
                    timestep=t, encoder_attention_mask=ones(2, 5))
    if name == "Lumina2Transformer2DModel":
        return dict(hidden_states=r(2, 4, 8, 8), timestep=t.float() / 1000,
                    encoder_hidden_states=r(2, 5, 16),
                    encoder_attention_mask=ones(2, 5, dtype=torch.bool))
    if name == "HunyuanDiT2DModel":
        return dict(hidden_states=r(2, 4, 8, 8), timestep=t.float(),
                    encoder_hidden_states=r(2, 4, 16),
                    text_embedding_mask=ones(2, 4), encoder_hidden_states_t5=r(2, 4, 16),
                    text_embedding_mask_t5=ones(2, 4), image_meta_size=r(2, 6).abs() * 64,
                    style=torch.tensor([0, 0]),
                    image_rotary_emb=_hunyuan_dit_rope())
    if name == "AllegroTransformer3DModel":
        return dict(hidden_states=r(2, 4, 2, 8, 8), encoder_hidden_states=r(2, 5, 16), timestep=t)
    raise KeyError(name)


def _hunyuan_dit_rope():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    return get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))


# model -> (modulated layers swapped, nested ones included; the fastnorm call most of them make)
FAMILIES = {
    "DiTTransformer2DModel": (2, "layer"),
    "PixArtTransformer2DModel": (0, ""),  # AdaLayerNormSingle holds no norm: inline modulation
    "SD3Transformer2DModel": (5, "layer"),  # incl. SD35AdaLayerNormZeroX (dual attention)
    "FluxTransformer2DModel": (4, "layer"),
    "WanTransformer3DModel": (0, ""),  # FP32LayerNorms, modulated inline
    "CogVideoXTransformer3DModel": (3, "layer"),
    "HunyuanVideoTransformer3DModel/i2v": (4, "layer"),  # the token-replace AdaLN-Zero
    "LTXVideoTransformer3DModel": (0, ""),  # RMSNorms modulated inline
    "SanaTransformer2DModel": (1, "layer"),
    "MochiTransformer3DModel": (16, "rms"),  # one MochiModulatedRMSNorm inside a Continuous
    "Lumina2Transformer2DModel": (3, "rms"),
    "HunyuanDiT2DModel": (3, "layer"),
    "AllegroTransformer3DModel": (0, ""),
}


def _perturb(model: nn.Module) -> None:
    """Parameters of the norms and modulated layers away from their initial ones / zeros, so
    that a wrong recipe (eps, chunk order, affine) would show."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if hf_coverage.is_norm_module(m):
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = hf_coverage._diffusers_models()[name]().eval()
    _perturb(model)
    return model


def _run(model, name):
    y = model(**_inputs(name), return_dict=False)[0]
    model.zero_grad(set_to_none=True)
    y.square().mean().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name, fast_path, calls):
    model = _build(name)
    twin = copy.deepcopy(model)
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    norms = [n for n, m in model.named_modules() if hf_coverage.is_norm_module(m)]
    modulated = [n for n, m in model.named_modules() if hf_coverage.is_modulated(m)]

    assert fastnorm.convert(model) is model
    calls.update(layer=0, rms=0)  # the probes' calls apart
    swapped = [n for n, _ in fastnorm.converted_modules(model)]
    assert swapped == norms, sorted(set(norms) ^ set(swapped))
    expect, kind = FAMILIES[name]
    assert len(modulated) == expect
    for n, m in model.named_modules():
        assert isinstance(m, types[n]) and (type(m) is types[n]) == (n not in norms), n
        if n in modulated:
            assert type(m) in DM.originals() and type(m).__name__ == types[n].__name__
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys

    y, g = _run(model, name)
    if expect:
        assert calls[kind] > 0  # the fused path taken (not the ATen spelling only)
    yt, gt = _run(twin, name)
    assert y.dtype == yt.dtype and torch.equal(y, yt), (y - yt).abs().max()
    assert g.keys() == gt.keys()
    for n in g:
        assert (g[n] is None) == (gt[n] is None), n
        assert g[n] is None or torch.equal(g[n], gt[n]), n

    # the op path (fused kernels' reference) instead of ATen's: within rounding
    FN.set_cpu_fast_path(False)
    y2, g2 = _run(model, name)
    assert_close_scaled(y2, yt, F32, factor=10, msg="output")
    assert_grads_close({n: v for n, v in g2.items() if v is not None},
                       {n: v for n, v in gt.items() if v is not None}, F32, factor=10)

    fastnorm.revert(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert fastnorm.converted_modules(model) == []


def test_bfloat16_flux(fast_path, calls):
    """bfloat16 weights and activations: still bit for bit the original on CPU."""
    name = "FluxTransformer2DModel"
    model = _build(name).to(torch.bfloat16)
    twin = copy.deepcopy(model)
    fastnorm.convert(model)
    calls.update(layer=0, rms=0)
    args = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v for k, v in _inputs(name).items()}
    with torch.no_grad():
        y = model(**args, return_dict=False)[0]
        yt = twin(**args, return_dict=False)[0]
    assert calls["layer"] >= 4
    assert y.dtype == torch.bfloat16 and torch.equal(y, yt)


# ----------------------------------------------------------------------------------------------
# recognition
# ----------------------------------------------------------------------------------------------
def _look_alike(base, forward):
    cls = type(base.__name__, (base,), {"forward": forward})
    cls.__module__, cls.__qualname__ = base.__module__, base.__qualname__
    return cls


def _zero_swapped(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    emb = self.linear(self.silu(emb))
    scale_msa, shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _continuous_own_eps(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    x = F.layer_norm(x, (x.shape[-1],), eps=1e-5)
    return x * (1 + scale)[:, None, :] + shift[:, None, :]


def _continuous_no_silu(self, x, conditioning_embedding):
    emb = self.linear(conditioning_embedding.to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


@pytest.mark.parametrize("base, forward, args", [
    (N.AdaLayerNormZero, _zero_swapped, (32,)),
    (N.AdaLayerNormContinuous, _continuous_own_eps, (32, 16, False, 1e-6)),
    (N.AdaLayerNormContinuous, _continuous_no_silu, (32, 16, False, 1e-6)),
], ids=["chunk_order", "eps", "no_silu"])
def test_look_alike_left_alone(base, forward, args):
    """A class of the same module and name whose numerics differ: not swapped."""
    cls = _look_alike(base, forward)
    m = nn.Sequential(cls(*args))
    assert DM._spec(cls) is DM._spec(base)
    v = DM.recognise(m[0])
    assert not v.ok and "differ" in v.reason
    fastnorm.convert(m)
    assert type(m[0]) is cls
    assert DM.recognise(base(*args)).ok  # the real class with the same configuration is


def test_unknown_class_left_alone():
    class AdaLayerNormZero(nn.Module):  # the name, but not diffusers' module
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x)
    m = AdaLayerNormZero()
    fastnorm.convert(m)
    assert type(m) is AdaLayerNormZero and not DM.recognise(m).ok


def test_original_forward_never_called(monkeypatch, fast_path):
    name = "SD3Transformer2DModel"
    model = _build(name)
    twin = copy.deepcopy(model)
    fastnorm.convert(model)
    bases = set(DM.originals().values())
    for base in bases:
        def refuse(*a, **k):
            raise AssertionError("the original forward was called")
        monkeypatch.setattr(base, "forward", refuse)
    with torch.no_grad():
        y = model(**_inputs(name), return_dict=False)[0]
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(y, twin(**_inputs(name), return_dict=False)[0])


# ----------------------------------------------------------------------------------------------
# the inner norm child, hooks, state
# ----------------------------------------------------------------------------------------------
def _ada_zero(calls=None):
    torch.manual_seed(0)
    m = N.AdaLayerNormZero(32)
    _perturb(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g)
    emb = torch.randn(2, 32, generator=g)
    return m, x, emb


def test_inner_norm_converted_or_not(fast_path, calls):
    m, x, emb = _ada_zero()
    with torch.no_grad():
        ref = m(x, emb=emb)
    fastnorm.convert(m)
    calls.update(layer=0, rms=0)
    assert type(m.norm) is not nn.LayerNorm  # converted on its own too
    m.norm.eps = 1e-3  # read at every call
    m.norm.__class__ = nn.LayerNorm  # the child as it was: the parent reads it alike
    with torch.no_grad():
        out = m(x, emb=emb)
        m.norm.eps = 1e-6
        out2 = m(x, emb=emb)
    assert calls["layer"] == 2
    assert not torch.equal(out[0], ref[0])
    assert all(torch.equal(a, b) for a, b in zip(out2, ref))


def test_hooked_inner_norm_is_called(fast_path, calls):
    m, x, emb = _ada_zero()
    with torch.no_grad():
        ref = m(x, emb=emb)
    fastnorm.convert(m)
    calls.update(layer=0, rms=0)
    seen = []
    m.norm.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = m(x, emb=emb)
    assert seen == [x.shape] and calls["layer"] == 0
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_modulation_dtype_promotion(fast_path, calls):
    """A float32 conditioning with a bfloat16 input: the original's float32 result, by ATen."""
    m, x, emb = _ada_zero()
    with torch.no_grad():
        ref = m(x.bfloat16(), emb=emb)
        fastnorm.convert(m)
        calls.update(layer=0, rms=0)
        out = m(x.bfloat16(), emb=emb)
    assert ref[0].dtype == out[0].dtype == F32 and calls["layer"] == 0
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_pickle_in_another_process(tmp_path, fast_path):
    m, x, emb = _ada_zero()
    fastnorm.convert(m)
    with torch.no_grad():
        y = m(x, emb=emb)[0]
    assert pickle.loads(pickle.dumps(m)).__class__ is type(m)
    path = tmp_path / "m.pt"
    torch.save(dict(model=m, x=x, emb=emb, y=y), path)
    code = textwrap.dedent(f"""
        import sys, warnings
        warnings.filterwarnings("ignore")
        sys.path.insert(0, {REPO!r})
        import torch
        import diffusers, fastnorm
        d = torch.load({str(path)!r}, weights_only=False)
        m = d["model"]
        assert type(m).__name__ == "AdaLayerNormZero", type(m)
        assert type(m).__module__ == "fastnorm.diffusers_modulated"
        with torch.no_grad():
            assert torch.equal(m(d["x"], emb=d["emb"])[0], d["y"])
        fastnorm.revert(m)
        assert type(m) is diffusers.models.normalization.AdaLayerNormZero
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "FASTNORM_CPU_FAST_PATH": "1"})
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_coverage_counts_a_modulated_layer_once():
    """tools/hf_coverage.py: a modulated layer is one norm module, its LayerNorm child not apart;
    AdaLayerNormSingle (no norm) is not one."""
    c = hf_coverage.count(_build("DiTTransformer2DModel"))
    assert c.modulated == c.modulated_swapped == 2
    assert c.total == c.swapped == 5 and not c.missed
    pixart = _build("PixArtTransformer2DModel")
    assert not any(hf_coverage.is_modulated(m) for m in pixart.modules())
