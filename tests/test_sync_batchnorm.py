"""fastnorm.SyncBatchNorm: the module, its ops, and gloo runs of 3 CPU processes compared with a
single-process BatchNorm over the concatenated batch.

The multiprocess checks run in ONE spawn of 3 processes for the whole module (a module-scoped
fixture); each rank runs every check in CHECKS and writes its verdicts to a JSON file, and one
test per check reads them. World size 3 is the default group; world size 2 is a subgroup of
ranks 0 and 1 (which also exercises `process_group`).
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastnorm
import gloo_ranks
from fastnorm.sync_batchnorm import OP_NAMES

WORLD = 3
# generous: a shared CI machine can be slow to start 3 processes; a failing collective (ranks
# out of step) is the only thing that waits this long
SPAWN_TIMEOUT_S = 420
COLLECTIVE_TIMEOUT_S = 120

_fn = torch.ops.fastnorm


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=2e-5)


def _close(actual, expected, msg="", scale=True):
    kw = _tol(expected.dtype)
    if scale and expected.numel():
        kw["atol"] *= max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, **kw, msg=lambda m: f"{msg}\n{m}")


class _Soft:
    """Collects assertion failures and raises them together at the end of a check, so that a
    mismatch on one rank does not skip the collectives the other ranks are waiting in."""

    def __init__(self):
        self.errors = []

    def __call__(self, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except AssertionError as e:
            self.errors.append(str(e))

    def close(self, *args, **kwargs):
        self(_close, *args, **kwargs)

    def true(self, cond, msg):
        if not cond:
            self.errors.append(msg)

    def done(self):
        if self.errors:
            raise AssertionError(f"{len(self.errors)} mismatches:\n" + "\n".join(self.errors[:6]))


# ==============================================================================================
# the worker: every rank runs every check
# ==============================================================================================
def _offsets(sizes):
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return offs


def _gather_all(t, group=None):
    """[W, *t.shape]: every rank's t, in group-rank order (for bitwise comparisons)."""
    ws = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(ws)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _assert_same_on_all_ranks(t, what, group=None, soft=None):
    allt = _gather_all(t.detach(), group)
    for r in range(1, allt.shape[0]):
        ok = torch.equal(allt[r], allt[0])
        msg = f"{what}: rank {r} differs from rank 0 (bitwise)"
        if soft is not None:
            soft.true(ok, msg)
        else:
            assert ok, msg


def _compare_step_state(sbn, ref, group, soft, msg):
    """After a training step: the rank-summed weight / bias gradients equal the single-process
    reference's (then cleared on both), the running statistics and num_batches_tracked equal its,
    and every buffer is the same on all ranks."""
    for p, pr, what in ((sbn.weight, ref.weight, "weight"), (sbn.bias, ref.bias, "bias")):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        soft.close(total, pr.grad, f"{msg}: {what} grad summed over ranks")
        p.grad = None
        pr.grad = None
    soft.close(sbn.running_mean, ref.running_mean, f"{msg}: running_mean")
    soft.close(sbn.running_var, ref.running_var, f"{msg}: running_var")
    soft.true(torch.equal(sbn.num_batches_tracked, ref.num_batches_tracked),
              f"{msg}: num_batches_tracked {sbn.num_batches_tracked} vs {ref.num_batches_tracked}")
    for name, b in sbn.named_buffers():
        _assert_same_on_all_ranks(b, f"{msg}: {name}", group, soft)


