"""Swap torch.nn norm layers in a built model for fastnorm's, and back.

The swap changes each module's class in place (`module.__class__`): fastnorm's classes subclass
torch's and add no state, so the module keeps its identity and with it everything a user holds
on to: Parameter and buffer objects (an optimizer built before keeps working), training mode,
requires_grad, hooks, device, dtype, and its place in the parent.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

from .modules import TORCH_TO_FASTNORM
from .sync_batchnorm import SyncBatchNorm

_TO_FASTNORM = {**TORCH_TO_FASTNORM, nn.SyncBatchNorm: SyncBatchNorm}
_TO_TORCH = {v: k for k, v in _TO_FASTNORM.items()}

__all__ = ["convert", "revert", "converted_modules"]


def _swap(model: nn.Module, table) -> nn.Module:
    for module in model.modules():
        # exactly a torch class: subclasses (timm's LayerNorm2d, BatchNormAct2d) have their own
        # forward and are left alone
        new_cls = table.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every module whose type is exactly a torch.nn BatchNorm*, LazyBatchNorm*,
    SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm* or LazyInstanceNorm* by its fastnorm
    counterpart.
    Returns the model. `converted_modules(model)` lists what was swapped."""
    return _swap(model, _TO_FASTNORM)


def revert(model: nn.Module) -> nn.Module:
    """Undo convert(): fastnorm layers become the torch.nn classes again, in place."""
    return _swap(model, _TO_TORCH)


def converted_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, module) of every fastnorm layer in the model."""
    return [(name, m) for name, m in model.named_modules() if type(m) in _TO_TORCH]
