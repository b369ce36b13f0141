"""The modulated row norms (fastnorm::modulated_norm_fwd / _bwd: the AdaLN / AdaLN-Zero steps of
diffusion transformers on the cached row kernels), called as ops through the `target` fixture
(tests/conftest.py): the CUDA kernels on a GPU, the same sources in the CPU emulation
(FASTNORM_EMU), or the reference ops (FASTNORM_KERNEL_TARGETS=reference).

    y = norm(r) * (scale_offset + scale[m // seg_rows]) + shift[m // seg_rows]
    r = input, or r = round_X(residual + gate[m // seg_rows] * input) stored as residual_out

Against float64: residual_out within one rounding of the residual's dtype, the statistics and y of
the stored residual_out, and every gradient the backward returns (input, scale, shift, weight,
bias, residual) against float64 autograd of the formula (the roundings are the identity to
autograd); the ATen reference's own float64 gradients (ops.modulated.modulated_grads) against the
same autograd.

Shapes cross the host's decisions (csrc/launch/groups.h modulated_forward / modulated_backward):
rows held in registers up to 2048 elements in every dtype, 4096 in 16-byte packs of half / bf16 /
fp32 (fp64 rows longer than 2048 are refused: the functional takes ATen for them); the pack path
(D % 8 == 0 half, % 4 fp32, % 2 fp64) and the single-element one (D = 1, 7, 2047); seg_rows = 1 (a
modulation row per token), = M (one row for all) and in between; the backward's segmented sums
with segments that are not a multiple of a block's rows (3, 5, 17, 33); output masks; absent
operands; float32 modulation and weights with a half input; residuals of the input's dtype and a
float32 residual stream with a half input, with and without the gate; misaligned views; empty
inputs; a segment's outputs and dscale / dshift the same bits alone and in a batch.
"""
from __future__ import annotations

import pytest
import torch

from test_row_kernels import EMU_LIMIT, TOL, _check, _randn, _stat
from fastnorm.ops.modulated import modulated_grads

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [F32, F16, BF16, F64]
EPS = 1e-6
NAMES = ("input", "scale", "shift", "weight", "bias", "residual", "gate")
# (M, D, seg_rows)
CASES = [(5, 1, 1), (5, 1, 5), (5, 7, 1), (7, 7, 7), (40, 8, 20), (12, 8, 4), (40, 48, 1),
         (12, 48, 4), (7, 48, 7), (5, 1152, 5), (2, 2047, 1), (2, 3072, 1), (4, 3072, 2),
         (1, 4096, 1)]
KERNEL_MAX_ROW = 2048  # fp64 rows longer than this: the kernels refuse them


def _ids(cases):
    return [f"m{m}-d{d}-s{s}" for m, d, s in cases]


@pytest.fixture
def mod(target):
    """(modulated_norm_fwd, modulated_norm_bwd) of the target."""
    try:
        return target.ops.modulated_norm_fwd, target.ops.modulated_norm_bwd
    except (AttributeError, RuntimeError):
        pytest.skip(f"target {target.name} has no modulated_norm ops (an emulation built before "
                    f"them: rebuild it)")


def _skip_unheld(target, dtype, d):
    if target.name != "reference" and dtype == F64 and d > KERNEL_MAX_ROW:
        pytest.skip("fp64 rows longer than 2048 elements: the kernels refuse them (test_errors)")


def _rep(t, seg):
    return None if t is None else t.repeat_interleave(seg, 0)