def _bn_case(rank, group, sizes, spatial, momentum, channels_last=False, dtype=torch.float32,
             c=3, steps=2, ckpt=None, in_dtype=None):
    """A fastnorm.SyncBatchNorm on this rank's slice vs torch.nn.BatchNorm on the whole batch,
    `steps` training steps: outputs, input grads, local weight/bias grads (and their sum over
    ranks), running statistics, num_batches_tracked, then an eval step."""
    in_dtype = in_dtype or dtype
    ws = dist.get_world_size(group)
    grank = dist.get_group_rank(group, rank) if group is not None else rank
    bn_cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(spatial)]
    gen = torch.Generator().manual_seed(1234)
    ref = bn_cls(c, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
        ref.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
        ref.running_mean.copy_(torch.randn(c, generator=gen, dtype=dtype) * 0.5)
        ref.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
    sbn = fastnorm.SyncBatchNorm(c, momentum=momentum, process_group=group, dtype=dtype)
    sbn.load_state_dict(ref.state_dict())
    assert ws == len(sizes)
    soft = _Soft()
    offs = _offsets(sizes)
    lo, hi = offs[grank], offs[grank + 1]
    fmt = torch.channels_last if channels_last and len(spatial) == 2 else (
        torch.channels_last_3d if channels_last and len(spatial) == 3 else torch.contiguous_format)
    for step in range(steps):
        shape = (offs[-1], c, *spatial)
        x_full = (torch.randn(shape, generator=gen, dtype=torch.float64) * (1.5 + step) + 2.0 - step).to(in_dtype)
        g_full = torch.randn(shape, generator=gen, dtype=torch.float64).to(in_dtype)
        x_ref = x_full.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * g_full).sum().backward()

        x = x_full[lo:hi].clone().contiguous(memory_format=fmt).requires_grad_()
        if ckpt is None:
            y = sbn(x)
        else:
            y = checkpoint(sbn, x, use_reentrant=ckpt)
        if fmt is not torch.contiguous_format and x.shape[0] > 1:
            soft.true(y.is_contiguous(memory_format=fmt), "output lost the input's memory format")
        soft.true(y.shape == x.shape and y.dtype == x.dtype, "output shape/dtype")
        soft.true(y.grad_fn is not None, "output not connected to autograd")
        (y * g_full[lo:hi]).sum().backward()
        msg = f"step {step} rank {rank} sizes {sizes} spatial {spatial} momentum {momentum} cl {channels_last} {dtype}"
        soft.close(y.detach(), y_ref.detach()[lo:hi], f"{msg}: output")
        soft.close(x.grad, x_ref.grad[lo:hi], f"{msg}: input grad")
        if fmt is not torch.contiguous_format and x.shape[0] > 1:
            soft.true(x.grad.is_contiguous(memory_format=fmt), "input grad lost the memory format")
        # weight/bias grads are the local ones (as torch.nn.SyncBatchNorm); their sum is the
        # whole batch's
        dims = [0] + list(range(2, x_full.dim()))
        xf = x_full.to(torch.float64)
        xhat = (xf - xf.mean(dims, keepdim=True)) / torch.sqrt(xf.var(dims, correction=0, keepdim=True) + sbn.eps)
        gl = g_full[lo:hi].to(torch.float64)
        soft.close(sbn.bias.grad, gl.sum(dims).to(dtype), f"{msg}: local bias grad")
        soft.close(sbn.weight.grad, (gl * xhat[lo:hi]).sum(dims).to(dtype), f"{msg}: local weight grad")
        _compare_step_state(sbn, ref, group, soft, msg)
    # eval: running statistics, no collective (only this rank does it)
    sbn.eval()
    ref.eval()
    x_full = torch.randn((offs[-1], c, *spatial), generator=gen).to(in_dtype)
    if hi > lo:
        soft.close(sbn(x_full[lo:hi].contiguous(memory_format=fmt)), ref(x_full)[lo:hi].detach(), "eval")
    soft.done()


def _check_bn2d_w3_empty_rank(rank):
    _bn_case(rank, None, [4, 0, 3], (3, 4), 0.1)


def _check_bn2d_w3_empty_first_rank(rank):
    _bn_case(rank, None, [0, 5, 2], (2, 3), 0.3)


def _check_bn2d_w3_momentum_none(rank):
    _bn_case(rank, None, [2, 3, 1], (3, 3), None, steps=3)


def _check_bn2d_w3_channels_last(rank):
    _bn_case(rank, None, [3, 0, 2], (4, 3), 0.1, channels_last=True)


def _check_bn3d_w3_channels_last(rank):
    _bn_case(rank, None, [2, 1, 2], (2, 3, 2), 0.1, channels_last=True)


