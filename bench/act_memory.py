"""Activation memory of the norm + activation layers: what autograd keeps for the backward of one
timm BatchNormAct2d / GroupNormAct (norm, then the activation: the norm's input and the
activation's input, the norm's output, are both saved) against the same layer after
fastnorm.convert() (the fused kernel saves the norm's input and the per-channel / per-group
statistics; the backward recomputes the pre-activation).

    python bench/act_memory.py [--device meta|cpu|cuda] [--json FILE]

The count is exact and device independent: the tensors autograd saves during the forward
(torch.autograd.graph.saved_tensors_hooks), each counted once, numel x element size. On the meta
device (the default) the layers run at the benchmark's full GPU shapes with no memory and no
arithmetic: fastnorm's ops run their fake kernels, which save what the CUDA path saves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cases  # noqa: E402
import fastnorm  # noqa: E402


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for module(x)'s backward."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def survey(device: str) -> List[dict]:
    rows = []
    for c in cases.select("cuda", False):
        if c.act is None:
            continue
        with torch.device(device):
            ref = c.module()
        fast = c.fastnorm_module(ref)
        x = torch.randn(c.shape, dtype=cases.DTYPES[c.dtype], device=device)
        x = x.contiguous(memory_format=c.memory_format()).requires_grad_()
        timm_b, fast_b = saved_bytes(ref, x), saved_bytes(fast, x)
        rows.append({"case": c.label, "shape": "x".join(map(str, c.shape)),
                     "timm_bytes": timm_b, "fastnorm_bytes": fast_b,
                     "saved_bytes": timm_b - fast_b, "x_bytes": x.numel() * x.element_size()})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="meta")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = survey(args.device)
    mib = 1 << 20
    print("| case | shape | timm saves (MiB) | fastnorm saves (MiB) | saved per layer (MiB) | saved / input |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['shape']} | {r['timm_bytes'] / mib:.1f} | {r['fastnorm_bytes'] / mib:.1f} "
              f"| {r['saved_bytes'] / mib:.1f} | {r['saved_bytes'] / r['x_bytes']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
