"""BatchNorm with a fused activation epilogue: fastnorm::batch_norm_fwd / batch_norm_bwd
with `activation` (codes of csrc/kernels/activation.cuh), through the `target` fixture
(tests/conftest.py): the CUDA kernels, their CPU emulation, or the ATen reference.

Reference: float64 torch autograd of act(F.batch_norm(x)) with torch's own activation functions,
so the kernels' derivative conventions at the kinks (relu at 0, relu6 at 0 and 6, hardswish and
hardsigmoid at +-3) are checked against torch's.

What runs where (the ACT = true instantiations are bn_fwd_apply_{nchw,nhwc},
bn_bwd_sums_{nchw,nhwc} and bn_bwd_apply_{nchw,nhwc} for every dtype and pack width; the
statistics kernels have none):
  test_every_activation  every code (identity included: the plain kernels) x dtype x NCHW / NHWC
                         on small fused shapes, training and eval, forward and backward;
  test_plan_paths        every dtype x layout x pack width (16-byte, 8-byte, one element) x fused /
                         general path, training (stats + finalize + apply; sums + finalize + dx)
                         and eval (dx only, and dx + dweight + dbias through the sums kernels);
                         the activation rotates over the codes from case to case (the emulated
                         target cannot afford every code on the shapes the general path needs).
Running statistics, mean and rstd are those of x: compared with the plain reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# max |actual - ref| <= TOL * max(1, max |ref|) (as tests/cuda/test_batch_norm_kernels.py)
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-8}
STAT_TOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-9}
BUF_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}
CL = torch.channels_last

LEAKY_SLOPE = 0.2
# code -> (name, float64 torch function); fastnorm/activations.py's table, written out here so
# the test is independent of it
ACTS = {
    0: ("identity", lambda z: z),
    1: ("relu", F.relu),
    2: ("relu6", F.relu6),
    3: ("leaky_relu", None),  # F.leaky_relu(z, param_of(...)): act_fn
    4: ("silu", F.silu),
    5: ("gelu", F.gelu),
    6: ("gelu_tanh", lambda z: F.gelu(z, approximate="tanh")),
    7: ("hardswish", F.hardswish),
    # torch's own: its backward multiplies by 1/6 rounded to float32 in every dtype, as the kernel
    # does (kernels/activation.cuh)
    8: ("hardsigmoid", F.hardsigmoid),
    9: ("mish", F.mish),
    10: ("sigmoid", torch.sigmoid),
    11: ("tanh", torch.tanh),
}


def act_fn(code, p):
    return (lambda z: F.leaky_relu(z, p)) if code == 3 else ACTS[code][1]


def param_of(code, dtype=None):
    """leaky_relu's negative_slope: 0.2, which float32 does not hold exactly (1.5e-9 off), so
    float64 data checks that the kernels use torch's float64 slope."""
    return LEAKY_SLOPE if code == 3 else 0.0


def dtype_id(d):
    return str(d).replace("torch.", "")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(target, shape, dtype, fmt=None, seed=0, params_dtype=None):
    dev = target.device
    g = gen(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(dev)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    pd = params_dtype or dtype
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pd).to(dev)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(pd).to(dev)
    rm = (torch.randn(C, generator=g, dtype=torch.float64) * 0.1).to(pd).to(dev)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pd).to(dev)
    dy = torch.randn(shape, generator=gen(seed + 7), dtype=torch.float64).to(dtype).to(dev)
    dy = dy.contiguous(memory_format=fmt) if fmt is not None else dy
    return x, w, b, rm, rv, dy


def assert_close(actual, ref, tol, what=""):
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(1.0, r.abs().max().item())
    err = (a - r).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def ref(x, w, b, dy, code, training, rm=None, rv=None, p=LEAKY_SLOPE):
    """float64 y = act(batch_norm(x)) and (dx, dweight, dbias) by torch autograd."""
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    w64 = None if w is None else w.detach().to("cpu", torch.float64).requires_grad_()
    b64 = None if b is None else b.detach().to("cpu", torch.float64).requires_grad_()
    rm64 = None if rm is None else rm.detach().to("cpu", torch.float64)
    rv64 = None if rv is None else rv.detach().to("cpu", torch.float64)
    y = act_fn(code, p)(F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.0, EPS))
    inputs = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy.detach().to("cpu", torch.float64))
    dx = grads[0]
    dw = grads[1] if w is not None else None
    db = grads[-1] if b is not None else None
    return y.detach(), dx, dw, db


