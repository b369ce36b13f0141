"""The source articles' norms built on the per-(n, c) primitives: Switchable
Normalization (SwitchNorm1d/2d/3d), AdaIN (AdaptiveInstanceNorm) and IBN-Net's IBN block.

Each module keeps its reference's constructor, parameters, buffers and state_dict keys, so the
reference's checkpoints load; the computation runs on the Functions of
fastnorm/instance_stats_autograd.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as FN
from .modules import BatchNorm2d, InstanceNorm2d
from .instance_stats_autograd import IBNFunction, SwitchNorm1dFunction, SwitchNormFunction
from .sync_batchnorm import _update_running_stats

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "AdaptiveInstanceNorm", "IBN"]


def _check_dim(input: Tensor, dims: int) -> None:
    if input.dim() != dims:
        raise ValueError(f"expected {dims}D input (got {input.dim()}D input of shape "
                         f"{tuple(input.shape)})")


def _check_channels(name: str, input: Tensor, channels: int) -> None:
    if not input.is_floating_point():
        raise RuntimeError(f"{name}: expected a floating-point input (float16, bfloat16, float32 "
                           f"or float64), but got dtype {input.dtype}")
    if input.shape[1] != channels:
        raise RuntimeError(f"{name}: expected input with {channels} channels (dim 1), but got "
                           f"input of shape {tuple(input.shape)}")


class _SwitchNormBase(nn.Module):
    """Parameters, buffers and the running-statistics update shared by SwitchNorm1d/2d/3d.

    The running statistics follow the reference's convention, the opposite of torch.nn's:
        running = momentum * running + (1 - momentum) * batch      (using_moving_average=True)
        running_mean += mean_bn, running_var += mean_bn^2 + var_bn  (using_moving_average=False)
    where var_bn is the BN variance the layer normalised with. A batch with no elements updates
    nothing (the reference would write NaN)."""

    _dims = 4
    _mix_terms = 3

    def _update(self, mean_bn: Tensor, var_bn: Tensor) -> None:
        with torch.no_grad():
            rm, rv = self.running_mean, self.running_var
            mean_bn = mean_bn.view(rm.shape)
            var_bn = var_bn.view(rv.shape)
            if self.using_moving_average:
                rm.mul_(self.momentum).add_(((1 - self.momentum) * mean_bn).to(rm.dtype))
                rv.mul_(self.momentum).add_(((1 - self.momentum) * var_bn).to(rv.dtype))
            else:
                rm.add_(mean_bn.to(rm.dtype))
                rv.add_((mean_bn * mean_bn + var_bn).to(rv.dtype))

    def _should_update(self, input: Tensor, mean_bn: Tensor) -> bool:
        return (self.training and mean_bn.numel() > 0 and input.numel() > 0
                and not FN.in_checkpoint_recomputation())


class _SwitchNormNd(_SwitchNormBase):
    """SwitchNorm2d / SwitchNorm3d (Luo et al. 2018, the authors' devkit/ops/switchable_norm.py):
    IN, LN and BN statistics mixed by learned softmax weights.

    Per (n, c): mean_in and the unbiased var_in over the spatial positions; mean_ln = mean_c(mean_in),
    var_ln = mean_c(var_in + mean_in^2) - mean_ln^2; in training mean_bn = mean_n(mean_in),
    var_bn = mean_n(var_in + mean_in^2) - mean_bn^2, in eval the running buffers; mean and var
    are the softmax(mean_weight)- and softmax(var_weight)-weighted sums (IN, LN[, BN]) and
    y = (x - mean) / sqrt(var + eps) * weight + bias. One spatial position gives NaN (the
    unbiased variance of one value), as the reference does.

    Args:
        num_features: C. eps: added to the mixed variance. momentum: the weight of the old
        running value (0.9 for 2d, 0.997 for 3d: the reference's defaults and convention).
        using_moving_average: False accumulates running sums instead (see _SwitchNormBase).
        using_bn: mix BN statistics too (mean_weight/var_weight of 3 entries, and running
        buffers); False mixes IN and LN only (2 entries, no buffers). last_gamma: weight starts
        at 0 (for the last norm of a residual block).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9,
                 using_moving_average: bool = True, using_bn: bool = True,
                 last_gamma: bool = False):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        shape = (1, num_features) + (1,) * (self._dims - 2)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        k = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(k))
        self.var_weight = nn.Parameter(torch.ones(k))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
            self.register_buffer("running_var", torch.zeros(1, num_features, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.zero_()
        with torch.no_grad():
            self.weight.fill_(0 if self.last_gamma else 1)
            self.bias.zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        _check_dim(input, self._dims)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_channels(type(self).__name__, input, self.num_features)
        rm = self.running_mean if self.using_bn else None
        rv = self.running_var if self.using_bn else None
        y, mean_bn, var_bn = SwitchNormFunction.apply(
            input, self.weight, self.bias, self.mean_weight, self.var_weight, rm, rv,
            self.training, self.using_bn, self.eps)
        if self.using_bn and self._should_update(input, mean_bn):
            self._update(mean_bn, var_bn)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}, "
                f"last_gamma={self.last_gamma}")


class SwitchNorm2d(_SwitchNormNd):
    __doc__ = _SwitchNormNd.__doc__
    _dims = 4


class SwitchNorm3d(_SwitchNormNd):
    __doc__ = _SwitchNormNd.__doc__
    _dims = 5

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997,
                 using_moving_average: bool = True, using_bn: bool = True,
                 last_gamma: bool = False):
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn, last_gamma)


