"""Build and load the CPU emulation of fastnorm's CUDA kernels (a test artifact).

    python tools/cuda_emu/emu.py build plain asan    # build (cached by ninja under build/)
    FASTNORM_EMU=plain pytest tests/cuda             # the kernel tests on the emulated target

load(variant) registers the kernels as torch.ops.fastnorm_emu.* (CPU tensors), with the schemas
of fastnorm.ops.SCHEMAS, and returns a handle with the emulator's controls: schedule(...) (thread and
block order, device size) and coverage().

route_ops(handle) sends torch.ops.fastnorm.* on CPU tensors to those kernels (a CPU registration
that calls torch.ops.fastnorm_emu.*) and turns the modules' CPU fast path off, so the modules,
functional, autograd and convert() run the emulated kernels: FASTNORM_EMU_OPS=plain|asan in
tests/conftest.py, make test-emu-modules (docs/emulation.md).

Variants: "plain" (-O1) and "asan" (AddressSanitizer + UndefinedBehaviorSanitizer: exact-size
buffers, misaligned vector accesses). The asan variant must run in a process that starts with
the sanitizer runtime: LD_PRELOAD=$(python tools/cuda_emu/emu.py asan-runtime).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# FASTNORM_EMU_SRC / FASTNORM_EMU_BUILD: another source tree and build folder (the mutation check).
CSRC = os.environ.get("FASTNORM_EMU_SRC", os.path.join(ROOT, "csrc"))
VARIANTS = {
    "plain": [],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer"],
}


def _cuda_include() -> str:
    """The toolkit's include folder, as nvcc itself reports it (the nvcc on PATH may be a wrapper
    in a folder with no headers beside it)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "include", "cuda_runtime.h")):
        return os.path.join(env, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
        for m in re.finditer(r'INCLUDES="([^"]*)"', r.stdout + r.stderr):
            for inc in re.findall(r"-I\s*\"?([^\s\"]+)", m.group(1)):
                if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
                    return os.path.realpath(inc)
    for c in ["/usr/local/cuda/include"]:
        if os.path.exists(os.path.join(c, "cuda_runtime.h")):
            return c
    raise RuntimeError("fastnorm emulation: no CUDA toolkit headers found (cuda_runtime.h); set "
                       "CUDA_HOME. The emulation needs the toolkit's headers, not a GPU.")


def build_dir(variant: str) -> str:
    return os.path.join(os.environ.get("FASTNORM_EMU_BUILD", os.path.join(ROOT, "build")),
                        f"emu-{variant}")


def _ninja() -> str:
    for cand in (shutil.which("ninja"), os.path.join(os.path.dirname(sys.executable), "ninja")):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("fastnorm emulation: ninja not found (pip install ninja)")


def build(variant: str, src: str = CSRC, verbose: bool = False) -> str:
    """Rewrite csrc/ (tools/cuda_emu/rewrite.py) and compile it with g++ into one shared library
    (ninja: only what changed is rebuilt); returns its path. Builds, never loads: the sanitizer
    variant can only be loaded by a process that started with the sanitizer runtime."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown emulation variant {variant!r}: expected one of {sorted(VARIANTS)}")
    sys.path.insert(0, HERE)
    import rewrite  # noqa: E402

    import torch
    import torch.utils.cpp_extension as ext

    out = build_dir(variant)
    gen = os.path.join(out, "src")
    rewrite.rewrite_tree(src, gen, os.path.relpath(src, ROOT) if src.startswith(ROOT) else src)
    # every host unit of the extension (csrc/*.cu; module.cpp is the Python module's, not needed)
    host_sources = sorted(f for f in os.listdir(src) if f.endswith(".cu"))
    sources = [os.path.join(gen, rewrite.cpp_name(s)) for s in host_sources]
    selftest = os.path.join(out, "selftest", "selftest.cpp")
    rewrite.rewrite_file(os.path.join(HERE, "selftest.cu"), selftest, "tools/cuda_emu/selftest.cu")
    sources += [selftest, os.path.join(HERE, "cuda_emu.cpp")]
    includes = [gen, HERE, _cuda_include()] + ext.include_paths()
    cflags = (["-O1", "-std=c++20", "-fPIC", "-DFASTNORM_EMULATION", "-include",
               os.path.join(HERE, "cuda_emu.h"), "-Wno-unknown-pragmas", "-Wno-attributes",
               "-fno-strict-aliasing", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
              + [f"-I{i}" for i in includes] + VARIANTS[variant])
    libdirs = ext.library_paths()
    # -Bsymbolic: the host code's cudaGetDevice & co. bind to the emulator's definitions, not to
    # the CUDA runtime that torch may have loaded into the process.
    ldflags = (["-shared", "-Wl,-Bsymbolic"] + [f"-L{d}" for d in libdirs]
               + [f"-Wl,-rpath,{d}" for d in libdirs] + ["-lc10", "-ltorch_cpu", "-ltorch"]
               + VARIANTS[variant])
    lib = os.path.join(out, f"fastnorm_emu_{variant}.so")
    lines = ["ninja_required_version = 1.3", f"cxx = {os.environ.get('CXX', 'g++')}",
             "cflags = " + " ".join(cflags), "ldflags = " + " ".join(ldflags),
             "rule compile", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
             "  depfile = $out.d", "  deps = gcc", "  description = emu $variant: $in",
             "rule link", "  command = $cxx $in $ldflags -o $out"]
    objs = []
    for s in sources:
        o = os.path.join(out, "obj", os.path.basename(s)[:-4] + ".o")
        objs.append(o)
        lines.append(f"build {o}: compile {s}")
    lines += [f"build {lib}: link " + " ".join(objs), f"default {lib}", ""]
    ninja_file = os.path.join(out, "build.ninja")
    text = "\n".join(lines).replace("$variant", variant)
    if not os.path.exists(ninja_file) or open(ninja_file).read() != text:
        with open(ninja_file, "w") as fh:
            fh.write(text)
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    r = subprocess.run([_ninja(), "-C", out, "-j", jobs] + (["-v"] if verbose else []),
                       capture_output=not verbose, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fastnorm emulation build ({variant}) failed:\n{(r.stdout or '')[-20000:]}")
    return lib


def asan_runtime() -> str:
    return subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _asan_preloaded() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


@dataclass
class Emulator:
    variant: str
    path: str
    lib: ctypes.CDLL
    ops: object

    def configure(self, thread_order="forward", block_order="forward", seed=0, sm_count=132,
                  blocks_per_sm=0):
        orders = {"forward": 0, "reverse": 1, "random": 2}
        self.lib.fastnorm_emu_configure(orders[thread_order], orders[block_order], seed, sm_count,
                                        blocks_per_sm)

    @contextlib.contextmanager
    def schedule(self, **kw):
        """Calls inside run with this schedule / device size; the default afterwards."""
        self.configure(**kw)
        try:
            yield
        finally:
            self.configure()

    def _text(self, fn) -> str:
        """The text a C function of the emulator copies out (called once for its size)."""
        n = fn(None, 0)
        buf = ctypes.create_string_buffer(n)
        fn(buf, n)
        return buf.value.decode()

    def coverage(self) -> dict:
        """{kernel signature with its template arguments: launches}."""
        out = {}
        for line in self._text(self.lib.fastnorm_emu_coverage).splitlines():
            count, sig = line.split("\t", 1)
            out[sig] = int(count)
        return out

    def record_launches(self, fn):
        """Runs fn() with every kernel launch recorded instead of executed (the host code is
        the real one: its plans and checks run) -> [(kernel, grid, block, smem)]."""
        self.lib.fastnorm_emu_record_only(1)
        try:
            fn()
        finally:
            self.lib.fastnorm_emu_record_only(0)
        out = []
        for line in self._text(self.lib.fastnorm_emu_recorded).splitlines():
            k, g, b, sm = line.split("\t")
            out.append((k, tuple(map(int, g.split(","))), tuple(map(int, b.split(","))), int(sm)))
        return out

    def use_resource_report(self, path: str | None = None) -> int:
        """Occupancy queries (cudaOccupancyMaxActiveBlocksPerMultiprocessor, resident_blocks() of
        csrc/device.h) answer with each kernel instantiation's registers and static shared memory
        from the CUDA build's resource report (build/kernel_resources.json, fastnorm.resources), so
        the host plans here are the GPU's. Returns the number of kernels loaded; 0 (no report, or
        path=""): the table is cleared and queries answer from threads and shared memory alone.
        Kernels are matched by name and template arguments."""
        self.lib.fastnorm_emu_kernel_resources(b"", 0, 0, 0)
        table = resource_table(REPORT if path is None else path) if path != "" else {}
        for name, (regs, smem, barriers) in table.items():
            self.lib.fastnorm_emu_kernel_resources(name.encode(), regs, smem, barriers)
        return len(table)

    def occupancy_queries(self) -> list:
        """The occupancy queries of the last record_launches: [(kernel, threads, dynamic smem,
        resident blocks, source)], source 'report' (the resource report's registers and shared
        memory), 'threads' (not in the report: threads and dynamic shared memory only) or
        'device' (a configured blocks_per_sm)."""
        out = []
        for line in self._text(self.lib.fastnorm_emu_occupancy_log).splitlines():
            k, t, sm, b, src = line.split("\t")
            out.append((k, int(t), int(sm), int(b), src))
        return out

    @property
    def sanitized(self) -> bool:
        return bool(self.lib.fastnorm_emu_sanitized())


_LOADED: dict = {}
REPORT = os.path.join(ROOT, "build", "kernel_resources.json")


def resource_table(path: str = REPORT) -> dict:
    """{'ns::kernel<template args>': (registers, static shared memory, barriers)} from a resource
    report; {} when there is none. A kernel compiled into two translation units keeps the entry
    with more registers (the fewer resident blocks)."""
    import json

    sys.path.insert(0, ROOT)
    from fastnorm import resources

    try:
        with open(path) as f:
            kernels = json.load(f)["kernels"]
    except (OSError, ValueError, KeyError):
        return {}
    names = resources.demangle(sorted({k["mangled"] for k in kernels}))
    table: dict = {}
    for k in kernels:
        key = resources.signature_head(names[k["mangled"]])
        entry = (k["registers"], k["static_smem"], k.get("barriers", 0))
        if key not in table or entry > table[key]:
            table[key] = entry
    return table



def _define_schemas():
    import torch

    import fastnorm.ops as fops

    if "lib" in _LOADED:
        return
    lib = torch.library.Library("fastnorm_emu", "FRAGMENT")  # noqa: TOR901
    for name, schema in fops.SCHEMAS.items():
        lib.define(name + schema)
    _LOADED["lib"] = lib


def load(variant: str, build_first: bool = True) -> Emulator:
    """Build if needed (not under a preloaded sanitizer runtime) and load the emulation.
    build_first=False loads the library as it is, never building (a checkout where someone else
    keeps it built; the FASTNORM_EMU_NO_BUILD=1 of tests/conftest.py's FASTNORM_EMU_OPS switch)."""
    if variant in _LOADED:
        return _LOADED[variant]
    import torch

    path = os.path.join(build_dir(variant), f"fastnorm_emu_{variant}.so")
    if variant == "asan" and not _asan_preloaded():
        raise RuntimeError("the asan emulation needs the sanitizer runtime loaded first: run with "
                           f"LD_PRELOAD={asan_runtime()} ASAN_OPTIONS=detect_leaks=0 (make test-kernels)")
    if not _asan_preloaded() and build_first:
        path = build(variant)
    elif not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: build it first (python tools/cuda_emu/emu.py build {variant})")
    _define_schemas()
    torch.ops.load_library(path)
    lib = ctypes.CDLL(path)
    lib.fastnorm_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong,
                                           ctypes.c_int, ctypes.c_int]
    lib.fastnorm_emu_coverage.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.fastnorm_emu_coverage.restype = ctypes.c_long
    lib.fastnorm_emu_recorded.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.fastnorm_emu_recorded.restype = ctypes.c_long
    lib.fastnorm_emu_occupancy_log.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.fastnorm_emu_occupancy_log.restype = ctypes.c_long
    lib.fastnorm_emu_kernel_resources.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_int]
    lib.fastnorm_emu_resident_blocks.argtypes = [ctypes.c_int] * 5
    lib.fastnorm_emu_resident_blocks.restype = ctypes.c_int
    emu = Emulator(variant, path, lib, torch.ops.fastnorm_emu)
    emu.configure()
    _LOADED[variant] = emu
    return emu


