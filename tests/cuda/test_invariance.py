"""Batch invariance and device invariance of the kernels: a sample's result does not depend on
the other samples of its batch, nor on the size of the GPU.

What is checked. For every op whose statistics are per row / per sample / per position
(LayerNorm, RMSNorm, the residual add + LayerNorm / RMSNorm with a residual of the input's dtype
or float32, GroupNorm / InstanceNorm, LayerNorm2d, LocalResponseNorm, the per-(n, c) primitives,
and LayerNorm + gelu / GroupNorm + silu), called as ops through the `target` fixture
(tests/conftest.py), one parametrized test per family, each case one of two checks:

- batch: samples s = 0, a middle one and the last of a batch of M rows (or N samples) against the
  same sample computed alone (a batch of one built from x[s:s + 1].clone(), the same weight and
  bias, dy[s:s + 1]; per-sample [N, C] coefficients sliced with it): the forward's outputs (y;
  mean / rstd / var where the op returns them; add_norm's residual_out), then the backward's
  input gradients (dx; add_norm's dinput and dresidual; nc_grad_sums' sums) given the same saved
  statistics (the batch's, sliced: a backward difference is the backward's own, not one inherited
  from the forward; when both pass, the sample computed alone end to end gives the same bits);
- device: the same batch on emulated devices of 108 and 8 SMs (`target.schedule(sm_count=...)`)
  against the default H100-sized 132: the same outputs and input gradients.
Every comparison is bitwise (torch.equal). The parameter gradients (dweight / dbias: sums over the
batch, not per sample) are not compared; the backward asks for them in three LayerNorm cases
(ids "-all": the autograd's request, which adds the column-sum workspaces to the plan) and for dx
alone elsewhere (ids "-dx"; the column sums are most of the emulation's time).

Why. A sample's output must not depend on which other samples share its batch (batching requests
together, padding a batch, splitting it into micro-batches must not change a sample's bits), nor
on the GPU it runs on. So the reduction order of a row (a group, a position, an (n, c) plane) has
to be decided by that row's own length, dtype and layout, never by the number of rows or the SM
count (threads per row, rows per block, cached vs split, chunks per row): float addition is not
associative, and another order gives other bits, in float32 as in half.

How. Data: random normal with a fixed seed (the conftest seeds every test) and an offset (mean 8,
std 1.5; LocalResponseNorm: mean 1): a mean far from zero makes a sum's rounding depend on its
order, so a changed order shows in float32's last bits. No NaN or infinity anywhere. Shapes reach
each region of the host plans (csrc/launch/groups.h, channels.h, positions.h): short rows (the
"cached" kernels that hold a row in registers: L = 64, 768, 1003 (odd: single-element packs),
4096) and long rows (the "split" kernels, (row, chunk) items then a finalize: L = 20000 float32,
40000 half, beyond the forward's cached capacity of 512 threads x 8 packs x 16 bytes = 16384
float32 / 32768 half elements, and the backward's smaller one); rows M = 1, 2, 3, 64, 600 at short
rows, 1, 2, 3 at long rows (slow in emulation); N = 1, 2, 5, 9 for the per-sample ops; NCHW and
channels_last where the op has them. float32 on every shape, bfloat16 and float16 (which share
every plan: 2-byte elements) on fewer. The case tables say which (the _*_table functions).

Targets: the emulation runs both checks, the CUDA target the batch check (its device has one
size). The ATen reference target is skipped: invariance is the kernels' promise (ATen's
vectorized elementwise ops, torch's silu among them, round a vector body and a scalar tail
differently). A failure lists every mismatch of its case: the output, the sample or the device,
the largest |difference| and how many elements differ. About 2 minutes in the plain emulation on
one core, single-process (pytest --durations=15 shows the slowest cases).
"""
from __future__ import annotations

import pytest
import torch

EPS = 1e-5
CL = torch.channels_last
DEVICES = (108, 8)  # emulated SM counts checked against the default 132
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GELU, SILU = 5, 4   # fastnorm.activations codes (csrc/kernels/activation.cuh ActKind)


