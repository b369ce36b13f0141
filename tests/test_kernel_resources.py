"""Register and occupancy budgets of every compiled kernel (fastnorm/resources.py).

The budget tests read the built extension (cuobjdump) and the ptxas -v record setup.py leaves in
build/: no kernel may spill at its register cap, every kernel states its __launch_bounds__, and
each kernel's resident blocks per SM on sm_90 (from its registers, static shared memory and block
size) must reach the min_blocks of its own launch bounds. They skip, saying why, where the
extension was not built with CUDA or no cuobjdump is found; CI builds it and has both.

The arithmetic (occupancy, ptxas's register cap) and the parsers are checked everywhere; the
occupancy also against cuda_occupancy.h itself, where a C++ compiler and the header are found.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from fastnorm import _ext, resources


# ------------------------------------------------------------------------------------------------
# the budgets of today's build
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    so = resources.find_extension()
    if so is None:
        reason = _ext.build_info().get("reason", "no build record")
        pytest.skip(f"the extension fastnorm/_C*.so was not built with CUDA ({reason})")
    if resources.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/, PATH, or triton's bundled copy)")
    try:
        found = resources.collect(so)
    except resources.Unavailable as e:
        if "holds no" in str(e):
            pytest.skip(str(e))
        raise
    resources.write_report(found, so)  # build/kernel_resources.json, for the CI log's readers
    return found


def _listing(rows):
    return "\n".join("  " + r for r in rows)


def test_kernels_found(kernels):
    """Kernels are discovered in the binary: one entry per kernel and translation unit."""
    assert len(kernels) >= 10, [k.name for k in kernels]
    keys = [(k.source, k.mangled) for k in kernels]
    assert len(set(keys)) == len(keys)
    for k in kernels:
        assert k.source.endswith(".cu") and k.registers > 0 and k.name, k
        assert "(" not in k.name.split("<")[0], k.name  # the parameter list is gone


def test_every_kernel_has_launch_bounds(kernels):
    missing = [f"{k.name} [{k.source}]" for k in kernels if not k.max_threads]
    assert not missing, (f"{len(missing)} kernel(s) without __launch_bounds__ (no EIATTR_MAX_THREADS):\n"
                         + _listing(missing))


def test_no_register_pressure_spills(kernels):
    """Spill stores/loads as ptxas -v counted them in the build that made this binary, at the
    kernel's register cap: the budget its __launch_bounds__ set is too small for its code. (Spills
    below the cap are register saves around out-of-line calls, listed by info --kernels; see
    KernelResources.pressure_spills.)"""
    unknown = [f"{k.name} [{k.source}]: {k.spill_evidence}; {k.registers} registers, "
               f"{k.stack_frame} B stack frame" for k in kernels if k.spills is None]
    spilling = [f"{k.name} [{k.source}]: {k.spill_stores} B spill stores, {k.spill_loads} B spill "
                f"loads ({k.registers} registers, {k.stack_frame} B stack frame, "
                f"__launch_bounds__({k.max_threads}) -> register cap {k.register_cap})"
                for k in kernels if k.pressure_spills]
    msg = []
    if spilling:
        msg.append(f"{len(spilling)} of {len(kernels)} kernel(s) spill at their register cap:\n"
                   + _listing(spilling))
    if unknown:
        msg.append(f"{len(unknown)} kernel(s) without a current ptxas -v record, so their spills are "
                   f"unknown (rebuild with setup.py: make build):\n" + _listing(unknown))
    assert not msg, "\n".join(msg)


def test_resident_blocks_meet_launch_bounds(kernels):
    """The plan sizes grids for min_blocks resident blocks per SM (1 when unstated)."""
    short = [f"{k.name} [{k.source}]: {k.resident_blocks} resident block(s)/SM < min_blocks "
             f"{k.min_blocks or 1} of __launch_bounds__({k.max_threads}, {k.min_blocks or 1}); "
             f"{k.registers} registers, {k.static_smem} B static smem, limited by "
             f"{', '.join(k.limited_by)}"
             for k in kernels if k.max_threads and k.resident_blocks < (k.min_blocks or 1)]
    assert not short, (f"{len(short)} kernel(s) below their launch-bounds budget on {resources.ARCH}:\n"
                       + _listing(short))


def _report_kernels():
    """The kernels of build/kernel_resources.json (the last CUDA build's report; CI's kernels
    fixture writes it), or a skip saying why there is none."""
    import json
    try:
        with open(resources.REPORT_PATH) as f:
            data = json.load(f)
    except OSError:
        pytest.skip(f"no resource report ({resources.REPORT_PATH}): python -m fastnorm.info "
                    "--kernels writes it from a CUDA build")
    assert data.get("arch") == resources.ARCH, data.get("arch")
    return data["kernels"]


def test_report_budgets_met():
    """From the report alone (no extension or cuobjdump needed, so also where the report was
    copied from a CUDA build): each kernel's resident blocks per SM, computed again here from its
    registers, static shared memory and barriers at its __launch_bounds__ block size, reach the
    min_blocks its launch bounds declare (the register budget its plan counts on: the channels_last
    GroupNorm kernels choose theirs from bytes in flight, kernels/channels_common.cuh), and no
    kernel spills at its register cap."""
    short, spilling = [], []
    for k in _report_kernels():
        if not k["max_threads"]:
            continue
        blocks, limits = resources.resident_blocks(k["max_threads"], k["registers"],
                                                   k["static_smem"], 0, k.get("barriers", 0))
        want = k.get("min_blocks") or 1
        if blocks < want:
            short.append(f"{k['name']} [{k['source']}]: {blocks} resident block(s)/SM < min_blocks "
                         f"{want} ({k['registers']} registers, {k['static_smem']} B static smem; "
                         f"limits {limits})")
        if k.get("spill_stores") and k["registers"] >= (k.get("register_cap") or 255):
            spilling.append(f"{k['name']} [{k['source']}]: {k['spill_stores']} B spill stores, "
                            f"{k.get('spill_loads')} B loads at its cap of {k['registers']} registers")
    assert not short and not spilling, "\n".join(
        ([f"{len(short)} kernel(s) below their launch-bounds budget:"] + short if short else [])
        + ([f"{len(spilling)} kernel(s) spill at their register cap:"] + spilling if spilling else []))


def test_report_json_and_table(kernels, tmp_path):
    path = resources.write_report(kernels, resources.find_extension(), str(tmp_path / "r.json"))
    import json
    data = json.load(open(path))
    assert len(data["kernels"]) == len(kernels)
    assert data["sm_limits"]["regs_per_sm"] == 65536
    table = resources.format_table(kernels)
    for k in kernels:
        assert k.name in table


# ------------------------------------------------------------------------------------------------
# the arithmetic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads,regs,smem,barriers,expected,limiter", [
    (256, 40, 1280, 1, 6, "registers"),     # 1280 regs/warp: 12 warps per sub-partition = 48 warps
    (256, 32, 1024, 1, 8, "warps"),         # 64 warps / 8
    (1024, 64, 0, 1, 1, "registers"),       # 2048 regs/warp: 8 per sub-partition, 32 warps = 1 block
    (1024, 65, 0, 1, 0, "registers"),       # 72 regs -> 2304/warp: 7 per sub-partition < 8
    (32, 16, 0, 0, 32, "blocks"),
    (128, 255, 0, 0, 2, "registers"),       # 8192/warp: 2 per sub-partition = 8 warps
    (96, 40, 0, 0, 16, "registers"),        # 12 warps/partition = 48 warps over 3-warp blocks
    (256, 32, 48 * 1024, 1, 4, "shared memory"),   # 49 KB per block: 228 / 49
    (128, 32, 17664, 1, 12, "shared memory"),      # 17664 + 1024 -> 18688: 233472 // 18688
    (64, 8, 0, 16, 4, "barriers"),          # 2 x 32 named barriers / 16
])
def test_resident_blocks_cases(threads, regs, smem, barriers, expected, limiter):
    blocks, limits = resources.resident_blocks(threads, regs, smem, 0, barriers)
    assert blocks == expected, limits
    assert limits[limiter] == expected, limits


def test_resident_blocks_dynamic_smem_and_invalid():
    assert resources.resident_blocks(256, 32, 0, 227 * 1024)[0] == 1
    assert resources.resident_blocks(256, 32, 1024, 227 * 1024)[0] == 0  # over a block's maximum
    assert resources.resident_blocks(2048, 32, 0)[0] == 0                 # over 1024 threads


# ptxas 13.0's EIATTR_MAXREG_COUNT for __launch_bounds__(threads, min_blocks), sm_90 (from a
# cubin compiled for this table: one kernel per pair).
PTXAS_CAPS = {
    (32, 1): 255, (32, 8): 255, (32, 9): 168, (32, 16): 128, (32, 32): 64, (33, 1): 255,
    (33, 4): 255, (64, 3): 255, (96, 1): 255, (96, 5): 128, (128, 1): 255, (128, 2): 255,
    (128, 3): 168, (128, 5): 96, (128, 7): 72, (160, 3): 128, (192, 2): 168, (256, 1): 255,
    (256, 2): 128, (256, 3): 80, (256, 4): 64, (384, 1): 168, (384, 2): 80, (384, 3): 56,
    (512, 1): 128, (512, 2): 64, (512, 3): 40, (640, 1): 96, (640, 2): 48, (768, 1): 80,
    (768, 2): 40, (1000, 1): 64, (1000, 2): 32, (1024, 1): 64, (1024, 2): 32,
}


def test_ptxas_register_cap_matches_ptxas():
    got = {tm: resources.ptxas_register_cap(*tm) for tm in PTXAS_CAPS}
    assert got == PTXAS_CAPS


def test_register_cap_gives_min_blocks():
    """A kernel at ptxas's cap for (threads, min_blocks) fits min_blocks blocks by registers."""
    for threads in range(32, 1025, 32):
        for m in range(1, 33):
            if threads * m > 2048:
                break
            cap = resources.ptxas_register_cap(threads, m)
            _, limits = resources.resident_blocks(threads, cap, 0)
            assert limits["registers"] >= m, (threads, m, cap, limits)


