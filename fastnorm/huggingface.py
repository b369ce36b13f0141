"""convert() for the norm classes of Hugging Face transformers and diffusers, recognised by probing.

transformers defines ~150 norm classes (one per model, most of them copies of a few templates)
and gains more with every release; they are not listed here by name. A module whose class is
defined in transformers or diffusers (or in Hub remote code: transformers_modules,
diffusers_modules) is recognised in two steps:

1. attributes: no child modules; its tensors 1-D floating ones named weight, bias,
   running_mean, running_var (any may be missing); its other instance attributes plain values
   (numbers, strings, None, dtypes, tuples of those, torch.Size); forward(x), forward(x, gate)
   or forward(x, extra=None) (other parameters with defaults); forward not replaced on the
   instance (accelerate's hooks: a class swap would change nothing).
2. probing: the class's own forward runs on a probe copy of the module (copy.copy with its own
   _parameters / _buffers holding random CPU tensors of the same shapes: the user's module, its
   tensors and device are never touched, meta and CUDA modules are probed alike, no hook runs,
   the RNG state is restored) on small random inputs with rows from 1e-3 to 30 in magnitude (so
   that eps matters), for every (input, weight) dtype pair of float32 / bfloat16 / float16 and
   a float64 one, at three ranks, with a random gate and without one where forward takes one,
   with a second normalised size where no weight fixes it, and in the other training mode. Each
   output is compared bit for bit (dtype, shape, values) with the reference formula of every
   known convention, written as transformers and diffusers spell it; at the float64 probe, the
   conventions whose originals cast to float32 must differ from the exact float64 evaluation of
   their formula by float32 roundings only (an original computing natively, as torch's norms do
   on float64, is another convention: it follows autocast's rules). A module is swapped when
   exactly one recipe (convention, where eps is read, group size, gate activation) matches
   every probe its forward answers. The verdict is cached per class and instance configuration
   (tensor shapes, plain attributes). A wrong swap is worse than a missed one: ambiguity, a
   mismatch or a refusal of the base float32 call leaves the module as it is.

The conventions (CONVENTIONS; docs/huggingface.md has the table with the classes of each):
rms_llama (w * h.to(x.dtype), h = x.float() * rsqrt(mean(x.float()^2) + eps)), rms_wcast
((w * h).to(x.dtype)), rms_offset (Gemma: (h * (1 + w.float())).to(x.dtype)), rms_t5 (w * h
rounded to w's dtype when half), rms_none (no weight), the gated RMSNorms gated_late_d
(Mamba-2's gate before the norm, per group), gated_late (FalconH1's), gated_early_d (Qwen3-Next's
gate after the norm), gated_early (Kimi-Linear's, sigmoid), ln_f32 (LayerNorm of x.float():
OLMo, Cohere, diffusers' FP32LayerNorm), ln_native (torch's layer_norm on x as it is),
ln_fp32_only (LayerNorm spelled out in x's dtype: float32 inputs only), ln2d (channels-first
LayerNorm: ConvNext's data_format="channels_first"), group_norm, frozen_bn (DETR's
FrozenBatchNorm2d). The same classes applied per head (QK-norm) are nothing special.

An adapter class is made per (original class, recipe): a subclass of the original with no new
state, whose forward calls fastnorm.functional (rms_norm with weight_offset / normalized_dtype,
gated_rms_norm, layer_norm, layer_norm2d, group_norm, frozen_batch_norm). Its __name__ is the
original's; its __qualname__ encodes the original's module and qualname and the recipe, and the
module-level __getattr__ rebuilds the adapter from that name (importing the original's module),
so a converted module pickles and unpickles in another process.

An adapter computes with fastnorm only the calls its probes covered: the input's rank, the
(input, weight) dtype pair, the normalised size, with or without a gate; anything else (float64,
a pair the original refused, a rank it raised for, other arguments or tensors of other shapes)
runs the original forward, errors included. Under autocast, the conventions whose originals
cast explicitly run fastnorm with autocast off (autocast changes nothing in those originals);
ln_native, ln2d, group_norm and frozen_bn run the original forward.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as FN

__all__ = ["CONVENTIONS", "recognise", "adapter_for", "originals", "active"]

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
_HALF = (BF16, F16)
_TAKEN = (F32, BF16, F16)  # input dtypes an adapter computes with fastnorm
# the (input, weight) dtype pairs probed; bit i of a recipe's `pairs` is _PAIRS[i]. float32
# first (a layout whose base call the original refuses is not probed further), then the pairs
# that tell the conventions apart (a wrong recipe fails fast).
_PAIRS: Tuple[Tuple[torch.dtype, torch.dtype], ...] = (
    (F32, F32), (BF16, F32), (BF16, BF16), (F32, BF16), (F16, F16), (F16, F32), (F32, F16),
    (BF16, F16), (F16, BF16), (F64, F64))
_PAIR_BIT = {p: 1 << i for i, p in enumerate(_PAIRS)}

ROOTS = ("transformers", "diffusers", "transformers_modules", "diffusers_modules")
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_EPS_CONSTANTS = (1e-5, 1e-6)  # tried for classes without an eps attribute (OLMo: 1e-5)
_GROUP_ATTRS = (("group_size", "a"), ("n_groups", "n"), ("ngroups", "n"))
_SIZE_ATTRS = ("normalized_shape", "dim", "hidden_size", "c_in", "dim_norm")
_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var")


# ----------------------------------------------------------------------------------------------
# reference formulas, spelled as transformers / diffusers spell them
# ----------------------------------------------------------------------------------------------
class _Ref(NamedTuple):
    """What a reference reads: the probe copy `m` (its tensors), eps, the group size, the gate's
    activation name, and the dtype the original computes in (`cd`: float32; float64 for the
    float64 probe's exact evaluation, see _probe_layout)."""
    m: nn.Module
    eps: float
    gs: Optional[int]
    act: str
    cd: torch.dtype = F32


def _w(m):
    return getattr(m, "weight", None)


def _b(m):
    return getattr(m, "bias", None)


def _act(name: str) -> Callable[[Tensor], Tensor]:
    return F.silu if name == "silu" else torch.sigmoid


def _hf_rms(h: Tensor, eps: float) -> Tensor:
    """h * rsqrt(mean(h^2) + eps) over the last dim (HF's spelling), h already cast."""
    variance = h.pow(2).mean(-1, keepdim=True)
    return h * torch.rsqrt(variance + eps)


def _ref_rms_llama(r: _Ref, x, gate):
    # LlamaRMSNorm and its ~140 copies: the normalised value rounded to x's dtype, then weighted
    return _w(r.m) * _hf_rms(x.to(r.cd), r.eps).to(x.dtype)


def _ref_rms_wcast(r: _Ref, x, gate):
    # Cohere2 / NemotronH / Helium / Moshi / Gemma3n (torch.pow(ms, -0.5): ATen's rsqrt) / OLMo-2
    return (_w(r.m) * _hf_rms(x.to(r.cd), r.eps)).to(x.dtype)


def _ref_rms_offset(r: _Ref, x, gate):
    # GemmaRMSNorm and its copies: the weight is 1 + w, in float32
    return (_hf_rms(x.to(r.cd), r.eps) * (1.0 + _w(r.m).to(r.cd))).type_as(x)


def _ref_rms_t5(r: _Ref, x, gate):
    # T5LayerNorm, diffusers RMSNorm: rounded to the weight's dtype when it is half
    w = _w(r.m)
    h = _hf_rms(x.to(r.cd), r.eps)
    if w.dtype in _HALF:
        h = h.to(w.dtype)
    return w * h


def _ref_rms_none(r: _Ref, x, gate):
    return _hf_rms(x.to(r.cd), r.eps).type_as(x)


def _grouped_rms(h: Tensor, eps: float, gs: Optional[int]) -> Tensor:
    if gs is None:
        return _hf_rms(h, eps)
    *pre, last = h.shape
    g = h.view(*pre, last // gs, gs)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.view(*pre, last)


def _ref_gated_late_d(r: _Ref, x, gate):
    # Mamba2RMSNormGated and its copies: x * act(gate), normalised per group, rounded, weighted
    dt = x.dtype
    h = x.to(r.cd)
    if gate is not None:
        h = h * _act(r.act)(gate.to(r.cd))
    return _w(r.m) * _grouped_rms(h, r.eps, r.gs).to(dt)


def _ref_gated_late(r: _Ref, x, gate):
    # FalconH1RMSNormGated(norm_before_gate=False): weighted, then rounded
    dt = x.dtype
    h = x.to(r.cd)
    if gate is not None:
        h = h * _act(r.act)(gate.to(r.cd))
    return (_w(r.m) * _grouped_rms(h, r.eps, r.gs)).to(dt)


def _ref_gated_early_d(r: _Ref, x, gate):
    # Qwen3NextRMSNormGated and its copies: norm rounded and weighted, then the gate
    dt = x.dtype
    h = _w(r.m) * _grouped_rms(x.to(r.cd), r.eps, r.gs).to(dt)
    h = h * _act(r.act)(gate.to(r.cd))
    return h.to(dt)


def _ref_gated_early(r: _Ref, x, gate):
    # KimiLinear / Bailing / Glm5Next RMSNormGated, FalconH1RMSNormGated(norm_before_gate=True)
    dt = x.dtype
    h = _w(r.m) * _grouped_rms(x.to(r.cd), r.eps, r.gs)
    h = h * _act(r.act)(gate.to(r.cd))
    return h.to(dt)


def _ref_ln_f32_torch(r: _Ref, x, gate):
    # diffusers FP32LayerNorm, OLMo's LayerNorm
    w, b = _w(r.m), _b(r.m)
    return F.layer_norm(x.to(r.cd), (x.shape[-1],), None if w is None else w.to(r.cd),
                        None if b is None else b.to(r.cd), r.eps).to(x.dtype)


def _manual_ln(h: Tensor, w, b, eps: float, var: bool) -> Tensor:
    mean = h.mean(-1, keepdim=True)
    if var:
        variance = h.var(-1, unbiased=False, keepdim=True)
    else:
        variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    if w is not None:
        h = w * h
    if b is not None:
        h = h + b
    return h


def _ref_ln_f32_cohere(r: _Ref, x, gate):
    # CohereLayerNorm and its copies: mean and variance spelled out, in float32
    w, b = _w(r.m), _b(r.m)
    return _manual_ln(x.to(r.cd), None if w is None else w.to(r.cd),
                      None if b is None else b.to(r.cd), r.eps, False).to(x.dtype)


def _ref_ln_native(r: _Ref, x, gate):
    return F.layer_norm(x, (x.shape[-1],), _w(r.m), _b(r.m), r.eps)


def _ref_ln_manual_var(r: _Ref, x, gate):
    # GradiumPhononTTSFlowLayerNorm: spelled out in the input's dtype
    return _manual_ln(x, _w(r.m), _b(r.m), r.eps, True)


def _ref_ln_manual_pow(r: _Ref, x, gate):
    return _manual_ln(x, _w(r.m), _b(r.m), r.eps, False)


def _ref_ln2d(r: _Ref, x, gate):
    # ConvNextLayerNorm(data_format="channels_first") and its copies, SqueezeBertLayerNorm
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), _w(r.m), _b(r.m), r.eps)
    return y.movedim(-1, 1)


