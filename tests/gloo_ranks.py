"""Check functions run on gloo ranks (CPU processes), for the distributed tests
(test_sync_batchnorm.py, test_tensor_parallel.py).

A test module defines its checks (functions of the rank), a top-level worker that calls
run_checks (the spawned processes import the module to find it), and a fixture that calls spawn;
each check then becomes a test that reads every rank's result (assert_check). A check that fails
an assertion has run every collective, so the ranks stay in step and the next check runs; any
other exception may leave them out of step, and the rank stops there.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_checks(rank: int, port: int, outdir: str, checks: dict, world: int,
               collective_timeout_s: float) -> None:
    """In a spawned rank: join the gloo group, run checks in order (a barrier after each), and
    write {name: {"ok", "error", "s"}} to outdir/rank<rank>.json after each check."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    results = {}
    fatal = False
    try:
        for name, fn in checks.items():
            t0 = time.perf_counter()
            try:
                fn(rank)
                results[name] = {"ok": True}
            except AssertionError:  # mismatches: the check ran every collective
                results[name] = {"ok": False, "error": traceback.format_exc()}
            except Exception:  # noqa: BLE001 (the ranks may be out of step now: stop here)
                results[name] = {"ok": False, "error": traceback.format_exc()}
                fatal = True
            results[name]["s"] = round(time.perf_counter() - t0, 3)
            with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
            if fatal:
                break
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, timeout_s: float, outdir: str):
    """Runs worker(rank, port, outdir) on `world` spawned processes; returns (per-rank results,
    error or None). Processes still alive after timeout_s are killed."""
    ctx = mp.start_processes(worker, args=(free_port(), outdir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    error = None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                error = f"the {world} gloo processes did not finish in {timeout_s} s"
                break
    except Exception as e:  # noqa: BLE001 (a process died: report it with the checks)
        error = f"{type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        try:
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                results.append(json.load(f))
        except OSError:
            results.append({})
    return results, error


def assert_check(results, error, check: str) -> None:
    """The check passed on every rank (a rank that did not report it fails with spawn's error)."""
    for r, res in enumerate(results):
        if check not in res:
            pytest.fail(f"rank {r} did not report {check!r}: {error}")
        assert res[check]["ok"], f"rank {r}: {res[check].get('error')}"