def _check_bn1d_w3_single_value_on_a_rank(rank):
    # (N, C) with N = 1 on a rank: one value per channel there, many globally (torch allows it)
    _bn_case(rank, None, [1, 4, 0], (), 0.1)


def _check_bn1d_ncl_w3(rank):
    _bn_case(rank, None, [3, 2, 2], (5,), 0.1)


def _check_bn2d_w3_float64(rank):
    _bn_case(rank, None, [3, 0, 4], (3, 2), 0.1, dtype=torch.float64)


def _check_bn2d_w3_bf16_input_fp32_params(rank):
    # the AMP case: half-precision activations, fp32 parameters and buffers, fp32 statistics
    _bn_case(rank, None, [3, 0, 2], (3, 4), 0.1, in_dtype=torch.bfloat16)


def _check_global_batch_empty_or_single_value(rank):
    soft = _Soft()
    m = fastnorm.SyncBatchNorm(3)
    with torch.no_grad():
        m.running_mean.fill_(0.5)
        m.running_var.fill_(2.0)
    # every rank empty: an empty output connected to autograd, running stats untouched,
    # num_batches_tracked counts the call (as BatchNorm on an empty batch)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = m(x)
    y.sum().backward()
    soft.true(y.shape == x.shape and y.grad_fn is not None, "empty output")
    soft.true(bool((m.running_mean == 0.5).all() and (m.running_var == 2.0).all()), "stats moved")
    soft.true(int(m.num_batches_tracked) == 1, "num_batches_tracked")
    # one value per channel in the whole group (rank 0 has it): no NaN anywhere; the mean moves,
    # the variance (undefined for one value) does not
    x = torch.full((1 if rank == 0 else 0, 3), 4.0, requires_grad=True)
    y = m(x)
    y.sum().backward()
    soft.true(bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all()), "non-finite output/grad")
    soft(torch.testing.assert_close, m.running_mean, torch.full((3,), 0.9 * 0.5 + 0.1 * 4.0))
    soft.true(bool((m.running_var == 2.0).all()), f"running_var moved: {m.running_var}")
    _assert_same_on_all_ranks(m.running_mean, "running_mean", soft=soft)
    soft.done()


def _subgroup(rank):
    # every rank must create every group, members or not
    return dist.new_group([0, 1])


def _check_bn2d_w2_subgroup(rank):
    group = _subgroup(rank)
    if rank < 2:
        _bn_case(rank, group, [3, 5], (3, 4), 0.1)


def _check_bn2d_w2_subgroup_empty(rank):
    group = _subgroup(rank)
    if rank < 2:
        _bn_case(rank, group, [4, 0], (2, 3), None)


def _check_checkpoint_reentrant(rank):
    _bn_case(rank, None, [4, 0, 3], (3, 4), 0.1, ckpt=True)


def _check_checkpoint_non_reentrant(rank):
    _bn_case(rank, None, [2, 3, 2], (3, 4), None, ckpt=False)


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), fastnorm.BatchNorm2d(8, momentum=None), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))

    def forward(self, x):
        return self.head(self.features(x))


def _ddp_case(rank, sizes, channels_last):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    base = _SmallCNN()
    ref = copy.deepcopy(base)
    model = fastnorm.SyncBatchNorm.convert_sync_batchnorm(base)
    assert sum(isinstance(m, fastnorm.SyncBatchNorm) for m in model.modules()) == 3
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    ref = ref.to(memory_format=fmt)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    soft = _Soft()
    offs = _offsets(sizes)
    lo, hi = offs[rank], offs[rank + 1]
    gen = torch.Generator().manual_seed(7)
    total = offs[-1]
    for step in range(2):
        x_full = torch.randn(total, 3, 6, 5, generator=gen).contiguous(memory_format=fmt)
        t_full = torch.randn(total, 4, generator=gen)
        # DDP averages the ranks' gradients: the reference loss is the mean of the ranks' losses
        out = ddp(x_full[lo:hi])
        loss = ((out - t_full[lo:hi]) ** 2).sum() / total
        opt.zero_grad()
        loss.backward()
        opt.step()
        out_ref = ref(x_full)
        loss_ref = ((out_ref - t_full) ** 2).sum() / total / len(sizes)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        soft.close(out.detach(), out_ref.detach()[lo:hi], f"step {step}: output")
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)
    for k in sd:
        if k.endswith("num_batches_tracked"):
            soft.true(torch.equal(sd[k], sd_ref[k]), f"{k}: {sd[k]} vs {sd_ref[k]}")
        else:
            soft.close(sd[k], sd_ref[k], k)
        _assert_same_on_all_ranks(sd[k], k, soft=soft)
    soft.done()


