"""A training step of a small CNN built from fastnorm layers, captured in a CUDA graph and
replayed, gives the same parameters, running statistics and num_batches_tracked as the same steps
run eagerly.

No fastnorm op may synchronise with the host. The reference path (ATen, used when the compiled
kernels are not registered) reads num_batches_tracked on the host for momentum=None, so that case
runs only with the compiled kernels.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _compiled_bn() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastnorm::batch_norm_fwd", "CUDA")


class _Net(nn.Module):
    def __init__(self, momentum):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), fastnorm.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), fastnorm.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            fastnorm.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False), fastnorm.SyncBatchNorm(8, momentum=momentum), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(8, 16), fastnorm.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
            nn.Linear(16, 16), fastnorm.LayerNorm(16), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.features(x))


def _step(model, opt, x, t):
    loss = nn.functional.mse_loss(model(x), t)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_captured_training_step_matches_eager(momentum, memory_format):
    if momentum is None and not _compiled_bn():
        pytest.skip("momentum=None needs the compiled BatchNorm kernel (the reference path reads "
                    "num_batches_tracked on the host)")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    graphed = _Net(momentum).to(dev, memory_format=memory_format)
    eager = copy.deepcopy(graphed)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    warmup, replays = 3, 4
    data = [(torch.randn(6, 3, 8, 8, device=dev).contiguous(memory_format=memory_format),
             torch.randn(6, 4, device=dev)) for _ in range(warmup + replays)]

    # eager reference: every step
    eager_losses = []
    for x, t in data:
        opt_e.zero_grad(set_to_none=True)
        eager_losses.append(_step(eager, opt_e, x, t).detach())

    # warm up on a side stream (as torch.cuda.graph's documentation asks), then capture one step
    static_x = data[0][0].clone()
    static_t = data[0][1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, t in data[:warmup]:
            opt_g.zero_grad(set_to_none=True)
            _step(graphed, opt_g, x, t)
    torch.cuda.current_stream().wait_stream(s)
    opt_g.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_g, static_x, static_t)
    # capturing ran nothing: the state is still the warm-up's
    assert int(graphed.features[1].num_batches_tracked) == warmup

    for i, (x, t) in enumerate(data[warmup:]):
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        torch.testing.assert_close(static_loss, eager_losses[warmup + i], rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()

    sg, se = graphed.state_dict(), eager.state_dict()
    assert list(sg) == list(se)
    for k in se:
        if k.endswith("num_batches_tracked"):
            assert int(sg[k]) == int(se[k]) == warmup + replays, k
        else:
            torch.testing.assert_close(sg[k], se[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # the statistics moved, so the comparison means something
    assert not torch.allclose(sg["features.1.running_mean"], torch.zeros_like(sg["features.1.running_mean"]))
