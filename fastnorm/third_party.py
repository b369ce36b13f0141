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
| timm.layers.BatchNormAct2d                 | TimmBatchNormAct2d            | functional.batch_norm_act    |
| timm.layers.SyncBatchNormAct               | TimmSyncBatchNormAct          | fastnorm.SyncBatchNorm, act  |
| timm.layers.FrozenBatchNormAct2d           | TimmFrozenBatchNormAct2d      | frozen_batch_norm + act      |
| timm.layers.GroupNormAct                   | TimmGroupNormAct              | functional.group_norm_act    |
| timm.layers.GroupNorm1Act                  | TimmGroupNorm1Act             | functional.group_norm_act    |
| timm.layers.LayerNormAct                   | TimmLayerNormAct              | functional.layer_norm_act    |
| timm.layers.LayerNormAct2d                 | TimmLayerNormAct2d            | functional.layer_norm2d_act  |
| timm.layers.LayerNormActFp32               | TimmLayerNormActFp32          | functional.layer_norm_act    |
| timm.layers.LayerNormAct2dFp32             | TimmLayerNormAct2dFp32        | functional.layer_norm2d_act  |
| timm.layers.RmsNormAct                     | TimmRmsNormAct                | functional.rms_norm, act     |
| torchvision.ops.FrozenBatchNorm2d          | TorchvisionFrozenBatchNorm2d  | functional.frozen_batch_norm |

timm's norm + activation layers (`*Act*`) run norm -> drop -> act. When `drop` is a plain
nn.Identity and `act` is an activation fastnorm.activations.from_module knows (torch's or timm's
ReLU, ReLU6, LeakyReLU, SiLU/Swish, GELU (both approximations), Hardswish, Hardsigmoid, Mish,
Sigmoid, Tanh, Identity; in-place or not; no hooks on either), the activation is fused into the
norm (applied before the one rounding, its input not saved for backward: the backward recomputes
it). Otherwise the adapter runs the norm on fastnorm, then timm's `drop` and `act` modules as
timm's forward does (dropout draws from torch's RNG exactly as before). The activation is looked
up at every call, so replacing `module.act` after convert() works. RMSNorm and SyncBatchNorm have
no fused epilogue: their `act` runs after the norm.

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


def _frozen_bn_fits(m: nn.Module, x: Tensor) -> bool:
    """A FrozenBatchNorm2d (torchvision's, timm's *Act) input fastnorm's kernel takes: a float
    (N, C, H, W) tensor whose C matches the four buffers. Anything else keeps the original
    forward's broadcasting."""
    c = x.shape[1] if x.dim() == 4 else -1
    return x.is_floating_point() and all(
        t.numel() == c for t in (m.weight, m.bias, m.running_mean, m.running_var))