def _check_ddp_cnn(rank):
    _ddp_case(rank, [3, 2, 4], channels_last=False)


def _check_ddp_cnn_channels_last_empty_rank(rank):
    _ddp_case(rank, [4, 0, 3], channels_last=True)


def _check_ddp_still_refuses_torch_sync_bn_on_cpu(rank):
    # fastnorm lets DDP take its own SyncBatchNorm on CPU; torch's layer is refused as before
    from torch.nn.parallel import DistributedDataParallel as DDP
    with pytest.raises(ValueError, match="only work with GPU modules"):
        DDP(nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3)))


def _check_eval_and_untracked_do_not_sync(rank):
    # eval with running stats: per-rank, no collective (ranks call it a different number of
    # times: a collective would hang); track_running_stats=False in eval: local batch stats
    soft = _Soft()
    m = fastnorm.SyncBatchNorm(3).eval()
    x = torch.randn(4, 3, 5)
    for _ in range(rank + 1):
        soft(torch.testing.assert_close, m(x), nn.functional.batch_norm(
            x, m.running_mean, m.running_var, m.weight, m.bias, False))
    u = fastnorm.SyncBatchNorm(3, track_running_stats=False).eval()
    for _ in range(rank + 1):
        soft(torch.testing.assert_close, u(x),
             nn.functional.batch_norm(x, None, None, u.weight, u.bias, True))
    # training without running stats does sync: compare with the whole batch
    u.train()
    gen = torch.Generator().manual_seed(3)
    x_full = torch.randn(9, 3, 5, generator=gen)
    y = u(x_full[rank * 3:(rank + 1) * 3])
    y_ref = nn.functional.batch_norm(x_full, None, None, None, None, True)
    soft.close(y.detach(), y_ref[rank * 3:(rank + 1) * 3], "track_running_stats=False, training")
    soft.true(u.running_mean is None and u.num_batches_tracked is None, "buffers appeared")
    soft.done()


def _check_no_input_grad(rank):
    # a first layer: the input needs no grad, so no all-reduce; parameter grads still flow
    m = fastnorm.SyncBatchNorm(3)
    gen = torch.Generator().manual_seed(5)
    x_full = torch.randn(6, 3, 2, 2, generator=gen)
    x = x_full[rank * 2:(rank + 1) * 2]
    m(x).pow(2).sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None


