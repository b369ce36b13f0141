"""Kernels of fastnorm::batch_norm_fwd / batch_norm_bwd, called directly through the op namespace
of the `target` fixture (tests/conftest.py): the CUDA kernels on a GPU, the same kernel
sources in the CPU emulation (FASTNORM_EMU), or the ATen reference (FASTNORM_KERNEL_TARGETS).

References: torch.nn.functional.batch_norm in float64 on the target's device (and torch in the
input's dtype where the running statistics are compared).

The shapes cover every host dispatch decision of csrc/batch_norm_*.cu: NCHW ([N, C, S]) and NHWC
([R, C] rows: channels_last, or S == 1) views, 16-byte vector and scalar access, the fused
single-launch path (one block per channel / channel tile) and the general path (stats, finalize,
apply), eval, empty batches. The CUDA target runs every case; the emulated target (slow: every CUDA
thread is a fiber) skips the large ones and, in the big matrices, the cases that cross the same
decisions as one it runs (EMU_* tables below); small cases added for it keep every decision crossed
(with sm_count = 132, target_blocks = 1056, kThreads = 256, kUnroll = 4):

  (C, M)      NCHW view (per channel N*S/V vectors)        NHWC view (R rows of C)
  (3, 49)     S=49: scalar, fused                          C=3: scalar, fused
  (64, 7)     S=7: scalar, fused, 64 blocks                C=64: vector, fused
  (3, 12544)  S=49: scalar, general (G=7)                  C=3: scalar, general (G=25)
  (8, 4224)   S=2112: vector, fused (misaligned: scalar,   C=8: vector, general (misaligned:
              general)                                     scalar, general)
  (1, 33792)  S=16896: vector, general (G=3..9)            C=1 rows: scalar, general
  (264, 196)  (CUDA only in the matrix)                    several channel tiles (last one
                                                           partial), general
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastnorm.ops.common import memory_format_of

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# max |actual - ref| <= TOL * max(1, max |ref|)
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}
# Statistics are fp32 (fp64 for double input) whatever the input dtype.
STAT_TOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-9}
# dweight/dbias: fp32 (fp64) sums, then rounded to the weight's dtype.
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-8}
# Running stats are stored in their own dtype.
BUF_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}

# The emulated target skips a case above this many elements, or above this many CUDA threads
# (every thread is a fiber there; see emu_skip).
EMU_LIMIT = 150_000
K_THREADS = 256  # channels::kThreads: the block size of every BatchNorm kernel

M2M = 2 ** 21
LAYOUTS = ["nc", "ncl", "nchw", "nhwc", "ncdhw", "ndhwc"]
# 12544 = 256 x 7 x 7: odd spatial size (no vector loads in NCHW) with enough elements per channel
# for the multi-block (general) path.
# 4224 and 33792 (emulation-sized): spatial sizes that are multiples of 8 (vector loads for every
# dtype), with just enough vectors per channel (> 4096) for the general path: 4224 rows of 8
# channels in the NHWC view; 33792 elements of one channel in the NCHW view.
SHAPES = {  # N * spatial -> (N, *spatial)
    "nc": {2: (2,), 7: (7,), 49: (49,), 196: (196,), 3136: (3136,), 4224: (4224,),
           12544: (12544,), 33792: (33792,), M2M: (M2M,)},
    "ncl": {2: (1, 2), 7: (1, 7), 49: (7, 7), 196: (4, 49), 3136: (4, 784), 4224: (2, 2112),
            12544: (256, 49), 33792: (2, 16896), M2M: (2, 2 ** 20)},
    "nchw": {2: (1, 1, 2), 7: (7, 1, 1), 49: (1, 7, 7), 196: (4, 7, 7), 3136: (4, 28, 28),
             4224: (2, 48, 44), 12544: (256, 7, 7), 33792: (2, 128, 132), M2M: (2, 1024, 1024)},
    "ncdhw": {2: (2, 1, 1, 1), 7: (1, 7, 1, 1), 49: (1, 1, 7, 7), 196: (4, 1, 7, 7),
              3136: (4, 4, 14, 14), 4224: (2, 4, 12, 44), 12544: (256, 1, 7, 7),
              33792: (2, 4, 32, 132), M2M: (2, 16, 256, 256)},
}
SHAPES["nhwc"] = SHAPES["nchw"]
SHAPES["ndhwc"] = SHAPES["ncdhw"]
FORMAT = {"nhwc": torch.channels_last, "ndhwc": torch.channels_last_3d}

CASES = ([(c, m) for c in (1, 3, 64, 2048, 4097) for m in (2, 7, 49, 3136)]
         + [(3, 12544), (64, 12544), (1, M2M), (3, M2M)]
         + [(8, 4224), (1, 33792), (264, 196)])
ALL = tuple(LAYOUTS)
# The (C, M) and layouts of CASES the emulated target runs in test_training_fwd_bwd (see the table
# in the module docstring); the others cross the same decisions (or are too large).
EMU_TRAIN = {
    (3, 49): ("nc", "ncl", "nchw", "nhwc"),
    (64, 7): ALL,  # cheap: every rank through make_layout
    (3, 12544): ("nchw", "nhwc"),
    (8, 4224): ("nc", "ncl", "nchw", "nhwc"),
    (1, 33792): ("nchw", "ncdhw"),
    (264, 196): ("nhwc",),
}


def emu_skip(target, x):
    """Skip on the emulated target when x is too large for it: more than EMU_LIMIT elements, or
    more than EMU_LIMIT CUDA threads (NCHW view: at least one 256-thread block per channel; NHWC
    view: one per 32 channels)."""
    if not target.emulated:
        return
    C = x.shape[1]
    S = math.prod(x.shape[2:])
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    rows_view = S == 1 or (fmt is not None and x.is_contiguous(memory_format=fmt)
                           and not x.is_contiguous())
    threads = K_THREADS * (math.ceil(C / 32) if rows_view else C)
    if threads > EMU_LIMIT:
        pytest.skip(f"{threads} CUDA threads ({C} channels): too many for the emulation (limit "
                    f"{EMU_LIMIT}); the CUDA target runs this case")
    target.skip_if_emulated_above(x.numel(), EMU_LIMIT)


def emu_only(target, table, key, layout):
    """The emulated target runs only the (key, layout) pairs listed in `table`."""
    if target.emulated and layout not in table.get(key, ()):
        pytest.skip(f"{key} {layout}: same dispatch decisions as a case the emulated target runs "
                    f"(the CUDA target runs this case)")


def fwd(target, x, w, b, rm, rv, nbt, training, momentum, eps=EPS):
    return target.ops.batch_norm_fwd(x, w, b, rm, rv, nbt, training, momentum, eps)


def bwd(target, dy, x, mean, rstd, w, training, mask=(True, True, True)):
    return target.ops.batch_norm_bwd(dy, x, mean, rstd, w, training, list(mask))


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def make_input(target, layout, C, M, dtype, seed=0, offset=0.0):
    N, *spatial = SHAPES[layout][M]
    shape = (N, C, *spatial)
    dev = target.device
    x = (torch.randn(shape, device=dev, generator=gen(dev, seed)) * 2 + 0.5 + offset).to(dtype)
    if layout in FORMAT:
        x = x.contiguous(memory_format=FORMAT[layout])
    return x


def make_dy(x, seed=7, fmt=None):
    """A grad_out independent of x (its own generator and seed: x comes from a generator seeded
    0 and so does the global one, so torch.randn_like(x) would reproduce x's values), in x's memory
    format unless `fmt` says otherwise."""
    dy = torch.randn(x.shape, device=x.device, generator=gen(x.device, seed)).to(x.dtype)
    return dy.contiguous(memory_format=fmt or memory_format_of(x))


def make_params(target, C, dtype, seed=1):
    dev = target.device
    g = gen(dev, seed)
    w = (torch.rand(C, device=dev, generator=g) + 0.5).to(dtype)
    b = torch.randn(C, device=dev, generator=g).to(dtype)
    rm = (torch.randn(C, device=dev, generator=g) * 0.1).to(dtype)
    rv = (torch.rand(C, device=dev, generator=g) + 0.5).to(dtype)
    return w, b, rm, rv


def assert_close(actual, ref, tol, what=""):
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    a = actual.double()
    r = ref.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(1.0, r.abs().max().item())
    err = (a - r).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def red_dims(x):
    return [0] + list(range(2, x.dim()))


def ref_stats(x):
    """float64 batch mean, biased var, unbiased var per channel."""
    x64 = x.double()
    dims = red_dims(x)
    var, mean = torch.var_mean(x64, dim=dims, correction=0)
    n = x.numel() // x.shape[1]
    return mean, var, var * n / max(n - 1, 1)


def ref_fwd_bwd(x, w, b, dy, training=True, rm=None, rv=None):
    """float64 (y, dx, dw, db) from torch autograd."""
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if w is not None else None
    b64 = b.double().requires_grad_(True) if b is not None else None
    rm64 = rm.double() if rm is not None else None
    rv64 = rv.double() if rv is not None else None
    y = F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.0, EPS)
    inputs = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy.double())
    dx = grads[0]
    dw = grads[1] if w is not None else None
    db = grads[-1] if b is not None else None
    return y.detach(), dx, dw, db


def check_format(t, x, layout):
    if layout in FORMAT:
        assert t.is_contiguous(memory_format=FORMAT[layout]), "output lost channels_last"
    else:
        assert t.is_contiguous()


def dtype_id(d):
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Training forward + backward over shapes, layouts and dtypes.

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C,M", CASES, ids=[f"C{c}-M{m}" for c, m in CASES])
def test_training_fwd_bwd(target, C, M, layout, dtype):
    emu_only(target, EMU_TRAIN, (C, M), layout)
    x = make_input(target, layout, C, M, dtype)
    emu_skip(target, x)
    dev = target.device
    w, b, rm, rv = make_params(target, C, dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=dev)
    y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, True, 0.1)

    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == stat and rstd.dtype == stat and mean.shape == (C,)
    check_format(y, x, layout)

    m64, v64, vu64 = ref_stats(x)
    assert_close(mean, m64, STAT_TOL[dtype], "mean")
    assert_close(rstd, 1 / torch.sqrt(v64 + EPS), STAT_TOL[dtype], "rstd")
    assert_close(rm, 0.9 * rm0.double() + 0.1 * m64, BUF_TOL[dtype], "running_mean")
    assert_close(rv, 0.9 * rv0.double() + 0.1 * vu64, BUF_TOL[dtype], "running_var")
    assert nbt.item() == 1

    dy = make_dy(x)
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    assert_close(y, y64, TOL[dtype], "y")

    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    check_format(dx, x, layout)
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, GRAD_TOL[dtype], "dweight")
    assert_close(db, db64, GRAD_TOL[dtype], "dbias")


# ---------------------------------------------------------------------------------------------
# AMP: half/bf16 activations, fp32 params and buffers (dweight/dbias in fp32).

AMP_CASES = [(3, 49), (64, 3136), (4097, 7), (8, 4224), (3, 12544)]
EMU_AMP = {(3, 49): ("nc", "nchw"),       # scalar fused, both views
           (8, 4224): ("nchw", "nhwc"),   # vector: NCHW fused, NHWC general
           (3, 12544): ("nchw",)}         # scalar NCHW general


# ---------------------------------------------------------------------------------------------
# 8-byte packs: a channel's run (NCHW: S) or a row (NHWC: C) that is a multiple of 8 bytes but not
# of 16 (fp16/bf16 with S = 196 = 14 x 14 or C = 12; fp32 with S = 14 or C = 6). "fused": one
# block per channel (tile); "general": stats + finalize + apply over several chunks.

PACK8 = {  # (layout, dtype) -> {path: shape}
    ("nchw", torch.float32): {"fused": (4, 3, 2, 7), "general": (600, 3, 2, 7)},
    ("nchw", torch.float16): {"fused": (4, 3, 14, 14), "general": (1400, 3, 3, 4)},
    ("nchw", torch.bfloat16): {"fused": (4, 3, 14, 14), "general": (1400, 3, 3, 4)},
    ("nhwc", torch.float32): {"fused": (2, 6, 7, 7), "general": (8, 6, 16, 16)},
    ("nhwc", torch.float16): {"fused": (2, 12, 7, 7), "general": (8, 12, 16, 16)},
    ("nhwc", torch.bfloat16): {"fused": (2, 12, 7, 7), "general": (8, 12, 16, 16)},
}


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("layout,dtype", list(PACK8), ids=[f"{l}-{str(d)[6:]}" for l, d in PACK8])
def test_eight_byte_packs(target, layout, dtype, path):
    shape = PACK8[(layout, dtype)][path]
    dev = target.device
    x = (torch.randn(shape, device=dev, generator=gen(dev, 3)) * 2 + 0.5).to(dtype)
    if layout in FORMAT:
        x = x.contiguous(memory_format=FORMAT[layout])
    emu_skip(target, x)
    C = shape[1]
    w, b, rm, rv = make_params(target, C, dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, True, 0.1)
    check_format(y, x, layout)
    dy = make_dy(x)
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    assert_close(y, y64, TOL[dtype], "y")
    m64, _, vu64 = ref_stats(x)
    assert_close(rv, 0.9 * rv0.double() + 0.1 * vu64, BUF_TOL[dtype], "running_var")
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    check_format(dx, x, layout)
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, GRAD_TOL[dtype], "dweight")
    assert_close(db, db64, GRAD_TOL[dtype], "dbias")
    # eval: forward from the running statistics, dx only
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, False, 0.1)
    y64, dx64, _, _ = ref_fwd_bwd(x, w, b, dy, training=False, rm=rm, rv=rv)
    assert_close(y, y64, TOL[dtype], "eval y")
    dx, _, _ = bwd(target, dy, x, mean, rstd, w, False, (True, False, False))
    assert_close(dx, dx64, TOL[dtype], "eval dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C,M", AMP_CASES)
def test_amp_fp32_params(target, C, M, layout, dtype):
    emu_only(target, EMU_AMP, (C, M), layout)
    x = make_input(target, layout, C, M, dtype, seed=3)
    emu_skip(target, x)
    w, b, rm, rv = make_params(target, C, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=target.device)
    y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, True, 0.1)
    assert y.dtype == dtype and rm.dtype == torch.float32
    m64, v64, vu64 = ref_stats(x)
    assert_close(rm, 0.9 * rm0.double() + 0.1 * m64, 1e-5, "running_mean")
    assert_close(rv, 0.9 * rv0.double() + 0.1 * vu64, 1e-5, "running_var")
    # torch accepts the same mixed dtypes: compare with it too
    rm_t, rv_t = rm0.clone(), rv0.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, EPS)
    assert_close(y, y_t.float(), TOL[dtype] * 2, "y vs torch")
    assert_close(rm, rm_t, 1e-5, "running_mean vs torch")
    assert_close(rv, rv_t, 1e-5, "running_var vs torch")

    dy = make_dy(x)
    _, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert dx.dtype == dtype and dw.dtype == torch.float32 and db.dtype == torch.float32
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, 1e-3, "dweight")
    assert_close(db, db64, 1e-3, "dbias")


# ---------------------------------------------------------------------------------------------
# A float32 grad_out with a half / bf16 input (the gradient of a float32 cast of y): read as it is
# by the single-element kernels, with no pass that rounds it to the input's dtype first (values
# above 65504 would overflow fp16). Fused and general paths, NCHW and NHWC, training and eval.

F32_DY = {"nchw-fused": ((2, 3, 5, 8), None), "nchw-general": ((256, 2, 7, 7), None),
          "nhwc-fused": ((2, 16, 5, 7), torch.channels_last),
          "nhwc-general": ((2, 3, 24, 24), torch.channels_last)}


def _ops_run(fn):
    """The ATen ops fn dispatches (profiler names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(F32_DY))
def test_float32_grad_out_read_as_is(target, dtype, case):
    shape, fmt = F32_DY[case]
    dev = target.device
    x = (torch.randn(shape, device=dev, generator=gen(dev, 3)) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    C = shape[1]
    w, b, rm, rv = make_params(target, C, torch.float32)
    w = w * 1e-3  # dx = w * rstd * (dy - ...) within fp16's range for |dy| up to ~4e5
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, True, 0.1)
    dy = make_dy(x.float()) * 1e5
    assert dy.dtype == torch.float32 and dy.abs().max() > 65504
    _, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    out = {}
    ran = _ops_run(lambda: out.update(g=bwd(target, dy, x, mean, rstd, w, True)))
    if target.name != "reference":  # (the reference computes with ATen ops in float32)
        assert not ran & {"aten::_to_copy", "aten::copy_"}, sorted(ran)
    dx, dw, db = out["g"]
    assert dx.dtype == dtype and dw.dtype == torch.float32
    check_format(dx, x, "nhwc" if fmt is not None else "nchw")
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(dw, dw64, 1e-4, "dweight")
    assert_close(db, db64, 1e-4, "dbias")
    # eval: dx = dy * w * rstd alone, and with the sums
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, False, 0.1)
    _, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy, training=False, rm=rm, rv=rv)
    dx, _, _ = bwd(target, dy, x, mean, rstd, w, False, (True, False, False))
    assert_close(dx, dx64, TOL[dtype], "eval dx")
    _, dw, db = bwd(target, dy, x, mean, rstd, w, False, (False, True, True))
    assert_close(dw, dw64, 1e-4, "eval dweight")
    assert_close(db, db64, 1e-4, "eval dbias")


