"""fastnorm microbenchmarks: forward, backward and forward+backward of every case (bench/cases.py)
for fastnorm, PyTorch eager and torch.compile (and Apex / Liger when importable); the eager and
compiled baselines of LayerNorm2d and FrozenBatchNorm2d are timm's and torchvision's layers, that
of the fused residual add + RMSNorm the unfused add and F.rms_norm, those of the norm +
activation cases (batch_norm+silu, group_norm+silu, ...) timm's BatchNormAct2d / GroupNormAct, and
those of the modulated norms (AdaLN, AdaLN-Zero's gated residual) diffusers' spelling of them.

    python bench/run.py [--quick] [--device cpu|cuda] [--ops ...] [--dtype ...]
                        [--providers ...] [--out FILE] [--compare FILE] [--budget SECONDS]

bench/README.md says what is measured and how. Rows are appended to --out (CSV) case by case,
plots go next to it, and a markdown table is printed last.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import fastnorm  # noqa: E402
from cases import DTYPES, OPS, Case, select, streams  # noqa: E402

PASSES = ("fwd", "bwd", "fwdbwd")
CORE_PROVIDERS = ("fastnorm", "eager", "compile")
EXTRA_PROVIDERS = ("apex", "liger")
COLUMNS = ["timestamp", "run_id", "device", "device_name", "torch", "cuda", "fastnorm_commit",
           "ext_loaded", "op", "case", "shape", "dtype", "layout", "pass", "provider",
           "median_ms", "p20_ms", "p80_ms", "reps", "gbps", "frac_of_copy", "copy_gbps",
           "peak_mem_mb", "speedup_vs_eager", "speedup_vs_compile", "maxdiff_y", "maxdiff_dx",
           "correct"]
# |out - ref| <= TOL * (1 + |ref|) elementwise for y and dx, ref = the torch layer in float64
TOL = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}


# ----------------------------------------------------------------------------------------------
# the one timing function and the one bytes function
# ----------------------------------------------------------------------------------------------
class Timer:
    """Times a callable: warm-up, then `reps` calls (enough for ~target_ms, within bounds), each
    preceded by a cache flush (a buffer of twice the L2 on a GPU, of the last-level cache on a
    CPU, is written) and timed alone: CUDA events around the call on a GPU, perf_counter on a CPU
    (where the call is synchronous). Returns the per-call times in ms and the peak memory above
    what was allocated before (CUDA only; NaN on a CPU)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            cache = torch.cuda.get_device_properties(device).L2_cache_size
        else:
            cache = _cpu_llc_bytes()
        self.flush_buf = torch.empty(2 * cache // 4, dtype=torch.float32, device=device)
        # total time to spend timing one callable, and the bounds on the repetitions
        self.target_ms = (60 if quick else 250) if self.cuda else (150 if quick else 400)
        self.min_reps, self.max_reps = (10, 400) if self.cuda else (5, 25)

    def flush(self) -> None:
        if self.cuda:
            self.flush_buf.fill_(1.0)  # writes evict L2
        else:
            self.flush_buf.add_(1.0)  # read and write: evicts the CPU's caches more surely

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[object], object], setup: Optional[Callable[[], object]] = None):
        """fn(setup()) is timed; setup (untimed, before the flush) prepares what fn consumes."""
        def call():
            return fn(setup() if setup else None)

        # warm-up (compilation, autotuning, allocator) and an estimate of one call
        for _ in range(2):
            call()
        self.sync()
        t0, n = time.perf_counter(), 0
        while n < 3 or (time.perf_counter() - t0) < 0.02:
            self.flush()
            call()
            n += 1
            self.sync()
        est_ms = max((time.perf_counter() - t0) * 1e3 / n, 1e-3)
        reps = int(min(self.max_reps, max(self.min_reps, self.target_ms / est_ms)))

        times: List[float] = []
        peak = 0
        if self.cuda:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
            for start, end in ev:
                arg = setup() if setup else None
                # the allocator's statistics are kept on the host, in enqueue order: no sync needed
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self.flush()
                start.record()
                fn(arg)
                end.record()
                del arg
                peak = max(peak, torch.cuda.max_memory_allocated(self.device) - base)
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in ev]
        else:
            for _ in range(reps):
                arg = setup() if setup else None
                self.flush()
                t = time.perf_counter()
                fn(arg)
                times.append((time.perf_counter() - t) * 1e3)
                del arg
        return times, (peak / 2**20 if self.cuda else float("nan"))


