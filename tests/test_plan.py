"""tools/plan.py's estimates (bytes moved, passes over memory, bytes in flight), checked against
arithmetic written out by hand for a few cases, on the launches the host wrappers plan in the
emulation build (record-only mode: no kernel runs). `make test` builds the emulation before
pytest runs (test: build emu-build)."""
import csv
import json
import math
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import plan as planner  # noqa: E402  (tools/plan.py)


@pytest.fixture(scope="module")
def emu():
    from cuda_emu import emu as emu_mod

    import fastnorm  # noqa: F401  (the op schemas)

    return emu_mod.load("plain")


def case(emu, op, shape, dtype, layout="contiguous", groups=32, training=True, res=None):
    return planner.plan_case(emu, op, shape, dtype, layout, groups, training, {} if res is None else res)


def kernels(est, p):
    return [ln["kernel"].split("::")[-1].split("<")[0] for ln in est["launches"] if ln["pass"] == p]


def test_layer_norm_cached_forward_is_one_pass(emu):
    # 4096 x 768 bf16: one cached launch reads x and writes y (2 bytes each), reads w and b
    # (768 bf16 each, once) and writes mean and rstd (4096 fp32 each): exactly the minimum.
    est = case(emu, "layer_norm", (4096, 768), torch.bfloat16)
    assert kernels(est, "fwd") == ["row_fwd_cached_kernel"]
    x = 2 * 4096 * 768
    want = x + x + 2 * 768 * 2 + 2 * 4096 * 4
    fwd = est["passes"]["fwd"]
    assert fwd["est_bytes"] == want
    assert fwd["min_bytes"] == want
    assert fwd["passes"] == 1.0
    # in flight: 96 packs of 8 per row, 16 threads per row (the fewest holding 8 packs each,
    # then no widening: 4096 rows x 16 >= 132 SMs x 256), so 6 packs of 16 bytes per thread
    (ln,) = [ln for ln in est["launches"] if ln["pass"] == "fwd"]
    assert ln["inflight_thread"] == 6 * 16
    assert not ln["approx"]


def test_layer_norm_split_forward_is_one_and_a_half_passes(emu):
    # 1024 x 65536 bf16 (rows longer than the cached kernel's registers hold): statistics pass
    # over x, apply pass over x and y. Items: 8192 packs per row in chunks of 4 x 128 = 512 packs
    # (the row's length alone decides them), 16 chunks per row, 16384 items of 3 partial fp32
    # values, written then read once.
    est = case(emu, "layer_norm", (1024, 65536), torch.bfloat16)
    assert kernels(est, "fwd") == ["row_welford_partial_kernel", "row_welford_finalize_kernel",
                                   "row_apply_kernel"]
    x = 2 * 1024 * 65536
    ws = 3 * 16384 * 4
    stats = 2 * 1024 * 4   # mean and rstd: written by the finalize, read by the apply
    params = 2 * 65536 * 2  # w and b, read by the apply
    want = (x + ws) + (ws + stats) + (x + x + stats + params)
    fwd = est["passes"]["fwd"]
    assert fwd["est_bytes"] == want
    minimum = 2 * x + stats + params
    assert fwd["min_bytes"] == minimum
    assert fwd["passes"] == pytest.approx(want / minimum)
    assert 1.49 < fwd["passes"] < 1.51


def test_batch_norm_training_nchw_stats_and_apply(emu):
    # 64 x 256 x 56 x 56 fp32 NCHW, training: stats over x -> [3][G1][C] partials, finalize,
    # apply over x -> y. G1 = the stats grid's x (the host's chunk count).
    est = case(emu, "batch_norm", (64, 256, 56, 56), torch.float32)
    assert kernels(est, "fwd") == ["bn_fwd_stats_nchw", "bn_fwd_finalize", "bn_fwd_apply_nchw"]
    g1 = est["launches"][0]["grid"][0]
    C, x = 256, 4 * 64 * 256 * 56 * 56
    part = 3 * g1 * C * 4
    finalize = part + 3 * C * 4 + 2 * C * 4 + 2 * C * 4 + 4 * C * 4
    #          coef      save mean/rstd  w, b (fp32)  running mean/var read + written (fp32)
    want = (x + part) + finalize + (x + x + 3 * C * 4)
    fwd = est["passes"]["fwd"]
    assert fwd["est_bytes"] == want
    assert fwd["min_bytes"] == 2 * x + 2 * C * 4 + 2 * C * 4 + 4 * C * 4
    assert fwd["passes"] == pytest.approx(1.5, abs=0.01)
    # backward: sums over dy and x, finalize, dx over dy and x: 5 x-sized streams of 3 minimum
    bwd = est["passes"]["bwd"]
    assert kernels(est, "bwd") == ["bn_bwd_sums_nchw", "bn_bwd_finalize", "bn_bwd_apply_nchw"]
    assert bwd["passes"] == pytest.approx(5 / 3, abs=0.01)