# ---------------------------------------------------------------------------------------------
# Eval forward/backward, running statistics over two training steps, momentum None.

EVAL_CASES = [(64, 3136), (3, 49), (8, 4224)]
EMU_EVAL = {(3, 49): ("nchw", "nhwc"),     # scalar
            (8, 4224): ("nchw", "nhwc")}   # vector (training: NCHW fused, NHWC general)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["nc", "nchw", "nhwc", "ndhwc"])
@pytest.mark.parametrize("C,M", EVAL_CASES)
def test_two_steps_then_eval(target, C, M, layout, dtype):
    emu_only(target, EMU_EVAL, (C, M), layout)
    dev = target.device
    w, b, rm, rv = make_params(target, C, dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=dev)
    for step in range(2):
        x = make_input(target, layout, C, M, dtype, seed=10 + step)
        emu_skip(target, x)
        fwd(target, x, w, b, rm, rv, nbt, True, 0.1)
        F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, EPS)
    assert nbt.item() == 2
    assert_close(rm, rm_t, BUF_TOL[dtype] * 2, "running_mean")
    assert_close(rv, rv_t, BUF_TOL[dtype] * 2, "running_var")

    x = make_input(target, layout, C, M, dtype, seed=20)
    rm_before, rv_before, nbt_before = rm.clone(), rv.clone(), nbt.clone()
    y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, False, 0.1)
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before) and torch.equal(nbt, nbt_before)
    check_format(y, x, layout)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == stat and rstd.dtype == stat
    assert_close(mean, rm.double(), 1e-12, "eval mean")
    assert_close(rstd, 1 / torch.sqrt(rv.double() + EPS), STAT_TOL[dtype], "eval rstd")
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, torch.ones_like(x), training=False, rm=rm, rv=rv)
    assert_close(y, y64, TOL[dtype], "eval y")
    y_t = F.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)
    assert_close(y, y_t, TOL[dtype], "eval y vs torch")

    # eval backward: dx = dy * w * rstd, and the dweight/dbias sums with the frozen statistics
    dy = make_dy(x)
    _, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy, training=False, rm=rm, rv=rv)
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, False)
    check_format(dx, x, layout)
    assert_close(dx, dx64, TOL[dtype], "eval dx")
    assert_close(dw, dw64, GRAD_TOL[dtype], "eval dweight")
    assert_close(db, db64, GRAD_TOL[dtype], "eval dbias")
    dx_only, e1, e2 = bwd(target, dy, x, mean, rstd, w, False, (True, False, False))
    assert torch.equal(dx_only, dx) and e1.shape == (0,) and e2.shape == (0,)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_momentum_none_cumulative_average(target, layout):
    # 3 x 3136: NCHW vector fused, NHWC scalar general (the finalize kernel updates the buffers)
    C, M = 3, 3136
    w, b, rm, rv = make_params(target, C, torch.float32)
    rm_t, rv_t = rm.clone(), rv.clone()
    nbt = torch.full((), 5, dtype=torch.long, device=target.device)
    for step in range(3):
        x = make_input(target, layout, C, M, torch.float32, seed=30 + step)
        emu_skip(target, x)
        fwd(target, x, w, b, rm, rv, nbt, True, None)
        assert nbt.item() == 6 + step  # incremented on the device
        F.batch_norm(x, rm_t, rv_t, w, b, True, 1.0 / (6 + step), EPS)
        assert_close(rm, rm_t, 1e-5, f"running_mean step {step}")
        assert_close(rv, rv_t, 1e-5, f"running_var step {step}")


