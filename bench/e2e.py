"""fastnorm end to end: training steps of whole models, torch.nn norm layers against the same model
after fastnorm.convert() (and, for the Llama stack, its residual adds fused into the next RMSNorm),
from the same initial weights, on the same batches.

    python bench/e2e.py [--quick] [--device cpu|cuda] [--steps N] [--warmup N] [--models ...]
                        [--size small|full] [--batch N] [--zoo] [--out FILE] [--threads N]

Models (defined here; --zoo takes torchvision's ResNet-50 and timm's ViT-B/16 when importable):
  resnet50   BatchNorm2d; channels_last, bf16 autocast on a GPU
  vit-b      12 pre-norm transformer blocks, width 768 (LayerNorm); bf16 autocast on a GPU
  unet       diffusion-UNet-style conv stack, GroupNorm(32), SD widths 320/640/1280 on 64x64
             latents; channels_last, bf16 autocast on a GPU
  style      Johnson et al.'s style-transfer network (InstanceNorm2d, affine), float32
  convnext   timm's convnext_tiny, no weights (LayerNorm2d in the stem, downsamples and head;
             timm's LayerNorm in the blocks); channels_last, bf16 autocast on a GPU (needs timm)
  effnet-b0  timm's efficientnet_b0, no weights (BatchNormAct2d: BatchNorm + SiLU, the activation
             fused into fastnorm's kernel after convert()); channels_last, bf16 autocast on a GPU
  vit-s      timm's vit_small_patch16_224, no weights (timm's LayerNorm); bf16 autocast on a GPU
  llama      a Llama-style decoder stack (4 blocks of width 4096, SwiGLU 11008, 32 heads, causal
             attention, 2 x 2048 tokens): nn.RMSNorm at the first block, then the residual add
             fused into each following RMSNorm (fastnorm.functional.add_rms_norm; the torch model
             adds, then calls F.rms_norm); bf16 autocast with a float32 residual stream on a GPU
Both variants step alternately (one torch step, one fastnorm step) so that drift in the machine's
state hits both alike. Reported: median step time after warm-up, speed-up, and the losses after
N steps with their difference. On a CPU the models are small versions (--size; --quick takes
seconds); on a GPU --quick keeps the full models with smaller batches and 10 steps.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fastnorm  # noqa: E402
from cases import AddRMSNorm, has_timm, fuse_add_norms  # noqa: E402
from run import csv_is_new, device_name, fastnorm_commit, fastnorm_path, set_cpu_threads  # noqa: E402


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet(nn.Module):
    """ResNet-50 with layers=(3, 4, 6, 3), base=64."""

    def __init__(self, layers=(3, 4, 6, 3), base=64, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for i, n in enumerate(layers):
            width = base * 2**i
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-B/16 with dim=768, depth=12, heads=12 on 224x224 images (196 patches + a class token)."""

    def __init__(self, image=224, patch=16, dim=768, depth=12, heads=12, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(32, cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.n2, self.c2 = nn.GroupNorm(32, cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class UNet(nn.Module):
    """A diffusion-UNet-style stack: a ResBlock per level down (stride-2 convs), one in the middle,
    a ResBlock per level up on the concatenated skip (nearest upsampling), GroupNorm(32)."""

    def __init__(self, chans=(320, 640, 1280), cin=4):
        super().__init__()
        self.inp = nn.Conv2d(cin, chans[0], 3, 1, 1)
        self.down = nn.ModuleList(ResBlock(a, b) for a, b in zip((chans[0],) + chans[:-1], chans))
        self.pool = nn.ModuleList(nn.Conv2d(c, c, 3, 2, 1) for c in chans[:-1])
        self.mid = ResBlock(chans[-1], chans[-1])
        self.up = nn.ModuleList(ResBlock(2 * c, c) for c in chans)
        self.lift = nn.ModuleList(nn.Conv2d(b, a, 3, 1, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Sequential(nn.GroupNorm(32, chans[0]), nn.SiLU(), nn.Conv2d(chans[0], cin, 3, 1, 1))

    def forward(self, x):
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(h)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], 1))
            if i > 0:
                h = self.lift[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


class StyleNet(nn.Module):
    """Johnson et al. (2016): 3 convs down, 5 residual blocks, 2 upsampling convs; InstanceNorm."""

    def __init__(self, base=32, res_blocks=5):
        super().__init__()

        def cna(cin, cout, k, stride=1, up=False):
            layers = [nn.Upsample(scale_factor=2.0, mode="nearest")] if up else []
            return layers + [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride),
                             nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True)]

        self.down = nn.Sequential(*cna(3, base, 9), *cna(base, 2 * base, 3, 2), *cna(2 * base, 4 * base, 3, 2))
        self.res = nn.ModuleList(nn.Sequential(*cna(4 * base, 4 * base, 3), nn.ReflectionPad2d(1),
                                               nn.Conv2d(4 * base, 4 * base, 3),
                                               nn.InstanceNorm2d(4 * base, affine=True))
                                 for _ in range(res_blocks))
        self.up = nn.Sequential(*cna(4 * base, 2 * base, 3, up=True), *cna(2 * base, base, 3, up=True),
                                nn.ReflectionPad2d(4), nn.Conv2d(base, 3, 9))

    def forward(self, x):
        h = self.down(x)
        for block in self.res:
            h = h + block(h)
        return self.up(h)


class LlamaBlock(nn.Module):
    """A Llama decoder block in the fused-residual form inference and training stacks use (vLLM,
    TensorRT-LLM): it takes the previous block's output h and the residual stream, and its first
    norm adds them (AddRMSNorm: residual_out = h + residual, then RMSNorm of it). The first block
    has no h yet: a plain nn.RMSNorm of the embeddings. No rotary embedding (it does not touch the
    norms); SwiGLU MLP; causal scaled-dot-product attention."""

    def __init__(self, dim: int, heads: int, hidden: int, first: bool, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim, eps=eps) if first else AddRMSNorm(dim, eps)
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp_norm = AddRMSNorm(dim, eps)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, h, res):
        if h is None:
            x = self.attn_norm(res)
        else:
            x, res = self.attn_norm(h, res)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x, res = self.mlp_norm(self.o(a.transpose(1, 2).reshape(b, t, d)), res)
        g, u = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(g) * u), res


