"""Shared fixtures and helpers for the fastnorm test suite.

Every test that takes the `device` fixture runs on "cpu" and, when a GPU is visible, on "cuda":
the same assertions then validate the compiled CUDA kernels against torch.nn.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import fastnorm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Under pytest-xdist (make test), each worker gets its share of the cores for torch's intra-op
# threads: n workers with torch's default of one thread per core each would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------------------------
# tolerances
# ----------------------------------------------------------------------------------------------
# (rtol, atol) per dtype; atol is scaled by the reference's magnitude in assert_close_scaled.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close_scaled(actual, expected, dtype=None, factor=1.0, msg=""):
    """assert_close with per-dtype tolerances; atol is relative to max(1, |expected|_max) so
    that gradients (sums over many elements) are compared "relative-ish"."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{msg}: one is None ({actual!r} vs {expected!r})"
        return
    dtype = dtype or expected.dtype
    rtol, atol = TOL[dtype]
    scale = 1.0
    if expected.numel() and expected.is_floating_point():
        scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol * factor, atol=atol * factor * scale,
                               msg=lambda m: f"{msg}\n{m}")


def assert_compiled_matches_eager(step, tensors, dtype, msg=""):
    """torch.compile(step, fullgraph=True) (aot_eager) against step run eagerly, each on fresh
    leaf copies of `tensors`: the scalar it returns, then every leaf's gradient from its
    backward(), with assert_close_scaled's tolerances of `dtype`."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    ref_leaves = [t.clone().requires_grad_() for t in tensors]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    want = step(*ref_leaves)
    assert_close_scaled(got, want, dtype, msg=msg)
    got.backward()
    want.backward()
    for a, e in zip(leaves, ref_leaves):
        assert_close_scaled(a.grad, e.grad, dtype, msg=f"{msg} grad")


def grad_scale(*grads) -> float:
    """The largest |value| over the given gradients (None and empty ones skipped); 0 for none."""
    return max((float(g.detach().abs().max()) for g in grads
                if g is not None and g.numel() and g.is_floating_point()), default=0.0)


def assert_grads_close(actual: dict, expected: dict, dtype=None, factor=1.0, msg=""):
    """The gradients of one model (by name) against the expected ones: each with the tolerance
    assert_close_scaled gives it, plus atol times the scale of the whole gradient, G = max(1, the
    largest |expected| over all of them).

    Some of a model's gradients are zero in exact arithmetic: the bias of a layer followed by a
    normalisation that removes any constant shift (a Linear / Conv before BatchNorm in training,
    InstanceNorm, GroupNorm with one channel per group), an attention key's bias (softmax ignores
    a shift per query); others nearly so (the weight of a layer before BatchNorm: scale-invariant
    but for eps). Computed, they are what is left of sums of terms as large as the model's other
    gradients, and another reduction order (compiled vs eager, fused vs not) leaves other
    rounding: noise of the size of atol * G, not of their own ~0 magnitude."""
    assert actual.keys() == expected.keys(), f"{msg}: gradients {sorted(actual)} vs {sorted(expected)}"
    whole = max(1.0, grad_scale(*expected.values()))
    for k, e in expected.items():
        a = actual[k]
        if a is None or e is None:
            assert a is None and e is None, f"{msg} {k}: one is None ({a!r} vs {e!r})"
            continue
        rtol, atol = TOL[dtype or e.dtype]
        own = max(1.0, grad_scale(e))
        torch.testing.assert_close(
            a, e, rtol=rtol * factor, atol=atol * (factor * own + whole),
            msg=lambda m, k=k: f"{msg} {k} (gradient scale {whole:.3g})\n{m}")


def mentions_shape(message: str, shape) -> bool:
    """True when `message` names `shape` in any of the usual spellings: (2, 4, 5), [2, 4, 5],
    torch.Size([2, 4, 5]), 2x4x5."""
    dims = [str(int(d)) for d in shape]
    sep = r"\s*,\s*"
    pats = [r"\(" + sep.join(dims) + r",?\)", r"\[" + sep.join(dims) + r"\]"]
    if len(dims) > 1:
        pats.append(r"\b" + "x".join(dims) + r"\b")
    return any(re.search(p, message) for p in pats)


# ----------------------------------------------------------------------------------------------
# module registry: (fastnorm class, torch class) pairs and sensible inputs
# ----------------------------------------------------------------------------------------------
# the classes with a torch.nn twin (not FrozenBatchNorm2d, which has its own tests)
# RMSNorm has its own suite (tests/test_rms_norm.py): these generic ones are written for
# the BatchNorm / LayerNorm / GroupNorm / InstanceNorm families
# LocalResponseNorm (no parameters, no statistics) has its own tests: test_local_response_norm.py
MODULE_NAMES = [n for n in fastnorm.modules.__all__
                if hasattr(nn, n) and n not in ("RMSNorm", "LocalResponseNorm")]


def torch_twin_class(name):
    return getattr(nn, name)


def fastnorm_class(name):
    return getattr(fastnorm, name)


def is_lazy(name):
    return name.startswith("Lazy")


def base_kind(name):
    """"bn", "in", "ln" or "gn"."""
    n = name.replace("Lazy", "")
    if n.startswith("BatchNorm"):
        return "bn"
    if n.startswith("InstanceNorm"):
        return "in"
    if n == "LayerNorm":
        return "ln"
    return "gn"


def spatial_rank(name):
    """1/2/3 for the *Norm{1,2,3}d classes, None otherwise."""
    m = re.search(r"(\d)d$", name)
    return int(m.group(1)) if m else None


def ctor_args(name, c, **kwargs):
    """Positional constructor arguments for a module with C channels (LayerNorm: last dim)."""
    kind = base_kind(name)
    if is_lazy(name):
        return (), kwargs
    if kind == "gn":
        groups = kwargs.pop("num_groups", 1 if c % 2 else 2)
        return (groups, c), kwargs
    return (c,), kwargs


def make_pair(name, c, device, dtype=torch.float32, randomize=True, **kwargs):
    """A torch.nn module and its fastnorm twin with identical parameters and buffers (weights
    drawn in [0.5, 1.5), biases and running statistics random, unless randomize=False).
    Lazy modules are built with device/dtype factory kwargs (they initialise on first call)."""
    args, kw = ctor_args(name, c, **dict(kwargs))
    if is_lazy(name):
        kw.update(device=device, dtype=dtype)
        return torch_twin_class(name)(*args, **kw), fastnorm_class(name)(*args, **kw)
    t = torch_twin_class(name)(*args, **kw)
    f = fastnorm_class(name)(*args, **kw)
    if randomize:
        with torch.no_grad():
            if getattr(t, "weight", None) is not None:
                t.weight.uniform_(0.5, 1.5)
            if getattr(t, "bias", None) is not None:
                t.bias.normal_()
            if getattr(t, "running_mean", None) is not None:
                t.running_mean.normal_(0, 0.5)
                t.running_var.uniform_(0.5, 2.0)
    f.load_state_dict(t.state_dict())
    t.to(device=device, dtype=dtype)
    f.to(device=device, dtype=dtype)
    return t, f


def default_input_shape(name, n=4, c=3, spatial=None):
    kind = base_kind(name)
    r = spatial_rank(name)
    if kind == "ln":
        return (n, 5, c)
    if kind == "gn":
        return (n, c, *(spatial or (3, 5)))
    sp = spatial or {1: (7,), 2: (3, 5), 3: (2, 3, 5)}[r]
    return (n, c, *sp)


# ----------------------------------------------------------------------------------------------
# the twin protocol: run a torch.nn module and its fastnorm twin on the same inputs
# ----------------------------------------------------------------------------------------------
def make_input(shape, device, dtype=torch.float32, memory_format=None, scale=2.0, offset=0.5):
    x = (torch.randn(shape, device=device, dtype=torch.float64) * scale + offset).to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x


def compare_buffers(t, f, tol_dtype, msg=""):
    st, sf = t.state_dict(), f.state_dict()
    assert list(st) == list(sf), f"{msg}: state_dict keys differ: {list(st)} vs {list(sf)}"
    for k in st:
        if k.endswith("num_batches_tracked"):
            assert sf[k].dtype == st[k].dtype == torch.long
            assert torch.equal(sf[k], st[k]), f"{msg}: {k}: fastnorm {sf[k]} vs torch {st[k]}"
        else:
            assert sf[k].dtype == st[k].dtype, f"{msg}: {k} dtype"
            assert_close_scaled(sf[k], st[k], tol_dtype, msg=f"{msg}: {k}")


def twin_step(t, f, x, tol_dtype=None, factor=1.0, msg=""):
    """One forward+backward of both modules on x; compares output, input grad, parameter grads
    and all buffers. Returns the fastnorm output."""
    tol_dtype = tol_dtype or x.dtype
    xt = x.detach().clone().requires_grad_()
    xf = x.detach().clone().requires_grad_()
    yt = t(xt)
    yf = f(xf)
    assert yf.shape == yt.shape, msg
    assert yf.dtype == yt.dtype == x.dtype, f"{msg}: dtype {yf.dtype} vs torch {yt.dtype}, input {x.dtype}"
    assert yf.device == x.device
    assert yf.grad_fn is not None, msg
    assert_close_scaled(yf, yt, tol_dtype, factor, msg=f"{msg}: output")
    g = torch.randn(yt.shape, device=x.device).to(yt.dtype)
    yt.backward(g)
    yf.backward(g)
    assert_close_scaled(xf.grad, xt.grad, tol_dtype, factor, msg=f"{msg}: input grad")
    pt, pf = dict(t.named_parameters()), dict(f.named_parameters())
    assert list(pt) == list(pf), msg
    for k in pt:
        assert_close_scaled(pf[k].grad, pt[k].grad, tol_dtype, factor, msg=f"{msg}: {k}.grad")
        pt[k].grad = None
        pf[k].grad = None
    compare_buffers(t, f, tol_dtype, msg)
    return yf


def run_protocol(t, f, shape, device, in_dtype=torch.float32, tol_dtype=None, memory_format=None,
                 train_steps=2, eval_step=True, factor=1.0):
    """Two training steps then an eval step (fresh inputs each time), everything compared."""
    outs = []
    t.train()
    f.train()
    for i in range(train_steps):
        x = make_input(shape, device, in_dtype, memory_format, offset=0.5 + i)
        outs.append((x, twin_step(t, f, x, tol_dtype, factor, msg=f"train step {i}")))
    if eval_step:
        t.eval()
        f.eval()
        x = make_input(shape, device, in_dtype, memory_format, offset=-0.25)
        outs.append((x, twin_step(t, f, x, tol_dtype, factor, msg="eval step")))
    return outs


# ----------------------------------------------------------------------------------------------
# kernel targets (tests/cuda): one fixture for the real CUDA kernels and their CPU emulation
# ----------------------------------------------------------------------------------------------
# One fixture for every kernel test: the *target* the compiled kernels run on.
#
# - ``cuda``: the real CUDA kernels (``torch.ops.fastnorm`` on CUDA tensors); needs a GPU and the
#   compiled extension.
# - ``emu``: the same kernel sources compiled by g++ against the CPU emulation of the CUDA execution
#   model (tools/cuda_emu), registered as ``torch.ops.fastnorm_emu`` on CPU tensors. Enabled by
#   ``FASTNORM_EMU=plain`` or ``FASTNORM_EMU=asan`` (``make test-kernels`` runs both).
# - ``reference``: the ATen reference path (``torch.ops.fastnorm`` on CPU), only when
#   ``FASTNORM_KERNEL_TARGETS`` names it: checks the tests themselves without a GPU or a build.
#
# ``FASTNORM_KERNEL_TARGETS`` (comma-separated) overrides the default list ``cuda,emu``.
# A test that only makes sense on one target says so with ``target.require(...)``.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _emu_module():
    """tools/cuda_emu/emu.py (a test artifact, not part of the package)."""
    if os.path.join(_ROOT, "tools") not in sys.path:
        sys.path.insert(0, os.path.join(_ROOT, "tools"))
    from cuda_emu import emu  # noqa: E402
    return emu


def _emu_target():
    variant = os.environ.get("FASTNORM_EMU", "")
    if not variant:
        return None, "emulation tier not requested (FASTNORM_EMU=plain|asan, or make test-kernels)"
    if "handle" not in _EMU_CACHE:
        # an xdist worker loads what the controller built (pytest_configure): no concurrent ninja
        worker = bool(os.environ.get("PYTEST_XDIST_WORKER"))
        _EMU_CACHE["handle"] = _emu_module().load(variant, build_first=not worker)
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
# The coverage check of the emulation tier (every kernel and compiled template instantiation ran)
# only judges a whole-suite run. In one process, test_every_kernel_ran (ordered last) judges it.
# Under pytest-xdist coverage is per worker process: each worker sends its emu.coverage() to the
# controller (workeroutput), which judges the union at session end and fails the run when some
# kernel or instantiation ran in no worker.
# ------------------------------------------------------------------------------------------------
KERNEL_TEST_FILES = {"test_batch_norm_kernels.py", "test_row_kernels.py",
                     "test_layer_norm2d_kernels.py", "test_rms_add_kernels.py",
                     "test_nc_kernels.py", "test_lrn_kernels.py", "test_modulated_kernels.py"}


# ------------------------------------------------------------------------------------------------
# fixtures the test files share
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fast_path():
    """The CPU fast path on for one test (whatever FASTNORM_CPU_FAST_PATH or the emulation switch
    set)."""
    was = fastnorm.functional.set_cpu_fast_path(True)
    yield
    fastnorm.functional.set_cpu_fast_path(was)


@pytest.fixture
def no_vmap_fallback():
    """torch.func.vmap without its slow fallback: an op without a batching rule raises."""
    was = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(was)


def pytest_configure(config):
    config.addinivalue_line("markers", "emu_coverage: the kernel-coverage check (runs last)")
    _route_ops_to_emulation()
    variant = os.environ.get("FASTNORM_EMU", "")
    if (variant and "emu" in TARGETS and not hasattr(config, "workerinput")
            and config.getoption("dist", "no") != "no"):
        # the xdist controller runs no test: it builds here, before the workers load the library
        emu = _emu_module()
        if variant != "asan" and not emu._asan_preloaded():  # as emu.load: make builds asan
            emu.build(variant)


_EMU_WORKERS: list = []  # xdist controller: (worker id, its coverage report or None)


def _instantiation_args(sig: str, count: int) -> tuple:
    """'... [with T = c10::Half; int VEC = 8; bool GN = true; acc_of<T> = float]' -> the first
    `count` values: ('c10::Half', '8', 'true')."""
    m = re.search(r"\[with (.*)\]$", sig)
    if not m:
        return ()
    return tuple(part.split(" = ", 1)[1] for part in m.group(1).split("; ")[:count])


def _template_args(sym: str) -> tuple:
    """'void ns::k<c10::Half, 8, true>(...)' -> ('c10::Half', '8', 'true')."""
    head = sym.split("(", 1)[0]
    if "<" not in head:
        return ()
    inner = head[head.index("<") + 1:head.rindex(">")]
    args, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += ch == "<"
        depth -= ch == ">"
        cur += ch
    args.append(cur.strip())
    return tuple(args)


def emu_coverage_check(ran: dict, library: str) -> tuple[list[str], list[str]]:
    """The kernels defined in csrc/kernels and the template instantiations compiled into the
    emulation library (nm) against those that ran ({signature: launches}, emu.coverage()).
    Returns (report lines, failures); no failures: everything ran."""
    import subprocess

    emu_mod = _emu_module()
    ran_names = {emu_mod.kernel_base_name(s) for s in ran}
    defined = emu_mod.defined_kernels()
    missing = [k for k in defined if k not in ran_names]
    nm = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True, text=True)
    compiled = set()
    for line in nm.stdout.splitlines():
        sym = line.split(" ", 2)[-1]
        m = re.search(r"(\w+)\s*$", sym.split("(", 1)[0].split("<", 1)[0])
        name = m.group(1) if m else ""
        if name in defined:
            compiled.add((name, _template_args(sym)))
    arity = {name: len(args) for name, args in compiled}
    ran_inst = set()
    for sig in ran:
        name = emu_mod.kernel_base_name(sig)
        ran_inst.add((name, _instantiation_args(sig, arity.get(name, 0))))
    not_run = sorted(compiled - ran_inst)
    report = [f"emulation coverage: {len(ran_names & set(defined))}/{len(defined)} kernels, "
              f"{len(compiled) - len(not_run)}/{len(compiled)} template instantiations"]
    report += [f"  kernel not run: {k}" for k in missing]
    report += [f"  instantiation not run: {name}<{', '.join(args)}>" for name, args in not_run]
    failures = []
    if missing:
        failures.append(f"kernels defined in csrc/kernels that no test ran: {missing}")
    if not compiled:
        failures.append(f"no kernel instantiations found in {library} (nm)")
    if not_run:
        failures.append(f"{len(not_run)} kernel instantiations compiled but never run (listed above)")
    return report, failures


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: a worker finished (or crashed: error, and no coverage from it)."""
    out = getattr(node, "workeroutput", None) or {}
    _EMU_WORKERS.append((node.gateway.id, out.get("fastnorm_emu_coverage")))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workerinput"):
        h = _EMU_CACHE.get("handle")
        if h is not None:
            config.workeroutput["fastnorm_emu_coverage"] = {
                "full_suite": bool(getattr(config, "_fastnorm_full_kernel_suite", False)),
                "library": h.path, "ran": h.coverage()}
        return
    reports = [r for _, r in _EMU_WORKERS if r is not None]
    if not reports or not all(r["full_suite"] for r in reports):
        return  # not the emulation tier, or not the whole kernel suite
    if session.exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    ran: dict = {}
    for r in reports:
        for sig, n in r["ran"].items():
            ran[sig] = ran.get(sig, 0) + n
    report, failures = emu_coverage_check(ran, reports[0]["library"])
    lost = [w for w, r in _EMU_WORKERS if r is None]
    head = ("union of the pytest-xdist workers (kernel signatures that ran: "
            + ", ".join(f"{w} {len(r['ran'])}" for w, r in _EMU_WORKERS if r is not None) + ")"
            + (f"; no coverage from {', '.join(lost)} (crashed or ran no kernel test)" if lost else ""))
    config._fastnorm_emu_verdict = ([head] + report, failures)
    if failures and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    verdict = getattr(config, "_fastnorm_emu_verdict", None)
    if verdict is None:
        return
    report, failures = verdict
    terminalreporter.section("emulation kernel coverage", red=bool(failures), green=not failures)
    for line in report + [f"FAILED: {f}" for f in failures]:
        terminalreporter.write_line(line)


