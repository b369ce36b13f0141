"""convert() for diffusers' modulated norm layers: AdaLN, AdaLN-Zero and their kin.

A modulated norm layer (AdaLayerNormZero, AdaLayerNormContinuous, SanaModulatedNorm,
MochiRMSNormZero, ...) holds a projection of the conditioning (`linear`, `silu`, sometimes `emb`)
and a norm child (`norm`: an nn.LayerNorm, FP32LayerNorm or diffusers RMSNorm), and computes
`norm(x) * (1 + scale) + shift` with scale and shift cut from the projection. Its adapter keeps
every child (parameters, state_dict keys and named_modules() are unchanged) and replaces only
that last step by one fastnorm.functional.modulated_layer_norm / modulated_rms_norm call, which
reads the norm child's weight, bias and eps at every call; its return values are the original's.

These classes differ in what they cut from the projection, in which order and with which casts,
so each has an adapter written for it (SPECS, keyed by module and qualname); none of them calls
the original forward. A class is swapped only once its adapter is verified against the original
on probes, per class and instance configuration (cached): a probe copy of the module (random CPU
tensors of the same shapes; each nn.Linear replaced by a cheap input-dependent stand-in of its
shapes, so that a 3072-wide projection costs nothing; the user's module and its device are never
touched) runs the original forward and the adapter's on small random inputs, for float32,
bfloat16, float16 and float64 inputs against float32 and half parameters, in training and eval
mode, with the CPU fast path on: every output must match bit for bit (dtype, shape, values), an
error must be an error in both, and for float32 the gradients of the inputs and of every
parameter must match bit for bit too. A class of the same name whose numerics differ is left as
it is.

The fused call is made where it computes what the original does: the norm child is exactly an
nn.LayerNorm, FP32LayerNorm (float32 inputs) or diffusers RMSNorm (float32 inputs, or no weight),
or fastnorm's converted twin of one, without hooks; scale and shift broadcast to the input
without enlarging it and do not promote its dtype; autocast is off. Otherwise the adapter calls
the norm child and modulates with ATen, spelled as the original.
"""
from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from . import functional as FN
from . import huggingface as _hf
from .modules import TORCH_TO_FASTNORM

__all__ = ["SPECS", "adapter_for", "recognise", "originals"]

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
_FASTNORM_TO_TORCH = {v: k for k, v in TORCH_TO_FASTNORM.items()}
_NORM = "diffusers.models.normalization."


# ----------------------------------------------------------------------------------------------
# the modulation step
# ----------------------------------------------------------------------------------------------
def _base(cls: type) -> type:
    """The class a converted norm child was made from (fastnorm's twin, an HF adapter)."""
    if cls in _FASTNORM_TO_TORCH:
        return _FASTNORM_TO_TORCH[cls]
    if getattr(cls, "_fastnorm_recipe", None) is not None:
        return cls.__mro__[1]
    return cls


