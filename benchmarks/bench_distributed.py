"""Distributed meta_step tasks/s on the CPU: 1 process x 1 thread, 1 process x 2 threads and
2 processes x 1 thread (gloo on 127.0.0.1), same global meta-batch, sinusoid MLP and Conv-4
(bench_meta's workloads). Each configuration is a fresh torchrun launch of dist_workloads.py;
the table (and the 2-process / 1-process ratios) is printed at the end of the run.

Run: ``pytest --benchmark benchmarks/bench_distributed.py -s`` (a few minutes on 2 cores).
Not a pytest-benchmark fixture: the time is measured inside the launched processes.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASES = [("sinusoid", 32, 10), ("conv4-omniglot", 4, 2)]     # (workload, global T, rounds)
CONFIGS = [(1, 1), (1, 2), (2, 1)]                           # (processes, threads each)
LINE = re.compile(r"RESULT (\S+) T=(\d+) (\S+) procs=(\d+) threads=(\d+) ([\d.]+) ms ([\d.]+) tasks/s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workload, T, rounds, procs, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(HERE / "dist_workloads.py"), workload, str(T), "maml,llama", str(rounds)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    return [m.groups() for m in LINE.finditer(out.stdout)]


@pytest.mark.parametrize("workload,T,rounds", CASES)
def bench_distributed_tasks_per_second(workload, T, rounds):
    rows = {}
    for procs, threads in CONFIGS:
        for _, _, algorithm, p, t, ms, rate in launch(workload, T, rounds, procs, threads):
            rows[(algorithm, int(p), int(t))] = (float(ms), float(rate))
    print(f"\n{workload} T={T} (global meta-batch), best of {rounds} steps")
    for algorithm in ("maml", "llama"):
        base = rows[(algorithm, 1, 1)][1]
        for procs, threads in CONFIGS:
            ms, rate = rows[(algorithm, procs, threads)]
            print(f"  {algorithm:<6} {procs} proc x {threads} thread: {ms:9.1f} ms {rate:8.1f} tasks/s "
                  f"{rate / base:5.2f}x of 1x1")