class Llama(nn.Module):
    """Token embedding (the residual stream: float32 under autocast), LlamaBlocks, a final fused
    add + RMSNorm, the LM head. Defaults: 4 blocks of Llama-2-7B's width."""

    def __init__(self, vocab=32000, dim=4096, depth=4, heads=32, hidden=11008):
        super().__init__()
        self.num_classes = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, hidden, i == 0) for i in range(depth))
        self.norm = AddRMSNorm(dim, 1e-5)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h, res = None, self.embed(tokens)
        for block in self.blocks:
            h, res = block(h, res)
        x, _ = self.norm(h, res)
        return self.head(x)


def _convnext(small: bool):
    """timm's ConvNeXt (no weights): convnext_tiny, or a one-block-per-stage one (dims 16-128,
    10 classes) for the CPU. Raises ImportError without timm."""
    import timm
    from timm.models.convnext import ConvNeXt

    if small:
        return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10)
    return timm.create_model("convnext_tiny", pretrained=False)


def _timm_model(name: str, small_kwargs: dict):
    """A timm model without weights; small: the same architecture cut down by small_kwargs (for
    the CPU). Raises ImportError without timm."""
    import timm

    def build(small: bool):
        return timm.create_model(name, pretrained=False, **(small_kwargs if small else {}))
    return build


TIMM_MODELS = ("convnext", "effnet-b0", "vit-s")


def _classes(model: nn.Module) -> int:
    if hasattr(model, "num_classes"):
        return model.num_classes
    return model.fc.out_features if hasattr(model, "fc") else model.head.out_features


def _zoo(name: str):
    """torchvision's / timm's model when --zoo is given and the package is importable."""
    try:
        if name == "resnet50":
            import torchvision
            return torchvision.models.resnet50(weights=None), "torchvision"
        if name == "vit-b":
            import timm
            return timm.create_model("vit_base_patch16_224", pretrained=False), "timm"
    except ImportError:
        pass
    return None, None