def min_bytes(numel: int, itemsize: int, pass_: str, op: str = "layer_norm") -> int:
    """The fewest bytes a pass must move: each x-sized input read once, each x-sized output
    written once (cases.STREAMS: fwd reads x and writes y; bwd reads x and dy and writes dx;
    fwdbwd is both; add_rms_norm and frozen_batch_norm have their own counts). Parameters,
    statistics and parameter gradients are left out (they are per-channel or per-row: small)."""
    return numel * itemsize * streams(op, pass_)


def quantiles(times: List[float]):
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]  # median, p20, p80


def _cpu_llc_bytes() -> int:
    for idx in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{idx}/size") as f:
                s = f.read().strip()
            return int(s[:-1]) * {"K": 2**10, "M": 2**20}[s[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return 32 * 2**20


def copy_bandwidth(timer: Timer) -> float:
    """GB/s of dst.copy_(src) on the device, counting bytes read plus written (2 x size).
    1 GiB on a GPU (well past any L2), 256 MiB on a CPU."""
    nbytes = 2**30 if timer.cuda else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).uniform_()
    dst = torch.empty_like(src)
    times, _ = timer(lambda _: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
def _copy_affine(dst: torch.nn.Module, src: torch.nn.Module) -> torch.nn.Module:
    dst = dst.to(src.weight.device, src.weight.dtype)
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)
    return dst.train()


def make_provider(name: str, case: Case, ref: torch.nn.Module) -> torch.nn.Module:
    """A module computing the case's layer with `ref`'s parameters and state. Raises
    ImportError/RuntimeError when the provider cannot run the case."""
    if name == "eager":
        return copy.deepcopy(ref)
    if name == "fastnorm":
        return case.fastnorm_module(ref)  # convert() of ref, or fastnorm's fused op
    if name == "compile":
        torch._dynamo.reset()  # a fresh cache: the torch.nn forward code is shared by all cases
        return torch.compile(copy.deepcopy(ref), dynamic=False)
    if name == "apex":
        if case.op != "layer_norm":
            raise RuntimeError("apex: LayerNorm only")
        from apex.normalization import FusedLayerNorm
        return _copy_affine(FusedLayerNorm(ref.normalized_shape, eps=ref.eps), ref)
    if name == "liger":
        if case.act is not None:
            raise RuntimeError("liger: no norm + activation layer")
        if case.op == "layer_norm":
            from liger_kernel.transformers import LigerLayerNorm
            return _copy_affine(LigerLayerNorm(ref.normalized_shape[0], eps=ref.eps, bias=True), ref)
        if case.op == "group_norm" and case.layout == "contiguous":
            from liger_kernel.transformers import LigerGroupNorm
            return _copy_affine(LigerGroupNorm(ref.num_channels, ref.num_groups, eps=ref.eps,
                                               bias=True), ref)
        if case.op in ("rms_norm", "llama_rms_norm", "gemma_rms_norm"):
            # Liger's casting modes: "llama" rounds the normalised value before the weight,
            # "gemma" computes in float32 with (offset + w); torch's rms_norm is Gemma's without
            # the offset (everything in float32, one rounding)
            from liger_kernel.transformers import LigerRMSNorm
            gemma = case.op == "gemma_rms_norm"
            eps = getattr(ref, "variance_epsilon", getattr(ref, "eps", 1e-6))
            m = LigerRMSNorm(case.channels, eps=eps, offset=1.0 if gemma else 0.0,
                             casting_mode="llama" if case.op == "llama_rms_norm" else "gemma",
                             init_fn="zeros" if gemma else "ones")
            return _copy_affine(m, ref)
        raise RuntimeError("liger: LayerNorm, NCHW GroupNorm and RMSNorm only")
    raise ValueError(name)


def available_extras(device: torch.device) -> List[str]:
    out = []
    if device.type != "cuda":
        return out
    for name, module in (("apex", "apex.normalization"), ("liger", "liger_kernel.transformers")):
        try:
            __import__(module)
            out.append(name)
        except Exception:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: torch.device, seed: int):
    """The layer's inputs and the gradients of its outputs, in the case's layout: x random (mean
    0.3, std 1.5: not centred, not unit), dy ~ N(0, 1); add_rms_norm also takes a residual
    (N(0, 1)) and gets a gradient of residual_out (N(0, 1)); adain takes a style (N(0, 1)) and
    returns one output; the modulated norms then take case.n_mods per-sample modulations [B, D]
    (N(0, 0.5^2): an adaLN linear's chunks). Returns (inputs, grads), tuples of case.n_inputs +
    case.n_mods and case.n_outputs tensors; the inputs require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    fmt = case.memory_format()
    x = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32) * 1.5 + 0.3
    dy = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32)
    inputs, grads = [x], [dy]
    if case.n_inputs == 2:
        inputs.append(torch.randn(case.shape, generator=g, device=device, dtype=torch.float32))
    if case.n_outputs == 2:
        grads.append(torch.randn(case.shape, generator=g, device=device, dtype=torch.float32))
    for _ in range(case.n_mods):
        inputs.append(torch.randn((case.shape[0], case.shape[-1]), generator=g, device=device,
                                  dtype=torch.float32) * 0.5)
    inputs = tuple(t.to(dtype).contiguous(memory_format=fmt).requires_grad_(True) for t in inputs)
    grads = tuple(t.to(dtype).contiguous(memory_format=fmt) for t in grads)
    return inputs, grads


def _outputs(y) -> tuple:
    return (y,) if isinstance(y, torch.Tensor) else tuple(y)


def pass_fns(m: torch.nn.Module, inputs, grads):
    """pass -> (fn, setup) for Timer. fwd: a training forward (grad enabled, as in a training
    step); bwd: the backward alone, of a forward run untimed just before (setup); fwdbwd: both.
    Gradients of the inputs and the parameters that require grad are returned, not accumulated
    into .grad; every output gets its gradient (add_rms_norm: output and residual_out)."""
    inputs, grads = _as_tuple(inputs), _as_tuple(grads)
    wrt = list(inputs) + [p for p in m.parameters() if p.requires_grad]
    return {
        "fwd": (lambda _: m(*inputs), None),
        "bwd": (lambda y: torch.autograd.grad(_outputs(y), wrt, grads), lambda: m(*inputs)),
        "fwdbwd": (lambda _: torch.autograd.grad(_outputs(m(*inputs)), wrt, grads), None),
    }


def _as_tuple(t) -> tuple:
    return (t,) if isinstance(t, torch.Tensor) else tuple(t)


def reference(ref: torch.nn.Module, inputs, grads):
    """The outputs and the inputs' gradients of one training step of the reference layer in
    float64 on contiguous inputs: the yardstick for every provider, eager included (eager in the
    case's layout can be wrong: torch 2.14's CPU InstanceNorm backward is, for N=1 with a
    channels_last dy). Returns (outputs, input gradients), tuples."""
    m = copy.deepcopy(ref).double()
    x64 = tuple(t.detach().double().contiguous().requires_grad_(True) for t in _as_tuple(inputs))
    ys = _outputs(m(*x64))
    dxs = torch.autograd.grad(ys, x64, tuple(g.double().contiguous() for g in _as_tuple(grads)))
    return tuple(y.detach() for y in ys), dxs


def check(case: Case, m: torch.nn.Module, ref_out, inputs, grads):
    """max |y - y_ref| over the outputs and max |dx - dx_ref| over the inputs' gradients of one
    training step, and whether all are finite and within TOL of the float64 reference."""
    inputs, grads = _as_tuple(inputs), _as_tuple(grads)
    ys = _outputs(m(*inputs))
    dxs = torch.autograd.grad(ys, inputs, grads)
    tol = TOL[case.dtype]
    diffs, ok = [0.0, 0.0], True
    for i, (got, want) in enumerate(((ys, ref_out[0]), (dxs, ref_out[1]))):
        assert len(got) == len(want), f"{len(got)} tensors where the reference has {len(want)}"
        for a, b in zip(got, want):
            d = (a.detach().double() - b).abs()
            diffs[i] = max(diffs[i], d.max().item() if d.numel() else 0.0)
            ok &= bool((d <= tol * (1 + b.abs())).all())  # NaN fails
    return diffs[0], diffs[1], ok


def bench_case(case: Case, providers: List[str], timer: Timer, meta: dict, copy_gbps: float,
               seed: int) -> List[dict]:
    dev = timer.device
    torch.manual_seed(seed)
    ref = case.module().to(dev)
    inputs, grads = make_inputs(case, dev, seed)
    numel, itemsize = inputs[0].numel(), inputs[0].element_size()
    # correctness first, each provider on a fresh copy of the same state
    ref_out = reference(ref, inputs, grads)
    results: Dict[str, dict] = {}
    for p in providers:
        m = fns = None
        try:
            m = make_provider(p, case, ref)
            diff_y, diff_dx, ok = check(case, m, ref_out, inputs, grads)
            if not ok:
                print(f"  MISMATCH {p} against float64: max|y-y_ref| {diff_y:.3g}, "
                      f"max|dx-dx_ref| {diff_dx:.3g} (tolerance {TOL[case.dtype]} x (1+|ref|))")
            fns = pass_fns(m, inputs, grads)
            for pass_ in PASSES:
                times, peak = timer(*fns[pass_])
                results[(p, pass_)] = dict(times=times, peak=peak, diff_y=diff_y,
                                           diff_dx=diff_dx, ok=ok)
        except Exception as e:  # a provider that cannot run a case is skipped, loudly
            print(f"  {p}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if os.environ.get("FASTNORM_BENCH_TRACE"):
                traceback.print_exc()
        finally:
            del m, fns
            if timer.cuda:
                torch.cuda.empty_cache()
    rows = []
    for (p, pass_), r in results.items():
        med, p20, p80 = quantiles(r["times"])
        gbps = min_bytes(numel, itemsize, pass_, case.op) / (med * 1e-3) / 1e9
        def speedup(peer):
            other = results.get((peer, pass_))
            return statistics.median(other["times"]) / med if other else float("nan")
        rows.append({
            **meta, "op": case.op, "case": case.name, "shape": "x".join(map(str, case.shape)),
            "dtype": case.dtype, "layout": case.layout, "pass": pass_, "provider": p,
            "median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": len(r["times"]),
            "gbps": gbps, "frac_of_copy": gbps / copy_gbps, "copy_gbps": copy_gbps,
            "peak_mem_mb": r["peak"], "speedup_vs_eager": speedup("eager"),
            "speedup_vs_compile": speedup("compile"), "maxdiff_y": r["diff_y"],
            "maxdiff_dx": r["diff_dx"], "correct": r["ok"],
        })
    return rows


# ----------------------------------------------------------------------------------------------
# run description, output
# ----------------------------------------------------------------------------------------------
def fastnorm_commit() -> str:
    """$FASTNORM_COMMIT, else git's HEAD (-dirty), else the commit setup.py recorded."""
    if os.environ.get("FASTNORM_COMMIT"):
        return os.environ["FASTNORM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
            return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # a copy of the tree without .git: the commit setup.py recorded when it built
    return fastnorm._ext.build_info().get("commit", "unknown") + " (build record)"


def set_cpu_threads(threads: Optional[int]) -> str:
    """torch's threads for CPU timing: `threads`, else torch's default, or 1 when the machine is
    busy (load average >= 1): a parallel region waits for its slowest thread, and on a shared
    machine that is a descheduled one (time slices of several ms). Returns a line to print."""
    load = os.getloadavg()[0]
    busy = not threads and load >= 1.0
    torch.set_num_threads(threads or (1 if busy else torch.get_num_threads()))
    return (f"CPU load average {load:.1f} on {os.cpu_count()} cores; {torch.get_num_threads()} "
            f"thread(s)" + (" (the machine is busy: one thread; --threads overrides)" if busy else ""))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def fastnorm_path(device: torch.device) -> str:
    if device.type != "cuda":
        return "reference (ATen) CPU path"
    from fastnorm.info import cuda_kernel_registered
    from fastnorm.ops import OP_NAMES
    n = sum(cuda_kernel_registered(op) for op in OP_NAMES)
    if n == len(OP_NAMES):
        return "compiled CUDA kernels"
    return (f"WARNING: {len(OP_NAMES) - n} of {len(OP_NAMES)} ops run the reference (ATen) path "
            f"(extension loaded: {fastnorm._ext.loaded}; {fastnorm._ext.load_error or ''})")


def csv_is_new(path: str, columns: List[str] = COLUMNS) -> bool:
    """True for a file to create; False for one to append to (same columns); exits otherwise."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    with open(path, newline="") as f:
        if next(csv.reader(f), []) != columns:
            raise SystemExit(f"{path} has other columns; choose another file with --out")
    return False


def append_csv(rows: List[dict], path: str) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = csv_is_new(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _key(r: dict):
    return (r["op"], r["case"], r["shape"], r["dtype"], r["layout"], r["pass"])


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def markdown(rows: List[dict], providers: List[str]) -> str:
    """One line per case and pass: each provider's median (us) and fraction of copy bandwidth,
    fastnorm's speed-ups, and which providers missed the float64 reference."""
    by = {}
    for r in rows:
        by.setdefault(_key(r), {})[r["provider"]] = r
    head = ["case", "shape", "dtype", "layout", "pass"]
    for p in providers:
        head += [f"{p} us", f"{p} %copy"]
    head += ["x eager", "x compile", "correct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, prov in by.items():
        op, case, shape, dtype, layout, pass_ = key
        cells = [f"{op}/{case}", shape, dtype, "cl" if layout == "channels_last" else "-", pass_]
        for p in providers:
            r = prov.get(p)
            cells += ([f"{r['median_ms'] * 1e3:.1f}", f"{100 * r['frac_of_copy']:.0f}%"]
                      if r else ["-", "-"])
        f = prov.get("fastnorm")
        wrong = [p for p, r in prov.items() if not r["correct"]]
        cells += [_fmt(f["speedup_vs_eager"]) if f else "-", _fmt(f["speedup_vs_compile"]) if f else "-",
                  f"**NO: {','.join(wrong)}**" if wrong else "yes"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: List[dict], providers: List[str], outdir: str, tag: str, title: str) -> List[str]:
    """<tag>_frac.png: fraction of copy bandwidth per case and provider; <tag>_speedup.png:
    fastnorm's speed-up over each peer. One panel per pass."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        print("plots: matplotlib is not installed; no PNGs written")
        return []
    cases = list(dict.fromkeys(_key(r)[:5] for r in rows))
    labels = [f"{op}/{c} {d}{' cl' if lay == 'channels_last' else ''}"
              for op, c, _, d, lay in cases]
    idx = {k: i for i, k in enumerate(cases)}
    h = 1.5 + 0.28 * len(cases)
    written = []
    peers = [p for p in providers if p != "fastnorm"]
    for kind, series, xlabel in (
            ("frac", providers, "fraction of device-to-device copy bandwidth"),
            ("speedup", peers, "fastnorm speed-up (peer time / fastnorm time)")):
        if kind == "speedup" and not peers:
            continue
        fig, axes = plt.subplots(1, len(PASSES), figsize=(6 + 3.2 * len(PASSES), h),
                                 sharey=True, squeeze=False)
        width = 0.8 / max(1, len(series))
        for ax, pass_ in zip(axes[0], PASSES):
            for j, s in enumerate(series):
                ys, vals = [], []
                for r in rows:
                    if r["pass"] != pass_:
                        continue
                    if kind == "frac" and r["provider"] == s:
                        v = r["frac_of_copy"]
                    elif kind == "speedup" and r["provider"] == "fastnorm":
                        v = r[f"speedup_vs_{s}"] if s in ("eager", "compile") else _peer_speedup(rows, r, s)
                    else:
                        continue
                    if v is not None and not math.isnan(v):
                        ys.append(idx[_key(r)[:5]] + (j - (len(series) - 1) / 2) * width)
                        vals.append(v)
                if kind == "frac":
                    ax.barh(ys, vals, height=width, label=s)
                else:  # bars from 1 on a log scale: right is faster, left slower
                    ax.barh(ys, [v - 1 for v in vals], left=1, height=width, label=f"vs {s}")
            if kind == "speedup":
                ax.axvline(1.0, color="k", lw=0.8)
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(FixedLocator([2.0**k for k in range(-6, 7)]))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(pass_)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(range(len(cases)))
        axes[0][0].set_yticklabels(labels, fontsize=7)
        axes[0][0].invert_yaxis()
        axes[0][-1].legend(fontsize=8, loc="lower right")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(outdir, f"{tag}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _peer_speedup(rows: List[dict], fast: dict, peer: str) -> float:
    for r in rows:
        if r["provider"] == peer and _key(r) == _key(fast):
            return r["median_ms"] / fast["median_ms"]
    return float("nan")


def compare(rows: List[dict], path: str, threshold: float = 0.05) -> str:
    """fastnorm medians of this run against the latest earlier run on the same device (name) in
    `path`: the cases and passes slower by more than `threshold`."""
    if not rows:
        return "compare: nothing was measured"
    with open(path, newline="") as f:
        stored = [r for r in csv.DictReader(f) if r["provider"] == "fastnorm"
                  and r["device_name"] == rows[0]["device_name"] and r["run_id"] != rows[0]["run_id"]]
    if not stored:
        return f"compare: no earlier fastnorm run on {rows[0]['device_name']} in {path}"
    last = max(r["run_id"] for r in stored)
    base = {_key(r): r for r in stored if r["run_id"] == last}
    lines = [f"compare: against run {last} (fastnorm {base[next(iter(base))]['fastnorm_commit']}) "
             f"in {path}"]
    worse, n = [], 0
    for r in rows:
        b = base.get(_key(r))
        if r["provider"] != "fastnorm" or b is None:
            continue
        n += 1
        ratio = r["median_ms"] / float(b["median_ms"])
        if ratio > 1 + threshold:
            worse.append((ratio, r, b))
    for ratio, r, b in sorted(worse, key=lambda t: -t[0]):
        lines.append(f"  REGRESSED {100 * (ratio - 1):+.1f}%  {r['op']}/{r['case']} {r['shape']} "
                     f"{r['dtype']} {r['layout']} {r['pass']}: {float(b['median_ms']) * 1e3:.1f} us "
                     f"-> {r['median_ms'] * 1e3:.1f} us")
    lines.append(f"compare: {len(worse)} of {n} matched fastnorm timings regressed by more than "
                 f"{100 * threshold:.0f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def _planner():
    """tools/plan.py and the emulation build it runs the host wrappers in (built when missing)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import plan as planner  # noqa: E402  (tools/plan.py)
    from cuda_emu import emu as emu_mod  # noqa: E402

    emu = emu_mod.load("plain")
    emu.use_resource_report()  # the H100's occupancy answers when the CUDA build's report exists
    return planner, emu


def case_plans(cases) -> List[dict]:
    """tools/plan.py's plan and estimates of every case's forward and backward at its GPU shape
    (no GPU needed): one dict per case (plan.estimate()'s, plus the case's name); a case the
    planner cannot run carries its error instead."""
    planner, emu = _planner()
    res = planner._resources()
    out = []
    for case in cases:
        groups = 32 if case.op == "group_norm" else 1
        head = {"op": case.op, "case": case.name, "shape": "x".join(map(str, case.shape)),
                "dtype": case.dtype, "layout": case.layout}
        try:
            est = planner.plan_case(emu, case.op, case.shape, DTYPES[case.dtype],
                                    "channels_last" if case.layout != "contiguous" else "contiguous",
                                    groups, True, res)
        except Exception as e:  # a new op or kernel the planner does not know: say so, go on
            out.append({**head, "error": f"{type(e).__name__}: {e}"})
            continue
        est.update(head)
        out.append(est)
    return out


def print_plans(cases, json_path: Optional[str] = None) -> int:
    """The launch plan of every case's forward and backward at its GPU shape, with the estimated
    bytes moved, passes over memory and bytes in flight (tools/plan.py; no GPU needed)."""
    planner, _ = _planner()
    res = planner._resources()
    plans = case_plans(cases)
    print(planner.legend(res))
    for case, est in zip(cases, plans):
        print(f"\n{case.label} {est['shape']}")
        print(f"plan failed: {est['error']}" if "error" in est else planner.report(est, res))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"sms": planner.SMS, "little_bytes_per_sm": planner.LITTLE_BYTES_PER_SM,
                       "legend": planner.legend(res), "cases": plans}, f, indent=1)
        print(f"\nplan: wrote {json_path}")
    return 1 if any("error" in p for p in plans) else 0