def test_batch_norm_fused_path_reads_x_twice(emu):
    # 8 x 16 x 4 x 4 fp32: one block per channel, the apply kernel reduces then applies (fused):
    # x is read twice by the model (the second read mostly hits L1/L2 on a GPU; the model says so)
    est = case(emu, "batch_norm", (8, 16, 4, 4), torch.float32)
    assert kernels(est, "fwd") == ["bn_fwd_apply_nchw"]
    C, x = 16, 4 * 8 * 16 * 4 * 4
    small = 2 * C * 4 + 2 * C * 4 + 4 * C * 4  # w, b; save mean/rstd; running read + written
    assert est["passes"]["fwd"]["est_bytes"] == 3 * x + small
    # eval: the apply kernel alone, coefficients from the running statistics (read only)
    ev = case(emu, "batch_norm", (8, 16, 4, 4), torch.float32, training=False)
    assert ev["passes"]["fwd"]["est_bytes"] == 2 * x + 2 * C * 4 + 2 * C * 4 + 2 * C * 4
    assert ev["passes"]["fwd"]["passes"] == 1.0


def test_group_norm_channels_last_partials_counted(emu):
    # 8 x 1280 x 16 x 16 fp16 channels_last: partials [N, K, C] fp32 (2 planes) written by the
    # partial kernel and read by the finalize; K from the reductions' plan, which depends on the
    # sample's shape alone (160 channel packs: 5 tiles of 32, 8 row lanes; 256 rows: 4 chunks of
    # 64), checked against the launch.
    est = case(emu, "group_norm", (8, 1280, 16, 16), torch.float16, "channels_last")
    assert kernels(est, "fwd") == ["cl_welford_partial_kernel", "cl_welford_finalize_kernel",
                                   "cl_apply_kernel"]
    part = est["launches"][0]
    bx, by, CT, K, rpc = planner.mirror_cl_sums(8, 256, 1280, 32, 8)
    assert (bx, by, CT, K, rpc) == (32, 8, 5, 4, 64)
    assert part["grid"][0] == 8 * K * CT and part["block"][0] == bx * by
    x, ws, stats = 2 * 8 * 1280 * 256, 2 * 8 * K * 1280 * 4, 2 * 8 * 32 * 4
    want = (x + ws) + (ws + stats) + (x + x + stats + 2 * 1280 * 2)
    assert est["passes"]["fwd"]["est_bytes"] == want
    assert not any(ln["approx"] for ln in est["launches"])


def test_rms_norm_cached_forward_is_one_pass(emu):
    # 4096 x 4096 bf16 (Llama-7B): one cached launch reads x, writes y, reads w (no bias) and
    # writes rstd only (RMS statistics): exactly the minimum
    est = case(emu, "rms_norm", (4096, 4096), torch.bfloat16)
    assert kernels(est, "fwd") == ["row_fwd_cached_kernel"]
    x = 2 * 4096 * 4096
    want = x + x + 4096 * 2 + 4096 * 4
    assert est["passes"]["fwd"]["est_bytes"] == want == est["passes"]["fwd"]["min_bytes"]
    # backward: x and dy read, dx written, one array of [grid, L] fp32 column partials (dweight
    # only) written and read back by the finalize, which writes dweight
    assert kernels(est, "bwd") == ["ln_bwd_cached_kernel", "col_sum_finalize_kernel"]
    bwd_launch = [ln for ln in est["launches"] if ln["pass"] == "bwd"][0]
    ws = bwd_launch["grid"][0] * 4096 * 4
    want = (3 * x + 4096 * 2 + 4096 * 4 + ws) + (ws + 4096 * 2)
    assert est["passes"]["bwd"]["est_bytes"] == want
    assert est["passes"]["bwd"]["min_bytes"] == 3 * x + 4096 * 4 + 4096 * 2 + 4096 * 2
    assert not any(ln["approx"] for ln in est["launches"])


