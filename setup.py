"""Build fastnorm: the Python package plus, when a CUDA toolkit is found, the extension fastnorm._C.

Environment:
  CUDA_HOME             toolkit prefix (the folder whose lib64 holds libcudart); found from nvcc otherwise
  TORCH_CUDA_ARCH_LIST  archs to build (default: the visible GPU's, else FASTNORM_DEFAULT_ARCH_LIST)
  FASTNORM_DEFAULT_ARCH_LIST
                        archs when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (default:
                        DEFAULT_ARCH_LIST, every arch a wheel for other machines needs; the
                        Makefile's development builds set 9.0, the CI's)
  FASTNORM_BUILD_DIR    where ninja keeps the object files (default build/ext): kept between
                        builds, so a rebuild compiles only the units whose sources changed
  MAX_JOBS              parallel nvcc jobs (ninja)
  FASTNORM_FORCE_CUDA=1 build the CUDA sources even with no GPU visible (CI)
  FASTNORM_SKIP_CUDA=1  install the pure-Python package only
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# CUDA 13 dropped sm < 7.5; PTX for the newest keeps future GPUs working (JIT).
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _log(msg):
    print(f"fastnorm setup: {msg}", file=sys.stderr)


def _has_cudart(prefix):
    return bool(prefix) and bool(glob.glob(os.path.join(prefix, "lib64", "libcudart.so*"))
                                 + glob.glob(os.path.join(prefix, "lib", "libcudart.so*")))


def find_cuda_home():
    """The real toolkit prefix. The nvcc on PATH may be a wrapper script in a folder whose parent
    has no libcudart (so torch's own guess links against nothing): follow the wrapper."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and _has_cudart(env):
        return env
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: look for the nvcc it runs
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "cuda"))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _has_cudart(c) and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return os.path.realpath(c)
    return None


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def decide_cuda():
    """(build_cuda, reason)."""
    if os.environ.get("FASTNORM_SKIP_CUDA") == "1":
        return False, "FASTNORM_SKIP_CUDA=1"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    force = os.environ.get("FASTNORM_FORCE_CUDA") == "1"
    if not torch.cuda.is_available() and not force:
        return False, "no GPU visible (set FASTNORM_FORCE_CUDA=1 to build anyway)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = (os.environ.get("FASTNORM_DEFAULT_ARCH_LIST")
                                              or DEFAULT_ARCH_LIST)
    return True, f"CUDA toolkit at {cuda_home}"


BUILD_DIR = os.environ.get("FASTNORM_BUILD_DIR") or os.path.join(ROOT, "build", "ext")
# ninja -v prints "[done/total, elapsed] <command>" as each unit finishes (NINJA_STATUS below)
# (torch's nvcc command line says "-c -c <source>": the source is the -c argument that is no flag)
_NINJA_LINE = re.compile(r"^\[(\d+)/(\d+), ([\d.]+)s\] .*\s-c\s+([^\s-]\S*)")


def _build_ext(base):
    """base (torch's BuildExtension) made incremental, talkative and recording ptxas's report.

    - Object files live in BUILD_DIR, kept between builds (pip's editable installs otherwise build
      in a fresh temporary folder each time). ninja always runs (force): it alone decides what is
      stale, from each unit's header dependencies and command line, so a new arch list or flag
      recompiles everything and an edit to one source recompiles the units that include it.
    - Progress: one line per compiled unit as it finishes, then each unit's time and the total.
    - ptxas's `info` lines (-v: registers, stack frame, spills per kernel) are kept out of the
      console and merged into build/ptxas_resources.json for fastnorm.resources; an incremental
      build recompiles some sources only, the merge keeps the other kernels' records.
    ninja prints its jobs' output on fd 1; while the extension compiles, fd 1 is a pipe read here.
    Any failure of the bookkeeping costs the report, never the build.
    """
    import threading
    import time

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = BUILD_DIR
            self.force = True

        def build_extensions(self):
            os.environ.setdefault("NINJA_STATUS", "[%f/%t, %es] ")
            log_path = os.path.join(self.build_temp, ".ninja_log")
            log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            t0 = time.monotonic()
            try:
                saved = os.dup(1)
                read_fd, write_fd = os.pipe()
            except OSError as e:
                _log(f"not recording ptxas's resource usage ({e})")
                return super().build_extensions()
            kept = []

            def pump():
                with os.fdopen(read_fd, "rb") as src:
                    for line in src:
                        try:
                            text = line.decode("utf-8", "replace")
                            m = _NINJA_LINE.match(text)
                            if m:
                                done, total, secs, unit = m.groups()
                                os.write(saved, (f"fastnorm setup: [{done}/{total}] compiled "
                                                 f"{os.path.relpath(unit, ROOT)} "
                                                 f"({float(secs):.0f} s into the build)\n").encode())
                            elif text.startswith("ptxas info") or re.match(r"\s+\d+ bytes stack frame", text):
                                kept.append(text)
                            else:
                                os.write(saved, line)
                        except Exception:
                            pass  # keep draining: the build must never block on a full pipe

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            sys.stdout.flush()
            os.dup2(write_fd, 1)
            os.close(write_fd)
            try:
                super().build_extensions()
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)  # the pipe's last writer closes: the reader sees its end
                reader.join(timeout=60)
                os.close(saved)
            _report_unit_times(log_path, log_start, time.monotonic() - t0)
            _record_ptxas(kept)  # a failed build records nothing

    return BuildExt