@pytest.mark.parametrize("layout,C,M", [("nhwc", 64, 3136), ("nhwc", 3, 3136), ("nchw", 8, 4224)])
def test_training_without_running_stats_and_affine(target, layout, C, M):
    x = make_input(target, layout, C, M, torch.float32)
    emu_skip(target, x)
    y, mean, rstd = fwd(target, x, None, None, None, None, None, True, 0.1)
    y64, dx64, _, _ = ref_fwd_bwd(x, None, None, torch.ones_like(x))
    assert_close(y, y64, TOL[torch.float32], "y")
    dy = make_dy(x)
    _, dx64, _, _ = ref_fwd_bwd(x, None, None, dy)
    dx, dw, db = bwd(target, dy, x, mean, rstd, None, True, (True, False, False))
    assert_close(dx, dx64, TOL[torch.float32], "dx")
    assert dw.shape == (0,) and db.shape == (0,)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (False, True, False),
                                  (False, False, True), (True, True, False)])
@pytest.mark.parametrize("layout", ["ncl", "nhwc"])
@pytest.mark.parametrize("C,M", [(64, 3136), (8, 4224)])  # 8 x 4224: ncl fused, nhwc general
def test_output_mask(target, C, M, mask, layout):
    x = make_input(target, layout, C, M, torch.float32)
    emu_skip(target, x)
    w, b, _, _ = make_params(target, C, torch.float32)
    y, mean, rstd = fwd(target, x, w, b, None, None, None, True, 0.1)
    dy = make_dy(x)
    _, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True, mask)
    for got, ref, on, name in ((dx, dx64, mask[0], "dx"), (dw, dw64, mask[1], "dweight"),
                               (db, db64, mask[2], "dbias")):
        if on:
            assert_close(got, ref, 1e-3, name)
        else:
            assert got.shape == (0,), f"{name} should be empty when masked off"


