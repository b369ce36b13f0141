"""The FASTNORM_EMU_OPS switch (tests/conftest.py, tools/cuda_emu/emu.py route_ops): with it, the
fastnorm:: ops on CPU tensors run the emulated CUDA kernels, not the ATen reference, and the CPU
fast path is off. Skipped without the switch (make test-emu-modules sets it)."""
from __future__ import annotations

import pytest
import torch

import fastnorm
import fastnorm.functional as FN
from conftest import EMU_OPS, EMU_ROUTED, make_pair, run_protocol

pytestmark = pytest.mark.skipif(not EMU_OPS, reason="FASTNORM_EMU_OPS not set (make test-emu-modules)")


def _kernels_run(handle, fn) -> dict:
    """{kernel signature: launches} of the kernels fn() ran in the emulation."""
    before = handle.coverage()
    fn()
    after = handle.coverage()
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def test_every_emulated_op_is_routed():
    routed = set(EMU_ROUTED["ops"])
    assert routed, "no op routed"
    for op in fastnorm.ops.OP_NAMES:
        name = op.split("::", 1)[1]
        has_emu = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm_emu::{name}", "CPU")
        assert (op in routed) == has_emu, op
        if has_emu:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    # every op of the extension has an emulated kernel: the switch covers them all
    assert routed == set(fastnorm.ops.OP_NAMES)


def test_cpu_fast_path_is_off():
    assert not FN.cpu_fast_path(torch.randn(2, 3))


def test_layer_norm_op_runs_the_emulated_kernel():
    h = EMU_ROUTED["handle"]
    x = torch.randn(6, 40)
    w, b = torch.rand(40) + 0.5, torch.randn(40)
    out = {}
    ran = _kernels_run(h, lambda: out.update(r=torch.ops.fastnorm.layer_norm_fwd(x, [40], w, b, 1e-5)))
    assert ran, "torch.ops.fastnorm.layer_norm_fwd launched no emulated kernel"
    y, mean, rstd = out["r"]
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, [40], w, b, 1e-5))
    # the same call through the emulation's own namespace gives the same bits
    y2, mean2, rstd2 = torch.ops.fastnorm_emu.layer_norm_fwd(x, [40], w, b, 1e-5)
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)


def test_layer_norm_op_does_not_run_aten():
    x = torch.randn(6, 40, requires_grad=True)
    m = fastnorm.LayerNorm(40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        m(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "fastnorm::layer_norm_fwd" in names and "fastnorm::layer_norm_bwd" in names
    assert not names & {"aten::native_layer_norm", "aten::native_layer_norm_backward",
                        "aten::layer_norm"}, sorted(names)


@pytest.mark.parametrize("module, shape", [
    (lambda: fastnorm.LayerNorm(24), (4, 5, 24)),
    (lambda: fastnorm.GroupNorm(2, 6), (3, 6, 4, 5)),
    (lambda: fastnorm.BatchNorm2d(6), (3, 6, 4, 5)),
    (lambda: fastnorm.InstanceNorm2d(6, affine=True), (3, 6, 4, 5)),
    (lambda: fastnorm.RMSNorm(24), (4, 5, 24)),
    (lambda: fastnorm.LocalResponseNorm(3), (3, 6, 4, 5)),
], ids=["LayerNorm", "GroupNorm", "BatchNorm2d", "InstanceNorm2d", "RMSNorm", "LocalResponseNorm"])
def test_modules_run_emulated_kernels(module, shape):
    """A module's forward and backward on CPU launch emulated kernels (the switch reaches the
    modules, not only the raw ops)."""
    h = EMU_ROUTED["handle"]
    m = module()
    x = torch.randn(shape, requires_grad=True)
    ran = _kernels_run(h, lambda: m(x).square().sum().backward())
    assert ran, f"{type(m).__name__}: no emulated kernel ran"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_errors_of_the_emulation_are_not_swallowed():
    """An input the kernels do not take raises the emulated wrapper's error: no silent fallback
    to the reference."""
    x = torch.randint(0, 5, (4, 8), dtype=torch.int32)
    with pytest.raises(RuntimeError) as direct:
        torch.ops.fastnorm_emu.layer_norm_fwd(x, [8], None, None, 1e-5)
    with pytest.raises(RuntimeError) as routed:
        torch.ops.fastnorm.layer_norm_fwd(x, [8], None, None, 1e-5)
    assert str(routed.value).splitlines()[0] == str(direct.value).splitlines()[0]


def test_sync_batch_norm_ops_stay_on_the_reference():
    """SyncBatchNorm's ops have no compiled kernel (not in OP_NAMES): no CPU registration."""
    for name in ("batch_norm_stats", "batch_norm_elemt"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{name}", "CPU")


# The module suite's shapes are small: BatchNorm's general (stats, finalize, apply) path and
# LayerNorm's split backward never run in it. One twin protocol each at the smallest shapes whose
# plans take them (tools/plan.py shows a plan), so the switch reaches every kernel family.
SPLIT_CASES = [
    ("BatchNorm2d", (8, 4, 48, 48), None, {"bn_fwd_stats_nchw", "bn_fwd_finalize", "bn_bwd_sums_nchw",
                                           "bn_bwd_finalize"}),
    ("BatchNorm2d", (32, 4, 16, 16), torch.channels_last, {"bn_fwd_stats_nhwc", "bn_fwd_finalize",
                                                           "bn_bwd_sums_nhwc", "bn_bwd_finalize"}),
    ("LayerNorm", (2, 16384), None, {"ln_bwd_split_kernel", "row_sums_partial_kernel"}),
]


@pytest.mark.parametrize("name, shape, fmt, kernels", SPLIT_CASES,
                         ids=["BatchNorm2d-nchw", "BatchNorm2d-nhwc", "LayerNorm-long-rows"])
def test_module_parity_on_the_split_paths(name, shape, fmt, kernels):
    h = EMU_ROUTED["handle"]
    c = shape[-1] if name == "LayerNorm" else shape[1]
    t, f = make_pair(name, c, torch.device("cpu"))
    ran = _kernels_run(h, lambda: run_protocol(t, f, shape, torch.device("cpu"), memory_format=fmt,
                                               train_steps=1))
    names = {sig.split("(", 1)[0].split("::")[-1].split()[-1] for sig in ran}  # emu.kernel_base_name
    assert kernels <= names, (f"{name} {shape}: the plan no longer takes these kernels' path at this "
                              f"shape, pick one that does: {sorted(kernels - names)} (ran {sorted(names)})")