def _report_unit_times(log_path, offset, wall):
    """Each unit this build compiled, with its time (ninja's log: start and end in ms per output),
    longest first, and the totals."""
    try:
        with open(log_path) as f:
            f.seek(offset if os.path.getsize(log_path) >= offset else 0)  # ninja may compact it
            rows = [line.split("\t") for line in f if not line.startswith("#")]
        times = {}
        for r in rows:
            if len(r) >= 4 and r[3].endswith(".o"):
                times[os.path.relpath(r[3], ROOT) if os.path.isabs(r[3]) else r[3]] = \
                    (int(r[1]) - int(r[0])) / 1000
        if not times:
            _log(f"nothing to compile: every unit is up to date ({wall:.0f} s)")
            return
        for unit, t in sorted(times.items(), key=lambda kv: -kv[1]):
            _log(f"{t:7.1f} s  {unit}")
        _log(f"compiled {len(times)} unit(s): longest {max(times.values()):.0f} s, sum "
             f"{sum(times.values()):.0f} s, wall {wall:.0f} s with {os.environ.get('MAX_JOBS') or 'ninja default'} jobs")
    except Exception as e:
        _log(f"could not report the units' build times: {type(e).__name__}: {e}")


def _record_ptxas(lines):
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_fastnorm_resources", os.path.join(ROOT, "fastnorm", "resources.py"))
        resources = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = resources  # (dataclasses look their module up there)
        spec.loader.exec_module(resources)
        n = resources.record_ptxas_output("".join(lines))
        _log(f"ptxas resource usage of {n} kernel(s) recorded in {resources.PTXAS_RECORD}")
    except Exception as e:  # the record is a report, never a reason to fail the build
        _log(f"could not record ptxas's resource usage: {type(e).__name__}: {e}")


def main():
    build_cuda, reason = decide_cuda()
    ext_modules, cmdclass = [], {}
    record = {"commit": git_commit(), "built_cuda": build_cuda, "reason": reason}
    if build_cuda:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        # --ptxas-options=-v: ptxas states each kernel's registers, stack frame and spill
        # stores/loads; _build_ext_recording_ptxas files that under build/ (not on the console).
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                      "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "--ptxas-options=-v"]
        cxx_flags = ["-O3", "-std=c++20"]
        sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
        ext_modules.append(CUDAExtension(
            name="fastnorm._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}))
        cmdclass["build_ext"] = _build_ext(BuildExtension.with_options(use_ninja=True))
        record.update({
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_home": os.environ["CUDA_HOME"],
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU"),
            "nvcc_flags": nvcc_flags, "cxx_flags": cxx_flags,
        })
        _log(f"building the CUDA extension ({reason}; archs {record['arch_list']})")
    else:
        try:
            import torch
            record["torch"] = torch.__version__
        except ImportError:
            pass
        _log(f"installing the pure-Python package: {reason}")
    with open(os.path.join(ROOT, "fastnorm", "_build_info.json"), "w") as f:
        json.dump(record, f, indent=1)

    setup(
        name="fastnorm",
        version="0.1.0",
        description="Fused BatchNorm/LayerNorm/InstanceNorm/GroupNorm for PyTorch",
        packages=find_packages(include=["fastnorm", "fastnorm.*"]),
        package_data={"fastnorm": ["_build_info.json"]},
        python_requires=">=3.11",
        install_requires=["torch>=2.11"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


main()
