"""One fixture for every kernel test: the *target* the compiled kernels run on.

- ``cuda``: the real CUDA kernels (``torch.ops.fastnorm`` on CUDA tensors); needs a GPU and the
  compiled extension.
- ``emu``: the same kernel sources compiled by g++ against the CPU emulation of the CUDA execution
  model (tools/cuda_emu), registered as ``torch.ops.fastnorm_emu`` on CPU tensors. Enabled by
  ``FASTNORM_EMU=plain`` or ``FASTNORM_EMU=asan`` (``make test-kernels`` runs both).
- ``reference``: the ATen reference path (``torch.ops.fastnorm`` on CPU), only when
  ``FASTNORM_KERNEL_TARGETS`` names it: checks the tests themselves without a GPU or a build.

``FASTNORM_KERNEL_TARGETS`` (comma-separated) overrides the default list ``cuda,emu``.
A test that only makes sense on one target says so with ``target.require(...)``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import pytest
import torch

import fastnorm  # noqa: F401  (defines the op schemas, loads the compiled CUDA kernels)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class KernelTarget:
    name: str                 # "cuda", "emu" or "reference"
    device: torch.device      # where the tensors live
    ops: object               # the op namespace: torch.ops.fastnorm or torch.ops.fastnorm_emu
    emulated: bool = False    # kernels run in the CPU emulation (slow: keep shapes small)
    emu: object = field(default=None, repr=False)  # tools/cuda_emu handle (emulated only)

    def __str__(self) -> str:
        return self.name

    @property
    def is_cuda(self) -> bool:
        return self.name == "cuda"

    def require(self, *names: str, why: str = "") -> None:
        """Skip the calling test unless this target is one of `names`."""
        if self.name not in names:
            pytest.skip(f"{why or 'needs ' + '/'.join(names)} (target {self.name})")

    def skip_if_emulated_above(self, numel: int, limit: int) -> None:
        """Shapes too large for the emulation: the CUDA target runs them, emulation skips."""
        if self.emulated and numel > limit:
            pytest.skip(f"{numel} elements: too large for the emulation (limit {limit}); the CUDA "
                        f"target runs this case")

    @contextlib.contextmanager
    def schedule(self, **kw):
        """Emulation only: run the enclosed calls under another schedule or device size
        (thread_order, block_order, seed, sm_count, blocks_per_sm); a no-op elsewhere."""
        if not self.emulated:
            yield
            return
        with self.emu.schedule(**kw):
            yield


def _cuda_target():
    if not torch.cuda.is_available():
        return None, "needs a CUDA GPU"
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
               for op in fastnorm.ops.OP_NAMES):
        return None, "needs the compiled fastnorm CUDA kernels"
    return KernelTarget("cuda", torch.device("cuda"), torch.ops.fastnorm), None


_EMU_CACHE: dict = {}


def _emu_target():
    variant = os.environ.get("FASTNORM_EMU", "")
    if not variant:
        return None, "emulation tier not requested (FASTNORM_EMU=plain|asan, or make test-kernels)"
    if "handle" not in _EMU_CACHE:
        sys.path.insert(0, os.path.join(_ROOT, "tools"))
        from cuda_emu import emu  # noqa: E402  (a test artifact, not part of the package)
        _EMU_CACHE["handle"] = emu.load(variant)
    h = _EMU_CACHE["handle"]
    return KernelTarget("emu", torch.device("cpu"), h.ops, emulated=True, emu=h), None


def _reference_target():
    return KernelTarget("reference", torch.device("cpu"), torch.ops.fastnorm), None


_FACTORIES = {"cuda": _cuda_target, "emu": _emu_target, "reference": _reference_target}
TARGETS = [t.strip() for t in os.environ.get("FASTNORM_KERNEL_TARGETS", "cuda,emu").split(",") if t.strip()]


@pytest.fixture(scope="session", params=TARGETS)
def target(request) -> KernelTarget:
    t, why = _FACTORIES[request.param]()
    if t is None:
        pytest.skip(why)
    return t


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory(request):
    """On the emulated target every at::empty inside an op is NaN-filled (ints: max value), so an
    output or workspace element that no kernel writes shows up."""
    if "target" not in request.fixturenames:
        yield
        return
    t = request.getfixturevalue("target")
    if not t.emulated:
        yield
        return
    det = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# ------------------------------------------------------------------------------------------------
# The coverage test of the emulation tier runs last and only judges a whole-suite run.
# ------------------------------------------------------------------------------------------------
KERNEL_TEST_FILES = {"test_batch_norm_kernels.py", "test_row_kernels.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "emu_coverage: the kernel-coverage check (runs last)")


def pytest_collection_modifyitems(session, config, items):
    files = {os.path.basename(str(item.fspath)) for item in items}
    config._fastnorm_full_kernel_suite = (
        KERNEL_TEST_FILES <= files and not config.option.keyword and not config.option.markexpr
        and not getattr(config.option, "lf", False) and not getattr(config.option, "deselect", None))
    last = [i for i in items if i.get_closest_marker("emu_coverage")]
    items[:] = [i for i in items if not i.get_closest_marker("emu_coverage")] + last
