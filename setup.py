"""Build fastnorm: the Python package plus, when a CUDA toolkit is found, the extension fastnorm._C.

Environment:
  CUDA_HOME             toolkit prefix (the folder whose lib64 holds libcudart); found from nvcc otherwise
  TORCH_CUDA_ARCH_LIST  archs to build (default: the visible GPU's, else DEFAULT_ARCH_LIST)
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
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return True, f"CUDA toolkit at {cuda_home}"


def _build_ext_recording_ptxas(base):
    """base (torch's BuildExtension), with ptxas's -v report recorded for fastnorm.resources.

    ninja prints each nvcc job's output on fd 1. While the extension compiles, fd 1 is a pipe read
    here: ptxas's `info` lines (and their "N bytes stack frame, ..." continuations) are kept out of
    the console, every other line passes through unchanged. Once the build is done the kept lines
    are merged into build/ptxas_resources.json by fastnorm/resources.py (loaded from its file: the
    package is not imported while it builds). An incremental build recompiles some sources only;
    the merge keeps the other kernels' records. Any failure here costs the record, never the build.
    """
    import threading

    class BuildExt(base):
        def build_extensions(self):
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
                            if text.startswith("ptxas info") or re.match(r"\s+\d+ bytes stack frame", text):
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
            _record_ptxas(kept)  # a failed build records nothing

    return BuildExt


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
        cmdclass["build_ext"] = _build_ext_recording_ptxas(BuildExtension.with_options(use_ninja=True))
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