def test_add_rms_norm_counts_the_residual_streams(emu):
    # fused residual add, 4096 x 4096 bf16: the forward reads input and residual and writes output
    # and residual_out (4 x-sized streams, the minimum); the backward reads residual_out, dy and
    # the gradient of residual_out and writes one input gradient (one dtype: dresidual only)
    est = case(emu, "add_rms_norm", (4096, 4096), torch.bfloat16)
    x = 2 * 4096 * 4096
    (f,) = [ln for ln in est["launches"] if ln["pass"] == "fwd"]
    assert f["kernel"].split("<")[0] == "groups::row_fwd_cached_kernel"
    assert f["parts"]["residual read"] == x and f["parts"]["residual_out write"] == x
    assert est["passes"]["fwd"]["est_bytes"] == 4 * x + 4096 * 2 + 4096 * 4
    assert est["passes"]["fwd"]["passes"] == 1.0
    # bytes in flight: two streams (x and residual) of the cached forward's packs
    plain = case(emu, "rms_norm", (4096, 4096), torch.bfloat16)
    (pf,) = [ln for ln in plain["launches"] if ln["pass"] == "fwd"]
    assert f["inflight_thread"] == 2 * pf["inflight_thread"]
    b = [ln for ln in est["launches"] if ln["pass"] == "bwd"][0]
    assert b["parts"]["d_residual_out read"] == x and b["parts"]["dx write"] == x
    assert b["parts"]["x read"] == x and b["parts"]["dy read"] == x
    assert est["passes"]["bwd"]["min_bytes"] == 4 * x + 4096 * 4 + 2 * 4096 * 2
    # add_layer_norm: the same streams, LayerNorm statistics and a bias
    ln = case(emu, "add_layer_norm", (4096, 4096), torch.bfloat16)
    assert ln["passes"]["fwd"]["est_bytes"] == 4 * x + 2 * 4096 * 2 + 2 * 4096 * 4
    assert not any(r["approx"] for r in est["launches"] + ln["launches"])


def test_add_rms_norm_float32_residual_stream(emu):
    # bf16 input with a float32 residual stream: residual, residual_out and the gradient of
    # residual_out are float32; the backward writes both input gradients (bf16 and float32); the
    # cached forward holds rows as floats (half the packs: twice the threads per row)
    M, L = 4096, 4096
    est = planner.plan_case(emu, "add_rms_norm", (M, L), torch.bfloat16, res={},
                            residual=torch.float32)
    assert est["residual"] == "float32"
    x, r = 2 * M * L, 4 * M * L
    (f,) = [ln for ln in est["launches"] if ln["pass"] == "fwd"]
    assert f["parts"]["x read"] == x and f["parts"]["residual read"] == r
    assert f["parts"]["y write"] == x and f["parts"]["residual_out write"] == r
    assert est["passes"]["fwd"]["passes"] == 1.0
    same = case(emu, "add_rms_norm", (M, L), torch.bfloat16)
    (sf,) = [ln for ln in same["launches"] if ln["pass"] == "fwd"]
    assert f["block"][0] == 2 * sf["block"][0]
    assert f["inflight_thread"] == 4 * (8 * 2 + 8 * 4)  # 4 packs of x (bf16) and residual (fp32)
    b = [ln for ln in est["launches"] if ln["pass"] == "bwd"][0]
    assert b["parts"]["x read"] == r and b["parts"]["d_residual_out read"] == r
    assert b["parts"]["dy read"] == x and b["parts"]["dx write"] == x
    assert b["parts"]["dresidual write"] == r
    assert est["passes"]["bwd"]["min_bytes"] == 2 * x + 3 * r + M * 4 + 2 * L * 2
    assert not any(ln["approx"] for ln in est["launches"])
    # the split path too (too few rows for the cached forward)
    sp = planner.plan_case(emu, "add_layer_norm", (512, 65536), torch.bfloat16, res={},
                           residual=torch.float32)
    assert kernels(sp, "fwd")[0] == "row_welford_partial_kernel"
    app = [ln for ln in sp["launches"] if ln["pass"] == "fwd"][2]
    assert app["parts"]["x read"] == 4 * 512 * 65536  # residual_out, float32
    assert not any(ln["approx"] for ln in sp["launches"])


