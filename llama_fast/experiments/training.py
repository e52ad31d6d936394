"""Meta-training: the Trainer (learners, samplers, iteration, damping; checkpointable, one rank
of a data-parallel run under torchrun) and the training loop."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .. import meta
from ..meta import distributed
from . import data, metrics
from .checkpoint import (CheckpointError, TrainingDiverged, capture_rng_state, check_algorithms,
                         load_checkpoint, restore_rng_state, save_checkpoint)
from .config import CHECKPOINT_FILE, ConfigError, ExperimentConfig
from .learners import VAL_RANK, VAL_TASKS, Tasks, build_learners, loss_name, task_batch
from .selection import select_damping

INITIAL_DAMPING = 1.0        # delta of LLAMA's training log-det term under damping = "auto"
NONFINITE_STEPS = 5          # consecutive skipped (non-finite) steps of a learner that stop a run


def single_process(config) -> distributed.DistContext:
    return distributed.DistContext(0, 1, 0, config.resolved_device(), None)


def _rank_device(config, ctx) -> torch.device:
    """Under torchrun a CUDA run uses this rank's GPU (cuda:LOCAL_RANK, from init_from_env);
    --device cpu stays on the CPU."""
    device = config.resolved_device()
    return ctx.device if ctx.world_size > 1 and device.type == "cuda" else device


def parameter_digest(models: dict) -> str:
    """SHA-256 of ``{learner name: model state_dict}`` (a checkpoint's "models"), bit for bit:
    ranks that took the same steps from the same start must agree on it."""
    digest = hashlib.sha256()
    for learner, state in models.items():
        for name, tensor in state.items():
            digest.update(f"{learner}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

_ROW_KEYS = ("meta_loss", "query_loss", "logdet", "query_accuracy")   # metrics.csv column order


def _step_row(out, global_means: bool) -> dict:
    """One learner's metrics.csv values for a step. Distributed: the all-reduced means over
    every rank's tasks. Single-process: the float32 means of the batch, as always, so the
    files of single-process runs do not change."""
    if global_means:
        values = {k: float(v) for k, v in out.global_means.items()}
    else:
        values = {"meta_loss": out.meta_loss.item(), "query_loss": out.query_loss.mean().item()}
        for key in ("logdet", "query_accuracy"):
            if getattr(out, key) is not None:
                values[key] = getattr(out, key).mean().item()
    return {k: values[k] for k in _ROW_KEYS if k in values}


class Trainer:
    """Meta-training state: learners, samplers, iteration, damping; checkpointable.

    ``ctx`` (``distributed.init_from_env()``'s) makes this one rank of a data-parallel run;
    None: a single process.
    """

    def __init__(self, config: ExperimentConfig, ctx: distributed.DistContext | None = None):
        self.ctx = ctx or single_process(config)
        self.config, self.device = config, _rank_device(config, self.ctx)
        self.out = Path(config.output)
        self.loss = loss_name(config)
        self.tasks = Tasks(config, self.device, self.ctx.rank, self.ctx.world_size)
        if config.learn_damping and self.ctx.world_size > 1:
            # The gradient all-reduce covers the models' parameters, not the learned log delta.
            raise ConfigError("learn_damping: not supported with several processes (torchrun); "
                              "train in one process")
        self.learners = build_learners(config, self.device)
        # Distributed: each learner's gradient all-reduce, built once (None: a single process).
        self.grad_syncs = {l.name: None for l in self.learners}
        if self.ctx.group is not None:
            self._join_ranks()
            self.grad_syncs = {l.name: distributed.GradientSync(l.model, self.ctx.group) for l in self.learners}
        self.iteration = 0
        # Training uses `damping`; the held-out evaluation `eval_damping` when fixed (auto: chosen
        # per learner and setting at evaluation). Kept apart so a run resumed from the end of a
        # shorter run trains with exactly the delta an uninterrupted run would.
        self.damping = INITIAL_DAMPING if config.damping == "auto" else float(config.damping)
        self.eval_damping = self.damping
        self.damping_history = []
        # Consecutive steps per learner whose meta-loss or meta-gradient was not finite (and so
        # not applied), and the iteration of the last checkpoint written.
        self.nonfinite_streak = {l.name: 0 for l in self.learners}
        self.saved_iteration = None

    def _join_ranks(self) -> None:
        for learner in self.learners:   # identical starts (the seed already gives them; made sure)
            distributed.broadcast_parameters(learner.model, self.ctx.group)
        # Anything drawn from torch's global generator during training (the mc Fisher's labels)
        # must differ per rank, like the tasks; the weights above came from the shared seed.
        torch.manual_seed(distributed.shard_seed(data.derive_seed(self.config.seed), self.ctx.rank))

    # ---- checkpoints
    def rng_state(self) -> dict:
        return capture_rng_state({"train_tasks": self.tasks.train.generator})

    def rank_state(self) -> dict:
        """This rank's part of a distributed checkpoint: its random streams (its own task
        shard) and the digest of its parameters (which must equal every other rank's)."""
        return {"rng": self.rng_state(), "params_sha256": parameter_digest(self.model_states())}

    def model_states(self) -> dict:
        return {l.name: l.model.state_dict() for l in self.learners}

    def state_dict(self, ranks: list | None = None) -> dict:
        """The checkpoint; ``ranks`` (distributed): every rank's ``rank_state()``, by rank."""
        state = {"iteration": self.iteration, "damping": self.damping, "eval_damping": self.eval_damping,
                 "damping_history": [list(x) for x in self.damping_history],
                 "models": self.model_states(),
                 "optimizers": {l.name: l.optimizer.state_dict() for l in self.learners},
                 "log_damping": {l.name: l.log_damping.detach().clone() for l in self.learners
                                 if l.log_damping is not None}}
        if ranks is None:
            state["rng"] = self.rng_state()
        else:
            state.update(world_size=len(ranks), ranks=ranks)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.damping = int(state["iteration"]), float(state["damping"])
        self.eval_damping = float(state.get("eval_damping", self.damping))
        self.damping_history = [tuple(x) for x in state.get("damping_history", [])]
        for learner in self.learners:
            learner.model.load_state_dict(state["models"][learner.name])
            if learner.log_damping is not None:
                learned = state.get("log_damping", {}).get(learner.name)
                if learned is None:
                    raise CheckpointError(self.out / CHECKPOINT_FILE, "holds no learned delta for "
                                          f"{learner.name.upper()}: it was written by a run without "
                                          "--learn-damping")
                with torch.no_grad():
                    learner.log_damping.copy_(learned)
            if "optimizers" in state:
                learner.optimizer.load_state_dict(state["optimizers"][learner.name])
        rng = self._own_rng_state(state)
        if rng is not None:
            restore_rng_state(rng, {"train_tasks": self.tasks.train.generator})

    def _own_rng_state(self, state: dict) -> dict | None:
        """This rank's RNG states in a checkpoint; None where it has none for this world size
        (``eval`` of a distributed run in one process needs no training streams)."""
        ranks = state.get("ranks")
        if ranks is None:
            return state.get("rng")
        return ranks[self.ctx.rank]["rng"] if len(ranks) == self.ctx.world_size else None

    def resume(self, path, state: dict | None = None) -> None:
        """Load a checkpoint to continue training (``state``: the one at ``path``, already
        loaded): it must come from the same world size, since each rank continues its own task
        stream."""
        state = load_checkpoint(path) if state is None else state
        check_algorithms(state, [l.name for l in self.learners], path)
        saved = int(state.get("world_size", 1))
        if saved != self.ctx.world_size:
            how = ("in one process (plain python or torchrun --nproc_per_node=1)" if saved == 1
                   else f"with {saved} processes (e.g. torchrun --nproc_per_node={saved})")
            raise CheckpointError(path, f"written by a {saved}-process run, this run has "
                                        f"{self.ctx.world_size} (each rank continues its own task stream): "
                                        f"resume it {how}, or train into a new --output")
        self.load_state_dict(state)
        self.saved_iteration = self.iteration

    def save(self) -> None:
        """Write the checkpoint (rank 0). Distributed: a collective that gathers every rank's
        state first, so every rank must call it."""
        self.saved_iteration = self.iteration
        if self.ctx.group is None:
            save_checkpoint(self.out / CHECKPOINT_FILE, self.state_dict())
            return
        ranks = distributed.gather_to_main(self.rank_state(), self.ctx.group,
                                           f"gathering the checkpoint of iteration {self.iteration}")
        if self.ctx.is_main:
            _check_ranks_agree(ranks, self.iteration)
            save_checkpoint(self.out / CHECKPOINT_FILE, self.state_dict(ranks))

    def wait_for_main(self, what: str) -> None:
        """Distributed: the other ranks wait here while rank 0 does ``what`` alone."""
        if self.ctx.group is not None:
            distributed.barrier(self.ctx.group, what)

    # ---- one iteration
    def step(self) -> dict:
        """One meta-update of every learner on the same task batch; per-learner stats."""
        c = self.config
        batch = task_batch(self.tasks.train.sample())
        stats = {}
        for learner in self.learners:
            llama = learner.name == "llama"
            damping = self.damping if llama else None
            if learner.log_damping is not None:
                damping = learner.log_damping.exp().expand(batch.tasks, -1)
            out = meta.meta_step(learner.model, batch, learner.optimizer, algorithm=learner.name,
                                 loss=self.loss, inner_lr=c.inner_lr, inner_steps=c.inner_steps,
                                 eta=c.eta if llama else None, damping=damping,
                                 fisher=c.fisher, first_order=c.first_order,
                                 grad_sync=self.grad_syncs[learner.name],
                                 evidence_prior=learner.log_damping is not None)
            stats[learner.name] = _step_row(out, global_means=self.ctx.group is not None)
            streak = self.nonfinite_streak[learner.name]
            self.nonfinite_streak[learner.name] = streak + 1 if out.step_skipped else 0
        self.iteration += 1
        return stats

    def check_finite(self) -> None:
        """Stop once a learner's last NONFINITE_STEPS steps were all skipped (NaN or Inf)."""
        for name, streak in self.nonfinite_streak.items():
            if streak >= NONFINITE_STEPS:
                last = (f"the checkpoint of iteration {self.saved_iteration} is intact"
                        if self.saved_iteration is not None else "no checkpoint was written")
                raise TrainingDiverged(
                    f"iteration {self.iteration}: {name.upper()}'s meta-loss or meta-gradient was NaN "
                    f"or Inf in {streak} consecutive steps (not applied); stopping, {last}. Lower "
                    "--inner-lr or --meta-lr and train anew, or --resume")

    def validate(self) -> dict:
        """Query loss (and accuracy) on fixed meta-validation tasks; logs the auto delta."""
        c = self.config
        sampler = self.tasks.fixed("val", c.shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK)
        batch = task_batch(sampler.sample())
        rows = {}
        for learner in self.learners:
            post = meta.adapt(learner.model, batch.support_x, batch.support_y, loss=self.loss,
                            inner_lr=c.inner_lr, inner_steps=c.inner_steps, damping=self.damping,
                            fisher=c.fisher)
            if self.loss == "mse":
                mean, _ = post.predict(batch.query_x, pred_type="point")
                rows[learner.name] = {"val_mse": metrics.mse(mean, batch.query_y)}
            else:
                probs = post.predict(batch.query_x, pred_type="point")
                rows[learner.name] = {"val_accuracy": metrics.accuracy(probs, batch.query_y),
                                      "val_nll": metrics.nll(probs, batch.query_y)}
        llama = self.learner("llama")
        if c.damping == "auto" and llama is not None:
            # Logged, not applied: LLAMA's training keeps its initial delta. Switching the
            # log-det term to the evidence's choice (delta = 100) mid-run made the meta-gradient
            # NaN within a few hundred iterations on the sinusoid quickstart.
            selected = select_damping(c, llama.model, self.tasks)
            self.damping_history.append((self.iteration, selected))
            rows["llama"]["damping_selected"] = selected
        return rows

    def learner(self, name):
        return next((l for l in self.learners if l.name == name), None)

    def finish_damping(self) -> float:
        """The delta a fixed --damping gives the held-out evaluation: training's. Under "auto"
        the evaluation chooses per learner and setting on the meta-validation tasks
        (selection.choose_posterior) and this value is only its fallback."""
        self.eval_damping = self.damping
        return self.eval_damping


def _check_ranks_agree(ranks: list, iteration: int) -> None:
    """Identical starts and identical averaged gradients give bit-identical parameters on
    every rank; anything else is a bug that would silently mix models, so it stops the run."""
    digests = [r["params_sha256"] for r in ranks]
    differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise RuntimeError(f"at iteration {iteration} the parameters of rank(s) {differing} differ "
                           f"from rank 0's: the ranks diverged")


def _progress(total, initial, disable=False):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="meta-train", unit="it", dynamic_ncols=True,
                smoothing=0.1, mininterval=0.5, disable=disable)


class NoLog:
    """metrics.csv on the ranks other than 0: rank 0 alone writes the (global) rows."""

    def log(self, **row) -> None:
        pass


def train(trainer: Trainer, log: metrics.MetricsLog) -> None:
    """The meta-training loop from trainer.iteration to config.iterations."""
    c, main = trainer.config, trainer.ctx.is_main
    tasks_done = 0
    start = time.perf_counter()
    with _progress(c.iterations, trainer.iteration, disable=not main) as bar:
        while trainer.iteration < c.iterations:
            stats = trainer.step()
            tasks_done += c.meta_batch   # the global meta-batch: the bar shows global tasks/s
            it = trainer.iteration
            if it % c.log_every == 0 or it == c.iterations:
                for name, row in stats.items():
                    log.log(iteration=it, algorithm=name, **row)
            trainer.check_finite()
            validating = bool(c.eval_every) and it % c.eval_every == 0
            if validating and main:
                for name, row in trainer.validate().items():
                    log.log(iteration=it, algorithm=name, **row)
            checkpointing = bool(c.checkpoint_every) and it % c.checkpoint_every == 0 and it < c.iterations
            if checkpointing:
                trainer.save()
            if validating or checkpointing:
                trainer.wait_for_main(f"rank 0's validation/checkpoint at iteration {it}")
            rate = tasks_done / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix({f"{n}_loss": f"{s['meta_loss']:.3f}" for n, s in stats.items()}
                            | {"tasks/s": f"{rate:.3g}"}, refresh=False)
            bar.update(1)
    if main:
        trainer.finish_damping()
    trainer.save()