def _reference(x, scale, shift, w, b, res, gate, c, seg, rms, res_out=None, dy=None, dres=None):
    """float64 (y, mean, rstd, grads): the norm of the rows (residual_out as the op stored it, with
    a residual), and with dy the gradients of (input, scale, shift, weight, bias, residual, gate)
    by autograd (None for absent operands)."""
    need = dy is not None

    def leaf(t):
        return None if t is None else t.detach().to("cpu", F64).requires_grad_(need)

    x64, s64, t64, w64, b64, res64, g64 = map(leaf, (x, scale, shift, w, b, res, gate))
    if res is not None:
        r = res64 + (x64 if g64 is None else _rep(g64, seg) * x64)
        if res_out is not None:  # the stored rounding, the identity to autograd
            r = r + (res_out.detach().to("cpu", F64) - r).detach()
    else:
        r = x64
    if rms:
        mean = None
        rstd = (r.square().mean(-1, keepdim=True) + EPS).rsqrt()
        n = r * rstd
    else:
        mean = r.mean(-1, keepdim=True)
        rstd = ((r - mean).square().mean(-1, keepdim=True) + EPS).rsqrt()
        n = (r - mean) * rstd
    if w64 is not None:
        n = n * w64
    if b64 is not None:
        n = n + b64
    y = n * (c + _rep(s64, seg)) if s64 is not None else n * c
    if t64 is not None:
        y = y + _rep(t64, seg)
    grads = None
    if need:
        outs, gos = [y], [dy.detach().to("cpu", F64)]
        if res is not None and dres is not None:
            outs.append(r)
            gos.append(dres.detach().to("cpu", F64))
        leaves = [x64, s64, t64, w64, b64, res64, g64]
        live = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, live, gos, allow_unused=True, materialize_grads=True))
        grads = [next(got) if t is not None else None for t in leaves]
    m = x.shape[0]
    return (y.detach(), None if mean is None else mean.detach().reshape(m),
            rstd.detach().reshape(m), grads)


def _operands(dev, m, d, seg, dtype, mod_dtype=None, rms=False, residual=None, gate=False,
              absent=()):
    """Random operands: x (not centred), scale / shift / gate [Q, D] of mod_dtype (the input's by
    default), weight and bias of mod_dtype, a residual of dtype `residual` (None: none)."""
    md = mod_dtype or dtype
    q = m // seg
    x = _randn(dev, (m, d), dtype, 1.5, 0.3)
    ops = {"scale": _randn(dev, (q, d), md, 0.3), "shift": _randn(dev, (q, d), md, 0.5),
           "weight": _randn(dev, (d,), md, 0.3, 1.0), "bias": None if rms else _randn(dev, (d,), md, 0.2),
           "residual": None if residual is None else _randn(dev, (m, d), residual, 1.0, 0.5),
           "gate": _randn(dev, (q, d), md, 0.5, 0.3) if gate else None}
    for k in absent:
        ops[k] = None
    return x, ops


def _mod_dtype(x, o):
    """The modulation's dtype, as the autograd passes it: scale's, else shift's, else gate's, else
    input's."""
    t = next((o[k] for k in ("scale", "shift", "gate") if o[k] is not None), x)
    return t.dtype


def _grad_dtypes(x, o):
    """The dtypes of the backward's outputs (the op's schema: dscale and dshift in the
    modulation's dtype, dweight / dbias in their own, else the input's)."""
    md = _mod_dtype(x, o)
    own = [o[k].dtype if o[k] is not None else x.dtype for k in ("weight", "bias", "residual")]
    return (x.dtype, md, md, *own, md)


def _run(target, mod, x, o, c, seg, rms, mask=(True,) * 7, dres=True):
    """Forward and backward through the target: (fwd outputs, dy, dres, bwd outputs)."""
    fwd, bwd = mod
    y, res_out, mean, rstd = fwd(x, o["scale"], o["shift"], o["weight"], o["bias"], o["residual"],
                                 o["gate"], EPS, c, seg, rms)
    has_res = o["residual"] is not None
    dy = _randn(x.device, x.shape, x.dtype)
    dr = _randn(x.device, x.shape, o["residual"].dtype) if has_res and dres else None
    mod_dtype = _mod_dtype(x, o)
    mask = [mask[0], mask[1] and o["scale"] is not None, mask[2] and o["shift"] is not None,
            mask[3] and o["weight"] is not None, mask[4] and o["bias"] is not None,
            mask[5] and has_res, mask[6] and o["gate"] is not None]
    grads = bwd(dy, dr, res_out if has_res else x, _branch(x, o, mask), o["scale"], o["weight"],
                o["bias"], o["gate"], mean, rstd, c, seg, rms, has_res, x.dtype, mod_dtype, mask)
    return (y, res_out, mean, rstd), dy, dr, grads, mask