# ------------------------------------------------------------------------------------------------
# FASTNORM_EMU_OPS=plain|asan: the whole session's fastnorm:: ops on CPU tensors run the emulated
# CUDA kernels (tools/cuda_emu emu.route_ops), and the CPU fast path is off, so module, functional,
# autograd and convert() tests exercise the kernels without a GPU (make test-emu-modules;
# docs/emulation.md). Set up before any test runs; an emulation that cannot be loaded fails the
# session. The library is built first if needed (ninja, build/emu-<variant>), by the pytest-xdist
# controller only (it configures before the workers start; they load what it built);
# FASTNORM_EMU_NO_BUILD=1 loads it as it is (make, which has just built it; a shared checkout).
# ------------------------------------------------------------------------------------------------
EMU_OPS = os.environ.get("FASTNORM_EMU_OPS", "").strip()
EMU_ROUTED: dict = {}  # {"handle": the emulator, "ops": the routed op names} once routed


def _route_ops_to_emulation():
    if not EMU_OPS or EMU_ROUTED:
        return
    emu = _emu_module()
    build_first = (os.environ.get("FASTNORM_EMU_NO_BUILD", "").strip() in ("", "0")
                   and not os.environ.get("PYTEST_XDIST_WORKER"))
    handle = emu.load(EMU_OPS, build_first=build_first)
    EMU_ROUTED["handle"] = handle
    EMU_ROUTED["ops"] = emu.route_ops(handle)
    assert not fastnorm.functional._cpu_fast_path_enabled


