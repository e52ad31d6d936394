"""Distributed meta-training on torch.distributed (data parallel over the tasks of a meta-batch).

The global meta-batch of T tasks is the union of the ranks' shards: rank r samples (or is
given) its own T_r tasks, passes them to ``lf.meta_step(..., grad_sync=GradientSync(model, group))`` as
its TaskBatch, adapts them and back-propagates the mean objective of its shard. The meta-loss is
the mean over all T = sum_r T_r tasks, so its gradient is ``sum_r (T_r / T) grad_r``: every rank
scales its gradient by T_r, the gradients are summed with all-reduce and divided by T. Shards
may be unequal (T_r is all-reduced along with the metrics). Every rank then holds the same
gradient and takes the same optimizer step, so parameters stay identical if they start
identical (``broadcast_parameters``).

Gradients travel in flat buckets (one buffer per dtype and device, capped in size, in reverse
parameter order as DDP does). A post-accumulate-grad hook copies each parameter's gradient
into its bucket as soon as autograd has finished it, and a full bucket starts an asynchronous
all-reduce while the backward goes on; buckets are launched in index order on every rank, so
the collectives match across ranks. How much this overlaps depends on the graph: in a
second-order MAML/LLAMA meta-gradient every parameter's first use is in the inner loop, at the
very start of the forward pass, and autograd finishes a parameter's gradient only after the
backward through that first use, i.e. near the end of the backward (see benchmarks/RESULTS.md
for the measured spread). The metrics (task count, meta-loss, query loss, accuracy, log-det)
are all-reduced in one small asynchronous call launched before the backward.

Launch with torchrun (``init_from_env``): NCCL on GPUs, gloo on CPUs, nothing specific to
either. A rank that fails ends the job: torchrun stops the other workers and reports the
failing rank (``@record`` on the entry point writes its traceback to the error file), and
collectives carry the timeout given to ``init_from_env``, so a rank left waiting on a dead peer
raises instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .types import TaskBatch, local_means

__all__ = ["DistContext", "init_from_env", "derive_seed", "launched_world_size", "is_main_process", "shard_seed",
           "shard_sizes", "shard_batch", "broadcast_parameters", "barrier", "gather_to_main",
           "GradientSync", "record", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
DEFAULT_BUCKET_BYTES = 25 * 2**20   # DDP's default bucket cap


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its device, and the process group
    to pass to meta_step (None when running as a single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: object | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _as_timedelta(timeout) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    seconds = float(timeout)
    if not seconds > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(timeout=DEFAULT_TIMEOUT, backend: str | None = None) -> DistContext:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Picks ``nccl`` when CUDA is available, else ``gloo`` (``backend`` overrides), sets the CUDA
    device from LOCAL_RANK before initialising (NCCL needs it), and gives every collective
    ``timeout`` (seconds or a timedelta): a rank waiting on a dead peer raises after it.
    Without WORLD_SIZE (a plain ``python`` run) or with WORLD_SIZE=1 nothing is initialised
    and the context has ``group=None``, so the same training code runs single-process.
    """
    timeout = _as_timedelta(timeout)
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1 and not dist.is_initialized():
        return DistContext(0, 1, 0, device, None)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: launch with "
                                   "torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        backend = backend or ("nccl" if cuda else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.group.WORLD)


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 for a plain ``python`` run).
    Known before ``init_from_env``, e.g. to decide whether to initialise at all."""
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run: the process that logs and checkpoints.
    Before ``init_from_env`` torchrun's RANK decides (so setup code can ask too)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launched_world_size() == 1 or _env_int("RANK", 0) == 0


def derive_seed(seed: int, rank: int = 0) -> int:
    """A 63-bit seed for (seed, rank), independent across ranks.

    numpy's SeedSequence hashes the pair, so rank r's stream is not seed + r (which would
    collide with another run's rank 0) and ranks of one run never repeat each other's tasks.
    """
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
    state = np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def shard_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s task sampler (and mc-Fisher generator): independent streams
    per rank (``derive_seed``); samplers have ``.shard(rank, world_size)`` for this."""
    return derive_seed(seed, rank)


def shard_sizes(meta_batch: int, world_size: int) -> list[int]:
    """How a global meta-batch of ``meta_batch`` tasks splits over ranks: as equal as possible,
    the first ``meta_batch % world_size`` ranks one task more. Every rank needs >= 1 task."""
    if meta_batch < world_size:
        raise ValueError(f"a meta-batch of {meta_batch} tasks cannot give each of {world_size} "
                         "ranks at least one task")
    base, extra = divmod(meta_batch, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_batch(batch, rank: int, world_size: int):
    """Rank ``rank``'s contiguous slice of a TaskBatch holding the whole meta-batch (for
    checks and for samplers that draw the global batch on every rank)."""
    sizes = shard_sizes(batch.tasks, world_size)
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    return TaskBatch(batch.support_x[part], batch.support_y[part], batch.query_x[part], batch.query_y[part])


def _initialised() -> bool:
    """Whether this process is part of a process group. Without one every helper here is a
    no-op, so a script written for torchrun runs as one process under plain ``python``; a
    process torchrun started as one of several must have joined (``init_from_env``) first."""
    if dist.is_available() and dist.is_initialized():
        return True
    if launched_world_size() > 1:
        raise RuntimeError(f"torchrun started {launched_world_size()} processes but torch.distributed "
                           "is not initialised in this one: call llama_fast.distributed.init_from_env() first")
    return False


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module, group=None, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (call once before training:
    identical starts plus identical averaged gradients keep the ranks identical). A no-op in a
    single process (torch.distributed not initialised)."""
    if not _initialised():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=src, group=group)


# A rank whose collective fails (usually because a peer died) raises only after this pause.
# torchrun reports as root cause the error with the earliest timestamp, in whole seconds, and
# stops the remaining workers once it sees a failure: without the pause, a survivor's follow-on
# error could be written in the same second as the real one and be named instead.
PEER_FAILURE_GRACE_S = 2.0


def _collective_failed(what: str, error: Exception) -> RuntimeError:
    """The error of a collective that failed on this rank, naming it: the usual cause is a peer
    that failed or stalled, whose own log (or torchrun's summary) has the root cause."""
    time.sleep(PEER_FAILURE_GRACE_S)
    return RuntimeError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed, most likely "
                        f"because another rank failed or stalled (see its log; torchrun's summary "
                        f"names it): {error}")


def barrier(group, what: str) -> None:
    """Wait until every rank of ``group`` gets here (e.g. while rank 0 validates or writes a
    checkpoint), within the group's timeout; ``what`` names the wait in the error. A no-op in a
    single process."""
    if not _initialised():
        return
    try:
        dist.barrier(group=group)
    except RuntimeError as error:
        raise _collective_failed(f"waiting for {what}", error) from error


def gather_to_main(obj, group, what: str) -> list | None:
    """Every rank's picklable ``obj``, as a list by rank on rank 0 (None elsewhere); ``[obj]``
    in a single process."""
    if not _initialised():
        return [obj]
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    try:
        dist.gather_object(obj, gathered, dst=0, group=group)
    except RuntimeError as error:
        raise _collective_failed(what, error) from error
    return gathered


# ----------------------------------------------------------------------------- gradient sync


class _Bucket:
    """One flat buffer holding the gradients of some parameters of one dtype and device."""

    def __init__(self, params):
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.filled = set()
        self.work = None

    def ready(self) -> bool:
        return len(self.filled) == len(self.params)


def _make_buckets(params, cap_bytes):
    """Buckets of parameters in reverse order (later layers' gradients tend to be finished
    first), split by dtype and device and at ``cap_bytes``."""
    buckets, current, size = [], [], 0
    for p in reversed(params):
        same_kind = not current or (p.dtype, p.device) == (current[0].dtype, current[0].device)
        nbytes = p.numel() * p.element_size()
        if current and (not same_kind or size + nbytes > cap_bytes):
            buckets.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(_Bucket(current))
    return buckets


# The Work handles of the latest step's collectives, held until the next step replaces them.
# gloo's worker thread drops its own reference to a Work only after wait() has returned here;
# were that the last one, the worker would free the Work's tensors, and freeing a tensor that
# Python also references takes the GIL. At interpreter exit a non-main thread that takes the
# GIL is ended inside that destructor: std::terminate, SIGABRT after a finished run (2 of 40
# two-rank test jobs; the core dump shows ~AsyncAllreduceWork in ProcessGroupGloo::runLoop).
# Held here, a Work is freed by the main thread: at the next step, or at exit by the thread
# that finalizes the interpreter, which may still take the GIL.
_latest_works: list = []


class GradientSync:
    """Task-weighted all-reduce of one step's gradients and metrics, for
    ``meta_step(..., grad_sync=GradientSync(model, group))``: built once, the way DDP wraps a
    model, and passed to every step. ``group``: the process group (None: the default one).

    ``start(result, local_tasks)`` before the backward launches the metrics all-reduce and arms
    the per-parameter hooks; ``finish(result)`` after it waits, writes the averaged gradients
    into ``p.grad`` and the global metrics into the result. In a single process (torch.distributed
    not initialised) nothing is reduced and ``finish`` stores the batch's own means.
    """

    def __init__(self, model: torch.nn.Module, group=None, bucket_bytes: int | None = None):
        self.group = group
        self.local = not _initialised()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # DEFAULT_BUCKET_BYTES is read when the sync is built, so that tests can change it.
        self.buckets = [] if self.local else _make_buckets(self.params, bucket_bytes or DEFAULT_BUCKET_BYTES)
        self.slot = {}
        for bucket in self.buckets:
            for index, p in enumerate(bucket.params):
                self.slot[p] = (bucket, index)
        self.handles = []
        self.next_launch = 0
        self.weight = 1.0
        self.metrics = self.metrics_work = None

    def start(self, result, local_tasks: int) -> None:
        self.weight = float(local_tasks)
        if self.local:
            return
        self.metrics = _metric_sums(result, local_tasks)
        self.metrics_work = dist.all_reduce(self.metrics, group=self.group, async_op=True)
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, p: torch.Tensor) -> None:
        bucket, index = self.slot[p]
        n = p.numel()
        start = bucket.offsets[index]
        bucket.buffer[start:start + n].copy_(p.grad.detach().reshape(-1)).mul_(self.weight)
        bucket.filled.add(index)
        self._launch_ready()

    def _launch_ready(self) -> None:
        # In index order only: every rank must issue the same collectives in the same order.
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].ready():
            bucket = self.buckets[self.next_launch]
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            self.next_launch += 1

    def abort(self) -> None:
        """Remove the hooks after a failed backward (no collectives: the peers may be gone)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self, result) -> None:
        if self.local:
            result.global_means = local_means(result, int(self.weight))
            return
        self.abort()
        # Parameters that got no gradient (unused in this step) count as zeros in the sum;
        # which parameters those are is the same on every rank (same model, same graph).
        for bucket in self.buckets:
            for index in range(len(bucket.params)):
                if index not in bucket.filled:
                    start = bucket.offsets[index]
                    bucket.buffer[start:start + bucket.params[index].numel()].zero_()
                    bucket.filled.add(index)
        self._launch_ready()
        _wait(self.metrics_work)
        _latest_works[:] = [self.metrics_work, *(bucket.work for bucket in self.buckets)]
        total_tasks = self.metrics[0]    # a tensor: no host sync on CUDA
        for bucket in self.buckets:
            _wait(bucket.work)
            bucket.buffer.div_(total_tasks)
            for p, start in zip(bucket.params, bucket.offsets):
                if p.grad is not None:   # leave None where autograd left None (as single-process)
                    p.grad.copy_(bucket.buffer[start:start + p.numel()].view_as(p.grad))
            bucket.filled.clear()
            bucket.work = None
        self.next_launch = 0
        _store_global_metrics(result, self.metrics)


def _wait(work) -> None:
    """Wait for an all-reduce; if it fails (a peer died or the timeout passed), say so with
    this rank's number: the peer's own log (or torchrun's summary) has the root cause."""
    try:
        work.wait()
    except RuntimeError as error:
        raise _collective_failed("the meta_step all-reduce", error) from error


_METRICS = ("meta_loss", "query_loss", "query_accuracy", "logdet")


def _metric_sums(result, local_tasks: int) -> torch.Tensor:
    """[tasks, sum of meta_loss, query_loss, accuracy, log-det] of this rank, float64."""
    device = result.query_loss.device
    sums = [torch.tensor(float(local_tasks), dtype=torch.float64, device=device),
            result.meta_loss.to(torch.float64) * local_tasks]
    for name in _METRICS[1:]:
        value = getattr(result, name)
        sums.append(value.to(torch.float64).sum() if value is not None
                    else torch.zeros((), dtype=torch.float64, device=device))
    return torch.stack(sums)


def _store_global_metrics(result, sums: torch.Tensor) -> None:
    means = sums[1:] / sums[0]
    result.global_means = {"tasks": sums[0]}
    for name, value in zip(_METRICS, means):
        if name == "meta_loss" or getattr(result, name) is not None:
            result.global_means[name] = value
    result.meta_loss = means[0].to(result.meta_loss.dtype)