def ref_stats(x):
    x64 = x.detach().to("cpu", torch.float64)
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x64, dim=dims, correction=0)
    n = x.numel() // x.shape[1]
    return mean, var, var * n / max(n - 1, 1)


def check_layout(t, x):
    if x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous():
        assert t.is_contiguous(memory_format=CL), "output lost channels_last"
    else:
        assert t.is_contiguous()


def run_case(target, x, w, b, rm, rv, dy, code, dtype, grad_dtype=None):
    """Training step (forward, backward) then eval (forward, dx-only backward, full backward)."""
    ops, p = target.ops, param_of(code, dtype)
    grad_dtype = grad_dtype or dtype
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=target.device)
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, nbt, True, 0.1, EPS, code, p)
    assert y.dtype == dtype and y.shape == x.shape
    check_layout(y, x)
    # the statistics and the running buffers are the plain BatchNorm's: the activation is after
    m64, v64, vu64 = ref_stats(x)
    assert_close(mean, m64, STAT_TOL[dtype], "mean")
    assert_close(rstd, 1 / torch.sqrt(v64 + EPS), STAT_TOL[dtype], "rstd")
    assert_close(rm, 0.9 * rm0.double().cpu() + 0.1 * m64, BUF_TOL[dtype], "running_mean")
    assert_close(rv, 0.9 * rv0.double().cpu() + 0.1 * vu64, BUF_TOL[dtype], "running_var")
    assert nbt.item() == 1
    y64, dx64, dw64, db64 = ref(x, w, b, dy, code, True, p=p)
    assert_close(y, y64, TOL[dtype], "y")
    dx, dw, db = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [True, True, True], b, code, p)
    assert dx.dtype == dtype and dw.dtype == grad_dtype and db.dtype == grad_dtype
    check_layout(dx, x)
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, GRAD_TOL[dtype], "dweight")
    assert_close(db, db64, GRAD_TOL[dtype], "dbias")
    # dweight / dbias alone: the sums without the dx pass
    _, dw2, db2 = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [False, True, True], b, code, p)
    assert torch.equal(dw2, dw) and torch.equal(db2, db)

    # eval: the running statistics, untouched; dx = dz * w * rstd
    rm1, rv1 = rm.clone(), rv.clone()
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, nbt, False, 0.1, EPS, code, p)
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1) and nbt.item() == 1
    check_layout(y, x)
    y64, dx64, dw64, db64 = ref(x, w, b, dy, code, False, rm, rv, p)
    assert_close(y, y64, TOL[dtype], "eval y")
    dx, e1, e2 = ops.batch_norm_bwd(dy, x, mean, rstd, w, False, [True, False, False], b, code, p)
    assert e1.numel() == 0 and e2.numel() == 0
    check_layout(dx, x)
    assert_close(dx, dx64, TOL[dtype], "eval dx")
    dx2, dw, db = ops.batch_norm_bwd(dy, x, mean, rstd, w, False, [True, True, True], b, code, p)
    assert_close(dx2, dx64, TOL[dtype], "eval dx (with the sums)")
    assert_close(dw, dw64, GRAD_TOL[dtype], "eval dweight")
    assert_close(db, db64, GRAD_TOL[dtype], "eval dbias")


# ---------------------------------------------------------------------------------------------
# Every activation code on the small (fused, one launch each way) shapes: NCHW S = 35 (one
# element per access), NCHW S = 32 (16-byte packs for every dtype), NHWC C = 3 (one element),
# NHWC C = 16 bytes of channels (one 16-byte pack per row).

