"""A torchrun entry point for tests/meta/test_distributed.py (not collected: no test_ prefix).

    torchrun --nproc_per_node=2 ... tests/helpers/dist_worker.py OUT_DIR ALGORITHMS STEPS TASKS [FAIL_RANK FAIL_AFTER]

Every rank builds the same float64 MLP, takes its shard of the same global meta-batch each
step (``sinusoid_tasks``, a function of the step only) and runs ``meta_step`` with the world
process group, for each of the comma-separated ALGORITHMS in turn (one launch for all: process
start-up dominates); rank r saves its final parameters and step metrics per algorithm to
OUT_DIR/rank{r}.pt. With
FAIL_RANK, that rank raises after FAIL_AFTER steps (the failure-handling tests), or with
LF_TEST_FAIL_MODE=hang sleeps there without joining the collective, or with
LF_TEST_FAIL_MODE=kill is killed there (SIGKILL: no exception, no error file).
"""

import os
import signal
import sys
import time

import torch

import llama_fast as lf
from llama_fast.meta import distributed

DT = torch.float64
SETTINGS = {
    "maml": dict(algorithm="maml", loss="mse", inner_lr=0.05, inner_steps=2),
    "llama": dict(algorithm="llama", loss="mse", inner_lr=0.05, inner_steps=1, eta=1e-2, damping=0.5),
}


def sinusoid_tasks(step, tasks):
    """The global meta-batch of step `step`: the same on every rank and in the test process."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.rand(tasks, 12, 1, generator=gen, dtype=DT) * 10 - 5
    amp = torch.rand(tasks, 1, 1, generator=gen, dtype=DT) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=gen, dtype=DT) * 3.14
    y = amp * torch.sin(x + phase)
    return lf.TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = lf.models.mlp(hidden=(16, 16)).to(DT)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


# LLAMA runs with 512-byte gradient buckets (the 16-16 MLP's float64 gradients then travel in
# 3 buckets: head + layer-2 bias, layer-2 weight, layer 1; launched from the hooks in order);
# MAML with the default cap (one bucket).
BUCKET_BYTES = {"maml": distributed.DEFAULT_BUCKET_BYTES, "llama": 512}


def train(algorithm, steps, tasks, rank=0, world_size=1, group=None, fail_rank=-1, fail_after=-1):
    """(model, [global_means per step]) after `steps` meta-steps on this rank's shards."""
    distributed.DEFAULT_BUCKET_BYTES = BUCKET_BYTES[algorithm]
    model, opt = make_model_and_optimizer()
    if group is not None:
        distributed.broadcast_parameters(model, group)
    sync = distributed.GradientSync(model, group) if group is not None else None
    history = []
    for step in range(steps):
        if rank == fail_rank and step == fail_after:
            if os.environ.get("LF_TEST_FAIL_MODE") == "hang":   # alive but never joins the step
                print(f"rank {rank} hangs at step {step}", flush=True)
                time.sleep(600)
            if os.environ.get("LF_TEST_FAIL_MODE") == "kill":   # dies with no Python error at all
                print(f"rank {rank} kills itself at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        batch = distributed.shard_batch(sinusoid_tasks(step, tasks), rank, world_size)
        out = lf.meta_step(model, batch, opt, grad_sync=sync, **SETTINGS[algorithm])
        history.append({k: float(v) for k, v in out.global_means.items()})
    return model, history


@distributed.record
def main(argv):
    out_dir, algorithms, steps, tasks = argv[0], argv[1].split(","), int(argv[2]), int(argv[3])
    fail_rank, fail_after = (int(argv[4]), int(argv[5])) if len(argv) > 5 else (-1, -1)
    ctx = distributed.init_from_env(timeout=float(os.environ.get("LF_TEST_TIMEOUT", "20")))
    results = {}
    for algorithm in algorithms:
        model, history = train(algorithm, steps, tasks, ctx.rank, ctx.world_size, ctx.group,
                               fail_rank, fail_after)
        results[algorithm] = {"params": {k: v.detach() for k, v in model.named_parameters()},
                              "history": history}
    torch.save(results, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