def _branch(x, o, mask):
    """The backward's input argument: the branch, when dgate is wanted."""
    return x if o["gate"] is not None and mask[6] else None


def _check_all(x, o, c, seg, rms, outs, dy, dr, grads, mask, dtype, what=""):
    """Every output and wanted gradient against float64; the unwanted ones empty."""
    y, res_out, mean, rstd = outs
    m, d = x.shape
    has_res = o["residual"] is not None
    assert y.dtype == dtype and y.shape == (m, d)
    assert rstd.dtype == _stat(dtype) and rstd.shape == (m,)
    assert mean.shape == ((0,) if rms else (m,))
    if has_res:
        rd = o["residual"].dtype
        assert res_out.dtype == rd and res_out.shape == (m, d)
        # one rounding of the residual's dtype (and of the accumulation type) from the exact sum
        a = o["residual"].to("cpu", F64)
        b = x.to("cpu", F64) * (_rep(o["gate"].to("cpu", F64), seg) if o["gate"] is not None else 1)
        bound = (torch.finfo(rd).eps + 2 * torch.finfo(_stat(dtype)).eps) * (a.abs() + b.abs())
        err = (res_out.to("cpu", F64) - (a + b)).abs()
        assert bool((err <= bound).all()), f"{what} residual_out: max err {err.max().item():.3g}"
    else:
        assert res_out.numel() == 0
    ry, rmean, rrstd, rg = _reference(x, o["scale"], o["shift"], o["weight"], o["bias"],
                                      o["residual"], o["gate"], c, seg, rms,
                                      res_out if has_res else None, dy, dr)
    _check(y, ry, dtype, 0, None, f"{what} y")
    _check(rstd / rrstd.to(rstd.device, rstd.dtype), torch.ones_like(rrstd), dtype, 0, None,
           f"{what} rstd (relative)")
    if not rms:
        _check(mean, rmean, dtype, 0, None, f"{what} mean")
    # rows of one element: LayerNorm's d_input is zero in exact arithmetic; judge it at the scale
    # of the whole gradient
    whole = max(1.0, max(float(g.abs().max()) for g in rg if g is not None and g.numel()))
    zero_scale = whole if d == 1 and not rms else None
    want = rg[:7]
    for i, (t, on, ref) in enumerate(zip(grads, mask, want)):
        if not on:
            assert t.numel() == 0, f"{what} d{NAMES[i]} not wanted but returned"
            continue
        assert t.dtype == _grad_dtypes(x, o)[i], f"{what} d{NAMES[i]} dtype {t.dtype}"
        _check(t, ref, dtype, 1, None, f"{what} d{NAMES[i]}",
               scale=zero_scale if i in (0, 5) else None)


# ------------------------------------------------------------------------------------------------
# forward and backward, no residual
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,d,seg", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_forward_backward(target, mod, dtype, m, d, seg, rms):
    target.skip_if_emulated_above(m * d, EMU_LIMIT)
    _skip_unheld(target, dtype, d)
    x, o = _operands(target.device, m, d, seg, dtype, rms=rms)
    outs, dy, dr, grads, mask = _run(target, mod, x, o, 1.0, seg, rms)
    _check_all(x, o, 1.0, seg, rms, outs, dy, dr, grads, mask, dtype)
    if rms:  # the masks' paths are LayerNorm's too (and the emulation's time is short)
        return
    # output masks: only d_input; only dscale / dshift; only dweight / dbias: the same bits
    fwd, bwd = mod
    y, res_out, mean, rstd = outs
    for part in ([True, False, False, False, False, False, False],
                 [False, True, True, False, False, False, False],
                 [False, False, False, True, True, False, False]):
        part = [p and on for p, on in zip(part, mask)]  # of the operands present
        alone = bwd(dy, None, x, None, o["scale"], o["weight"], o["bias"], None, mean, rstd, 1.0,
                    seg, rms, False, dtype, dtype, part)
        for i, (t, full, on) in enumerate(zip(alone, grads, part)):
            if on:
                assert torch.equal(t, full), f"d{NAMES[i]} alone"
            else:
                assert t.numel() == 0, f"d{NAMES[i]} not wanted"


