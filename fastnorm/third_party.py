"""convert() for norm layers of timm and torchvision: adapter classes.

Each adapter subclasses one third-party class, adds no state and overrides only forward, which
computes what the original forward computes with fastnorm's functions. convert() swaps a
module's class to its adapter in place, so the module stays an instance of the original class
(isinstance checks, timm's and torchvision's own helpers keep working) and keeps its parameters,
buffers, training flag and hooks; revert() swaps it back.

| original (exactly this class)              | adapter                       | computed by                  |
|--------------------------------------------|-------------------------------|------------------------------|
| timm.layers.LayerNorm                      | TimmLayerNorm                 | functional.layer_norm        |
| timm.layers.LayerNorm2d                    | TimmLayerNorm2d               | functional.layer_norm2d      |
| timm.layers.GroupNorm                      | TimmGroupNorm                 | functional.group_norm        |
| timm.layers.GroupNorm1                     | TimmGroupNorm1                | functional.group_norm (G=1)  |
| timm.layers.RmsNorm                        | TimmRmsNorm                   | functional.rms_norm          |
| torchvision.ops.FrozenBatchNorm2d          | TorchvisionFrozenBatchNorm2d  | functional.frozen_batch_norm |

fastnorm does not import timm or torchvision: an adapter is created the first time convert()
(or revert(), converted_modules()) runs after the module defining its original class has been
imported, since a model can hold an instance of the class only then. Unpickling a converted
module creates its adapter on demand (the module-level __getattr__ below), importing the package.

Inputs an adapter does not take (another rank, a shape that does not fit the layer, a channel
count torchvision's broadcasting accepts, timm's fast-norm mode with apex installed) go to the
original forward, so a converted model computes what it computed before, errors included.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as FN

__all__ = ["adapters", "ADAPTER_NAMES"]


def _finish(cls: type, name: str) -> type:
    """__name__ stays the original's (a converted model prints as before, as fastnorm's torch.nn
    twins do); __qualname__ and __module__ are where pickle finds the adapter."""
    cls.__name__ = cls.__bases__[0].__name__
    cls.__qualname__ = name
    cls.__module__ = __name__
    return cls


def _timm_fast_norm_inputs(fast_norm, x: Tensor, *params: Optional[Tensor]):
    """timm's fast-norm mode (timm.layers.set_fast_norm) without apex: under autocast the input
    and parameters are cast to the autocast dtype and the norm runs with autocast off, so the
    output stays in that low-precision dtype (fast_norm.fast_layer_norm / fast_group_norm /
    fast_rms_norm)."""
    if fast_norm.is_autocast_enabled(x.device.type):
        dt = fast_norm.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        params = tuple(None if p is None else p.to(dt) for p in params)
    return (x, *params)


def _make_timm_layer_norm2d(base: type) -> type:
    fast_norm = importlib.import_module("timm.layers.fast_norm")

    class Adapter(base):
        __doc__ = (f"timm's LayerNorm2d (normalisation over the channels of each position of an "
                   f"(N, C, H, W) input) on fastnorm.functional.layer_norm2d, converted by "
                   f"fastnorm.convert(); the output keeps the input's memory format (timm's is "
                   f"channels_last-strided whatever the input's).\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            fast = getattr(self, "_fast_norm", False)
            if x.dim() != 4 or (fast and fast_norm.has_apex):
                return super().forward(x)  # timm's permute error; apex's kernels
            if fast:
                x, w, b = _timm_fast_norm_inputs(fast_norm, x, self.weight, self.bias)
                with torch.autocast(x.device.type, enabled=False):
                    return FN.layer_norm2d(x, w, b, self.eps)
            return FN.layer_norm2d(x, self.weight, self.bias, self.eps)

    return _finish(Adapter, "TimmLayerNorm2d")


def _make_timm_layer_norm(base: type) -> type:
    fast_norm = importlib.import_module("timm.layers.fast_norm")

    class Adapter(base):
        __doc__ = (f"timm's LayerNorm (torch.nn.functional.layer_norm semantics, which timm's "
                   f"forward calls) on fastnorm.functional.layer_norm, converted by "
                   f"fastnorm.convert().\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            fast = getattr(self, "_fast_norm", False)
            shape = self.normalized_shape
            if ((fast and fast_norm.has_apex)
                    or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape):
                # apex's kernels; torch's error for a shape that does not end in normalized_shape
                return super().forward(x)
            if fast:
                x, w, b = _timm_fast_norm_inputs(fast_norm, x, self.weight, self.bias)
                with torch.autocast(x.device.type, enabled=False):
                    return FN.layer_norm(x, shape, w, b, self.eps)
            return FN.layer_norm(x, shape, self.weight, self.bias, self.eps)

    return _finish(Adapter, "TimmLayerNorm")


def _make_timm_group_norm(name: str) -> Callable[[type], type]:
    """timm's GroupNorm and GroupNorm1 (a GroupNorm of one group, num_groups=1 set by its
    __init__) have the same forward: torch's group_norm, or in fast-norm mode timm's
    fast_group_norm, which never uses apex."""

    def make(base: type) -> type:
        fast_norm = importlib.import_module("timm.layers.fast_norm")

        class Adapter(base):
            __doc__ = (f"timm's {base.__name__} (torch.nn.functional.group_norm semantics, which "
                       f"timm's forward calls, with the module's num_groups) on "
                       f"fastnorm.functional.group_norm, converted by fastnorm.convert()."
                       f"\n\n{base.__doc__ or ''}")

            def forward(self, x: Tensor) -> Tensor:
                if x.dim() < 2 or x.shape[1] != self.num_channels:
                    # torch's error for another channel count (or rank) than the layer's
                    return super().forward(x)
                if getattr(self, "_fast_norm", False):
                    x, w, b = _timm_fast_norm_inputs(fast_norm, x, self.weight, self.bias)
                    with torch.autocast(x.device.type, enabled=False):
                        return FN.group_norm(x, self.num_groups, w, b, self.eps)
                return FN.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

        return _finish(Adapter, name)

    return make


def _make_timm_rms_norm(base: type) -> Optional[type]:
    norm = importlib.import_module("timm.layers.norm")
    fast_norm = importlib.import_module("timm.layers.fast_norm")
    if (getattr(norm, "rms_norm", None) is not torch.nn.functional.rms_norm
            or not getattr(fast_norm, "has_torch_rms_norm", False)):
        # a timm whose RmsNorm runs its own rms_norm (squares in the input dtype), not torch's:
        # other numerics, so not converted
        return None

    class Adapter(base):
        __doc__ = (f"timm's RmsNorm on fastnorm.functional.rms_norm (torch.nn.functional.rms_norm "
                   f"semantics, which timm's forward calls), converted by fastnorm.convert()."
                   f"\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            fast = getattr(self, "_fast_norm", False)
            if fast and fast_norm.has_apex_rmsnorm:
                return super().forward(x)  # apex's kernels
            shape = list(self.normalized_shape)
            if fast:
                x, w = _timm_fast_norm_inputs(fast_norm, x, self.weight)
                with torch.autocast(x.device.type, enabled=False):
                    return FN.rms_norm(x, shape, w, self.eps)
            return FN.rms_norm(x, shape, self.weight, self.eps)

    return _finish(Adapter, "TimmRmsNorm")


def _make_torchvision_frozen_batch_norm(base: type) -> type:

    class Adapter(base):
        __doc__ = (f"torchvision's FrozenBatchNorm2d on fastnorm.functional.frozen_batch_norm "
                   f"(one elementwise pass), converted by fastnorm.convert().\n\n"
                   f"{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            c = x.shape[1] if x.dim() == 4 else -1
            if (not x.is_floating_point()
                    or any(t.numel() != c for t in (self.weight, self.bias, self.running_mean,
                                                    self.running_var))):
                # not an (N, C, H, W) float input with C channels: torchvision's broadcasting
                # (its result or its error), integer inputs promoted
                return super().forward(x)
            return FN.frozen_batch_norm(x, self.weight, self.bias, self.running_mean,
                                        self.running_var, self.eps)

    return _finish(Adapter, "TorchvisionFrozenBatchNorm2d")


# adapter name -> (module defining the original class, its name, the adapter's maker)
_SPECS: Dict[str, Tuple[str, str, Callable[[type], Optional[type]]]] = {
    "TimmLayerNorm": ("timm.layers.norm", "LayerNorm", _make_timm_layer_norm),
    "TimmLayerNorm2d": ("timm.layers.norm", "LayerNorm2d", _make_timm_layer_norm2d),
    "TimmGroupNorm": ("timm.layers.norm", "GroupNorm", _make_timm_group_norm("TimmGroupNorm")),
    "TimmGroupNorm1": ("timm.layers.norm", "GroupNorm1",
                       _make_timm_group_norm("TimmGroupNorm1")),
    "TimmRmsNorm": ("timm.layers.norm", "RmsNorm", _make_timm_rms_norm),
    "TorchvisionFrozenBatchNorm2d": ("torchvision.ops.misc", "FrozenBatchNorm2d",
                                     _make_torchvision_frozen_batch_norm),
}
ADAPTER_NAMES = tuple(_SPECS)
_made: Dict[str, Optional[type]] = {}  # adapter name -> adapter (None: that package's class
                                       # is missing or computes something else)


def _make(name: str) -> Optional[type]:
    if name not in _made:
        module_name, cls_name, maker = _SPECS[name]
        base = getattr(importlib.import_module(module_name), cls_name, None)
        adapter = maker(base) if isinstance(base, type) and issubclass(base, nn.Module) else None
        _made[name] = adapter
        if adapter is not None:
            globals()[name] = adapter
    return _made[name]


def adapters() -> Dict[type, type]:
    """{original class: adapter} for every adapter whose package has been imported."""
    for name, (module_name, _, _) in _SPECS.items():
        if name not in _made and module_name in sys.modules:
            _make(name)
    return {cls.__bases__[0]: cls for cls in _made.values() if cls is not None}


def __getattr__(name: str):
    # pickle (and a plain attribute access) finds an adapter not made yet in this process
    if name in _SPECS:
        adapter = _make(name)
        if adapter is not None:
            return adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