def _ref_group_norm(r: _Ref, x, gate):
    return F.group_norm(x, r.m.num_groups, _w(r.m), _b(r.m), r.eps)


def _ref_frozen_bn(r: _Ref, x, gate):
    # DetrFrozenBatchNorm2d and its copies (torchvision's formula)
    m = r.m
    weight = m.weight.reshape(1, -1, 1, 1)
    bias = m.bias.reshape(1, -1, 1, 1)
    running_var = m.running_var.reshape(1, -1, 1, 1)
    running_mean = m.running_mean.reshape(1, -1, 1, 1)
    scale = weight * (running_var + r.eps).rsqrt()
    bias = bias - running_mean * scale
    return x * scale + bias


# ----------------------------------------------------------------------------------------------
# fastnorm's computation of each convention
# ----------------------------------------------------------------------------------------------
def _f32_param(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A parameter the original uses in float32 (or as it is when of x's dtype): cast to float32
    when its dtype is neither (exact; the gradient comes back in its dtype)."""
    return t if t is None or t.dtype == x.dtype or t.dtype == F32 else t.float()


def _run_rms_llama(m, x, gate, eps, gs, act):
    w = m.weight
    return FN.rms_norm(x, [x.shape[-1]], w, eps, normalized_dtype=x.dtype)


def _run_rms_wcast(m, x, gate, eps, gs, act):
    return FN.rms_norm(x, [x.shape[-1]], _f32_param(m.weight, x), eps)


def _run_rms_offset(m, x, gate, eps, gs, act):
    return FN.rms_norm(x, [x.shape[-1]], m.weight, eps, weight_offset=1.0)


def _run_rms_t5(m, x, gate, eps, gs, act):
    w = m.weight
    return FN.rms_norm(x, [x.shape[-1]], w, eps,
                       normalized_dtype=w.dtype if w.dtype in _HALF else F32)


def _run_rms_none(m, x, gate, eps, gs, act):
    return FN.rms_norm(x, [x.shape[-1]], None, eps)


def _gated(norm_before_gate: bool, d: bool):
    def run(m, x, gate, eps, gs, act):
        return FN.gated_rms_norm(x, gate, m.weight, eps, group_size=gs,
                                 norm_before_gate=norm_before_gate, activation=act,
                                 normalized_dtype=x.dtype if d else None)
    return run


def _run_ln(m, x, gate, eps, gs, act):
    return FN.layer_norm(x, [x.shape[-1]], _f32_param(_w(m), x), _f32_param(_b(m), x), eps)


def _run_ln_native(m, x, gate, eps, gs, act):
    return FN.layer_norm(x, [x.shape[-1]], _w(m), _b(m), eps)


def _run_ln2d(m, x, gate, eps, gs, act):
    y = FN.layer_norm2d(x, _w(m), _b(m), eps)
    # the original's permutes give a channels-last-strided output whatever the input's layout;
    # the layers after it (a convolution) pick their algorithm by it: the same strides here
    yl = y.movedim(1, -1)
    return y if yl.is_contiguous() else yl.contiguous().movedim(-1, 1)


def _run_group_norm(m, x, gate, eps, gs, act):
    return FN.group_norm(x, m.num_groups, _w(m), _b(m), eps)


def _run_frozen_bn(m, x, gate, eps, gs, act):
    return FN.frozen_batch_norm(x, m.weight, m.bias, m.running_mean, m.running_var, eps)


class Convention(NamedTuple):
    """A normalisation convention: its reference spellings, its fastnorm computation, and what
    it reads and takes.

    layout: "last" (normalised over the last dim) or "first" (over dim 1 of (N, C, *));
    weight: "yes" (a 1-D weight of the normalised size), "no" (none read), "any" (read when
    present, as torch's layer_norm); reads: the other tensors it reads (bias optional);
    gated: takes a gate (second argument); gate_optional: calls without a gate are computed too;
    grouped: normalised in groups (a group-size attribute); f32: the original computes in
    float32 explicitly: at the float64 probe it must differ from the exact (float64) evaluation
    of its formula by float32 roundings only, where the other conventions must match bit for
    bit; autocast_off: the original is autocast-invariant (casts explicitly), fastnorm runs
    with autocast off - else calls under autocast go to the original forward; takes: the input
    dtypes fastnorm computes it for; weight_of_x: only weights of the input's dtype or float32
    (others round intermediate values fastnorm keeps in float32: the difference would exceed
    the output's precision); ranks: the input ranks for which its fastnorm computation is the
    reference's; needs_attr: a plain int attribute it reads; doc: one line."""
    refs: Tuple[Callable, ...]
    run: Callable
    layout: str = "last"
    weight: str = "yes"
    reads: Tuple[str, ...] = ()
    gated: bool = False
    gate_optional: bool = False
    grouped: bool = False
    f32: bool = True
    autocast_off: bool = True
    takes: Tuple[torch.dtype, ...] = _TAKEN
    weight_of_x: bool = False
    ranks: Tuple[int, ...] = (2, 3, 4, 5)
    needs_attr: str = ""
    doc: str = ""


CONVENTIONS: Dict[str, Convention] = {
    "rms_llama": Convention((_ref_rms_llama,), _run_rms_llama,
                            doc="w * h.to(x.dtype) (Llama)"),
    "rms_wcast": Convention((_ref_rms_wcast,), _run_rms_wcast,
                            doc="(w * h).to(x.dtype) (Cohere2, NemotronH, Gemma3n)"),
    "rms_offset": Convention((_ref_rms_offset,), _run_rms_offset,
                             doc="(h * (1 + w.float())).to(x.dtype) (Gemma)"),
    "rms_t5": Convention((_ref_rms_t5,), _run_rms_t5,
                         doc="w * h.to(w.dtype) for a half weight, else w * h (T5, diffusers)"),
    "rms_none": Convention((_ref_rms_none,), _run_rms_none, weight="no",
                           doc="h.to(x.dtype) (weightless RMSNorm)"),
    "gated_late_d": Convention((_ref_gated_late_d,), _gated(False, True), gated=True,
                               gate_optional=True, grouped=True,
                               doc="w * rms(x * act(gate)).to(x.dtype) per group (Mamba2)"),
    "gated_late": Convention((_ref_gated_late,), _gated(False, False),
                             gated=True, gate_optional=True, grouped=True,
                             doc="(w * rms(x * act(gate))).to(x.dtype) per group (FalconH1)"),
    "gated_early_d": Convention((_ref_gated_early_d,), _gated(True, True), gated=True,
                                grouped=True,
                                doc="((w * h.to(x.dtype)) * act(gate)).to(x.dtype) (Qwen3-Next)"),
    "gated_early": Convention((_ref_gated_early,), _gated(True, False),
                              gated=True, grouped=True,
                              doc="((w * h) * act(gate)).to(x.dtype) (Kimi-Linear, FalconH1)"),
    "ln_f32": Convention((_ref_ln_f32_torch, _ref_ln_f32_cohere), _run_ln, weight="any",
                         reads=("bias",),
                         doc="LayerNorm of x.float(), rounded to x.dtype (Cohere, OLMo, "
                             "FP32LayerNorm)"),
    "ln_native": Convention((_ref_ln_native,), _run_ln_native, weight="any", reads=("bias",),
                            autocast_off=False, f32=False,
                            doc="torch's layer_norm on x as it is (ConvNext channels_last)"),
    "ln_fp32_only": Convention((_ref_ln_manual_var, _ref_ln_manual_pow), _run_ln, weight="any",
                               reads=("bias",), takes=(F32,), f32=False,
                               doc="LayerNorm spelled out in x's dtype: float32 inputs only"),
    "ln2d": Convention((_ref_ln2d,), _run_ln2d, layout="first", weight="any", reads=("bias",),
                       autocast_off=False, f32=False,
                       doc="layer_norm over dim 1 of (N, C, *) (ConvNext channels_first)"),
    "group_norm": Convention((_ref_group_norm,), _run_group_norm, layout="first", weight="any",
                             reads=("bias",), autocast_off=False, f32=False,
                             needs_attr="num_groups",
                             doc="torch's group_norm with the module's num_groups"),
    "frozen_bn": Convention((_ref_frozen_bn,), _run_frozen_bn, layout="first",
                            reads=("bias", "running_mean", "running_var"), autocast_off=False,
                            f32=False, ranks=(4,), weight_of_x=True,
                            doc="torchvision's FrozenBatchNorm2d formula (DETR family)"),
}


# ----------------------------------------------------------------------------------------------
# recipes and their names
# ----------------------------------------------------------------------------------------------
class Recipe(NamedTuple):
    """A recognised class's computation and the calls its probes covered.
    conv: CONVENTIONS key; eps: "a:<attribute>" or "c:<constant>"; group: "" (the whole
    normalised dim), "a:<attribute>" (the group size) or "n:<attribute>" (the number of groups);
    act: the gate's activation ("" without a gate); ranks: the input ranks, as digits; pairs:
    bit mask over _PAIRS of the (input, weight) dtype pairs; gate: "" (no gate argument), "g"
    (a gate required), "n" (only calls without a gate), "gn" (both); size: "" (the weight's or
    any) or "a:<attribute>" (the normalised size the attribute gives)."""
    conv: str
    eps: str
    group: str = ""
    act: str = ""
    ranks: str = "3"
    pairs: int = 0
    gate: str = ""
    size: str = ""

    def code(self) -> str:
        return "~".join((self.conv, self.eps, self.group, self.act, self.ranks,
                         format(self.pairs, "x"), self.gate, self.size))

    @classmethod
    def parse(cls, code: str) -> "Recipe":
        conv, eps, group, act, ranks, pairs, gate, size = code.split("~")
        return cls(conv, eps, group, act, ranks, int(pairs, 16), gate, size)


def _escape(s: str) -> str:
    """A reversible spelling of s in [A-Za-z0-9_] without "__" (so "__" separates fields)."""
    out = []
    for ch in s:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        else:
            out.append({"_": "_u", ".": "_d", "~": "_t", ":": "_c", "-": "_m", "+": "_p"}.get(
                ch, f"_x{ord(ch):x}x"))
    return "".join(out)


def _unescape(s: str) -> str:
    table = {"u": "_", "d": ".", "t": "~", "c": ":", "m": "-", "p": "+"}
    return re.sub(r"_(?:x([0-9a-f]+)x|([udtcmp]))",
                  lambda mo: chr(int(mo.group(1), 16)) if mo.group(1) else table[mo.group(2)], s)


_PREFIX = "HF__"


def adapter_name(base: type, recipe: Recipe) -> str:
    """The adapter's __qualname__ (and attribute of this module): the original's module and
    qualname and the recipe, each escaped."""
    return "__".join((_PREFIX[:-2], _escape(base.__module__), _escape(base.__qualname__),
                      _escape(recipe.code())))


def _parse_name(name: str) -> Tuple[str, str, Recipe]:
    head, mod, qual, code = name.split("__")
    if head != _PREFIX[:-2]:
        raise ValueError(name)
    return _unescape(mod), _unescape(qual), Recipe.parse(_unescape(code))


# ----------------------------------------------------------------------------------------------
# the adapters
# ----------------------------------------------------------------------------------------------
def _attr_reader(spec: str) -> Callable[[nn.Module], object]:
    kind, _, attr = spec.partition(":")
    if kind == "c":
        value = float(attr)
        return lambda m: value
    return lambda m: getattr(m, attr)


def _size_of(value) -> Optional[int]:
    """The normalised size an attribute gives (an int, or the last of a shape)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list, torch.Size)) and value and isinstance(value[-1], int):
        return int(value[-1])
    return None


def _forward_params(cls: type) -> Optional[Tuple[str, Optional[str], bool]]:
    """(name of x, name of the second parameter or None, whether that one has a default) of
    cls.forward, when it takes x and at most one more positional parameter without a default
    (any others with defaults, or keyword-only with defaults); None otherwise."""
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]  # self
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not pos or pos[0].default is not inspect.Parameter.empty:
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    if any(p.default is p.empty for p in pos[2:]):
        return None
    if any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    second = pos[1] if len(pos) > 1 else None
    return (pos[0].name, None if second is None else second.name,
            second is not None and second.default is not second.empty)


_UNSET = object()


def _make_adapter(base: type, recipe: Recipe) -> Optional[type]:
    conv = CONVENTIONS.get(recipe.conv)
    fparams = _forward_params(base)
    if conv is None or fparams is None:
        return None
    x_name, g_name, _ = fparams
    eps_of = _attr_reader(recipe.eps)
    group_kind, _, group_attr = recipe.group.partition(":")
    size_attr = recipe.size[2:] if recipe.size.startswith("a:") else None
    ranks = frozenset(int(c) for c in recipe.ranks)
    pairs = frozenset(p for p, bit in _PAIR_BIT.items() if recipe.pairs & bit)
    gate_ok = "g" in recipe.gate
    no_gate_ok = "n" in recipe.gate or recipe.gate == ""
    weight_kind = conv.weight
    with_bias = "bias" in conv.reads
    stats = tuple(r for r in conv.reads if r != "bias")
    dim = 1 if conv.layout == "first" else -1
    run, act, takes, autocast_off = conv.run, recipe.act, conv.takes, conv.autocast_off
    original_forward = base.forward

    def fits(m, x, gate) -> bool:
        """A call fastnorm computes as the probes verified; anything else goes to the original."""
        if not isinstance(x, Tensor) or x.dtype not in takes or x.dim() not in ranks:
            return False
        xd, n = x.dtype, x.shape[dim]
        wd = xd
        if weight_kind != "no":
            w = getattr(m, "weight", None)
            if w is None:
                if weight_kind == "yes":
                    return False
            elif (not isinstance(w, Tensor) or w.shape != (n,) or w.device != x.device):
                return False
            else:
                wd = w.dtype
            for name in (("bias",) if with_bias else ()) + stats:
                t = getattr(m, name, None)
                if t is None and name == "bias":
                    continue
                if (not isinstance(t, Tensor) or t.shape != (n,) or t.dtype != wd
                        or t.device != x.device):
                    return False
        if (xd, wd) not in pairs:
            return False
        if size_attr is not None and _size_of(getattr(m, size_attr, None)) != n:
            return False
        if gate is None:
            if not no_gate_ok:
                return False
        elif (not gate_ok or not isinstance(gate, Tensor) or gate.shape != x.shape
              or gate.dtype != xd or gate.device != x.device):
            return False
        return autocast_off or not torch.is_autocast_enabled(x.device.type)

    def compute(m, x, gate):
        gs = None
        if group_kind:
            g = getattr(m, group_attr, None)
            if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
                return _UNSET
            gs = g if group_kind == "a" else x.shape[-1] // g
            if gs <= 0 or x.shape[-1] % gs or (group_kind == "n" and x.shape[-1] % g):
                return _UNSET
        eps = eps_of(m)
        if isinstance(eps, bool) or not isinstance(eps, (float, int)):
            return _UNSET
        if torch.is_autocast_enabled(x.device.type):  # autocast_off conventions only
            with torch.autocast(x.device.type, enabled=False):
                return run(m, x, gate, eps, gs, act)
        return run(m, x, gate, eps, gs, act)

    gated = conv.gated

    class Adapter(base):
        __doc__ = (f"{base.__qualname__} ({base.__module__}) on fastnorm.functional, converted by "
                   f"fastnorm.convert(): recognised by probing as {recipe.conv!r} "
                   f"({conv.doc}); fastnorm.huggingface says how.\n\n{base.__doc__ or ''}")

        def forward(self, *args, **kwargs):
            # the original's arguments: x, and the gate (or an unused second argument)
            x, gate = _bind(args, kwargs, x_name, g_name)
            if x is not _UNSET and (gated or gate is None) and fits(self, x, gate):
                y = compute(self, x, gate)
                if y is not _UNSET:
                    return y
            return original_forward(self, *args, **kwargs)

    Adapter.__name__ = base.__name__
    Adapter.__qualname__ = adapter_name(base, recipe)
    Adapter.__module__ = __name__
    Adapter._fastnorm_recipe = recipe  # read by tools and tests; not instance state
    return Adapter


def _bind(args, kwargs, x_name: str, g_name: Optional[str]):
    """(x, gate) of a call forward(x), forward(x, gate) (either by keyword); (_UNSET, None)
    for any other call."""
    n = len(args)
    if n > 2 or (n == 0 and x_name not in kwargs):
        return _UNSET, None
    if not kwargs:
        return args[0], (args[1] if n == 2 else None)
    rest = dict(kwargs)
    x = args[0] if n else rest.pop(x_name)
    if n == 2:
        gate = args[1]
    else:
        gate = rest.pop(g_name, None) if g_name is not None else None
    if rest or (n and x_name in kwargs):
        return _UNSET, None
    return x, gate


_adapters: Dict[Tuple[type, Recipe], type] = {}


def _adapter(base: type, recipe: Recipe) -> Optional[type]:
    key = (base, recipe)
    if key not in _adapters:
        adapter = _make_adapter(base, recipe)
        if adapter is None:
            return None
        _adapters[key] = adapter
        globals()[adapter.__qualname__] = adapter
    return _adapters[key]


def originals() -> Dict[type, type]:
    """{adapter: original class} of every adapter made so far."""
    return {a: base for (base, _), a in _adapters.items()}


def active() -> bool:
    """Whether transformers or diffusers (or Hub remote code) has been imported: only then can a
    model hold one of their classes."""
    return any(sys.modules.get(r) is not None for r in ROOTS)


def __getattr__(name: str):
    # pickle finds an adapter made in another process by its name: rebuild it from the name
    if name.startswith(_PREFIX):
        try:
            mod, qual, recipe = _parse_name(name)
        except ValueError:
            raise AttributeError(name) from None
        if mod.split(".")[0] in ROOTS:
            base = importlib.import_module(mod)
            for part in qual.split("."):
                base = getattr(base, part)
            if isinstance(base, type) and issubclass(base, nn.Module):
                adapter = _adapter(base, recipe)
                if adapter is not None:
                    return adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# recognition
# ----------------------------------------------------------------------------------------------
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.Size)


def _plain(v) -> bool:
    if isinstance(v, _PLAIN):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(e, _PLAIN) for e in v)


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


# nn.Module's own instance attributes (hooks, tensors, children): the probe copy replaces the
# tensor tables and calls no hook
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_parameters", "_buffers", "_modules"}
_candidate_cls: Dict[type, bool] = {}


def _class_candidate(cls: type) -> bool:
    ok = _candidate_cls.get(cls)
    if ok is None:
        ok = (cls.__module__.split(".")[0] in ROOTS and issubclass(cls, nn.Module)
              and _forward_params(cls) is not None)
        _candidate_cls[cls] = ok
    return ok


def _signature(module: nn.Module):
    """The cache key of a module's verdict: its class, tensors (name, shape, kind) and plain
    attributes; None when it is not a candidate (child modules, other tensors, attributes that
    are not plain values, forward replaced on the instance)."""
    cls = type(module)
    if not _class_candidate(cls) or module._modules:
        return None
    tensors = []
    for kind, table in (("p", module._parameters), ("b", module._buffers)):
        for name, t in table.items():
            if name not in _TENSOR_NAMES:
                return None
            if t is None:
                tensors.append((name, kind, None))
            elif t.dim() != 1 or not t.is_floating_point():
                return None
            else:
                tensors.append((name, kind, t.shape[0]))
    attrs = []
    for name, v in module.__dict__.items():
        if name in _MODULE_INTERNALS or name == "training":
            continue
        if name.startswith("_"):
            if not isinstance(v, (bool, int, float, str, type(None))):
                return None  # private state the probe copy would share
            continue
        if name == "forward":
            return None  # replaced on the instance (accelerate's hooks): a class swap does nothing
        if isinstance(v, Tensor):
            return None
        if not _plain(v):
            return None
        attrs.append((name, _freeze(v)))
    return (cls, tuple(sorted(tensors, key=str)), tuple(sorted(attrs, key=lambda a: a[0])))


class _Probe(NamedTuple):
    rank: int
    pair: Tuple[torch.dtype, torch.dtype]
    gate: bool
    size: int


def _probe_copy(module: nn.Module, wdt: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A shallow copy of module whose tensors are random CPU tensors of the same shapes: the
    weight-like ones (weight, running_var) near 1, the others near 0; `wdt` their dtype."""
    p = copy.copy(module)
    p._parameters = {}
    p._buffers = {}
    for name, v in module.__dict__.items():
        if isinstance(v, list):
            p.__dict__[name] = list(v)  # the copy's own (a forward might append)
    for table, dst in ((module._parameters, p._parameters), (module._buffers, p._buffers)):
        for name, t in table.items():
            if t is None:
                dst[name] = None
                continue
            r = torch.randn(t.shape, generator=gen)
            if name == "running_var":
                r = r.abs() + 0.5
            elif name == "weight":
                r = r * 0.5 + 1.0
            else:
                r = r * 0.3
            dst[name] = r.to(wdt)
    return p


def _probe_input(shape, dtype, dim: int, gen: torch.Generator) -> Tensor:
    """Random rows (along `dim`) of magnitudes 2, 0.5, 1e-3 (where eps matters) and 30, with a
    mean away from zero."""
    x = torch.randn(shape, generator=gen)
    n_rows = x.numel() // x.shape[dim]
    scales = torch.tensor([2.0, 0.5, 1e-3, 30.0]).repeat(n_rows // 4 + 1)[:n_rows]
    xm = x.movedim(dim, -1)
    xm = xm * scales.view(*xm.shape[:-1], 1) + 0.3 * scales.view(*xm.shape[:-1], 1)
    return xm.movedim(-1, dim).contiguous().to(dtype)


def _same(a, b) -> bool:
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and torch.equal(a, b))


def _rounded_f32(y, exact) -> bool:
    """y is `exact` (a float64 evaluation) but for float32 roundings: the same dtype and shape,
    within float32's precision, and not bit for bit (an original computing in float64, as
    torch's norms on a float64 input do, is not one that casts to float32)."""
    if not (isinstance(y, Tensor) and isinstance(exact, Tensor) and y.dtype == exact.dtype
            and y.shape == exact.shape) or torch.equal(y, exact):
        return False
    scale = max(1.0, float(exact.abs().max())) if exact.numel() else 1.0
    return bool(torch.allclose(y, exact, rtol=1e-5, atol=1e-5 * scale))


class Verdict(NamedTuple):
    recipe: Optional[Recipe]
    reason: str  # why not, or which


def _eps_specs(module: nn.Module) -> List[str]:
    """Where eps is read: the first of _EPS_ATTRS the module has (a float), else constants."""
    for a in _EPS_ATTRS:
        v = module.__dict__.get(a)
        if isinstance(v, float) and v >= 0:
            return [f"a:{a}"]
    return [f"c:{c!r}" for c in _EPS_CONSTANTS]


def _group_specs(module: nn.Module, size: int) -> List[Tuple[str, Optional[int]]]:
    found = []
    for a, kind in _GROUP_ATTRS:
        v = module.__dict__.get(a)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            gs = v if kind == "a" else (size // v if size % v == 0 else None)
            if gs is not None and size % gs == 0:
                found.append((f"{kind}:{a}", gs))
    return found or [("", None)]


def _size_source(module: nn.Module) -> Tuple[Optional[int], str]:
    """The normalised size of a module without a weight: (size, "a:<attribute>") from its
    attributes, or (None, "")."""
    for a in _SIZE_ATTRS:
        n = _size_of(module.__dict__.get(a))
        if n is not None and n > 0:
            return n, f"a:{a}"
    return None, ""


_verdicts: Dict[object, Verdict] = {}


def recognise(module: nn.Module) -> Verdict:
    """The verdict on a module: Verdict(recipe, reason), recipe None when it is not swapped.
    Probes run once per class and instance configuration (cached)."""
    key = _signature(module)
    if key is None:
        return Verdict(None, "not a candidate (class, child modules, tensors or attributes)")
    v = _verdicts.get(key)
    if v is None:
        if (torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling()
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return Verdict(None, "not probed under a dispatch mode, torch.compile or torch.func")
        v = _probe_module(module)
        _verdicts[key] = v
    return v


def adapter_for(module: nn.Module) -> Optional[type]:
    """The adapter class convert() gives `module` (None: left as it is)."""
    if not _class_candidate(type(module)):
        return None
    v = recognise(module)
    return None if v.recipe is None else _adapter(type(module), v.recipe)


class _Candidate(NamedTuple):
    conv: str
    ref: Callable
    eps_spec: str
    eps: float
    group: str
    gs: Optional[int]
    act: str


def _candidates(module: nn.Module, g_name: Optional[str], weight: Optional[Tensor],
                tensors: Dict[str, Optional[Tensor]], size: int) -> List[_Candidate]:
    """Every (convention, spelling, eps source, group, activation) the module's attributes
    allow."""
    out: List[_Candidate] = []
    eps_specs = _eps_specs(module)
    for name, conv in CONVENTIONS.items():
        if conv.gated and g_name is None:
            continue
        if conv.needs_attr and not isinstance(module.__dict__.get(conv.needs_attr), int):
            continue
        if conv.weight == "yes" and weight is None:
            continue
        if any(tensors.get(r) is None for r in conv.reads if r != "bias"):
            continue
        groups = _group_specs(module, size) if conv.grouped else [("", None)]
        acts = ("silu", "sigmoid") if conv.gated else ("",)
        for eps_spec in eps_specs:
            eps = float(_attr_reader(eps_spec)(module))
            for group, gs in groups:
                for act in acts:
                    for ref in conv.refs:
                        out.append(_Candidate(name, ref, eps_spec, eps, group, gs, act))
    return out


def _probe_module(module: nn.Module) -> Verdict:
    cls = type(module)
    x_name, g_name, g_default = _forward_params(cls)
    tensors = {**module._parameters, **module._buffers}
    weight = tensors.get("weight")
    found_size, size_attr = _size_source(module)
    size = weight.shape[0] if weight is not None else (found_size or 16)
    cands = _candidates(module, g_name, weight, tensors, size)
    if not cands:
        return Verdict(None, "no convention fits its tensors and forward")
    if size == 0:
        return Verdict(None, "an empty normalised size")

    # without the optional second argument first: the base call is the plain one
    gate_modes = ([False, True] if g_default else [True]) if g_name is not None else [False]
    gen = torch.Generator().manual_seed(20240611)
    cov = [dict(pairs=set(), ranks=set(), gate=set(), any_size=False, base=0) for _ in cands]
    alive = set(range(len(cands)))
    threads = torch.get_num_threads()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings(), \
            torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore")
        # the probes are tiny: one thread is ~20x faster than a pool (on a busy machine)
        torch.set_num_threads(1)
        try:
            _run_probes(cls, module, cands, cov, alive, gate_modes, weight, size, gen)
        finally:
            torch.set_num_threads(threads)

    # the base float32 call answered, and fastnorm computes it
    matched = [i for i in sorted(alive) if (F32, F32) in cov[i]["pairs"]]
    # a gated recipe verified on calls with a gate explains more than a plain one
    if any("g" in cov[i]["gate"] for i in matched):
        matched = [i for i in matched if "g" in cov[i]["gate"]]
    recipes: Dict[Recipe, List[int]] = {}
    for i in matched:
        c = cands[i]
        conv = CONVENTIONS[c.conv]
        ranks = "".join(str(r) for r in sorted(cov[i]["ranks"] | {cov[i]["base"]}))
        pairs = 0
        for p in cov[i]["pairs"]:
            pairs |= _PAIR_BIT[p]
        gate = "" if g_name is None else "".join(
            k for k in "gn" if k in cov[i]["gate"] and (k == "n" or conv.gated))
        size_spec = ""
        if weight is None and not cov[i]["any_size"]:
            if not size_attr:
                continue  # a fixed normalised size, and no attribute says which
            size_spec = size_attr
        r = Recipe(c.conv, c.eps_spec, c.group, c.act, ranks, pairs, gate, size_spec)
        recipes.setdefault(r, []).append(i)
    if not recipes:
        return Verdict(None, "no convention matches its outputs bit for bit")
    if len(recipes) > 1:
        names = sorted({r.conv + ("/" + r.act if r.act else "") for r in recipes})
        return Verdict(None, f"ambiguous: {len(recipes)} recipes match ({', '.join(names)})")
    (recipe,) = recipes
    return Verdict(recipe, f"{recipe.conv}: {CONVENTIONS[recipe.conv].doc}")


def _run_probes(cls, module, cands, cov, alive, gate_modes, weight, size, gen) -> None:
    """Run the probe calls on the original forward and each candidate's reference: a candidate
    that differs on any call the original answers leaves `alive`; `cov` records the calls each
    one matched (dtype pairs at the base rank, other ranks, gate or not, another size)."""
    for layout in ("last", "first"):
        idx = [i for i in sorted(alive) if CONVENTIONS[cands[i].conv].layout == layout]
        # the base rank: (B, S, H) for the last dim; (N, C, H, W), else (N, C, L), for dim 1
        for base_rank in ((3,) if layout == "last" else (4, 3)):
            if not alive.intersection(idx):
                break
            if _probe_layout(cls, module, cands, cov, alive, idx, layout, base_rank,
                             gate_modes, weight, size, gen):
                break


def _probe_layout(cls, module, cands, cov, alive, idx, layout, base_rank, gate_modes, weight,
                  size, gen) -> bool:
    """The probes of one layout around one base rank; False when the original refuses every
    base float32 call (then nothing was learnt)."""
    probes = [_Probe(base_rank, pair, gate, size) for gate in gate_modes for pair in _PAIRS]
    others = (2, 4) if layout == "last" else tuple(r for r in (3, 4, 5) if r != base_rank)
    probes += [_Probe(rank, (F32, F32), gate, size) for gate in gate_modes for rank in others]
    if weight is None:
        probes += [_Probe(base_rank, (F32, F32), gate, size + 8) for gate in gate_modes]
    refused = set()  # gate modes whose base float32 call the original refuses
    checked_mode = False
    for probe in probes:
        if not alive.intersection(idx):
            break
        if probe.gate in refused:
            continue
        out = _run_probe(cls, module, probe, layout, gen)
        if out is None:
            if probe.rank == base_rank and probe.pair == (F32, F32) and probe.size == size:
                refused.add(probe.gate)  # nothing more to learn from these calls
            continue  # the original raised: a call the adapter leaves to it
        x, gate, pm, y = out
        if not checked_mode:
            checked_mode = True
            if not _mode_independent(cls, pm, x, gate, y):
                alive.difference_update(idx)  # training / eval (or random draws) change it
                return True
        for i in idx:
            if i not in alive:
                continue
            c = cands[i]
            conv = CONVENTIONS[c.conv]
            if probe.gate != conv.gated and not (conv.gate_optional and not probe.gate):
                continue  # a call this convention does not take: the original's
            if probe.rank not in conv.ranks:
                continue  # a rank its fastnorm computation does not answer alike
            exact = probe.pair[0] == F64 and conv.f32
            try:
                r = c.ref(_Ref(pm, c.eps, c.gs, c.act, F64 if exact else F32), x, gate)
            except Exception:  # noqa: BLE001
                r = None
            if not (_rounded_f32(y, r) if exact else _same(y, r)):
                alive.discard(i)
                continue
            cov[i]["base"] = base_rank
            if probe.size != size:
                cov[i]["any_size"] = True
            elif probe.rank != base_rank:
                cov[i]["ranks"].add(probe.rank)
            else:
                xd, wd = probe.pair
                if xd in conv.takes and (not conv.weight_of_x or wd in (xd, F32)):
                    cov[i]["pairs"].add(probe.pair)
                cov[i]["gate"].add("g" if probe.gate else "n")
    return checked_mode


def _mode_independent(cls, pm, x, gate, y) -> bool:
    """The original forward gives the same bits in the other training mode (a norm with
    batch statistics or dropout in training does not: left alone)."""
    pm.training = not pm.training
    try:
        y2 = cls.forward(pm, x, gate) if gate is not None else cls.forward(pm, x)
    except Exception:  # noqa: BLE001
        return False
    finally:
        pm.training = not pm.training
    return _same(y, y2)


def _run_probe(cls, module, probe: _Probe, layout: str, gen):
    """(x, gate, probe module, output) of the original forward on a probe call; None when it
    raised or returned something other than a tensor."""
    xdt, wdt = probe.pair
    pm = _probe_copy(module, wdt, gen)
    n = probe.size
    # four rows (one of each magnitude), more than one along every batch dim where possible
    if layout == "last":
        shape = {2: (4, n), 3: (2, 2, n), 4: (1, 2, 2, n)}[probe.rank]
        dim = -1
    else:
        shape = {3: (2, n, 2), 4: (2, n, 1, 2), 5: (1, n, 2, 1, 2)}[probe.rank]
        dim = 1
    x = _probe_input(shape, xdt, dim, gen)
    gate = (torch.randn(shape, generator=gen) * 2).to(xdt) if probe.gate else None
    try:
        y = cls.forward(pm, x, gate) if probe.gate else cls.forward(pm, x)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(y, Tensor):
        return None
    return x, gate, pm, y