def _make_torchvision_frozen_batch_norm(base: type) -> type:

    class Adapter(base):
        __doc__ = (f"torchvision's FrozenBatchNorm2d on fastnorm.functional.frozen_batch_norm "
                   f"(one elementwise pass), converted by fastnorm.convert().\n\n"
                   f"{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            if not _frozen_bn_fits(self, x):
                # torchvision's broadcasting (its result or its error), integer inputs promoted
                return super().forward(x)
            return FN.frozen_batch_norm(x, self.weight, self.bias, self.running_mean,
                                        self.running_var, self.eps)

    return _finish(Adapter, "TorchvisionFrozenBatchNorm2d")


# ----------------------------------------------------------------------------------------------
# timm's norm + activation layers
# ----------------------------------------------------------------------------------------------
_NO_ACT = (0, 0.0)


def _fused_act(module: nn.Module) -> Optional[Tuple[int, float]]:
    """(code, param) of module.act when module.drop is a plain nn.Identity and fastnorm knows
    module.act; None when the drop and act modules must run as modules."""
    from . import activations as A
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if drop is None or act is None or A.from_module(drop) != ("identity", 0.0):
        return None
    found = A.from_module(act)
    if found is None:
        return None
    return A.code_of(found[0]), found[1]


def _drop_act(module: nn.Module, y: Tensor) -> Tensor:
    """timm's tail: drop, then act (each only when the module has it, as SyncBatchNormAct)."""
    if hasattr(module, "drop"):
        y = module.drop(y)
    if hasattr(module, "act"):
        y = module.act(y)
    return y


def _norm_act(module: nn.Module, norm: Callable[[Tuple[int, float]], Tensor],
              timm_layout: Optional[torch.memory_format] = None, fuse: bool = True) -> Tensor:
    """norm(act) with the activation fused when it can be (and fuse), else norm -> drop -> act.
    timm_layout: the memory format of timm's norm output, given to the drop layer (dropout draws
    its mask in memory order, so the same elements are dropped as in timm)."""
    act = _fused_act(module) if fuse else None
    if act is not None:
        return norm(act)
    y = norm(_NO_ACT)
    if (timm_layout is not None and y.dim() == 4
            and type(getattr(module, "drop", None)) is not nn.Identity):
        y = y.contiguous(memory_format=timm_layout)
    return _drop_act(module, y)


def _make_timm_batch_norm_act(base: type) -> type:
    from .modules import batch_norm_module_forward

    class Adapter(base):
        __doc__ = (f"timm's BatchNormAct2d (torch.nn.BatchNorm2d's running-statistics logic, "
                   f"which timm's forward copies, then drop and act) on "
                   f"fastnorm.functional.batch_norm_act, the activation fused when it can be "
                   f"(fastnorm.third_party), converted by fastnorm.convert().\n\n"
                   f"{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            if x.dim() != 4:
                return super().forward(x)  # timm's assertion
            return _norm_act(self, lambda act: batch_norm_module_forward(self, x, act))

    return _finish(Adapter, "TimmBatchNormAct2d")


def _make_timm_sync_batch_norm_act(base: type) -> type:
    from .sync_batchnorm import SyncBatchNorm

    class Adapter(base):
        __doc__ = (f"timm's SyncBatchNormAct on fastnorm.SyncBatchNorm's forward, then timm's "
                   f"drop and act (not fused), converted by fastnorm.convert().\n\n"
                   f"{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            return _drop_act(self, SyncBatchNorm.forward(self, x))

    return _finish(Adapter, "TimmSyncBatchNormAct")


def _make_timm_frozen_batch_norm_act(base: type) -> type:

    class Adapter(base):
        __doc__ = (f"timm's FrozenBatchNormAct2d (torchvision's FrozenBatchNorm2d formula, then "
                   f"drop and act) on fastnorm.functional.frozen_batch_norm, the activation fused "
                   f"when it can be, converted by fastnorm.convert().\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            if not _frozen_bn_fits(self, x):
                return super().forward(x)  # timm's broadcasting: its result or its error
            return _norm_act(self, lambda act: FN._frozen_batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, act))

    return _finish(Adapter, "TimmFrozenBatchNormAct2d")


def _make_timm_group_norm_act(name: str) -> Callable[[type], type]:
    """GroupNormAct and GroupNorm1Act: torch's group_norm (or timm's fast_group_norm) with the
    module's num_groups, then drop and act."""

    def make(base: type) -> type:
        fast_norm = importlib.import_module("timm.layers.fast_norm")

        class Adapter(base):
            __doc__ = (f"timm's {base.__name__} on fastnorm.functional.group_norm_act, the "
                       f"activation fused when it can be (fastnorm.third_party), converted by "
                       f"fastnorm.convert().\n\n{base.__doc__ or ''}")

            def forward(self, x: Tensor) -> Tensor:
                if x.dim() < 2 or x.shape[1] != self.num_channels:
                    return super().forward(x)  # torch's error
                w, b = self.weight, self.bias
                if getattr(self, "_fast_norm", False):
                    x, w, b = _timm_fast_norm_inputs(fast_norm, x, w, b)

                    def norm(act):
                        with torch.autocast(x.device.type, enabled=False):
                            return FN._group_norm(x, self.num_groups, w, b, self.eps, act)
                else:
                    def norm(act):
                        return FN._group_norm(x, self.num_groups, w, b, self.eps, act)
                return _norm_act(self, norm)

        return _finish(Adapter, name)

    return make


def _make_timm_layer_norm_act(base: type) -> type:
    fast_norm = importlib.import_module("timm.layers.fast_norm")

    class Adapter(base):
        __doc__ = (f"timm's LayerNormAct on fastnorm.functional.layer_norm_act, the activation "
                   f"fused when it can be (fastnorm.third_party), converted by fastnorm.convert()."
                   f"\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            fast = getattr(self, "_fast_norm", False)
            shape = tuple(self.normalized_shape)
            if ((fast and fast_norm.has_apex)
                    or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape):
                return super().forward(x)  # apex's kernels; torch's error
            w, b = self.weight, self.bias
            if fast:
                x, w, b = _timm_fast_norm_inputs(fast_norm, x, w, b)

                def norm(act):
                    with torch.autocast(x.device.type, enabled=False):
                        return FN._layer_norm(x, list(shape), w, b, self.eps, act)
            else:
                def norm(act):
                    return FN._layer_norm(x, list(shape), w, b, self.eps, act)
            return _norm_act(self, norm)

    return _finish(Adapter, "TimmLayerNormAct")


def _make_timm_layer_norm_act2d(base: type) -> type:
    fast_norm = importlib.import_module("timm.layers.fast_norm")

    class Adapter(base):
        __doc__ = (f"timm's LayerNormAct2d (LayerNorm over the channels of each position of an "
                   f"(N, C, H, W) input, then drop and act) on "
                   f"fastnorm.functional.layer_norm2d_act, the activation fused when it can be, "
                   f"converted by fastnorm.convert(); the output keeps the input's memory format "
                   f"(timm's is channels_last-strided whatever the input's).\n\n"
                   f"{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            fast = getattr(self, "_fast_norm", False)
            if (x.dim() != 4 or (fast and fast_norm.has_apex)
                    or tuple(self.normalized_shape) != (x.shape[1],)):
                return super().forward(x)  # timm's permute / torch's shape error; apex
            w, b = self.weight, self.bias
            if fast:
                x, w, b = _timm_fast_norm_inputs(fast_norm, x, w, b)

                def norm(act):
                    with torch.autocast(x.device.type, enabled=False):
                        return FN._layer_norm2d(x, w, b, self.eps, act)
            else:
                def norm(act):
                    return FN._layer_norm2d(x, w, b, self.eps, act)
            return _norm_act(self, norm, torch.channels_last)

    return _finish(Adapter, "TimmLayerNormAct2d")


def _make_timm_layer_norm_act_fp32(two_d: bool) -> Callable[[type], type]:
    """LayerNormActFp32 / LayerNormAct2dFp32: the norm of x.float() with float32 parameters,
    rounded to x's dtype, then drop and act (fused: act in float32, then the one rounding)."""
    name = "TimmLayerNormAct2dFp32" if two_d else "TimmLayerNormActFp32"

    def make(base: type) -> type:

        class Adapter(base):
            __doc__ = (f"timm's {base.__name__} on fastnorm.functional."
                       f"{'layer_norm2d_act' if two_d else 'layer_norm_act'} in float32, the "
                       f"activation fused when it can be, converted by fastnorm.convert()."
                       f"\n\n{base.__doc__ or ''}")

            def forward(self, x: Tensor) -> Tensor:
                shape = tuple(self.normalized_shape)
                if two_d:
                    ok = x.dim() == 4 and shape == (x.shape[1],)
                else:
                    ok = x.dim() >= len(shape) and tuple(x.shape[x.dim() - len(shape):]) == shape
                if not ok or not x.is_floating_point():
                    return super().forward(x)  # timm's / torch's error
                w = None if self.weight is None else self.weight.float()
                b = None if self.bias is None else self.bias.float()
                xf = x.float()

                def norm(act):
                    if two_d:
                        y = FN._layer_norm2d(xf, w, b, self.eps, act)
                    else:
                        y = FN._layer_norm(xf, list(shape), w, b, self.eps, act)
                    return y.to(x.dtype)
                # float64 input: timm's activation runs in float64 on the rounded norm; fused, it
                # would run in float32
                return _norm_act(self, norm, torch.channels_last if two_d else None,
                                 fuse=x.dtype != torch.float64)

        return _finish(Adapter, name)

    return make


def _make_timm_rms_norm_act(base: type) -> Optional[type]:
    """RmsNormAct: timm's RmsNorm adapter's computation, then drop and act (no fused epilogue
    for RMSNorm)."""
    rms = _make("TimmRmsNorm")
    if rms is None:
        return None
    fast_norm = importlib.import_module("timm.layers.fast_norm")

    class Adapter(base):
        __doc__ = (f"timm's RmsNormAct on fastnorm.functional.rms_norm, then timm's drop and act, "
                   f"converted by fastnorm.convert().\n\n{base.__doc__ or ''}")

        def forward(self, x: Tensor) -> Tensor:
            if getattr(self, "_fast_norm", False) and fast_norm.has_apex_rmsnorm:
                return super().forward(x)  # apex's kernels
            return _drop_act(self, rms.forward(self, x))

    return _finish(Adapter, "TimmRmsNormAct")


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
    "TimmBatchNormAct2d": ("timm.layers.norm_act", "BatchNormAct2d", _make_timm_batch_norm_act),
    "TimmSyncBatchNormAct": ("timm.layers.norm_act", "SyncBatchNormAct",
                             _make_timm_sync_batch_norm_act),
    "TimmFrozenBatchNormAct2d": ("timm.layers.norm_act", "FrozenBatchNormAct2d",
                                 _make_timm_frozen_batch_norm_act),
    "TimmGroupNormAct": ("timm.layers.norm_act", "GroupNormAct",
                         _make_timm_group_norm_act("TimmGroupNormAct")),
    "TimmGroupNorm1Act": ("timm.layers.norm_act", "GroupNorm1Act",
                          _make_timm_group_norm_act("TimmGroupNorm1Act")),
    "TimmLayerNormAct": ("timm.layers.norm_act", "LayerNormAct", _make_timm_layer_norm_act),
    "TimmLayerNormAct2d": ("timm.layers.norm_act", "LayerNormAct2d", _make_timm_layer_norm_act2d),
    "TimmLayerNormActFp32": ("timm.layers.norm_act", "LayerNormActFp32",
                             _make_timm_layer_norm_act_fp32(False)),
    "TimmLayerNormAct2dFp32": ("timm.layers.norm_act", "LayerNormAct2dFp32",
                               _make_timm_layer_norm_act_fp32(True)),
    "TimmRmsNormAct": ("timm.layers.norm_act", "RmsNormAct", _make_timm_rms_norm_act),
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
