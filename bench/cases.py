"""The benchmark cases: normalisation layers at the shapes real models run them.

One table (CASES). Each entry is a torch.nn layer at one shape and layout, in one or more dtypes;
`select()` turns it into the concrete list for a run. On a GPU the shapes are the models' own; on
a CPU every case runs in float32 (unless --dtype says otherwise) at a shape scaled down to a few
million elements (the batch first, then the spatial dimensions; never the normalised width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("layer_norm", "batch_norm", "group_norm", "instance_norm")

# Elements per input on a CPU (2 cores should get through --quick in well under 2 minutes).
CPU_MAX_NUMEL = {True: 1 << 20, False: 1 << 21}


@dataclass(frozen=True)
class Case:
    op: str                      # one of OPS
    name: str                    # where the shape comes from
    shape: Tuple[int, ...]
    dtypes: Tuple[str, ...]      # keys of DTYPES; --quick takes the first
    layout: str = "contiguous"   # or "channels_last" (channels_last_3d for 5-d)
    quick: bool = False          # part of --quick

    @property
    def dtype(self) -> str:
        assert len(self.dtypes) == 1, "select() gives one dtype per case"
        return self.dtypes[0]

    @property
    def label(self) -> str:
        lay = "" if self.layout == "contiguous" else " cl"
        return f"{self.op}/{self.name} {self.dtype}{lay}"

    def module(self) -> nn.Module:
        """The torch.nn layer, in training mode, with random (not 1/0) affine parameters.
        BatchNorm keeps float32 parameters (AMP training: half activations, float32 layers);
        the others take the input's dtype (a model cast with .to(dtype), as transformers and
        diffusion models run in half precision)."""
        c = self.shape[-1] if self.op == "layer_norm" else self.shape[1]
        nd = len(self.shape)
        if self.op == "layer_norm":
            m = nn.LayerNorm(c)
        elif self.op == "batch_norm":
            m = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[nd](c)
        elif self.op == "group_norm":
            m = nn.GroupNorm(32, c)
        elif self.op == "instance_norm":
            m = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[nd](c, affine=True)
        else:
            raise ValueError(self.op)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
        if self.op != "batch_norm":
            m = m.to(DTYPES[self.dtype])
        return m.train()

    def memory_format(self) -> torch.memory_format:
        if self.layout == "contiguous":
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d


def _ln(name, rows, width, dtypes, quick=False):
    return Case("layer_norm", name, (rows, width), dtypes, quick=quick)


CASES: List[Case] = [
    # LayerNorm of transformers: rows = batch x sequence (tokens), width = hidden size
    _ln("bert-base-768", 16384, 768, ("bf16", "fp16", "fp32")),
    _ln("bert-large-1024", 16384, 1024, ("bf16",)),
    _ln("gpt-xl-2048", 16384, 2048, ("bf16",)),
    _ln("llama-7b-4096", 16384, 4096, ("bf16", "fp16", "fp32"), quick=True),
    _ln("llama-70b-8192", 8192, 8192, ("bf16",)),
    _ln("gpt3-12288", 8192, 12288, ("bf16", "fp16", "fp32")),
    _ln("odd-1000", 16384, 1000, ("bf16", "fp32"), quick=True),
    _ln("narrow-64-qknorm", 1 << 20, 64, ("bf16",)),
    _ln("wide-65536", 1024, 65536, ("bf16", "fp32")),
    # BatchNorm of ResNet-50 at batch 64: NCHW fp32, channels_last fp16/bf16
    *[Case("batch_norm", name, shape, dtypes, layout, quick=quick)
      for name, shape, q in (("resnet50-stem", (64, 64, 112, 112), False),
                             ("resnet50-layer1", (64, 256, 56, 56), True),
                             ("resnet50-layer2", (64, 512, 28, 28), False),
                             ("resnet50-layer4", (64, 2048, 7, 7), False))
      for dtypes, layout, quick in ((("fp32",), "contiguous", q),
                                    (("bf16", "fp16"), "channels_last", q))],
    Case("batch_norm", "bn1d-16384x1024", (16384, 1024), ("fp32", "bf16")),
    # GroupNorm(32) of a diffusion UNet (SD at 512x512: latents 64x64), batch 8
    *[Case("group_norm", f"sd-unet-{c}", (8, c, hw, hw), ("fp16", "bf16"), layout,
           quick=(c == 320))
      for c, hw in ((320, 64), (640, 32), (1280, 16))
      for layout in ("contiguous", "channels_last")],
    # InstanceNorm of style transfer (256x256 images, 64 channels) and of 3-d medical segmentation
    Case("instance_norm", "style-transfer", (16, 64, 256, 256), ("fp32", "bf16"), "contiguous"),
    Case("instance_norm", "style-transfer", (16, 64, 256, 256), ("fp32", "bf16"), "channels_last",
         quick=True),
    Case("instance_norm", "medseg-3d", (2, 32, 128, 128, 128), ("fp32", "bf16"), quick=True),
]


def fit(shape: Sequence[int], max_numel: int, op: str) -> Tuple[int, ...]:
    """Scale a shape down to at most max_numel elements: halve the batch (rows for 2-d), then the
    spatial dimensions; never the channels or the normalised width."""
    s = list(shape)
    while math.prod(s) > max_numel and s[0] > 1:
        s[0] = max(1, s[0] // 2)
    spatial = range(2, len(s)) if len(s) > 2 else range(0)
    while math.prod(s) > max_numel and any(s[d] > 4 for d in spatial):
        for d in spatial:
            s[d] = max(4, s[d] // 2)
    if op == "batch_norm" and len(s) == 2:
        s[0] = max(s[0], 2)  # more than one value per channel
    return tuple(s)


def select(device: str, quick: bool, ops: Optional[Iterable[str]] = None,
           dtypes: Optional[Iterable[str]] = None) -> List[Case]:
    """The concrete cases of a run, one dtype each.

    GPU: the table's shapes; --dtype filters the table's dtypes; --quick takes the cases marked
    quick in their first dtype. CPU: shapes scaled by fit(); float32 unless --dtype names others.
    """
    ops = set(ops or OPS)
    dtypes = list(dtypes) if dtypes else None
    out: List[Case] = []
    for c in CASES:
        if c.op not in ops or (quick and not c.quick):
            continue
        if device == "cpu":
            shape = fit(c.shape, CPU_MAX_NUMEL[quick], c.op)
            wanted = dtypes or ["fp32"]
        else:
            shape = c.shape
            wanted = [d for d in c.dtypes if dtypes is None or d in dtypes]
            if quick and dtypes is None:
                wanted = wanted[:1]
        for d in wanted:
            case = replace(c, shape=shape, dtypes=(d,))
            if case not in out:
                out.append(case)
    return out