# ---------------------------------------------------------------------------------------------
# Layout corner cases: other strides, unaligned pointers (scalar path), many channels (> 65535
# channels in NCHW loops over grid.y), dy in another memory format than x.

def test_non_contiguous_input_gives_contiguous_output(target):
    dev = target.device
    base = torch.randn(8, 32, 30, 30, device=dev, generator=gen(dev, 2))
    x = base[:, :, ::2, 1::2]  # neither contiguous nor channels_last
    emu_skip(target, x)
    w, b, _, _ = make_params(target, 32, torch.float32)
    y, mean, rstd = fwd(target, x, w, b, None, None, None, True, 0.1)
    assert y.is_contiguous()
    dy = make_dy(x).transpose(2, 3).contiguous().transpose(2, 3)
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    assert_close(y, y64, TOL[torch.float32], "y")
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert dx.is_contiguous()
    assert_close(dx, dx64, TOL[torch.float32], "dx")
    assert_close(dw, dw64, 1e-3, "dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
# 8 x 4224: vector when aligned (NCHW fused, NHWC general); misaligned: scalar general in both
@pytest.mark.parametrize("C,M", [(64, 12544), (8, 4224)])
def test_unaligned_storage_offset(target, C, M, layout, dtype):
    dev = target.device
    ref = make_input(target, layout, C, M, dtype)
    emu_skip(target, ref)
    fmt = FORMAT.get(layout, torch.contiguous_format)
    storage = torch.empty(ref.numel() + 1, dtype=dtype, device=dev)
    x = storage[1:].view(ref.permute(0, 2, 3, 1).shape if layout == "nhwc" else ref.shape)
    if layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    x.copy_(ref)
    assert x.is_contiguous(memory_format=fmt) and x.data_ptr() % 16 != 0
    w, b, _, _ = make_params(target, C, dtype)
    y, mean, rstd = fwd(target, x, w, b, None, None, None, True, 0.1)
    dy = make_dy(ref)
    y64, dx64, dw64, db64 = ref_fwd_bwd(ref, w, b, dy)
    assert_close(y, y64, TOL[dtype], "y")
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert_close(dx, dx64, TOL[dtype], "dx")
    assert_close(db, db64, GRAD_TOL[dtype], "dbias")


# (2, 70001, 3): NCHW, channels beyond grid.y = 65535 (the kernels loop over blockIdx.y);
# (2, 70001): rows of 70001 channels (NHWC view, 2188 channel tiles in grid.x). Both need at least
# 70001 * 256 / 32 CUDA threads: too many for the emulation (emu_skip).
@pytest.mark.parametrize("shape", [(2, 70001, 3), (2, 70001)], ids=["ncl", "nc"])
def test_more_than_65535_channels(target, shape):
    dev = target.device
    x = torch.randn(shape, device=dev, generator=gen(dev, 4))
    emu_skip(target, x)
    C = shape[1]
    w, b, rm, rv = make_params(target, C, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, True, 0.1)
    dy = make_dy(x)
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    assert_close(y, y64, 1e-4, "y")
    m64, _, vu64 = ref_stats(x)
    assert_close(rv, 0.9 * rv0.double() + 0.1 * vu64, 1e-5, "running_var")
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert_close(dx, dx64, 1e-4, "dx")
    assert_close(dw, dw64, 1e-4, "dweight")
    assert_close(db, db64, 1e-4, "dbias")


@pytest.mark.parametrize("C,M", [(64, 3136), (8, 4224)])  # NHWC: vector fused / vector general
def test_dy_in_other_memory_format(target, C, M):
    x = make_input(target, "nhwc", C, M, torch.float16)
    emu_skip(target, x)
    w, b, _, _ = make_params(target, C, torch.float16)
    y, mean, rstd = fwd(target, x, w, b, None, None, None, True, 0.1)
    dy = make_dy(x, fmt=torch.contiguous_format)  # x is channels_last
    assert dy.is_contiguous() and not x.is_contiguous()
    _, dx64, dw64, _ = ref_fwd_bwd(x, w, b, dy)
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert_close(dx, dx64, TOL[torch.float16], "dx")
    assert_close(dw, dw64, 1e-3, "dweight")


# ---------------------------------------------------------------------------------------------
# Accuracy far from zero: Welford/Chan on deviations, never E[x^2] - E[x]^2.

FP32_ULP_1E4 = 2.0 ** -10  # one fp32 ulp at 1e4 (8192 <= 1e4 < 16384): 9.77e-4


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("M", [M2M, 12544], ids=["M2M", "M12544"])  # 12544: scalar general paths
def test_large_mean_fp32(target, M, layout):
    C = 3
    dev = target.device
    N, *sp = SHAPES[layout][M]
    x = 1e4 + torch.randn((N, C, *sp), device=dev, generator=gen(dev, 5))
    if layout in FORMAT:
        x = x.contiguous(memory_format=FORMAT[layout])
    emu_skip(target, x)
    w, b, rm, rv = make_params(target, C, torch.float32)
    rv0 = rv.clone()
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, True, 0.1)
    m64, v64, vu64 = ref_stats(x)
    # The general paths merge up to ~1000 fp32 partial (mean, M2) states per channel (NHWC: one
    # per row chunk and lane), each merge rounding the mean once: a bit more than one ulp of 1e4
    # is expected (1.14 ulp observed on NHWC). A few ulp still rules out E[x^2] - E[x]^2, whose
    # error here would be ~1e4 ulp.
    assert (mean.double() - m64).abs().max().item() < 4 * FP32_ULP_1E4
    assert ((rstd.double() - 1 / torch.sqrt(v64 + EPS)).abs() / (1 / torch.sqrt(v64 + EPS))).max() < 1e-4
    assert ((rv.double() - (0.9 * rv0.double() + 0.1 * vu64)).abs()).max() < 1e-4
    dy = make_dy(x)
    y64, dx64, dw64, db64 = ref_fwd_bwd(x, w, b, dy)
    assert (y.double() - y64).abs().max().item() < 2e-3
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
    assert_close(dx, dx64, 2e-3, "dx")
    assert_close(dw, dw64, 2e-3, "dweight")


