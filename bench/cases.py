"""The benchmark cases: normalisation layers at the shapes real models run them.

One table (CASES). Each entry is a layer (the torch.nn one, or the reference implementation a
model would otherwise use: timm's LayerNorm2d, torchvision's FrozenBatchNorm2d, the unfused
residual add + rms_norm) at one shape and layout, in one or more dtypes; `select()` turns it into
the concrete list for a run. On a GPU the shapes are the models' own; on a CPU every case runs in
float32 (unless --dtype says otherwise) at a shape scaled down to a few million elements (the
batch first, then the spatial dimensions; never the normalised width).

Each case also says how fastnorm computes the same layer (`fastnorm_module`: convert() of the
reference layer, or fastnorm's fused op where no module swap can express it) and how many
x-sized tensors a pass must move at least (`STREAMS`: the bytes of the fraction of copy
bandwidth).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastnorm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "add_rms_norm",
       "layer_norm2d", "frozen_batch_norm", "switch_norm", "adain", "ibn", "local_response_norm",
       "llama_rms_norm", "gemma_rms_norm", "gated_rms_norm", "modulated_layer_norm",
       "gated_residual_modulated_norm", "masked_batch_norm", "masked_group_norm")

# The fewest x-sized tensors each pass must read or write once (inputs read once, outputs written
# once; parameters, statistics and parameter gradients are per row or per channel and left out).
#   default: fwd reads x, writes y; bwd reads x and dy, writes dx.
#   add_rms_norm: fwd reads input and residual, writes output and residual_out; bwd reads dy,
#     d(residual_out) and residual_out (the one activation saved), writes d(input) = d(residual)
#     once (one dtype: the same tensor is the gradient of both inputs).
#   frozen_batch_norm: y = x * scale + shift per channel; bwd reads dy, writes dx (x unused).
#   adain: fwd reads content and style (the same shape here), writes y; bwd reads content, style
#     and dy, writes both gradients.
#   modulated_layer_norm: the default (the per-sample scale and shift are [B, D]: small).
#   gated_residual_modulated_norm: fwd reads residual and branch, writes out and residual_out; bwd
#     reads dy, d(residual_out), residual_out (the norm's rows) and branch (d_gate sums
#     d_r * branch), writes d_residual and d_branch = d_residual * gate (two tensors).
STREAMS = {
    "default": {"fwd": 2, "bwd": 3, "fwdbwd": 5},
    "add_rms_norm": {"fwd": 4, "bwd": 4, "fwdbwd": 8},
    "frozen_batch_norm": {"fwd": 2, "bwd": 2, "fwdbwd": 4},
    "adain": {"fwd": 3, "bwd": 5, "fwdbwd": 8},
    # gated_rms_norm: fwd reads x and gate, writes y; bwd reads x, gate and dy, writes dx, dgate
    "gated_rms_norm": {"fwd": 3, "bwd": 5, "fwdbwd": 8},
    "gated_residual_modulated_norm": {"fwd": 4, "bwd": 6, "fwdbwd": 10},
}


def streams(op: str, pass_: str) -> int:
    """x-sized tensors pass_ of op must move at least (STREAMS)."""
    return STREAMS.get(op, STREAMS["default"])[pass_]


# ----------------------------------------------------------------------------------------------
# reference layers with no torch.nn class
# ----------------------------------------------------------------------------------------------
class AddRMSNorm(nn.Module):
    """The pre-norm transformer step of a Llama block, unfused, as torch code writes it:
    r = input + residual; return F.rms_norm(r), r (the residual stream goes on). The baseline of
    add_rms_norm (eager and torch.compile); FusedAddRMSNorm is the same step on fastnorm's op."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, input, residual):
        r = input + residual
        return F.rms_norm(r, (self.dim,), self.weight, self.eps), r

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class FusedAddRMSNorm(AddRMSNorm):
    """AddRMSNorm on fastnorm.functional.add_rms_norm (one pass: the sum is formed at load time,
    residual_out stored by the same kernel). Same parameters and state_dict as AddRMSNorm."""

    def forward(self, input, residual):
        return fastnorm.functional.add_rms_norm(input, residual, (self.dim,), self.weight, self.eps)


def fuse_add_norms(model: nn.Module) -> int:
    """Every AddRMSNorm of model (in place) becomes a FusedAddRMSNorm with the same parameters
    (the class is swapped, as convert() does). Returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is AddRMSNorm:
            m.__class__ = FusedAddRMSNorm
            n += 1
    return n


class AdaLNModulate(nn.Module):
    """The AdaLN step of diffusion transformers as diffusers spells it (AdaLayerNormZero and the
    Flux / SD3 / PixArt / Wan blocks): a LayerNorm without affine parameters, eps 1e-6, then
    `* (1 + scale[:, None]) + shift[:, None]` with a per-sample modulation [B, D] from the adaLN
    linear. The baseline of modulated_layer_norm (eager and torch.compile)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x, scale, shift):
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class FusedAdaLNModulate(AdaLNModulate):
    """AdaLNModulate on fastnorm.functional.modulated_layer_norm (one pass)."""

    def forward(self, x, scale, shift):
        return fastnorm.functional.modulated_layer_norm(x, scale[:, None], shift[:, None],
                                                        eps=self.norm.eps)