def test_reference_gradients_are_the_formulas():
    """The ATen reference's formulas (ops.modulated.modulated_grads), evaluated in float64, are
    autograd's gradients of the formula (the yardstick of the kernels' backward)."""
    torch.manual_seed(0)
    for rms, res, gate, seg in ((False, False, False, 3), (True, False, False, 1),
                                (False, True, True, 2), (True, True, False, 6)):
        m, d = 6, 9
        x, o = _operands(torch.device("cpu"), m, d, seg, F64, rms=rms,
                         residual=F64 if res else None, gate=gate)
        dy, dr = torch.randn(m, d, dtype=F64), torch.randn(m, d, dtype=F64) if res else None
        _, mean, rstd, rg = _reference(x, o["scale"], o["shift"], o["weight"], o["bias"],
                                       o["residual"], o["gate"], 1.0, seg, rms, None, dy, dr)
        r = x if not res else (o["residual"] + (x if not gate else _rep(o["gate"], seg) * x))
        got = modulated_grads(dy, dr, r, x, o["scale"], o["weight"], o["bias"], o["gate"], mean,
                              rstd, 1.0, seg, rms, res)
        for i, (g, e) in enumerate(zip(got, rg[:5] + [rg[5] if res else None, rg[6]])):
            if e is None or (i == 4 and o["bias"] is None):
                continue
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda s: f"{NAMES[i]}: {s}")


# ------------------------------------------------------------------------------------------------
# residual (AdaLN-Zero's gated residual), absent operands, mixed dtypes
# ------------------------------------------------------------------------------------------------
# (input dtype, residual dtype): one dtype, and a float32 residual stream with a half input
PAIRS = [(d, d) for d in DTYPES] + [(F16, F32), (BF16, F32)]
RES_CASES = [(5, 7, 5, False), (6, 7, 3, True), (12, 48, 4, True), (40, 8, 20, False),
             (2, 3072, 1, True), (3, 1152, 3, False)]


@pytest.mark.parametrize("xd,rd", PAIRS, ids=[f"{a}+{b}".replace("torch.", "") for a, b in PAIRS])
@pytest.mark.parametrize("m,d,seg,rms", RES_CASES, ids=[f"m{m}-d{d}-s{s}-{'rms' if r else 'ln'}"
                                                        for m, d, s, r in RES_CASES])
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_residual(target, mod, xd, rd, m, d, seg, rms, gate):
    target.skip_if_emulated_above(m * d, EMU_LIMIT)
    _skip_unheld(target, xd, d)
    md = F32 if rd == F32 and xd in (F16, BF16) else xd  # float32 modulation with half inputs
    x, o = _operands(target.device, m, d, seg, xd, md, rms=rms, residual=rd, gate=gate)
    # every gradient; d_input, d_residual and dgate without a gradient of residual_out
    for dres, mask in ((True, (True,) * 7),
                       (False, (True, False, False, False, False, True, True))):
        outs, dy, dr, grads, mk = _run(target, mod, x, o, 1.0, seg, rms, mask, dres)
        _check_all(x, o, 1.0, seg, rms, outs, dy, dr, grads, mk, xd,
                   f"dres={dres} mask={''.join('1' if v else '0' for v in mask)}")


ABSENT = [("scale",), ("shift",), ("scale", "shift"), ("weight",), ("bias",), ("weight", "bias")]


@pytest.mark.parametrize("dtype,md", [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16)],
                         ids=["fp32", "bf16+fp32mod", "fp16+fp32mod", "bf16"])
