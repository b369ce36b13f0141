"""Mechanical rewrite of csrc/ for the CPU emulation build: declarations only, never arithmetic.

Three rewrites, each kept on its original lines (so file:line in the emulator's messages are the
sources' own, through a #line directive at the top of every file):
  __global__ void __launch_bounds__(B[, M]) k(...) {  ->  __global__ void k(...) { kernel_entry(..., B[, M]);
  __global__ void k(...) {                            ->  __global__ void k(...) { kernel_entry(..., 0);
  [static] __shared__ [__align__(n)] T name[N]...;    ->  T (&name)[N]... = block_shared(...)
  extern __shared__ [__align__(n)] T name[];          ->  T* name = dynamic_shared()
.cu files become .cpp (g++ compiles them as C++). Everything else is copied unchanged.
"""
from __future__ import annotations

import os
import re
import sys

_SHARED = re.compile(r"(?<![\w])__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[^;\[\]=]+?)\s+"
                     r"(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])+)\s*;")
_DYN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[^;\[\]=]+?)\s+"
                         r"(?P<name>\w+)\s*\[\s*\]\s*;")
_GLOBAL = re.compile(r"__global__\s+void\s+")


def _balanced(text: str, i: int) -> int:
    """Index just past the parenthesised group that starts at text[i] == '('."""
    assert text[i] == "(", text[i:i + 20]
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unbalanced parentheses")


def _rewrite_kernels(text: str, path: str) -> tuple[str, int]:
    out, pos, count = [], 0, 0
    for m in _GLOBAL.finditer(text):
        if m.start() < pos:
            continue
        i = m.end()
        bounds = "0"
        lb = re.match(r"__launch_bounds__\s*", text[i:])
        if lb:
            j = i + lb.end()
            end = _balanced(text, j)
            bounds = " ".join(text[j + 1:end - 1].split())
            # drop the attribute, keep its newlines
            text_attr = text[i:end]
            out.append(text[pos:i])
            out.append("\n" * text_attr.count("\n"))
            pos = end
            i = end
        name = re.match(r"\s*(\w+)\s*", text[i:])
        if not name:
            raise ValueError(f"{path}: cannot parse the kernel after offset {m.start()}")
        k = i + name.end()
        params_end = _balanced(text, k)
        brace = re.match(r"\s*\{", text[params_end:])
        if not brace:  # a declaration, not a definition
            continue
        body = params_end + brace.end()
        out.append(text[pos:body])
        out.append(f" ::fastnorm_emu::kernel_entry(__PRETTY_FUNCTION__, {bounds});")
        pos = body
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def _rewrite_shared(text: str) -> tuple[str, int]:
    def dyn(m):
        t, n = " ".join(m.group("type").split()), m.group("name")
        return f"{t}* {n} = static_cast<{t}*>(::fastnorm_emu::dynamic_shared());"

    def static(m):
        t, n, dims = " ".join(m.group("type").split()), m.group("name"), m.group("dims")
        key, ty = f"{n}_fastnorm_emu_key", f"{n}_fastnorm_emu_t"
        return (f"static const char {key} = 0; using {ty} = {t}{dims}; "
                f"{ty}& {n} = *static_cast<{ty}*>(::fastnorm_emu::block_shared(&{key}, sizeof({ty})));")

    text, a = _DYN_SHARED.subn(dyn, text)
    text, b = _SHARED.subn(static, text)
    return text, a + b


def rewrite_file(path: str, out: str, display: str) -> dict:
    """Rewrite one file to `out` (written only when it changes: ninja then rebuilds only what
    changed); `display` is the name file:line messages give."""
    with open(path) as fh:
        text = fh.read()
    text, k = _rewrite_kernels(text, display)
    text, s = _rewrite_shared(text)
    code = re.sub(r"//[^\n]*", "", text)
    if "__launch_bounds__" in code or re.search(r"\b__shared__\b", code):
        raise ValueError(f"{display}: a __launch_bounds__ or __shared__ declaration the rewrite "
                         f"does not understand")
    body = f'#line 1 "{display}"\n' + text
    os.makedirs(os.path.dirname(out), exist_ok=True)
    old = None
    if os.path.exists(out):
        with open(out) as fh:
            old = fh.read()
    if old != body:
        with open(out, "w") as fh:
            fh.write(body)
    return {"kernels": k, "shared": s}


def cpp_name(rel: str) -> str:
    return rel[:-3] + ".cpp" if rel.endswith(".cu") else rel


def rewrite_tree(src: str, dst: str, display_root: str) -> dict:
    """Copy src (csrc/) to dst with the rewrites; returns counts per file."""
    counts = {}
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            if not f.endswith((".cu", ".cuh", ".h", ".cpp")):
                continue
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, src)
            counts[rel] = rewrite_file(p, os.path.join(dst, cpp_name(rel)),
                                       os.path.join(display_root, rel))
    return counts


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    for rel, c in rewrite_tree(src, dst, "csrc").items():
        print(f"{rel}: {c['kernels']} kernels, {c['shared']} shared declarations")
