"""The kernels an op call launches on an H100, without a GPU: the host wrappers' own planning code
runs in the emulation build (tools/cuda_emu) with launches recorded instead of executed.

    python tools/plan.py layer_norm 4096x768 bf16
    python tools/plan.py group_norm 8x320x64x64 fp16 --layout channels_last --groups 32
    python tools/plan.py batch_norm 32x256x14x14 fp16 --eval
    python tools/plan.py add_rms_norm 4096x4096 bf16
    python tools/plan.py add_rms_norm 4096x4096 bf16 --residual fp32   # a float32 residual stream
    python tools/plan.py layer_norm2d 32x96x56x56 bf16 --layout channels_last
    python tools/plan.py frozen_batch_norm 64x256x56x56 fp32
    python tools/plan.py switch_norm 64x256x56x56 bf16 --layout channels_last
    python tools/plan.py adain 8x512x64x64 fp32      # content and style of one shape
    python tools/plan.py ibn 64x64x56x56 fp32
    python tools/plan.py local_response_norm 128x96x55x55 fp32       # size 5 (AlexNet's)
    python tools/plan.py masked_batch_norm 16x256x1500 bf16          # with lengths (all valid)
    python tools/plan.py masked_group_norm 8x256x128x160 bf16        # with a mask (all valid)

For each launch: kernel, grid, block, dynamic shared memory, blocks, and (when the CUDA build's
resource report build/kernel_resources.json exists) resident blocks per SM and waves.

The plans themselves depend on occupancy (the host code asks resident_blocks() of csrc/device.h):
with the report, the emulator answers those queries from each kernel's registers and shared
memory in it, as the GPU's runtime would; without it, from threads and shared memory alone (the
plans may then differ from the GPU's). The output says which, and lists the queries.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SMS = 132  # the emulated H100
# Ops on rows of the last dimension (the groups family), and every op the planner takes.
ROW_OPS = ("layer_norm", "rms_norm", "add_rms_norm", "add_layer_norm", "llama_rms_norm",
           "gemma_rms_norm", "gated_rms_norm", "modulated_layer_norm",
           "gated_residual_modulated_norm")
# The AdaLN of diffusion transformers (modulated_norm_fwd / _bwd) as the bench times it: [B, tokens,
# D] rows, a per-sample scale and shift (and gate) [B, D], a LayerNorm without affine parameters;
# the gated residual's stream in x's dtype. Rows longer than the fused kernels hold
# (MOD_MAX_PACKED_ROW: csrc/launch/groups.h kModulatedMaxPackedRow) take the functional's ATen
# composition: no fastnorm launch to plan.
MOD_OPS = ("modulated_layer_norm", "gated_residual_modulated_norm")
MOD_MAX_PACKED_ROW = 4096
# Hugging Face's conventions: llama_rms_norm (rms_norm_fwd with round_normalized), gemma_rms_norm
# (a float32 weight: 1 + w formed by functional.rms_norm), gated_rms_norm (Mamba-2's gate first,
# silu, the Llama rounding, groups of GATED_GROUP elements when they divide the row: one launch per
# group column, each over 1 / G of every tensor)
RMS_OPS = ("rms_norm", "add_rms_norm", "llama_rms_norm", "gemma_rms_norm", "gated_rms_norm")
GATED_GROUP = 1024
# the source articles' layers (SwitchNorm, AdaIN, IBN) on the per-(n, c) ops (nc_moments, nc_affine,
# nc_grad_sums, nc_affine_grad)
NC_OPS = ("switch_norm", "adain", "ibn")
# the masked norms, on the same ops with a validity: masked_batch_norm with lengths (planned all
# valid: a sequence's reductions stop at its length, so fewer bytes where it is padded),
# masked_group_norm with a bool mask of the positions (planned all valid; its N x HW bytes are
# left out of the minimum)
MASKED_OPS = ("masked_batch_norm", "masked_group_norm")
OPS = ROW_OPS + ("group_norm", "instance_norm", "batch_norm", "layer_norm2d",
                 "frozen_batch_norm", "local_response_norm") + NC_OPS + MASKED_OPS
LRN_SIZE = 5  # local_response_norm's window in the planned calls (AlexNet's and GoogLeNet's)


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


# ----------------------------------------------------------------------------------------------
# The bytes model: an estimate per launch of the bytes it moves through memory and of the bytes
# each thread has in flight (loads issued before their first dependent use), from the launch's
# geometry, the kernel's template arguments and constants, and the call's shape and dtype.
#
# What it counts: every x-sized tensor a kernel streams (x, y, dy, dx, ...) once per read or
# write, a re-read counted again; workspaces of partials as written by their producer and read by
# their consumer; parameters and other per-row / per-channel vectors once per launch (they are
# small and L2-resident, however often the threads re-read them).
# What it ignores: L2 hits of re-read data (the split forward's apply pass walks x in the reverse
# order so that the tail the statistics pass read last is still in L2; BatchNorm's fused path
# re-reads a channel it has just read), partial sectors and write-allocate effects, and dy in
# float32 under autocast (dy and y are counted in x's dtype).
# ----------------------------------------------------------------------------------------------
H100_BW = 3.35e12       # bytes/s: H100 SXM HBM3 peak
H100_LATENCY_S = 650e-9  # a DRAM load under load, ~600-700 ns
# Little's law: bytes that must be in flight to sustain the bandwidth, per SM
LITTLE_BYTES_PER_SM = H100_BW * H100_LATENCY_S / SMS  # ~16.5 KB
RUNNING_BYTES = 4  # BatchNorm's running statistics: float32 (as calls() makes them)


def _kernel_consts() -> dict:
    """The integer constants of csrc/kernels (and csrc/launch) the model uses, read from the
    sources."""
    out = {}
    for f, names in (("groups_forward.cuh", ("kUnroll", "kItemThreads", "kFwdCachedMaxThreads",
                                             "kBwdElems")),
                     ("groups_backward.cuh", ("kBwdSplitMaxThreads",)),
                     ("channels_common.cuh", ("kUnroll", "kThreads", "kClThreads")),
                     ("channels_positions.cuh", ("kPosThreads", "kLrnStage", "kLrnFwdTileBytes",
                                                 "kLrnBwdTileBytes")),
                     # the channels_last reductions' plan (host side)
                     ("../launch/channels.h", ("kClTilePacks", "kClChunkRows", "kClMaxChunks"))):
        with open(os.path.join(ROOT, "csrc", "kernels", f)) as fh:
            text = fh.read()
        ns = ("groups" if f.startswith("groups") else
              "positions" if f == "channels_positions.cuh" else "channels")
        for n in names:
            m = re.search(r"constexpr\s+(?:int|int64_t)\s+" + n + r"\s*=\s*(\d+)\s*;", text)
            if m is None:
                raise RuntimeError(f"tools/plan.py: {n} not found in csrc/kernels/{f}")
            out[f"{ns}::{n}"] = int(m.group(1))
    return out


K = _kernel_consts()
# Template constants (groups_forward.cuh / groups_backward.cuh), checked against the source text
# by tests/test_plan.py:
#   kFwdPacks<T, VEC, S> = VEC == 1 ? 8 : (sizeof(T) == 8 ? 4 : (sizeof(S) > sizeof(T) ? 4 : 8))
#   kBwdPacks<VEC> = 8 / VEC
#   kBwdCachedMaxThreads<T, VEC, X> = sizeof(acc_of<T>) == 8 || VEC == 1 || sizeof(X) > sizeof(T)
#                                     ? 512 : 1024
# S / X: the dtype a row is held in (the residual stream's with a fused add; else T): `held`, its
# element size (0: x's).
#   kBwdCachedGatedMaxThreads<T, VEC, GATE> = (sizeof(acc_of<T>) == 8 && (VEC > 1 || gate first))
#                                     || (gate first && VEC == 1) ? 256 : 512
KROW_BLOCK_THREADS = 512  # groups.h ln_backward_vec: kRowBlockThreads (rows per block)
MOD_CHUNK_BYTES = 128 * 1024  # groups.h kModChunkBytes


def fwd_packs(elem: int, vec: int, held: int = 0) -> int:
    return 8 if vec == 1 else (4 if elem == 8 else (4 if (held or elem) > elem else 8))


def bwd_packs(vec: int) -> int:
    return 8 // vec


def bwd_cached_max_threads(acc: int, vec: int, elem: int = 0, held: int = 0,
                           gate_first=None) -> int:
    """gate_first: None (no gate), True / False (the gated rows' bound)."""
    if gate_first is not None:
        return 256 if (acc == 8 and (vec > 1 or gate_first)) or (gate_first and vec == 1) else 512
    return 512 if acc == 8 or vec == 1 or (held or elem) > elem else 1024


# ---- the host plans' inner parameters --------------------------------------------------------
# The launch record holds grid, block and shared memory, not the kernel arguments; the models
# need a few of them (threads per row, items per row, row chunks). These mirror csrc/launch's plan
# functions, and every use checks the mirror against the recorded launch: a mismatch (the C++
# plan changed) marks the estimate '~' (approximate) instead of hiding it.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(v: int) -> int:
    p = 1
    while p < v:
        p <<= 1
    return p


def _grid_of(blocks: int) -> int:
    return max(1, min(blocks, 1 << 20))


def mirror_cached(M, L, vec, elem, packs_per_thread, max_tpr, sub_warp_threads):
    """groups.h plan_cached -> (tpr, threads, row_blocks), or None (rows too long). Threads per
    row from the row alone (M counts blocks only)."""
    packs = L // vec
    need = max(1, _cdiv(packs, packs_per_thread))
    if need > max_tpr:
        return None
    line = min(packs, _cdiv(128, vec * elem))
    tpr = max(_pow2_ceil(need), _pow2_ceil(line))
    threads = sub_warp_threads if tpr <= 32 else tpr
    return tpr, threads, _cdiv(M, threads // tpr)


def mirror_cached_bwd(M, L, vec, elem, acc, held=0, sm=SMS, gate_first=None):
    """groups.h ln_backward_vec, cached path -> (tpr, threads, row_blocks), or None (split): the
    cached plan (rows held in X: element size `held`, 0 for x's), then several rows per block
    when tpr > 32 (up to kRowBlockThreads threads and no more rows per block than rows per SM)."""
    held = held or elem
    m = mirror_cached(M, L, vec, held, bwd_packs(vec),
                      bwd_cached_max_threads(acc, vec, elem, held, gate_first), 256)
    if m is None:
        return None
    tpr, threads, _ = m
    if tpr > 32:
        rows_per_sm = max(1, M // sm)
        rpb = 1
        while rpb * 2 * tpr <= KROW_BLOCK_THREADS and rpb * 2 <= rows_per_sm:
            rpb *= 2
        threads = tpr * rpb
    return tpr, threads, _cdiv(M, threads // tpr)


def bwd_mod_max_threads(acc: int, vec: int) -> int:
    """groups_backward.cuh kBwdCachedModMaxThreads<T, VEC>."""
    return 256 if acc == 8 or vec == 1 else 512


def mirror_mod_bwd(M, L, vec, elem, acc, seg_rows, held=0):
    """groups.h modulated_backward_vec -> (tpr, threads, grid): rows per block and the chunk of a
    segment a block takes from the row's length and dtype alone (kModChunkBytes), one block per
    chunk of each segment (per token: the segment is all M rows)."""
    held = held or elem
    cap = bwd_mod_max_threads(acc, vec)
    m = mirror_cached(M, L, vec, held, bwd_packs(vec), cap, 256)
    if m is None:
        return None
    tpr, threads, _ = m
    if tpr > 32:
        threads = cap
    rpb = threads // tpr
    rows_bytes = rpb * L * held
    iters = 1
    while iters < 64 and 2 * iters * rows_bytes <= MOD_CHUNK_BYTES:
        iters *= 2
    part = seg_rows if seg_rows > 1 else M
    return tpr, threads, (M // part) * _cdiv(part, rpb * iters)


def mod_fused(op: str, shape, dtype) -> bool:
    """Whether functional's modulated norms take the fused kernels for these rows (else ATen)."""
    d = shape[-1]
    elem = torch.empty((), dtype=dtype).element_size()
    return d <= 2048 or (d <= MOD_MAX_PACKED_ROW and elem < 8 and d % (16 // elem) == 0)


def gated_group(h: int) -> int:
    """The gated case's group size: GATED_GROUP when it divides the row (Mamba-Codestral's), else
    the whole row."""
    return GATED_GROUP if h % GATED_GROUP == 0 else h


def mirror_items(M, L, vec):
    """groups.h plan_items -> (S, chunk packs, tpr, grid): chunks of at most 4 full-warp
    iterations, from the row's length alone."""
    Lp = max(1, L // vec)
    cp = min(Lp, 4 * 32 * K["groups::kUnroll"])
    S = _cdiv(Lp, cp)
    tpr = min(32, _pow2_ceil(_cdiv(cp, K["groups::kUnroll"])))
    return S, cp, tpr, _grid_of(_cdiv(M * S, K["groups::kItemThreads"] // tpr))


def mirror_cl(N, HW, C, G, vec, per_sm, sm=SMS):
    """channels.h plan_cl -> (bx, by, CT, K, rpc); per_sm: the kernel's resident blocks per SM
    (the host's occupancy query)."""
    threads = K["channels::kClThreads"]
    Cp = C // vec
    target = max(per_sm, 1) * sm

    def kmax_for(bx):
        by = max(1, threads // bx)
        return max(1, HW // max(by, 16))

    CT = _cdiv(Cp, min(Cp, threads))
    while _cdiv(Cp, CT) > 32 and N * CT * kmax_for(_cdiv(Cp, CT)) < target:
        CT += 1
    bx = _cdiv(Cp, CT)
    CT = _cdiv(Cp, bx)
    by = max(1, threads // bx)
    fit = target // (N * CT)  # chunks per (n, tile) that keep the grid in one wave
    k = max(1, min(fit, kmax_for(bx)))
    rpc = _cdiv(HW, k)
    return bx, by, CT, _cdiv(HW, rpc), rpc


CL_SUMS_KERNELS = ("cl_welford_partial_kernel", "cl_bwd_sums_kernel")


def mirror_cl_sums(N, HW, C, G, vec):
    """channels.h plan_cl_sums -> (bx, by, CT, K, rpc): the channels_last reductions' plan, from
    the sample's shape alone (tiles of at most kClTilePacks packs, chunks of >= kClChunkRows rows,
    at most kClMaxChunks per sample)."""
    threads = K["channels::kClThreads"]
    Cp = C // vec
    tiles = _cdiv(Cp, max(1, min(Cp, K["channels::kClTilePacks"])))
    bx = max(1, _cdiv(Cp, tiles))
    CT = _cdiv(Cp, bx)
    by = max(1, threads // bx)
    rows = max(K["channels::kClChunkRows"], by, _cdiv(HW, K["channels::kClMaxChunks"]))
    rpc = max(1, min(HW, _cdiv(rows, by) * by))
    return bx, by, CT, max(1, _cdiv(HW, rpc)), rpc


# ---- the call and one launch, as the models see them ------------------------------------------
class Call:
    """One op call: its shape in the terms of the kernels.

    rows: LayerNorm-type statistics over rows of L contiguous elements (M rows; the row ops, and
    LayerNorm2d, whose channels_last input is rows [N * HW, C]); rms: RMS statistics (rstd only,
    no bias); add: the fused residual add (the forward also reads the residual and writes
    residual_out; the backward also reads the gradient of residual_out and, one dtype, writes one
    gradient for both inputs); frozen: FrozenBatchNorm2d (BatchNorm's eval path, buffers in the
    input's dtype, the backward asks for dx only). residual: the fused add's residual dtype
    (None: x's; float32 with a half input: residual, residual_out and their gradients are float32,
    and the backward writes both input gradients)."""

    def __init__(self, op, shape, dtype, layout="contiguous", groups=32, training=True,
                 residual=None):
        if op not in OPS:
            raise ValueError(f"tools/plan.py: unknown op {op!r}; expected one of {OPS}")
        self.frozen = op == "frozen_batch_norm"
        self.lrn = op == "local_response_norm"  # no parameters, no statistics
        training = training and not self.frozen  # frozen statistics: the eval path
        self.op, self.shape, self.layout, self.training = op, tuple(shape), layout, training
        self.occupancy = {}  # kernel (_short) -> the resident blocks its host plan was given
        self.rms = op in RMS_OPS
        self.gated = op == "gated_rms_norm"  # x and gate in, y out; the gradients of both
        # modulated rows: scale / shift (and the gated residual's gate) [B, D]; the gated residual
        # is a fused add whose input gradient is a tensor of its own (d_r * gate) and whose
        # backward also reads the input (the branch: dgate)
        self.mod = op in MOD_OPS
        self.mod_gated = op == "gated_residual_modulated_norm"
        self.add = op.startswith("add_") or self.mod_gated
        self.rows = op in ROW_OPS or op == "layer_norm2d"
        self.bias = not self.rms            # the op has a bias (and a dbias)
        self.param_grads = not self.frozen  # the backward asks for dweight (and dbias)
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.acc = 8 if dtype == torch.float64 else 4
        self.numel = math.prod(self.shape)
        self.E = self.numel * self.elem  # bytes of one x-sized tensor
        # the fused add's residual stream: element size, bytes of one tensor, and whether the
        # input's gradient is a tensor of its own (two dtypes); held: the size rows are held in
        self.res_elem = (torch.empty((), dtype=residual).element_size()
                         if self.add and residual is not None else self.elem)
        self.R = self.numel * self.res_elem
        self.split_grads = (self.add and residual is not None and residual != dtype) or self.mod_gated
        self.held = self.res_elem if self.add else self.elem
        self.launches = 1  # launches per pass that split every tensor (the gated group columns)
        if op in ROW_OPS:
            self.L = self.shape[-1]
            self.M = self.numel // self.L if self.L else 0
            self.P, self.S = self.L, self.M  # parameter length, statistics length
            self.pbytes = 4 if op == "gemma_rms_norm" else self.elem  # (1 + w) in float32
            if self.mod:  # no affine parameters; Q = B modulation rows of seg_rows tokens each
                self.P = 0
                self.Q = self.shape[0]
                self.seg_rows = self.M // self.Q if self.Q else 1
            if self.gated:  # rows are the groups; the row held as h in the accumulation type
                self.group = gated_group(self.L)
                self.launches = self.L // self.group
                self.P, self.S = self.L, self.M * self.launches
                self.L = self.group
                self.held = self.acc
        elif op in NC_OPS + MASKED_OPS:  # per (n, c) over the HW positions; [N, C] statistics
            self.N, self.C = self.shape[0], self.shape[1]
            self.HW = math.prod(self.shape[2:])
            self.G, self.Cg = self.C, 1
            self.M, self.L = self.N * self.C, self.HW
            # adain: no parameters, the statistics of content and style
            self.P = 0 if op == "adain" else self.C
            self.S = self.M * (2 if op == "adain" else 1)
            self.pbytes = 4 if op == "ibn" else self.elem  # IBN's BatchNorm half: float32
        elif op == "layer_norm2d":  # per position (n, s) over C channels: rows [N * HW, C]
            self.N, self.C = self.shape[0], self.shape[1]
            self.HW = math.prod(self.shape[2:])
            self.G, self.Cg = 1, self.C
            self.M, self.L = self.N * self.HW, self.C
            self.P, self.S = self.C, self.M
            self.pbytes = self.elem
        else:
            self.N, self.C = self.shape[0], self.shape[1]
            self.HW = math.prod(self.shape[2:])
            self.G = self.C if op == "instance_norm" else (groups if op == "group_norm" else 1)
            self.Cg = self.C // self.G if self.G else 0
            self.M, self.L = self.N * self.G, self.Cg * self.HW  # GroupNorm NCHW rows
            self.P = self.C
            self.S = self.C if op in ("batch_norm", "frozen_batch_norm") else self.N * self.G
            self.pbytes = 4 if op == "batch_norm" else self.elem
        # BatchNorm's running statistics as calls() makes them (FrozenBatchNorm2d: input's dtype)
        self.rbytes = self.elem if self.frozen else RUNNING_BYTES

    def small(self, name: str) -> int:
        """Bytes of a small (per row / per channel) vector set, read or written once."""
        return self._small(name) // self.launches

    def _small(self, name: str) -> int:
        a, p, r = self.acc, self.pbytes, self.rbytes
        nstats = 1 if self.rms else 2  # RMSNorm: rstd only
        grads = (2 if self.bias else 1) if self.param_grads else 0
        nmod = 3 if getattr(self, "mod_gated", False) else 2  # scale, shift (, gate)
        qd = getattr(self, "Q", 0) * (self.L if getattr(self, "mod", False) else 0)
        return {
            "w": self.P * p, "b": self.P * p if self.bias else 0, "dwdb": grads * self.P * p,
            "stats": nstats * self.S * a, "mean": self.S * a,
            "running": 4 * self.P * r, "running_r": 2 * self.P * r,
            "coef3": 3 * self.P * a, "coef4": 4 * self.P * a,
            "gn_coef": 2 * self.S * a, "row_sums": 2 * self.M * a,
            "nc_sums": 2 * getattr(self, "N", 0) * getattr(self, "C", 0) * a,
            # modulated rows: scale, shift (, gate) read; scale (, gate) read by the backward and
            # dscale, dshift (, dgate) written; the segments' column sums [Q, D] (A, B (, dgate))
            "mod": nmod * qd * self.elem, "mod_bwd": (nmod - 1) * qd * self.elem,
            "dmod": nmod * qd * self.elem, "mod_sums": nmod * qd * a,
        }[name]

    def minimum(self, pass_: str) -> int:
        """The op's minimum bytes: each input read once, each output written once. fwd: x, w, b
        -> y, mean, rstd (BatchNorm training: running stats read and written; eval: read; add:
        input and residual -> output and residual_out); bwd: x, dy, mean, rstd, w -> dx, dw, db
        (add: residual_out, dy, d residual_out -> one input gradient; frozen: dy, rstd, w -> dx).
        The x-sized counts are bench/cases.py's STREAMS. local_response_norm: x -> y; x, dy -> dx,
        nothing small."""
        if self.lrn:
            return (2 if pass_ == "fwd" else 3) * self.E
        if pass_ == "fwd":
            small = ["w", "b", "stats"] + (["mod"] if self.mod else [])
            if self.op in ("batch_norm", "frozen_batch_norm"):
                small.append("running" if self.training else "running_r")
            big = 2 * self.E + 2 * self.R if self.add else 2 * self.E
            if self.op in ("adain", "gated_rms_norm"):  # content and style (x and gate) read
                big = 3 * self.E
            return big + sum(self._small(s) for s in small)
        if self.add:  # dy; residual_out and its gradient; dresidual (and dinput, two dtypes)
            big = self.E + 3 * self.R + (self.E if self.split_grads else 0)
            if self.mod_gated:  # the input (the branch), read for dgate
                big += self.E
        elif self.op in ("adain", "gated_rms_norm"):  # two inputs and dy read; two gradients
            big = 5 * self.E
        else:
            big = (2 if self.frozen else 3) * self.E
        small = ("stats", "w", "dwdb") + (("mod_bwd", "dmod") if self.mod else ())
        return big + sum(self._small(s) for s in small)

    def nbytes(self, tensor: str, x_is_r: bool = False) -> int:
        """Bytes of one x-sized tensor a kernel streams: the fused add's residual stream (and x
        where the kernel's x is residual_out) in the residual's dtype, the others in x's."""
        if self.add and (tensor in ("residual", "residual_out", "d_residual_out", "dresidual")
                         or (tensor == "x" and x_is_r)):
            return self.R
        return self.E // self.launches


class Launch:
    def __init__(self, sig, grid, block, smem):
        self.sig, self.grid, self.block, self.smem = sig, tuple(grid), tuple(block), smem
        short = _short(sig)
        self.qualname = short.split("<", 1)[0]
        self.name = self.qualname.split("::")[-1]
        targs = short[len(self.qualname):].strip("<>")
        self.targs = [t.strip() for t in targs.split(",")] if targs else []
        ints = [int(t) for t in self.targs if re.fullmatch(r"-?\d+", t)]
        self.vec = ints[0] if ints else 1
        self.threads = block[0] * block[1] * block[2]
        self.blocks = grid[0] * grid[1] * grid[2]


class PassState:
    """What the launches of one pass so far left behind: the last workspace written."""

    def __init__(self):
        self.last_ws = 0
        self.seen = []


class Est:
    def __init__(self, parts, per_thread, approx=False):
        self.parts = parts            # {what: bytes}
        self.total = sum(parts.values())
        self.per_thread = per_thread  # bytes in flight per thread
        self.approx = approx


# ---- models -----------------------------------------------------------------------------------
# Per-thread packs in flight of each kind of kernel (before the first dependent use), capped by
# the work a thread has, and whether the plan mirror agreed with the recorded launch.
def _flight_cached_fwd(k: Launch, c: Call):
    packs = fwd_packs(c.elem, k.vec, c.held)
    m = mirror_cached(c.M, c.L, k.vec, c.held, packs, K["groups::kFwdCachedMaxThreads"], 128)
    ok = m is not None and m[1] == k.threads and _grid_of(m[2]) == k.grid[0]
    tpr = m[0] if m else k.threads
    return min(packs, _cdiv(c.L // k.vec, tpr)), ok


def _flight_cached_bwd(k: Launch, c: Call):
    if c.mod:
        m = mirror_mod_bwd(c.M, c.L, k.vec, c.elem, c.acc, c.seg_rows, c.held)
        ok = m is not None and m[1] == k.threads and k.grid[0] == m[2]
        tpr = m[0] if m else k.threads
        return min(bwd_packs(k.vec), _cdiv(c.L // k.vec, tpr)), ok
    m = mirror_cached_bwd(c.M, c.L, k.vec, c.elem, c.acc, c.held,
                          gate_first=True if c.gated else None)
    ok = m is not None and m[1] == k.threads and k.grid[0] <= m[2]
    tpr = m[0] if m else k.threads
    return min(bwd_packs(k.vec), _cdiv(c.L // k.vec, tpr)), ok


def _rows(k: Launch, c: Call):
    """(rows, row length) of an item kernel."""
    if c.rows:
        return c.M, c.L
    if k.name == "row_sums_partial_kernel":  # GroupNorm NCHW: (n, c) planes
        return c.N * c.C, c.HW
    return c.M, c.L


def _items(k: Launch, c: Call):
    M, L = _rows(k, c)
    S, cp, tpr, grid = mirror_items(M, L, k.vec)
    return M * S, min(K["groups::kUnroll"], _cdiv(cp, tpr)), grid == k.grid[0]


def _flight_items(k, c):
    _, packs, ok = _items(k, c)
    return packs, ok


def _ws_items(per_item):
    """per_item: partial values per (row, chunk) item, or a function of the call."""
    def f(k, c):
        items, _, ok = _items(k, c)
        n = per_item(c) if callable(per_item) else per_item
        return n * items * c.acc, ok
    return f


def _param_arrays(c: Call) -> int:
    """Column-partial arrays of the parameter gradients: dweight and dbias (RMSNorm: dweight)."""
    return (2 if c.bias else 1) if c.param_grads else 0


def _cl(k: Launch, c: Call):
    if k.name in CL_SUMS_KERNELS:  # the reductions: plan_cl_sums, no occupancy query
        bx, by, CT, Kc, rpc = mirror_cl_sums(c.N, c.HW, c.C, c.G, k.vec)
        ok = _grid_of(c.N * Kc * CT) == k.grid[0] and bx * by == k.threads
        return Kc, min(K["channels::kUnroll"], _cdiv(rpc, by)), ok
    per_sm = c.occupancy.get(_short(k.sig))  # what the host's occupancy query answered for this kernel
    bx, by, CT, Kc, rpc = mirror_cl(c.N, c.HW, c.C, c.G, k.vec, per_sm or 4)
    ok = per_sm is not None and _grid_of(c.N * Kc * CT) == k.grid[0] and bx * by == k.threads
    return Kc, min(K["channels::kUnroll"], _cdiv(rpc, by)), ok


def _flight_cl(k, c):
    _, packs, ok = _cl(k, c)
    return packs, ok


def _ws_cl(k, c):
    Kc, _, ok = _cl(k, c)
    return 2 * c.N * Kc * c.C * c.acc, ok


def mirror_lrn_rows(c: Call, vec: int, bwd: bool, per_sm: int, sm=SMS):
    """positions.h lrn_rows_run -> (tile_rows, tile_c, tiles, grid): whole rows when C fits a
    shared array (as many rows as fit, no fewer tiles than a wave), else one row's chunks of
    tile_c channels beside the halo; per_sm: the kernel's resident blocks per SM."""
    cap = K["positions::kLrnBwdTileBytes" if bwd else "positions::kLrnFwdTileBytes"] // c.acc
    rows = c.N * c.HW
    wave = sm * max(per_sm, 1)
    if c.C <= cap:
        tile_c, ctiles = c.C, 1
        tile_rows = max(1, min(cap // c.C, _cdiv(rows, wave)))
    else:
        before, after = min(LRN_SIZE // 2, c.C), min((LRN_SIZE - 1) // 2, c.C)
        halo = (2 if bwd else 1) * (before + after) + 2 * (16 // c.elem - 1)
        tile_c, tile_rows = (cap - halo) // 32 * 32, 1
        ctiles = _cdiv(c.C, tile_c)
    tiles = _cdiv(rows, tile_rows) * ctiles
    return tile_rows, tile_c, tiles, _grid_of(min(tiles, wave))


def _flight_lrn_rows(k: Launch, c: Call):
    """The rows kernels' staging: each thread loads up to kLrnStage packs per array (x; the
    backward also dy) of a tile before storing any to shared memory."""
    per_sm = c.occupancy.get(_short(k.sig))
    tile_rows, tile_c, _, grid = mirror_lrn_rows(c, k.vec, k.name.startswith("lrn_bwd"),
                                                 per_sm or 8)
    packs = _cdiv(tile_rows * tile_c, k.vec)
    return (min(K["positions::kLrnStage"], _cdiv(packs, K["positions::kPosThreads"])),
            per_sm is not None and grid == k.grid[0])


def _flight_bn(k: Launch, c: Call):
    """BatchNorm stats/apply/sums: kUnroll packs per thread per iteration, capped by the packs a
    thread visits (NCHW: grid.x blocks per channel; NHWC: grid.y * block.y row lanes)."""
    if k.name.endswith("nchw"):
        per = _cdiv(c.N * c.HW // k.vec, k.grid[0] * k.threads)
    else:
        per = _cdiv(c.N * c.HW, k.grid[1] * k.block[1])
    return min(K["channels::kUnroll"], per), True


def _flight_split(k: Launch, c: Call):
    return min(bwd_packs(k.vec), _cdiv(c.L // k.vec, k.threads)), True


def _ws_cached_bwd(k, c):  # [grid, L] column partials of dweight and dbias (RMSNorm: dweight)
    if c.mod:  # per segment: A, B (and dgate's)
        return (3 if c.mod_gated else 2) * k.grid[0] * c.L * c.acc, True
    return _param_arrays(c) * k.grid[0] * c.L * c.acc, True


def _ws_split(k, c):  # [RG, L] column partials; grid = RG * S2, S2 column chunks
    s2 = _cdiv(c.L, k.threads * K["groups::kBwdElems"])
    return _param_arrays(c) * (k.grid[0] // s2) * c.L * c.acc, k.grid[0] % s2 == 0


def _ws_bn(planes):
    def f(k, c):  # [planes][G1][C]; G1 = grid.x (NCHW) or grid.y (NHWC)
        g1 = k.grid[0] if k.name.endswith("nchw") else k.grid[1]
        return planes * g1 * c.C * c.acc, True
    return f


def _ws_row_sums(k, c):  # row_sums_finalize's output: two sums per row (LN) or (n, c) plane (GN)
    rows = c.M if c.rows else c.N * c.C
    return 2 * rows * c.acc, True


def one(n=1):
    """Finalize-type kernels: one element of the accumulation type per stream per thread."""
    return lambda k, c: (n, True)


class Model:
    """How one kernel moves memory.

    reads / writes: x-sized tensors streamed in full (a name twice: read twice);
    small: per-row / per-channel vectors, once per launch (Call.small's names), or a function of
           the call giving them;
    ws_in: reads the workspace the pass's last producer wrote; ws_out(k, c) -> (bytes written to
           a workspace, mirror agreed);
    flight(k, c) -> (packs per thread per stream in flight, mirror agreed); streams: how many
           tensors those packs come from; acc_packs: the packs are single accumulation-type
           elements (finalize kernels) instead of VEC elements of x's dtype;
    add_reads / add_writes: the x-sized tensors the kernel also streams for a fused residual add
           (Call.add), each also a stream of packs in flight when it is read; x_is_r: with a
           fused add the kernel's x is residual_out (the residual's dtype); split_writes: also
           written when the add's two input gradients are separate tensors (two dtypes).
    """

    def __init__(self, reads=(), writes=(), small=(), ws_in=False, ws_out=None, flight=None,
                 streams=1, acc_packs=False, add_reads=(), add_writes=(), x_is_r=False,
                 split_writes=(), gate_reads=(), gate_writes=(), mod_reads=()):
        self.reads, self.writes, self.small = reads, writes, small
        self.ws_in, self.ws_out, self.flight = ws_in, ws_out, flight
        self.streams, self.acc_packs = streams, acc_packs
        self.add_reads, self.add_writes = add_reads, add_writes
        self.x_is_r, self.split_writes = x_is_r, split_writes
        self.gate_reads, self.gate_writes = gate_reads, gate_writes
        self.mod_reads = mod_reads  # the gated residual's backward: the branch, for dgate

    def estimate(self, k: Launch, c: Call, st: PassState) -> Est:
        parts, approx = {}, False
        reads = (self.reads + (self.add_reads if c.add else ())
                 + (self.gate_reads if c.gated else ())
                 + (self.mod_reads if c.mod_gated else ()))
        writes = (self.writes + (self.add_writes if c.add else ())
                  + (self.split_writes if c.split_grads else ())
                  + (self.gate_writes if c.gated else ()))
        for t in reads:
            parts[f"{t} read"] = parts.get(f"{t} read", 0) + c.nbytes(t, self.x_is_r)
        for t in writes:
            parts[f"{t} write"] = parts.get(f"{t} write", 0) + c.nbytes(t, self.x_is_r)
        small = self.small(c) if callable(self.small) else self.small
        for s in small:
            parts[s] = c.small(s)
        if self.ws_in:
            parts["workspace read"] = st.last_ws
        if self.ws_out is not None:
            b, ok = self.ws_out(k, c)
            approx |= not ok
            parts["workspace write"] = b
            st.last_ws = b
        per_thread = None
        if self.flight is not None:
            packs, ok = self.flight(k, c)
            approx |= not ok
            if self.acc_packs:
                per_thread = packs * self.streams * c.acc
            else:  # the streams' packs, each in its tensor's dtype (the add's residual stream)
                names = (self.reads[:self.streams] + (self.add_reads if c.add else ())
                         + (self.gate_reads if c.gated else ()))
                per_thread = packs * sum(k.vec * c.nbytes(t, self.x_is_r) * c.launches // c.numel
                                         if c.numel else k.vec * c.elem for t in names)
        return Est(parts, per_thread, approx)


class Modal:
    """BatchNorm's apply kernels: the model depends on the path the host took (ApplyMode):
    general (a stats / sums kernel ran before in this pass), fused (training, no such kernel:
    the kernel reduces its own channel, then applies), eval."""

    def __init__(self, producer: str, final, fused, eval_):
        self.producer, self.final, self.fused, self.eval = producer, final, fused, eval_

    def pick(self, c: Call, st: PassState):
        if any(n.startswith(self.producer) for n in st.seen):
            return self.final(c)
        if self.producer == "bn_bwd_sums" and not c.training and not c.param_grads:
            return _bn_bwd_eval_dx(c)  # frozen statistics, dx only: no sums at all
        return self.fused(c) if (c.training or self.producer == "bn_bwd_sums") else self.eval(c)

    def estimate(self, k, c, st):
        return self.pick(c, st).estimate(k, c, st)


def _bn_bwd_fused(c):  # sums over dy and x, then dx (training: dy and x again; eval: dy)
    return Model(reads=("dy", "x", "dy") + (("x",) if c.training else ()), writes=("dx",),
                 small=("stats", "w", "dwdb"), flight=_flight_bn, streams=2)


def _bn_bwd_eval_dx(c):  # eval, dx only (FrozenBatchNorm2d): dx = dy * w * rstd
    return Model(reads=("dy",), writes=("dx",), small=("stats", "w"), flight=_flight_bn)


def _bn_bwd_final(c):
    return Model(reads=("dy", "x") if c.training else ("dy",), writes=("dx",), small=("coef4",),
                 flight=_flight_bn, streams=2 if c.training else 1)


_BN_FWD_APPLY = Modal(
    "bn_fwd_stats",
    final=lambda c: Model(reads=("x",), writes=("y",), small=("coef3",), flight=_flight_bn),
    fused=lambda c: Model(reads=("x", "x"), writes=("y",), small=("w", "b", "stats", "running"),
                          flight=_flight_bn),
    eval_=lambda c: Model(reads=("x",), writes=("y",), small=("w", "b", "stats", "running_r"),
                          flight=_flight_bn))
_BN_BWD_APPLY = Modal("bn_bwd_sums", final=_bn_bwd_final, fused=_bn_bwd_fused, eval_=_bn_bwd_fused)


def _ln2d_lanes(c: Call) -> int:
    """positions.h channel_lanes(C, kCachePacks = 8): channel lanes per block."""
    cy = 8
    while cy < 32 and cy * 8 < c.C:
        cy *= 2
    return cy


class _Ln2dFwd:
    """ln2d_fwd_kernel<T, V, CACHED, ACT> (LayerNorm2d on NCHW): CACHED keeps a lane's packs in
    registers (x read once, all of a lane's packs, at most 8, in flight); otherwise a 4-deep
    unrolled walk over the lane's channels, and the output pass reads x again. (ACT, the fused
    activation, changes no traffic.)"""

    def estimate(self, k: Launch, c: Call, st: PassState) -> Est:
        if len(k.targs) > 2 and k.targs[2] == "true":
            m = Model(reads=("x",), writes=("y",), small=("w", "b", "stats"),
                      flight=lambda k, c: (min(8, _cdiv(c.C, _ln2d_lanes(c))), True))
        else:
            m = Model(reads=("x", "x"), writes=("y",), small=("w", "b", "stats"),
                      flight=lambda k, c: (4, True))
        return m.estimate(k, c, st)


class _Finalize:
    """row_welford_finalize_kernel: reads the partials (3 per item; RMSNorm 1), writes the
    statistics; one accumulation-type element per partial in flight per thread."""

    def estimate(self, k: Launch, c: Call, st: PassState) -> Est:
        return Model(ws_in=True, small=("stats",), flight=one(), streams=1 if c.rms else 3,
                     acc_packs=True).estimate(k, c, st)


def _ws_ln2d(k, c):  # [grid, C] partials of dweight and dbias
    return 2 * k.grid[0] * c.C * c.acc, True

# One entry per kernel (the name without namespace or template arguments). A kernel that moves
# memory like an existing one takes that entry's Model in one line; see docs/kernel_resources.md.
MODELS = {
    # contiguous groups, forward (groups_forward.cuh)
    # (a fused residual add: the cached forward and the partial pass also read the residual and
    # write residual_out; the apply pass reads residual_out in place of x. RMSNorm: one partial
    # per item, the sum of squares)
    "row_fwd_cached_kernel": Model(reads=("x",), writes=("y",),
                                   small=lambda c: ("w", "b", "stats") + (("mod",) if c.mod else ()),
                                   flight=_flight_cached_fwd, add_reads=("residual",),
                                   add_writes=("residual_out",), gate_reads=("gate",)),
    "row_welford_partial_kernel": Model(reads=("x",), ws_out=_ws_items(lambda c: 1 if c.rms else 3),
                                        flight=_flight_items, add_reads=("residual",),
                                        add_writes=("residual_out",)),
    "row_welford_finalize_kernel": _Finalize(),
    "row_apply_kernel": Model(reads=("x",), writes=("y",), small=("w", "b", "stats"),
                              flight=_flight_items, x_is_r=True),
    # contiguous groups, backward (groups_backward.cuh); a fused residual add: x is residual_out,
    # the dx kernels also read the gradient of residual_out and write one input gradient
    # gated rows: the gate read with x (gate first: x and the gate re-read at the store, L1 / L2
    # hits, not counted) and its gradient written
    "ln_bwd_cached_kernel": Model(reads=("x", "dy"), writes=("dx",),
                                  small=lambda c: ("w", "stats") + (("mod_bwd",) if c.mod else ()),
                                  ws_out=_ws_cached_bwd, flight=_flight_cached_bwd, streams=2,
                                  add_reads=("d_residual_out",), x_is_r=True,
                                  split_writes=("dresidual",), gate_reads=("gate",),
                                  gate_writes=("dgate",), mod_reads=("branch",)),
    "row_sums_partial_kernel": Model(reads=("x", "dy"),
                                     small=lambda c: ("w", "stats") if c.rows else ("stats",),
                                     ws_out=_ws_items(2), flight=_flight_items, streams=2,
                                     x_is_r=True),
    "row_sums_finalize_kernel": Model(ws_in=True, ws_out=_ws_row_sums, flight=one(), streams=2,
                                      acc_packs=True),
    "ln_bwd_split_kernel": Model(reads=("x", "dy"), writes=("dx",), small=("w", "stats", "row_sums"),
                                 ws_out=_ws_split, flight=_flight_split, streams=2,
                                 add_reads=("d_residual_out",), x_is_r=True,
                                 split_writes=("dresidual",)),
    "col_sum_finalize_kernel": Model(ws_in=True,
                                     small=lambda c: ("mod_sums",) if c.mod else ("dwdb",),
                                     flight=one(), acc_packs=True),
    "gn_bwd_coef_kernel": Model(small=("nc_sums", "w", "gn_coef"), flight=one(), streams=2,
                                acc_packs=True),
    "gn_dx_nchw_kernel": Model(reads=("x", "dy"), writes=("dx",), small=("stats", "gn_coef", "w"),
                               flight=_flight_items, streams=2),
    # strided channels: BatchNorm (channels_forward.cuh, channels_backward.cuh)
    "bn_fwd_stats_nchw": Model(reads=("x",), ws_out=_ws_bn(3), flight=_flight_bn),
    "bn_fwd_stats_nhwc": Model(reads=("x",), ws_out=_ws_bn(3), flight=_flight_bn),
    "bn_fwd_finalize": Model(ws_in=True, small=("coef3", "stats", "w", "b", "running"),
                             flight=one(), streams=3, acc_packs=True),
    "bn_fwd_apply_nchw": _BN_FWD_APPLY,
    "bn_fwd_apply_nhwc": _BN_FWD_APPLY,
    "bn_bwd_sums_nchw": Model(reads=("dy", "x"), small=("mean",), ws_out=_ws_bn(2),
                              flight=_flight_bn, streams=2),
    "bn_bwd_sums_nhwc": Model(reads=("dy", "x"), small=("mean",), ws_out=_ws_bn(2),
                              flight=_flight_bn, streams=2),
    "bn_bwd_finalize": Model(ws_in=True, small=("stats", "w", "dwdb", "coef4"), flight=one(),
                             streams=2, acc_packs=True),
    "bn_bwd_apply_nchw": _BN_BWD_APPLY,
    "bn_bwd_apply_nhwc": _BN_BWD_APPLY,
    # strided channels: GroupNorm / InstanceNorm channels_last
    "cl_welford_partial_kernel": Model(reads=("x",), ws_out=_ws_cl, flight=_flight_cl),
    "cl_welford_finalize_kernel": Model(ws_in=True, small=("stats",), flight=one(), streams=2,
                                        acc_packs=True),
    "cl_apply_kernel": Model(reads=("x",), writes=("y",), small=("stats", "w", "b"),
                             flight=_flight_cl),
    "cl_bwd_sums_kernel": Model(reads=("x", "dy"), small=("stats",), ws_out=_ws_cl,
                                flight=_flight_cl, streams=2),
    "cl_dx_kernel": Model(reads=("x", "dy"), writes=("dx",), small=("stats", "gn_coef", "w"),
                          flight=_flight_cl, streams=2),
    # strided channels reduced per position: LayerNorm2d on NCHW (the backward reads x and dy
    # twice: per-position sums, then dx; one pack per stream at a time)
    "ln2d_fwd_kernel": _Ln2dFwd(),
    "ln2d_bwd_kernel": Model(reads=("x", "dy", "x", "dy"), writes=("dx",), small=("stats", "w"),
                             ws_out=_ws_ln2d, flight=one(), streams=2),
    # LocalResponseNorm, NCHW: x (and dy) from memory once; a group's window re-reads of its
    # neighbours' channels are L1 hits and not counted. In flight per thread: the forward's
    # channel walk unrolled 4 deep (4 packs of x); the backward's inner window sum likewise (4
    # packs of x; dy's one pack per channel left out)
    "lrn_fwd_kernel": Model(reads=("x",), writes=("y",), flight=one(4)),
    "lrn_bwd_kernel": Model(reads=("x", "dy"), writes=("dx",), flight=one(4)),
    # rows (channels_last, S == 1): tiles staged in shared memory, x (and dy) read once (a
    # channel chunk's halo, C above a tile, re-read by its neighbour: not counted), outputs
    # written once
    "lrn_fwd_rows_kernel": Model(reads=("x",), writes=("y",), flight=_flight_lrn_rows),
    "lrn_bwd_rows_kernel": Model(reads=("x", "dy"), writes=("dx",), flight=_flight_lrn_rows,
                                 streams=2),
}


def calls(op: str, shape, dtype, layout: str, groups: int, training: bool, residual=None):
    """The (forward, backward) op calls of one case, on CPU tensors, for an Emulator's ops, as
    fastnorm's layers make them: fwd(ops) returns the forward op's outputs, bwd(ops, outputs)
    runs the backward op on them with the output mask the autograd passes.

    rms_norm / add_rms_norm / add_layer_norm: rows of the last dimension (eps 1e-6); the fused
    add's residual in `residual`'s dtype (None: x's), the backward with the gradient of
    residual_out (the residual's dtype) and the gradients the autograd asks for: one dtype, only
    the residual's (the autograd gives that tensor to both inputs); two, both.
    layer_norm2d: (N, C, *) in the layout. frozen_batch_norm: batch_norm_fwd in eval mode with
    buffers in x's dtype (functional.frozen_batch_norm), the backward for dx only (buffers take
    no gradient)."""
    if op not in OPS:
        raise ValueError(f"tools/plan.py: unknown op {op!r}; expected one of {OPS}")
    fmt = {"channels_last": torch.channels_last if len(shape) == 4 else torch.channels_last_3d}.get(layout)
    x = torch.empty(shape, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.empty_like(x)
    # the fused add's residual and the gradient of residual_out
    res = torch.empty_like(x, dtype=residual or dtype)
    dres = torch.empty_like(res)
    c = shape[-1] if op in ROW_OPS else shape[1]
    pdt = torch.float32 if op == "batch_norm" else dtype
    w, b = torch.empty(c, dtype=pdt), torch.empty(c, dtype=pdt)
    rms = op in RMS_OPS
    frozen = op == "frozen_batch_norm"
    if op == "gemma_rms_norm":  # functional.rms_norm hands the op 1 + w in float32
        w = torch.empty(c, dtype=torch.float32)
    gate = torch.empty_like(x)
    gs = gated_group(c) if op == "gated_rms_norm" else 0
    # modulated rows: [B * tokens, D] with [B, D] scale, shift and gate
    q = shape[0]
    x2 = x.reshape(-1, c)
    mods = torch.empty(q, c, dtype=dtype)
    seg = x2.shape[0] // q if q else 1
    training = training and not frozen

    # SwitchNorm, AdaIN, IBN: [N, C] coefficients in the statistics dtype; adain's style has x's shape
    nc = torch.empty(tuple(shape[:2]), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    style = torch.empty_like(x)

    # the masked norms' validity (all valid)
    validity = {}
    if op == "masked_batch_norm":
        validity["lengths"] = torch.full((shape[0],), shape[-1], dtype=torch.int64)
    elif op == "masked_group_norm":
        validity["mask"] = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)

    def fwd(ops):
        if op in MASKED_OPS:
            mean, _ = ops.nc_moments(x, **validity)
            return ops.nc_affine(x, nc, nc, **validity), mean
        if op in NC_OPS:  # moments of x (and of the style), [N, C] math, one apply pass
            mean, _ = ops.nc_moments(x)
            if op == "adain":
                ops.nc_moments(style)
            return ops.nc_affine(x, nc, nc), mean
        if op == "layer_norm":
            return ops.layer_norm_fwd(x, [c], w, b, 1e-5)
        if op in ("rms_norm", "gemma_rms_norm"):
            return ops.rms_norm_fwd(x, [c], w, 1e-6)
        if op == "llama_rms_norm":
            return ops.rms_norm_fwd(x, [c], w, 1e-6, None, True)
        if op == "gated_rms_norm":  # Mamba-2's: gate first, silu (4), the Llama rounding
            return ops.gated_rms_norm_fwd(x, gate, w, 1e-6, gs, False, 4, True)
        if op in MOD_OPS:
            g = op == "gated_residual_modulated_norm"
            return ops.modulated_norm_fwd(x2, mods, mods, None, None, res.reshape(-1, c) if g else None,
                                          mods if g else None, 1e-6, 1.0, seg, False)
        if op in ("add_rms_norm", "add_layer_norm"):
            return ops.add_norm_fwd(x, res, [c], w, None if rms else b, 1e-6 if rms else 1e-5, rms)
        if op == "layer_norm2d":
            return ops.layer_norm2d_fwd(x, w, b, 1e-6)
        if op == "local_response_norm":
            return ops.local_response_norm_fwd(x, LRN_SIZE, 1e-4, 0.75, 1.0)
        if op in ("group_norm", "instance_norm"):
            return ops.group_norm_fwd(x, w, b, c if op == "instance_norm" else groups, 1e-5)
        rm = torch.zeros(c, dtype=pdt if frozen else torch.float32)
        rv = torch.ones(c, dtype=pdt if frozen else torch.float32)
        return ops.batch_norm_fwd(x, w, b, rm, rv, None, training, 0.0 if frozen else 0.1, 1e-5)

    def bwd(ops, out):
        mask = [True, True, True]
        if op in MASKED_OPS:
            ops.nc_grad_sums(dy, x, out[1], **validity)
            return ops.nc_affine_grad(dy, x, out[1], nc, nc, nc, **validity)
        if op in NC_OPS:  # the sums, then dx in one pass (adain: the style's through its moments)
            ops.nc_grad_sums(dy, x, out[1])
            dx = ops.nc_affine_grad(dy, x, out[1], nc, nc, nc)
            if op == "adain":
                return dx, ops.nc_affine_grad(None, style, nc, nc, nc, nc)
            return dx
        if op == "layer_norm":
            return ops.layer_norm_bwd(dy, x, out[1], out[2], w, [c], mask)
        if op in ("rms_norm", "llama_rms_norm", "gemma_rms_norm"):
            return ops.rms_norm_bwd(dy, x, out[1], w, [c], [True, True])
        if op == "gated_rms_norm":
            return ops.gated_rms_norm_bwd(dy, x, gate, out[1], w, gs, False, 4, [True, True, True])
        if op in MOD_OPS:  # the autograd's mask: no affine parameters
            g = op == "gated_residual_modulated_norm"
            return ops.modulated_norm_bwd(dy.reshape(-1, c), dres.reshape(-1, c) if g else None,
                                          out[1] if g else x2, x2 if g else None, mods, None, None,
                                          mods if g else None, out[2], out[3], 1.0, seg, False, g,
                                          dtype, dtype, [True, True, True, False, False, g, g])
        if op in ("add_rms_norm", "add_layer_norm"):
            _, r, mean, rstd = out
            two = res.dtype != dtype
            return ops.add_norm_bwd(dy, dres, r, mean, rstd, w, [c], rms, dtype,
                                    [two, True, True, not rms])
        if op == "layer_norm2d":
            return ops.layer_norm2d_bwd(dy, x, out[1], out[2], w, mask)
        if op == "local_response_norm":
            return ops.local_response_norm_bwd(dy, x, LRN_SIZE, 1e-4, 0.75, 1.0)
        if op in ("group_norm", "instance_norm"):
            return ops.group_norm_bwd(dy, x, out[1], out[2], w,
                                      c if op == "instance_norm" else groups, mask)
        return ops.batch_norm_bwd(dy, x, out[1], out[2], w, training,
                                  [True, False, False] if frozen else mask)

    return x, fwd, bwd


def plan(emu, op, shape, dtype, layout="contiguous", groups=32, training=True, queries=None,
         residual=None):
    """[(pass, kernel, grid, block, smem)] for the forward and the backward of one case. The
    occupancy queries the host plans made are appended to `queries` (a list) if given."""
    x, fwd, bwd = calls(op, shape, dtype, layout, groups, training, residual)
    out = []
    outs = {}

    def run_fwd():
        outs["fwd"] = fwd(emu.ops)

    out += [("fwd",) + r for r in emu.record_launches(run_fwd)]
    if queries is not None:
        queries += [("fwd",) + q for q in emu.occupancy_queries()]
    out += [("bwd",) + r for r in emu.record_launches(lambda: bwd(emu.ops, outs["fwd"]))]
    if queries is not None:
        queries += [("bwd",) + q for q in emu.occupancy_queries()]
    return out


def estimate(rows, call: Call, res: dict) -> dict:
    """The plan of one case with the estimates: {"launches": [...], "passes": {pass: totals}}.
    Each launch: pass, kernel, grid, block, smem, blocks, resident blocks per SM and waves (None
    without the resource report), estimated bytes and their parts, bytes in flight per thread and
    per SM, low (under LITTLE_BYTES_PER_SM), approx; the estimates are None for a kernel with no
    model ("n/a")."""
    launches, states = [], {}
    for p, sig, g, b, sm in rows:
        k = Launch(sig, g, b, sm)
        st = states.setdefault(p, PassState())
        per_sm = _resident(res, sig, b, sm)
        model = MODELS.get(k.name)
        e = model.estimate(k, call, st) if model is not None else None
        st.seen.append(k.name)
        rec = {"pass": p, "kernel": _short(sig), "grid": list(g), "block": list(b), "smem": sm,
               "blocks": k.blocks, "res_per_sm": per_sm,
               "waves": k.blocks / (per_sm * SMS) if per_sm else None,
               "bytes": e.total if e else None, "parts": e.parts if e else None,
               "approx": bool(e and e.approx),
               "inflight_thread": e.per_thread if e else None, "inflight_sm": None, "low": None}
        if e is not None and e.per_thread is not None and per_sm:
            active = min(per_sm, k.blocks / SMS)  # blocks per SM in the first wave, averaged
            rec["inflight_sm"] = active * k.threads * e.per_thread
            rec["low"] = rec["inflight_sm"] < LITTLE_BYTES_PER_SM
        launches.append(rec)
    passes = {}
    for p in ("fwd", "bwd", "fwdbwd"):
        ls = [r for r in launches if p == "fwdbwd" or r["pass"] == p]
        known = all(r["bytes"] is not None for r in ls)
        total = sum(r["bytes"] for r in ls) if known else None
        minimum = (call.minimum("fwd") + call.minimum("bwd")) if p == "fwdbwd" else call.minimum(p)
        passes[p] = {"est_bytes": total, "min_bytes": minimum,
                     "passes": total / minimum if total is not None and minimum else None,
                     "launches": len(ls),
                     "unknown": sorted({r["kernel"] for r in ls if r["bytes"] is None}),
                     "low": sorted({r["kernel"] for r in ls if r["low"]}),
                     "low_share": (sum(r["bytes"] for r in ls if r["low"]) / total
                                   if total else None)}
    return {"launches": launches, "passes": passes}


def _mb(v) -> str:
    return "n/a" if v is None else f"{v / 1e6:.2f}"


def report(est: dict, res: dict) -> str:
    """The plan table of one case: the launches with their estimates, then each pass's totals."""
    lines = [f"{'pass':4} {'kernel':52} {'grid':>15} {'block':>13} {'smem':>6} {'blocks':>7} "
             f"{'res/SM':>6} {'waves':>6} {'est MB':>9} {'inflight/SM':>11}"]
    for r in est["launches"]:
        g, b = tuple(r["grid"]), tuple(r["block"])
        mb = _mb(r["bytes"])
        if r["approx"]:
            mb = "~" + mb
        if r["inflight_sm"] is not None:
            fl = f"{r['inflight_sm'] / 1024:.1f} KB" + (" LOW" if r["low"] else "")
        elif r["inflight_thread"] is not None:
            fl = f"{r['inflight_thread']} B/thr"
        else:
            fl = "n/a"
        waves = f"{r['waves']:.2f}" if r["waves"] is not None else "?"
        lines.append(f"{r['pass']:4} {r['kernel'][:52]:52} {str(g):>15} {str(b):>13} {r['smem']:>6} "
                     f"{r['blocks']:>7} {r['res_per_sm'] or '?':>6} {waves:>6} {mb:>9} {fl:>11}")
    for p, t in est["passes"].items():
        passes = "n/a" if t["passes"] is None else f"{t['passes']:.2f}"
        line = (f"  {p:6} estimated {_mb(t['est_bytes'])} MB moved / minimum {_mb(t['min_bytes'])} "
                f"MB = {passes} passes over memory, {t['launches']} launches")
        if t["unknown"]:
            line += f"; no bytes model for: {', '.join(t['unknown'])}"
        if t["low"] and p != "fwdbwd":
            share = "" if t["low_share"] is None else f" ({100 * t['low_share']:.0f}% of the bytes)"
            line += (f"; under {LITTLE_BYTES_PER_SM / 1024:.1f} KB in flight per SM{share}: "
                     f"{', '.join(t['low'])}")
        lines.append(line)
    return "\n".join(lines)


def occupancy_note(loaded: int, queries) -> str:
    """Where the plans' occupancy answers came from."""
    if loaded:
        head = (f"occupancy: resident blocks from the CUDA build's resource report "
                f"(build/kernel_resources.json, {loaded} kernels): the plans are the GPU's")
    else:
        head = ("occupancy: no resource report (build/kernel_resources.json): resident blocks from "
                "threads and shared memory only, registers ignored; the plans may differ from the "
                "GPU's (python -m fastnorm.info --kernels on the CUDA build writes the report)")
    lines = [head]
    for p, k, t, sm, b, src in queries:
        how = {"report": "registers/smem from the report", "threads": "threads/smem only (not in the report)",
               "device": "configured"}.get(src, src)
        lines.append(f"  {p} resident_blocks({_short(k)}, {t} threads, {sm} B) = {b}  [{how}]")
    return "\n".join(lines)


def legend(res: dict) -> str:
    """What the estimates are, once per output."""
    text = (
        "Estimates, not measurements. est MB: bytes a launch moves by the model of tools/plan.py "
        "(MODELS): x-sized tensors (x, y, dy, dx) once per read or write, workspaces of partials "
        "as written and read, parameters and per-row/per-channel vectors once per launch. It "
        "ignores L2 hits of re-read data (the split forward's apply pass re-reads x in reverse "
        "order to hit L2; BatchNorm's fused path re-reads a channel it just read), sector "
        "granularity, autocast's float32 dy/y, and copies the op wrappers make with ATen (not "
        "launches of fastnorm: inputs of other stride patterns). A fused residual add's residual, "
        "residual_out and gradient of "
        "residual_out are x-sized streams in x's dtype. passes = estimated bytes / the op's minimum "
        "(each input read once, each output written once). inflight/SM: resident blocks per SM "
        "(at most blocks / SMs) x threads x bytes a thread loads before their first use (packs "
        "in flight x pack bytes x streams, from kFwdPacks, kUnroll, the pack width); LOW: under "
        f"Little's law for an H100 ({H100_BW / 1e12:.2f} TB/s x {H100_LATENCY_S * 1e9:.0f} ns / "
        f"{SMS} SMs = {LITTLE_BYTES_PER_SM / 1024:.1f} KB per SM). '~': a plan mirror disagreed "
        "with the recorded launch (approximate). n/a: no model for that kernel. Grids sized by "
        "occupancy (LayerNorm's cached backward, BatchNorm's chunks, GroupNorm channels_last) "
        "follow the occupancy source named above.")
    if not res:
        text += (" Resident blocks per SM, waves and bytes in flight per SM need the CUDA build's "
                 "resource report: python -m fastnorm.info --kernels writes "
                 "build/kernel_resources.json.")
    return text


def plan_case(emu, op, shape, dtype, layout="contiguous", groups=32, training=True, res=None,
              queries=None, residual=None):
    """The launches of one case with their estimates (estimate()'s dict, plus the case); the host
    plans' occupancy queries are appended to `queries` if given. residual: the fused add's
    residual dtype (None: x's)."""
    res = _resources() if res is None else res
    qs = [] if queries is None else queries
    rows = plan(emu, op, shape, dtype, layout, groups, training, qs, residual)
    call = Call(op, shape, dtype, layout, groups, training, residual)
    call.occupancy = {_short(q[1]): q[4] for q in qs}
    est = estimate(rows, call, res)
    est["occupancy"] = dict(call.occupancy)
    est.update(op=op, shape=list(shape), dtype=str(dtype).replace("torch.", ""), layout=layout,
               training=training,
               residual=None if residual is None else str(residual).replace("torch.", ""))
    return est


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op", choices=OPS)
    ap.add_argument("shape", help="e.g. 4096x768")
    ap.add_argument("dtype", choices=tuple(DTYPES))
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "channels_last"))
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--eval", action="store_true",
                    help="BatchNorm in eval mode (frozen_batch_norm always is)")
    ap.add_argument("--residual", choices=tuple(DTYPES),
                    help="add_rms_norm / add_layer_norm: the residual's dtype (default: the "
                         "input's; fp32 with a half input: a float32 residual stream)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    from cuda_emu import emu as emu_mod

    import fastnorm  # noqa: F401  (the op schemas)

    emu = emu_mod.load("plain")
    loaded = emu.use_resource_report()
    shape = tuple(int(s) for s in a.shape.split("x"))
    res = _resources()
    queries = []
    try:
        est = plan_case(emu, a.op, shape, DTYPES[a.dtype], a.layout, a.groups, not a.eval, res,
                        queries, DTYPES[a.residual] if a.residual else None)
    finally:
        emu.use_resource_report("")
    if a.json:
        est["occupancy_source"] = "report" if loaded else "threads"
        print(json.dumps(est, indent=1))
        return
    print(f"{a.op} {a.shape} {a.dtype} {a.layout}: {math.prod(shape)} elements, {SMS} SMs")
    print(occupancy_note(loaded, queries))
    print(report(est, res))
    print(legend(res))


if __name__ == "__main__":
    main()
