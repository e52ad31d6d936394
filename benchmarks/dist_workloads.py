"""Distributed meta_step throughput: one configuration, run under torchrun (or plain python for
one process). Workloads and settings are bench_meta's (meta_workloads.py), float32, with a
fixed *global* meta-batch T split over the ranks (distributed.shard_batch).

    torchrun --nproc_per_node=P dist_workloads.py WORKLOAD T ALGORITHMS [ROUNDS]

Each rank runs a warm-up step, then ROUNDS timed steps per algorithm (algorithms alternating
within a round, so load drift on a shared machine hits all alike); a step's time is the
slowest rank's (barrier before, MAX all-reduce after). Rank 0 prints the best step time and
global tasks/s per algorithm, one line each.
"""

import sys
import time

import torch
import torch.distributed as dist

import llama_fast as lf
from llama_fast.meta import distributed
from meta_workloads import LLAMA, SETTINGS, make


def timed_steps(workload, T, algorithms, rounds, ctx):
    steps = {}
    for algorithm in algorithms:
        model, batch = make(workload, T, ctx.device)
        batch = distributed.shard_batch(batch, ctx.rank, ctx.world_size)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        extra = LLAMA if algorithm == "llama" else {}
        sync = distributed.GradientSync(model, ctx.group) if ctx.group is not None else None
        steps[algorithm] = (lambda m=model, b=batch, o=opt, a=algorithm, e=extra, s=sync:
                            lf.meta_step(m, b, o, algorithm=a, grad_sync=s,
                                         **SETTINGS[workload], **e))
        steps[algorithm]()   # warm-up
    best = {a: float("inf") for a in algorithms}
    works = []   # held, so that the main thread frees them (see llama_fast.meta.distributed._latest_works)
    for _ in range(rounds):
        for algorithm in algorithms:
            if ctx.group is not None:
                dist.barrier()
            start = time.perf_counter()
            steps[algorithm]()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            if ctx.group is not None:
                works.append(dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, async_op=True))
                works[-1].wait()
            best[algorithm] = min(best[algorithm], elapsed.item())
    return best


@distributed.record
def main(argv):
    workload, T, algorithms = argv[0], int(argv[1]), argv[2].split(",")
    rounds = int(argv[3]) if len(argv) > 3 else 3
    ctx = distributed.init_from_env(timeout=600)
    best = timed_steps(workload, T, algorithms, rounds, ctx)
    if ctx.is_main:
        threads = torch.get_num_threads()
        for algorithm, seconds in best.items():
            print(f"RESULT {workload} T={T} {algorithm} procs={ctx.world_size} threads={threads} "
                  f"{seconds * 1e3:.1f} ms {T / seconds:.1f} tasks/s", flush=True)
    if ctx.group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
