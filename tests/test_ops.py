"""torch.library.opcheck on the six fastnorm:: ops, and fake-kernel metadata against the real
kernels (shapes, dtypes, strides)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastnorm  # noqa: F401  (registers the ops)
from fastnorm.info import cuda_kernel_registered
from fastnorm.ops import OP_NAMES

ops = torch.ops.fastnorm
CL = torch.channels_last
CL3 = torch.channels_last_3d


def _x(shape, device, dtype=torch.float32, fmt=None, requires_grad=False):
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x.requires_grad_(requires_grad)


def _wb(c, device, dtype=torch.float32, requires_grad=False, shape=None):
    shape = shape or (c,)
    w = (torch.rand(shape, device=device, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)
    return w, b


# ----------------------------------------------------------------------------------------------
# argument sets
# ----------------------------------------------------------------------------------------------
def ln_fwd_cases(device):
    w, b = _wb(6, device, requires_grad=True)
    w2, b2 = _wb(0, device, requires_grad=True, shape=(5, 6))
    wb32 = _wb(6, device, requires_grad=True)
    return {
        "affine": (_x((4, 5, 6), device, requires_grad=True), [6], w, b, 1e-5),
        "multidim-noaffine": (_x((4, 5, 6), device, requires_grad=True), [5, 6], None, None, 1e-5),
        "multidim-affine": (_x((3, 5, 6), device, requires_grad=True), [5, 6], w2, b2, 1e-3),
        "weight-only": (_x((7, 6), device, requires_grad=True), [6], w, None, 1e-5),
        "channels_last": (_x((2, 3, 4, 6), device, fmt=CL, requires_grad=True), [6], w, b, 1e-5),
        "bf16-fp32params": (_x((4, 6), device, torch.bfloat16, requires_grad=True), [6], *wb32, 1e-5),
        "bf16-out-fp32": (_x((4, 6), device, torch.bfloat16, requires_grad=True), [6], *wb32, 1e-5,
                          torch.float32),
        "fp64": (_x((3, 6), device, torch.float64, requires_grad=True), [6],
                 *_wb(6, device, torch.float64, requires_grad=True), 1e-5),
        "no-grad": (_x((4, 6), device), [6], *_wb(6, device), 1e-5),
    }


def gn_fwd_cases(device):
    w, b = _wb(6, device, requires_grad=True)
    return {
        "3d": (_x((2, 6, 5), device, requires_grad=True), w, b, 3, 1e-5),
        "4d-noaffine": (_x((2, 6, 3, 5), device, requires_grad=True), None, None, 2, 1e-5),
        "rank2": (_x((3, 6), device, requires_grad=True), w, b, 2, 1e-5),
        "channels_last": (_x((2, 6, 3, 5), device, fmt=CL, requires_grad=True), w, b, 3, 1e-5),
        "channels_last_3d": (_x((2, 6, 2, 3, 3), device, fmt=CL3, requires_grad=True), w, b, 6, 1e-5),
        "bf16-fp32params": (_x((2, 6, 7), device, torch.bfloat16, requires_grad=True), w, b, 3, 1e-5),
        "bf16-out-fp32": (_x((2, 6, 7), device, torch.bfloat16, requires_grad=True), w, b, 3, 1e-5,
                          torch.float32),
        "instance": (_x((2, 6, 4, 4), device, requires_grad=True), w, b, 6, 1e-5),
    }


def bn_fwd_cases(device):
    """The op mutates running buffers: its autograd lives in a torch.autograd.Function, so these
    inputs do not require grad."""
    def stats(c=5, dtype=torch.float32):
        rm = torch.randn(c, device=device, dtype=dtype) * 0.5
        rv = torch.rand(c, device=device, dtype=dtype) + 0.5
        return rm, rv, torch.tensor(3, device=device)
    w, b = _wb(5, device)
    return {
        "train-momentum": (_x((4, 5, 3), device), w, b, *stats(), True, 0.1, 1e-5),
        "train-momentum-none": (_x((4, 5, 3), device), w, b, *stats(), True, None, 1e-5),
        "train-no-nbt": (_x((4, 5), device), w, b, *stats()[:2], None, True, 0.2, 1e-5),
        "train-nostats": (_x((4, 5, 2, 3), device), w, b, None, None, None, True, 0.1, 1e-5),
        "eval": (_x((4, 5, 2, 3), device), w, b, *stats()[:2], None, False, 0.1, 1e-5),
        "eval-noaffine": (_x((4, 5, 2, 3), device), None, None, *stats()[:2], None, False, 0.1, 1e-3),
        "channels_last": (_x((2, 5, 3, 3), device, fmt=CL), w, b, *stats(), True, 0.1, 1e-5),
        "channels_last_3d": (_x((2, 5, 2, 2, 3), device, fmt=CL3), w, b, *stats(), True, 0.1, 1e-5),
        "bf16-fp32params": (_x((4, 5, 6), device, torch.bfloat16), w, b, *stats(), True, 0.1, 1e-5),
        "bf16-eval": (_x((4, 5, 6), device, torch.bfloat16), w, b, *stats()[:2], None, False, 0.1, 1e-5),
        "bf16-bf16params": (_x((4, 5, 6), device, torch.bfloat16), *_wb(5, device, torch.bfloat16),
                            *stats(5, torch.bfloat16), True, 0.1, 1e-5),
        "empty": (_x((0, 5, 3), device), w, b, *stats(), True, 0.1, 1e-5),
    }


MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, True, False]]


def _bwd_from_fwd(fwd_name, fwd_args, mask):
    """Arguments for the matching backward op, from a real forward call."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args]
    if fwd_name == "layer_norm_fwd":
        x, shape, w = args[0], args[1], args[2]
        y, mean, rstd = ops.layer_norm_fwd(*args)
        dy = torch.randn_like(y)
        m = [mask[0], mask[1] and w is not None, mask[2] and args[3] is not None]
        return (dy, x, mean, rstd, w, shape, m)
    if fwd_name == "group_norm_fwd":
        x, w, b, g = args[0], args[1], args[2], args[3]
        y, mean, rstd = ops.group_norm_fwd(*args)
        dy = torch.randn_like(y)
        m = [mask[0], mask[1] and w is not None, mask[2] and b is not None]
        return (dy, x, mean, rstd, w, g, m)
    x, w, b = args[0], args[1], args[2]
    cloned = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    y, mean, rstd = ops.batch_norm_fwd(*cloned)
    dy = torch.randn_like(y)
    m = [mask[0], mask[1] and w is not None, mask[2] and b is not None]
    return (dy, x, mean, rstd, w, args[6], m)


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------
def test_all_ops_registered():
    assert set(OP_NAMES) >= {f"fastnorm::{n}" for n in (
        "layer_norm_fwd", "layer_norm_bwd", "group_norm_fwd", "group_norm_bwd", "batch_norm_fwd",
        "batch_norm_bwd")}
    for name in OP_NAMES:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op)