# ---------------------------------------------------------------------------------------------
# Determinism, CUDA graphs, unwritten outputs, empty batches.

@pytest.mark.parametrize("shape,fmt", [((2, 3, 1024, 1024), torch.contiguous_format),
                                       ((32, 64, 28, 28), torch.channels_last),
                                       ((3136, 2048), torch.contiguous_format),
                                       ((8, 4097, 7, 7), torch.channels_last),
                                       ((2, 1, 128, 132), torch.contiguous_format),
                                       ((2, 8, 48, 44), torch.channels_last)],
                         ids=["nchw", "nhwc", "nc", "nhwc-odd-C", "nchw-general", "nhwc-general"])
def test_bitwise_repeatable(target, shape, fmt):
    dev = target.device
    x = torch.randn(shape, device=dev, generator=gen(dev, 6)).contiguous(memory_format=fmt)
    emu_skip(target, x)
    C = shape[1]
    w, b, rm, rv = make_params(target, C, torch.float32)
    dy = make_dy(x)
    outs = []
    for _ in range(2):
        rm_i, rv_i = rm.clone(), rv.clone()
        y, mean, rstd = fwd(target, x, w, b, rm_i, rv_i, None, True, 0.1)
        dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
        outs.append((y, mean, rstd, rm_i, rv_i, dx, dw, db))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_training_step(target, layout, momentum):
    target.require("cuda", why="CUDA graph capture")
    dev = target.device
    C, M = 64, 3136
    x = make_input(target, layout, C, M, torch.float32)
    dy = make_dy(x)
    w, b, rm0, rv0 = make_params(target, C, torch.float32)
    nbt0 = torch.full((), 3, dtype=torch.long, device=dev)
    rm, rv, nbt = rm0.clone(), rv0.clone(), nbt0.clone()

    def step():
        y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, True, momentum)
        dx, dw, db = bwd(target, dy, x, mean, rstd, w, True)
        return y, dx, dw, db

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    rm.copy_(rm0)
    rv.copy_(rv0)
    nbt.copy_(nbt0)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()

    rm_e, rv_e, nbt_e = rm0.clone(), rv0.clone(), nbt0.clone()
    for _ in range(2):
        y_e, mean_e, rstd_e = fwd(target, x, w, b, rm_e, rv_e, nbt_e, True, momentum)
        dx_e, dw_e, db_e = bwd(target, dy, x, mean_e, rstd_e, w, True)
    assert nbt.item() == 5 and nbt_e.item() == 5
    assert torch.equal(rm, rm_e) and torch.equal(rv, rv_e)
    for got, ref in zip(outs, (y_e, dx_e, dw_e, db_e)):
        assert torch.equal(got, ref)


