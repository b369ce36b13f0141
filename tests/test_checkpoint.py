"""Running statistics under torch.utils.checkpoint: updated exactly once per user forward.

A checkpointed segment's forward runs a second time during backward (the recomputation).
torch's BatchNorm then updates its running statistics and num_batches_tracked a second time
(https://github.com/pytorch/pytorch/issues/96136); fastnorm's BatchNorm, InstanceNorm (tracked
statistics) and SyncBatchNorm do not. Every case trains two steps with the reentrant and the
non-reentrant checkpoint and compares outputs, gradients, running statistics and
num_batches_tracked with the same two steps without checkpointing. (SyncBatchNorm's synchronised
path, world size 2-3, is checked under both checkpoints in test_sync_batchnorm.py; here it is the
no-process-group and world-size-1 path.)
"""
from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastnorm
from conftest import assert_grads_close

MODES = {"reentrant": True, "non_reentrant": False}

# name -> (norm factory(momentum), input shape, conv/linear in front)
CASES = {
    "BatchNorm1d_NC": (lambda m: fastnorm.BatchNorm1d(4, momentum=m), (6, 4), lambda: nn.Linear(4, 4)),
    "BatchNorm1d_NCL": (lambda m: fastnorm.BatchNorm1d(4, momentum=m), (3, 4, 5), lambda: nn.Conv1d(4, 4, 1)),
    "BatchNorm2d": (lambda m: fastnorm.BatchNorm2d(4, momentum=m), (3, 4, 5, 3), lambda: nn.Conv2d(4, 4, 1)),
    "BatchNorm3d": (lambda m: fastnorm.BatchNorm3d(4, momentum=m), (2, 4, 3, 2, 3), lambda: nn.Conv3d(4, 4, 1)),
    "InstanceNorm1d_tracked": (lambda m: fastnorm.InstanceNorm1d(4, momentum=m, affine=True, track_running_stats=True),
                               (3, 4, 6), lambda: nn.Conv1d(4, 4, 1)),
    "InstanceNorm2d_tracked": (lambda m: fastnorm.InstanceNorm2d(4, momentum=m, track_running_stats=True),
                               (3, 4, 3, 4), lambda: nn.Conv2d(4, 4, 1)),
    "InstanceNorm3d_tracked": (lambda m: fastnorm.InstanceNorm3d(4, momentum=m, affine=True, track_running_stats=True),
                               (2, 4, 2, 3, 2), lambda: nn.Conv3d(4, 4, 1)),
    "SyncBatchNorm": (lambda m: fastnorm.SyncBatchNorm(4, momentum=m), (3, 4, 5, 3), lambda: nn.Conv2d(4, 4, 1)),
}


def _segment(case, momentum):
    norm_factory, shape, front = CASES[case]
    torch.manual_seed(0)
    seg = nn.Sequential(front(), norm_factory(momentum), nn.ReLU())
    norm = seg[1]
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return seg, shape


def _train(seg, shape, mode, steps=2):
    """`steps` training steps (forward, backward; no optimizer, so the inputs of the norm are
    the same in both runs); returns everything a step produces."""
    gen = torch.Generator().manual_seed(42)
    record = []
    for step in range(steps):
        x = (torch.randn(shape, generator=gen) * (1 + step) + step).requires_grad_()
        g = torch.randn(shape, generator=gen)
        y = seg(x) if mode is None else checkpoint(seg, x, use_reentrant=MODES[mode])
        (y * g).sum().backward()
        record.append({
            "y": y.detach().clone(),
            "x.grad": x.grad.clone(),
            **{f"{k}.grad": p.grad.clone() for k, p in seg.named_parameters()},
            **{k: b.clone() for k, b in seg.named_buffers()},
        })
        seg.zero_grad()
    return record


def _compare(got, want, what):
    for step, (a, b) in enumerate(zip(got, want)):
        assert list(a) == list(b)
        # the conv / linear bias before BatchNorm or InstanceNorm has a gradient zero in exact
        # arithmetic: the parameters' gradients are judged against the scale of all of them
        grads = [k for k in b if k.endswith(".grad") and k != "x.grad"]
        assert_grads_close({k: a[k] for k in grads}, {k: b[k] for k in grads}, torch.float32,
                           msg=f"{what} step {step}")
        for k in b:
            if k in grads:
                continue
            if k.endswith("num_batches_tracked"):
                assert torch.equal(a[k], b[k]), f"{what} step {step}: {k} {a[k]} vs {b[k]}"
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{what} step {step}: {k}\n{m}")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_running_stats_updated_once(case, mode, momentum):
    seg, shape = _segment(case, momentum)
    plain = _train(copy.deepcopy(seg), shape, None)
    ckpt = _train(seg, shape, mode)
    _compare(ckpt, plain, f"{case} {mode}")
    norm = seg[1]
    if getattr(norm, "num_batches_tracked", None) is not None and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        assert int(norm.num_batches_tracked) == 2
    # the statistics did move (the test would prove nothing otherwise); InstanceNorm, as
    # torch's, takes momentum=None as 0 (its statistics stay put)
    if not (case.startswith("InstanceNorm") and momentum is None):
        fresh, _ = _segment(case, momentum)
        assert not torch.allclose(norm.running_mean, fresh[1].running_mean)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("mode", list(MODES))
def test_sync_batchnorm_world_of_one(gloo_world_of_one, mode, momentum):
    assert dist.get_world_size() == 1
    seg, shape = _segment("SyncBatchNorm", momentum)
    plain = _train(copy.deepcopy(seg), shape, None)
    ckpt = _train(seg, shape, mode)
    _compare(ckpt, plain, f"SyncBatchNorm world 1 {mode}")
    assert int(seg[1].num_batches_tracked) == 2


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_batchnorm_updates_twice(mode):
    """The bug being fixed, shown on torch.nn.BatchNorm2d: under checkpoint its statistics are
    updated twice per step (https://github.com/pytorch/pytorch/issues/96136); fastnorm's
    are not (test above)."""
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    plain = _train(copy.deepcopy(seg), (3, 4, 5, 3), None, steps=1)
    ckpt = _train(seg, (3, 4, 5, 3), mode, steps=1)
    if int(ckpt[0]["1.num_batches_tracked"]) == 1:
        pytest.skip("torch no longer double-updates under checkpoint "
                    "(https://github.com/pytorch/pytorch/issues/96136 fixed)")
    assert int(ckpt[0]["1.num_batches_tracked"]) == 2
    assert int(plain[0]["1.num_batches_tracked"]) == 1
    assert not torch.allclose(ckpt[0]["1.running_mean"], plain[0]["1.running_mean"])
    assert not torch.allclose(ckpt[0]["1.running_var"], plain[0]["1.running_var"])
    # ... while the same model converted to fastnorm matches the plain run
    torch.manual_seed(0)
    seg = fastnorm.convert(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
    _compare(_train(seg, (3, 4, 5, 3), mode, steps=1), plain, f"converted {mode}")
