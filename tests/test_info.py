"""`python -m fastnorm.info`, the FASTNORM_DISABLE_CUDA_KERNELS switch, and a plain import."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import fastnorm
from fastnorm.ops import OP_NAMES

ALL_OPS = ["fastnorm::layer_norm_fwd", "fastnorm::layer_norm_bwd", "fastnorm::group_norm_fwd",
           "fastnorm::group_norm_bwd", "fastnorm::batch_norm_fwd", "fastnorm::batch_norm_bwd"]


def _run_info(**env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "fastnorm.info"], capture_output=True, text=True,
                          env=env, timeout=120)


def test_info_runs_and_lists_every_op():
    r = _run_info()
    assert r.returncode == 0, r.stderr
    assert set(ALL_OPS) <= set(OP_NAMES)
    for op in OP_NAMES:
        assert op in r.stdout
    assert fastnorm.__version__ in r.stdout
    assert torch.__version__ in r.stdout
    assert "extension" in r.stdout


def test_info_with_kernels_disabled():
    r = _run_info(FASTNORM_DISABLE_CUDA_KERNELS="1")
    assert r.returncode == 0, r.stderr
    assert "not loaded" in r.stdout
    assert "FASTNORM_DISABLE_CUDA_KERNELS" in r.stdout
    for op in ALL_OPS:
        line = next(ln for ln in r.stdout.splitlines() if op in ln)
        assert "compiled CUDA kernel" not in line  # every op on its reference path


def test_import_and_cpu_ops_with_kernels_disabled():
    """A fresh interpreter without the CUDA kernels: import works, every norm runs on CPU."""
    code = (
        "import torch, fastnorm, fastnorm._ext as e\n"
        "assert not e.loaded\n"
        "x = torch.randn(4, 6, 3, 3, requires_grad=True)\n"
        "ys = [fastnorm.BatchNorm2d(6)(x), fastnorm.LayerNorm(3)(x), fastnorm.GroupNorm(3, 6)(x),\n"
        "      fastnorm.InstanceNorm2d(6)(x)]\n"
        "sum(y.sum() for y in ys).backward()\n"
        "torch.testing.assert_close(ys[0], torch.nn.functional.batch_norm(x, None, None, training=True))\n"
        "print('ok')\n")
    env = dict(os.environ, FASTNORM_DISABLE_CUDA_KERNELS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_import_and_ops_in_process(device):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, device=device)
    ops = torch.ops.fastnorm
    y, mean, rstd = ops.layer_norm_fwd(x, [3], None, None, 1e-5)
    assert y.shape == x.shape and mean.shape == (8,) and rstd.shape == (8,)
    y, mean, rstd = ops.group_norm_fwd(x, None, None, 2, 1e-5)
    assert y.shape == x.shape and mean.shape == (2, 2)
    y, mean, rstd = ops.batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5)
    assert y.shape == x.shape and mean.shape == (4,)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_report_function():
    from fastnorm import info
    text = info.report()
    for op in ALL_OPS:
        assert op in text
    if not torch.cuda.is_available():
        assert "none visible" in text
