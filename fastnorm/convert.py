"""Swap the norm layers of a built model for fastnorm's, and back.

The swap changes each module's class in place (`module.__class__`): fastnorm's classes subclass
the original ones and add no state, so the module keeps its identity and with it everything a
user holds on to: Parameter and buffer objects (an optimizer built before keeps working), training
mode, requires_grad, hooks, device, dtype, and its place in the parent; isinstance checks against
the original class stay true.

What is swapped: the torch.nn classes fastnorm.modules mirrors (TORCH_TO_FASTNORM), SyncBatchNorm,
the timm / torchvision classes of fastnorm.third_party when those packages are imported, and the
norm classes of Hugging Face transformers and diffusers that fastnorm.huggingface recognises by
probing when either package is imported, and diffusers' modulated norm layers
(fastnorm.diffusers_modulated).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn

from . import diffusers_modulated, huggingface, third_party
from .modules import TORCH_TO_FASTNORM
from .sync_batchnorm import SyncBatchNorm

__all__ = ["convert", "revert", "converted_modules"]

_TORCH_TABLE = {**TORCH_TO_FASTNORM, nn.SyncBatchNorm: SyncBatchNorm}


def _tables() -> Tuple[Dict[type, type], Dict[type, type]]:
    """(original class -> fastnorm class, fastnorm class -> original class): the torch.nn
    classes, and the third-party adapters of the packages imported so far (a model can hold
    their classes only once they are imported)."""
    to_fastnorm = {**_TORCH_TABLE, **third_party.adapters()}
    # the Hugging Face adapters are made per (class, recipe): several may map to one class
    return to_fastnorm, {**{v: k for k, v in to_fastnorm.items()}, **huggingface.originals(),
                         **diffusers_modulated.originals()}


def _swap(model: nn.Module, table, probe: bool = False) -> nn.Module:
    for module in model.modules():
        # exactly the listed class: a subclass has its own forward and is left alone
        new_cls = table.get(type(module))
        if new_cls is None and probe:
            # a transformers / diffusers class: its adapter when probing recognises it
            new_cls = diffusers_modulated.adapter_for(module) or huggingface.adapter_for(module)
        if new_cls is not None:
            module.__class__ = new_cls
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every module whose type is exactly one of these classes (not a
    subclass) by fastnorm's counterpart, a subclass of it:

    - torch.nn: BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d, SyncBatchNorm, LayerNorm, GroupNorm,
      InstanceNorm1d/2d/3d, LazyInstanceNorm1d/2d/3d, RMSNorm, LocalResponseNorm (every torch.nn class
      fastnorm.modules has a twin of: fastnorm.modules.TORCH_TO_FASTNORM);
    - timm (when imported): timm.layers.LayerNorm (fastnorm.functional.layer_norm),
      LayerNorm2d (fastnorm.functional.layer_norm2d), GroupNorm and GroupNorm1
      (fastnorm.functional.group_norm) and RmsNorm (fastnorm.functional.rms_norm), their
      `_fast_norm` mode included; the norm + activation layers BatchNormAct2d,
      FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act, LayerNormAct, LayerNormAct2d (and their
      Fp32 variants), the activation fused into the norm when fastnorm knows it and `drop` is an
      Identity (fastnorm.functional.*_act), and SyncBatchNormAct and RmsNormAct with their
      activation after the norm;
    - torchvision (when imported): torchvision.ops.FrozenBatchNorm2d
      (fastnorm.functional.frozen_batch_norm);
    - transformers / diffusers (when imported): the norm classes fastnorm.huggingface recognises
      by running their forward on probe copies and comparing with known conventions bit for bit
      (Llama / Gemma / T5-style RMSNorms, gated RMSNorms, OLMo / Cohere / FP32 LayerNorms,
      channels-first LayerNorms, ...), each on an adapter made for its class and convention
      (docs/huggingface.md); diffusers' modulated norm layers (AdaLayerNorm, AdaLayerNormZero,
      AdaLayerNormContinuous, SanaModulatedNorm, MochiRMSNormZero, ...), their norm and
      modulation computed by one fastnorm.functional.modulated_layer_norm / modulated_rms_norm
      call once their adapter is verified on probes (fastnorm.diffusers_modulated).

    Each keeps its original semantics, class (isinstance), parameters, buffers, training flag and
    hooks (fastnorm.third_party says how the timm and torchvision ones do).
    Returns the model. `converted_modules(model)` lists what was swapped, `revert(model)` undoes
    it."""
    return _swap(model, _tables()[0], probe=huggingface.active())


def revert(model: nn.Module) -> nn.Module:
    """Undo convert(): fastnorm's layers become the original classes again, in place."""
    return _swap(model, _tables()[1])


def converted_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every module convert() swapped (a fastnorm class that
    convert() maps to), in model.named_modules() order."""
    to_original = _tables()[1]
    return [(name, m) for name, m in model.named_modules() if type(m) in to_original]