PLAN_COLUMNS = ["run_id", "device_name", "fastnorm_commit", "op", "case", "shape", "dtype", "layout",
                "pass", "launches", "kernels", "est_bytes", "plan_min_bytes", "passes",
                "low_inflight", "median_ms", "p20_ms", "p80_ms", "bench_min_bytes",
                "measured_gbps", "est_gbps", "copy_gbps", "est_frac_of_copy"]


def plan_vs_measured(results_csv: str, plan_json: str, out_prefix: str) -> int:
    """Each measured fastnorm case and pass next to its plan: <out_prefix>.csv (one row per case
    and pass: estimated bytes, passes, launches flagged low in flight, the measured median and
    GB/s, and est_gbps = estimated bytes / median, the rate the kernels moved memory at if the
    model is right) and <out_prefix>.json (the same with each launch's plan line)."""
    with open(plan_json) as f:
        plans = {(p["op"], p["case"], p["shape"], p["dtype"], p["layout"]): p
                 for p in json.load(f)["cases"]}
    with open(results_csv, newline="") as f:
        measured = [r for r in csv.DictReader(f) if r["provider"] == "fastnorm"]
    if not measured:
        print(f"plan: no fastnorm rows in {results_csv}")
        return 1
    last = max(r["run_id"] for r in measured)
    rows, records, missing = [], [], 0
    for r in measured:
        if r["run_id"] != last:
            continue
        p = plans.get((r["op"], r["case"], r["shape"], r["dtype"], r["layout"]))
        if p is None or "error" in p:
            missing += 1
            continue
        t = p["passes"][r["pass"]]
        med = float(r["median_ms"])
        est = t["est_bytes"]
        est_gbps = est / (med * 1e-3) / 1e9 if est is not None and med > 0 else None
        copy = float(r["copy_gbps"])
        launches = [ln for ln in p["launches"] if r["pass"] == "fwdbwd" or ln["pass"] == r["pass"]]
        row = {"run_id": r["run_id"], "device_name": r["device_name"],
               "fastnorm_commit": r["fastnorm_commit"], "op": r["op"], "case": r["case"],
               "shape": r["shape"], "dtype": r["dtype"], "layout": r["layout"], "pass": r["pass"],
               "launches": len(launches), "kernels": "; ".join(ln["kernel"] for ln in launches),
               "est_bytes": est, "plan_min_bytes": t["min_bytes"], "passes": t["passes"],
               "low_inflight": "; ".join(t["low"]), "median_ms": med, "p20_ms": r["p20_ms"],
               "p80_ms": r["p80_ms"],
               "bench_min_bytes": min_bytes(math.prod(int(v) for v in r["shape"].split("x")),
                                            torch.empty((), dtype=DTYPES[r["dtype"]]).element_size(),
                                            r["pass"], r["op"]),
               "measured_gbps": float(r["gbps"]), "est_gbps": est_gbps, "copy_gbps": copy,
               "est_frac_of_copy": est_gbps / copy if est_gbps is not None and copy else None}
        rows.append(row)
        records.append({**row, "plan": launches})
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PLAN_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                        for k, v in row.items()})
    with open(out_prefix + ".json", "w") as f:
        json.dump({"results": results_csv, "plan": plan_json, "rows": records}, f, indent=1)
    print(f"plan: {len(rows)} measured case passes of run {last} next to their plans in "
          f"{out_prefix}.csv and .json" + (f"; {missing} without a plan" if missing else ""))
    for row in rows:
        frac = row["est_frac_of_copy"]
        print(f"  {row['op']}/{row['case']} {row['dtype']} {row['layout']} {row['pass']:6} "
              f"{row['median_ms'] * 1e3:9.1f} us  passes {_fmt(row['passes'])}  "
              f"{row['measured_gbps']:7.0f} GB/s on the minimum, {_fmt(row['est_gbps'], 4)} GB/s "
              f"on the estimate ({'-' if frac is None else f'{100 * frac:.0f}%'} of copy)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the cases marked quick, first dtype, fewer reps")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    ap.add_argument("--ops", nargs="+", choices=OPS)
    ap.add_argument("--dtype", nargs="+", choices=tuple(DTYPES))
    ap.add_argument("--providers", nargs="+", choices=CORE_PROVIDERS + EXTRA_PROVIDERS,
                    help="default: fastnorm eager compile (+ apex/liger when importable); "
                         "on a CPU with --quick, without compile")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "results.csv"),
                    help="CSV to append to (default bench/results/results.csv); plots go beside it")
    ap.add_argument("--compare", metavar="FILE", help="a stored CSV: print what regressed by > 5%%")
    ap.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                    help="start no new case after this long (0: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int,
                    help="CPU: torch threads (default: torch's, or 1 when the load average is >= 1)")
    ap.add_argument("--plan", action="store_true",
                    help="print the kernels each case launches on an H100 with estimated bytes "
                         "moved, passes over memory and bytes in flight (tools/plan.py: the host "
                         "wrappers' own plans, run in the CPU emulation build), measure nothing")
    ap.add_argument("--plan-json", metavar="FILE",
                    help="with --plan: also write every case's plan as JSON; with --plan-join: "
                         "the plans to join (written by --plan --plan-json)")
    ap.add_argument("--plan-join", metavar="RESULTS_CSV",
                    help="put the latest run's fastnorm rows of RESULTS_CSV next to the plans of "
                         "--plan-json: writes --plan-out.csv and .json, measures nothing")
    ap.add_argument("--plan-out", metavar="PREFIX", default=None,
                    help="output prefix of --plan-join (default: beside RESULTS_CSV, "
                         "plan_vs_measured)")
    args = ap.parse_args(argv)
    if args.plan_join:
        if not args.plan_json:
            ap.error("--plan-join needs --plan-json FILE (bench/run.py --plan --plan-json FILE)")
        out = args.plan_out or os.path.join(os.path.dirname(os.path.abspath(args.plan_join)),
                                            "plan_vs_measured")
        return plan_vs_measured(args.plan_join, args.plan_json, out)
    if args.plan:
        return print_plans(select("cuda", args.quick, args.ops, args.dtype), args.plan_json)

    t_start = time.perf_counter()
    has_gpu = torch.cuda.is_available()
    dev_type = args.device or ("cuda" if has_gpu else "cpu")
    if dev_type == "cuda" and not has_gpu:
        print("bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    device = torch.device(dev_type)
    if not has_gpu:
        print("=" * 78 + "\nNO GPU FOUND: timing fastnorm's CPU path against torch's CPU path.\n"
              "These are CPU numbers; they say nothing about the CUDA kernels.\n" + "=" * 78)
    if dev_type == "cpu":
        print("bench: " + set_cpu_threads(args.threads))
    if args.providers:
        providers = list(args.providers)
    else:
        providers = list(CORE_PROVIDERS) + available_extras(device)
        if dev_type == "cpu" and args.quick:
            providers.remove("compile")
            print("bench: --quick on a CPU skips torch.compile (inductor's C++ build takes "
                  "~25 s per case here); run without --quick to include it")

    now = dt.datetime.now()
    name = device_name(device)
    meta = {"timestamp": now.isoformat(timespec="seconds"),
            "run_id": now.strftime("%Y%m%d-%H%M%S"), "device": dev_type, "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "fastnorm_commit": fastnorm_commit(), "ext_loaded": fastnorm._ext.loaded}
    csv_is_new(args.out)  # before any work: refuse a file with other columns
    cases = select(dev_type, args.quick, args.ops, args.dtype)
    if not cases:
        print("bench: no case matches", file=sys.stderr)
        return 2
    print(f"bench: {name}; torch {meta['torch']} (CUDA {meta['cuda']}); fastnorm "
          f"{meta['fastnorm_commit']}: {fastnorm_path(device)}")
    print(f"bench: {len(cases)} cases x {len(PASSES)} passes x providers {', '.join(providers)}"
          + (f"; shapes scaled to <= {max(math.prod(c.shape) for c in cases):,} elements, "
             f"{', '.join(sorted({c.dtype for c in cases}))}" if dev_type == "cpu" else ""))

    timer = Timer(device, args.quick)
    copy_gbps = copy_bandwidth(timer)
    print(f"bench: device-to-device copy {copy_gbps:.1f} GB/s (read + write); "
          f"cache flush buffer {timer.flush_buf.numel() * 4 / 2**20:.0f} MiB")

    rows: List[dict] = []
    skipped = []
    for i, case in enumerate(cases):
        if args.budget and time.perf_counter() - t_start > args.budget:
            skipped = cases[i:]
            break
        t = time.perf_counter()
        print(f"[{i + 1}/{len(cases)}] {case.label} {'x'.join(map(str, case.shape))}", flush=True)
        case_rows = bench_case(case, providers, timer, meta, copy_gbps, args.seed)
        append_csv(case_rows, args.out)  # as we go: a run cut short keeps what it measured
        rows += case_rows
        for r in case_rows:
            if r["provider"] == "fastnorm":
                print(f"    {r['pass']:<6} fastnorm {r['median_ms'] * 1e3:9.1f} us "
                      f"{r['gbps']:8.1f} GB/s {100 * r['frac_of_copy']:5.1f}% of copy  "
                      f"x{_fmt(r['speedup_vs_eager'])} eager  x{_fmt(r['speedup_vs_compile'])} "
                      f"compile  maxdiff y {r['maxdiff_y']:.2g} dx {r['maxdiff_dx']:.2g}")
        print(f"    ({time.perf_counter() - t:.1f} s)", flush=True)
    if skipped:
        print(f"bench: budget of {args.budget:.0f} s spent; skipped {len(skipped)} cases: "
              + ", ".join(c.label for c in skipped))

    outdir = os.path.dirname(os.path.abspath(args.out))
    tag = f"{meta['run_id']}_{dev_type}"
    title = (f"{name} | torch {meta['torch']} | fastnorm {meta['fastnorm_commit']} | "
             f"copy {copy_gbps:.0f} GB/s")
    for p in plots(rows, [p for p in providers if any(r["provider"] == p for r in rows)],
                   outdir, tag, title):
        print(f"bench: wrote {p}")
    print(f"bench: {len(rows)} rows appended to {args.out} "
          f"({time.perf_counter() - t_start:.0f} s)")
    bad = sorted({f"{r['op']}/{r['case']} {r['dtype']} {r['provider']}" for r in rows
                  if not r["correct"]})
    if args.compare:
        print(compare(rows, args.compare))
    print(f"\n## {'CPU (no GPU found)' if dev_type == 'cpu' else name}: median us and % of "
          f"copy bandwidth ({copy_gbps:.0f} GB/s); x = eager (compile) time / fastnorm time\n")
    print(markdown(rows, [p for p in providers if any(r["provider"] == p for r in rows)]))
    if bad:
        print("\nMISMATCH against the float64 reference: " + "; ".join(bad))
    return 1 if any(b.endswith(" fastnorm") for b in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