def route_ops(emu: Emulator, fast_path: bool = False) -> list[str]:
    """Send torch.ops.fastnorm.* on CPU tensors to the emulated kernels: for every op of
    fastnorm.ops.OP_NAMES that the emulation implements (fastnorm_emu::<op> has a CPU kernel), a
    CPU kernel of fastnorm::<op> that calls torch.ops.fastnorm_emu.<op>. A direct CPU registration
    takes precedence over the CompositeExplicitAutograd reference, as the extension's CUDA one
    does on CUDA tensors, so every caller (modules, functional, autograd, convert()) runs the
    kernels. The emulation's errors propagate: no fallback to the reference (an input it cannot
    take raises). Ops outside OP_NAMES (SyncBatchNorm's) or without an emulated kernel stay on the
    reference. Unless fast_path=True the modules' CPU fast path (fastnorm.functional), which
    bypasses the ops on CPU, is turned off. Returns the routed op names; the registration lives
    until unroute_ops(). Used by tests/conftest.py under FASTNORM_EMU_OPS=plain|asan."""
    import torch

    import fastnorm.functional
    import fastnorm.ops as fops

    if "route" in _LOADED:
        held, routed, _ = _LOADED["route"]
        if held is not emu:
            raise RuntimeError(f"fastnorm emulation: the ops are already routed to the {held.variant} "
                               f"variant (unroute_ops() first)")
        return list(routed)
    lib = torch.library.Library("fastnorm", "IMPL")  # noqa: TOR901 (kept alive in _LOADED)
    routed = []
    for qualified in fops.OP_NAMES:
        name = qualified.split("::", 1)[1]
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm_emu::{name}", "CPU"):
            continue
        emu_op = getattr(emu.ops, name).default

        def kernel(*args, _op=emu_op, **kwargs):
            return _op(*args, **kwargs)

        lib.impl(name, kernel, "CPU")
        routed.append(qualified)
    if not fast_path:
        fastnorm.functional.set_cpu_fast_path(False)
    _LOADED["route"] = (emu, routed, lib)
    return list(routed)


