"""meta_step workloads for bench_meta.py, and the peak-memory probe it runs in a subprocess.

- sinusoid: the 1-40-40-1 ReLU MLP, 10-shot support and 10 query points per task, MSE,
  inner_lr 0.01, one inner step (Finn et al. 2017).
- conv4-omniglot: Conv-4 with 64 filters on 28x28 single-channel images, 5-way 1-shot
  support, 15 query images per class (75), cross-entropy, inner_lr 0.4, one inner step.
- conv4-omniglot-5shot: the same with 5 support images per class (25).
- conv4-miniimagenet: Conv-4 with 32 filters (Finn et al.'s miniImageNet network) on 84x84 RGB
  images, 5-way 1-shot, 15 queries per class, the same settings.

LLAMA runs the exact Fisher (one g per class) with eta = 1e-3 and damping = 1.

Peak memory (``python meta_workloads.py WORKLOAD T ALGORITHM DEVICE``): on CUDA,
``torch.cuda.max_memory_allocated`` over one step after a warm-up step; on the CPU, the growth
of the process's peak resident set size during the first step of a fresh process over its
resident size just before it (torch has no CPU allocator statistics, and tracemalloc does not
see torch's allocations). The peak is /proc's VmHWM, reset just before the step: not
``ru_maxrss``, which Linux carries over from the parent through fork and exec, so that a probe
started by a large pytest process reported the parent's size (Conv-4 T=4 loop-maml: 666 MB
in the benchmark, 350 MB on its own). Prints the peak in bytes.
"""

import resource
import sys
import time

import torch

import llama_fast as lf
from llama_fast import reference

CONV4 = {   # workload: (in_channels, filters, image side, shots); 5-way, 15 queries per class
    "conv4-omniglot": (1, 64, 28, 1),
    "conv4-omniglot-5shot": (1, 64, 28, 5),
    "conv4-miniimagenet": (3, 32, 84, 1),
}
SETTINGS = {
    "sinusoid": dict(loss="mse", inner_lr=0.01, inner_steps=1),
    **{name: dict(loss="cross_entropy", inner_lr=0.4, inner_steps=1) for name in CONV4},
}
LLAMA = dict(eta=1e-3, damping=1.0, fisher="exact")


def make(workload, T, device, seed=0):
    """(model, TaskBatch) of a workload on a device (float32)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if workload == "sinusoid":
        model = lf.models.mlp()
        x = torch.rand(T, 20, 1, generator=gen) * 10 - 5
        amp = torch.rand(T, 1, 1, generator=gen) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=gen) * 3.1416
        y = amp * torch.sin(x + phase)
        batch = lf.TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    elif workload in CONV4:
        channels, filters, side, shots = CONV4[workload]
        model = lf.models.conv4(in_channels=channels, ways=5, hidden=filters, image_size=side)
        ways, queries = 5, 15

        def part(k):
            return (torch.randn(T, ways * k, channels, side, side, generator=gen),
                    torch.arange(ways).repeat_interleave(k).expand(T, -1).contiguous())
        batch = lf.TaskBatch(*part(shots), *part(queries))
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return model.to(device), batch.to(device)


def step_fn(workload, algorithm, model, batch):
    """A callable running one meta-training step of `algorithm` ("maml", "fomaml", "llama", or
    "loop-maml": a Python loop over tasks with plain autograd, as learn2learn/higher do)."""
    settings = SETTINGS[workload]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if algorithm == "loop-maml":
        def step():
            opt.zero_grad(set_to_none=True)
            reference.maml_loop(model, batch, **settings).backward()
            opt.step()
        return step
    extra = LLAMA if algorithm == "llama" else {}

    def step():
        lf.meta_step(model, batch, opt, algorithm=algorithm, **settings, **extra)
    return step


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes():
    """This process's peak resident set size (VmHWM) since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _reset_peak_rss():
    """Sets VmHWM to the current resident size (Linux >= 4.0: clear_refs value 5). Where that
    is not allowed, VmHWM keeps this process's own earlier peak (imports, model set-up), which
    is still never the parent's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(workload, T, algorithm, device):
    model, batch = make(workload, T, device)
    step = step_fn(workload, algorithm, model, batch)
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _reset_peak_rss()
    before = _rss_bytes()
    step()
    return _peak_rss_bytes() - before


def interleaved(workload, T, device, rounds=3, algorithms=("maml", "fomaml", "llama", "loop-maml")):
    """Best-of-`rounds` step time per algorithm, the algorithms alternating within each round
    (on a shared machine, load drifts between back-to-back benchmarks; alternating exposes
    every algorithm to the same drift). One warm-up step each first."""
    steps = {}
    for algorithm in algorithms:
        model, batch = make(workload, T, device)
        steps[algorithm] = step_fn(workload, algorithm, model, batch)
        steps[algorithm]()
    best = {a: float("inf") for a in algorithms}
    for _ in range(rounds):
        for algorithm in algorithms:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[algorithm]()
            if device == "cuda":
                torch.cuda.synchronize()
            best[algorithm] = min(best[algorithm], time.perf_counter() - start)
    return best


if __name__ == "__main__":
    if sys.argv[1] == "interleaved":
        # python meta_workloads.py interleaved WORKLOAD T DEVICE [ROUNDS]
        workload, T, device = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        best = interleaved(workload, T, device, rounds=int(sys.argv[5]) if len(sys.argv) > 5 else 3)
        for algorithm, seconds in best.items():
            print(f"{workload} T={T} {device} {algorithm:<10} {seconds * 1e3:10.1f} ms  "
                  f"{T / seconds:8.1f} tasks/s  {seconds / best['maml']:5.2f}x MAML")
    else:
        workload, T, algorithm, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        print(peak_memory(workload, T, algorithm, device))
