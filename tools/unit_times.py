"""Compile time of each unit of the extension, measured one unit at a time.

    python tools/unit_times.py [BUILD_DIR] [UNIT ...]   # default build/ext (after a build); all units,
                                                        # or those whose source path contains UNIT

Runs every compile command of BUILD_DIR/build.ninja (`ninja -t commands`: the exact commands the
last build ran, arch list included) one after another, writing to a scratch folder, and prints each
unit's wall and CPU time (user + sys of the compiler and its children), longest first, then the
longest unit and the sums. CPU time is what to compare between machines or layouts: unlike ninja's
own log (wall time, several jobs at once), it barely moves when other work shares the machine.
"""
from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_commands(build_dir: str) -> list[tuple[str, str]]:
    """(source, command) for every compile edge of the build."""
    ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    out = subprocess.run([ninja if os.path.exists(ninja) else "ninja", "-C", build_dir, "-t",
                          "commands"], capture_output=True, text=True, check=True).stdout
    cmds = []
    for line in out.splitlines():
        m = re.search(r"\s-c\s+([^\s-]\S*)", line)  # nvcc's lines say "-c -c <source>"
        if m:
            cmds.append((os.path.relpath(m.group(1), ROOT), line))
    return cmds


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    build_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "ext")
    wanted = sys.argv[2:]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for src, cmd in compile_commands(build_dir):
            if wanted and not any(w in src for w in wanted):
                continue
            obj = os.path.join(scratch, "unit.o")
            # the object and its depfile go to the scratch folder: the build stays as it was
            cmd = re.sub(r"(\s-o\s+)\S+", lambda m: m.group(1) + shlex.quote(obj), cmd)
            cmd = re.sub(r"(\s-MF\s+)\S+", lambda m: m.group(1) + shlex.quote(obj + ".d"), cmd)
            cpu0, t0 = children_cpu(), time.monotonic()
            subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=build_dir)
            rows.append((src, time.monotonic() - t0, children_cpu() - cpu0))
            print(f"{rows[-1][1]:7.1f} s wall {rows[-1][2]:7.1f} s cpu  {src}", flush=True)
    rows.sort(key=lambda r: -r[2])
    print(f"\n{len(rows)} units, one at a time ({build_dir})")
    for src, wall, cpu in rows:
        print(f"  {cpu:7.1f} s cpu  {wall:7.1f} s wall  {src}")
    print(f"longest unit: {rows[0][0]} {rows[0][2]:.0f} s cpu; sum {sum(r[2] for r in rows):.0f} s cpu, "
          f"{sum(r[1] for r in rows):.0f} s wall")


if __name__ == "__main__":
    main()
