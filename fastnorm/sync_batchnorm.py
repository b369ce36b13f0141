"""SyncBatchNorm: BatchNorm whose statistics cover the batches of every rank of a process group.

Forward (training, more than one rank):
  1. every rank computes its local per-channel (count, mean, M2) with `fastnorm::batch_norm_stats`
     (M2 = sum of squared deviations from the local mean);
  2. one collective, an all-gather of the [3, C] tensor, gives every rank all of them;
  3. every rank merges them with Chan's formula in rank order (`fastnorm::batch_norm_merge_stats`).
     The gathered tensor is the same on every rank and the merge is a fixed sequence of
     operations, so every rank holds bitwise-identical statistics (on identical devices). A rank
     with an empty batch contributes count 0 and changes nothing (no NaN);
  4. the running statistics are updated from the merged ones (the unbiased variance M2 / (n - 1)),
     on the device, without a host synchronisation (momentum=None included);
  5. `fastnorm::batch_norm_elemt` normalises the local batch with the global statistics.
Backward: the local per-channel sums of dy and dy * xhat (`fastnorm::batch_norm_bwd_reduce`),
one all-reduce (SUM) of the [2, C] tensor of them, then `fastnorm::batch_norm_bwd_elemt` for dx.
The order in which the backend adds the ranks' sums is the backend's (NCCL and gloo give every
rank the same result). As in torch.nn.SyncBatchNorm, the weight and bias gradients are the
*local* ones: DistributedDataParallel reduces them like every other parameter gradient.

Everything else (eval, no process group, a world of one rank) is fastnorm's BatchNorm, following
torch.nn.SyncBatchNorm's conditions. Unlike torch's, it runs on CPU tensors (gloo) too.

A recomputation under torch.utils.checkpoint runs the collective again (every rank recomputes)
but does not update the running statistics a second time.

With a validity (forward(input, mask=None, lengths=None), fastnorm/masked.py's conventions) the
statistics cover the valid positions only: step 1 becomes nc_moments over each sample's valid
positions merged into this rank's (count, mean, M2) with count = this rank's valid positions
(a different count on every rank), steps 2-4 are the same, and step 5 is nc_affine (0 at the
invalid positions). The backward's local sums run over the valid positions (nc_grad_sums), are
all-reduced the same way, and nc_affine_grad writes dx (0 at the invalid positions).

The ops have reference implementations (ATen ops, every device); no compiled CUDA kernels exist
for them yet, so on CUDA they run the reference path too.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import functional as FN
from . import masked as _masked
from .instance_stats_autograd import affine_coefficients
from .modules import _BatchNormForward
from .ops.common import lib, memory_format_of, stat_dtype

__all__ = ["SyncBatchNorm"]

_fn = torch.ops.fastnorm

# ----------------------------------------------------------------------------------------------
# ops (docs/ops.md conventions: stat dtype is float64 for float64 input, float32 otherwise)
# ----------------------------------------------------------------------------------------------
SCHEMAS = {
    # local statistics per channel, each [C] in the stat dtype: count (N * prod(spatial), the same
    # for every channel), mean, M2 = sum((x - mean)^2). Empty input: three zero vectors.
    "batch_norm_stats": "(Tensor input) -> (Tensor, Tensor, Tensor)",
    # stats [W, 3, C] (rows count, mean, M2 per rank) -> merged (count, mean, M2), each [C]:
    # Chan's pairwise formula applied in rank order 0, 1, ..., W-1. Count-0 rows change nothing.
    "batch_norm_merge_stats": "(Tensor stats) -> (Tensor, Tensor, Tensor)",
    # y = (x - mean) * rstd * weight + bias; y has the input's dtype and memory format.
    "batch_norm_elemt": "(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias) -> Tensor",
    # per-channel sums over N and spatial, [C] in the stat dtype: sum(dy), sum(dy * xhat) with
    # xhat = (x - mean) * rstd. Empty input: zeros.
    "batch_norm_bwd_reduce": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd) -> (Tensor, Tensor)",
    # dx = weight * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count), the sums and count
    # ([C], stat dtype) being the global ones; dx has the input's dtype and memory format.
    "batch_norm_bwd_elemt": "(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                            "Tensor sum_dy, Tensor sum_dy_xhat, Tensor count) -> Tensor",
}
for _name, _schema in SCHEMAS.items():
    lib.define(_name + _schema)

OP_NAMES = tuple(f"fastnorm::{n}" for n in SCHEMAS)


def _bshape(x: Tensor):
    return [1, -1] + [1] * (x.dim() - 2)


def _rdims(x: Tensor):
    return [0] + list(range(2, x.dim()))


@torch.library.impl(lib, "batch_norm_stats", "CompositeExplicitAutograd")
def _batch_norm_stats_ref(input):
    c = input.shape[1]
    sd = stat_dtype(input.dtype)
    n = input.numel() // c if c else 0
    if n == 0:
        z = input.new_zeros((c,), dtype=sd)
        return z, z.clone(), z.clone()
    var, mean = torch.var_mean(input.to(sd), dim=_rdims(input), correction=0)
    return torch.full((c,), float(n), dtype=sd, device=input.device), mean, var * n


@torch.library.impl(lib, "batch_norm_merge_stats", "CompositeExplicitAutograd")
def _batch_norm_merge_stats_ref(stats):
    count, mean, m2 = stats[0, 0], stats[0, 1], stats[0, 2]
    for r in range(1, stats.shape[0]):
        nb, mb, m2b = stats[r, 0], stats[r, 1], stats[r, 2]
        n = count + nb
        inv = 1.0 / n.clamp_min(1.0)  # n == 0 only when both parts are empty: then nb == 0
        delta = mb - mean
        mean = mean + delta * (nb * inv)
        m2 = m2 + m2b + delta * delta * (count * nb * inv)
        count = n
    if stats.shape[0] == 1:  # outputs of an op must not alias its input
        return count.clone(), mean.clone(), m2.clone()
    return count, mean, m2


@torch.library.impl(lib, "batch_norm_elemt", "CompositeExplicitAutograd")
def _batch_norm_elemt_ref(input, mean, rstd, weight, bias):
    sd = stat_dtype(input.dtype)
    shape = _bshape(input)
    scale = rstd.to(sd) if weight is None else rstd.to(sd) * weight.to(sd)
    y = (input.to(sd) - mean.to(sd).reshape(shape)) * scale.reshape(shape)
    if bias is not None:
        y = y + bias.to(sd).reshape(shape)
    return y.to(input.dtype).contiguous(memory_format=memory_format_of(input))


@torch.library.impl(lib, "batch_norm_bwd_reduce", "CompositeExplicitAutograd")
def _batch_norm_bwd_reduce_ref(grad_out, input, mean, rstd):
    sd = stat_dtype(input.dtype)
    dims = _rdims(input)
    dy = grad_out.to(sd)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * (input.to(sd) - mean.to(sd).reshape(_bshape(input)))).sum(dims)
    return sum_dy, sum_dy_xmu * rstd.to(sd)


@torch.library.impl(lib, "batch_norm_bwd_elemt", "CompositeExplicitAutograd")
def _batch_norm_bwd_elemt_ref(grad_out, input, mean, rstd, weight, sum_dy, sum_dy_xhat, count):
    sd = stat_dtype(input.dtype)
    shape = _bshape(input)
    r = rstd.to(sd).reshape(shape)
    inv_n = 1.0 / count.to(sd).clamp_min(1.0)
    xhat = (input.to(sd) - mean.to(sd).reshape(shape)) * r
    scale = r if weight is None else r * weight.to(sd).reshape(shape)
    dx = (grad_out.to(sd) - (sum_dy.to(sd) * inv_n).reshape(shape)
          - xhat * (sum_dy_xhat.to(sd) * inv_n).reshape(shape)) * scale
    return dx.to(input.dtype).contiguous(memory_format=memory_format_of(input))


@torch.library.register_fake("fastnorm::batch_norm_stats")
def _batch_norm_stats_fake(input):
    c, sd = input.shape[1], stat_dtype(input.dtype)
    return tuple(input.new_empty((c,), dtype=sd) for _ in range(3))


@torch.library.register_fake("fastnorm::batch_norm_merge_stats")
def _batch_norm_merge_stats_fake(stats):
    c = stats.shape[2]
    return tuple(stats.new_empty((c,)) for _ in range(3))


@torch.library.register_fake("fastnorm::batch_norm_elemt")
def _batch_norm_elemt_fake(input, mean, rstd, weight, bias):
    return torch.empty_like(input, memory_format=memory_format_of(input))


@torch.library.register_fake("fastnorm::batch_norm_bwd_reduce")
def _batch_norm_bwd_reduce_fake(grad_out, input, mean, rstd):
    c, sd = input.shape[1], stat_dtype(input.dtype)
    return input.new_empty((c,), dtype=sd), input.new_empty((c,), dtype=sd)


@torch.library.register_fake("fastnorm::batch_norm_bwd_elemt")
def _batch_norm_bwd_elemt_fake(grad_out, input, mean, rstd, weight, sum_dy, sum_dy_xhat, count):
    return torch.empty_like(input, memory_format=memory_format_of(input))


# ----------------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist


def _backend_name(process_group) -> str:
    try:
        return str(_dist().get_backend(process_group)).lower()
    except Exception:  # noqa: BLE001 (a custom group without a backend name)
        return ""


def _all_gather_stats(local: Tensor, process_group, world_size: int) -> Tensor:
    """[3, C] on this rank -> [W, 3, C], rows in group-rank order. One collective: a flat
    all-gather into one tensor (NCCL, gloo, ...), or the list form for backends without it."""
    dist = _dist()
    local = local.contiguous()
    c = local.shape[1]
    if "mpi" not in _backend_name(process_group):
        out = local.new_empty((world_size * 3, c))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, local, group=process_group)
        return out.view(world_size, 3, c)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group=process_group)
    return torch.stack(parts)


def _update_running_stats(running_mean: Tensor, running_var: Tensor,
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          count: Tensor, mean: Tensor, m2: Tensor) -> None:
    """BatchNorm's update from the merged statistics, on the device. A global count of 0 leaves
    both buffers alone (as an empty batch does); a global count of 1 updates running_mean only
    (the unbiased variance is undefined there)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    sd = mean.dtype
    if momentum is None:
        factor: Any = 1.0 / num_batches_tracked.to(sd)  # after the increment; no host sync
    else:
        factor = momentum
    rm, rv = running_mean.to(sd), running_var.to(sd)
    new_mean = rm * (1 - factor) + mean * factor
    unbiased = m2 / (count - 1).clamp_min(1.0)
    new_var = rv * (1 - factor) + unbiased * factor
    running_mean.copy_(torch.where(count > 0, new_mean, rm))
    running_var.copy_(torch.where(count > 1, new_var, rv))


class SyncBatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) with statistics over every rank of `process_group`; over the valid
    positions only when a validity is given (lengths or mask and the per-sample valid counts,
    as fastnorm.masked.prepare_validity makes them; input of rank >= 3)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, process_group, world_size, update_running_stats, lengths=None,
                mask=None, counts=None):
        masked = counts is not None
        if masked:
            m, v = _fn.nc_moments(input, lengths=lengths, mask=mask)
            total, mean, m2 = _masked.batch_moments(m, v, counts)
            count = total.expand(mean.shape)
        else:
            m = None
            count, mean, m2 = _fn.batch_norm_stats(input)
        gathered = _all_gather_stats(torch.stack([count, mean, m2]), process_group, world_size)
        count, mean, m2 = _fn.batch_norm_merge_stats(gathered)
        rstd = torch.rsqrt(m2 / count.clamp_min(1.0) + eps)
        if update_running_stats and running_mean is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                                  count, mean, m2)
        if masked:
            sd = rstd.dtype
            scale, shift = affine_coefficients(mean, rstd, _masked._vec(weight, sd),
                                               _masked._vec(bias, sd))
            n = input.shape[0]
            y = _fn.nc_affine(input, _masked._per_nc(scale, n), _masked._per_nc(shift, n),
                              lengths=lengths, mask=mask)
        else:
            y = _fn.batch_norm_elemt(input, mean, rstd, weight, bias)
        ctx.save_for_backward(input, weight, mean, rstd, count, m, lengths, mask)
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.masked = masked
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, mean, rstd, count, m, lengths, mask = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if ctx.masked:  # sums over the valid positions only
            sum_dy, sum_dy_xmu = _masked.batch_grad_sums(dy, x, m, mean, lengths, mask)
            sum_dy_xhat = sum_dy_xmu * rstd
            reduced = sum_dy_xmu  # what batch_norm_input_grad takes
        else:
            sum_dy, sum_dy_xhat = _fn.batch_norm_bwd_reduce(dy, x, mean, rstd)
            reduced = sum_dy_xhat
        if w is not None and need_dw:
            dw = sum_dy_xhat.to(w.dtype)  # local, as torch.nn.SyncBatchNorm (DDP reduces it)
        if need_db:
            db = sum_dy.to(ctx.bias_dtype or x.dtype)
        if need_dx:
            # every rank that needs dx takes part, an empty one included (with zero sums)
            sums = torch.stack([sum_dy, reduced])
            _dist().all_reduce(sums, _dist().ReduceOp.SUM, group=ctx.process_group)
            if ctx.masked:
                dx = _masked.batch_norm_input_grad(
                    dy, x, mean, rstd, None if w is None else w.to(mean.dtype), sums[0],
                    sums[1], count, lengths, mask)
            else:
                dx = _fn.batch_norm_bwd_elemt(dy, x, mean, rstd, w, sums[0], sums[1], count)
        return dx, dw, db, None, None, None, None, None, None, None, None, None, None, None


