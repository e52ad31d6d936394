"""meta_step throughput: MAML, first-order MAML and LLAMA (all tasks vmapped), and MAML as a
Python loop over tasks with plain autograd (learn2learn/higher style), on the sinusoid MLP and
Conv-4 (5-way 1-shot, 28x28), T in {4, 32}; and at T = 4 the other Conv-4 shapes,
Omniglot 5-shot and miniImageNet (84x84, 32 filters) 1-shot (one of their T = 32 steps takes
5-25 s on the CPU; `python meta_workloads.py interleaved WORKLOAD 32 DEVICE` measures it).
Workloads: meta_workloads.py.

Each benchmark records tasks/s and the step's peak memory (on the CPU in a fresh subprocess,
see meta_workloads.py; on CUDA in-process); the terminal summary prints the LLAMA/MAML time
and memory ratios and the vmapped MAML's speed-up over the loop. Every algorithm other than MAML runs paired with a
MAML step before each of its rounds (lf_workloads.alternate), and its "x MAML" ratio is to
that interleaved MAML median: steps timed seconds apart on a shared machine differ by more
than the ratios being measured.
"""

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lf_workloads import alternate, timed_call
from meta_workloads import make, peak_memory, step_fn

HERE = Path(__file__).parent
ALGORITHMS = ["maml", "fomaml", "llama", "loop-maml"]
CASES = [(w, T) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)] + \
    [("conv4-omniglot-5shot", 4), ("conv4-miniimagenet", 4)]


def measured_peak(workload, T, algorithm, device):
    """Peak memory of one step (bytes), or None if the probe failed. On CUDA in this process:
    the allocator's peak over the step minus what was allocated before it counts only that
    step's tensors (and a fresh process per case, CUDA start-up included, would add minutes
    to device_check.sh). On the CPU in a fresh process: the resident-size probe sees
    everything the process holds."""
    if device == "cuda":
        return peak_memory(workload, T, algorithm, device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(HERE / "meta_workloads.py"), workload, str(T), algorithm, device],
                         capture_output=True, text=True, env=env, cwd=HERE)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("workload,T", CASES)
def bench_meta_step(benchmark, device, workload, T, algorithm):
    model, batch = make(workload, T, device)
    step = timed_call(step_fn(workload, algorithm, model, batch), device)
    heavy = device == "cpu" and workload.startswith("conv4")
    benchmark.group = f"meta_step {workload} T={T} {device}"
    benchmark.extra_info.update(algorithm=algorithm, tasks=T)
    # CPU Conv-4 steps take 0.3-6 s: 5 rounds at T=4 and 3 at T=32 (two rounds scattered the
    # paired ratios by +-10%); everything else 30.
    rounds = (3 if T >= 32 else 5) if heavy else 30
    if algorithm == "maml":
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    else:   # a MAML step before each round: the "x MAML" ratio compares steps of one window
        maml = timed_call(step_fn(workload, "maml", *make(workload, T, device)), device)
        benchmark.extra_info["maml_median"] = statistics.median(alternate(benchmark, step, maml, rounds=rounds))
    if os.environ.get("LLAMA_FAST_BENCH_MEMORY", "1") != "0":
        benchmark.extra_info["peak_bytes"] = measured_peak(workload, T, algorithm, device)