class GatedResidualAdaLN(nn.Module):
    """AdaLN-Zero's gated residual followed by the next block's AdaLN, unfused, as diffusers'
    blocks write it: x = x + gate[:, None] * branch; norm(x) * (1 + scale[:, None]) +
    shift[:, None]; the residual stream x goes on. The baseline of gated_residual_modulated_norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, residual, branch, gate, scale, shift):
        x = residual + gate[:, None] * branch
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], x


class FusedGatedResidualAdaLN(GatedResidualAdaLN):
    """GatedResidualAdaLN on fastnorm.functional.gated_residual_modulated_norm (one pass: the gated
    sum formed at load time, residual_out stored by the same kernel)."""

    def forward(self, residual, branch, gate, scale, shift):
        return fastnorm.functional.gated_residual_modulated_norm(
            residual, branch, gate[:, None], scale[:, None], shift[:, None], eps=self.norm.eps)


# Hugging Face's RMSNorm conventions: the transformers classes when installed, else stand-ins
# spelled as they are (transformers' LlamaRMSNorm, GemmaRMSNorm, Mamba2RMSNormGated).
class LlamaStyleRMSNorm(nn.Module):
    """`weight * (x.float() * rsqrt(mean(x^2) + eps)).to(input dtype)` (transformers' LlamaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaStyleRMSNorm(nn.Module):
    """Everything in float32 with `(1 + weight)`, rounded once (transformers' GemmaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        output = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


class MambaStyleGatedRMSNorm(nn.Module):
    """norm(x * silu(gate)) in groups, Llama's rounding (transformers' Mamba2RMSNormGated)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        *prefix_dims, last_dim = hidden_states.shape
        group_count = last_dim // self.group_size
        g = hidden_states.view(*prefix_dims, group_count, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        hidden_states = g.view(*prefix_dims, group_count * self.group_size)
        return self.weight * hidden_states.to(input_dtype)


def hf_rms_norm_reference(op: str, dim: int) -> nn.Module:
    """The Hugging Face module of a convention case (transformers' own class when installed)."""
    try:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.mamba2.modeling_mamba2 import Mamba2RMSNormGated
    except ImportError:
        LlamaRMSNorm, GemmaRMSNorm, Mamba2RMSNormGated = (
            LlamaStyleRMSNorm, GemmaStyleRMSNorm, MambaStyleGatedRMSNorm)
    if op == "llama_rms_norm":
        return LlamaRMSNorm(dim, eps=1e-6)
    if op == "gemma_rms_norm":
        return GemmaRMSNorm(dim, eps=1e-6)
    return Mamba2RMSNormGated(dim, group_size=MAMBA_GROUP_SIZE, eps=1e-6)


MAMBA_GROUP_SIZE = 1024  # Mamba-Codestral-7B: intermediate 8192 in 8 groups


class ConventionRMSNorm(nn.Module):
    """fastnorm's computation of a convention case, on the reference module's parameter:
    fastnorm.functional.rms_norm with normalized_dtype (Llama) or weight_offset (Gemma), or
    gated_rms_norm (Mamba-2)."""

    def __init__(self, op: str, ref: nn.Module):
        super().__init__()
        self.op = op
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.eps = getattr(ref, "variance_epsilon", getattr(ref, "eps", 1e-6))
        self.group_size = getattr(ref, "group_size", None)

    def forward(self, x, gate=None):
        FN = fastnorm.functional
        if self.op == "llama_rms_norm":
            return FN.rms_norm(x, (x.shape[-1],), self.weight, self.eps, normalized_dtype=x.dtype)
        if self.op == "gemma_rms_norm":
            return FN.rms_norm(x, (x.shape[-1],), self.weight, self.eps, weight_offset=1.0)
        return FN.gated_rms_norm(x, gate, self.weight, self.eps, group_size=self.group_size,
                                 norm_before_gate=False, normalized_dtype=x.dtype)


class PermuteLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (N, C, H, W): permute, F.layer_norm, permute back (timm's
    LayerNorm2d's computation; the baseline when timm is not installed)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return y.permute(0, 3, 1, 2)


class FormulaFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's formula (x * scale + shift from four buffers): the
    baseline when torchvision is not installed."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(num_features))

    def forward(self, x):
        w, b, rv, rm = (t.reshape(1, -1, 1, 1) for t in (self.weight, self.bias, self.running_var,
                                                         self.running_mean))
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class ReferenceSwitchNorm2d(nn.Module):
    """Switchable Normalization as the authors' devkit computes it, unfused (the baseline of
    fastnorm.SwitchNorm2d; the same parameters, buffers and state_dict): per-(n, c) mean and
    unbiased variance, LN and BN statistics derived from them, softmax-mixed, then
    (x - mean) / sqrt(var + eps) * weight + bias; running = momentum * running + (1 - momentum)
    * batch."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        flat = x.reshape(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        sq = var_in + mean_in ** 2
        var_ln = sq.mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = sq.mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        pm = torch.softmax(self.mean_weight, 0)
        pv = torch.softmax(self.var_weight, 0)
        mean = pm[0] * mean_in + pm[1] * mean_ln + pm[2] * mean_bn
        var = pv[0] * var_in + pv[1] * var_ln + pv[2] * var_bn
        y = (flat - mean) / (var + self.eps).sqrt()
        return y.reshape(n, c, h, w) * self.weight + self.bias


class ReferenceAdaIN(nn.Module):
    """AdaIN as the widely used PyTorch implementation of Huang & Belongie composes it (per-(n, c)
    mean and unbiased std of each input, then normalise and re-scale): the baseline of
    fastnorm.AdaptiveInstanceNorm."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def _mean_std(self, t):
        n, c = t.shape[:2]
        flat = t.reshape(n, c, -1)
        shape = (n, c) + (1,) * (t.dim() - 2)
        return flat.mean(-1).reshape(shape), (flat.var(-1) + self.eps).sqrt().reshape(shape)

    def forward(self, content, style):
        c_mean, c_std = self._mean_std(content)
        s_mean, s_std = self._mean_std(style)
        return (content - c_mean) / c_std * s_std + s_mean


class ReferenceIBN(nn.Module):
    """IBN-Net's IBN block as its repository writes it: split the channels, an affine
    InstanceNorm2d on the first half and a BatchNorm2d on the rest, cat (the baseline of
    fastnorm.IBN; the same state_dict)."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), 1)


# Masked (variable-length) norms: the validity of a case, as a function of its shape (the CPU
# suite scales the shapes down; the validity scales with them).
MASKED_LENGTH_SPREAD = (0.4, 1.0)  # Conformer: the utterances' lengths, 40% to 100% of the padded T
MASKED_IMAGE_VALID = (100 / 128, 150 / 160)  # padded images: the valid 100 x 150 of 128 x 160


def masked_lengths(shape: Sequence[int]) -> torch.Tensor:
    """int64 [N]: lengths spread evenly over MASKED_LENGTH_SPREAD of the last dimension, the
    longest first (a length-sorted batch, as speech data loaders bucket them)."""
    n, t = shape[0], shape[-1]
    lo, hi = MASKED_LENGTH_SPREAD
    frac = torch.linspace(hi, lo, n, dtype=torch.float64) if n > 1 else torch.tensor([hi])
    return (frac * t).round().long().clamp(1, t)


def masked_image_mask(shape: Sequence[int]) -> torch.Tensor:
    """bool (N, H, W): the top-left MASKED_IMAGE_VALID fraction of every image valid (images
    padded to a common size at the bottom and the right)."""
    n, h, w = shape[0], shape[-2], shape[-1]
    vh = max(1, round(h * MASKED_IMAGE_VALID[0]))
    vw = max(1, round(w * MASKED_IMAGE_VALID[1]))
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    mask[:, :vh, :vw] = True
    return mask


class MaskedBatchNormComposition(nn.BatchNorm1d):
    """BatchNorm1d over the valid frames of (N, C, T) written as models do today without a masked
    layer (e.g. a Conformer convolution module's BatchNorm over padded utterances): sums of the
    masked values divided by the valid count, in float32 (float64 for float64 input), the running
    statistics updated as BatchNorm's (unbiased variance), output 0 at the padded frames (the
    padding must be finite: it is multiplied by the mask). The lengths ([N], a non-persistent
    buffer) are part of the layer here: run.py calls module(x)."""

    def __init__(self, num_features: int, lengths: torch.Tensor, **kwargs):
        super().__init__(num_features, **kwargs)
        self.register_buffer("lengths", lengths.clone(), persistent=False)

    def forward(self, x):
        stat = torch.promote_types(x.dtype, torch.float32)
        valid = torch.arange(x.shape[-1], device=x.device) < self.lengths[:, None]  # (N, T)
        m = valid[:, None, :].to(stat)
        xf = x.to(stat)
        count = m.sum()
        if self.training:
            mean = (xf * m).sum((0, 2)) / count
            var = ((xf - mean[:, None]).square() * m).sum((0, 2)) / count
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype),
                                       self.momentum)
        else:
            mean, var = self.running_mean.to(stat), self.running_var.to(stat)
        y = (xf - mean[:, None]) * torch.rsqrt(var + self.eps)[:, None]
        y = y * self.weight.to(stat)[:, None] + self.bias.to(stat)[:, None]
        return (y * m).to(x.dtype)


class MaskedGroupNormComposition(nn.GroupNorm):
    """GroupNorm over the valid region of padded images (N, C, H, W), written as models do today:
    per (sample, group) sums of the masked values over Cg x the valid positions, in float32
    (float64 for float64 input), output 0 in the padding. The mask ((N, H, W) bool) is a
    non-persistent buffer of the layer."""

    def __init__(self, num_groups: int, num_channels: int, mask: torch.Tensor, **kwargs):
        super().__init__(num_groups, num_channels, **kwargs)
        self.register_buffer("valid_mask", mask.clone(), persistent=False)

    def forward(self, x):
        stat = torch.promote_types(x.dtype, torch.float32)
        n, c = x.shape[:2]
        g = self.num_groups
        m = self.valid_mask[:, None].to(stat)  # (N, 1, H, W)
        xg = x.to(stat).reshape(n, g, c // g, *x.shape[2:])
        mg = m.unsqueeze(1)  # (N, 1, 1, H, W)
        dims = tuple(range(2, xg.dim()))
        count = (mg.sum(dims) * (c // g)).clamp_min(1)  # (N, 1)
        mean = (xg * mg).sum(dims) / count
        centred = xg - mean.reshape(n, g, *([1] * (xg.dim() - 2)))
        var = (centred.square() * mg).sum(dims) / count
        y = centred * torch.rsqrt(var + self.eps).reshape(n, g, *([1] * (xg.dim() - 2)))
        y = y.reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = y * self.weight.to(stat).reshape(shape) + self.bias.to(stat).reshape(shape)
        return (y * m).to(x.dtype)


class FastnormMaskedBatchNorm1d(fastnorm.MaskedBatchNorm1d):
    """fastnorm.MaskedBatchNorm1d with the case's lengths held by the layer (forward(x)), the same
    state_dict as MaskedBatchNormComposition."""

    def __init__(self, num_features: int, lengths: torch.Tensor, **kwargs):
        super().__init__(num_features, **kwargs)
        self.register_buffer("lengths", lengths.clone(), persistent=False)

    def forward(self, x):
        return super().forward(x, lengths=self.lengths)


class FastnormMaskedGroupNorm(fastnorm.MaskedGroupNorm):
    """fastnorm.MaskedGroupNorm with the case's mask held by the layer (forward(x))."""

    def __init__(self, num_groups: int, num_channels: int, mask: torch.Tensor, **kwargs):
        super().__init__(num_groups, num_channels, **kwargs)
        self.register_buffer("valid_mask", mask.clone(), persistent=False)

    def forward(self, x):
        return super().forward(x, mask=self.valid_mask)


def layer_norm2d_reference(c: int) -> nn.Module:
    """timm's LayerNorm2d (what ConvNeXt runs) when timm imports, else PermuteLayerNorm2d."""
    try:
        from timm.layers import LayerNorm2d
    except ImportError:
        return PermuteLayerNorm2d(c)
    return LayerNorm2d(c)


def frozen_batch_norm_reference(c: int) -> nn.Module:
    """torchvision's FrozenBatchNorm2d when torchvision imports, else FormulaFrozenBatchNorm2d."""
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except ImportError:
        return FormulaFrozenBatchNorm2d(c)
    return FrozenBatchNorm2d(c)

# The activations of the norm + activation cases (timm's BatchNormAct2d / GroupNormAct with
# act_layer=...): SiLU (EfficientNet, diffusion UNets), ReLU (RegNet, ResNetV2/BiT).
ACTS = {"silu": nn.SiLU, "relu": nn.ReLU}


def timm_norm_act(op: str, c: int, act: str) -> nn.Module:
    """timm's BatchNormAct2d(c) or GroupNormAct(32, c) with the activation act (inplace, as timm's
    models build them). Raises ImportError without timm (select() leaves these cases out then)."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    if op == "batch_norm":
        return BatchNormAct2d(c, act_layer=ACTS[act])
    if op == "group_norm":
        return GroupNormAct(c, 32, act_layer=ACTS[act])
    raise ValueError(f"no timm norm + activation layer for {op}")


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


# Elements per input on a CPU (2 cores should get through --quick in well under 2 minutes).
CPU_MAX_NUMEL = {True: 1 << 20, False: 1 << 21}


@dataclass(frozen=True)
class Case:
    op: str                      # one of OPS
    name: str                    # where the shape comes from
    shape: Tuple[int, ...]
    dtypes: Tuple[str, ...]      # keys of DTYPES; --quick takes the first
    layout: str = "contiguous"   # or "channels_last" (channels_last_3d for 5-d)
    quick: bool = False          # part of --quick
    act: Optional[str] = None    # batch_norm / group_norm followed by this activation (ACTS):
                                 # timm's BatchNormAct2d / GroupNormAct, the activation fused
                                 # into fastnorm's kernel after convert()

    @property
    def dtype(self) -> str:
        assert len(self.dtypes) == 1, "select() gives one dtype per case"
        return self.dtypes[0]

    @property
    def label(self) -> str:
        lay = "" if self.layout == "contiguous" else " cl"
        act = f"+{self.act}" if self.act else ""
        return f"{self.op}{act}/{self.name} {self.dtype}{lay}"

    @property
    def channels(self) -> int:
        """The parameters' length: the normalised width (row ops) or C."""
        return self.shape[-1] if self.op in ROW_OPS + MOD_OPS else self.shape[1]

    @property
    def n_inputs(self) -> int:
        """x-sized tensors the layer takes (add_rms_norm: input and residual; adain: content and
        style, here of one shape; gated_residual_modulated_norm: residual and branch)."""
        two = ("add_rms_norm", "adain", "gated_rms_norm", "gated_residual_modulated_norm")
        return 2 if self.op in two else 1

    @property
    def n_mods(self) -> int:
        """Per-sample modulation tensors [B, D] the layer takes after the x-sized ones (the adaLN
        linear's chunks): scale and shift, and the gate of the gated residual."""
        return {"modulated_layer_norm": 2, "gated_residual_modulated_norm": 3}.get(self.op, 0)

    @property
    def n_outputs(self) -> int:
        """Tensors the layer returns (add_rms_norm, gated_residual_modulated_norm: output and
        residual_out)."""
        return 2 if self.op in ("add_rms_norm", "gated_residual_modulated_norm") else 1

    @property
    def drop_in(self) -> bool:
        """fastnorm's layer is fastnorm.convert() of the reference layer (else fastnorm_module
        builds it: the fused residual add, the stand-ins used without timm / torchvision, and
        the source articles' layers SwitchNorm, AdaIN and IBN, whose references have no
        torch.nn class)."""
        fused = ("add_rms_norm",) + NC_OPS + HF_OPS + MOD_OPS + MASKED_OPS
        return self.op not in fused and type(self._third_party()) not in (
            PermuteLayerNorm2d, FormulaFrozenBatchNorm2d)

    def _third_party(self) -> Optional[nn.Module]:
        """timm's / torchvision's layer of this case (or its stand-in); None for other ops."""
        make = {"layer_norm2d": layer_norm2d_reference,
                "frozen_batch_norm": frozen_batch_norm_reference}.get(self.op)
        return make(self.channels) if make else None

    def module(self) -> nn.Module:
        """The reference layer, in training mode, with random (not 1/0) affine parameters.
        BatchNorm keeps float32 parameters (AMP training: half activations, float32 layers);
        the others take the input's dtype (a model cast with .to(dtype), as transformers and
        diffusion models run in half precision; FrozenBatchNorm2d's buffers too, so that its
        output keeps the input's dtype). FrozenBatchNorm2d's running statistics are random too."""
        c = self.channels
        nd = len(self.shape)
        if self.act is not None:
            m = timm_norm_act(self.op, c, self.act)
        elif self.op == "layer_norm":
            m = nn.LayerNorm(c)
        elif self.op == "rms_norm":
            m = nn.RMSNorm(c, eps=1e-6)  # Llama's eps
        elif self.op == "add_rms_norm":
            m = AddRMSNorm(c, eps=1e-6)
        elif self.op in HF_OPS:
            m = hf_rms_norm_reference(self.op, c)
        elif self.op in ("layer_norm2d", "frozen_batch_norm"):
            m = self._third_party()
        elif self.op == "batch_norm":
            m = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[nd](c)
        elif self.op == "group_norm":
            m = nn.GroupNorm(32, c)
        elif self.op == "instance_norm":
            m = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[nd](c, affine=True)
        elif self.op == "switch_norm":
            m = ReferenceSwitchNorm2d(c)
        elif self.op == "adain":
            m = ReferenceAdaIN()
        elif self.op == "ibn":
            m = ReferenceIBN(c)
        elif self.op == "local_response_norm":
            # AlexNet's and GoogLeNet's: size 5, torch's alpha / beta / k; no parameters
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0).train()
        elif self.op == "masked_batch_norm":
            m = MaskedBatchNormComposition(c, masked_lengths(self.shape))
        elif self.op == "masked_group_norm":
            m = MaskedGroupNormComposition(32, c, masked_image_mask(self.shape))
        elif self.op in MOD_OPS:  # no parameters: the modulation is an input
            cls = AdaLNModulate if self.op == "modulated_layer_norm" else GatedResidualAdaLN
            return cls(c).train()
        else:
            raise ValueError(self.op)
        with torch.no_grad():
            for layer in (m.IN, m.BN) if self.op == "ibn" else (() if self.op == "adain" else (m,)):
                layer.weight.uniform_(0.5, 1.5)
                if getattr(layer, "bias", None) is not None:
                    layer.bias.normal_(0.0, 0.2)
            if self.op == "frozen_batch_norm":
                m.running_mean.normal_(0.1, 0.3)
                m.running_var.uniform_(0.5, 2.0)
            if self.op == "switch_norm":
                m.mean_weight.normal_(0.0, 0.5)
                m.var_weight.normal_(0.0, 0.5)
        # IBN's BatchNorm half keeps float32 parameters as batch_norm's cases (AMP)
        if self.op not in ("batch_norm", "ibn", "masked_batch_norm"):
            m = m.to(DTYPES[self.dtype])
        return m.train()

    def fastnorm_module(self, ref: nn.Module) -> nn.Module:
        """fastnorm's layer with ref's parameters and state (a copy; ref is not changed)."""
        if self.op in NC_OPS:  # SwitchNorm, AdaIN, IBN: the reference's state loaded into fastnorm's
            if self.op == "adain":
                return fastnorm.AdaptiveInstanceNorm(eps=ref.eps).train(ref.training)
            if self.op == "switch_norm":
                f = fastnorm.SwitchNorm2d(self.channels, eps=ref.eps, momentum=ref.momentum)
                f = f.to(ref.weight.device, ref.weight.dtype)
            else:
                f = fastnorm.IBN(self.channels, ref.half / self.channels).to(ref.BN.weight.device)
                assert f.half == ref.half
            f.load_state_dict(ref.state_dict())
            return f.train(ref.training)
        if self.op in HF_OPS:
            return ConventionRMSNorm(self.op, ref).train(ref.training)
        if self.op in MASKED_OPS:  # fastnorm's masked layer, the same validity and state
            if self.op == "masked_batch_norm":
                f = FastnormMaskedBatchNorm1d(ref.num_features, ref.lengths, eps=ref.eps,
                                              momentum=ref.momentum)
            else:
                f = FastnormMaskedGroupNorm(ref.num_groups, ref.num_channels, ref.valid_mask,
                                            eps=ref.eps)
            f = f.to(ref.weight.device, ref.weight.dtype)
            f.load_state_dict(ref.state_dict())
            return f.train(ref.training)
        if self.op in MOD_OPS:
            plain = self.op == "modulated_layer_norm"
            cls = FusedAdaLNModulate if plain else FusedGatedResidualAdaLN
            return cls(self.channels, ref.norm.eps).train(ref.training)
        m = copy.deepcopy(ref)
        if self.op == "add_rms_norm":
            assert fuse_add_norms(m) == 1
            return m
        if type(m) in (PermuteLayerNorm2d, FormulaFrozenBatchNorm2d):  # no convert() mapping
            cls = fastnorm.LayerNorm2d if self.op == "layer_norm2d" else fastnorm.FrozenBatchNorm2d
            f = cls(self.channels, eps=m.eps).to(m.weight.device, m.weight.dtype)
            f.load_state_dict(m.state_dict())
            return f.train(m.training)
        m = fastnorm.convert(m)
        assert fastnorm.converted_modules(m), f"convert() swapped nothing in {type(ref).__name__}"
        return m

    def memory_format(self) -> torch.memory_format:
        if self.layout == "contiguous":
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d


# ops whose parameters run along the last dimension (rows of the normalised width)
ROW_OPS = ("layer_norm", "rms_norm", "add_rms_norm", "llama_rms_norm", "gemma_rms_norm",
           "gated_rms_norm")
# Hugging Face's RMSNorm conventions (fastnorm_module: ConventionRMSNorm)
HF_OPS = ("llama_rms_norm", "gemma_rms_norm", "gated_rms_norm")
# the source articles' layers (SwitchNorm, AdaIN, IBN) on the per-(n, c) ops (fastnorm_module builds them from the reference's state)
NC_OPS = ("switch_norm", "adain", "ibn")
# diffusion transformers' AdaLN / AdaLN-Zero (shape [B, tokens, D]; per-sample modulation inputs)
MOD_OPS = ("modulated_layer_norm", "gated_residual_modulated_norm")
# the masked (variable-length) norms: the validity is the layer's (masked_lengths /
# masked_image_mask of the case's shape); fastnorm_module: fastnorm.Masked* with it
MASKED_OPS = ("masked_batch_norm", "masked_group_norm")


def _ln(name, rows, width, dtypes, quick=False, op="layer_norm"):
    return Case(op, name, (rows, width), dtypes, quick=quick)


CASES: List[Case] = [
    # LayerNorm of transformers: rows = batch x sequence (tokens), width = hidden size
    _ln("bert-base-768", 16384, 768, ("bf16", "fp16", "fp32")),
    _ln("bert-large-1024", 16384, 1024, ("bf16",)),
    _ln("gpt-xl-2048", 16384, 2048, ("bf16",)),
    _ln("llama-7b-4096", 16384, 4096, ("bf16", "fp16", "fp32"), quick=True),
    _ln("llama-70b-8192", 8192, 8192, ("bf16",)),
    _ln("gpt3-12288", 8192, 12288, ("bf16", "fp16", "fp32")),
    _ln("odd-1000", 16384, 1000, ("bf16", "fp32"), quick=True),
    _ln("narrow-64-qknorm", 1 << 20, 64, ("bf16",)),
    _ln("wide-65536", 1024, 65536, ("bf16", "fp32")),
    # BatchNorm of ResNet-50 at batch 64: NCHW fp32, channels_last fp16/bf16
    *[Case("batch_norm", name, shape, dtypes, layout, quick=quick)
      for name, shape, q in (("resnet50-stem", (64, 64, 112, 112), False),
                             ("resnet50-layer1", (64, 256, 56, 56), True),
                             ("resnet50-layer2", (64, 512, 28, 28), False),
                             ("resnet50-layer4", (64, 2048, 7, 7), False))
      for dtypes, layout, quick in ((("fp32",), "contiguous", q),
                                    (("bf16", "fp16"), "channels_last", q))],
    Case("batch_norm", "bn1d-16384x1024", (16384, 1024), ("fp32", "bf16")),
    # GroupNorm(32) of a diffusion UNet (SD at 512x512: latents 64x64), batch 8
    *[Case("group_norm", f"sd-unet-{c}", (8, c, hw, hw), ("fp16", "bf16"), layout,
           quick=(c == 320))
      for c, hw in ((320, 64), (640, 32), (1280, 16))
      for layout in ("contiguous", "channels_last")],
    # InstanceNorm of style transfer (256x256 images, 64 channels) and of 3-d medical segmentation
    Case("instance_norm", "style-transfer", (16, 64, 256, 256), ("fp32", "bf16"), "contiguous"),
    Case("instance_norm", "style-transfer", (16, 64, 256, 256), ("fp32", "bf16"), "channels_last",
         quick=True),
    Case("instance_norm", "medseg-3d", (2, 32, 128, 128, 128), ("fp32", "bf16"), quick=True),
    # RMSNorm and the fused residual add + RMSNorm of Llama: 4096 tokens of width 4096 (7B) and
    # 8192 (70B), bf16 (the baseline of add_rms_norm: r = x + residual; F.rms_norm(r))
    *[_ln(name, 4096, width, ("bf16",), quick=(width == 4096), op=op)
      for op in ("rms_norm", "add_rms_norm")
      for name, width in (("llama-7b-4096", 4096), ("llama-70b-8192", 8192))],
    # Hugging Face's conventions (against transformers' own module, eager and torch.compile): the
    # Llama-style RMSNorm at Llama-3-8B's shapes (hidden 4096, 8 x 4096 tokens) and Qwen3's per-head
    # QK-norm (rows of 128, 32 heads, 4096 tokens); Gemma's (1 + w) at Gemma-7B's hidden 3072;
    # Mamba-2's gated RMSNorm at Mamba-Codestral-7B's (intermediate 8192, 8 groups, 8 x 2048 tokens)
    Case("llama_rms_norm", "llama3-8b-4096", (32768, 4096), ("bf16",), quick=True),
    Case("llama_rms_norm", "qwen3-qknorm-32x128", (4096, 32, 128), ("bf16",)),
    Case("gemma_rms_norm", "gemma-7b-3072", (32768, 3072), ("bf16",), quick=True),
    Case("gated_rms_norm", "mamba2-codestral-8192", (16384, 8192), ("bf16",), quick=True),
    # LayerNorm2d of ConvNeXt-T's four stages at batch 32 (NCHW and channels_last; against timm's
    # LayerNorm2d: permute, F.layer_norm, permute)
    *[Case("layer_norm2d", f"convnext-t-stage{i + 1}", (32, c, hw, hw),
           ("bf16", "fp32") if i == 0 else ("bf16",), layout, quick=(i == 0))
      for i, (c, hw) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)))
      for layout in ("contiguous", "channels_last")],
    # FrozenBatchNorm2d (detection backbones) at ResNet-50's BatchNorm shapes, batch 64: NCHW
    # fp32 and channels_last bf16 (against torchvision's FrozenBatchNorm2d)
    *[Case("frozen_batch_norm", name, shape, dtypes, layout,
           quick=(name == "resnet50-layer1" and layout == "contiguous"))
      for name, shape in (("resnet50-stem", (64, 64, 112, 112)),
                          ("resnet50-layer1", (64, 256, 56, 56)),
                          ("resnet50-layer2", (64, 512, 28, 28)),
                          ("resnet50-layer4", (64, 2048, 7, 7)))
      for dtypes, layout in ((("fp32",), "contiguous"), (("bf16",), "channels_last"))],
    # timm's BatchNormAct2d with SiLU at EfficientNet-B0 (224x224, batch 64) and B4 (380x380,
    # batch 32) shapes, with ReLU at RegNetX-1.6GF's stage widths (batch 64); GroupNormAct(32)
    # with SiLU at the diffusion UNet's shapes. NCHW fp32 and channels_last bf16 (BatchNorm);
    # both layouts in bf16 (GroupNorm). Against timm's unfused layer (norm, then activation).
    *[Case("batch_norm", name, shape, dtypes, layout, act=act,
           quick=(name == "effnet-b0-expand2" and layout == "channels_last"))
      for name, shape, act in (("effnet-b0-stem", (64, 32, 112, 112), "silu"),
                               ("effnet-b0-expand2", (64, 144, 56, 56), "silu"),
                               ("effnet-b0-head", (64, 1280, 7, 7), "silu"),
                               ("effnet-b4-stem", (32, 48, 190, 190), "silu"),
                               ("effnet-b4-expand2", (32, 192, 95, 95), "silu"),
                               ("regnetx-016-s1", (64, 72, 56, 56), "relu"),
                               ("regnetx-016-s3", (64, 408, 14, 14), "relu"))
      for dtypes, layout in ((("fp32",), "contiguous"), (("bf16",), "channels_last"))],
    *[Case("group_norm", f"sd-unet-{c}+silu", (8, c, hw, hw), ("bf16",), layout, act="silu",
           quick=(c == 320 and layout == "channels_last"))
      for c, hw in ((320, 64), (640, 32), (1280, 16))
      for layout in ("contiguous", "channels_last")],
    # SwitchNorm2d at ResNet-50's stage shapes, batch 64 (ResNet-50-SN): NCHW fp32, channels_last
    # bf16; against the authors' formulas unfused (ReferenceSwitchNorm2d)
    *[Case("switch_norm", name, shape, dtypes, layout,
           quick=(name == "resnet50-layer1" and layout == "contiguous"))
      for name, shape in (("resnet50-stem", (64, 64, 112, 112)),
                          ("resnet50-layer1", (64, 256, 56, 56)),
                          ("resnet50-layer2", (64, 512, 28, 28)),
                          ("resnet50-layer4", (64, 2048, 7, 7)))
      for dtypes, layout in ((("fp32",), "contiguous"), (("bf16",), "channels_last"))],
    # AdaIN on VGG-19 relu4_1 features of 512x512 images, batch 8 (style transfer), content and
    # style of one shape; against the unfused mean/std composition (ReferenceAdaIN)
    Case("adain", "vgg-relu4_1", (8, 512, 64, 64), ("fp32", "bf16"), "contiguous", quick=True),
    Case("adain", "vgg-relu4_1", (8, 512, 64, 64), ("bf16",), "channels_last"),
    # IBN of ResNet-50-IBN-a (the first norm of the bottlenecks of layers 1-3: 64, 128 and 256
    # planes, half IN), batch 64; against IBN-Net's split / InstanceNorm2d / BatchNorm2d / cat
    *[Case("ibn", name, shape, dtypes, layout,
           quick=(name == "resnet50-ibn-a-layer1" and layout == "contiguous"))
      for name, shape in (("resnet50-ibn-a-layer1", (64, 64, 56, 56)),
                          ("resnet50-ibn-a-layer2", (64, 128, 28, 28)),
                          ("resnet50-ibn-a-layer3", (64, 256, 14, 14)))
      for dtypes, layout in ((("fp32",), "contiguous"), (("bf16",), "channels_last"))],
    # LocalResponseNorm (size 5) of AlexNet (after conv1 and conv2) and GoogLeNet (after the stem
    # and conv2) at batch 128, NCHW and channels_last (against torch.nn.LocalResponseNorm: pad,
    # avg_pool3d, pow and a division, eager and torch.compile). S = 55 x 55 and 27 x 27 are odd:
    # the NCHW kernels' single-position path; 56 x 56 takes 16-byte packs.
    *[Case("local_response_norm", name, shape, dtypes, layout,
           quick=(name == "alexnet-lrn1" and layout == "contiguous"))
      for name, shape, dtypes in (("alexnet-lrn1", (128, 96, 55, 55), ("fp32", "bf16")),
                                  ("alexnet-lrn2", (128, 256, 27, 27), ("fp32",)),
                                  ("googlenet-lrn1", (128, 64, 56, 56), ("fp32", "bf16")),
                                  ("googlenet-lrn2", (128, 192, 56, 56), ("fp32",)))
      for layout in ("contiguous", "channels_last")],
    # AdaLN of diffusion transformers, bf16 [B, tokens, D] with a per-sample scale / shift (and
    # gate) [B, D], the LayerNorm without affine parameters: modulated_layer_norm against
    # diffusers' `norm(x) * (1 + scale[:, None]) + shift[:, None]`, and AdaLN-Zero's gated residual
    # fused with the next norm against `x = x + gate[:, None] * b` then that. Flux.1 (hidden 3072;
    # the single-stream blocks' 4096 image + 512 text tokens, batch 1), SD3-medium (1536; 4096 +
    # 333 joint tokens, batch 2: CFG), PixArt-alpha at 1024 px (1152; 4096 tokens, batch 2), Wan
    # 2.1-14B (5120; 81 frames at 480x832: 21 x 30 x 52 = 32760 video tokens, batch 1; rows past
    # the fused kernels' 4096: the functional's fallback).
    *[Case(op, name, shape, ("bf16",), quick=(name == "flux-4608"))
      for op in MOD_OPS
      for name, shape in (("flux-4608", (1, 4608, 3072)), ("sd3-4429", (2, 4429, 1536)),
                          ("pixart-4096", (2, 4096, 1152)), ("wan-14b-32760", (1, 32760, 5120)))],
    # Masked norms, bf16: a Conformer convolution module's BatchNorm1d over padded utterances (16
    # utterances padded to 1500 frames, lengths spread 40-100%; 256 and 512 channels: Conformer-M
    # / -L widths) and GroupNorm(32) over padded images (8 x 256 x 128 x 160, a valid 100 x 150
    # region given as an (N, H, W) mask). masked_*: fastnorm.MaskedBatchNorm1d / MaskedGroupNorm
    # against the masked composition written in Python today (MaskedBatchNormComposition,
    # MaskedGroupNormComposition: masked sums / counts), eager and torch.compile; the same
    # shapes as plain batch_norm / group_norm cases (the same case names): the unmasked layers'
    # time, fastnorm's and torch's, next to the masked ones.
    *[Case(op, f"conformer-{c}-16x1500", (16, c, 1500), ("bf16",),
           quick=(op == "masked_batch_norm" and c == 256))
      for op in ("masked_batch_norm", "batch_norm") for c in (256, 512)],
    *[Case(op, "padded-images-128x160", (8, 256, 128, 160), ("bf16",),
           quick=(op == "masked_group_norm"))
      for op in ("masked_group_norm", "group_norm")],
]


