"""Per-kernel resource report of the built extension: registers, spills, static shared memory,
launch bounds and the resident blocks per SM (occupancy) they allow on sm_90.

Everything is read from what the build left behind; nothing is compiled again:
  * fastnorm/_C*.so, through `cuobjdump` (the CUDA toolkit's, else the copy that ships with
    triton, a dependency of torch):
      - `cuobjdump --dump-resource-usage`: per kernel REG (registers per thread), STACK (the stack
        frame: spill slots, local arrays, call frames), LOCAL and SHARED (static shared memory);
      - `cuobjdump -elf`, the `.nv.info.<kernel>` attributes: EIATTR_MAX_THREADS is the first
        argument of `__launch_bounds__(max_threads, min_blocks)`; EIATTR_MAXREG_COUNT the register
        cap ptxas compiled to (the second argument is not stored: ptxas turns it into this cap, see
        `implied_min_blocks`); EIATTR_NUM_BARRIERS the named barriers;
  * build/ptxas_resources.json: what ptxas said with -v during the build (setup.py passes
    --ptxas-options=-v and files its lines there through `record_ptxas_output`): the spill stores
    and spill loads in bytes. The binary holds no spill count, only the stack frame, and a stack
    frame is not always spilling (a local array, the frame of a called routine).

The report is written to build/kernel_resources.json and printed by `python -m fastnorm.info
--kernels`. This module imports neither torch nor the extension, and runs no tool at import time.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
from typing import Iterable, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
BUILD_DIR = os.path.join(ROOT, "build")
REPORT_PATH = os.path.join(BUILD_DIR, "kernel_resources.json")
PTXAS_RECORD = os.path.join(BUILD_DIR, "ptxas_resources.json")
ARCH = "sm_90"


class Unavailable(RuntimeError):
    """The report cannot be made here (no extension, no CUDA code in it, no cuobjdump)."""


# ------------------------------------------------------------------------------------------------
# sm_90 (H100) and the arithmetic of CUDA's occupancy calculator
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of compute capability 9.0 (cuda_occupancy.h, the CUDA C++ Programming Guide's
    table of compute capabilities)."""
    arch: str = "sm_90"
    warp_size: int = 32
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256          # registers are allocated per warp, in units of 256
    max_regs_per_thread: int = 255
    sub_partitions: int = 4            # an SM's register file is split into 4 (one per scheduler)
    max_warps_per_sm: int = 64
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024      # with the default carveout (shared memory preferred)
    smem_per_block: int = 227 * 1024   # opt-in maximum a block may use
    reserved_smem_per_block: int = 1024  # the driver's per-block reservation (sm_80 on)
    smem_alloc_unit: int = 128
    barriers_per_block_slot: int = 2   # named barriers available: 2 x max_blocks_per_sm