def pytest_report_header(config):
    if EMU_ROUTED:
        return (f"fastnorm: {len(EMU_ROUTED['ops'])} of {len(fastnorm.ops.OP_NAMES)} fastnorm:: ops "
                f"on CPU run the emulated kernels ({EMU_ROUTED['handle'].variant}); CPU fast path off")
    return None


def pytest_collection_modifyitems(session, config, items):
    files = {os.path.basename(str(item.fspath)) for item in items}
    config._fastnorm_full_kernel_suite = (
        KERNEL_TEST_FILES <= files and not config.option.keyword and not config.option.markexpr
        and not getattr(config.option, "lf", False) and not getattr(config.option, "deselect", None))
    last = [i for i in items if i.get_closest_marker("emu_coverage")]
    items[:] = [i for i in items if not i.get_closest_marker("emu_coverage")] + last
    if EMU_ROUTED:
        # the ATen side of the fast-path / op-path fixtures turns the CPU fast path back on: under
        # the switch it runs no kernel (the CPU suite runs it), so it is deselected
        aten_side = [i for i in items if _fast_path_param(i)]
        if aten_side:
            config.hook.pytest_deselected(items=aten_side)
            items[:] = [i for i in items if not _fast_path_param(i)]


# The fixtures that run a test on both CPU routes (path / cpu_path) and their fast-path values.
FAST_PATH_PARAMS = {"path": ("fast", "fast_path"), "cpu_path": ("aten", "fast_path")}


def _fast_path_param(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name) in values for name, values in FAST_PATH_PARAMS.items())