def _sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                     process_group, world_size: int, update_running_stats: bool = True,
                     lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Training-mode batch norm synchronised over `process_group`, over the valid positions
    when lengths or mask is given. Every check runs before the collective and before any buffer
    changes."""
    name = "sync_batch_norm"
    _masked.check_one_validity(name, lengths, mask)
    FN._check_floating(name, input, NotImplementedError)
    FN._check_min_dim(name, input)
    c = input.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        FN._check_vector(name, what, t, input, c, f"one per channel, C={c}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{name}: running_mean and running_var must be given together")
    if momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
    validity = ()
    x = input
    if lengths is not None or mask is not None:
        validity = _masked.prepare_validity(name, input, lengths, mask)
        x = _masked._with_length_dim(input)  # an (N, C) input runs as (N, C, 1)
    y = SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var,
                                    num_batches_tracked, momentum, eps, process_group,
                                    world_size, update_running_stats, *validity)
    return _masked._like_input(y, input) if validity else y


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
class SyncBatchNorm(nn.SyncBatchNorm):
    __doc__ = nn.SyncBatchNorm.__doc__

    def forward(self, input: Tensor, mask: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """forward(input) as torch.nn.SyncBatchNorm's; with mask or lengths (at most one;
        fastnorm.functional.masked_batch_norm's conventions) the statistics of every rank's
        valid positions, 0 at the invalid ones."""
        masked = mask is not None or lengths is not None
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        need_sync = False
        process_group, world_size = None, 1
        if bn_training and self.training:
            dist = _dist()
            if dist.is_available() and dist.is_initialized():
                process_group = self.process_group if self.process_group is not None else dist.group.WORLD
                world_size = dist.get_world_size(process_group)
                need_sync = world_size > 1
        if not need_sync:
            # torch falls back to F.batch_norm here; fastnorm's BatchNorm does the same job
            # (num_batches_tracked on the device, checkpoint-safe running statistics)
            if masked:
                return _masked.batch_norm_module_forward(self, input, lengths, mask)
            return _BatchNormForward.forward(self, input)
        tracking = self.track_running_stats
        return _sync_batch_norm(
            input,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight, self.bias,
            self.num_batches_tracked if tracking else None,
            self.momentum if tracking else 0.0,
            self.eps, process_group, world_size,
            update_running_stats=not (tracking and FN.in_checkpoint_recomputation()),
            lengths=lengths, mask=mask)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        r"""Converts every BatchNorm*d layer (torch.nn's or fastnorm's, any `_BatchNorm`) of
        `module` into a :class:`fastnorm.SyncBatchNorm` that shares its Parameters and buffers
        (an optimizer built before keeps working), keeps `training` and `qconfig`.

        Args:
            module (nn.Module): the model (or a single BatchNorm layer)
            process_group (optional): the group statistics are synchronised over; default the
                whole world

        Returns:
            `module` with its BatchNorm layers replaced; a new layer when `module` itself is one.
        """
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # bias=False only where it matters (torch versions before the `bias` argument)
            extra = {"bias": False} if module.affine and module.bias is None else {}
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, device="meta", **extra)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel refuses a CPU module holding any nn.SyncBatchNorm ("SyncBatchNorm layers
# only work with GPU modules"), an isinstance check that catches fastnorm's subclass too, although
# it runs on CPU (gloo). Its check is kept for torch's own layers and skipped for fastnorm's.
# ----------------------------------------------------------------------------------------------
def _allow_fastnorm_sync_bn_in_cpu_ddp() -> None:
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
    except ImportError:  # a torch build without distributed
        return
    original = getattr(DDP, "_passing_sync_batchnorm_handle", None)
    if original is None or getattr(original, "_fastnorm", False):
        return

    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)
               for m in module.modules()):
            return original(self, module)
        return None

    _passing_sync_batchnorm_handle._fastnorm = True  # type: ignore[attr-defined]
    _passing_sync_batchnorm_handle.__wrapped__ = original  # type: ignore[attr-defined]
    DDP._passing_sync_batchnorm_handle = _passing_sync_batchnorm_handle


_allow_fastnorm_sync_bn_in_cpu_ddp()