def test_implied_min_blocks():
    for (threads, m), cap in PTXAS_CAPS.items():
        implied = resources.implied_min_blocks(threads, cap)
        assert implied <= m and resources.ptxas_register_cap(threads, implied) == cap
    assert resources.implied_min_blocks(256, 64) == 4
    assert resources.implied_min_blocks(1024, 64) == 1
    assert resources.implied_min_blocks(1024, 40) is None   # a __maxnreg__ cap, not a min_blocks one
    assert resources.implied_min_blocks(None, 255) is None


_OCC_PROGRAM = r"""
#include <cstdio>
#include "cuda_occupancy.h"
int main() {
  cudaOccDeviceProp p;  // H100 SXM (sm_90), as cudaGetDeviceProperties reports it
  p.computeMajor = 9; p.computeMinor = 0; p.maxThreadsPerBlock = 1024;
  p.maxThreadsPerMultiprocessor = 2048; p.regsPerBlock = 65536; p.regsPerMultiprocessor = 65536;
  p.warpSize = 32; p.sharedMemPerBlock = 49152; p.sharedMemPerMultiprocessor = 233472;
  p.numSms = 132; p.sharedMemPerBlockOptin = 232448; p.reservedSharedMemPerBlock = 1024;
  cudaOccDeviceState s;
  const int threads[] = {32, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1000, 1024};
  const int smem[] = {0, 1, 1024, 1280, 4000, 17664, 40000, 49152};
  const int dyn[] = {0, 3 * 256 * 8 * 4, 100000, 200000};
  for (int t : threads) for (int r = 1; r <= 255; r += 3) for (int sm : smem) for (int d : dyn)
  for (int b = 0; b <= 2; ++b) {
    cudaOccFuncAttributes a;
    a.maxThreadsPerBlock = 1024; a.numRegs = r; a.sharedSizeBytes = sm;
    a.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN; a.maxDynamicSharedSizeBytes = 232448 - sm;
    a.numBlockBarriers = b;
    cudaOccResult res;
    if (cudaOccMaxActiveBlocksPerMultiprocessor(&res, &p, &a, &s, t, d) != CUDA_OCC_SUCCESS) return 1;
    std::printf("%d %d %d %d %d %d\n", t, r, sm, d, b, res.activeBlocksPerMultiprocessor);
  }
  return 0;
}
"""