def _check_errors_leave_buffers(rank):
    m = fastnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="4"):
        m(torch.randn(2, 4, 3))  # wrong channel count, raised before the collective
    with pytest.raises(ValueError, match="2D"):
        m(torch.randn(3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------------------------
# masked: forward(input, mask=..., lengths=...) on every rank against the single-process masked
# BatchNorm (fastnorm.MaskedBatchNorm1d/2d, tested against a float64 reference in
# test_masked_norm.py) over the union of the ranks' batches, padded to the widest rank
# ----------------------------------------------------------------------------------------------
def _masked_case(rank, group, sizes, widths, vkind, rows=(), momentum=0.1, channels_last=False,
                 c=3, steps=2, empty_rank=None):
    """Each rank holds sizes[r] samples padded to widths[r] positions (its own padding) with its
    own lengths or mask; `rows`: the leading spatial sizes ((H,) for images). The reference sees
    every rank's samples padded to max(widths) (the extra columns invalid). Training steps compare
    outputs, input grads (0 at the invalid positions), weight/bias grads summed over ranks,
    running statistics and num_batches_tracked (bitwise the same on every rank); then an eval
    step (no collective). empty_rank: that rank's positions are all invalid (count 0)."""
    ws = dist.get_world_size(group)
    grank = dist.get_group_rank(group, rank) if group is not None else rank
    assert ws == len(sizes) == len(widths)
    gen = torch.Generator().manual_seed(4321)
    cls = fastnorm.MaskedBatchNorm2d if rows else fastnorm.MaskedBatchNorm1d
    ref = cls(c, momentum=momentum)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(c, generator=gen))
        ref.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
        ref.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    sbn = fastnorm.SyncBatchNorm(c, momentum=momentum, process_group=group)
    sbn.load_state_dict(ref.state_dict())
    soft = _Soft()
    offs = _offsets(sizes)
    lo, hi, w = offs[grank], offs[grank + 1], widths[grank]
    wmax, total = max(widths), offs[-1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    owner = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)])  # the rank of each sample

    def draw():
        x_full = torch.randn((total, c, *rows, wmax), generator=gen) * 1.5 + 2.0
        g_full = torch.randn((total, c, *rows, wmax), generator=gen)
        limit = torch.tensor(widths)[owner]  # each sample's own padded width
        if vkind == "lengths":
            lens = (torch.rand(total, generator=gen) * (limit + 1).float()).long().clamp(max=limit)
            if total:
                lens[0] = 1
                lens[-1] = limit[-1]
            if empty_rank is not None:
                lens[owner == empty_rank] = 0
            full, local = dict(lengths=lens), dict(lengths=lens[lo:hi])
            valid = torch.arange(wmax) < lens.view(-1, *([1] * len(rows)), 1)
            valid = valid.expand(total, *rows, wmax)
        else:
            valid = torch.rand((total, *rows, wmax), generator=gen) < 0.6
            valid &= torch.arange(wmax) < limit.view(-1, *([1] * len(rows)), 1)
            if empty_rank is not None:
                valid[owner == empty_rank] = False
            full, local = dict(mask=valid), dict(mask=valid[lo:hi, ..., :w].contiguous())
        # the padding holds garbage: it must not leak into anything
        x_full = torch.where(valid.unsqueeze(1), x_full, torch.full_like(x_full, float("nan")))
        return x_full, g_full, full, local, valid

    for step in range(steps):
        x_full, g_full, full, local, valid = draw()
        ref.train()
        x_ref = x_full.clone().requires_grad_()
        y_ref = ref(x_ref, **full)
        (y_ref * g_full).sum().backward()
        x = x_full[lo:hi, ..., :w].contiguous(memory_format=fmt).requires_grad_()
        y = sbn(x, **local)
        (y * g_full[lo:hi, ..., :w]).sum().backward()
        msg = f"step {step} rank {rank} sizes {sizes} widths {widths} {vkind}"
        soft.true(y.shape == x.shape and y.dtype == x.dtype, f"{msg}: output shape/dtype")
        if channels_last and x.shape[0] > 1:
            soft.true(y.is_contiguous(memory_format=fmt), f"{msg}: output lost channels_last")
        soft.true(bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all()),
                  f"{msg}: non-finite output or grad (the NaN padding leaked)")
        soft.close(y.detach(), y_ref.detach()[lo:hi, ..., :w], f"{msg}: output")
        soft.close(x.grad, x_ref.grad[lo:hi, ..., :w], f"{msg}: input grad")
        inv = ~valid[lo:hi, ..., :w].unsqueeze(1).expand_as(x)
        soft.true(bool((y.detach()[inv] == 0).all() and (x.grad[inv] == 0).all()),
                  f"{msg}: output / input grad not 0 at the invalid positions")
        _compare_step_state(sbn, ref, group, soft, msg)
    # eval: the running statistics, per rank, no collective
    sbn.eval()
    ref.eval()
    x_full, _, full, local, _ = draw()
    if hi > lo:
        soft.close(sbn(x_full[lo:hi, ..., :w].contiguous(memory_format=fmt), **local),
                   ref(x_full, **full)[lo:hi, ..., :w], "eval")
    soft.done()


