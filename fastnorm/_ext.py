"""Load the compiled extension fastnorm._C, which registers CUDA kernels under the fastnorm:: ops.

Importing fastnorm never fails because of it: without the extension every op runs its reference
path (ATen), on CUDA tensors too. One warning says why, when it matters.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

loaded: bool = False
load_error: Optional[str] = None


def build_info() -> dict:
    """What setup.py recorded about the build (torch/CUDA versions, archs, flags, commit)."""
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _torch_mismatch(info: dict) -> Optional[str]:
    built = info.get("torch")
    if info.get("built_cuda") and built and built != torch.__version__:
        return (f"fastnorm's extension was built against torch {built} but torch "
                f"{torch.__version__} is running; rebuild fastnorm")
    return None


def load() -> bool:
    global loaded, load_error
    if os.environ.get("FASTNORM_DISABLE_CUDA_KERNELS") == "1":
        load_error = "disabled by FASTNORM_DISABLE_CUDA_KERNELS=1"
        return False
    try:
        importlib.import_module(__package__ + "._C")  # registers the CUDA kernels
        loaded = True
    except ImportError as e:
        load_error = f"{type(e).__name__}: {e}"
        info = build_info()
        missing = isinstance(e, ModuleNotFoundError) and e.name == __package__ + "._C"
        # Say so when something is lost: a build that should be there and isn't, or a GPU
        # that will run the reference path.
        if info.get("built_cuda") or not missing or torch.cuda.is_available():
            reason = _torch_mismatch(info) or load_error
            warnings.warn(f"fastnorm: CUDA kernels unavailable ({reason}); using the reference "
                          f"(ATen) path on every device", RuntimeWarning, stacklevel=3)
    return loaded