# name -> (builder(small), batch(small), input shape, target, autocast, channels_last)
# target: "class" (cross-entropy on random labels), "same" (MSE against a random tensor like the
# output: noise prediction for the UNet, a stylised image for the style network) or "tokens"
# (random token ids in, next-token cross-entropy on random labels; the input shape is (sequence,))
MODELS: Dict[str, Tuple[Callable, Callable, Callable, str, bool, bool]] = {
    "resnet50": (lambda s: ResNet((1, 1, 1, 1), 16, 10) if s else ResNet(),
                 lambda s, q: 8 if s else (32 if q else 64),
                 lambda s: (3, 32, 32) if s else (3, 224, 224), "class", True, True),
    "vit-b": (lambda s: ViT(32, 8, 64, 2, 4, 10) if s else ViT(),
              lambda s, q: 4 if s else (32 if q else 64),
              lambda s: (3, 32, 32) if s else (3, 224, 224), "class", True, False),
    "unet": (lambda s: UNet((32, 64)) if s else UNet(),
             lambda s, q: 2 if s else (4 if q else 8),
             lambda s: (4, 16, 16) if s else (4, 64, 64), "same", True, True),
    "style": (lambda s: StyleNet(8, 2) if s else StyleNet(),
              lambda s, q: 2 if s else (2 if q else 4),
              lambda s: (3, 64, 64) if s else (3, 256, 256), "same", False, False),
    "convnext": (_convnext,
                 lambda s, q: 4 if s else (32 if q else 64),
                 lambda s: (3, 32, 32) if s else (3, 224, 224), "class", True, True),
    "effnet-b0": (_timm_model("efficientnet_b0", {"num_classes": 10}),
                  lambda s, q: 4 if s else (64 if q else 128),
                  lambda s: (3, 32, 32) if s else (3, 224, 224), "class", True, True),
    "vit-s": (_timm_model("vit_small_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2,
                                                    "num_classes": 10}),
              lambda s, q: 4 if s else (64 if q else 128),
              lambda s: (3, 32, 32) if s else (3, 224, 224), "class", True, False),
    "llama": (lambda s: Llama(128, 64, 2, 4, 172) if s else Llama(),
              lambda s, q: 2 if s else (1 if q else 2),
              lambda s: (32,) if s else (2048,), "tokens", True, False),
}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def run_model(name: str, device: torch.device, small: bool, quick: bool, steps: int, warmup: int,
              zoo: bool, seed: int, batch: int = 0) -> dict:
    build, batch_of, shape_of, target, amp, channels_last = MODELS[name]
    amp = amp and device.type == "cuda"
    torch.manual_seed(seed)
    model, source = _zoo(name) if (zoo and not small) else (None, None)
    if model is None:
        model, source = build(small), ("timm" if name in TIMM_MODELS else "bench/e2e.py")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()

    batch, shape = batch or batch_of(small, quick), shape_of(small)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    data = []
    for _ in range(4):  # a few distinct batches, cycled; the same for both variants
        if target == "tokens":
            x = torch.randint(0, _classes(model), (batch, *shape), generator=g, device=device)
            y = torch.randint(0, _classes(model), (batch, *shape), generator=g, device=device)
            data.append((x, y))
            continue
        x = torch.randn((batch, *shape), generator=g, device=device).contiguous(memory_format=fmt)
        if target == "class":
            y = torch.randint(0, _classes(model), (batch,), generator=g, device=device)
        else:
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out_shape = model(x).shape
            y = torch.randn(out_shape, generator=g, device=device)
        data.append((x, y))
    # the copy is made after the forward above: any state it changed is in both variants
    fast = fastnorm.convert(copy.deepcopy(model))
    n_fused = fuse_add_norms(fast)  # the Llama stack's residual adds into fastnorm's add_rms_norm
    variants = {"torch": model, "fastnorm": fast}
    n_norm = len(fastnorm.converted_modules(fast)) + n_fused
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}

    def step(m, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = m(x)
        if target == "tokens":
            loss = F.cross_entropy(out.float().flatten(0, -2), y.flatten())
        elif target == "class":
            loss = F.cross_entropy(out.float(), y)
        else:
            loss = F.mse_loss(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {k: [] for k in variants}
    losses = {k: [] for k in variants}
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        for k, m in variants.items():
            sync()
            t = time.perf_counter()
            loss = step(m, opts[k], x, y)
            sync()
            if i >= warmup:
                times[k].append((time.perf_counter() - t) * 1e3)
            losses[k].append(loss.item())  # after the timer: a sync of its own
    t_ms = {k: statistics.median(v) for k, v in times.items()}
    diffs = [abs(a - b) for a, b in zip(losses["torch"], losses["fastnorm"])]
    return {"model": name, "source": source, "batch": batch, "input": "x".join(map(str, shape)),
            "amp": "bf16" if amp else "off", "channels_last": channels_last,
            "steps": steps, "warmup": warmup, "norm_layers": n_norm,
            "torch_step_ms": t_ms["torch"], "fastnorm_step_ms": t_ms["fastnorm"],
            "speedup": t_ms["torch"] / t_ms["fastnorm"],
            "loss_torch": losses["torch"][-1], "loss_fastnorm": losses["fastnorm"][-1],
            "loss_absdiff": diffs[-1], "max_loss_absdiff": max(diffs)}


COLUMNS = ["timestamp", "run_id", "device", "device_name", "torch", "cuda", "fastnorm_commit",
           "ext_loaded", "model", "source", "batch", "input", "amp", "channels_last", "steps",
           "warmup", "norm_layers", "torch_step_ms", "fastnorm_step_ms", "speedup", "loss_torch",
           "loss_fastnorm", "loss_absdiff", "max_loss_absdiff"]


def append_row(r: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = csv_is_new(path, COLUMNS)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps; on a CPU small versions of the models, on a GPU smaller batches")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 50; --quick 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS),
                    help="default: all (the timm models only when timm is installed)")
    ap.add_argument("--size", choices=("small", "full"),
                    help="model size (default: full on a GPU, small on a CPU)")
    ap.add_argument("--batch", type=int, help="batch size (default: per model)")
    ap.add_argument("--threads", type=int, help="CPU: torch threads (as bench/run.py)")
    ap.add_argument("--zoo", action="store_true",
                    help="torchvision's resnet50 and timm's vit_base_patch16_224 when importable")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "e2e.csv"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = [m for m in MODELS if m not in TIMM_MODELS or has_timm()]
        if "convnext" not in args.models:
            print("e2e: timm is not installed: " + ", ".join(TIMM_MODELS) + " left out")

    has_gpu = torch.cuda.is_available()
    dev_type = args.device or ("cuda" if has_gpu else "cpu")
    if dev_type == "cuda" and not has_gpu:
        print("e2e: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    device = torch.device(dev_type)
    small = (args.size or ("full" if dev_type == "cuda" else "small")) == "small"
    steps = args.steps or (10 if args.quick else 50)
    if dev_type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        if not has_gpu:
            print("=" * 78 + "\nNO GPU FOUND: end-to-end steps on the CPU, float32 (no autocast);\n"
                  "fastnorm runs its reference CPU path. Not a measure of the CUDA kernels.\n" + "=" * 78)
        print("e2e: " + set_cpu_threads(args.threads))
    csv_is_new(args.out, COLUMNS)  # before any work: refuse a file with other columns
    now = dt.datetime.now()
    name = device_name(device)
    meta = {"timestamp": now.isoformat(timespec="seconds"), "run_id": now.strftime("%Y%m%d-%H%M%S"),
            "device": dev_type, "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "fastnorm_commit": fastnorm_commit(),
            "ext_loaded": fastnorm._ext.loaded}
    print(f"e2e: {name}; torch {meta['torch']}; fastnorm {meta['fastnorm_commit']}: "
          f"{fastnorm_path(device)}; {'small' if small else 'full-size'} models, "
          f"{args.warmup} + {steps} steps each")

    rows: List[dict] = []
    for m in args.models:
        t = time.perf_counter()
        try:
            r = {**meta, **run_model(m, device, small, args.quick, steps, args.warmup, args.zoo,
                                     args.seed, args.batch)}
        except Exception as e:  # one model failing does not stop the others
            print(f"e2e: {m} FAILED: {type(e).__name__}: {e}")
            continue
        finally:
            if dev_type == "cuda":
                torch.cuda.empty_cache()
        rows.append(r)
        append_row(r, args.out)  # as we go: a run cut short (a step's time limit) keeps its rows
        print(f"  {m:<9} torch {r['torch_step_ms']:8.2f} ms  fastnorm {r['fastnorm_step_ms']:8.2f} ms"
              f"  x{r['speedup']:.3f}  |dloss| {r['loss_absdiff']:.2e}  ({time.perf_counter() - t:.0f} s)",
              flush=True)

    if rows:
        print(f"e2e: {len(rows)} rows appended to {args.out}")
    print(f"\n## end to end on {'CPU (no GPU found)' if not has_gpu else name}, "
          f"{'small' if small else 'full-size'} models: "
          f"median training-step time over {steps} steps\n")
    print("| model | source | batch x input | amp | channels_last | norm layers | torch ms | "
          "fastnorm ms | speed-up | loss torch | loss fastnorm | abs diff (max over steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['source']} | {r['batch']}x{r['input']} | {r['amp']} | "
              f"{'yes' if r['channels_last'] else 'no'} | {r['norm_layers']} | "
              f"{r['torch_step_ms']:.2f} | {r['fastnorm_step_ms']:.2f} | {r['speedup']:.3f} | "
              f"{r['loss_torch']:.5f} | {r['loss_fastnorm']:.5f} | {r['loss_absdiff']:.2e} "
              f"({r['max_loss_absdiff']:.2e}) |")
    return 0 if len(rows) == len(args.models) else 1


if __name__ == "__main__":
    sys.exit(main())
