"""Drop-in torch.nn normalisation layers running on the fastnorm:: ops.

Each class subclasses its torch.nn counterpart and replaces only the computation, so
isinstance checks, state_dict keys and versioning, constructor signatures, extra_repr and lazy
initialisation are torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as FN

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d",
    "FrozenBatchNorm2d",
    "LayerNorm2d",
]

__all__.append("RMSNorm")
__all__.append("LocalResponseNorm")

class _BatchNormForward:
    """torch.nn's _BatchNorm.forward, on fastnorm's op: num_batches_tracked is incremented by the
    op itself (on the device, after every check), momentum=None reads it on the device rather
    than with a host sync, and a checkpoint recomputation updates nothing."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return batch_norm_module_forward(self, input)


def batch_norm_module_forward(self: nn.Module, input: Tensor, act=(0, 0.0)) -> Tensor:
    """torch.nn's _BatchNorm.forward after its input check, on fastnorm's op, for any module with
    _BatchNorm's attributes (timm's BatchNormAct2d too); act: a fused activation (code, param)."""
    tracking = self.training and self.track_running_stats
    if tracking and FN.in_checkpoint_recomputation():
        # The first forward already updated the buffers: normalise with batch statistics and
        # let the update go to copies (the same autograd graph as the first forward's, which
        # a non-reentrant checkpoint compares with the recomputation's; on the op path the
        # graph is the same either way).
        rm, rv = self.running_mean, self.running_var
        return FN._batch_norm(input, None if rm is None else rm.clone(),
                              None if rv is None else rv.clone(), self.weight, self.bias,
                              True, 0.0, self.eps, act=act)
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    use_buffers = not self.training or self.track_running_stats
    nbt = self.num_batches_tracked if tracking else None
    momentum = self.momentum
    if momentum is None and nbt is None:
        momentum = 0.0  # nothing is updated: the factor is unused
    return FN._batch_norm(
        input,
        self.running_mean if use_buffers else None,
        self.running_var if use_buffers else None,
        self.weight, self.bias, bn_training, momentum, self.eps, nbt, act=act)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    __doc__ = nn.BatchNorm1d.__doc__


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    __doc__ = nn.BatchNorm2d.__doc__


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    __doc__ = nn.BatchNorm3d.__doc__


class LazyBatchNorm1d(_BatchNormForward, nn.LazyBatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, nn.LazyBatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, nn.LazyBatchNorm3d):
    cls_to_become = BatchNorm3d


class _InstanceNormApply:
    """torch.nn's _InstanceNorm.forward (input checks, unbatched input, the channel-count warning)
    stays; only the computation is replaced (and a checkpoint recomputation updates nothing)."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        use_input_stats = self.training or not self.track_running_stats
        recompute = self.training and self.track_running_stats and FN.in_checkpoint_recomputation()
        return FN._instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, use_input_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps,
            update_running_stats=not recompute)


class InstanceNorm1d(_InstanceNormApply, nn.InstanceNorm1d):
    __doc__ = nn.InstanceNorm1d.__doc__


class InstanceNorm2d(_InstanceNormApply, nn.InstanceNorm2d):
    __doc__ = nn.InstanceNorm2d.__doc__


class InstanceNorm3d(_InstanceNormApply, nn.InstanceNorm3d):
    __doc__ = nn.InstanceNorm3d.__doc__


class LazyInstanceNorm1d(_InstanceNormApply, nn.LazyInstanceNorm1d):
    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_InstanceNormApply, nn.LazyInstanceNorm2d):
    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_InstanceNormApply, nn.LazyInstanceNorm3d):
    cls_to_become = InstanceNorm3d


class LayerNorm(nn.LayerNorm):
    __doc__ = nn.LayerNorm.__doc__

    def forward(self, input: Tensor) -> Tensor:
        return FN.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    __doc__ = nn.GroupNorm.__doc__

    def forward(self, input: Tensor) -> Tensor:
        return FN.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with frozen statistics and affine parameters: torchvision.ops.FrozenBatchNorm2d
    (the detection backbones' norm layer), without a torchvision dependency.

    Args:
        num_features: C of an (N, C, H, W) input.
        eps: added to running_var. Default: 1e-5.

    Buffers only, no parameters: weight (ones), bias (zeros), running_mean (zeros), running_var
    (ones); the same state_dict keys as torchvision's, and loading a BatchNorm2d's state_dict
    drops its num_batches_tracked as torchvision's does. Training and evaluation compute the same
    thing: y = x * scale + shift per channel (fastnorm.functional.frozen_batch_norm: output dtype
    by type promotion with the buffers, the input's memory format, gradient to the input only).
    Unlike torchvision's module, whose broadcasting turns some wrong shapes into outputs of
    another shape, an input that is not (N, num_features, H, W) raises.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a BatchNorm2d checkpoint has a counter that a frozen layer has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input of shape "
                             f"{tuple(input.shape)})")
        return FN.frozen_batch_norm(input, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNorm(nn.RMSNorm):
    __doc__ = nn.RMSNorm.__doc__

    def forward(self, x: Tensor) -> Tensor:
        return FN.rms_norm(x, list(self.normalized_shape), self.weight, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of an (N, C, H, W) input (ConvNeXt's
    channels-first LayerNorm): timm's `LayerNorm2d`, with its arguments and state_dict (a
    torch.nn.LayerNorm with normalized_shape (C,): weight and bias of shape (C,)), computed
    without permute copies; the output keeps the input's memory format. Any spatial rank
    (N, C, *) is accepted."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device,
                         dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return FN.layer_norm2d(input, self.weight, self.bias, self.eps)


class LocalResponseNorm(nn.LocalResponseNorm):
    __doc__ = nn.LocalResponseNorm.__doc__

    def forward(self, input: Tensor) -> Tensor:
        return FN.local_response_norm(input, self.size, self.alpha, self.beta, self.k)


# torch.nn class -> fastnorm class; convert() and revert() use it both ways. Classes with no
# torch.nn twin (FrozenBatchNorm2d) are not in it.
TORCH_TO_FASTNORM = {
    getattr(nn, name): globals()[name] for name in __all__ if hasattr(nn, name)
}
FASTNORM_TO_TORCH = {v: k for k, v in TORCH_TO_FASTNORM.items()}
