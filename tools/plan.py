"""The kernels an op call launches on an H100, without a GPU: the host wrappers' own planning code
runs in the emulation build (tools/cuda_emu) with launches recorded instead of executed.

    python tools/plan.py layer_norm 4096x768 bf16
    python tools/plan.py group_norm 8x320x64x64 fp16 --layout channels_last --groups 32
    python tools/plan.py batch_norm 32x256x14x14 fp16 --eval
    python tools/plan.py rms_norm 4096x4096 bf16
    python tools/plan.py add_rms_norm 4096x4096 bf16 --residual fp32     # add_norm, rms=True

For each launch: kernel, grid, block, dynamic shared memory, blocks, and (when the CUDA build's
resource report build/kernel_resources.json exists) resident blocks per SM and waves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SMS = 132  # the emulated H100


def _resources() -> dict:
    """{demangled kernel signature: (registers, static shared memory, barriers)} from the CUDA
    build's resource report (fastnorm.resources, written to build/kernel_resources.json)."""
    from fastnorm import resources

    try:
        with open(os.path.join(ROOT, "build", "kernel_resources.json")) as f:
            kernels = json.load(f)["kernels"]
    except (OSError, ValueError, KeyError):
        return {}
    names = resources.demangle([k["mangled"] for k in kernels])
    return {names[k["mangled"]]: (k["registers"], k["static_smem"], k.get("barriers", 0))
            for k in kernels}


def _resident(res: dict, kernel: str, block, smem: int):
    """Resident blocks per SM of this launch (its block size and dynamic shared memory)."""
    from fastnorm import resources

    r = res.get(kernel)
    if r is None:
        return None
    regs, static, barriers = r
    return resources.resident_blocks(block[0] * block[1] * block[2], regs, static, smem, barriers)[0]


def _short(sig: str) -> str:
    head = sig.split("(", 1)[0]
    return head.replace("fastnorm::", "").replace("c10::", "").replace("void ", "")


ROW_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")  # normalise the last dim


def calls(op: str, shape, dtype, layout: str, groups: int, training: bool, residual=None):
    """The (forward, backward) op calls of one case, on CPU tensors, for an Emulator's ops. The
    backward takes the forward's outputs."""
    fmt = {"channels_last": torch.channels_last if len(shape) == 4 else torch.channels_last_3d}.get(layout)
    x = torch.empty(shape, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.empty_like(x)
    c = shape[-1] if op in ROW_OPS else shape[1]
    pdt = torch.float32 if op == "batch_norm" else dtype
    w, b = torch.empty(c, dtype=pdt), torch.empty(c, dtype=pdt)
    res = torch.empty(shape, dtype=residual or dtype)

    def fwd(ops):
        if op == "layer_norm":
            return ops.layer_norm_fwd(x, [c], w, b, 1e-5)
        if op == "rms_norm":
            return ops.rms_norm_fwd(x, [c], w, 1e-5)
        if op.startswith("add_"):
            rms = op == "add_rms_norm"
            return ops.add_norm_fwd(x, res, [c], w, None if rms else b, 1e-5, rms)
        if op in ("group_norm", "instance_norm"):
            return ops.group_norm_fwd(x, w, b, c if op == "instance_norm" else groups, 1e-5)
        rm, rv = torch.zeros(c), torch.ones(c)
        return ops.batch_norm_fwd(x, w, b, rm, rv, None, training, 0.1, 1e-5)

    def bwd(ops, out):
        mask = [True, True, True]
        if op == "rms_norm":
            return ops.rms_norm_bwd(dy, x, out[1], w, [c], [True, True])
        if op.startswith("add_"):
            # the autograd's request: grad_residual alone when the dtypes agree, else both
            return ops.add_norm_bwd(dy, out[1], out[1], out[2], out[3], w, [c], op == "add_rms_norm",
                                    dtype, [res.dtype != dtype, True, True, op == "add_layer_norm"])
        _, mean, rstd = out
        if op == "layer_norm":
            return ops.layer_norm_bwd(dy, x, mean, rstd, w, [c], mask)
        if op in ("group_norm", "instance_norm"):
            return ops.group_norm_bwd(dy, x, mean, rstd, w, c if op == "instance_norm" else groups, mask)
        return ops.batch_norm_bwd(dy, x, mean, rstd, w, training, mask)

    return x, fwd, bwd


def plan(emu, op, shape, dtype, layout="contiguous", groups=32, training=True, residual=None):
    """[(pass, kernel, grid, block, smem)] for the forward and the backward of one case."""
    x, fwd, bwd = calls(op, shape, dtype, layout, groups, training, residual)
    out = []
    stats = {}

    def run_fwd():
        stats["y"] = fwd(emu.ops)

    out += [("fwd",) + r for r in emu.record_launches(run_fwd)]
    out += [("bwd",) + r for r in emu.record_launches(lambda: bwd(emu.ops, stats["y"]))]
    return out


def report(rows, res) -> str:
    lines = [f"{'pass':4} {'kernel':64} {'grid':>16} {'block':>12} {'smem':>6} {'blocks':>8} "
             f"{'res/SM':>6} {'waves':>6}"]
    for p, k, g, b, sm in rows:
        blocks = g[0] * g[1] * g[2]
        per_sm = _resident(res, k, b, sm)
        waves = f"{blocks / (per_sm * SMS):.2f}" if per_sm else "?"
        lines.append(f"{p:4} {_short(k)[:64]:64} {str(g):>16} {str(b):>12} {sm:>6} {blocks:>8} "
                     f"{per_sm or '?':>6} {waves:>6}")
    if not res:
        lines.append("(resident blocks per SM and waves need the CUDA build's resource report: "
                     "python -m fastnorm.info --kernels writes build/kernel_resources.json)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op", choices=ROW_OPS + ("group_norm", "instance_norm", "batch_norm"))
    ap.add_argument("shape", help="e.g. 4096x768")
    ap.add_argument("dtype", choices=tuple(DTYPES))
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "channels_last"))
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--eval", action="store_true", help="BatchNorm in eval mode")
    ap.add_argument("--residual", choices=tuple(DTYPES), help="add_*: the residual's dtype (default: the input's)")
    a = ap.parse_args(argv)
    from cuda_emu import emu as emu_mod

    import fastnorm  # noqa: F401  (the op schemas)

    emu = emu_mod.load("plain")
    shape = tuple(int(s) for s in a.shape.split("x"))
    rows = plan(emu, a.op, shape, DTYPES[a.dtype], a.layout, a.groups, not a.eval,
                DTYPES[a.residual] if a.residual else None)
    print(f"{a.op} {a.shape} {a.dtype} {a.layout}: {math.prod(shape)} elements, {SMS} SMs")
    print(report(rows, _resources()))


if __name__ == "__main__":
    main()