def _check_masked_w2_lengths_different_widths(rank):
    # the brief's case: 2 ranks, each padded to its own width, different lengths
    group = _subgroup(rank)
    if rank < 2:
        _masked_case(rank, group, [3, 4], [9, 14], "lengths")


def _check_masked_w2_lengths_momentum_none(rank):
    group = _subgroup(rank)
    if rank < 2:
        _masked_case(rank, group, [2, 3], [11, 6], "lengths", momentum=None, steps=3)


def _check_masked_w3_mask_images_channels_last_empty_rank(rank):
    # 2-d images with a mask, an empty batch on rank 1 (count 0 in the merge)
    _masked_case(rank, None, [3, 0, 2], [7, 7, 5], "mask", rows=(4,), channels_last=True)


def _check_masked_w3_mask_rank_without_valid_positions(rank):
    # rank 2 holds samples, none of its positions valid: it adds count 0, its output and input
    # gradient are all 0
    _masked_case(rank, None, [2, 3, 2], [6, 8, 8], "mask", rows=(3,), empty_rank=2)


CHECKS = {name[len("_check_"):]: fn for name, fn in sorted(globals().items())
          if name.startswith("_check_") and callable(fn)}


def _worker(rank, port, outdir):
    gloo_ranks.run_checks(rank, port, outdir, CHECKS, WORLD, COLLECTIVE_TIMEOUT_S)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    return gloo_ranks.spawn(_worker, WORLD, SPAWN_TIMEOUT_S, str(tmp_path_factory.mktemp("sync_bn")))


@pytest.mark.parametrize("check", list(CHECKS))
def test_gloo(gloo_results, check):
    gloo_ranks.assert_check(*gloo_results, check)


# ==============================================================================================
# single process: the module's interface
# ==============================================================================================
def test_subclass_signature_state_dict():
    m = fastnorm.SyncBatchNorm(4, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    assert isinstance(m, nn.SyncBatchNorm) and isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert inspect.signature(fastnorm.SyncBatchNorm) == inspect.signature(nn.SyncBatchNorm)
    t = nn.SyncBatchNorm(4, eps=1e-3, momentum=None)
    assert list(m.state_dict()) == list(t.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(m.state_dict()[k], v) and m.state_dict()[k].dtype == v.dtype
    assert repr(m) == repr(t)
    m.load_state_dict(t.state_dict())
    assert "SyncBatchNorm" in fastnorm.__all__
    if "bias" in inspect.signature(nn.SyncBatchNorm).parameters:
        assert fastnorm.SyncBatchNorm(3, bias=False).bias is None
    assert fastnorm.SyncBatchNorm(3, process_group="pg").process_group == "pg"


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
        nn.Sequential(fastnorm.BatchNorm1d(5, momentum=None), nn.BatchNorm3d(6, affine=False)),
        nn.BatchNorm2d(7, track_running_stats=False), nn.SyncBatchNorm(2), nn.LayerNorm(3))
    model[2][0].eval()
    model[1].qconfig = "q"
    old = {name: m for name, m in model.named_modules()}
    tensors = {name: {k: v for k, v in list(m.named_parameters(recurse=False)) +
                      list(m.named_buffers(recurse=False))}
               for name, m in model.named_modules()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = fastnorm.SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert out is model
    for name in ("1", "2.0", "2.1", "3", "4"):
        new = dict(out.named_modules())[name]
        assert type(new) is fastnorm.SyncBatchNorm, name
        assert new.process_group == "pg"
        o = old[name]
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(o, attr), (name, attr)
        got = dict(list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False)))
        assert set(got) == set(tensors[name]), name
        for k, v in tensors[name].items():
            assert got[k] is v, f"{name}.{k} is not shared"
        for k in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
            if getattr(o, k, None) is None:
                assert getattr(new, k) is None
        assert all(t.device.type != "meta" for t in got.values())
    assert out[1].qconfig == "q"
    assert type(out[0]) is nn.Conv2d and type(out[5]) is nn.LayerNorm
    # an optimizer built before the swap still updates the layer's weight
    out[1].weight.grad = torch.ones(4)
    opt.step()
    assert torch.equal(out[1].weight.detach(), torch.zeros(4))
    # a lone BatchNorm: a new layer, sharing the tensors
    bn = nn.BatchNorm1d(3)
    sbn = fastnorm.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(sbn) is fastnorm.SyncBatchNorm and sbn.weight is bn.weight
    assert sbn.running_var is bn.running_var and sbn.process_group is None


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fallback_without_process_group(momentum, channels_last):
    """No process group (and on CPU, where torch's SyncBatchNorm refuses to sync): BatchNorm."""
    assert not dist.is_initialized()
    t = nn.BatchNorm2d(3, momentum=momentum)
    f = fastnorm.SyncBatchNorm(3, momentum=momentum)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
    f.load_state_dict(t.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(4, 3, 5, 6) * 2 + step).contiguous(memory_format=fmt)
        xt, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yf = t(xt), f(xf)
        assert yf.is_contiguous(memory_format=fmt)
        _close(yf, yt)
        g = torch.randn_like(yt)
        yt.backward(g)
        yf.backward(g)
        _close(xf.grad, xt.grad)
        _close(f.weight.grad, t.weight.grad)
        _close(f.bias.grad, t.bias.grad)
        for k, v in t.state_dict().items():
            _close(f.state_dict()[k], v, k) if v.is_floating_point() else \
                torch.testing.assert_close(f.state_dict()[k], v)
    t.eval()
    f.eval()
    x = torch.randn(2, 3, 5, 6)
    _close(f(x), t(x))