@pytest.mark.parametrize("absent", ABSENT, ids=["-".join(a) for a in ABSENT])
@pytest.mark.parametrize("m,d,seg", [(12, 48, 4), (5, 7, 5)], ids=_ids([(12, 48, 4), (5, 7, 5)]))
def test_absent_operands_and_scale_offset(target, mod, dtype, md, absent, m, d, seg):
    """Each operand absent in turn (scale None: y = norm * scale_offset); scale_offset 1 (DiT's
    1 + scale) and 0 (a plain scale); float32 modulation and weights with a half input."""
    for c, rms in ((1.0, False), (0.0, True)):
        x, o = _operands(target.device, m, d, seg, dtype, md, rms=rms, absent=absent)
        outs, dy, dr, grads, mask = _run(target, mod, x, o, c, seg, rms)
        _check_all(x, o, c, seg, rms, outs, dy, dr, grads, mask, dtype, f"c={c} rms={rms}")


# ------------------------------------------------------------------------------------------------
# the segmented sums of the backward
# ------------------------------------------------------------------------------------------------
SEG_CASES = [(9, 64, 3), (15, 64, 5), (51, 48, 17), (66, 48, 33), (99, 8, 33), (34, 512, 17),
             (10, 7, 5)]


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=str)
@pytest.mark.parametrize("m,d,seg", SEG_CASES, ids=_ids(SEG_CASES))
def test_segmented_sums(target, mod, dtype, m, d, seg):
    """dscale / dshift are sums over segments of seg_rows rows that do not fill a block's rows
    (3, 5, 17, 33); with a residual and the gate too."""
    target.skip_if_emulated_above(m * d, EMU_LIMIT)
    for rms, res in ((False, None), (True, dtype)):
        x, o = _operands(target.device, m, d, seg, dtype, rms=rms, residual=res, gate=res is not None)
        outs, dy, dr, grads, mask = _run(target, mod, x, o, 1.0, seg, rms)
        _check_all(x, o, 1.0, seg, rms, outs, dy, dr, grads, mask, dtype, f"rms={rms}")
        # the gradients of the modulation alone: the same bits
        fwd, bwd = mod
        y, res_out, mean, rstd = outs
        alone = bwd(dy, dr, res_out if res else x, None, o["scale"], o["weight"], o["bias"],
                    o["gate"], mean, rstd, 1.0, seg, rms, res is not None, dtype, dtype,
                    [False, True, True, False, False, False, False])
        assert torch.equal(alone[1], grads[1]) and torch.equal(alone[2], grads[2])


@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
@pytest.mark.parametrize("d,seg", [(48, 17), (1152, 4), (8, 33)], ids=["d48-s17", "d1152-s4", "d8-s33"])
def test_segments_are_batch_invariant(target, mod, dtype, d, seg):
    """A segment's y, residual_out, statistics, input gradients and dscale / dshift are the same
    bits alone and in a batch of segments (the plan follows the row's length and dtype only)."""
    q = 4
    target.skip_if_emulated_above(q * seg * d, EMU_LIMIT)
    x, o = _operands(target.device, q * seg, d, seg, dtype, residual=dtype, gate=True)
    outs, dy, dr, grads, _ = _run(target, mod, x, o, 1.0, seg, False)
    fwd, bwd = mod
    for i in (0, q - 1):
        rows = slice(i * seg, (i + 1) * seg)
        one = {k: (None if v is None else v[i:i + 1] if k in ("scale", "shift", "gate")
                   else v[rows] if k == "residual" else v) for k, v in o.items()}
        y1, r1, mean1, rstd1 = fwd(x[rows], one["scale"], one["shift"], one["weight"],
                                   one["bias"], one["residual"], one["gate"], EPS, 1.0, seg, False)
        assert torch.equal(y1, outs[0][rows]) and torch.equal(r1, outs[1][rows])
        assert torch.equal(mean1, outs[2][rows]) and torch.equal(rstd1, outs[3][rows])
        g1 = bwd(dy[rows], dr[rows], r1, x[rows], one["scale"], one["weight"], one["bias"],
                 one["gate"], mean1, rstd1, 1.0, seg, False, True, dtype, dtype,
                 [True, True, True, False, False, True, True])
        assert torch.equal(g1[0], grads[0][rows]) and torch.equal(g1[5], grads[5][rows])
        assert torch.equal(g1[1], grads[1][i:i + 1]) and torch.equal(g1[2], grads[2][i:i + 1])
        assert torch.equal(g1[6], grads[6][i:i + 1])