def _randn(dev, shape, dtype, scale=1.0, shift=0.0, fmt=None):
    """Drawn in float64 on the CPU (the global generator, seeded per test), then cast and moved."""
    t = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(dev)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _data(dev, shape, dtype, fmt=None):
    """Input with a mean far from zero (exposes reduction-order differences)."""
    return _randn(dev, shape, dtype, 1.5, 8.0, fmt)


def _picks(m):
    """The samples checked: the first, a middle one, the last."""
    return sorted({0, m // 2, m - 1})


def _one(t, s):
    """Sample s alone: a batch of one in fresh memory, in t's memory format."""
    return t[s:s + 1].clone()


def _diff(fails, what, got, want):
    """Appends a line to `fails` unless got and want hold the same bits."""
    if got.shape != want.shape:
        fails.append(f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
        return
    if torch.equal(got, want):
        return
    g, w = got.detach().double(), want.detach().double()
    if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
        fails.append(f"{what}: non-finite values")
        return
    d = (g - w).abs()
    fails.append(f"{what}: max |diff| {d.max().item():.3g} (values up to {w.abs().max().item():.3g}), "
                 f"{int((d != 0).sum())} of {d.numel()} elements differ")


def _run(fwd, bwd, inp, saved=None):
    """fwd(inp) -> {name: output}, then bwd(inp, saved or those outputs) -> {name: gradient};
    every tensor has the batch as its first dimension."""
    out = fwd(inp)
    return out, bwd(inp, out if saved is None else saved)


def _check(target, check, desc, n, inp, fwd, bwd, layout=None):
    """The batch or the device check of one case (module docstring). inp: the batched tensors
    (first dimension the batch of n); fwd / bwd close over the shared ones (weight, bias)."""
    target.require("cuda", "emu", why="invariance is the kernels' promise, not the ATen reference's")
    if check == "device":
        target.require("emu", why="device sizes are an emulation control")
    out, grads = _run(fwd, bwd, inp)
    fails = [f"{name}: non-finite values in the batch's own result"
             for name, t in {**out, **grads}.items() if not torch.isfinite(t.double()).all()]
    if check == "batch":
        for s in _picks(n):
            one = {k: _one(v, s) for k, v in inp.items()}
            if layout is not None:  # the sample alone keeps the batch's layout
                assert one["x"].is_contiguous(memory_format=layout), f"{desc}: sample {s} layout"
            o1, g1 = _run(fwd, bwd, one, {k: _one(v, s) for k, v in out.items()})
            for name in out:
                _diff(fails, f"{name} of sample {s}", o1[name], out[name][s:s + 1])
            for name in grads:
                _diff(fails, f"{name} of sample {s}", g1[name], grads[name][s:s + 1])
        head = f"{desc}, a batch of {n}: samples {_picks(n)} alone differ from the batch's (bitwise)"
    else:
        for sm in DEVICES:
            with target.schedule(sm_count=sm):
                o2, g2 = _run(fwd, bwd, inp, out)
            for name in out:
                _diff(fails, f"{name} on {sm} SMs", o2[name], out[name])
            for name in grads:
                _diff(fails, f"{name} on {sm} SMs", g2[name], grads[name])
        head = f"{desc}, a batch of {n}: emulated devices of {DEVICES} SMs differ from 132 SMs (bitwise)"
    if fails:
        raise AssertionError(head + ":\n  " + "\n  ".join(fails))


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """The emulation runs on one thread; the torch ops around it (inputs, copies, comparisons,
    the NaN fill of every allocation) are small, and a second intra-op thread on a shared 2-core
    machine mostly spins: one thread for this module, the previous count restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(cases):
    return ["-".join(str(v) for v in c) for c in cases]


# ------------------------------------------------------------------------------------------------
# rows: layer_norm, rms_norm, add_norm (LayerNorm / RMSNorm, residual of the input's dtype or
# float32), layer_norm with a fused activation. M rows of L elements.
# ------------------------------------------------------------------------------------------------
def _row_case(target, op, dtype, L, M, grads):
    """(inputs, fwd, bwd) of one row op; grads "dx": the backward asked for the input gradients
    only, "all": for dweight / dbias too (the autograd's request when the parameters need them)."""
    pg = grads == "all"
    dev = target.device
    ops = target.ops
    x = _data(dev, (M, L), dtype)
    dy = _randn(dev, (M, L), dtype)
    w = _randn(dev, (L,), dtype, 0.5, 1.0)
    b = _randn(dev, (L,), dtype, 0.5)
    inp = {"x": x, "dy": dy}
    if op in ("layer_norm", "layer_norm_gelu"):
        act = GELU if op == "layer_norm_gelu" else 0

        def fwd(i):
            y, mean, rstd = ops.layer_norm_fwd(i["x"], [L], w, b, EPS, None, act, 0.0)
            return {"y": y, "mean": mean, "rstd": rstd}

        def bwd(i, s):
            dx, _, _ = ops.layer_norm_bwd(i["dy"], i["x"], s["mean"], s["rstd"], w, [L],
                                          [True, pg, pg], b, act, 0.0)
            return {"dx": dx}
        return inp, fwd, bwd
    if op == "rms_norm":
        def fwd(i):
            y, rstd = ops.rms_norm_fwd(i["x"], [L], w, EPS)
            return {"y": y, "rstd": rstd}

        def bwd(i, s):
            dx, _ = ops.rms_norm_bwd(i["dy"], i["x"], s["rstd"], w, [L], [True, pg])
            return {"dx": dx}
        return inp, fwd, bwd
    # add_norm_{ln,rms}[_f32res]
    rms = "rms" in op
    rdt = torch.float32 if op.endswith("f32res") else dtype
    inp["res"] = _randn(dev, (M, L), rdt, 1.0, -0.25)
    inp["gro"] = _randn(dev, (M, L), rdt)
    bb = None if rms else b

    def fwd(i):
        y, r, mean, rstd = ops.add_norm_fwd(i["x"], i["res"], [L], w, bb, EPS, rms)
        out = {"y": y, "residual_out": r, "rstd": rstd}
        if not rms:
            out["mean"] = mean
        return out

    def bwd(i, s):
        mean = s["mean"] if not rms else torch.empty(0, dtype=s["rstd"].dtype, device=dev)
        dx, dres, _, _ = ops.add_norm_bwd(i["dy"], i["gro"], s["residual_out"], mean, s["rstd"], w,
                                          [L], rms, dtype, [True, True, pg, pg and not rms])
        return {"dinput": dx, "dresidual": dres}
    return inp, fwd, bwd


ROW_OPS = ["layer_norm", "rms_norm", "add_norm_ln", "add_norm_rms", "add_norm_f32res",
           "layer_norm_gelu"]
BOTH = ("batch", "device")
BATCH = ("batch",)


def _row_table(op, dn):
    """[(L, M, grads, checks)] of one op and dtype. Every row op runs on the same host plans
    (csrc/launch/groups.h): LayerNorm in float32 crosses all of them (M = 1, 2, 3, 64, 600 at
    L = 64 and 768; M = 1, 3, 64 at L = 1003 and 4096; M = 1, 2, 3 at L = 20000, the split path of
    both passes), with dweight / dbias asked for too at three of them; the other ops and the half
    types cross each region with fewer batches. The backward asks for dx alone elsewhere: the
    parameter gradients' column sums (not compared) are most of the emulation's time. M = 600 at
    L = 768 is checked for batch invariance only (its device check, three runs of the largest
    batch here, adds what M = 64 already shows)."""
    long_l = 20000 if dn == "fp32" else 40000
    if op == "layer_norm" and dn == "fp32":
        t = [(64, m, "dx", BOTH) for m in (1, 2, 3, 64, 600)]
        t += [(768, m, "dx", BOTH) for m in (1, 2, 3, 64)] + [(768, 600, "dx", BATCH)]
        t += [(L, m, "dx", BOTH) for L in (1003, 4096) for m in (1, 3, 64)]
        t += [(long_l, m, "dx", BOTH) for m in (1, 2, 3)]
        return t + [(768, 64, "all", BOTH), (4096, 3, "all", BOTH), (long_l, 3, "all", BOTH)]
    wide = [(64, 600, "dx", BOTH), (768, 3, "dx", BOTH), (768, 64, "dx", BOTH),
            (768, 600, "dx", BATCH), (1003, 3, "dx", BOTH), (4096, 3, "dx", BOTH),
            (long_l, 2, "dx", BOTH)]
    if dn == "fp32" or (op, dn) in (("layer_norm", "bf16"), ("add_norm_f32res", "fp16")):
        return wide
    # the other half cases: bf16 and fp16 share every plan (2-byte elements), so each takes
    # half of the regions
    if dn == "bf16":
        return [(768, 64, "dx", BOTH), (1003, 3, "dx", BOTH), (long_l, 2, "dx", BOTH)]
    return [(64, 600, "dx", BOTH), (768, 3, "dx", BOTH), (4096, 3, "dx", BOTH)]


ROW_CASES = [(op, dn, f"L{L}", f"M{m}", g, c)
             for op in ROW_OPS for dn in DT
             if not (op == "add_norm_f32res" and dn == "fp32")  # that is add_norm_ln
             for L, m, g, checks in _row_table(op, dn) for c in checks]


@pytest.mark.parametrize("op,dn,L,M,grads,check", ROW_CASES, ids=_ids(ROW_CASES))
def test_rows(target, op, dn, L, M, grads, check):
    L, M = int(L[1:]), int(M[1:])
    inp, fwd, bwd = _row_case(target, op, DT[dn], L, M, grads)
    desc = f"{op} {dn} rows of L = {L}" + (" (dweight / dbias asked for)" if grads == "all" else "")
    _check(target, check, desc, M, inp, fwd, bwd)


# ------------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm (G == C), plain and with a fused activation (silu); NCHW (the rows
# family: rows (n, g)) and channels_last (the channels family: row chunks per (n, channel tile))
# ------------------------------------------------------------------------------------------------
GN_SHAPES = {  # name: (C, H, W, G)
    "c320-8x8-g32": (320, 8, 8, 32),
    "c32-64x64-g32": (32, 64, 64, 32),  # InstanceNorm, 4096 positions
    "c12-5x7-g3": (12, 5, 7, 3),        # odd HW: packs straddle channels or single elements
    "c6-3x3-g6": (6, 3, 3, 6),          # InstanceNorm, 9 positions
}


def _gn_table(shape):
    """[(dtype, act, N)]: float32 with N = 1, 2, 5, 9 (silu: 2, 9); the half types one N each
    (bf16 and fp16 share the plans); the large InstanceNorm N = 2 only."""
    if shape == "c32-64x64-g32":
        return [("fp32", "plain", 2)]
    t = [("fp32", "plain", n) for n in (1, 2, 5, 9)] + [("fp32", "silu", n) for n in (2, 9)]
    if shape in ("c320-8x8-g32", "c12-5x7-g3"):
        t += [("bf16", "plain", 9), ("fp16", "plain", 2)]
    return t


GN_CASES = [(shape, dn, lay, act, f"N{n}", c) for shape in GN_SHAPES for dn, act, n in _gn_table(shape)
            for lay in ("nchw", "cl") for c in BOTH]


@pytest.mark.parametrize("shape,dn,lay,act,N,check", GN_CASES, ids=_ids(GN_CASES))
def test_group_norm(target, shape, dn, lay, act, N, check):
    C, H, W, G = GN_SHAPES[shape]
    N = int(N[1:])
    dtype = DT[dn]
    fmt = CL if lay == "cl" else None
    dev = target.device
    ops = target.ops
    code = SILU if act == "silu" else 0
    inp = {"x": _data(dev, (N, C, H, W), dtype, fmt), "dy": _randn(dev, (N, C, H, W), dtype, fmt=fmt)}
    w = _randn(dev, (C,), dtype, 0.5, 1.0)
    b = _randn(dev, (C,), dtype, 0.5)

    def fwd(i):
        y, mean, rstd = ops.group_norm_fwd(i["x"], w, b, G, EPS, None, code, 0.0)
        return {"y": y, "mean": mean, "rstd": rstd}

    def bwd(i, s):
        dx, _, _ = ops.group_norm_bwd(i["dy"], i["x"], s["mean"], s["rstd"], w, G, [True, False, False],
                                      b, code, 0.0)
        return {"dx": dx}
    desc = f"group_norm{'+silu' if code else ''} {dn} {lay} (N, {C}, {H}, {W}) G = {G}"
    _check(target, check, desc, N, inp, fwd, bwd, fmt)


# ------------------------------------------------------------------------------------------------
# LayerNorm2d: NCHW (the positions family) and channels_last (LayerNorm rows [N * H * W, C])
# ------------------------------------------------------------------------------------------------
LN2D_SHAPES = {"c96-7x7": (96, 7, 7), "c13-5x5": (13, 5, 5), "c4100-2x2": (4100, 2, 2)}


def _ln2d_table(shape):
    """[(dtype, N)]: float32 with N = 1, 2, 5, 9 (C = 4100: 1, 2, 5); bf16 and fp16 one N each."""
    if shape == "c13-5x5":
        return [("fp32", n) for n in (1, 2, 5, 9)]
    ns = (1, 2, 5) if shape == "c4100-2x2" else (1, 2, 5, 9)
    return [("fp32", n) for n in ns] + [("bf16", 5), ("fp16", 2)]


LN2D_CASES = [(shape, dn, lay, f"N{n}", c) for shape in LN2D_SHAPES for dn, n in _ln2d_table(shape)
              for lay in ("nchw", "cl") for c in BOTH]


@pytest.mark.parametrize("shape,dn,lay,N,check", LN2D_CASES, ids=_ids(LN2D_CASES))
def test_layer_norm2d(target, shape, dn, lay, N, check):
    C, H, W = LN2D_SHAPES[shape]
    N = int(N[1:])
    dtype = DT[dn]
    fmt = CL if lay == "cl" else None
    dev = target.device
    ops = target.ops
    inp = {"x": _data(dev, (N, C, H, W), dtype, fmt), "dy": _randn(dev, (N, C, H, W), dtype, fmt=fmt)}
    w = _randn(dev, (C,), dtype, 0.5, 1.0)
    b = _randn(dev, (C,), dtype, 0.5)

    def fwd(i):
        y, mean, rstd = ops.layer_norm2d_fwd(i["x"], w, b, EPS)
        n = i["x"].shape[0]  # statistics in (n, position) order: [n, H * W], a row per sample
        return {"y": y, "mean": mean.reshape(n, -1), "rstd": rstd.reshape(n, -1)}

    def bwd(i, s):
        dx, _, _ = ops.layer_norm2d_bwd(i["dy"], i["x"], s["mean"].reshape(-1), s["rstd"].reshape(-1),
                                        w, [True, False, False])
        return {"dx": dx}
    _check(target, check, f"layer_norm2d {dn} {lay} (N, {C}, {H}, {W})", N, inp, fwd, bwd, fmt)


# ------------------------------------------------------------------------------------------------
# LocalResponseNorm: NCHW (packs of positions) and channels_last (tiles of rows)
# ------------------------------------------------------------------------------------------------
LRN_SHAPES = {"c24-5x7": (24, 5, 7), "c16-4x4": (16, 4, 4)}
LRN_CASES = [(shape, dn, lay, f"N{n}", c) for shape in LRN_SHAPES
             for dn, n in [("fp32", 1), ("fp32", 2), ("fp32", 5), ("fp32", 9), ("bf16", 5), ("fp16", 2)]
             for lay in ("nchw", "cl") for c in BOTH]


@pytest.mark.parametrize("shape,dn,lay,N,check", LRN_CASES, ids=_ids(LRN_CASES))
def test_local_response_norm(target, shape, dn, lay, N, check):
    C, H, W = LRN_SHAPES[shape]
    N = int(N[1:])
    dtype = DT[dn]
    fmt = CL if lay == "cl" else None
    dev = target.device
    ops = target.ops
    size, alpha, beta, k = 5, 0.3, 0.75, 1.2  # alpha large enough that every window matters
    inp = {"x": _randn(dev, (N, C, H, W), dtype, 1.5, 1.0, fmt),
           "dy": _randn(dev, (N, C, H, W), dtype, fmt=fmt)}

    def fwd(i):
        return {"y": ops.local_response_norm_fwd(i["x"], size, alpha, beta, k)}

    def bwd(i, s):
        return {"dx": ops.local_response_norm_bwd(i["dy"], i["x"], size, alpha, beta, k)}
    _check(target, check, f"local_response_norm {dn} {lay} (N, {C}, {H}, {W}) size {size}", N, inp,
           fwd, bwd, fmt)


# ------------------------------------------------------------------------------------------------
# per-(n, c) primitives: nc_moments, nc_affine, nc_grad_sums, nc_affine_grad; NCHW (rows (n, c))
# and channels_last (the channels family, G = C)
# ------------------------------------------------------------------------------------------------
NC_SHAPES = {"c8-16x16": (8, 16, 16),   # rows of 256: whole rows per item; cl: 8 channels
             "c2-72x72": (2, 72, 72),   # rows of 5184: S > 1 partials; cl: K > 1 row chunks
             "c3-20x20": (3, 20, 20),   # single elements, cl: K > 1
             "c5-4x3": (5, 4, 3)}       # single elements, small


def _nc_table(shape):
    """[(dtype, N)]: float32 with N = 1, 2, 5, 9 (the larger planes 1, 2, 9); bf16 and fp16 one N
    each on the two small shapes."""
    if shape in ("c2-72x72", "c3-20x20"):
        return [("fp32", n) for n in (1, 2, 9)]
    return [("fp32", n) for n in (1, 2, 5, 9)] + [("bf16", 5), ("fp16", 2)]


NC_CASES = [(shape, dn, lay, f"N{n}", c) for shape in NC_SHAPES for dn, n in _nc_table(shape)
            for lay in ("nchw", "cl") for c in BOTH]


@pytest.mark.parametrize("shape,dn,lay,N,check", NC_CASES, ids=_ids(NC_CASES))
def test_nc_ops(target, shape, dn, lay, N, check):
    C, H, W = NC_SHAPES[shape]
    N = int(N[1:])
    dtype = DT[dn]
    fmt = CL if lay == "cl" else None
    dev = target.device
    ops = target.ops
    f32 = torch.float32
    # the [N, C] coefficients are per sample too: they travel with it
    inp = {"x": _data(dev, (N, C, H, W), dtype, fmt), "dy": _randn(dev, (N, C, H, W), dtype, fmt=fmt),
           "scale": _randn(dev, (N, C), f32, 0.5, 1.0), "shift": _randn(dev, (N, C), f32),
           "a": _randn(dev, (N, C), f32), "b": _randn(dev, (N, C), f32), "c": _randn(dev, (N, C), f32)}

    def fwd(i):
        mean, var = ops.nc_moments(i["x"])
        return {"mean": mean, "var": var, "y": ops.nc_affine(i["x"], i["scale"], i["shift"])}

    def bwd(i, s):
        sum_dy, sum_dy_xc = ops.nc_grad_sums(i["dy"], i["x"], s["mean"])
        dx = ops.nc_affine_grad(i["dy"], i["x"], s["mean"], i["a"], i["b"], i["c"])
        dx0 = ops.nc_affine_grad(None, i["x"], s["mean"], i["a"], i["b"], i["c"])
        return {"sum_dy": sum_dy, "sum_dy_xc": sum_dy_xc, "dx": dx, "dx (no grad_out)": dx0}
    _check(target, check, f"nc ops {dn} {lay} (N, {C}, {H}, {W})", N, inp, fwd, bwd, fmt)
