"""`python -m fastnorm.info`: versions, GPU, the build record, and which path each op takes.

`python -m fastnorm.info --kernels` adds each compiled kernel's registers, spills, static shared
memory, launch bounds and resident blocks per SM on sm_90 (fastnorm.resources; written to
build/kernel_resources.json too).
"""
from __future__ import annotations

import platform
import sys

import torch

from . import _ext
from .ops import OP_NAMES
from .sync_batchnorm import OP_NAMES as SYNC_OP_NAMES


def cuda_kernel_registered(op: str) -> bool:
    """True when a compiled CUDA kernel (not the reference path) serves `op` on CUDA tensors."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def report() -> str:
    import fastnorm

    lines = [f"fastnorm {fastnorm.__version__}",
             f"python   {platform.python_version()} ({sys.executable})",
             f"torch    {torch.__version__} (CUDA {torch.version.cuda})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}    {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("gpu      none visible")
    info = _ext.build_info()
    lines.append("build    " + (", ".join(f"{k}={v}" for k, v in info.items()) if info else
                                "no build record (not installed with setup.py?)"))
    lines.append("extension " + ("loaded" if _ext.loaded else f"not loaded ({_ext.load_error})"))
    mismatch = _ext._torch_mismatch(info)
    if mismatch:
        lines.append(f"WARNING  {mismatch}")
    lines.append("ops (CUDA path / other devices):")
    for op in OP_NAMES + SYNC_OP_NAMES:
        cuda = "compiled CUDA kernel" if cuda_kernel_registered(op) else "reference (ATen)"
        lines.append(f"  {op:<28} {cuda:<22} / reference (ATen)")
    return "\n".join(lines)


def kernels_report() -> str:
    from . import resources  # only here: the report runs cuobjdump, a plain info does not

    return "kernels (registers, spills, occupancy on sm_90):\n" + resources.report()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastnorm.info", description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true",
                        help="also list each compiled kernel's resources and occupancy (cuobjdump)")
    args = parser.parse_args(argv)
    print(report())
    if args.kernels:
        print(kernels_report())


if __name__ == "__main__":
    main()