def _norm_kind(norm) -> Optional[str]:
    """"layer", "layer_f32" or "rms": what the norm child computes; None: anything else, or a
    child whose hooks (or a forward set on the instance) must run."""
    if (not isinstance(norm, nn.Module) or norm._forward_hooks or norm._forward_pre_hooks
            or norm._backward_hooks or norm._backward_pre_hooks or "forward" in norm.__dict__
            or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return None
    cls = _base(type(norm))
    if cls is nn.LayerNorm:
        return "layer"
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name == _NORM + "FP32LayerNorm":
        return "layer_f32"
    if name == _NORM + "RMSNorm":
        return "rms"
    return None


def _fits(t, x: Tensor, dt: torch.dtype) -> bool:
    """A scale / shift fastnorm takes: broadcast to x without enlarging it, x's device."""
    if t is None:
        return True
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.device != x.device:
        return False
    try:
        return torch.broadcast_shapes(t.shape, x.shape) == x.shape
    except RuntimeError:
        return False


def _affine_fits(t, x: Tensor, d: int, dtype=None) -> bool:
    return t is None or (isinstance(t, Tensor) and t.shape == (d,) and t.device == x.device
                         and t.is_floating_point() and (dtype is None or t.dtype == dtype))


def _fast(norm, x, scale, shift) -> Optional[str]:
    """"layer" / "rms": fastnorm's modulated norm computes this call as the original; None."""
    if (not isinstance(x, Tensor) or x.dtype not in (F32, BF16, F16, F64) or x.dim() < 1
            or x.device.type not in ("cpu", "cuda")
            or torch.is_autocast_enabled(x.device.type)):
        return None
    kind = _norm_kind(norm)
    if kind is None:
        return None
    dt = x.dtype
    for t in (scale, shift):
        if not _fits(t, x, dt):
            return None
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    if dt != x.dtype:  # the original's result would be of another dtype
        return None
    d = x.shape[-1]
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (float, int)):
        return None
    if kind in ("layer", "layer_f32"):
        if tuple(norm.normalized_shape) != (d,):
            return None
        if kind == "layer_f32":  # FP32LayerNorm: LayerNorm of x.float(), the same for float32
            if x.dtype != F32 or not (_affine_fits(w, x, d, F32) and _affine_fits(b, x, d, F32)):
                return None
        else:
            # the weights torch's LayerNorm takes on every device: x's dtype, float32 for half x
            wd = w.dtype if w is not None else b.dtype if b is not None else x.dtype
            if wd != x.dtype and not (wd == F32 and x.dtype in (BF16, F16)):
                return None
            if not (_affine_fits(w, x, d, wd) and _affine_fits(b, x, d, wd)):
                return None
        return "layer"
    # diffusers RMSNorm: variance in float32, a half weight rounds before the product
    if b is not None or x.dtype == F64:
        return None
    if w is not None and not (x.dtype == F32 and _affine_fits(w, x, d, F32)):
        return None
    return "rms"


def _modulate(norm, x, scale, shift, offset: Optional[int] = 1):
    """`norm(x) * (offset + scale) + shift` as the originals spell it (offset None: `* scale`;
    a None scale or shift: left out), by one fastnorm call where it computes the same."""
    kind = _fast(norm, x, scale, shift)
    so = 0.0 if offset is None else float(offset)
    if kind == "layer":
        return FN.modulated_layer_norm(x, scale, shift, norm.weight, norm.bias, float(norm.eps), so)
    if kind == "rms":
        return FN.modulated_rms_norm(x, scale, shift, norm.weight, float(norm.eps), so)
    y = norm(x)
    if scale is not None:
        y = y * (scale if offset is None else offset + scale)
    if shift is not None:
        y = y + shift
    return y


