"""The experiments behind `llama-fast train` and `llama-fast eval`.

``run(config)`` meta-trains every algorithm of ``config.algorithm`` (MAML and LLAMA by
default) side by side: the same initial weights (one seed) and the same task batch at every
iteration, so their curves and final metrics differ only by the algorithm. It writes into
``config.output``: ``metrics.csv`` (per-iteration training rows and meta-validation rows),
``checkpoint.pt`` (atomically, every ``checkpoint_every`` iterations and at the end),
``metrics.json`` (the held-out evaluation) and PNG plots. ``evaluate(config)`` reloads the
checkpoint and repeats the held-out evaluation (plus Lake's one-shot runs when asked).

Distributed (``torchrun --nproc_per_node=N -m llama_fast train ...``, WORLD_SIZE > 1): every rank
builds the same model (same seed, then ``broadcast_parameters``), samples its own shard of the
global meta-batch from its own stream (``shard_sizes``, ``.shard(rank, world_size)``) and runs
``meta_step(..., grad_sync=GradientSync(model, group))``, so all ranks take identical steps. Rank 0 alone writes
metrics.csv (the all-reduced ``global_means``), checkpoints and plots, validates and evaluates;
the other ranks wait at a barrier while it validates or checkpoints, and leave once training is
done. A checkpoint holds rank 0's model and optimizer (identical everywhere) and every rank's
RNG states, so a resumed run continues each rank's task stream (with the same world size).

Determinism: training draws tasks from the train sampler's own generator and nothing else;
validation, test tasks and posterior samples come from fresh generators seeded from
``config.seed``, so a resumed run (model, optimizer, sampler and RNG states restored) ends
exactly like an uninterrupted one, and ``eval`` reproduces ``train``'s metrics.
"""

from __future__ import annotations

import contextlib
import json
import time

import torch

from ..meta import distributed
from .checkpoint import load_checkpoint
from .config import CHECKPOINT_FILE, METRICS_FILE, ExperimentConfig
from .evaluation import evaluate_trainer
from . import metrics
from .reports import damping_note, paired_table, report, summary, table
from .training import NoLog, Trainer, single_process, train


@contextlib.contextmanager
def _process_group(config):
    """The DistContext of this process: torchrun's process group when it started several
    (WORLD_SIZE > 1; gloo for --device cpu, else NCCL), destroyed when training ends."""
    if distributed.launched_world_size() == 1:
        yield single_process(config)
        return
    backend = "gloo" if config.resolved_device().type == "cpu" else None
    ctx = distributed.init_from_env(backend=backend)
    # Not destroyed when an exception leaves: that would close the connections before this
    # rank's error reaches torchrun, and a peer's follow-on error could pass for the root cause.
    yield ctx
    torch.distributed.destroy_process_group()


def _set_threads(config: ExperimentConfig) -> None:
    # A 1-40-40-1 MLP is far too small to split over threads: one thread is faster, most of
    # all on a shared machine.
    if config.task == "sinusoid":
        torch.set_num_threads(1)


def run(config: ExperimentConfig, checkpoint: dict | None = None) -> int:
    """`llama-fast train`: meta-train (or resume), evaluate, write metrics, plots, checkpoint.
    ``checkpoint``: the --resume state when the caller has already loaded it (read from
    ``config.output`` otherwise). Under torchrun, @record puts a failing rank's traceback into
    torchrun's summary."""
    _set_threads(config)
    if distributed.launched_world_size() > 1:
        return distributed.record(_run)(config, checkpoint)
    return _run(config, checkpoint)


def _run(config: ExperimentConfig, checkpoint: dict | None) -> int:
    start = time.perf_counter()
    with _process_group(config) as ctx:
        trainer = Trainer(config, ctx)
        resume_from = None
        if config.resume:
            trainer.resume(trainer.out / CHECKPOINT_FILE, checkpoint)
            resume_from = trainer.iteration
            if ctx.is_main:
                print(f"resuming {trainer.out} from iteration {resume_from}")
        log = NoLog()
        if ctx.is_main:
            log = metrics.MetricsLog(trainer.out / METRICS_FILE, resume_from=resume_from if config.resume else 0)
        train(trainer, log)
    if not ctx.is_main:
        return 0
    # Rank 0 evaluates outside the process group: the others have left, and a long evaluation
    # cannot run into the collective timeout.
    report(trainer, evaluate_trainer(trainer), time.perf_counter() - start)
    return 0


def evaluate(config: ExperimentConfig) -> int:
    """`llama-fast eval`: load a run's checkpoint and repeat the held-out evaluation."""
    if not distributed.is_main_process():
        return 0   # started by torchrun: the evaluation runs in one process, rank 0's
    _set_threads(config)
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.load_state_dict(load_checkpoint(trainer.out / CHECKPOINT_FILE))
    if config.damping != "auto":   # an explicit --damping overrides the run's
        trainer.eval_damping = float(config.damping)
    evaluation = evaluate_trainer(trainer)
    out = summary(trainer, evaluation, time.perf_counter() - start)
    (trainer.out / "eval.json").write_text(json.dumps(metrics.strict_json(out), indent=2, allow_nan=False) + "\n")
    print(f"{config.task}: checkpoint at iteration {trainer.iteration}, {damping_note(trainer)}")
    print(table(evaluation.results))
    print(paired_table(evaluation.paired))
    if "oneshot_runs_skipped" in evaluation.results:
        print(f"one-shot runs not evaluated: {evaluation.results['oneshot_runs_skipped']}")
    print(f"wrote {trainer.out / 'eval.json'}")
    return 0