SM90 = SmLimits()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def resident_blocks(threads: int, regs: int, static_smem: int, dynamic_smem: int = 0,
                    barriers: int = 0, sm: SmLimits = SM90) -> tuple[int, dict]:
    """Blocks of `threads` threads that one SM holds at once: cudaOccMaxActiveBlocksPerMultiprocessor
    of cuda_occupancy.h (default shared memory carveout, no partitioned global caching, which sm_90
    does not have). Returns (blocks, {limit name: blocks under that limit alone}).

      warps per block   W = ceil(threads / 32)
      warps             floor(64 / W)                         (64 warps = 2048 threads per SM)
      blocks            32
      registers         a warp takes R = roundup(regs * 32, 256) registers; each of the 4
                        sub-partitions holds 65536 / 4 registers, so floor(16384 / R) warps:
                        floor(4 * floor(16384 / R) / W); 0 when R * roundup(W, 4) > 65536
                        (the hardware's per-block check) or regs > 255
      shared memory     a block takes S = roundup(static + dynamic + 1 KB reserved, 128) bytes:
                        floor(228 KB / S); 0 when S > 227 KB + 1 KB
      barriers          floor(2 * 32 / named barriers used)

    The resident blocks are the least of these; occupancy = blocks * W / 64.
    """
    if threads <= 0 or threads > sm.max_threads_per_block:
        return 0, {"threads": 0}
    w = _ceil_div(threads, sm.warp_size)
    limits = {"warps": sm.max_warps_per_sm // w, "blocks": sm.max_blocks_per_sm}

    reg_warp = _round_up(regs * sm.warp_size, sm.reg_alloc_unit)
    if (regs > sm.max_regs_per_thread or reg_warp * w > sm.regs_per_block
            or reg_warp * _round_up(w, sm.sub_partitions) > sm.regs_per_block):
        limits["registers"] = 0
    elif reg_warp == 0:
        limits["registers"] = sm.max_blocks_per_sm
    else:
        warps_per_partition = (sm.regs_per_sm // sm.sub_partitions) // reg_warp
        limits["registers"] = warps_per_partition * sm.sub_partitions // w

    smem = _round_up(static_smem + dynamic_smem + sm.reserved_smem_per_block, sm.smem_alloc_unit)
    if smem > sm.smem_per_block + sm.reserved_smem_per_block:
        limits["shared memory"] = 0
    else:
        limits["shared memory"] = sm.smem_per_sm // smem

    if barriers > 0:
        limits["barriers"] = sm.barriers_per_block_slot * sm.max_blocks_per_sm // barriers
    return min(limits.values()), limits


def ptxas_register_cap(threads: int, min_blocks: int, sm: SmLimits = SM90) -> int:
    """The registers per thread ptxas allows a kernel with __launch_bounds__(threads, min_blocks):
    min_blocks blocks of W = ceil(threads/32) warps spread over the 4 sub-partitions, so each holds
    ceil(min_blocks * W / 4) warps of at most floor(16384 / that / 256) * 256 registers:

      cap = min(255, floor(16384 / ceil(min_blocks * W / 4) / 256) * 8)

    (checked against ptxas 13.0's EIATTR_MAXREG_COUNT for threads 32..1024, min_blocks 1..32)."""
    w = _ceil_div(threads, sm.warp_size)
    warps_per_partition = _ceil_div(min_blocks * w, sm.sub_partitions)
    per_warp = (sm.regs_per_sm // sm.sub_partitions) // warps_per_partition
    cap = (per_warp // sm.reg_alloc_unit) * (sm.reg_alloc_unit // sm.warp_size)
    return min(sm.max_regs_per_thread, cap)


def implied_min_blocks(threads: Optional[int], maxreg: Optional[int], sm: SmLimits = SM90) -> Optional[int]:
    """The min_blocks of __launch_bounds__(threads, min_blocks), recovered from the register cap
    ptxas recorded (EIATTR_MAXREG_COUNT): the least min_blocks whose cap is that cap. The cubin
    does not store min_blocks itself; where several values give one cap (a small block, whose cap
    stays 255 for a few blocks) this is the smallest, so a budget check built on it never asks
    for more than the source did. None when no min_blocks gives the cap (__maxnreg__ or
    -maxrregcount set it) or the kernel has no launch bounds."""
    if not threads or not maxreg:
        return None
    for m in range(1, sm.max_blocks_per_sm + 1):
        if ptxas_register_cap(threads, m, sm) == maxreg:
            return m
    return None


# ------------------------------------------------------------------------------------------------
# tools and files
# ------------------------------------------------------------------------------------------------
def _cuda_homes() -> list[str]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as f:
            homes.append(json.load(f).get("cuda_home"))
    except (OSError, ValueError):
        pass
    homes += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return [h for h in homes if h]


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary utility: the toolkit's (CUDA_HOME, the build record's toolkit, PATH,
    /usr/local/cuda*), else the copy triton ships (torch depends on triton; its cuobjdump reads
    the cubins of CUDA 13.0). Not every toolkit install has cuobjdump (a minimal one may hold
    nvcc and ptxas only)."""
    for home in _cuda_homes():
        path = os.path.join(home, "bin", name)
        if os.access(path, os.X_OK):
            return path
    path = shutil.which(name)
    if path:
        return path
    try:
        spec = importlib.util.find_spec("triton")  # locates the package, does not import it
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = os.path.join(loc, "backends", "nvidia", "bin", name)
            if os.access(path, os.X_OK):
                return path
    return None


def find_extension() -> Optional[str]:
    """fastnorm/_C*.so next to this file, if it was built."""
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    return found[0] if found else None


def _run(cmd: list[str], timeout: int = 300) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r.stdout


# ------------------------------------------------------------------------------------------------
# cuobjdump --dump-resource-usage and cuobjdump -elf
# ------------------------------------------------------------------------------------------------
_RU_HEADER = re.compile(r"^\s*(arch|identifier)\s*=\s*(\S+)")
_RU_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RU_FIELDS = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> list[dict]:
    """`cuobjdump --dump-resource-usage` -> [{arch, source, name, REG, STACK, SHARED, LOCAL, ...}].
    One entry per kernel and cubin (a kernel in two translation units appears twice)."""
    out, arch, source, name = [], None, None, None
    for line in text.splitlines():
        m = _RU_HEADER.match(line)
        if m:
            if m.group(1) == "arch":
                arch = m.group(2)
            else:
                source = m.group(2)
            continue
        m = _RU_FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = {k: int(v) for k, v in _RU_FIELDS.findall(line)}
            out.append({"arch": arch, "source": source, "name": name, **fields})
            name = None
    return out


_ELF_FILE = re.compile(r"^\s*arch\s*=\s*(\S+)")
_ELF_IDENT = re.compile(r"^\s*identifier\s*=\s*(\S+)")
_ELF_SECTION = re.compile(r"^\.nv\.info\.(\S+)\s*$")
_ELF_ATTR = re.compile(r"^\s*Attribute:\s*(EIATTR_\w+)")
_ELF_VALUE = re.compile(r"^\s*Value:\s*(.*)$")
_ELF_KEEP = {"EIATTR_MAX_THREADS", "EIATTR_MAXREG_COUNT", "EIATTR_NUM_BARRIERS",
             "EIATTR_MIN_CTA_PER_SM", "EIATTR_REQNTID"}


def parse_elf_attributes(lines: Iterable[str]) -> dict:
    """`cuobjdump -elf` -> {(arch, source, kernel): {attribute: [ints]}} for the attributes of the
    `.nv.info.<kernel>` sections that matter here (the dump's other 99% is skipped)."""
    out: dict = {}
    arch = source = kernel = attr = None
    for line in lines:
        if line[:1] not in ("\t", " ", "\n", ""):  # column 0: a file header or a section's name
            m = _ELF_SECTION.match(line)
            kernel = m.group(1) if m else None
            attr = None
            m = _ELF_FILE.match(line)
            if m:
                arch = m.group(1)
            m = _ELF_IDENT.match(line)
            if m:
                source = m.group(1)
            continue
        if kernel is None:
            continue
        m = _ELF_ATTR.match(line)
        if m:
            attr = m.group(1) if m.group(1) in _ELF_KEEP else None
            continue
        if attr:
            m = _ELF_VALUE.match(line)
            if m:
                vals = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", m.group(1))]
                out.setdefault((arch, source, kernel), {})[attr] = vals
                attr = None
    return out


def _elf_attributes(cuobjdump: str, so: str) -> dict:
    # The dump is large (~60 MB for three cubins): read it as a stream.
    proc = subprocess.Popen([cuobjdump, "-elf", so], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    try:
        attrs = parse_elf_attributes(proc.stdout)
    finally:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        rc = proc.wait(timeout=300)
    if rc != 0:
        raise Unavailable(f"{cuobjdump} -elf {so} failed ({rc}): {err.strip()[:500]}")
    return attrs


# ------------------------------------------------------------------------------------------------
# ptxas -v, recorded during the build
# ------------------------------------------------------------------------------------------------
_PTX_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTX_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_PTX_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_PTX_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_output(text: str) -> dict:
    """ptxas -v's lines -> {arch: {kernel: {registers, stack_frame, spill_stores, spill_loads,
    smem}}}. Only entry functions (kernels) are kept; a called function's properties are not."""
    out: dict = {}
    entry = arch = props_for = None
    for line in text.splitlines():
        m = _PTX_ENTRY.search(line)
        if m:
            entry, arch = m.group(1), m.group(2)
            props_for = None
            out.setdefault(arch, {})[entry] = {}
            continue
        m = _PTX_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _PTX_FRAME.search(line)
        if m and entry and props_for == entry:
            out[arch][entry].update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
            continue
        m = _PTX_USED.search(line)
        if m and entry:
            rec = out[arch][entry]
            rec["registers"] = int(m.group(1))
            s = _PTX_SMEM.search(line)
            rec["smem"] = int(s.group(1)) if s else 0
    return {a: {k: v for k, v in ks.items() if "registers" in v and "spill_stores" in v}
            for a, ks in out.items()}


def record_ptxas_output(text: str, path: str = PTXAS_RECORD) -> int:
    """Merge ptxas -v output of a build into `path` (called by setup.py after the compile). A
    kernel compiled again replaces its record; the others stay (an incremental build recompiles
    only the sources that changed). Returns the number of kernels in `text`."""
    new = parse_ptxas_output(text)
    try:
        with open(path) as f:
            merged = json.load(f).get("kernels", {})
    except (OSError, ValueError):
        merged = {}
    for arch, kernels in new.items():
        merged.setdefault(arch, {}).update(kernels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": 1, "tool": "ptxas -v (recorded by setup.py)", "kernels": merged}, f,
                  indent=1, sort_keys=True)
    os.replace(tmp, path)
    return sum(len(k) for k in new.values())


def load_ptxas_record(path: str = PTXAS_RECORD) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get("kernels", {})
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------
def demangle(names: list[str]) -> dict[str, str]:
    """{mangled: demangled} through c++filt (binutils); names stay mangled without it."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                           timeout=60)
        lines = r.stdout.splitlines()
        if r.returncode == 0 and len(lines) == len(names):
            return dict(zip(names, lines))
    except (OSError, subprocess.SubprocessError):
        pass
    return {n: n for n in names}


def signature_head(demangled: str) -> str:
    """'void ns::k<c10::Half, 8>(ns::Args<c10::Half>)' -> 'ns::k<c10::Half, 8>': no return type,
    no parameter list (the emulator names its kernels the same way)."""
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list: the '(' that matches the last ')'
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    if s.startswith("void "):
        s = s[5:]
    return s.rstrip()


def short_name(demangled: str) -> str:
    """'void fastnorm::row::row_fwd_cached_kernel<c10::Half, 8, true>(fastnorm::row::RowFwd<..>, int)'
    -> 'row::row_fwd_cached_kernel<Half, 8, true>': signature_head() without fastnorm:: or c10::
    qualifiers."""
    s = signature_head(demangled)
    s = re.sub(r"\b(fastnorm|c10|at)::", "", s)
    s = re.sub(r"\(anonymous namespace\)::", "", s)
    return s


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class KernelResources:
    name: str                      # short, demangled
    mangled: str
    source: str                    # the translation unit (csrc/<file>.cu)
    arch: str
    registers: int
    stack_frame: int               # bytes per thread (cuobjdump STACK)
    local: int                     # bytes per thread of declared local memory (cuobjdump LOCAL)
    static_smem: int               # bytes per block
    max_threads: Optional[int]     # __launch_bounds__ first argument (EIATTR_MAX_THREADS)
    register_cap: Optional[int]    # EIATTR_MAXREG_COUNT
    min_blocks: Optional[int]      # __launch_bounds__ second argument, implied by register_cap
    barriers: int
    spill_stores: Optional[int]    # bytes, ptxas -v; None: no record of this build
    spill_loads: Optional[int]
    spill_evidence: str            # "ptxas -v" or why there is none
    resident_blocks: Optional[int]  # per SM, at max_threads threads, static shared memory only
    limited_by: list
    occupancy: Optional[float]     # resident warps / 64

    @property
    def spills(self) -> Optional[bool]:
        if self.spill_stores is None:
            return None
        return bool(self.spills_bytes)

    @property
    def spills_bytes(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def pressure_spills(self) -> Optional[bool]:
        """Spills with every allowed register in use: the register budget is too small for the
        code. ptxas spills for pressure only once it has run out of registers; spills below the
        cap are the registers it saves around a call into an out-of-line routine (the IEEE
        division slow path, 64-bit integer division), paid only when that call runs."""
        if self.spills is None:
            return None
        return self.spills and self.registers >= (self.register_cap or 255)


# What cuobjdump reads from one binary (tens of seconds for the ~700 kernels of a build), kept per
# (file, modification time, size): a second collect() of the same build, with another ptxas
# record, costs nothing.
_BINARY_FACTS: dict = {}


def _binary_facts(cuobjdump: str, so: str, arch: str, mtime_ns: int, size: int):
    """(resource usage of `arch`'s kernels, their ELF attributes, demangled names) of `so`."""
    key = (cuobjdump, os.path.abspath(so), arch, mtime_ns, size)
    if key not in _BINARY_FACTS:
        usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", so]))
        if not usage:
            raise Unavailable(f"{os.path.basename(so)} holds no CUDA kernels (built without CUDA?)")
        usage = [u for u in usage if u["arch"] == arch]
        if not usage:
            raise Unavailable(f"{os.path.basename(so)} holds no {arch} code")
        attrs = _elf_attributes(cuobjdump, so)
        names = demangle(sorted({u["name"] for u in usage}))
        _BINARY_FACTS.clear()  # one build at a time
        _BINARY_FACTS[key] = (usage, attrs, names)
    return _BINARY_FACTS[key]


def collect(so: Optional[str] = None, arch: str = ARCH, ptxas_record: Optional[dict] = None,
            cuobjdump: Optional[str] = None) -> list[KernelResources]:
    """Every kernel of `arch` in the extension, with its resources. Raises Unavailable with the
    reason when that cannot be known here."""
    so = so or find_extension()
    if not so or not os.path.exists(so):
        raise Unavailable("the extension fastnorm/_C*.so is not built (build with a CUDA toolkit: "
                          "make build)")
    cuobjdump = cuobjdump or find_tool("cuobjdump")
    if not cuobjdump:
        raise Unavailable("cuobjdump not found (CUDA toolkit bin/, PATH, or triton's copy)")
    st = os.stat(so)
    usage, attrs, names = _binary_facts(cuobjdump, so, arch, st.st_mtime_ns, st.st_size)
    ptxas = (load_ptxas_record() if ptxas_record is None else ptxas_record).get(arch, {})

    out = []
    for u in usage:
        a = attrs.get((u["arch"], u["source"], u["name"]), {})
        max_threads = a.get("EIATTR_MAX_THREADS", [None])[0]
        cap = a.get("EIATTR_MAXREG_COUNT", [None])[0]
        barriers = a.get("EIATTR_NUM_BARRIERS", [0])[0]
        min_blocks = (a["EIATTR_MIN_CTA_PER_SM"][0] if "EIATTR_MIN_CTA_PER_SM" in a
                      else implied_min_blocks(max_threads, cap))
        rec = ptxas.get(u["name"])
        if rec is None:
            stores = loads = None
            evidence = "no ptxas -v record for this kernel (build with setup.py to record one)"
        elif rec.get("registers") != u["REG"] or rec.get("stack_frame") != u.get("STACK"):
            stores = loads = None
            evidence = (f"ptxas -v record is stale ({rec.get('registers')} registers, "
                        f"{rec.get('stack_frame')} B frame; the binary has {u['REG']}, "
                        f"{u.get('STACK')} B): rebuild")
        else:
            stores, loads, evidence = rec["spill_stores"], rec["spill_loads"], "ptxas -v"
        if max_threads:
            blocks, limits = resident_blocks(max_threads, u["REG"], u.get("SHARED", 0), 0, barriers)
            limited_by = sorted(k for k, v in limits.items() if v == blocks)
            occupancy = blocks * _ceil_div(max_threads, SM90.warp_size) / SM90.max_warps_per_sm
        else:
            blocks, limited_by, occupancy = None, [], None
        source = os.path.relpath(u["source"], ROOT) if u["source"] and os.path.isabs(u["source"]) else u["source"]
        out.append(KernelResources(
            name=short_name(names[u["name"]]), mangled=u["name"], source=source, arch=u["arch"],
            registers=u["REG"], stack_frame=u.get("STACK", 0), local=u.get("LOCAL", 0),
            static_smem=u.get("SHARED", 0), max_threads=max_threads, register_cap=cap,
            min_blocks=min_blocks, barriers=barriers, spill_stores=stores, spill_loads=loads,
            spill_evidence=evidence, resident_blocks=blocks, limited_by=limited_by,
            occupancy=occupancy))
    out.sort(key=lambda k: (k.source or "", k.name))
    return out


def to_json(kernels: list[KernelResources], so: Optional[str] = None) -> dict:
    return {
        "format": 1,
        "extension": os.path.relpath(so, ROOT) if so else None,
        "arch": ARCH,
        "sm_limits": dataclasses.asdict(SM90),
        "notes": ["resident_blocks: per SM at max_threads threads per block with static shared "
                  "memory only (dynamic shared memory is chosen at launch)",
                  "spill_stores/spill_loads: bytes, from ptxas -v recorded by setup.py; null when "
                  "there is no current record (spill_evidence says why)",
                  "min_blocks: implied by EIATTR_MAXREG_COUNT (the cubin does not store it)"],
        "kernels": [dataclasses.asdict(k) for k in kernels],
    }


def write_report(kernels: list[KernelResources], so: Optional[str] = None,
                 path: str = REPORT_PATH) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_json(kernels, so), f, indent=1)
    return path


def format_table(kernels: list[KernelResources]) -> str:
    def spill(k):
        if k.spill_stores is None:
            return "?"
        tag = "" if not k.spills else (" cap!" if k.pressure_spills else " call")
        return f"{k.spill_stores}/{k.spill_loads}{tag}"

    def bounds(k):
        if not k.max_threads:
            return "none"
        return f"{k.max_threads}" + (f",{k.min_blocks}" if k.min_blocks and k.min_blocks > 1 else "")

    rows = [("kernel", "file", "regs", "spill st/ld B", "stack B", "smem B", "bounds",
             "blocks/SM", "occ %", "limited by")]
    for k in kernels:
        rows.append((k.name, os.path.splitext(os.path.basename(k.source or "?"))[0],
                     str(k.registers), spill(k), str(k.stack_frame), str(k.static_smem), bounds(k),
                     "?" if k.resident_blocks is None else str(k.resident_blocks),
                     "?" if k.occupancy is None else f"{100 * k.occupancy:.0f}",
                     ",".join(k.limited_by)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5, 6, 7, 8}
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    pressure = [k for k in kernels if k.pressure_spills]
    saves = [k for k in kernels if k.spills and not k.pressure_spills]
    unknown = [k for k in kernels if k.spills is None]
    lines.append(f"{len(kernels)} kernels ({ARCH}); {len(pressure)} spill at their register cap; "
                 f"{len(saves)} save registers around out-of-line calls (spills below the cap)"
                 + (f"; {len(unknown)} without a ptxas record ({unknown[0].spill_evidence})"
                    if unknown else ""))
    lines.append("bounds: __launch_bounds__ max threads[,min blocks]; blocks/SM and occupancy at "
                 "that block size, static shared memory only")
    return "\n".join(lines)


def report(write: bool = True) -> str:
    """The table, or one line saying why there is none. Writes build/kernel_resources.json."""
    try:
        so = find_extension()
        kernels = collect(so)
    except Unavailable as e:
        return f"kernel resources: unavailable: {e}"
    except (OSError, subprocess.SubprocessError, ValueError) as e:  # a tool that hung or broke
        return f"kernel resources: unavailable: {type(e).__name__}: {e}"
    text = format_table(kernels)
    if write:
        try:
            text += f"\nwritten to {write_report(kernels, so)}"
        except OSError as e:
            text += f"\n(not written: {e})"
    return text


def main(argv: Optional[list[str]] = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