def fit(shape: Sequence[int], max_numel: int, op: str) -> Tuple[int, ...]:
    """Scale a shape down to at most max_numel elements: halve the batch (rows for 2-d), then the
    spatial dimensions (the tokens of [B, tokens, D]); never the channels or the normalised
    width."""
    s = list(shape)
    while math.prod(s) > max_numel and s[0] > 1:
        s[0] = max(1, s[0] // 2)
    spatial = range(2, len(s)) if len(s) > 2 else range(0)
    if op in MOD_OPS:  # [B, tokens, D]: the tokens
        spatial = range(1, len(s) - 1)
    while math.prod(s) > max_numel and any(s[d] > 4 for d in spatial):
        for d in spatial:
            s[d] = max(4, s[d] // 2)
    if op == "batch_norm" and len(s) == 2:
        s[0] = max(s[0], 2)  # more than one value per channel
    return tuple(s)


def select(device: str, quick: bool, ops: Optional[Iterable[str]] = None,
           dtypes: Optional[Iterable[str]] = None) -> List[Case]:
    """The concrete cases of a run, one dtype each.

    GPU: the table's shapes; --dtype filters the table's dtypes; --quick takes the cases marked
    quick in their first dtype. CPU: shapes scaled by fit(); float32 unless --dtype names others.
    """
    ops = set(ops or OPS)
    dtypes = list(dtypes) if dtypes else None
    out: List[Case] = []
    timm_ok = has_timm()
    for c in CASES:
        if c.op not in ops or (quick and not c.quick) or (c.act and not timm_ok):
            continue
        if device == "cpu":
            shape = fit(c.shape, CPU_MAX_NUMEL[quick], c.op)
            wanted = dtypes or ["fp32"]
        else:
            shape = c.shape
            wanted = [d for d in c.dtypes if dtypes is None or d in dtypes]
            if quick and dtypes is None:
                wanted = wanted[:1]
        for d in wanted:
            case = replace(c, shape=shape, dtypes=(d,))
            if case not in out:
                out.append(case)
    return out
