"""The emulation tier itself (tools/cuda_emu), on the emulated target only:

- every check of the emulator fires on a kernel with that defect planted (tools/cuda_emu/selftest.cu),
  and correct kernels pass; the sanitizer variant stops on overruns and misaligned vector loads;
- the kernels give bitwise-identical results under every thread order (forward, reverse, seeded
  random between scheduling points) and block order (forward, reverse): the fixed-order
  reduction promise. Other device sizes (8 SMs; 1 SM with one resident block, which forces every
  grid-stride loop) change the plans, so each size is compared with the float64 reference and,
  within the size, bitwise across orders;
- every __global__ kernel defined in csrc/kernels, and every template instantiation of one compiled
  into the emulation, ran in some test of the session (coverage; under pytest-xdist in some worker,
  judged by the controller: tests/conftest.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import emu_coverage_check

EPS = 1e-5


@pytest.fixture
def emu(target):
    target.require("emu", why="checks of the emulation tier")
    return target.emu


# ------------------------------------------------------------------------------------------------
# the emulator's checks
# ------------------------------------------------------------------------------------------------
def _selftest(emu, name):
    out = torch.zeros(320)
    emu.ops.selftest(name, out)
    return out


def _ptx_shfl(mode, lane, b, width):
    """Source lane of shfl.sync (PTX ISA), for the expected values."""
    seg = (32 - width) & 0x1F
    clamp = 0 if mode == "up" else 0x1F
    max_lane = (lane & seg) | (clamp & ~seg)
    j = {"idx": (lane & seg) | (b & 0x1F & ~seg), "up": lane - b, "down": lane + b,
         "bfly": lane ^ b}[mode]
    ok = j >= max_lane if mode == "up" else j <= max_lane
    return j if ok else lane


def test_shuffle_semantics(emu):
    out = _selftest(emu, "shfl_modes")
    for row, (mode, b, width) in enumerate([("idx", 5, 8), ("up", 3, 8), ("down", 3, 8),
                                            ("bfly", 5, 32), ("down", 7, 32)]):
        want = [32 * (t // 32) + _ptx_shfl(mode, t % 32, b, width) for t in range(64)]
        assert out[row * 64:(row + 1) * 64].tolist() == want, (mode, b, width)


def test_correct_kernels_pass(emu):
    out = _selftest(emu, "shfl_partial_mask")
    assert out[:32].tolist() == [t ^ 1 if t < 16 else t for t in range(32)]
    out = _selftest(emu, "barrier_after_exit")
    assert out[:40].tolist() == [39 - t for t in range(40)]
    assert _selftest(emu, "dynamic_shared")[0].item() == sum(range(32))
    assert _selftest(emu, "dynamic_shared_opt_in")[0].item() == sum(range(32))


@pytest.mark.parametrize("name,message", [
    ("shfl_divergent", r"a shuffle at tools/cuda_emu/selftest\.cu:\d+ with mask 0xffffffff: lane 16 has exited"),
    ("shfl_two_sites", r"lanes meet at different warp collectives"),
    ("barrier_divergent", r"threads of one block wait at different __syncthreads"),
    ("launch_bounds", r"a block of 128 threads exceeds the kernel's __launch_bounds__\(64\)"),
    ("block_too_large", r"invalid launch: a block of 2048 threads"),
    ("grid_y_too_large", r"invalid launch: a grid beyond"),
    ("dynamic_shared_over_48k", r"invalid launch: 65536 bytes of dynamic shared memory"),
])
def test_planted_defect_is_reported(emu, name, message):
    with pytest.raises(RuntimeError, match=message) as info:
        _selftest(emu, name)
    # the report names the kernel, the block and the thread
    assert re.search(r"kernel .*fastnorm_emu_selftest::\w+", str(info.value))
    assert "block (" in str(info.value)


def test_unwritten_shared_memory_reads_nan(emu):
    out = _selftest(emu, "shared_uninitialized")
    assert torch.isnan(out[1]) and torch.isfinite(out[:32][torch.arange(32) != 1]).all()


def test_race_shows_as_schedule_dependence(emu):
    """A write-write race on shared memory: the thread orders give different results, which is
    what the bitwise comparison of schedules below catches in real kernels."""
    results = set()
    for order in ("forward", "reverse"):
        with emu.schedule(thread_order=order):
            results.add(_selftest(emu, "shared_race")[0].item())
    assert results == {63.0, 0.0}


@pytest.mark.parametrize("name,report", [
    # UBSan's bounds check sees the typed shared array first; ASan the raw tensor storage
    ("shared_overrun", r"selftest\.cu:\d+:\d+: runtime error: index 32 out of bounds"),
    ("global_overrun", r"ERROR: AddressSanitizer: heap-buffer-overflow"),
    ("misaligned_vector", r"selftest\.cu:\d+:\d+: runtime error: .*misaligned address"),
])
def test_sanitizer_stops_on_memory_errors(emu, name, report):
    if not emu.sanitized:
        pytest.skip("the sanitizer variant (FASTNORM_EMU=asan) checks memory accesses")
    code = ("import sys, torch; sys.path.insert(0, 'tools'); import fastnorm; "
            "from cuda_emu import emu; e = emu.load('asan'); "
            f"e.ops.selftest('{name}', torch.zeros(320))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    assert re.search(report, r.stderr), r.stderr[-3000:]
    if "AddressSanitizer" in report:  # ASan's report ends with the emulator's line
        assert re.search(rf"the sanitizer stopped kernel .*{name}", r.stderr), r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# scheduling variants: bitwise-identical results
# ------------------------------------------------------------------------------------------------
def _randn(shape, dtype, seed, layout=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _ln(ops, m, n, dtype):
    x, dy = _randn((m, n), dtype, 1), _randn((m, n), dtype, 2)
    w, b = _randn((n,), dtype, 3), _randn((n,), dtype, 4)
    y, mean, rstd = ops.layer_norm_fwd(x, [n], w, b, EPS)
    grads = ops.layer_norm_bwd(dy, x, mean, rstd, w, [n], [True, True, True])
    ref = F.layer_norm(x.double(), [n], w.double(), b.double(), EPS)
    return (y, mean, rstd, *grads), (y, ref)


def _gn(ops, shape, groups, layout, dtype):
    x, dy = _randn(shape, dtype, 5, layout), _randn(shape, dtype, 6, layout)
    c = shape[1]
    w, b = _randn((c,), dtype, 7), _randn((c,), dtype, 8)
    y, mean, rstd = ops.group_norm_fwd(x, w, b, groups, EPS)
    grads = ops.group_norm_bwd(dy, x, mean, rstd, w, groups, [True, True, True])
    ref = F.group_norm(x.double(), groups, w.double(), b.double(), EPS)
    return (y, mean, rstd, *grads), (y, ref)


def _bn(ops, shape, layout, dtype):
    x, dy = _randn(shape, dtype, 9, layout), _randn(shape, dtype, 10, layout)
    c = shape[1]
    w, b = _randn((c,), dtype, 11), _randn((c,), dtype, 12)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    nbt = torch.zeros((), dtype=torch.long)
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, nbt, True, None, EPS)
    grads = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [True, True, True])
    ref = F.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, EPS)
    return (y, mean, rstd, rm, rv, nbt, *grads), (y, ref)


def _rms(ops, m, n, dtype):
    x, dy = _randn((m, n), dtype, 13), _randn((m, n), dtype, 14)
    w = _randn((n,), dtype, 15)
    y, rstd = ops.rms_norm_fwd(x, [n], w, EPS)
    grads = ops.rms_norm_bwd(dy, x, rstd, w, [n], [True, True])
    xd = x.double()
    ref = xd * (xd.square().mean(-1, keepdim=True) + EPS).rsqrt() * w.double()
    return (y, rstd, *grads), (y, ref)


def _add(ops, m, n, dtype, res_dtype, rms):
    x, dy = _randn((m, n), dtype, 16), _randn((m, n), dtype, 17)
    res, gro = _randn((m, n), res_dtype, 18), _randn((m, n), res_dtype, 19)
    w, b = _randn((n,), dtype, 20), None if rms else _randn((n,), dtype, 21)
    out = ops.add_norm_fwd(x, res, [n], w, b, EPS, rms)
    grads = ops.add_norm_bwd(dy, gro, out[1], out[2], out[3], w, [n], rms, dtype, [True, True, True, True])
    r = out[1].double()
    if rms:
        ref = r * (r.square().mean(-1, keepdim=True) + EPS).rsqrt() * w.double()
    else:
        ref = F.layer_norm(r, [n], w.double(), b.double(), EPS)
    return (*out, *grads), (out[0], ref)


def _nc(ops, shape, layout, dtype):
    """InstanceNorm composed of the per-(n, c) ops, forward and backward (the way SwitchNorm /
    AdaIN use them): moments -> scale, shift -> affine; sums -> a, b, c -> affine_grad."""
    x, dy = _randn(shape, dtype, 22, layout), _randn(shape, dtype, 23, layout)
    length = x[0, 0].numel()
    mean, var = ops.nc_moments(x)
    rstd = (var + EPS).rsqrt()
    y = ops.nc_affine(x, rstd, -mean * rstd)
    sum_dy, sum_dy_xc = ops.nc_grad_sums(dy, x, mean)
    # dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    dx = ops.nc_affine_grad(dy, x, mean, rstd, -rstd ** 3 * sum_dy_xc / length, -rstd * sum_dy / length)
    ref = F.instance_norm(x.double(), eps=EPS)
    return (mean, var, y, sum_dy, sum_dy_xc, dx), (y, ref)
def _lrn(ops, shape, layout, dtype):
    x, dy = _randn(shape, dtype, 22, layout), _randn(shape, dtype, 23, layout)
    y = ops.local_response_norm_fwd(x, 5, 0.3, 0.75, 1.2)
    dx = ops.local_response_norm_bwd(dy, x, 5, 0.3, 0.75, 1.2)
    ref = F.local_response_norm(x.double(), 5, 0.3, 0.75, 1.2)
    return (y, dx), (y, ref)


# Each case crosses a different kernel path (at 132 SMs; the smaller devices move some of them:
# "ln-bwd-rows" gets several rows per backward block (tpr 128) at 8 SMs and 1 SM).
CASES = {
    "ln-subwarp": lambda ops: _ln(ops, 37, 24, torch.float32),
    "ln-block-cached": lambda ops: _ln(ops, 9, 1000, torch.float16),
    "ln-split": lambda ops: _ln(ops, 3, 40000, torch.float32),
    "ln-bwd-rows": lambda ops: _ln(ops, 40, 520, torch.float32),
    "rms-subwarp": lambda ops: _rms(ops, 37, 24, torch.bfloat16),
    "rms-split": lambda ops: _rms(ops, 2, 20000, torch.float32),
    "add-ln-block": lambda ops: _add(ops, 9, 1000, torch.float16, torch.float32, False),
    "add-rms-split": lambda ops: _add(ops, 2, 9000, torch.bfloat16, torch.bfloat16, True),
    "gn-nchw": lambda ops: _gn(ops, (3, 12, 7, 9), 4, None, torch.bfloat16),
    "gn-cl": lambda ops: _gn(ops, (2, 16, 20, 20), 4, "cl", torch.float32),
    "bn-nchw": lambda ops: _bn(ops, (4, 3, 30, 30), None, torch.float32),
    "bn-nhwc": lambda ops: _bn(ops, (8, 24, 9, 9), "cl", torch.float16),
    "bn-nc": lambda ops: _bn(ops, (300, 5), None, torch.float64),
    "nc-rows-split": lambda ops: _nc(ops, (1, 3, 48, 48), None, torch.float32),
    "nc-rows-scalar": lambda ops: _nc(ops, (3, 5, 7, 9), None, torch.bfloat16),
    "nc-cl": lambda ops: _nc(ops, (2, 16, 20, 20), "cl", torch.float16),
    "lrn-nchw": lambda ops: _lrn(ops, (4, 13, 8, 8), None, torch.float32),
    "lrn-nhwc": lambda ops: _lrn(ops, (4, 16, 6, 6), "cl", torch.bfloat16),
}
ORDERS = [dict(thread_order="forward", block_order="forward"),
          dict(thread_order="reverse", block_order="reverse"),
          dict(thread_order="random", block_order="forward", seed=1),
          dict(thread_order="random", block_order="reverse", seed=2)]
DEVICES = [dict(sm_count=132), dict(sm_count=8), dict(sm_count=1, blocks_per_sm=1)]


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.parametrize("device", DEVICES, ids=["132sm", "8sm", "1sm-1block"])
@pytest.mark.parametrize("case", list(CASES))
def test_schedules_bitwise_identical(emu, case, device):
    runs = []
    for order in ORDERS:
        with emu.schedule(**order, **device):
            outs, (y, ref) = CASES[case](emu.ops)
        runs.append(outs)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(y.dtype, 2e-2)
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    for order, outs in zip(ORDERS[1:], runs[1:]):
        for i, (a, b) in enumerate(zip(runs[0], outs)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(_bits(a), _bits(b)), f"output {i} differs between forward order and {order}"


# ------------------------------------------------------------------------------------------------
# coverage: ordered last by tests/conftest.py
# ------------------------------------------------------------------------------------------------
@pytest.mark.emu_coverage
def test_every_kernel_ran(emu, request):
    """In one process; under pytest-xdist each worker has its own coverage, and the controller
    judges their union at session end (tests/conftest.py, pytest_sessionfinish)."""
    if not request.config._fastnorm_full_kernel_suite:
        pytest.skip("coverage is judged over the whole kernel suite (tests/cuda, no -k/-m filter)")
    if hasattr(request.config, "workerinput"):
        pytest.skip("under pytest-xdist the controller judges the coverage of all workers at session end")
    report, failures = emu_coverage_check(emu.coverage(), emu.path)
    print("\n" + "\n".join(report))
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# the occupancy answer (cudaOccupancyMaxActiveBlocksPerMultiprocessor, resident_blocks())
# ------------------------------------------------------------------------------------------------
def test_occupancy_arithmetic_matches_resources(emu):
    """The emulator's calculator is fastnorm/resources.py's (checked there against
    cuda_occupancy.h); regs 0 means registers unknown (no register limit)."""
    from fastnorm import resources

    for threads in (32, 96, 129, 240, 256, 512, 1024):
        for regs in (0, 16, 40, 64, 73, 80, 128, 200, 255):
            for smem, dyn in ((0, 0), (17408, 0), (0, 6144), (40000, 100000)):
                for barriers in (0, 1):
                    got = emu.lib.fastnorm_emu_resident_blocks(threads, regs, smem, dyn, barriers)
                    if regs == 0:
                        _, limits = resources.resident_blocks(threads, 16, smem, dyn, barriers)
                        want = min(v for k, v in limits.items() if k != "registers")
                    else:
                        want = resources.resident_blocks(threads, regs, smem, dyn, barriers)[0]
                    assert got == want, (threads, regs, smem, dyn, barriers)


def test_occupancy_from_resource_report(emu, tmp_path):
    """With a kernel's registers loaded, the channels_last GroupNorm plans size their grids from
    them (one wave: blocks <= resident blocks x SMs); without, from threads alone."""
    import json

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from cuda_emu import emu as emu_mod

    x = torch.empty(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.ones(64)

    def queries():
        emu.record_launches(lambda: emu.ops.group_norm_fwd(x, w, w, 8, EPS))
        return emu.occupancy_queries(), emu.record_launches(
            lambda: emu.ops.group_norm_fwd(x, w, w, 8, EPS))

    emu.use_resource_report("")
    before, _ = queries()
    assert before and all(src == "threads" for *_, src in before), before
    names = [q[0] for q in before]
    try:
        for name in names:  # 128 registers: 2 blocks of 256 threads
            emu.lib.fastnorm_emu_kernel_resources(name.encode(), 128, 0, 1)
        after, launches = queries()
        assert [q[0] for q in after] == names and all(q[3] == 2 and q[4] == "report" for q in after)
        for k, g, b, sm in launches:
            if "cl_welford_partial" in k or "cl_apply" in k:
                assert g[0] <= 2 * 132, (k, g)
        # a report file is matched by name + template arguments (not in it: threads only)
        report = tmp_path / "r.json"
        report.write_text(json.dumps({"kernels": []}))
        assert emu.use_resource_report(str(report)) == 0
        assert all(src == "threads" for *_, src in queries()[0])
        from fastnorm import resources  # the report's names, as the emulator names kernels

        assert resources.signature_head(
            "void fastnorm::channels::cl_apply_kernel<c10::Half, 8>(fastnorm::channels::ClFwd<c10::Half>)"
        ) == "fastnorm::channels::cl_apply_kernel<c10::Half, 8>"
    finally:
        emu.use_resource_report("")


def test_occupancy_answers_cached_and_never_stale(emu):
    """resident_blocks() (csrc/device.h) asks the runtime once per (kernel, threads, shared
    memory, device) and host thread: a second call of an op makes no query. A device of another
    size (another device ordinal of the emulator) or other kernel resources get fresh answers, and
    the plans follow them: the channels_last GroupNorm elementwise grids (apply, dx) are one wave of
    what the device holds (resident blocks per SM x SMs); its reductions' plans ask nothing (they
    depend on the sample's shape alone)."""
    x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.ones(64)
    _, mean, rstd = emu.ops.group_norm_fwd(x, w, w, 8, EPS)

    def call():
        emu.ops.group_norm_fwd(x, w, w, 8, EPS)
        emu.ops.group_norm_bwd(x, x, mean, rstd, w, 8, [True, False, False])

    def grids():
        return {k.split("(")[0]: g[0] for k, g, _, _ in emu.record_launches(call)
                if "cl_dx" in k or "cl_apply" in k}

    emu.use_resource_report("")
    try:
        launches = emu.record_launches(lambda: (call(), call()))
        queries = emu.occupancy_queries()
        names = [q[0] for q in queries]
        assert len(launches) >= 4 and len(names) >= 2
        assert len(set(q[:3] for q in queries)) == len(queries), f"a query repeated: {queries}"
        base = grids()
        assert len(base) == 2 and all(v <= 8 * 132 for v in base.values()), base  # 8 per SM
        for sms, per_sm in ((132, 1), (132, 2), (8, 0)):
            with emu.schedule(sm_count=sms, blocks_per_sm=per_sm):
                g = grids()
                answers = [b for *_, b, _ in emu.occupancy_queries()]
            assert len(answers) == 2 and all(b == (per_sm or 8) for b in answers), answers
            assert all(v <= (per_sm or 8) * sms for v in g.values()) and g != base, (sms, g)
        assert grids() == base  # back on the first device: its answers again
        for name in names:  # other resources of the same kernels (128 registers: 2 blocks)
            emu.lib.fastnorm_emu_kernel_resources(name.encode(), 128, 0, 1)
        g = grids()
        assert [(b, src) for *_, b, src in emu.occupancy_queries()] == [(2, "report")] * 2
        assert all(v <= 2 * 132 for v in g.values()) and g != base, g
    finally:
        emu.use_resource_report("")
    assert grids() == base