class SwitchNorm1d(_SwitchNormBase):
    """SwitchNorm1d of the authors' reference: an (N, C) input, LN statistics over the C features
    of each sample and BN statistics over the N samples of each feature (batch in training, the
    running buffers in eval), both with the unbiased variance, mixed by softmax(mean_weight) and
    softmax(var_weight) (2 entries each): y = (x - mean) / sqrt(var + eps) * weight + bias.
    weight, bias, running_mean, running_var: (1, C). Running statistics as SwitchNorm2d's
    (momentum 0.997, the reference's convention). N = 1 in training or C = 1 give NaN (the
    unbiased variance of one value), as the reference does."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997,
                 using_moving_average: bool = True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.weight = nn.Parameter(torch.ones(1, num_features))
        self.bias = nn.Parameter(torch.zeros(1, num_features))
        self.mean_weight = nn.Parameter(torch.ones(2))
        self.var_weight = nn.Parameter(torch.ones(2))
        self.register_buffer("running_mean", torch.zeros(1, num_features))
        self.register_buffer("running_var", torch.zeros(1, num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.running_mean.zero_()
        self.running_var.zero_()
        with torch.no_grad():
            self.weight.fill_(1)
            self.bias.zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        _check_dim(input, 2)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_channels("SwitchNorm1d", input, self.num_features)
        y, mean_bn, var_bn = SwitchNorm1dFunction.apply(
            input, self.weight, self.bias, self.mean_weight, self.var_weight, self.running_mean,
            self.running_var, self.training, self.eps)
        if self._should_update(input, mean_bn):
            self._update(mean_bn, var_bn)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"using_moving_average={self.using_moving_average}")


class AdaptiveInstanceNorm(nn.Module):
    """AdaIN (Huang & Belongie 2017) as a module: forward(content, style) =
    fastnorm.functional.adaptive_instance_norm(content, style, eps, unbiased). No parameters."""

    def __init__(self, eps: float = 1e-5, unbiased: bool = True):
        super().__init__()
        self.eps = eps
        self.unbiased = unbiased

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        return FN.adaptive_instance_norm(content, style, self.eps, self.unbiased)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, unbiased={self.unbiased}"


class IBN(nn.Module):
    """The IBN block of IBN-Net (Pan et al. 2018): an affine InstanceNorm2d (submodule `IN`) on
    the first `half = int(planes * ratio)` channels and a BatchNorm2d (submodule `BN`) on the
    other planes - half, with IBN-Net's state_dict keys (IN.weight, IN.bias, BN.weight, BN.bias,
    BN.running_mean, BN.running_var, BN.num_batches_tracked), so IBN-Net checkpoints load.

    Any ratio (0 <= half <= planes). No split and no cat of x: one statistics pass over every
    channel and one apply pass write both halves into one output, which keeps the input's
    memory format. The BatchNorm half follows fastnorm's BatchNorm2d (torch.nn's semantics):
    momentum (None: cumulative average), train/eval, track_running_stats, num_batches_tracked,
    eps; its running statistics are updated by the same code as SyncBatchNorm's. The
    InstanceNorm half always uses instance statistics (IBN-Net's IN tracks no running
    statistics).
    """

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.planes = planes
        self.half = int(planes * ratio)
        if not 0 <= self.half <= planes:
            raise ValueError(f"IBN: expected 0 <= int(planes * ratio) <= planes, but got "
                             f"planes={planes}, ratio={ratio} (half={self.half})")
        self.IN = InstanceNorm2d(self.half, affine=True)
        self.BN = BatchNorm2d(planes - self.half)

    def forward(self, input: Tensor) -> Tensor:
        _check_dim(input, 4)
        _check_channels("IBN", input, self.planes)
        inorm, bn = self.IN, self.BN
        h = self.half
        if inorm.track_running_stats:
            raise NotImplementedError("IBN: the IN half with track_running_stats=True is not "
                                      "supported (IBN-Net's IN tracks no running statistics)")
        if h > 0:
            FN._verify_spatial_size(input)  # InstanceNorm's check (instance statistics)
        # BatchNorm2d's decisions, as _BatchNormForward.forward makes them
        tracking = bn.training and bn.track_running_stats
        recompute = tracking and FN.in_checkpoint_recomputation()
        bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_buffers = not bn.training or bn.track_running_stats
        rm = bn.running_mean if use_buffers else None
        rv = bn.running_var if use_buffers else None
        if h < self.planes:
            if bn_training:
                FN._verify_batch_size(input)
                if bn.eps <= 0.0:
                    raise ValueError(f"batch_norm eps must be positive during training, but got "
                                     f"{bn.eps}")
            if bn.momentum is None and tracking and bn.num_batches_tracked is None:
                raise ValueError("IBN: BN momentum=None (cumulative average) needs "
                                 "num_batches_tracked")
        y, mean_bn, var_bn = IBNFunction.apply(
            input, inorm.weight, inorm.bias, bn.weight, bn.bias, rm, rv, h, bn_training,
            inorm.eps, bn.eps)
        # a BN half of no channels (ratio 1) is not run: its counter stays as it is
        if bn_training and rm is not None and not recompute and h < self.planes:
            count = mean_bn.new_full(mean_bn.shape, float(input.shape[0] * math.prod(input.shape[2:])))
            with torch.no_grad():
                _update_running_stats(rm, rv, bn.num_batches_tracked if tracking else None,
                                      bn.momentum, count, mean_bn, var_bn * count)
        return y

    def extra_repr(self) -> str:
        return f"planes={self.planes}, half={self.half}"
