"""fastnorm's CPU path against torch.nn's on the CPU, per call: small and medium shapes, where the
per-call overhead (Python checks, dispatch, autograd wrapping) is most of the time, plus the CPU
shapes of bench/run.py.

    python bench/cpu_overhead.py [--quick] [--rounds R] [--ops ...] [--cases NAME ...]
                                 [--out FILE] [--md FILE] [--no-run-shapes]

Method (bench/README.md): one thread (torch.set_num_threads(1)); for each case and pass the torch.nn
layer and the fastnorm layer (fastnorm.convert() of a deep copy: same parameters and state) are
called alternately, one timed call each, the order swapped every repetition; a round is N such
pairs, and the reported time of each is the minimum over R rounds of that round's median. The
ratio is fastnorm's time over torch.nn's. Inputs stay in cache (no flush: the point is the per-call
cost, and both layers get the same treatment).

Passes: `fwd` (training forward, grad enabled: the running statistics are updated), `fwdbwd`
(forward and torch.autograd.grad of x, weight and bias), and in eval mode `eval_fwd` (under
torch.no_grad: inference) and, for BatchNorm and InstanceNorm with running statistics, `eval_fwdbwd`
(frozen statistics, grad enabled: fine-tuning with frozen norm layers). LayerNorm and GroupNorm
have no eval mode of their own, so their eval row is the no-grad forward only.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fastnorm  # noqa: E402
from cases import select  # noqa: E402
from run import device_name, fastnorm_commit  # noqa: E402

COLUMNS = ["timestamp", "run_id", "device_name", "torch", "fastnorm_commit", "threads", "case",
           "module", "shape", "dtype", "pass", "torch_us", "fastnorm_us", "ratio", "rounds",
           "reps_per_round", "max_abs_diff"]
GOAL = 1.10


@dataclass(frozen=True)
class OverheadCase:
    name: str
    make: Callable[[], nn.Module]     # the torch.nn layer
    shape: Tuple[int, ...]
    stats: bool = False                # running statistics: eval differs from train
    source: str = "per-call overhead"  # where the shape comes from


def _bn(cls, c, **kw):
    return lambda: cls(c, **kw)


# The small and medium shapes where per-call overhead dominates, then InstanceNorm.
SMALL_CASES: List[OverheadCase] = [
    OverheadCase("LayerNorm 32x256", lambda: nn.LayerNorm(256), (32, 256)),
    OverheadCase("LayerNorm 2048x1024", lambda: nn.LayerNorm(1024), (2048, 1024)),
    OverheadCase("BatchNorm2d 8x64x28x28", _bn(nn.BatchNorm2d, 64), (8, 64, 28, 28), stats=True),
    OverheadCase("BatchNorm1d 64x128", _bn(nn.BatchNorm1d, 128), (64, 128), stats=True),
    OverheadCase("GroupNorm(8) 4x64x28x28", lambda: nn.GroupNorm(8, 64), (4, 64, 28, 28)),
    OverheadCase("GroupNorm(8) 2x32x8x8", lambda: nn.GroupNorm(8, 32), (2, 32, 8, 8)),
    OverheadCase("InstanceNorm2d 4x64x28x28", lambda: nn.InstanceNorm2d(64, affine=True),
                 (4, 64, 28, 28)),
    OverheadCase("InstanceNorm2d tracked 4x64x28x28",
                 lambda: nn.InstanceNorm2d(64, affine=True, track_running_stats=True),
                 (4, 64, 28, 28), stats=True),
]


def run_shapes(quick: bool) -> List[OverheadCase]:
    """bench/run.py's CPU cases (shapes scaled by cases.fit), float32, contiguous layout."""
    out = []
    for c in select("cpu", quick):
        # layer against layer: the cases where fastnorm's layer is convert() of the torch one
        # (the fused residual add takes two inputs and is a different module)
        if c.layout != "contiguous" or not c.drop_in:
            continue
        m = c.module().float()
        stats = c.op in ("batch_norm",)
        out.append(OverheadCase(f"run.py {c.op}/{c.name}", (lambda m=m: copy.deepcopy(m)),
                                tuple(c.shape), stats=stats, source="bench/run.py"))
    return out


