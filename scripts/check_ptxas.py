#!/usr/bin/env python3
"""Checks each CUDA kernel's ptxas report in a build log against what an sm_90 SM can run.

setup.py passes ``-Xptxas -v`` to nvcc, so the build log (``.ci/run`` keeps pip's in
build/pip-install.log) holds, per kernel and GPU architecture, lines such as

    ptxas info    : Compiling entry function '_ZN10llama_fast...' for 'sm_90'
    ptxas info    : Function properties for _ZN10llama_fast...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 79 registers, used 1 barriers, 16 bytes smem

This script prints one row per kernel and exits with 1, a line per offender, when a kernel
  - spills registers to local memory (spill stores or loads above 0 bytes), or
  - declares more static shared memory than the 48 KiB a block may have without opting in, or
  - uses more than 255 registers per thread, or
  - cannot fit one block on an SM: registers per thread (allocated per warp, in units of 8 per
    thread) x its block size > 65536 registers.
The block size is the first argument of the kernel's ``__launch_bounds__(...)`` in the .cu
sources (file-level ``constexpr`` integers resolved); a kernel without one gets only the
255-register check, and the output says so. Dynamic shared memory (``extern __shared__``) is
sized at launch time, so it is not in these figures: the launching host code checks it.
A log without any ptxas lines also fails: the build compiled no CUDA, or lost ``-Xptxas -v``,
and nothing would be checked.

Usage: python scripts/check_ptxas.py build/pip-install.log [--sources csrc/cuda]
No compiler or GPU is needed; kernel names are demangled with c++filt when it is installed.
"""

from __future__ import annotations