def _occupancy_header():
    for home in resources._cuda_homes():
        path = os.path.join(home, "include", "cuda_occupancy.h")
        if os.path.exists(path):
            return path
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations if spec else []) or []:
        for sub in ("cu13", "cuda_runtime"):
            path = os.path.join(loc, sub, "include", "cuda_occupancy.h")
            if os.path.exists(path):
                return path
    return None


def test_resident_blocks_agree_with_cuda_occupancy_h(tmp_path):
    """The Python arithmetic against NVIDIA's own calculator, for sm_90, over a grid of block
    sizes, registers, static and dynamic shared memory and barriers."""
    header = _occupancy_header()
    cxx = shutil.which("c++") or shutil.which("g++")
    if not header or not cxx:
        pytest.skip(f"needs cuda_occupancy.h ({header}) and a C++ compiler ({cxx})")
    src = tmp_path / "occ.cpp"
    src.write_text(_OCC_PROGRAM)
    exe = tmp_path / "occ"
    subprocess.run([cxx, "-O1", "-std=c++17", "-I", os.path.dirname(header), str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=120).stdout
    mismatches, n = [], 0
    for line in out.splitlines():
        t, r, sm, d, b, blocks = map(int, line.split())
        got = resources.resident_blocks(t, r, sm, d, b)[0]
        n += 1
        if got != blocks:
            mismatches.append((t, r, sm, d, b, blocks, got))
    assert n > 10000
    assert not mismatches, f"{len(mismatches)} of {n} differ (threads, regs, smem, dyn, barriers, " \
                           f"cuda_occupancy.h, ours): {mismatches[:20]}"


# ------------------------------------------------------------------------------------------------
# the parsers, on the tools' own output
# ------------------------------------------------------------------------------------------------
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fastnorm3row21row_fwd_cached_kernelIN3c104HalfELi8ELb1EEEvNS0_6RowFwdIT_EEi' for 'sm_90'
ptxas info    : Function properties for _ZN8fastnorm3row21row_fwd_cached_kernelIN3c104HalfELi8ELb1EEEvNS0_6RowFwdIT_EEi
    80 bytes stack frame, 76 bytes spill stores, 360 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 1408 bytes smem, 660 bytes cmem[0]
ptxas info    : Compile time = 41.2 ms
ptxas info    : Function properties for $__internal_1_$__cuda_sm20_div_rn_f64_full
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z2kaPf' for 'sm_90'
ptxas info    : Function properties for _Z2kaPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""


def test_parse_ptxas_output():
    rec = resources.parse_ptxas_output(PTXAS_SAMPLE)
    k = "_ZN8fastnorm3row21row_fwd_cached_kernelIN3c104HalfELi8ELb1EEEvNS0_6RowFwdIT_EEi"
    assert rec["sm_90"][k] == {"stack_frame": 80, "spill_stores": 76, "spill_loads": 360,
                               "registers": 64, "smem": 1408}
    assert rec["sm_90"]["_Z2kaPf"] == {"stack_frame": 0, "spill_stores": 0, "spill_loads": 0,
                                       "registers": 8, "smem": 0}
    assert len(rec["sm_90"]) == 2  # the called routine is no kernel


def test_record_ptxas_output_merges(tmp_path):
    path = str(tmp_path / "p.json")
    assert resources.record_ptxas_output(PTXAS_SAMPLE, path) == 2
    again = PTXAS_SAMPLE.split("ptxas info    : Compiling entry function '_Z2kaPf'")[0].replace(
        "76 bytes spill stores", "0 bytes spill stores")
    assert resources.record_ptxas_output(again, path) == 1
    rec = resources.load_ptxas_record(path)["sm_90"]
    assert set(rec) == {"_Z2kaPf", "_ZN8fastnorm3row21row_fwd_cached_kernelIN3c104HalfELi8ELb1EEEvNS0_6RowFwdIT_EEi"}
    assert rec["_ZN8fastnorm3row21row_fwd_cached_kernelIN3c104HalfELi8ELb1EEEvNS0_6RowFwdIT_EEi"]["spill_stores"] == 0


RESOURCE_USAGE_SAMPLE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit
identifier = /work/main/csrc/layer_norm.cu

Resource usage:
 Common:
  GLOBAL:0 CONSTANT[4]:224
 Function _ZN8fastnorm3row20ln_bwd_cached_kernelIfLi1EEEvNS0_6RowBwdIT_EEi:
  REG:64 STACK:48 SHARED:17664 LOCAL:0 CONSTANT[0]:628 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

ELF_SAMPLE = """
Fatbin elf code:
================
arch = sm_90
identifier = /work/main/csrc/layer_norm.cu

64-bit ELF: type=ET_EXEC, ABI=8, sm=90, toolkit=13.0, flags=0xa005a04
.nv.info
\t<0x1>
\tAttribute:\tEIATTR_REGCOUNT
\tFormat:\tEIFMT_SVAL
\tValue:\tfunction: _Z2kbPf(0x10)\tregister count: 8
.nv.info._ZN8fastnorm3row20ln_bwd_cached_kernelIfLi1EEEvNS0_6RowBwdIT_EEi
\t<0x4>
\tAttribute:\tEIATTR_MAXREG_COUNT
\tFormat:\tEIFMT_HVAL
\tValue:\t0x40
\t<0x7>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x400 0x1 0x1 
\t<0x8>
\tAttribute:\tEIATTR_NUM_BARRIERS
\tFormat:\tEIFMT_HVAL
\tValue:\t0x1
.nv.constant0._ZN8fastnorm3row20ln_bwd_cached_kernelIfLi1EEEvNS0_6RowBwdIT_EEi
0x00000000 0x00000000 0x00000000 0x00000000
"""


def test_parse_cuobjdump_outputs():
    name = "_ZN8fastnorm3row20ln_bwd_cached_kernelIfLi1EEEvNS0_6RowBwdIT_EEi"
    usage = resources.parse_resource_usage(RESOURCE_USAGE_SAMPLE)
    assert usage == [{"arch": "sm_90", "source": "/work/main/csrc/layer_norm.cu", "name": name,
                      "REG": 64, "STACK": 48, "SHARED": 17664, "LOCAL": 0, "CONSTANT[0]": 628,
                      "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}]
    attrs = resources.parse_elf_attributes(ELF_SAMPLE.splitlines(keepends=True))
    assert attrs == {("sm_90", "/work/main/csrc/layer_norm.cu", name): {
        "EIATTR_MAXREG_COUNT": [64], "EIATTR_MAX_THREADS": [1024, 1, 1], "EIATTR_NUM_BARRIERS": [1]}}


def test_short_name():
    assert resources.short_name(
        "void fastnorm::row::row_fwd_cached_kernel<c10::Half, 8, true>(fastnorm::row::RowFwd<c10::Half>, int)"
    ) == "row::row_fwd_cached_kernel<Half, 8, true>"
    assert resources.short_name(
        "void fastnorm::row::gn_bwd_coef_kernel<c10::Half>(fastnorm::row::AccOf<c10::Half>::type const*, "
        "bool, long)") == "row::gn_bwd_coef_kernel<Half>"
    assert resources.short_name("_Z2kaPf") == "_Z2kaPf"


def test_report_says_why_when_unavailable(monkeypatch):
    monkeypatch.setattr(resources, "find_extension", lambda: None)
    text = resources.report(write=False)
    assert text.startswith("kernel resources: unavailable:") and "not built" in text


def test_spills_unknown_without_a_current_ptxas_record(kernels):
    """A binary that no recorded ptxas run describes reports its spills as unknown, saying why."""
    so = resources.find_extension()
    missing = resources.collect(so, ptxas_record={})
    assert all(k.spills is None and "no ptxas -v record" in k.spill_evidence for k in missing)
    k0 = kernels[0]
    stale = {k0.arch: {k0.mangled: {"registers": k0.registers + 8, "stack_frame": k0.stack_frame,
                                    "spill_stores": 0, "spill_loads": 0, "smem": 0}}}
    got = next(k for k in resources.collect(so, ptxas_record=stale)
               if (k.source, k.mangled) == (k0.source, k0.mangled))
    assert got.spills is None and "stale" in got.spill_evidence
    assert "?" in resources.format_table(missing)
