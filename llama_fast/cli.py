"""The `llama-fast` command (also `python -m llama_fast`).

Subcommands now: `info` (build, devices, registered ops) and `bench` (the benchmark suite).
The experiments (`train`, `eval`) arrive with the meta-training API.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import llama_fast as lf
from llama_fast import _extension


def cmd_info(args) -> int:
    import llama_fast._build_info as build

    print(f"llama_fast {lf.__version__}")
    print(f"torch {torch.__version__} (built against {build.TORCH_VERSION})")
    print(f"CUDA kernels built: {build.WITH_CUDA}; GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    ops = sorted(name for name in dir(torch.ops.llama_fast) if not name.startswith("_"))
    ops = [name for name in ops if hasattr(getattr(torch.ops.llama_fast, name), "default")]
    print("ops: " + ", ".join(f"torch.ops.llama_fast.{name}" for name in ops))
    return 0


def cmd_bench(args) -> int:
    root = Path(args.root).resolve()
    if not (root / "benchmarks").is_dir():
        print(f"llama-fast bench: no benchmarks/ under {root}; run it from a source checkout "
              "or pass --root", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pytest", "--benchmark", "-q", *args.pytest_args]
    return subprocess.call(command, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-fast", description="Fast Bayesian gradient-based meta-learning (MAML, LLAMA)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the build, the devices and the registered ops")
    info.set_defaults(run=cmd_info)
    bench = sub.add_parser("bench", help="run the benchmark suite (pytest --benchmark)")
    bench.add_argument("--root", default=".", help="source checkout holding benchmarks/ (default: .)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