def _poison(target, *specs):
    """CUDA: fill the caching allocator with NaN blocks of the given (numel, dtype), then free
    them. The emulated target needs nothing: the conftest NaN-fills every op's allocations."""
    if not target.is_cuda:
        return
    junk = []
    for numel, dtype in specs:
        for _ in range(3):
            junk.append(torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=target.device))
    del junk


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout,C,M", [("nchw", 3, 3136), ("nchw", 3, 12544), ("nchw", 3, M2M),
                                        ("nhwc", 4097, 49), ("nhwc", 3, 3136), ("nc", 64, 7),
                                        ("ndhwc", 64, 3136), ("ncl", 2048, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_poisoned_outputs_fully_written(target, layout, C, M, dtype, training):
    x = make_input(target, layout, C, M, dtype)
    emu_skip(target, x)
    w, b, rm, rv = make_params(target, C, dtype)
    # Independent of x: with dy ~ x, dweight = sum(dy * xhat) ~ n / 2 overflows fp16 for M2M.
    dy = make_dy(x)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    _poison(target, (x.numel(), dtype), (C, stat), (C, dtype))
    y, mean, rstd = fwd(target, x, w, b, rm, rv, None, training, 0.1)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    _poison(target, (x.numel(), dtype), (C, dtype), (C, stat))
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, training)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_empty_batch(target, layout):
    dev = target.device
    C = 5
    shape = {"nchw": (0, C, 4, 4), "nhwc": (0, C, 4, 4), "nc": (0, C)}[layout]
    x = torch.randn(shape, device=dev)
    if layout in FORMAT:
        x = x.contiguous(memory_format=FORMAT[layout])
    w, b, rm, rv = make_params(target, C, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=dev)
    y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, True, 0.1)
    assert y.shape == x.shape and y.numel() == 0
    assert torch.equal(mean, torch.zeros(C, device=dev)) and torch.equal(rstd, torch.zeros(C, device=dev))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert nbt.item() == 1
    dx, dw, db = bwd(target, torch.empty_like(x), x, mean, rstd, w, True)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(C, device=dev)) and torch.equal(db, torch.zeros(C, device=dev))
    # eval with an empty batch: the running statistics are returned
    y, mean, rstd = fwd(target, x, w, b, rm, rv, nbt, False, 0.1)
    assert y.numel() == 0 and nbt.item() == 1
    assert_close(mean, rm.double(), 0, "eval mean")
    assert_close(rstd, 1 / torch.sqrt(rv.double() + EPS), 1e-6, "eval rstd")


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements (int64 indexing). Needs ~14 GB of free GPU memory.

