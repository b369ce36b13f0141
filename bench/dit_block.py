"""A DiT block (AdaLN-Zero: attention and MLP branches with gated residuals, DiT / PixArt /
SD3-style) written twice on the same parameters:

- DiTBlock: diffusers-style eager ops, `norm(x) * (1 + scale[:, None]) + shift[:, None]` and
  `x = x + gate[:, None] * branch`;
- FusedDiTBlock: fastnorm's modulated_layer_norm for the attention's norm, and the attention
  branch's gated residual fused with the MLP's modulated norm (gated_residual_modulated_norm: one
  pass reads x and the branch, writes the new x and the MLP's input).

    python bench/dit_block.py --check          # CPU float32: the two agree (outputs, gradients)
    python bench/dit_block.py [--configs ...]  # on a GPU: forward + backward times, bf16

The timing table: eager, fastnorm, and torch.compile of each (bench/run.py's Timer: L2 flushed
before every call, median of the repetitions), per configuration (a model's hidden size, heads and
tokens; one block, batch as the model runs at 1024 px).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fastnorm  # noqa: E402
import fastnorm.functional as FN  # noqa: E402

# name: (hidden, heads, tokens, batch)
CONFIGS = {
    "pixart-alpha": (1152, 16, 4096, 2),
    "sd3-medium": (1536, 24, 4429, 2),
    "flux-single": (3072, 24, 4608, 1),
}


class DiTBlock(nn.Module):
    """One AdaLN-Zero block, as diffusers' modules spell it: the conditioning c [B, D] gives six
    per-sample chunks (shift, scale, gate of the attention and of the MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attn(self, h):
        b, s, d = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))

    def mlp(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = x + gate_msa[:, None] * self.attn(h)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.mlp(h)


class FusedDiTBlock(DiTBlock):
    """DiTBlock on fastnorm's modulated norms (the same parameters and state_dict). The MLP's
    gated residual is left to ATen: in a stack of blocks it is the next block's first step."""

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        h = FN.modulated_layer_norm(x, scale_msa[:, None], shift_msa[:, None], eps=self.norm1.eps)
        h, x = FN.gated_residual_modulated_norm(x, self.attn(h), gate_msa[:, None],
                                                scale_mlp[:, None], shift_mlp[:, None],
                                                eps=self.norm2.eps)
        return x + gate_mlp[:, None] * self.mlp(h)


def fused_copy(block: DiTBlock) -> FusedDiTBlock:
    f = copy.deepcopy(block)
    f.__class__ = FusedDiTBlock
    return f


def make(dim, heads, tokens, batch, device, dtype, seed=0):
    """A block with random parameters (its adaLN linear not zero-initialised: every branch and
    gradient is live), its inputs and the gradient of its output."""
    g = torch.Generator().manual_seed(seed)
    block = DiTBlock(dim, heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
    block = block.to(device, dtype)
    x = (torch.randn(batch, tokens, dim, generator=g) * 1.5 + 0.3).to(device, dtype)
    c = torch.randn(batch, dim, generator=g).to(device, dtype)
    dy = torch.randn(batch, tokens, dim, generator=g).to(device, dtype)
    return block, x, c, dy


def step(block, x, c, dy):
    """Output and the gradients of the inputs and every parameter of one forward + backward."""
    xs = [x.detach().requires_grad_(), c.detach().requires_grad_()]
    out = block(*xs)
    wrt = xs + list(block.parameters())
    return out, torch.autograd.grad(out, wrt, dy)


def check(dim=64, heads=4, tokens=24, batch=3, fast_path=None, tol=2e-5):
    """The fused block against the eager one on the CPU in float32: output and every gradient
    within tol of the largest value of each. fast_path: the CPU fast path on / off for the
    call (None: as it is). Returns the largest relative difference."""
    was = FN.set_cpu_fast_path(fast_path) if fast_path is not None else None
    try:
        torch.manual_seed(0)
        block, x, c, dy = make(dim, heads, tokens, batch, "cpu", torch.float32)
        fused = fused_copy(block)
        assert fused.state_dict().keys() == block.state_dict().keys()
        out, grads = step(block, x, c, dy)
        fout, fgrads = step(fused, x, c, dy)
        worst = 0.0
        names = ["x", "c"] + [n for n, _ in block.named_parameters()]
        for name, a, b in zip(["out"] + names, (fout.detach(),) + fgrads, (out.detach(),) + grads):
            scale = max(float(b.abs().max()), 1e-30)
            rel = float((a - b).abs().max()) / scale
            assert rel <= tol, f"{name}: fused vs eager max difference {rel:.3g} of its scale (> {tol})"
            worst = max(worst, rel)
        return worst
    finally:
        if was is not None:
            FN.set_cpu_fast_path(was)


def time_block(names, dtype=torch.bfloat16, quick=False):
    """Forward + backward of each configuration on the GPU: eager, fastnorm, and torch.compile of
    both. Returns rows (dicts) and prints a markdown table."""
    from run import Timer

    dev = torch.device("cuda")
    timer = Timer(dev, quick)
    rows = []
    for name in names:
        dim, heads, tokens, batch = CONFIGS[name]
        block, x, c, dy = make(dim, heads, tokens, batch, dev, dtype)
        fused = fused_copy(block)
        mods = {"eager": block, "fastnorm": fused, "compile": torch.compile(copy.deepcopy(block)),
                "compile+fastnorm": torch.compile(fused_copy(block))}
        ref_out = step(block, x, c, dy)[0].detach().float()
        row = {"config": name, "shape": f"{batch}x{tokens}x{dim}"}
        for p, m in mods.items():
            out = step(m, x, c, dy)[0].detach().float()
            row[f"{p} maxdiff"] = float((out - ref_out).abs().max())
            times, _ = timer(lambda _, m=m: step(m, x, c, dy))
            row[p] = statistics.median(times)
        rows.append(row)
        del mods, block, fused
        torch.cuda.empty_cache()
    provs = ["eager", "fastnorm", "compile", "compile+fastnorm"]
    print(f"\n## DiT block forward + backward, {str(dtype).replace('torch.', '')}, "
          f"{torch.cuda.get_device_name(dev)}: median ms (x = eager time / this)\n")
    print("| config | shape | " + " | ".join(provs) + " | max diff vs eager |")
    print("|---|---|" + "---|" * (len(provs) + 1))
    for r in rows:
        cells = [f"{r[p]:.3f} (x{r['eager'] / r[p]:.2f})" for p in provs]
        diff = max(r[f"{p} maxdiff"] for p in provs)
        print(f"| {r['config']} | {r['shape']} | " + " | ".join(cells) + f" | {diff:.3g} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare the fused block with the eager one on the CPU (float32) and exit")
    ap.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args(argv)
    if args.check:
        for fp in (True, False):
            worst = check(fast_path=fp)
            print(f"dit_block: fused == eager on CPU float32 (CPU fast path {'on' if fp else 'off'}): "
                  f"largest difference {worst:.2g} of each tensor's scale")
        return 0
    if not torch.cuda.is_available():
        print("dit_block: no GPU; the timing needs one (--check runs on the CPU)", file=sys.stderr)
        return 2
    if not fastnorm._ext.loaded:
        print("dit_block: WARNING: fastnorm's CUDA extension is not loaded; fastnorm runs its "
              "reference (ATen) ops", file=sys.stderr)
    time_block(args.configs, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