def test_add_norm_split_path_streams(emu):
    # 512 x 65536 fp32 (too few rows for the cached forward): the partial pass reads input and
    # residual and writes residual_out, the apply pass reads residual_out and writes the output
    est = case(emu, "add_rms_norm", (512, 65536), torch.float32)
    assert kernels(est, "fwd") == ["row_welford_partial_kernel", "row_welford_finalize_kernel",
                                   "row_apply_kernel"]
    x = 4 * 512 * 65536
    part, fin, app = [ln for ln in est["launches"] if ln["pass"] == "fwd"]
    items = part["parts"]["workspace write"] // 4  # one partial (sum of squares) per item
    assert part["parts"]["x read"] == part["parts"]["residual read"] == x
    assert part["parts"]["residual_out write"] == x
    assert fin["parts"]["workspace read"] == items * 4 and fin["parts"]["stats"] == 512 * 4
    assert app["parts"]["x read"] == x and app["parts"]["y write"] == x
    assert est["passes"]["fwd"]["passes"] == pytest.approx(5 / 4, abs=0.01)


def test_layer_norm2d_layouts(emu):
    # channels_last (and S == 1) input: LayerNorm's rows [N * HW, C]; NCHW: the positions family
    cl = case(emu, "layer_norm2d", (32, 96, 56, 56), torch.bfloat16, "channels_last")
    assert kernels(cl, "fwd") == ["row_fwd_cached_kernel"]
    x, P = 2 * 32 * 96 * 56 * 56, 32 * 56 * 56
    assert cl["passes"]["fwd"]["est_bytes"] == 2 * x + 2 * 96 * 2 + 2 * P * 4
    assert cl["passes"]["fwd"]["passes"] == 1.0
    nchw = case(emu, "layer_norm2d", (32, 96, 56, 56), torch.bfloat16)
    assert kernels(nchw, "fwd") == ["ln2d_fwd_kernel"]
    assert kernels(nchw, "bwd") == ["ln2d_bwd_kernel", "col_sum_finalize_kernel"]
    # 96 channels fit a lane's 8 packs: the cached forward, x read once
    assert nchw["passes"]["fwd"]["passes"] == 1.0
    assert nchw["passes"]["bwd"]["min_bytes"] == 3 * x + 2 * P * 4 + 96 * 2 + 2 * 96 * 2
    # one position per sample (S == 1): rows too, whatever the layout
    s1 = case(emu, "layer_norm2d", (64, 768, 1, 1), torch.bfloat16)
    assert kernels(s1, "fwd") == ["row_fwd_cached_kernel"]
    assert not any(ln["approx"] for ln in cl["launches"] + nchw["launches"] + s1["launches"])