def small_shapes(dtype):
    v16 = 16 // torch.tensor([], dtype=dtype).element_size()
    return {"nchw-scalar": ((2, 3, 5, 7), None), "nchw-vec": ((2, 3, 4, 8), None),
            "nhwc-scalar": ((2, 3, 5, 7), CL), "nhwc-vec": ((2, v16, 3, 5), CL)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("code", list(ACTS), ids=[ACTS[c][0] for c in ACTS])
def test_every_activation(target, code, dtype):
    for i, (name, (shape, fmt)) in enumerate(small_shapes(dtype).items()):
        x, w, b, rm, rv, dy = make(target, shape, dtype, fmt, seed=10 * code + i)
        try:
            run_case(target, x, w, b, rm, rv, dy, code, dtype)
        except AssertionError as e:
            raise AssertionError(f"{name} {tuple(shape)}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The plan's paths (csrc/batch_norm_*.cu, launch/channels.h: fused when a channel (tile) takes one
# block or a thread few vectors; general = stats, finalize, apply) for each pack width. A general
# path needs more than 4096 vectors per channel (NCHW) or than 16 rows per thread lane (NHWC):
# the sizes below are the smallest that cross that line, one channel where a channel's size
# decides. Pack widths: 16 bytes (V16), 8 bytes (V8: NCHW S or NHWC C a multiple of 8 bytes but
# not of 16), one element (scalar: S or C odd).

def _v16(dtype):
    return 16 // torch.tensor([], dtype=dtype).element_size()


def path_shapes(dtype):
    v16 = _v16(dtype)
    general_s = {4: (64, 132), 8: (128, 132), 2: (32, 132)}[v16]  # 4224 vectors of one channel
    shapes = {
        ("nchw", "vec16", "fused"): ((2, 3, 4, 8), None),
        ("nchw", "vec16", "general"): ((2, 1, *general_s), None),
        ("nchw", "scalar", "fused"): ((2, 3, 5, 7), None),
        ("nchw", "scalar", "general"): ((256, 1, 7, 7), None),        # 12544 elements
        ("nhwc", "vec16", "fused"): ((2, v16, 3, 5), CL),
        ("nhwc", "vec16", "general"): ((2, v16, 48, 44), CL),        # 4224 rows, tile of 1 pack
        ("nhwc", "scalar", "fused"): ((2, 3, 5, 7), CL),
        ("nhwc", "scalar", "general"): ((2, 3, 24, 24), CL),         # 1152 rows, 64 row lanes
    }
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        c8 = 6 if dtype == torch.float32 else 12                     # 24 bytes of channels
        s8 = (2, 7) if dtype == torch.float32 else (14, 14)          # 56 / 392 bytes per run
        g8 = (600, 1, 2, 7) if dtype == torch.float32 else (1400, 1, 3, 4)  # 4200 vectors
        shapes.update({
            ("nchw", "vec8", "fused"): ((4, 3, *s8), None),
            ("nchw", "vec8", "general"): (g8, None),
            ("nhwc", "vec8", "fused"): ((2, c8, 7, 7), CL),
            ("nhwc", "vec8", "general"): ((2, c8, 24, 24), CL),      # 1152 rows, 64 row lanes
        })
    return shapes


PATH_CASES = [(d, key) for d in DTYPES for key in path_shapes(d)]


@pytest.mark.parametrize("dtype,key", PATH_CASES,
                         ids=[f"{dtype_id(d)}-{'-'.join(k)}" for d, k in PATH_CASES])
def test_plan_paths(target, dtype, key):
    shape, fmt = path_shapes(dtype)[key]
    i = PATH_CASES.index((dtype, key))
    code = 1 + i % 11  # rotates over the 11 activations (identity: the plain kernel tests)
    x, w, b, rm, rv, dy = make(target, shape, dtype, fmt, seed=100 + i)
    run_case(target, x, w, b, rm, rv, dy, code, dtype)


# ---------------------------------------------------------------------------------------------
# AMP (float32 parameters and buffers with a half input), no affine parameters, errors.

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape,fmt", [((2, 3, 5, 7), None), ((2, 8, 3, 5), CL),
                                       ((1400, 1, 3, 4), None)],
                         ids=["nchw-fused", "nhwc-fused", "nchw-general"])
def test_float32_params(target, dtype, shape, fmt):
    x, w, b, rm, rv, dy = make(target, shape, dtype, fmt, seed=5, params_dtype=torch.float32)
    run_case(target, x, w, b, rm, rv, dy, 4, dtype, grad_dtype=torch.float32)  # silu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape,fmt", [((2, 3, 5, 8), None), ((256, 2, 7, 7), None),
                                       ((2, 3, 24, 24), CL)],
                         ids=["nchw-fused", "nchw-general", "nhwc-general"])
