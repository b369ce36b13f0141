"""Masked (variable-length) norm layers: fastnorm's drop-in BatchNorm, InstanceNorm and GroupNorm
with forward(input, mask=None, lengths=None).

Each subclasses fastnorm's layer (itself a subclass of torch.nn's), so the constructor,
parameters, buffers, state_dict (a torch.nn.BatchNorm2d checkpoint loads into
MaskedBatchNorm2d) and extra_repr are torch's. Without mask and lengths forward is the plain
layer's. With one (fastnorm.functional.masked_batch_norm's conventions: lengths [N] over the last
dimension, or a bool mask broadcastable to (N, *spatial)), statistics cover the valid positions
only and the output is 0 at the invalid ones; running statistics and num_batches_tracked follow
the plain layer (updated only in training with track_running_stats, never by a call that
raises).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import masked as _masked
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d)

__all__ = [
    "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d",
    "MaskedInstanceNorm1d", "MaskedInstanceNorm2d", "MaskedInstanceNorm3d",
    "MaskedGroupNorm",
]


class _MaskedBatchNorm:
    def forward(self, input: Tensor, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if mask is None and lengths is None:
            return super().forward(input)
        self._check_input_dim(input)
        return _masked.batch_norm_module_forward(self, input, lengths, mask)


class MaskedBatchNorm1d(_MaskedBatchNorm, BatchNorm1d):
    """BatchNorm1d over the valid positions: (N, C, L) with lengths [N] or a mask (N, L), or
    (N, C) with a mask (N,) selecting the samples that count."""


class MaskedBatchNorm2d(_MaskedBatchNorm, BatchNorm2d):
    """BatchNorm2d over the valid positions: (N, C, H, W) with lengths [N] (columns w <
    lengths[n]) or a mask broadcastable to (N, H, W)."""


class MaskedBatchNorm3d(_MaskedBatchNorm, BatchNorm3d):
    """BatchNorm3d over the valid positions: (N, C, D, H, W) with lengths [N] (over W) or a mask
    broadcastable to (N, D, H, W)."""


class _MaskedInstanceNorm:
    def forward(self, input: Tensor, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if mask is None and lengths is None:
            return super().forward(input)
        return _masked.instance_norm_module_forward(self, input, lengths, mask)


class MaskedInstanceNorm1d(_MaskedInstanceNorm, InstanceNorm1d):
    """InstanceNorm1d over each sample's valid positions: (N, C, L) with lengths [N] or a mask
    (N, L). Batched input only when a validity is given."""


class MaskedInstanceNorm2d(_MaskedInstanceNorm, InstanceNorm2d):
    """InstanceNorm2d over each sample's valid positions: (N, C, H, W) with lengths [N] (columns
    w < lengths[n]) or a mask broadcastable to (N, H, W). Batched input only when a validity is
    given."""


class MaskedInstanceNorm3d(_MaskedInstanceNorm, InstanceNorm3d):
    """InstanceNorm3d over each sample's valid positions: (N, C, D, H, W) with lengths [N] (over
    W) or a mask broadcastable to (N, D, H, W). Batched input only when a validity is given."""


class MaskedGroupNorm(GroupNorm):
    """GroupNorm over each group's channels x the sample's valid positions: (N, C, *) with
    lengths [N] (over the last dimension) or a mask broadcastable to (N, *spatial) ((N,) for an
    (N, C) input)."""

    def forward(self, input: Tensor, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if mask is None and lengths is None:
            return super().forward(input)
        return _masked.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                  lengths, mask)