def test_local_response_norm_one_launch_each_way(emu):
    # one fused kernel each way, x (and dy) read once, no statistics or parameters: 1.00 passes;
    # AlexNet's odd S (55 x 55) takes single positions, GoogLeNet's 56 x 56 16-byte packs,
    # ConvNeXt-like fp16 14 x 14 (196 = 4 mod 8) 8-byte packs, and channels_last input the rows
    # kernels (C = 96: 16-byte packs)
    for shape, dtype, layout, kern, want in (
            ((128, 96, 55, 55), torch.float32, "contiguous", "kernel", "<float, 1>"),
            ((128, 64, 56, 56), torch.float32, "contiguous", "kernel", "<float, 4>"),
            ((32, 64, 14, 14), torch.float16, "contiguous", "kernel", "<Half, 4>"),
            ((128, 96, 55, 55), torch.float32, "channels_last", "rows_kernel", "<float, 4>")):
        est = case(emu, "local_response_norm", shape, dtype, layout)
        assert kernels(est, "fwd") == [f"lrn_fwd_{kern}"]
        assert kernels(est, "bwd") == [f"lrn_bwd_{kern}"]
        assert all(want in ln["kernel"] for ln in est["launches"])
        x = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
        assert est["passes"]["fwd"]["est_bytes"] == est["passes"]["fwd"]["min_bytes"] == 2 * x
        assert est["passes"]["bwd"]["est_bytes"] == est["passes"]["bwd"]["min_bytes"] == 3 * x
        assert not any(ln["approx"] for ln in est["launches"])
        if kern == "rows_kernel":
            # whole rows: 4096 // 96 = 42 rows a forward tile (1008 packs of 4: 4 a thread, all
            # in flight), 2048 // 96 = 21 a backward tile (504 packs per array: 2 a thread, x
            # and dy); 387200 rows leave far more tiles than a wave
            fwd, bwd = est["launches"]
            assert fwd["inflight_thread"] == 4 * 16 and bwd["inflight_thread"] == 2 * 2 * 16


def test_frozen_batch_norm_is_one_pass_each_way(emu):
    # eval statistics, buffers in x's dtype: the forward reads x and writes y; the backward
    # (dx only: buffers take no gradient) reads dy and writes dx, no sums over x
    for shape, dtype, layout, elem in (((64, 256, 56, 56), torch.float32, "contiguous", 4),
                                       ((64, 256, 56, 56), torch.bfloat16, "channels_last", 2)):
        est = case(emu, "frozen_batch_norm", shape, dtype, layout)
        assert len(kernels(est, "fwd")) == 1 and kernels(est, "fwd")[0].startswith("bn_fwd_apply")
        assert len(kernels(est, "bwd")) == 1 and kernels(est, "bwd")[0].startswith("bn_bwd_apply")
        x, C = elem * math.prod(shape), 256
        assert est["passes"]["fwd"]["est_bytes"] == 2 * x + 2 * C * elem + 2 * C * 4 + 2 * C * elem
        (b,) = [ln for ln in est["launches"] if ln["pass"] == "bwd"]
        assert set(k for k in b["parts"] if k.endswith(("read", "write"))) == {"dy read", "dx write"}
        assert est["passes"]["bwd"]["est_bytes"] == 2 * x + 2 * C * 4 + C * elem
        for p in ("fwd", "bwd", "fwdbwd"):
            assert est["passes"][p]["passes"] == 1.0


def test_plan_minimum_matches_the_bench(emu):
    # the plan's minimum (x-sized streams plus small vectors) and bench/run.py's minimum bytes
    # (x-sized streams only, cases.STREAMS) count the same x-sized tensors for every op
    import run

    from cases import OPS

    for op in OPS:
        shape = (64, 256) if op in planner.ROW_OPS else (4, 32, 8, 8)
        c = planner.Call(op, shape, torch.float32, groups=8)
        small = planner.Call(op, shape, torch.float32, groups=8)
        small.E = small.R = 0  # the small vectors alone
        for p in ("fwd", "bwd"):
            streams = (c.minimum(p) - small.minimum(p)) // c.E
            assert run.min_bytes(c.numel, 4, p, op) == streams * c.E, (op, p)
        fwdbwd = run.min_bytes(c.numel, 4, "fwdbwd", op)
        assert fwdbwd == run.min_bytes(c.numel, 4, "fwd", op) + run.min_bytes(c.numel, 4, "bwd", op)