# ------------------------------------------------------------------------------------------------
# layouts, empty inputs, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_misaligned_views(target, mod, dtype):
    """Operands one element into their storage (no 16-byte alignment): the same values as
    contiguous aligned copies."""
    dev = target.device
    m, d, seg = 12, 64, 4
    q = m // seg

    def view(shape):
        n = 1
        for s in shape:
            n *= s
        return _randn(dev, (n + 1,), dtype, 1.0, 0.2)[1:].view(shape)

    x, res = view((m, d)), view((m, d))
    o = {"scale": view((q, d)), "shift": view((q, d)), "weight": view((d,)) + 1.0,
         "bias": view((d,)), "residual": res, "gate": view((q, d))}
    outs, dy, dr, grads, mask = _run(target, mod, x, o, 1.0, seg, False)
    _check_all(x, o, 1.0, seg, False, outs, dy, dr, grads, mask, dtype)
    fwd, bwd = mod
    c = {k: v.clone() for k, v in o.items()}
    outs2 = fwd(x.clone(), c["scale"], c["shift"], c["weight"], c["bias"], c["residual"], c["gate"],
                EPS, 1.0, seg, False)
    for a, b in zip(outs, outs2):
        assert torch.equal(a, b)


def test_empty(target, mod):
    dev = target.device
    fwd, bwd = mod
    x = torch.empty(0, 32, device=dev)
    s = torch.empty(0, 32, device=dev)
    w = torch.ones(32, device=dev)
    y, r, mean, rstd = fwd(x, s, s, w, w, x, s, EPS, 1.0, 1, False)
    assert y.shape == r.shape == (0, 32) and mean.shape == rstd.shape == (0,)
    g = bwd(x, x, r, x, s, w, w, s, mean, rstd, 1.0, 1, False, True, F32, F32, [True] * 7)
    assert g[0].shape == g[5].shape == g[1].shape == g[2].shape == g[6].shape == (0, 32)
    assert torch.equal(g[3], torch.zeros_like(w)) and torch.equal(g[4], torch.zeros_like(w))


def test_errors(target, mod):
    dev = target.device
    fwd, bwd = mod
    x = _randn(dev, (6, 8), F32)
    with pytest.raises(RuntimeError, match="seg_rows >= 1 dividing the 6 rows"):
        fwd(x, None, None, None, None, None, None, EPS, 1.0, 4, False)
    with pytest.raises(RuntimeError, match="scale of shape"):
        fwd(x, _randn(dev, (3, 8), F32), None, None, None, None, None, EPS, 1.0, 3, False)
    with pytest.raises(RuntimeError, match="takes no bias"):
        fwd(x, None, None, None, torch.ones(8, device=dev), None, None, EPS, 1.0, 1, True)
    with pytest.raises(RuntimeError, match="gate without a residual"):
        fwd(x, None, None, None, None, None, x, EPS, 1.0, 1, False)
    with pytest.raises(RuntimeError, match="residual"):
        fwd(x, None, None, None, None, _randn(dev, (6, 7), F32), None, EPS, 1.0, 1, False)
    if target.name != "reference":
        for dtype, d in ((F64, 4096), (F64, 2050), (F32, 4097), (BF16, 4100)):
            big = _randn(dev, (1, d), dtype)
            with pytest.raises(RuntimeError, match="longer than the kernels hold"):
                fwd(big, None, None, None, None, None, None, EPS, 1.0, 1, False)