def _recording(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


# ----------------------------------------------------------------------------------------------
# the adapters' forwards: each its original's, but for the modulation step
# ----------------------------------------------------------------------------------------------
def _ada_layer_norm(self, x: Tensor, timestep: Optional[Tensor] = None,
                    temb: Optional[Tensor] = None) -> Tensor:
    if self.emb is not None:
        temb = self.emb(timestep)
    temb = self.linear(self.silu(temb))
    if self.chunk_dim == 1:
        shift, scale = temb.chunk(2, dim=1)
        shift = shift[:, None, :]
        scale = scale[:, None, :]
    else:
        scale, shift = temb.chunk(2, dim=0)
    return _modulate(self.norm, x, scale, shift)


def _ada_layer_norm_zero(self, x: Tensor, timestep: Optional[Tensor] = None,
                         class_labels: Optional[torch.LongTensor] = None,
                         hidden_dtype: Optional[torch.dtype] = None, emb: Optional[Tensor] = None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = _modulate(self.norm, x, scale_msa[:, None], shift_msa[:, None])
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_layer_norm_zero_single(self, x: Tensor, emb: Optional[Tensor] = None):
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    x = _modulate(self.norm, x, scale_msa[:, None], shift_msa[:, None])
    return x, gate_msa


def _sd35_ada_layer_norm_zero_x(self, hidden_states: Tensor, emb: Optional[Tensor] = None):
    emb = self.linear(self.silu(emb))
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
     gate_msa2) = emb.chunk(9, dim=1)
    if _recording(hidden_states, emb):
        # one norm under both modulations, as the original: its backward then runs once, on the
        # summed gradient, and the gradients are the original's bit for bit
        n = self.norm(hidden_states)
        x = n * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x2 = n * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
    else:
        x = _modulate(self.norm, hidden_states, scale_msa[:, None], shift_msa[:, None])
        x2 = _modulate(self.norm, hidden_states, scale_msa2[:, None], shift_msa2[:, None])
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2


def _lumina_rms_norm_zero(self, x: Tensor, emb: Optional[Tensor] = None):
    emb = self.linear(self.silu(emb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = emb.chunk(4, dim=1)
    x = _modulate(self.norm, x, scale_msa[:, None], None)
    return x, gate_msa, scale_mlp, gate_mlp


def _ada_layer_norm_continuous(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return _modulate(self.norm, x, scale[:, None, :], shift[:, None, :])


def _lumina_layer_norm_continuous(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
    emb = self.linear_1(self.silu(conditioning_embedding).to(x.dtype))
    x = _modulate(self.norm, x, emb[:, None, :], None)
    if self.linear_2 is not None:
        x = self.linear_2(x)
    return x


def _cogvideox_layer_norm_zero(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                               temb: Tensor):
    emb = self.linear(self.silu(temb))
    shift, scale, gate, enc_shift, enc_scale, enc_gate = emb.chunk(6, dim=1)
    hidden_states = _modulate(self.norm, hidden_states, scale[:, None, :], shift[:, None, :])
    encoder_hidden_states = _modulate(self.norm, encoder_hidden_states, enc_scale[:, None, :],
                                      enc_shift[:, None, :])
    return hidden_states, encoder_hidden_states, gate[:, None, :], enc_gate[:, None, :]


def _cogview3plus_zero_text_image(self, x: Tensor, context: Tensor, emb: Optional[Tensor] = None):
    emb = self.linear(self.silu(emb))
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, c_shift_msa, c_scale_msa,
     c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = emb.chunk(12, dim=1)
    x = _modulate(self.norm_x, x, scale_msa[:, None], shift_msa[:, None])
    context = _modulate(self.norm_c, context, c_scale_msa[:, None], c_shift_msa[:, None])
    return (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, context, c_gate_msa, c_shift_mlp,
            c_scale_mlp, c_gate_mlp)


def _token_replace_modulate(norm, hidden_states, n, tr_scale, tr_shift, scale, shift):
    # the norm is per token: the two spans normalised apart are the whole one's
    zero = _modulate(norm, hidden_states[:, :n], tr_scale[:, None], tr_shift[:, None])
    orig = _modulate(norm, hidden_states[:, n:], scale[:, None], shift[:, None])
    return torch.cat([zero, orig], dim=1)


def _hunyuan_token_replace_zero(self, hidden_states: Tensor, emb: Tensor,
                                token_replace_emb: Tensor, first_frame_num_tokens: int):
    emb = self.linear(self.silu(emb))
    token_replace_emb = self.linear(self.silu(token_replace_emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    (tr_shift_msa, tr_scale_msa, tr_gate_msa, tr_shift_mlp, tr_scale_mlp,
     tr_gate_mlp) = token_replace_emb.chunk(6, dim=1)
    hidden_states = _token_replace_modulate(self.norm, hidden_states, first_frame_num_tokens,
                                            tr_scale_msa, tr_shift_msa, scale_msa, shift_msa)
    return (hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, tr_gate_msa, tr_shift_mlp,
            tr_scale_mlp, tr_gate_mlp)


def _hunyuan_token_replace_zero_single(self, hidden_states: Tensor, emb: Tensor,
                                       token_replace_emb: Tensor, first_frame_num_tokens: int):
    emb = self.linear(self.silu(emb))
    token_replace_emb = self.linear(self.silu(token_replace_emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    tr_shift_msa, tr_scale_msa, tr_gate_msa = token_replace_emb.chunk(3, dim=1)
    hidden_states = _token_replace_modulate(self.norm, hidden_states, first_frame_num_tokens,
                                            tr_scale_msa, tr_shift_msa, scale_msa, shift_msa)
    return hidden_states, gate_msa, tr_gate_msa


def _sana_modulated_norm(self, hidden_states: Tensor, temb: Tensor,
                         scale_shift_table: Tensor) -> Tensor:
    shift, scale = (scale_shift_table[None]
                    + temb[:, None].to(scale_shift_table.device)).chunk(2, dim=1)
    return _modulate(self.norm, hidden_states, scale, shift)


def _sana_video_modulated_norm(self, hidden_states: Tensor, temb: Tensor,
                               scale_shift_table: Tensor) -> Tensor:
    shift, scale = (scale_shift_table[None, None]
                    + temb[:, :, None].to(scale_shift_table.device)).unbind(dim=2)
    return _modulate(self.norm, hidden_states, scale, shift)


def _mochi_modulated_rms_norm(self, hidden_states: Tensor, scale: Optional[Tensor] = None):
    dtype = hidden_states.dtype
    return _modulate(self.norm, hidden_states.to(torch.float32), scale, None, None).to(dtype)


def _mochi_layer_norm_continuous(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
    input_dtype = x.dtype
    scale = self.linear_1(self.silu(conditioning_embedding).to(x.dtype))
    inner = self.norm
    if _is_mochi_modulated(inner):
        # the child's own step inlined: rms(x.float()) * (1 + scale.float()), one call
        y = _modulate(inner.norm, x.to(torch.float32), scale.unsqueeze(1).to(torch.float32), None)
    else:
        y = inner(x, (1 + scale.unsqueeze(1).to(torch.float32)))
    return y.to(input_dtype)


def _is_mochi_modulated(m) -> bool:
    """m is a MochiModulatedRMSNorm (or its adapter) without hooks: its step can be inlined."""
    cls = type(m)
    if getattr(cls, "_fastnorm_modulated", False):
        cls = cls.__mro__[1]
    return (f"{cls.__module__}.{cls.__qualname__}" == _MOCHI_MODULATED
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or m._backward_pre_hooks or "forward" in m.__dict__))


def _mochi_rms_norm_zero(self, hidden_states: Tensor, emb: Tensor):
    hidden_states_dtype = hidden_states.dtype
    emb = self.linear(self.silu(emb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = emb.chunk(4, dim=1)
    hidden_states = _modulate(self.norm, hidden_states.to(torch.float32),
                              scale_msa[:, None].to(torch.float32), None)
    return hidden_states.to(hidden_states_dtype), gate_msa, scale_mlp, gate_mlp


def _ada_layer_norm_shift(self, x: Tensor, emb: Tensor) -> Tensor:
    shift = self.linear(self.silu(emb.to(torch.float32)).to(emb.dtype))
    return _modulate(self.norm, x, None, shift.unsqueeze(dim=1))


# ----------------------------------------------------------------------------------------------
# probe inputs: (args, kwargs) of a call on the probe copy `m`
# ----------------------------------------------------------------------------------------------
B, S = 2, 5  # S: rows of each magnitude of huggingface._probe_input, and a token-replace split


def _x(d, dt, g, s=S):
    return _hf._probe_input((B, s, d), dt, -1, g)


def _c(n, dt, g, b=B):
    return torch.randn((b, n) if b else (n,), generator=g).to(dt)


def _in(lin) -> int:
    return lin.in_features


def _out(lin) -> int:
    return lin.out_features


def _p_ada_layer_norm(m, xd, cd, pd, g):
    d = _out(m.linear) // 2
    if m.chunk_dim == 1:
        return (_x(d, xd, g),), dict(temb=_c(_in(m.linear), cd, g))
    if m.emb is not None:
        return (_x(d, xd, g), torch.tensor(3)), {}
    return (_x(d, xd, g),), dict(temb=_c(_in(m.linear), cd, g, b=0))


def _p_ada_layer_norm_zero(m, xd, cd, pd, g):
    d = _out(m.linear) // 6
    x = _x(d, xd, g)
    if m.emb is not None:
        n = m.emb.class_embedder.num_classes
        return (x,), dict(timestep=torch.tensor([3, 500]), class_labels=torch.tensor([0, n - 1]),
                          hidden_dtype=pd)
    return (x,), dict(emb=_c(_in(m.linear), cd, g))


def _p_chunks(k: int):
    def probe(m, xd, cd, pd, g):
        lin = m.linear if hasattr(m, "linear") else m.linear_1
        return (_x(_out(lin) // k, xd, g), _c(_in(lin), cd, g)), {}
    return probe


def _p_norm_size(m, xd, cd, pd, g):
    """(x, conditioning) sized by the norm child (Continuous, Shift)."""
    n = m.norm
    d = tuple(getattr(n, "normalized_shape", None) or getattr(n, "dim", None) or (16,))[-1]
    return (_x(d, xd, g), _c(_in(m.linear), cd, g)), {}


def _p_lumina_continuous(m, xd, cd, pd, g):
    return (_x(_out(m.linear_1), xd, g), _c(_in(m.linear_1), cd, g)), {}


def _p_cogvideox(m, xd, cd, pd, g):
    d = _out(m.linear) // 6
    return (_x(d, xd, g), _x(d, xd, g, s=4), _c(_in(m.linear), cd, g)), {}


def _p_cogview3(m, xd, cd, pd, g):
    d = _out(m.linear) // 12
    return (_x(d, xd, g), _x(d, xd, g, s=4), _c(_in(m.linear), cd, g)), {}


def _p_token_replace(k: int):
    def probe(m, xd, cd, pd, g):
        d = _out(m.linear) // k
        return (_x(d, xd, g), _c(_in(m.linear), cd, g), _c(_in(m.linear), cd, g), 2), {}
    return probe


def _p_sana(m, xd, cd, pd, g):
    d = m.norm.normalized_shape[-1]
    table = (torch.randn(2, d, generator=g) / d ** 0.5).to(pd)
    return (_x(d, xd, g), _c(d, cd, g), table), {}


def _p_sana_video(m, xd, cd, pd, g):
    d = m.norm.normalized_shape[-1]
    table = (torch.randn(2, d, generator=g) / d ** 0.5).to(pd)
    return (_x(d, xd, g), _x(d, cd, g), table), {}  # a modulation per token


def _p_mochi_modulated(m, xd, cd, pd, g):
    d = 24
    return (_x(d, xd, g),), dict(scale=(torch.randn(B, 1, d, generator=g) + 1).to(torch.float32))


def _p_mochi_continuous(m, xd, cd, pd, g):
    return (_x(_out(m.linear_1), xd, g), _c(_in(m.linear_1), cd, g)), {}


class Spec(NamedTuple):
    forward: Callable
    probe: Callable  # (probe copy, x dtype, conditioning dtype, parameter dtype, generator)


_TR = "diffusers.models.transformers."
_MOCHI_MODULATED = _TR + "transformer_mochi.MochiModulatedRMSNorm"
SPECS: Dict[str, Spec] = {
    _NORM + "AdaLayerNorm": Spec(_ada_layer_norm, _p_ada_layer_norm),
    _NORM + "AdaLayerNormZero": Spec(_ada_layer_norm_zero, _p_ada_layer_norm_zero),
    _NORM + "AdaLayerNormZeroSingle": Spec(_ada_layer_norm_zero_single, _p_chunks(3)),
    _NORM + "SD35AdaLayerNormZeroX": Spec(_sd35_ada_layer_norm_zero_x, _p_chunks(9)),
    _NORM + "LuminaRMSNormZero": Spec(_lumina_rms_norm_zero, _p_chunks(4)),
    _NORM + "AdaLayerNormContinuous": Spec(_ada_layer_norm_continuous, _p_norm_size),
    _NORM + "LuminaLayerNormContinuous": Spec(_lumina_layer_norm_continuous,
                                              _p_lumina_continuous),
    _NORM + "CogVideoXLayerNormZero": Spec(_cogvideox_layer_norm_zero, _p_cogvideox),
    _NORM + "CogView3PlusAdaLayerNormZeroTextImage": Spec(_cogview3plus_zero_text_image,
                                                          _p_cogview3),
    _TR + "transformer_hunyuan_video.HunyuanVideoTokenReplaceAdaLayerNormZero": Spec(
        _hunyuan_token_replace_zero, _p_token_replace(6)),
    _TR + "transformer_hunyuan_video.HunyuanVideoTokenReplaceAdaLayerNormZeroSingle": Spec(
        _hunyuan_token_replace_zero_single, _p_token_replace(3)),
    _TR + "sana_transformer.SanaModulatedNorm": Spec(_sana_modulated_norm, _p_sana),
    _TR + "transformer_sana_video.SanaModulatedNorm": Spec(_sana_video_modulated_norm,
                                                           _p_sana_video),
    _TR + "transformer_mochi.MochiModulatedRMSNorm": Spec(_mochi_modulated_rms_norm,
                                                          _p_mochi_modulated),
    _TR + "transformer_mochi.MochiLayerNormContinuous": Spec(_mochi_layer_norm_continuous,
                                                             _p_mochi_continuous),
    _TR + "transformer_mochi.MochiRMSNormZero": Spec(_mochi_rms_norm_zero, _p_chunks(4)),
    _TR + "hunyuan_transformer_2d.AdaLayerNormShift": Spec(_ada_layer_norm_shift, _p_norm_size),
}


def _spec(cls: type) -> Optional[Spec]:
    return SPECS.get(f"{cls.__module__}.{cls.__qualname__}")


# ----------------------------------------------------------------------------------------------
# adapters, their names (pickling) and the table revert() reads
# ----------------------------------------------------------------------------------------------
_PREFIX = "DM__"
_adapters: Dict[type, type] = {}


def _adapter(base: type) -> Optional[type]:
    a = _adapters.get(base)
    if a is None:
        spec = _spec(base)
        if spec is None:
            return None
        a = type(base.__name__, (base,), {
            "forward": spec.forward,
            "__doc__": (f"{base.__qualname__} ({base.__module__}) with its norm and modulation "
                        "computed by one fastnorm.functional call, converted by "
                        "fastnorm.convert(); fastnorm.diffusers_modulated says how.\n\n"
                        f"{base.__doc__ or ''}"),
            "__module__": __name__,
            "__qualname__": "__".join((_PREFIX[:-2], _hf._escape(base.__module__),
                                       _hf._escape(base.__qualname__))),
            "_fastnorm_modulated": True,
        })
        _adapters[base] = a
        globals()[a.__qualname__] = a
    return a


def originals() -> Dict[type, type]:
    """{adapter: original class} of every adapter made so far."""
    return {a: base for base, a in _adapters.items()}


def __getattr__(name: str):
    # pickle finds an adapter made in another process by its name: rebuild it from the name
    if name.startswith(_PREFIX):
        parts = name.split("__")
        if len(parts) == 3:
            mod, qual = _hf._unescape(parts[1]), _hf._unescape(parts[2])
            if mod.split(".")[0] in _hf.ROOTS:
                base = importlib.import_module(mod)
                for part in qual.split("."):
                    base = getattr(base, part)
                if isinstance(base, type) and issubclass(base, nn.Module):
                    a = _adapter(base)
                    if a is not None:
                        return a
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# verification on probes
# ----------------------------------------------------------------------------------------------
_HOOK_DICTS = tuple(k for k, v in nn.Module().__dict__.items() if isinstance(v, dict)
                    and k not in ("_parameters", "_buffers", "_modules"))


def _signature(module: nn.Module):
    """The cache key of a verdict: the classes, tensor shapes and plain attributes of the
    module's tree; None when some attribute is not a plain value (state a probe copy would
    share) or a forward is set on an instance (accelerate's hooks: a class swap changes
    nothing)."""
    key = []
    for name, m in module.named_modules():
        attrs = []
        for a, v in m.__dict__.items():
            if a in ("_parameters", "_buffers", "_modules", "training") or a in _HOOK_DICTS:
                continue
            if a == "forward" or isinstance(v, Tensor):
                return None
            if a == "_non_persistent_buffers_set":
                attrs.append((a, tuple(sorted(v))))
            elif _hf._plain(v):
                attrs.append((a, _hf._freeze(v)))
            else:
                return None
        tensors = tuple((k, None if t is None else (tuple(t.shape), t.is_floating_point()))
                        for k, t in (*m._parameters.items(), *m._buffers.items()))
        key.append((name, type(m), tensors, tuple(attrs)))
    return tuple(key)


class _ProbeLinear(nn.Module):
    """Stands in for an nn.Linear in a probe copy: y[..., j] = x[..., idx[j]] * a[j] + b[j],
    O(out) tensors, each output reading one input; the dtype and size checks of F.linear."""

    def __init__(self, lin: nn.Linear, dt: torch.dtype, g: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.idx = torch.randint(0, lin.in_features, (lin.out_features,), generator=g)
        self.a = nn.Parameter((torch.randn(lin.out_features, generator=g) * 0.5).to(dt))
        self.b = None if lin.bias is None else nn.Parameter(
            (torch.randn(lin.out_features, generator=g) * 0.1).to(dt))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.a.dtype or x.shape[-1] != self.in_features:
            raise RuntimeError("probe linear: dtype or size mismatch")
        y = x[..., self.idx] * self.a
        return y if self.b is None else y + self.b


def _probe_copy(module: nn.Module, dt: torch.dtype, g: torch.Generator) -> nn.Module:
    """The module's tree with random CPU tensors of the same shapes (`dt` the floating ones'),
    no hooks, and each nn.Linear stood in for."""
    p = copy.copy(module)
    p.__dict__ = dict(module.__dict__)
    for k in _HOOK_DICTS:
        p.__dict__[k] = OrderedDict()
    p._parameters, p._buffers, p._modules = {}, {}, {}
    for table, dst in ((module._parameters, p._parameters), (module._buffers, p._buffers)):
        for name, t in table.items():
            if t is None:
                dst[name] = None
            elif t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                r = r * 0.5 + 1.0 if name == "weight" and t.dim() == 1 else r * 0.3
                dst[name] = nn.Parameter(r.to(dt)) if table is module._parameters else r.to(dt)
            else:
                dst[name] = torch.zeros(t.shape, dtype=t.dtype)
    for name, c in module._modules.items():
        if c is None:
            p._modules[name] = None
        elif type(c) is nn.Linear:
            p._modules[name] = _ProbeLinear(c, dt, g)
        else:
            p._modules[name] = _probe_copy(c, dt, g)
    return p


# (x, conditioning, parameters) dtypes; float32 first: the base call must answer
_COMBOS = ((F32, F32, F32), (BF16, BF16, BF16), (F16, F16, F16), (BF16, F32, F32),
           (F32, BF16, BF16), (BF16, BF16, F32), (F16, F32, F32), (F32, F32, BF16),
           (F64, F64, F64))
_RAISED = object()


def _call(fn, m, args, kwargs, seed):
    torch.manual_seed(seed)  # draws (label dropout in training) alike in both
    try:
        return fn(m, *args, **kwargs)
    except Exception:  # noqa: BLE001
        return _RAISED


def _outputs(y):
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _agree(y0, y1) -> bool:
    if (y0 is _RAISED) != (y1 is _RAISED):
        return False
    if y0 is _RAISED:
        return True
    a, b = _outputs(y0), _outputs(y1)
    if len(a) != len(b) or type(y0) is not type(y1):
        return False
    for u, v in zip(a, b):
        if isinstance(u, Tensor) or isinstance(v, Tensor):
            if not _hf._same(u, v):
                return False
        elif u is not v and u != v:
            return False
    return True


def _grads_agree(cls, spec, pm, args, kwargs, g) -> bool:
    """float32 gradients (inputs, every parameter) of both forwards, bit for bit."""
    results = []
    for fn in (cls.forward, spec.forward):
        ins = [a.detach().clone().requires_grad_() if isinstance(a, Tensor) and
               a.is_floating_point() else a for a in args]
        kw = {k: v.detach().clone().requires_grad_() if isinstance(v, Tensor) and
              v.is_floating_point() else v for k, v in kwargs.items()}
        for p in pm.parameters():
            p.grad = None
        torch.manual_seed(1)
        with torch.enable_grad():
            outs = [o for o in _outputs(fn(pm, *ins, **kw))
                    if isinstance(o, Tensor) and o.requires_grad]
            cot = torch.Generator().manual_seed(2)
            loss = sum((o * torch.randn(o.shape, generator=cot).to(o.dtype)).sum() for o in outs)
            loss.backward()
        tensors = [t for t in (*ins, *kw.values()) if isinstance(t, Tensor) and t.requires_grad]
        results.append([t.grad for t in tensors] + [p.grad for p in pm.parameters()])
    return all((u is None and v is None) or _hf._same(u, v) for u, v in zip(*results))


class Verdict(NamedTuple):
    ok: bool
    reason: str


_verdicts: Dict[object, Verdict] = {}


def recognise(module: nn.Module) -> Verdict:
    """Whether convert() swaps this module, and why (probes run once per class and
    configuration, cached)."""
    cls = type(module)
    spec = _spec(cls)
    if spec is None:
        return Verdict(False, "no adapter for this class")
    key = _signature(module)
    if key is None:
        return Verdict(False, "not a candidate (an attribute that is not a plain value, or a "
                              "forward set on an instance)")
    v = _verdicts.get(key)
    if v is None:
        if (torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling()
                or torch._C._functorch.peek_interpreter_stack() is not None):
            return Verdict(False, "not probed under a dispatch mode, torch.compile or torch.func")
        v = _verify(cls, spec, module)
        _verdicts[key] = v
    return v


def _verify(cls, spec: Spec, module: nn.Module) -> Verdict:
    fast = FN.set_cpu_fast_path(True)  # the bitwise comparison is the fast path's
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # tiny probes
        with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
            g = torch.Generator().manual_seed(20240611)
            for i, (xd, cd, pd) in enumerate(_COMBOS):
                pm = _probe_copy(module, pd, g)
                try:
                    args, kwargs = spec.probe(pm, xd, cd, pd, g)
                except Exception as e:  # noqa: BLE001
                    return Verdict(False, f"no probe call fits its configuration ({e})")
                for training in (False, True):
                    pm.train(training)
                    with torch.no_grad():
                        y0 = _call(cls.forward, pm, args, kwargs, i)
                        y1 = _call(spec.forward, pm, args, kwargs, i)
                    if i == 0 and y0 is _RAISED:
                        return Verdict(False, "the original refuses the base float32 call")
                    if not _agree(y0, y1):
                        return Verdict(False, f"outputs differ from the original's "
                                              f"({xd}, {cd}, {pd}, training={training})")
                    if i == 0 and not _grads_agree(cls, spec, pm, args, kwargs, g):
                        return Verdict(False, "gradients differ from the original's")
        return Verdict(True, "verified on probes")
    finally:
        torch.set_num_threads(threads)
        FN.set_cpu_fast_path(fast)


def adapter_for(module: nn.Module) -> Optional[type]:
    """The adapter convert() gives `module` (None: left as it is)."""
    if _spec(type(module)) is None or not recognise(module).ok:
        return None
    return _adapter(type(module))