def test_inflight_per_sm_and_low_flag(emu):
    # with a resource record for the kernel: resident blocks from the occupancy arithmetic,
    # averaged over the SMs when the grid is smaller than one wave
    from fastnorm import resources

    probe = case(emu, "layer_norm", (1 << 20, 64), torch.bfloat16)
    (ln,) = [r for r in probe["launches"] if r["pass"] == "fwd"]
    rows = planner.plan(emu, "layer_norm", (1 << 20, 64), torch.bfloat16)
    sig = rows[0][1]
    res = {sig: (64, 384, 1)}  # 64 registers, 384 bytes static shared memory, one barrier
    est = case(emu, "layer_norm", (1 << 20, 64), torch.bfloat16, res=res)
    (ln,) = [r for r in est["launches"] if r["pass"] == "fwd"]
    per_sm = resources.resident_blocks(ln["block"][0], 64, 384, 0, 1)[0]
    assert ln["res_per_sm"] == per_sm
    # 64 bf16 = 8 packs per row, 8 threads per row (a 128-byte line per warp load): 1 pack each
    assert ln["inflight_thread"] == 16
    active = min(per_sm, ln["blocks"] / planner.SMS)
    assert ln["inflight_sm"] == active * ln["block"][0] * 16
    assert ln["low"] == (ln["inflight_sm"] < planner.LITTLE_BYTES_PER_SM)
    assert planner.LITTLE_BYTES_PER_SM == pytest.approx(3.35e12 * 650e-9 / 132)


def test_unknown_kernel_is_na_not_an_error():
    call = planner.Call("layer_norm", (64, 256), torch.float32)
    sig = "void fastnorm::groups::rms_fwd_cached_kernel<float, 4, false>(fastnorm::groups::RowFwd<float>, int)"
    known = "void fastnorm::groups::row_fwd_cached_kernel<float, 4, false>(fastnorm::groups::RowFwd<float>, int)"
    est = planner.estimate([("fwd", sig, (8, 1, 1), (128, 1, 1), 0),
                            ("bwd", known, (8, 1, 1), (128, 1, 1), 0)], call, {})
    assert est["launches"][0]["bytes"] is None and est["launches"][0]["inflight_thread"] is None
    assert est["passes"]["fwd"]["est_bytes"] is None and est["passes"]["fwd"]["passes"] is None
    assert est["passes"]["fwd"]["unknown"] == ["groups::rms_fwd_cached_kernel<float, 4, false>"]
    assert est["passes"]["fwdbwd"]["passes"] is None
    text = planner.report(est, {})
    assert "n/a" in text and "no bytes model for: groups::rms_fwd_cached_kernel" in text
    # adding a model is one line: the entry of a kernel that moves memory the same way
    planner.MODELS["rms_fwd_cached_kernel"] = planner.MODELS["row_fwd_cached_kernel"]
    try:
        est = planner.estimate([("fwd", sig, (8, 1, 1), (128, 1, 1), 0)], call, {})
        assert est["passes"]["fwd"]["est_bytes"] == 2 * 4 * 64 * 256 + 2 * 256 * 4 + 2 * 64 * 4
    finally:
        del planner.MODELS["rms_fwd_cached_kernel"]


def test_every_kernel_has_a_model():
    # every __global__ kernel of csrc/kernels (the emulator's list) has an entry, so a new
    # kernel's n/a in the report is a reminder, and this test names it
    from cuda_emu import emu as emu_mod

    missing = sorted(set(emu_mod.defined_kernels()) - set(planner.MODELS))
    assert not missing, (f"no bytes model in tools/plan.py MODELS for: {missing}; add one line per "
                         "kernel (an existing entry when it moves memory the same way, else a "
                         "Model(...)); docs/kernel_resources.md, 'Launch plans'")