import argparse
import ast
import operator
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAX_STATIC_SMEM = 48 * 1024     # bytes of static shared memory per block (sm_90, as every arch since sm_20)
MAX_REGISTERS = 255             # registers per thread
REGISTERS_PER_SM = 65536        # sm_90 register file (also the most one block may use)
REGISTER_UNIT = 8               # registers per thread are allocated in 256-register units per warp
WARP = 32

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '([^']+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (\S+)")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
ANY_PTXAS = re.compile(r"\bptxas (info|warning|error|fatal)\b")
LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)\s*(?:\w+\s+)*?(\w+)\s*\(")
CONSTEXPR = re.compile(r"^\s*(?:static\s+)?constexpr\s+[\w:]+\s+(\w+)\s*=\s*([^;]+);", re.M)


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int | None = None
    smem: int = 0
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    name: str = ""
    block: int | None = None


@dataclass
class Report:
    kernels: list[Kernel]
    spilling_functions: list[tuple[str, int, int]]   # non-entry functions with spills
    ptxas_lines: int


def parse_log(text: str) -> Report:
    """Every entry function's figures, per architecture (a kernel compiled twice for the same
    architecture keeps its last report)."""
    kernels: dict[tuple[str, str], Kernel] = {}
    entries_by_name: dict[str, Kernel] = {}
    current: Kernel | None = None      # the entry function whose "Used ..." line comes next
    properties_of: str | None = None   # the function whose stack/spill line comes next
    spilling: dict[str, tuple[int, int]] = {}
    ptxas_lines = 0
    for line in text.splitlines():
        if ANY_PTXAS.search(line):
            ptxas_lines += 1
        if m := ENTRY.search(line):
            current = Kernel(m.group(1), m.group(2))
            kernels[(current.mangled, current.arch)] = current
            entries_by_name[current.mangled] = current
            properties_of = None
        elif m := PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := STACK.search(line)) and properties_of is not None:
            stack, stores, loads = map(int, m.groups())
            kernel = entries_by_name.get(properties_of)
            if kernel is not None and kernel is current:
                kernel.stack, kernel.spill_stores, kernel.spill_loads = stack, stores, loads
            elif stores or loads:   # a device function called through the ABI: spills count too
                spilling[properties_of] = (stores, loads)
            properties_of = None
        elif (m := USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            s = SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
            current = None
    return Report(list(kernels.values()), [(n, s, l) for n, (s, l) in spilling.items()], ptxas_lines)


def demangle(names: list[str]) -> dict[str, str]:
    """``c++filt``'s reading of each name, or the name itself without c++filt."""
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True,
                             check=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::kernel<float>(args)`` -> ``kernel<float>``."""
    name = demangled
    if name.endswith(")"):   # drop the parameter list: the last top-level (...)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.removeprefix("void ")
    depth, cut = 0, 0
    for i, ch in enumerate(name):   # the last '::' outside template arguments
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth == 0 and name.startswith("::", i):
            cut = i + 2
    return name[cut:]


def base_name(name: str) -> str:
    return name.split("<", 1)[0]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv, ast.Div: operator.floordiv, ast.Mod: operator.mod,
        ast.LShift: operator.lshift, ast.RShift: operator.rshift}


def _evaluate(expr: str, constants: dict[str, int]) -> int | None:
    """An integer C expression of literals, +-*/%<<>> and known constants; None otherwise."""
    expr = re.sub(r"(?<=\d)[uUlL]+\b", "", expr.strip())
    expr = re.sub(r"static_cast<\w+>", "", expr)

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in constants:
            return constants[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(ast.dump(node))

    try:
        return value(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def launch_bounds(sources: Path) -> dict[str, list[tuple[str, int | None]]]:
    """kernel base name -> [(file stem, block size or None)] from ``__launch_bounds__(N, ...)``."""
    found: dict[str, list[tuple[str, int | None]]] = {}
    for path in sorted(sources.glob("*.cu")) + sorted(sources.glob("*.cuh")):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        constants: dict[str, int] = {}
        for name, expr in CONSTEXPR.findall(text):
            v = _evaluate(expr, constants)
            if v is not None:
                constants[name] = v
        for args, kernel in LAUNCH_BOUNDS.findall(text):
            first = args.split(",", 1)[0]
            found.setdefault(kernel, []).append((path.stem, _evaluate(first, constants)))
    return found


def block_size(kernel: Kernel, bounds: dict[str, list[tuple[str, int | None]]]) -> int | None:
    candidates = bounds.get(base_name(kernel.name))
    if candidates is None:   # not demangled (no c++filt): the Itanium name holds <length><name>
        candidates = [c for name, found in bounds.items() if f"{len(name)}{name}" in kernel.mangled
                      for c in found]
    if len({size for _, size in candidates}) > 1:   # same name in several files: the mangled
        candidates = [c for c in candidates if c[0] in kernel.mangled]   # name holds its file
    sizes = {size for _, size in candidates}
    return sizes.pop() if len(sizes) == 1 else None


def allocated_registers(registers: int, threads: int) -> int:
    per_thread = -(-registers // REGISTER_UNIT) * REGISTER_UNIT
    return per_thread * WARP * -(-threads // WARP)


def check(report: Report) -> tuple[list[str], list[str]]:
    """(offenders, notes): a line per limit exceeded, and what could not be checked."""
    offenders, notes = [], []
    for k in report.kernels:
        label = f"{k.name} [{k.arch}]"
        if k.registers is None or k.spill_stores is None:
            offenders.append(f"{label}: incomplete ptxas report (no register or spill line)")
            continue
        if k.spill_stores or k.spill_loads:
            offenders.append(f"{label}: spills registers to local memory ({k.spill_stores} bytes "
                             f"stores, {k.spill_loads} bytes loads)")
        if k.smem > MAX_STATIC_SMEM:
            offenders.append(f"{label}: {k.smem} bytes of static shared memory > the "
                             f"{MAX_STATIC_SMEM} bytes (48 KiB) static limit per block")
        if k.registers > MAX_REGISTERS:
            offenders.append(f"{label}: {k.registers} registers per thread > {MAX_REGISTERS}")
        if k.block is None:
            notes.append(f"{label}: no __launch_bounds__ found in the sources: block size unknown, "
                         f"only registers <= {MAX_REGISTERS} checked")
        elif allocated_registers(k.registers, k.block) > REGISTERS_PER_SM:
            offenders.append(f"{label}: {k.registers} registers x {k.block} threads "
                             f"({allocated_registers(k.registers, k.block)} allocated) > the "
                             f"{REGISTERS_PER_SM} registers of an SM: the launch cannot run")
    for name, stores, loads in report.spilling_functions:
        offenders.append(f"{name} (device function): spills registers to local memory ({stores} bytes "
                         f"stores, {loads} bytes loads)")
    return offenders, notes


def table(kernels: list[Kernel]) -> str:
    head = ("kernel", "arch", "regs", "block", "regs x block", "smem", "stack", "spill st/ld")
    rows = [head] + [
        (k.name, k.arch, _text(k.registers), _text(k.block),
         _text(allocated_registers(k.registers, k.block) if k.block and k.registers is not None else None),
         str(k.smem), _text(k.stack), f"{_text(k.spill_stores)}/{_text(k.spill_loads)}")
        for k in kernels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def _text(value) -> str:
    return "?" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("log", type=Path, help="a build log with nvcc -Xptxas -v output")
    parser.add_argument("--sources", type=Path, default=ROOT / "csrc" / "cuda",
                        help="folder of the .cu/.cuh files declaring __launch_bounds__ (default: csrc/cuda)")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        print(f"check_ptxas: FAIL: {args.log}: no such file", file=sys.stderr)
        return 2
    report = parse_log(args.log.read_text(errors="replace"))
    if not report.kernels:
        what = ("no ptxas lines" if report.ptxas_lines == 0
                else f"{report.ptxas_lines} ptxas lines but no 'Compiling entry function'")
        print(f"check_ptxas: FAIL: {what} in {args.log}: the build compiled no CUDA kernel or "
              "lost -Xptxas -v, so nothing was checked (an up-to-date incremental build compiles "
              "nothing: remove build/temp.* and rebuild)")
        return 1
    names = demangle(sorted({k.mangled for k in report.kernels}))
    bounds = launch_bounds(args.sources) if args.sources.is_dir() else {}
    for k in report.kernels:
        k.name = short_name(names[k.mangled])
        k.block = block_size(k, bounds)
    report.kernels.sort(key=lambda k: (k.name, k.arch))
    offenders, notes = check(report)
    print(table(report.kernels))
    sources = args.sources.resolve()
    shown = sources.relative_to(ROOT) if sources.is_relative_to(ROOT) else sources
    print(f"limits: spills 0 B, static smem <= {MAX_STATIC_SMEM} B, registers <= {MAX_REGISTERS}, "
          f"registers x block <= {REGISTERS_PER_SM} (allocated per whole warp, {REGISTER_UNIT} "
          f"registers per thread at a time; block from __launch_bounds__ in {shown})")
    print("dynamic shared memory (extern __shared__) is sized at launch and is not in these figures")
    for note in notes:
        print(f"note: {note}")
    for offender in offenders:
        print(f"check_ptxas: FAIL: {offender}")
    if offenders:
        return 1
    print(f"check_ptxas: OK, {len(report.kernels)} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