def _free_gb():
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@pytest.mark.parametrize("layout", ["nchw", "nc"])
def test_more_than_2_31_elements(target, layout):
    target.require("cuda", why="more than 2^31 elements (~14 GB of GPU memory)")
    if _free_gb() < 20:
        pytest.skip("needs 20 GB of free GPU memory")
    DEV = target.device
    if layout == "nchw":
        shape = (2, 2, 32768, 16400)  # 2.15e9 elements, 2 channels
    else:
        shape = (2 ** 29 + 16, 4)     # rows of 4 channels
    numel = math.prod(shape)
    assert numel > 2 ** 31
    g = torch.Generator(device=DEV).manual_seed(11)
    x = torch.randn(shape, device=DEV, dtype=torch.float16, generator=g)
    C = shape[1]
    w = torch.ones(C, device=DEV)  # fp32 params: dbias (= n) in fp32
    b = torch.zeros(C, device=DEV)
    y, mean, rstd = fwd(target, x, w, b, None, None, None, True, 0.1)
    # per-channel statistics, reduced in float64 chunk by chunk
    for c in range(C):
        rows = [x[n, c].reshape(-1) for n in range(shape[0])] if layout == "nchw" else [x[:, c]]
        s = torch.zeros((), dtype=torch.float64, device=DEV)
        q = torch.zeros((), dtype=torch.float64, device=DEV)
        n = 0
        for row in rows:
            n += row.numel()
            for part in row.split(2 ** 26):
                p = part.double()
                s += p.sum()
                q += (p * p).sum()
        m = s / n
        v = q / n - m * m
        assert abs(mean[c].item() - m.item()) < 1e-3
        assert abs(rstd[c].item() - (1 / torch.sqrt(v + EPS)).item()) < 1e-3
    # the last elements (offsets beyond 2^31) are normalised
    flat_x = x.reshape(-1)
    flat_y = y.reshape(-1)
    tail = flat_x[-4096:].float()
    ytail = flat_y[-4096:].float()
    S = math.prod(shape[2:])  # 1 for (N, C)
    ch = (torch.arange(numel - 4096, numel, device=DEV) // S) % C
    expect = (tail - mean[ch]) * rstd[ch]
    assert (ytail - expect).abs().max().item() < 1e-2
    del y, flat_y
    dy = torch.ones_like(x)
    dx, dw, db = bwd(target, dy, x, mean, rstd, w, True, (True, False, True))
    # dy constant: dx = 0 up to rounding, dbias = n per channel
    assert db.dtype == torch.float32 and db.shape == (C,)
    assert (db.double() - numel / C).abs().max().item() < numel / C * 1e-5
    assert dx.reshape(-1)[-4096:].float().abs().max().item() < 1e-2