def _randomise(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.normal_(0.0, 0.2)
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.normal_(0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return m


def passes(case: OverheadCase) -> List[str]:
    return ["fwd", "fwdbwd", "eval_fwd"] + (["eval_fwdbwd"] if case.stats else [])


def pass_fn(m: nn.Module, pass_: str, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    m.train(not pass_.startswith("eval"))
    wrt = [x] + [p for p in m.parameters() if p.requires_grad]
    if pass_ in ("fwd",):
        return lambda: m(x)
    if pass_ == "eval_fwd":
        def infer():
            with torch.no_grad():
                return m(x)
        return infer
    return lambda: torch.autograd.grad(m(x), wrt, dy)


def measure(a: Callable[[], object], b: Callable[[], object], rounds: int, target_s: float):
    """Interleaved timing of a and b: min over rounds of each round's median (seconds)."""
    for _ in range(3):  # warm-up: allocator, autograd graph caches
        a()
        b()
    t0 = time.perf_counter()
    for _ in range(3):
        a()
        b()
    per_pair = (time.perf_counter() - t0) / 3
    reps = int(min(400, max(7, target_s / max(per_pair, 1e-7))))
    best_a = best_b = math.inf
    pc = time.perf_counter
    for _ in range(rounds):
        ta, tb = [], []
        for i in range(reps):
            if i % 2:
                t = pc(); b(); tb.append(pc() - t)
                t = pc(); a(); ta.append(pc() - t)
            else:
                t = pc(); a(); ta.append(pc() - t)
                t = pc(); b(); tb.append(pc() - t)
        best_a = min(best_a, statistics.median(ta))
        best_b = min(best_b, statistics.median(tb))
    return best_a, best_b, reps


def max_diff(ref: nn.Module, fast: nn.Module, pass_: str, x, dy) -> float:
    """max |fastnorm - torch| over y and (for backward passes) dx, on fresh copies of the state."""
    r, f = copy.deepcopy(ref), copy.deepcopy(fast)
    outs = []
    for m in (r, f):
        fn = pass_fn(m, pass_, x, dy)
        out = fn()
        outs.append([out] if isinstance(out, torch.Tensor) else list(out))
    return max(float((p.detach().double() - q.detach().double()).abs().max())
               for p, q in zip(*outs))


def bench_case(case: OverheadCase, rounds: int, target_s: float, seed: int):
    torch.manual_seed(seed)
    ref = _randomise(case.make().float())
    fast = fastnorm.convert(copy.deepcopy(ref))
    assert fastnorm.converted_modules(fast), "convert() swapped nothing"
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(case.shape, generator=g) * 1.5 + 0.3).requires_grad_(True)
    dy = torch.randn(case.shape, generator=g)
    rows = []
    for pass_ in passes(case):
        diff = max_diff(ref, fast, pass_, x, dy)
        t_ref, t_fast, reps = measure(pass_fn(ref, pass_, x, dy), pass_fn(fast, pass_, x, dy),
                                      rounds, target_s)
        rows.append({"case": case.name, "module": type(ref).__name__,
                     "shape": "x".join(map(str, case.shape)), "dtype": "fp32", "pass": pass_,
                     "torch_us": t_ref * 1e6, "fastnorm_us": t_fast * 1e6,
                     "ratio": t_fast / t_ref, "rounds": rounds, "reps_per_round": reps,
                     "max_abs_diff": diff})
    return rows


def write_csv(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            if next(csv.reader(f), []) != COLUMNS:
                raise SystemExit(f"{path} has other columns; choose another file with --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def table(rows: List[dict]) -> str:
    """One line per case: the ratio of each pass (fastnorm time / torch.nn time), and the times."""
    order = ["fwd", "fwdbwd", "eval_fwd", "eval_fwdbwd"]
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["pass"]] = r
    head = ["case", "train fwd", "train fwd+bwd", "eval fwd", "eval fwd+bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, ps in by.items():
        cells = [case]
        for p in order:
            r = ps.get(p)
            if r is None:
                cells.append("—")
                continue
            mark = "**" if r["ratio"] > GOAL else ""
            cells.append(f"{mark}{r['ratio']:.2f}×{mark} ({r['fastnorm_us']:.0f} / {r['torch_us']:.0f} µs)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=40.0,
                    help="time per round and case per pass (both layers together)")
    ap.add_argument("--quick", action="store_true", help="bench/run.py's --quick shapes, 5 rounds")
    ap.add_argument("--no-run-shapes", action="store_true", help="the small per-call overhead shapes only")
    ap.add_argument("--cases", nargs="+", help="only cases whose name contains one of these")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_overhead.csv"))
    ap.add_argument("--md", default=os.path.join(HERE, "results", "cpu_overhead.md"),
                    help="markdown summary (overwritten); '' for none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rounds = 5 if args.quick and args.rounds == 7 else args.rounds

    torch.set_num_threads(1)
    cases = list(SMALL_CASES) + ([] if args.no_run_shapes else run_shapes(args.quick))
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
    now = dt.datetime.now()
    meta = {"timestamp": now.isoformat(timespec="seconds"), "run_id": now.strftime("%Y%m%d-%H%M%S"),
            "device_name": device_name(torch.device("cpu")), "torch": torch.__version__,
            "fastnorm_commit": fastnorm_commit(), "threads": torch.get_num_threads()}
    load = os.getloadavg()
    print(f"cpu_overhead: {meta['device_name']}; torch {meta['torch']}; fastnorm "
          f"{meta['fastnorm_commit']}; load average {load[0]:.2f} on {os.cpu_count()} cores; "
          f"{len(cases)} cases, {rounds} rounds")
    rows = []
    t_start = time.perf_counter()
    for case in cases:
        case_rows = bench_case(case, rounds, args.target_ms * 1e-3, args.seed)
        case_rows = [{**meta, **r} for r in case_rows]
        rows += case_rows
        for r in case_rows:
            print(f"  {r['case']:<40} {r['pass']:<12} torch {r['torch_us']:9.1f} us  fastnorm "
                  f"{r['fastnorm_us']:9.1f} us  ratio {r['ratio']:.3f}  (max|diff| "
                  f"{r['max_abs_diff']:.2g})", flush=True)
    write_csv(rows, args.out)
    md = table(rows)
    print("\n" + md)
    over = [r for r in rows if r["ratio"] > GOAL]
    print(f"\ncpu_overhead: {len(over)} of {len(rows)} ratios above {GOAL:.2f} "
          f"({time.perf_counter() - t_start:.0f} s); rows appended to {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# CPU per-call cost: fastnorm / torch.nn\n\n"
                    f"- run {meta['run_id']}, fastnorm {meta['fastnorm_commit']}, torch "
                    f"{meta['torch']}\n- {meta['device_name']}, torch.set_num_threads(1); load "
                    f"average at start {load[0]:.2f} on {os.cpu_count()} cores (shared machine)\n"
                    f"- method: torch.nn and fastnorm calls interleaved (order swapped every "
                    f"repetition), {rounds} rounds, each time = min over rounds of the round's "
                    f"median; cell = ratio (fastnorm µs / torch.nn µs); bold: above {GOAL:.2f}\n"
                    f"- float32, contiguous; x = randn*1.5+0.3; fwd = training forward with grad, "
                    f"fwd+bwd = forward + autograd.grad of x, weight, bias; eval fwd under "
                    f"no_grad\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