@pytest.mark.parametrize("case", list(ln_fwd_cases("cpu")))
def test_opcheck_layer_norm_fwd(case, device):
    torch.manual_seed(0)
    torch.library.opcheck(ops.layer_norm_fwd.default, ln_fwd_cases(device)[case])


@pytest.mark.parametrize("case", list(gn_fwd_cases("cpu")))
def test_opcheck_group_norm_fwd(case, device):
    torch.manual_seed(0)
    torch.library.opcheck(ops.group_norm_fwd.default, gn_fwd_cases(device)[case])


@pytest.mark.parametrize("case", list(bn_fwd_cases("cpu")))
def test_opcheck_batch_norm_fwd(case, device):
    torch.manual_seed(0)
    args = bn_fwd_cases(device)[case]
    assert not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    torch.library.opcheck(ops.batch_norm_fwd.default, args)


def _storages(ts):
    return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor) and t.numel()}


@pytest.mark.parametrize("fwd", ["layer_norm_fwd", "group_norm_fwd", "batch_norm_fwd"])
def test_outputs_never_alias_inputs(fwd, device):
    torch.manual_seed(0)
    for case, args in CASES_FN[fwd](device).items():
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        outs = getattr(ops, fwd)(*args)
        shared = _storages(outs) & _storages(args)
        assert not shared, f"{fwd}[{case}]: an output shares storage with an input"


BWD = [("layer_norm_fwd", "affine"), ("layer_norm_fwd", "multidim-affine"), ("layer_norm_fwd", "channels_last"),
       ("layer_norm_fwd", "bf16-fp32params"), ("layer_norm_fwd", "multidim-noaffine"),
       ("group_norm_fwd", "3d"), ("group_norm_fwd", "channels_last"), ("group_norm_fwd", "channels_last_3d"),
       ("group_norm_fwd", "bf16-fp32params"), ("group_norm_fwd", "4d-noaffine"),
       ("batch_norm_fwd", "train-momentum"), ("batch_norm_fwd", "eval"), ("batch_norm_fwd", "channels_last"),
       ("batch_norm_fwd", "bf16-fp32params"), ("batch_norm_fwd", "bf16-bf16params"),
       ("batch_norm_fwd", "eval-noaffine"), ("batch_norm_fwd", "empty")]