def routed_ops() -> list[str]:
    """The ops route_ops() sends to the emulation now ([] when none)."""
    return list(_LOADED["route"][1]) if "route" in _LOADED else []


def unroute_ops() -> None:
    """Undo route_ops(): the fastnorm:: ops on CPU run the reference again (the CPU fast path
    stays as route_ops left it)."""
    entry = _LOADED.pop("route", None)
    if entry is not None:
        entry[2]._destroy()


def defined_kernels(src: str = CSRC) -> list[str]:
    """Names of the __global__ functions defined under csrc/kernels."""
    names = []
    kdir = os.path.join(src, "kernels")
    for f in sorted(os.listdir(kdir)):
        with open(os.path.join(kdir, f)) as fh:
            text = re.sub(r"//[^\n]*", "", fh.read())
        names += re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text)
    return sorted(set(names))


def kernel_base_name(signature: str) -> str:
    """'void fastnorm::groups::k(...) [with T = float]' -> 'k'."""
    head = signature.split("(", 1)[0]
    return head.split("::")[-1].split()[-1]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "asan-runtime":
        print(asan_runtime())
    elif len(sys.argv) >= 3 and sys.argv[1] == "build":
        for v in sys.argv[2:]:
            print(build(v, verbose="-v" in os.environ.get("FASTNORM_EMU_VERBOSE", "")))
    else:
        print(__doc__)
        sys.exit(2)