def test_float32_grad_out(target, dtype, shape, fmt):
    """A float32 dy of a half input with values above fp16's range: dz = dy * act'(z) from it as
    it is (the single-element kernels read it; nothing rounds it to half first)."""
    x, w, b, rm, rv, _ = make(target, shape, dtype, fmt, seed=11, params_dtype=torch.float32)
    w = w * 1e-3  # dx within fp16's range
    dy = torch.randn(shape, generator=gen(18), dtype=torch.float64).mul(1e5).float()
    dy = (dy.contiguous(memory_format=fmt) if fmt is not None else dy).to(target.device)
    assert dy.abs().max() > 65504
    ops, code = target.ops, 5  # gelu
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, None, True, 0.1, EPS, code, 0.0)
    _, dx64, dw64, db64 = ref(x, w, b, dy, code, True)
    dx, dw, db = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [True, True, True], b, code, 0.0)
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, 1e-4, "dweight")
    assert_close(db, db64, 1e-4, "dbias")
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, None, False, 0.1, EPS, code, 0.0)
    _, dx64, _, _ = ref(x, w, b, dy, code, False, rm, rv)
    dx, _, _ = ops.batch_norm_bwd(dy, x, mean, rstd, w, False, [True, False, False], b, code, 0.0)
    assert_close(dx, dx64, TOL[dtype], "eval dx")


@pytest.mark.parametrize("shape,fmt", [((2, 3, 5, 7), None), ((2, 3, 24, 24), CL)],
                         ids=["nchw-fused", "nhwc-general"])
def test_no_affine(target, shape, fmt):
    """Weight and bias absent: z = xhat (the backward's bias argument None as well)."""
    x, _, _, _, _, dy = make(target, shape, torch.float32, fmt, seed=6)
    ops = target.ops
    for code in (1, 5):  # relu: kink at z = 0 = xhat's mean; gelu
        y, mean, rstd = ops.batch_norm_fwd(x, None, None, None, None, None, True, None, EPS, code, 0.0)
        y64, dx64, _, _ = ref(x, None, None, dy, code, True)
        assert_close(y, y64, TOL[torch.float32], "y")
        dx, dw, db = ops.batch_norm_bwd(dy, x, mean, rstd, None, True, [True, False, False], None,
                                        code, 0.0)
        assert_close(dx, dx64, TOL[torch.float32], "dx")


def test_identity_ignores_the_bias(target):
    """activation 0 is the plain backward: the bias argument is not read (any value gives the
    same result as none)."""
    x, w, b, rm, rv, dy = make(target, (2, 3, 5, 7), torch.float32, None, seed=8)
    ops = target.ops
    y, mean, rstd = ops.batch_norm_fwd(x, w, b, rm, rv, None, True, 0.1, EPS)
    plain = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [True, True, True])
    with_bias = ops.batch_norm_bwd(dy, x, mean, rstd, w, True, [True, True, True], b * 100, 0, 0.0)
    for p, q in zip(plain, with_bias):
        assert torch.equal(p, q)


@pytest.mark.parametrize("code", [-1, 12])
def test_unknown_activation_is_a_value_error(target, code):
    x, w, b, rm, rv, dy = make(target, (2, 3, 5, 7), torch.float32, None, seed=9)
    nbt = torch.zeros((), dtype=torch.long, device=target.device)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="activation"):
        target.ops.batch_norm_fwd(x, w, b, rm, rv, nbt, True, 0.1, EPS, code, 0.0)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and nbt.item() == 0
    mean = torch.zeros(3, device=target.device)
    with pytest.raises(ValueError, match="activation"):
        target.ops.batch_norm_bwd(dy, x, mean, mean + 1, w, True, [True, True, True], b, code, 0.0)


def test_shapes_cross_the_plan(target):
    """The path_shapes table crosses the decisions it names (the host arithmetic of
    launch/channels.h with kThreads = 256, kUnroll = 4), so a change of the plan shows here
    rather than as silently lost coverage."""
    def nchw_fused(n, s, v):
        m = n * (s // v)
        return math.ceil(m / 2048) == 1 or m <= 256 * 16

    def nhwc_fused(r, c, v):
        tx = 1
        while tx < 32 and tx < c // v:
            tx <<= 1
        ty = 256 // tx
        return math.ceil(r / (ty * 8)) == 1 or r <= ty * 16

    for dtype in DTYPES:
        v16 = _v16(dtype)
        for (layout, pack, path), (shape, _) in path_shapes(dtype).items():
            n, c, s = shape[0], shape[1], math.prod(shape[2:])
            v = {"vec16": v16, "vec8": v16 // 2, "scalar": 1}[pack]
            run = s if layout == "nchw" else c  # a pack lies inside a channel's run / a row
            if pack == "vec16":
                assert run % v16 == 0
            elif pack == "vec8":
                assert run % v == 0 and run % v16 != 0
            else:
                assert run % 2 == 1
            fused = nchw_fused(n, s, v) if layout == "nchw" else nhwc_fused(n * s, c, v)
            assert fused == (path == "fused"), (dtype, layout, pack, path, shape)