def test_template_constants_match_the_sources():
    # the model's copies of the template constants are the sources' definitions
    with open(os.path.join(ROOT, "csrc", "kernels", "groups_forward.cuh")) as f:
        fwd = re.sub(r"\s+", " ", f.read())
    with open(os.path.join(ROOT, "csrc", "kernels", "groups_backward.cuh")) as f:
        bwd = re.sub(r"\s+", " ", f.read())
    with open(os.path.join(ROOT, "csrc", "launch", "groups.h")) as f:
        host = re.sub(r"\s+", " ", f.read())
    assert ("inline constexpr int kFwdPacks = VEC == 1 ? 8 : (sizeof(T) == 8 ? 4 : "
            "(sizeof(S) > sizeof(T) ? 4 : 8));") in fwd
    assert "inline constexpr int kBwdPacks = 8 / VEC;" in fwd
    assert ("inline constexpr int kBwdCachedMaxThreads = sizeof(acc_of<T>) == 8 || VEC == 1 || "
            "sizeof(X) > sizeof(T) ? 512 : 1024;") in bwd
    assert f"constexpr int kRowBlockThreads = {planner.KROW_BLOCK_THREADS};" in host
    for elem, vec, held in ((2, 1, 2), (2, 8, 2), (2, 8, 4), (4, 4, 4), (8, 2, 8)):
        want = 8 if vec == 1 else (4 if elem == 8 else (4 if held > elem else 8))
        assert planner.fwd_packs(elem, vec, held) == want
        assert planner.bwd_cached_max_threads(8 if elem == 8 else 4, vec, elem, held) == (
            512 if elem == 8 or vec == 1 or held > elem else 1024)
    assert planner.K["groups::kUnroll"] == 4 and planner.K["channels::kThreads"] == 256


def test_mirrors_agree_with_every_benchmark_case(emu):
    # the plan mirrors (threads per row, items, channels_last chunks) reproduce every recorded
    # launch of the benchmark cases: no estimate is marked approximate
    from cases import DTYPES, select

    bad = []
    ops = set()
    for c in select("cuda", False):
        if c.op in planner.MOD_OPS and not planner.mod_fused(c.op, c.shape, DTYPES[c.dtype]):
            continue  # rows past the fused kernels: the functional's ATen composition
        est = case(emu, c.op, c.shape, DTYPES[c.dtype],
                   "channels_last" if c.layout != "contiguous" else "contiguous",
                   32 if c.op == "group_norm" else 1)
        bad += [f"{c.label}: {ln['kernel']}" for ln in est["launches"] if ln["approx"]]
        assert all(t["passes"] is not None and t["passes"] >= 0.999 for t in est["passes"].values())
        ops.add(c.op)
    assert not bad, bad
    assert ops == set(planner.OPS) - {"add_layer_norm"}  # every op the bench measures is planned


def test_plan_join_puts_measurements_next_to_the_plan(emu, tmp_path):
    import run

    from cases import select

    cases = [c for c in select("cuda", True) if c.op == "layer_norm"][:1]
    plan_json = tmp_path / "plan.json"
    assert run.print_plans(cases, str(plan_json)) == 0
    c = cases[0]
    results = tmp_path / "results.csv"
    with open(results, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=run.COLUMNS)
        w.writeheader()
        for p, ms in (("fwd", 0.2), ("bwd", 0.4), ("fwdbwd", 0.6)):
            w.writerow({k: "" for k in run.COLUMNS} | {
                "run_id": "20250101-000000", "device_name": "test", "fastnorm_commit": "abc",
                "op": c.op, "case": c.name, "shape": "x".join(map(str, c.shape)), "dtype": c.dtype,
                "layout": c.layout, "pass": p, "provider": "fastnorm", "median_ms": ms,
                "p20_ms": ms, "p80_ms": ms, "gbps": 1.0, "copy_gbps": 3000.0})
    out = tmp_path / "pvm"
    assert run.plan_vs_measured(str(results), str(plan_json), str(out)) == 0
    with open(str(out) + ".csv", newline="") as f:
        rows = {r["pass"]: r for r in csv.DictReader(f)}
    plans = json.load(open(plan_json))["cases"][0]
    for p, ms in (("fwd", 0.2), ("bwd", 0.4), ("fwdbwd", 0.6)):
        est = plans["passes"][p]["est_bytes"]
        assert float(rows[p]["est_bytes"]) == pytest.approx(est, rel=1e-5)
        assert float(rows[p]["est_gbps"]) == pytest.approx(est / (ms * 1e-3) / 1e9, rel=1e-5)
        assert int(rows[p]["launches"]) == len([ln for ln in plans["launches"]
                                                if p == "fwdbwd" or ln["pass"] == p])
    detail = json.load(open(str(out) + ".json"))["rows"]
    assert len(detail) == 3 and all(d["plan"] for d in detail)
    assert math.isclose(detail[0]["median_ms"], 0.2)