CASES_FN = {"layer_norm_fwd": ln_fwd_cases, "group_norm_fwd": gn_fwd_cases, "batch_norm_fwd": bn_fwd_cases}


MASK_IDS = ["all", "dx", "dwdb", "dw"]
# every backward case with the full mask; the partial masks on representative cases
BWD_MASKED = [(f, c, MASKS[0], "all") for f, c in BWD] + [
    (f, c, m, i) for f, c in BWD if c in ("affine", "3d", "train-momentum", "eval", "channels_last")
    for m, i in zip(MASKS[1:], MASK_IDS[1:])]
BWD_MASKED_IDS = [f"{f.split('_')[0]}-{c}-{i}" for f, c, _, i in BWD_MASKED]


@pytest.mark.parametrize("fwd,case,mask,_id", BWD_MASKED, ids=BWD_MASKED_IDS)
def test_opcheck_bwd(fwd, case, mask, _id, device):
    torch.manual_seed(0)
    args = _bwd_from_fwd(fwd, CASES_FN[fwd](device)[case], mask)
    op = getattr(ops, fwd.replace("_fwd", "_bwd")).default
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------
# fake kernels vs real kernels
# ----------------------------------------------------------------------------------------------
def _meta(t):
    return (tuple(t.shape), t.dtype, tuple(t.stride()) if t.numel() > 1 else None, t.device.type)


def _fake_vs_real(op, args):
    real_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    fake_src = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*real_args)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fake_src]
    with mode:
        fake = op(*fake_args)
    assert len(real) == len(fake) == 3
    for i, (r, f) in enumerate(zip(real, fake)):
        assert _meta(f) == _meta(r), f"output {i}: fake {_meta(f)} vs real {_meta(r)}"
    return real


def _all_fwd():
    out = []
    for fwd, fn in CASES_FN.items():
        out += [(fwd, c) for c in fn("cpu")]
    return out


@pytest.mark.parametrize("fwd,case", _all_fwd(), ids=[f"{f.split('_')[0]}-{c}" for f, c in _all_fwd()])
def test_fake_matches_real_fwd(fwd, case, device):
    torch.manual_seed(0)
    args = CASES_FN[fwd](device)[case]
    real = _fake_vs_real(getattr(ops, fwd).default, args)
    x = args[0]
    y = real[0]
    out_dtype = args[5] if fwd != "batch_norm_fwd" and len(args) > 5 else None
    assert y.dtype == (out_dtype or x.dtype)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert real[1].dtype == real[2].dtype == stat
    if fwd == "layer_norm_fwd":
        assert y.is_contiguous()
    else:
        for fmt in (CL, CL3):
            if x.dim() == {CL: 4, CL3: 5}[fmt] and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
                assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fwd,case,mask,_id", BWD_MASKED, ids=BWD_MASKED_IDS)
def test_fake_matches_real_bwd(fwd, case, mask, _id, device):
    torch.manual_seed(0)
    args = _bwd_from_fwd(fwd, CASES_FN[fwd](device)[case], mask)
    real = _fake_vs_real(getattr(ops, fwd.replace("_fwd", "_bwd")).default, args)
    dx, dw, db = real
    x, w, m = args[1], args[4], args[-1]
    # masked outputs are empty [0] tensors; dx has x's dtype; dw/db the weight's dtype
    for t, on in zip(real, m):
        if not on:
            assert t.shape == (0,)
    if m[0]:
        assert dx.shape == x.shape and dx.dtype == x.dtype
    for t, on in zip((dw, db), m[1:]):
        if on:
            assert t.dtype == w.dtype and t.shape == w.shape


def test_layer_norm_bwd_reference_bias_without_weight():
    # a bias and no weight: dbias must still come out (ATen's backward decides it from its bias arg)
    x = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    dy = torch.randn(5, 7, dtype=torch.float64)
    _, mean, rstd = torch.ops.fastnorm.layer_norm_fwd(x, [7], None, b, 1e-5)
    dx, dw, db = torch.ops.fastnorm.layer_norm_bwd(dy, x, mean, rstd, None, [7], [True, False, True])
    x2, b2 = x.clone().requires_grad_(), b.clone().requires_grad_()
    torch.nn.functional.layer_norm(x2, [7], None, b2).backward(dy)
    torch.testing.assert_close(dx, x2.grad)
    torch.testing.assert_close(db, b2.grad)
    assert dw.numel() == 0