def test_errors_before_any_buffer_change():
    m = fastnorm.SyncBatchNorm(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="non-zero"):
        fastnorm.SyncBatchNorm(0)(torch.randn(2, 0, 3))
    with pytest.raises(RuntimeError, match=r"C=4"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# ==============================================================================================
# single process: the ops
# ==============================================================================================
def test_ops_registered():
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (6, 4), (3, 2, 7), (2, 3, 2, 2, 3), (0, 3, 2)])
def test_stats_op(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64).mul(3).add(10).to(dtype)
    count, mean, m2 = _fn.batch_norm_stats(x)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    assert count.dtype == mean.dtype == m2.dtype == sd and mean.shape == (shape[1],)
    n = x.numel() // shape[1]
    assert torch.equal(count, torch.full((shape[1],), float(n), dtype=sd))
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(torch.float64)
    if n:
        _close(mean, xf.mean(dims).to(sd))
        _close(m2, ((xf - xf.mean(dims, keepdim=True)) ** 2).sum(dims).to(sd))
    else:
        assert not mean.any() and not m2.any()


def test_stats_op_channels_last_matches_contiguous():
    x = torch.randn(4, 5, 3, 6)
    a = _fn.batch_norm_stats(x)
    b = _fn.batch_norm_stats(x.contiguous(memory_format=torch.channels_last))
    for u, v in zip(a, b):
        _close(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_op_equals_whole_batch_and_ignores_empty_parts(dtype):
    x = torch.randn(12, 3, 4, dtype=dtype) * 2 + 5
    whole = _fn.batch_norm_stats(x)
    for sizes in ([12], [5, 7], [0, 12], [3, 0, 9], [4, 4, 4, 0], [1, 1, 10], [12, 0, 0]):
        offs = _offsets(sizes)
        parts = [torch.stack(_fn.batch_norm_stats(x[offs[i]:offs[i + 1]])) for i in range(len(sizes))]
        merged = _fn.batch_norm_merge_stats(torch.stack(parts))
        for u, v, what in zip(merged, whole, ("count", "mean", "m2")):
            assert torch.isfinite(u).all()
            _close(u, v, f"{sizes}: {what}")
        # deterministic: the same gathered tensor gives the same bits
        again = _fn.batch_norm_merge_stats(torch.stack(parts))
        assert all(torch.equal(u, v) for u, v in zip(merged, again))
    empty = torch.zeros(3, 3, 3, dtype=dtype)
    for t in _fn.batch_norm_merge_stats(empty):
        assert torch.equal(t, torch.zeros(3, dtype=dtype))


def test_merge_is_rank_ordered_chan():
    # the op is Chan's pairwise update applied left to right: compare with a literal loop
    stats = torch.stack([torch.stack(_fn.batch_norm_stats(torch.randn(n, 2) * (i + 1) + i))
                         for i, n in enumerate([3, 5, 0, 2])])
    n, mean, m2 = stats[0, 0].clone(), stats[0, 1].clone(), stats[0, 2].clone()
    for r in range(1, 4):
        nb, mb, m2b = stats[r]
        tot = n + nb
        d = mb - mean
        w = nb / tot.clamp_min(1)
        mean = mean + d * w
        m2 = m2 + m2b + d * d * (n * nb / tot.clamp_min(1))
        n = tot
    got = _fn.batch_norm_merge_stats(stats)
    for u, v in zip(got, (n, mean, m2)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_elementwise_ops_equal_batch_norm(fmt, dtype):
    """With a single rank's sums, the forward/backward ops are BatchNorm's training forward and
    backward; memory format and dtype kept."""
    x = (torch.randn(4, 3, 5, 2, dtype=torch.float64) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    w = torch.rand(3) + 0.5
    b = torch.randn(3)
    eps = 1e-5
    count, mean, m2 = _fn.batch_norm_stats(x)
    rstd = torch.rsqrt(m2 / count + eps)
    y = _fn.batch_norm_elemt(x, mean, rstd, w, b)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    xr = x.to(torch.float64).requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    yr = nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, eps)
    loose = dict(rtol=5e-3, atol=5e-3) if dtype == torch.float16 else _tol(torch.float32)
    torch.testing.assert_close(y.double(), yr.detach(), **loose)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    yr.backward(g.double())
    sum_dy, sum_dy_xhat = _fn.batch_norm_bwd_reduce(g, x, mean, rstd)
    torch.testing.assert_close(sum_dy.double(), br.grad, **loose)
    torch.testing.assert_close(sum_dy_xhat.double(), wr.grad, **loose)
    dx = _fn.batch_norm_bwd_elemt(g, x, mean, rstd, w, sum_dy, sum_dy_xhat, count)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(dx.double(), xr.grad, **loose)
    dx_nw = _fn.batch_norm_bwd_elemt(g, x, mean, rstd, None, sum_dy, sum_dy_xhat, count)
    torch.testing.assert_close(dx_nw.double() * w.double().view(1, -1, 1, 1), dx.double(), **loose)


def _opcheck_samples():
    x = torch.randn(4, 3, 5, 2)
    xe = torch.randn(0, 3, 2)
    xl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    for inp in (x, xe, xl):
        c, mean, m2 = _fn.batch_norm_stats(inp)
        rstd = torch.rsqrt(m2 / c.clamp_min(1) + 1e-5)
        g = torch.randn_like(inp)
        sdy, sdx = _fn.batch_norm_bwd_reduce(g, inp, mean, rstd)
        yield "batch_norm_stats", (inp,)
        yield "batch_norm_merge_stats", (torch.stack([torch.stack((c, mean, m2))] * 2),)
        yield "batch_norm_elemt", (inp, mean, rstd, w, b)
        yield "batch_norm_elemt", (inp, mean, rstd, None, None)
        yield "batch_norm_bwd_reduce", (g, inp, mean, rstd)
        yield "batch_norm_bwd_elemt", (g, inp, mean, rstd, w, sdy, sdx, c)


def test_opcheck():
    for name, args in _opcheck_samples():
        torch.library.opcheck(getattr(_fn, name).default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_fallback_compiles_without_graph_breaks():
    """No process group: the module compiles with fullgraph=True (it is BatchNorm then)."""
    m = fastnorm.SyncBatchNorm(3)
    ref = nn.BatchNorm2d(3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 5, 5)
    _close(compiled(x), ref(x))
    _close(m.running_mean, ref.running_mean)
    assert int(m.num_batches_tracked) == 1
