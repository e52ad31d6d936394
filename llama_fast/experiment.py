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
``meta_step(..., process_group=...)``, so all ranks take identical steps. Rank 0 alone writes
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
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import llama_fast as lf
from llama_fast import data, distributed, metrics
from llama_fast.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                                   save_checkpoint)
from llama_fast.config import CHECKPOINT_FILE, METRICS_FILE, ExperimentConfig
from llama_fast.functional import inspect_model

METRICS_JSON = "metrics.json"
# 1e-4 .. 1e4 in half decades (laplace-torch's gridsearch interval). With a 1-shot support set
# almost every direction of H is delta alone, so a useful sampled predictive can need delta >= 1e3.
DAMPING_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 9))
# The observation noise sigma of the regression predictives under noise = "auto": 1e-2 .. 1e1 in
# quarter decades, chosen per evaluation setting and results column on meta-validation tasks.
NOISE_GRID = tuple(10.0 ** (k / 4) for k in range(-8, 5))
INITIAL_DAMPING = 1.0        # delta of LLAMA's training log-det term under damping = "auto"
SINUSOID_EVAL_SHOTS = (5, 10)
EVAL_STEPS = (1, 10)
SINUSOID_EVAL_QUERY = 100    # query points per held-out sinusoid task
VAL_TASKS = {"sinusoid": 100, "omniglot": 32}
EVAL_CHUNK = {"sinusoid": 600, "omniglot": 50}   # tasks per adapt call (memory bound)
# Disjoint seeds for the non-training streams (ranks of data.derive_seed).
VAL_RANK, TEST_RANK, SAMPLE_RANK, PLOT_RANK = 1001, 1002, 1003, 1004


# ----------------------------------------------------------------------------- setup


@dataclass
class Learner:
    """One algorithm's model and optimizer."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def _loss(config) -> str:
    return "mse" if config.task == "sinusoid" else "cross_entropy"


def build_model(config) -> torch.nn.Module:
    if config.task == "sinusoid":
        return lf.models.mlp(1, (40, 40), 1)
    return lf.models.conv4(in_channels=1, ways=config.ways, hidden=64, image_size=data.IMAGE_SIZE)


def build_learners(config, device) -> list[Learner]:
    """Identical initial weights for every algorithm (seeded once, then copied)."""
    torch.manual_seed(config.seed)
    template = build_model(config).to(device)
    learners = []
    for name in config.algorithm:
        model = build_model(config).to(device)
        model.load_state_dict(template.state_dict())
        learners.append(Learner(name, model, torch.optim.Adam(model.parameters(), lr=config.meta_lr)))
    return learners


class Tasks:
    """The task samplers of a run: train (checkpointed), and fresh ones for val and test.

    Distributed, the train sampler is this rank's: its share of the global meta-batch
    (``shard_sizes``) from its own random stream (``.shard(rank, world_size)``).
    """

    def __init__(self, config, device, rank=0, world_size=1):
        self.config, self.device = config, device
        self.splits = None
        if config.task == "omniglot":
            self.splits = data.omniglot_splits(config.data)
        seed = data.derive_seed(config.seed)
        if world_size == 1:
            self.train = self._sampler("train", config.shots, config.query_shots, config.meta_batch, seed)
        else:
            share = distributed.shard_sizes(config.meta_batch, world_size)[rank]
            self.train = self._sampler("train", config.shots, config.query_shots, share, seed,
                                       sharded=True).shard(rank, world_size)

    def _sampler(self, split, shots, query_shots, meta_batch, seed, sharded=False):
        c = self.config
        if c.task == "sinusoid":
            return data.SinusoidTasks(shots, query_shots, meta_batch, seed=seed, device=self.device)
        if sharded:   # .shard() needs a sampler built from a seed
            return data.OmniglotTasks(self.splits[split], c.ways, shots, query_shots, meta_batch,
                                      seed=seed, device=self.device)
        # Single-process runs keep this stream (a generator seeded directly), as before.
        return data.OmniglotTasks(self.splits[split], c.ways, shots, query_shots, meta_batch,
                                  generator=torch.Generator().manual_seed(seed), device=self.device)

    def fixed(self, split, shots, query_shots, tasks, rank):
        """A fresh sampler with a fixed seed: the same tasks every time it is built."""
        return self._sampler(split, shots, query_shots, tasks, data.derive_seed(self.config.seed, rank))


def _batch(sample) -> lf.TaskBatch:
    return lf.TaskBatch(*sample[:4])


# ----------------------------------------------------------------------------- damping


def _kfac_parameter_count(model) -> int:
    return sum(layer_params for layer_params in (
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))))


def laplace_evidence(post, model, support_y_nll, grid=DAMPING_GRID) -> torch.Tensor:
    """Laplace log marginal likelihood per (delta, task), ``[len(grid), T]``.

    ``log Z(delta) = log p(D|phi) - delta/2 ||phi - theta||^2 + P/2 log delta - 1/2 log det H``
    with ``H = s G (x) A + delta I`` over the P K-FAC parameters (the 2 pi terms cancel).
    The eigenvalues of every factor are computed once; each delta only re-sums
    ``log(s mu lambda + delta)``.
    """
    theta = dict(model.named_parameters())
    sq_dist = sum(((post.params[k] - theta[k].detach()) ** 2).flatten(1).sum(1) for k in post.params)
    P = _kfac_parameter_count(model)
    # The eigenvalues cached by the posterior's KronCurvature (a low-rank A or G: those of its
    # dual Gram matrix, the other pairs hold an exact zero and add log(delta) each).
    curv = post.curvature
    products = [curv.scale * (mu.clamp_min(0).unsqueeze(-1) * lam.clamp_min(0).unsqueeze(-2)).flatten(1)
                for lam, mu in zip(curv.evals_A, curv.evals_G)]
    null_pairs = curv._null_pairs()
    rows = []
    for delta in grid:
        logdet = (sum(torch.log(p.double() + delta).sum(1) for p in products)
                  + null_pairs * math.log(delta))
        rows.append(-support_y_nll.double() - 0.5 * delta * sq_dist.double() + 0.5 * P * math.log(delta)
                    - 0.5 * logdet)
    return torch.stack(rows)


def _summed_nll(post, x, y, loss) -> torch.Tensor:
    """sum_n -log p(y_n | x_n, phi_i) per task at the adapted parameters (sigma = 1)."""
    if loss == "mse":
        mean, _ = post.predict(x)
        return (0.5 * (mean - y) ** 2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    probs = post.predict(x)
    return -probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-12).log().flatten(1).sum(1)


def predictive_nll(post, x, y, loss, samples, seed, grid=DAMPING_GRID) -> torch.Tensor:
    """Mean predictive NLL per (delta, task), ``[len(grid), T]``, of the evaluation's LLAMA
    predictive (``samples`` posterior samples; moment-matched Gaussian for regression) on
    ``(x, y)``. The posterior is re-damped with ``with_damping`` (one adaptation and one
    eigendecomposition for the whole grid) and every delta sees the same normal draws (a
    generator seeded with ``seed`` each time), so the curve is smooth in delta."""
    rows = []
    for delta in grid:
        generator = torch.Generator(device=x.device).manual_seed(seed)
        out = post.with_damping(delta).predict(x, num_samples=samples, generator=generator)
        rows.append(_gaussian_nll(*out, y) if loss == "mse" else _categorical_nll(out, y))
    return torch.stack(rows)


def select_damping(config, model, tasks) -> tuple[float, list]:
    """LLAMA's posterior delta, chosen on the meta-validation tasks over DAMPING_GRID.

    ``config.damping_objective``: "evidence" maximises the summed Laplace evidence of the
    support sets (laplace-torch's marginal-likelihood choice); "nll" minimises the mean
    predictive NLL of the query sets under the evaluation's S-sample predictive (laplace-torch's
    ``optimize_prior_precision(method="gridsearch")`` on validation NLL). Returns the delta and
    ``[(delta, objective)]`` over the grid.
    """
    sampler = tasks.fixed("val", config.shots, config.query_shots, VAL_TASKS[config.task], VAL_RANK)
    batch = _batch(sampler.sample())
    loss = _loss(config)
    post = lf.adapt(model, batch.support_x, batch.support_y, loss=loss, inner_lr=config.inner_lr,
                    inner_steps=config.inner_steps, damping=1.0, fisher=config.fisher)
    if config.damping_objective == "nll":
        values = predictive_nll(post, batch.query_x, batch.query_y, loss, config.samples,
                                data.derive_seed(config.seed, VAL_RANK))
        what = "predictive NLL"
    else:
        values = laplace_evidence(post, model, _summed_nll(post, batch.support_x, batch.support_y, loss))
        what = "Laplace evidence"
    finite = torch.isfinite(values).all(0)
    if not bool(finite.all()):
        print(f"damping auto: {int((~finite).sum())} of {finite.numel()} validation tasks have a "
              f"non-finite {what}; left out of it")
    total = values[:, finite].sum(1) if config.damping_objective == "evidence" else values[:, finite].mean(1)
    if not bool(torch.isfinite(total).any()):
        raise FloatingPointError(f"damping auto: the {what} is not finite for any delta "
                                 "(did meta-training diverge?)")
    if config.damping_objective == "nll":
        best = int(total.nan_to_num(nan=math.inf).argmin())
    else:
        best = int(total.nan_to_num(nan=-math.inf).argmax())
    return DAMPING_GRID[best], [(d, float(e)) for d, e in zip(DAMPING_GRID, total)]


def damping_message(config, curve, delta) -> str:
    """One line: the objective over the grid and the choice (flagged at the grid's edge)."""
    if config.damping_objective == "nll":
        head = (f"damping auto (nll): mean predictive NLL (S = {config.samples}) of the meta-validation "
                "query sets per delta: ")
    else:
        head = "damping auto (evidence): Laplace evidence of the meta-validation support sets per delta: "
    edge = " (the edge of the grid)" if delta in (DAMPING_GRID[0], DAMPING_GRID[-1]) else ""
    return head + ", ".join(f"{d:g}: {e:.4g}" for d, e in curve) + f" -> delta = {delta:g}{edge}"


def choose_eval_damping(trainer) -> bool:
    """Under damping auto with a LLAMA learner: select the evaluation's delta on the current
    meta-parameters, keep the curve for metrics.json and print it. False if there is nothing
    to select (a fixed delta, or no LLAMA)."""
    c = trainer.config
    llama = trainer.learner("llama")
    if c.damping != "auto" or llama is None:
        return False
    trainer.eval_damping, trainer.damping_curve = select_damping(c, llama.model, trainer.tasks)
    print(damping_message(c, trainer.damping_curve, trainer.eval_damping))
    return True


# ----------------------------------------------------------------------------- training


def _single_process(config) -> distributed.DistContext:
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
        if config.task == "sinusoid":
            # A 1-40-40-1 MLP is far too small to split over threads: one thread is faster,
            # most of all on a shared machine.
            torch.set_num_threads(1)
        self.ctx = ctx or _single_process(config)
        self.config, self.device = config, _rank_device(config, self.ctx)
        self.out = Path(config.output)
        self.loss = _loss(config)
        self.tasks = Tasks(config, self.device, self.ctx.rank, self.ctx.world_size)
        self.learners = build_learners(config, self.device)
        if self.ctx.group is not None:
            self._join_ranks()
        self.iteration = 0
        # Training uses `damping`; the held-out evaluation `eval_damping` (auto: re-selected on
        # the final meta-parameters). Kept apart so a run resumed from the end of a shorter run
        # trains with exactly the delta an uninterrupted run would.
        self.damping = INITIAL_DAMPING if config.damping == "auto" else float(config.damping)
        self.eval_damping = self.damping
        self.damping_history = []

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
                 "optimizers": {l.name: l.optimizer.state_dict() for l in self.learners}}
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

    def resume(self, path) -> None:
        """Load a checkpoint to continue training: it must come from the same world size,
        since each rank continues its own task stream."""
        state = load_checkpoint(path)
        saved = int(state.get("world_size", 1))
        if saved != self.ctx.world_size:
            how = ("in one process (plain python or torchrun --nproc_per_node=1)" if saved == 1
                   else f"with {saved} processes (e.g. torchrun --nproc_per_node={saved})")
            raise CheckpointError(path, f"written by a {saved}-process run, this run has "
                                        f"{self.ctx.world_size} (each rank continues its own task stream): "
                                        f"resume it {how}, or train into a new --output")
        self.load_state_dict(state)

    def save(self) -> None:
        """Write the checkpoint (rank 0). Distributed: a collective that gathers every rank's
        state first, so every rank must call it."""
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
        batch = _batch(self.tasks.train.sample())
        stats = {}
        for learner in self.learners:
            llama = learner.name == "llama"
            out = lf.meta_step(learner.model, batch, learner.optimizer, algorithm=learner.name,
                               loss=self.loss, inner_lr=c.inner_lr, inner_steps=c.inner_steps,
                               eta=c.eta if llama else None, damping=self.damping if llama else None,
                               fisher=c.fisher, first_order=c.first_order, process_group=self.ctx.group)
            stats[learner.name] = _step_row(out, global_means=self.ctx.group is not None)
        self.iteration += 1
        return stats

    def validate(self) -> dict:
        """Query loss (and accuracy) on fixed meta-validation tasks; logs the auto delta."""
        c = self.config
        sampler = self.tasks.fixed("val", c.shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK)
        batch = _batch(sampler.sample())
        rows = {}
        for learner in self.learners:
            post = lf.adapt(learner.model, batch.support_x, batch.support_y, loss=self.loss,
                            inner_lr=c.inner_lr, inner_steps=c.inner_steps, damping=self.damping,
                            fisher=c.fisher)
            if self.loss == "mse":
                mean, _ = post.predict(batch.query_x)
                rows[learner.name] = {"val_mse": metrics.mse(mean, batch.query_y)}
            else:
                probs = post.predict(batch.query_x)
                rows[learner.name] = {"val_accuracy": metrics.accuracy(probs, batch.query_y),
                                      "val_nll": metrics.nll(probs, batch.query_y)}
        llama = self.learner("llama")
        if c.damping == "auto" and llama is not None:
            # Logged, not applied: LLAMA's training keeps its initial delta. Switching the
            # log-det term to the evidence's choice (delta = 100) mid-run made the meta-gradient
            # NaN within a few hundred iterations on the sinusoid quickstart.
            selected, _ = select_damping(c, llama.model, self.tasks)
            self.damping_history.append((self.iteration, selected))
            rows["llama"]["damping_selected"] = selected
        return rows

    def learner(self, name):
        return next((l for l in self.learners if l.name == name), None)


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


class _NoLog:
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
        _final_damping(trainer)
    trainer.save()


def _final_damping(trainer: Trainer) -> None:
    """The delta the held-out evaluation uses (rank 0: it alone evaluates). The final choice,
    on the trained meta-parameters, is what the evaluation uses."""
    if not choose_eval_damping(trainer):
        trainer.eval_damping = trainer.damping


# ----------------------------------------------------------------------------- evaluation


def _ci(values) -> dict:
    mean, half = metrics.mean_ci95(values)
    return {"mean": mean, "ci95": half}


def _posteriors(trainer, learner, batch, steps):
    c = trainer.config
    return lf.adapt(learner.model, batch.support_x, batch.support_y, loss=trainer.loss,
                    inner_lr=c.inner_lr, inner_steps=steps, damping=trainer.eval_damping, fisher=c.fisher)


POINT = "llama_point"   # results column: LLAMA's adapted mean phi_i alone (no posterior samples)


def _columns(learner) -> tuple:
    """The results columns of a learner (see ``_predict``)."""
    return (learner.name, POINT) if learner.name == "llama" else (learner.name,)


def _predict(trainer, learner, post, x, generator, noise=None) -> dict:
    """Predictions by results column. MAML: its adapted point estimate. LLAMA: the posterior
    predictive with S samples, and (as "llama_point") the point estimate phi_i of the same
    posterior, so that the samples' effect is visible; the point estimate draws nothing, so
    the sampled predictive is the same with or without it. ``noise``: the regression
    predictives' observation noise sigma by column (1 where absent; classification: none)."""
    return {column: _predict_column(trainer, post, x, column, generator,
                                    None if noise is None else noise.get(column, 1.0))
            for column in _columns(learner)}


def _predict_column(trainer, post, x, column, generator, sigma=None):
    """One results column's predictions (``_predict``); ``sigma`` None: no noise argument
    (classification's predict takes none)."""
    noise = {} if sigma is None else {"noise": sigma}
    if column == "llama":
        return post.predict(x, num_samples=trainer.config.samples, generator=generator, **noise)
    return post.predict(x, **noise)


def _chunks(batch: lf.TaskBatch, size: int):
    for i in range(0, batch.tasks, size):
        yield lf.TaskBatch(*(t[i:i + size] for t in (batch.support_x, batch.support_y,
                                                      batch.query_x, batch.query_y)))


def _gaussian_nll(mean, std, y) -> torch.Tensor:
    """Mean Gaussian NLL per task, ``[T]`` (float64)."""
    z = (y - mean) / std
    return (0.5 * z ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).mean(1).double()


def fit_noise(predict, y, grid=NOISE_GRID) -> tuple[float, list]:
    """The observation noise sigma on ``grid`` with the lowest mean Gaussian predictive NLL of
    ``y [T, M, D]``; ``predict(sigma)`` returns the predictive ``(mean, std)`` with noise sigma
    (each call must see the same posterior draws). Tasks whose NLL is not finite at some sigma
    are left out. Returns sigma and ``[(sigma, mean NLL)]`` over the grid."""
    values = torch.stack([_gaussian_nll(*predict(sigma), y) for sigma in grid])    # [len(grid), T]
    finite = torch.isfinite(values).all(0)
    if not bool(finite.any()):
        raise FloatingPointError("noise auto: the validation NLL is not finite for any task "
                                 "(did meta-training diverge?)")
    curve = values[:, finite].mean(1)
    return grid[int(curve.argmin())], [(sigma, float(v)) for sigma, v in zip(grid, curve)]


def select_noise(trainer, shots, steps) -> dict:
    """noise = "auto": per results column, ``fit_noise`` on the meta-validation tasks (those of
    ``select_damping``: ``tasks.fixed("val", ...)``, seeded with VAL_RANK, here with ``shots``
    support points) adapted with ``steps`` inner steps, the evaluation's predictive (S samples
    for LLAMA, the same draws for every sigma). Returns ``{column: (sigma, curve)}``."""
    c = trainer.config
    sampler = trainer.tasks.fixed("val", shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK)
    batch = _batch(sampler.sample())
    seed = data.derive_seed(c.seed, VAL_RANK)
    chosen = {}
    for learner in trainer.learners:
        post = _posteriors(trainer, learner, batch, steps)
        for column in _columns(learner):
            def predict(sigma, column=column):   # this column only, the same draws every time
                generator = torch.Generator().manual_seed(seed)
                return _predict_column(trainer, post, batch.query_x, column, generator, sigma)
            chosen[column] = fit_noise(predict, batch.query_y)
    return chosen


def noise_message(setting, chosen) -> str:
    """One line per evaluation setting: each column's sigma and its validation NLL."""
    parts = []
    for column, (sigma, curve) in chosen.items():
        edge = " (grid edge)" if sigma in (NOISE_GRID[0], NOISE_GRID[-1]) else ""
        parts.append(f"{column.upper().replace('_', ' ')} {sigma:.3g}{edge} (NLL {dict(curve)[sigma]:.4g})")
    return (f"noise auto, {setting}: sigma minimising the mean predictive NLL of the meta-validation "
            "query sets: " + ", ".join(parts))


def evaluate_regression(trainer) -> dict:
    """Per algorithm, per K and inner steps: MSE, Gaussian NLL, interval coverage (95% CIs).
    The observation noise sigma of the predictives is ``config.noise``, or under "auto" fitted
    per setting and column on the meta-validation tasks (``select_noise``); the choices are
    kept in ``trainer.eval_noise`` / ``trainer.noise_curve`` for metrics.json."""
    c = trainer.config
    results = {}
    trainer.eval_noise, trainer.noise_curve = {}, {}
    for shots in SINUSOID_EVAL_SHOTS:
        sampler = trainer.tasks.fixed("test", shots, SINUSOID_EVAL_QUERY, c.eval_tasks, TEST_RANK + shots)
        batch = _batch(sampler.sample())
        for steps in EVAL_STEPS:
            setting = f"K{shots}_steps{steps}"
            if c.noise == "auto":
                chosen = select_noise(trainer, shots, steps)
                print(noise_message(setting, chosen))
            else:
                chosen = {n: (float(c.noise), []) for learner in trainer.learners for n in _columns(learner)}
            for column, (sigma, curve) in chosen.items():
                trainer.eval_noise.setdefault(column, {})[setting] = sigma
                if curve:
                    trainer.noise_curve.setdefault(column, {})[setting] = [list(x) for x in curve]
            noise = {column: sigma for column, (sigma, _) in chosen.items()}
            for learner in trainer.learners:
                generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
                post = _posteriors(trainer, learner, batch, steps)
                for name, (mean, std) in _predict(trainer, learner, post, batch.query_x, generator,
                                                  noise).items():
                    results.setdefault(name, {})[setting] = _regression_metrics(mean, std, batch.query_y)
    return results


def _regression_metrics(mean, std, y) -> dict:
    per_task_mse = ((mean - y) ** 2).flatten(1).mean(1)
    per_task_nll = _gaussian_nll(mean, std, y)
    entry = {"mse": _ci(per_task_mse), "nll": _ci(per_task_nll)}
    for level, cov in metrics.gaussian_interval_coverage(y, mean, std).items():
        entry[f"coverage_{round(level * 100)}"] = cov
    return entry


def _categorical_nll(probs, labels) -> torch.Tensor:
    """Mean -log p(label) per task, ``[T]`` (float64; probabilities floored at 1e-12)."""
    picked = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().clamp_min(1e-12)
    return -picked.log().flatten(1).mean(1)


def _classification_metrics(probs, labels) -> dict:
    per_task_acc = (probs.argmax(-1) == labels).double().mean(1)
    per_task_nll = _categorical_nll(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    per_task_brier = ((probs.double() - onehot) ** 2).sum(-1).mean(1)
    return {"accuracy": _ci(per_task_acc), "nll": _ci(per_task_nll), "brier": _ci(per_task_brier),
            # ECE pools every prediction: a task has too few queries for 15 bins.
            "ece": metrics.expected_calibration_error(probs, labels)}


def classification_probs(trainer, learner, batch, steps, chunk) -> dict:
    """Query-set probabilities ``[T, M, C]`` by results column (see ``_predict``)."""
    c = trainer.config
    generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
    parts = {}
    for part in _chunks(batch, chunk):
        post = _posteriors(trainer, learner, part, steps)
        for name, probs in _predict(trainer, learner, post, part.query_x, generator).items():
            parts.setdefault(name, []).append(probs)
    return {name: torch.cat(p) for name, p in parts.items()}


def evaluate_classification(trainer, batch, tag) -> tuple[dict, dict]:
    """Accuracy, NLL, Brier (95% CIs over tasks) and 15-bin ECE per algorithm; the probs."""
    c = trainer.config
    results, all_probs = {}, {}
    for learner in trainer.learners:
        for name, probs in classification_probs(trainer, learner, batch, c.inner_steps,
                                                EVAL_CHUNK[c.task]).items():
            all_probs[name] = probs
            results[name] = {tag: _classification_metrics(probs, batch.query_y)}
    return results, all_probs


def evaluate_oneshot(trainer, runs_dir) -> dict:
    """Lake et al.'s 20-way one-shot runs, each a task (20 support, 20 query images)."""
    runs = data.load_oneshot_runs(runs_dir)
    support_x, support_y, query_x, query_y = (t.to(trainer.device) for t in data.stack_runs(runs))
    if trainer.config.ways != support_y.shape[1]:
        # The head has config.ways outputs; a 20-way run needs a 20-way model.
        return {"oneshot_runs_skipped": f"the model is {trainer.config.ways}-way, the runs are "
                           f"{support_y.shape[1]}-way; train with --ways {support_y.shape[1]}"}
    results, _ = evaluate_classification(trainer, lf.TaskBatch(support_x, support_y, query_x, query_y),
                                         "oneshot_runs")
    return results


def _merge(target: dict, extra: dict) -> dict:
    for name, entries in extra.items():
        if isinstance(entries, dict):
            target.setdefault(name, {}).update(entries)
        else:
            target[name] = entries
    return target


def evaluate_trainer(trainer) -> tuple[dict, dict]:
    """The held-out evaluation of every learner; (results, probabilities for plots)."""
    c = trainer.config
    torch.manual_seed(data.derive_seed(c.seed, TEST_RANK))   # nothing here depends on prior draws
    probs = {}
    if c.task == "sinusoid":
        results = evaluate_regression(trainer)
    else:
        sampler = trainer.tasks.fixed("test", c.shots, c.query_shots, c.eval_tasks, TEST_RANK)
        results, probs = evaluate_classification(trainer, _batch(sampler.sample()), "test")
    if c.oneshot_runs:
        _merge(results, evaluate_oneshot(trainer, c.oneshot_runs))
    return results, probs


def summary(trainer, results, wall_s) -> dict:
    c = trainer.config
    return {"task": c.task, "iterations": trainer.iteration, "eval_tasks": c.eval_tasks,
            "samples": c.samples, "damping": trainer.eval_damping, "damping_mode": str(c.damping),
            "damping_objective": c.damping_objective,
            # The objective over the grid behind an auto choice (empty for a fixed delta).
            "damping_curve": [list(x) for x in getattr(trainer, "damping_curve", None) or []],
            "damping_history": [list(x) for x in trainer.damping_history],
            # sinusoid: the observation noise sigma per results column and setting ({} for
            # omniglot), and under noise = "auto" the validation NLL over NOISE_GRID behind it.
            "noise_mode": str(c.noise), "noise": getattr(trainer, "eval_noise", None) or {},
            "noise_curve": getattr(trainer, "noise_curve", None) or {},
            "wall_seconds": round(wall_s, 1), "results": results}


# ----------------------------------------------------------------------------- reporting


def _fmt(entry) -> str:
    if isinstance(entry, dict):
        return f"{entry['mean']:.3f} ± {entry['ci95']:.3f}"
    return f"{entry:.3f}"


def _damping_note(trainer) -> str:
    c = trainer.config
    mode = f"auto, {c.damping_objective}" if c.damping == "auto" else "fixed"
    note = f"LLAMA damping delta = {trainer.eval_damping:g} ({mode}), S = {c.samples}"
    if c.task == "sinusoid":
        note += (", observation noise sigma fitted per setting and column on the meta-validation tasks"
                 if c.noise == "auto" else f", observation noise sigma = {float(c.noise):g}")
    if trainer.learner("llama") is not None:
        note += "\n(LLAMA: the posterior predictive of S samples; LLAMA POINT: the same posterior's mean phi_i)"
    return note


def table(results: dict) -> str:
    """The MAML-vs-LLAMA table: one row per (setting, metric), one column per algorithm."""
    names = [n for n, v in results.items() if isinstance(v, dict)]
    settings = list(dict.fromkeys(s for n in names for s in results[n]))
    lines = [f"{'setting':<16}{'metric':<13}" + "".join(f"{n.upper().replace('_', ' '):>20}" for n in names)]
    for setting in settings:
        metric_names = list(dict.fromkeys(m for n in names for m in results[n].get(setting, {})))
        for metric in metric_names:
            cells = [_fmt(results[n][setting][metric]) if metric in results[n].get(setting, {}) else "-"
                     for n in names]
            lines.append(f"{setting:<16}{metric:<13}" + "".join(f"{cell:>20}" for cell in cells))
    return "\n".join(lines)


def write_plots(trainer, probs) -> list[Path]:
    # Imported here: matplotlib adds ~1 s to the start of every process, and under torchrun
    # only rank 0 plots.
    from llama_fast import plots

    out = trainer.out
    paths = [plots.plot_learning_curves(out / "learning_curves.png", plots.read_metrics_csv(out / METRICS_FILE))]
    if trainer.config.task == "sinusoid":
        paths.append(sinusoid_figure(trainer, out / "sinusoid.png"))
    for name, p in probs.items():
        labels = trainer.tasks.fixed("test", trainer.config.shots, trainer.config.query_shots,
                                     trainer.config.eval_tasks, TEST_RANK).sample().query_y
        paths.append(plots.plot_reliability(out / f"reliability_{name}.png", p, labels,
                                            title=f"{name.upper().replace('_', ' ')}: reliability (ECE "
                                                  f"{100 * metrics.expected_calibration_error(p, labels):.2f}%)"))
    return paths


def _sample_functions(post, x, num_samples, generator) -> torch.Tensor:
    """Outputs of posterior samples on x: [T, S, M]."""
    with torch.no_grad():
        f = post.sample_outputs(post.sample(num_samples, generator), x)   # [S, T, M, 1]
    return f.squeeze(-1).transpose(0, 1)


def sinusoid_figure(trainer, path, tasks=4, shots=10, points=200) -> Path:
    """Support points, true function, MAML's fit, LLAMA's posterior samples and band."""
    c = trainer.config
    sample = trainer.tasks.fixed("test", shots, 1, tasks, PLOT_RANK).sample()
    grid = torch.linspace(-5, 5, points, device=trainer.device)
    x = grid.view(1, -1, 1).expand(tasks, -1, -1)
    true_y = data.sinusoid(x, sample.amplitude, sample.phase).squeeze(-1)
    batch = _batch(sample)
    fit_y = sample_y = None
    maml, llama = trainer.learner("maml"), trainer.learner("llama")
    if maml is not None:
        fit_y = _posteriors(trainer, maml, batch, c.inner_steps).predict(x)[0].squeeze(-1)
    if llama is not None:
        generator = torch.Generator().manual_seed(data.derive_seed(c.seed, PLOT_RANK))
        post = _posteriors(trainer, llama, batch, c.inner_steps)
        sample_y = _sample_functions(post, x, max(c.samples, 20), generator)
    titles = [f"A={a:.2f}, phase={p:.2f}" for a, p in zip(sample.amplitude.tolist(), sample.phase.tolist())]
    from llama_fast import plots

    return plots.plot_sinusoid_tasks(path, grid, true_y, sample.support_x, sample.support_y,
                                     fit_y=fit_y, sample_y=sample_y, titles=titles)


def report(trainer, results, wall_s, probs) -> dict:
    out = summary(trainer, results, wall_s)
    (trainer.out / METRICS_JSON).write_text(json.dumps(out, indent=2) + "\n")
    paths = write_plots(trainer, probs)
    print(f"\n{trainer.config.task}: {trainer.iteration} iterations, held-out tasks: {trainer.config.eval_tasks}, "
          f"{_damping_note(trainer)}")
    print(table(results))
    print(f"wall time {wall_s:.1f} s; wrote {trainer.out / METRICS_JSON}, {trainer.out / METRICS_FILE}, "
          f"{trainer.out / CHECKPOINT_FILE}, " + ", ".join(str(p) for p in paths))
    return out


# ----------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def _process_group(config):
    """The DistContext of this process: torchrun's process group when it started several
    (WORLD_SIZE > 1; gloo for --device cpu, else NCCL), destroyed when training ends."""
    if distributed.launched_world_size() == 1:
        yield _single_process(config)
        return
    backend = "gloo" if config.resolved_device().type == "cpu" else None
    ctx = distributed.init_from_env(backend=backend)
    # Not destroyed when an exception leaves: that would close the connections before this
    # rank's error reaches torchrun, and a peer's follow-on error could pass for the root cause.
    yield ctx
    torch.distributed.destroy_process_group()


def run(config: ExperimentConfig) -> int:
    """`llama-fast train`: meta-train (or resume), evaluate, write metrics, plots, checkpoint.
    Under torchrun, @record puts a failing rank's traceback into torchrun's summary."""
    if distributed.launched_world_size() > 1:
        return distributed.record(_run)(config)
    return _run(config)


def _run(config: ExperimentConfig) -> int:
    start = time.perf_counter()
    with _process_group(config) as ctx:
        trainer = Trainer(config, ctx)
        resume_from = None
        if config.resume:
            trainer.resume(trainer.out / CHECKPOINT_FILE)
            resume_from = trainer.iteration
            if ctx.is_main:
                print(f"resuming {trainer.out} from iteration {resume_from}")
        log = _NoLog()
        if ctx.is_main:
            log = metrics.MetricsLog(trainer.out / METRICS_FILE, resume_from=resume_from if config.resume else 0)
        train(trainer, log)
    if not ctx.is_main:
        return 0
    # Rank 0 evaluates outside the process group: the others have left, and a long evaluation
    # cannot run into the collective timeout.
    results, probs = evaluate_trainer(trainer)
    report(trainer, results, time.perf_counter() - start, probs)
    return 0


def evaluate(config: ExperimentConfig) -> int:
    """`llama-fast eval`: load a run's checkpoint and repeat the held-out evaluation."""
    if not distributed.is_main_process():
        return 0   # started by torchrun: the evaluation runs in one process, rank 0's
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.load_state_dict(load_checkpoint(trainer.out / CHECKPOINT_FILE))
    if config.damping != "auto":   # an explicit --damping overrides the run's selection
        trainer.eval_damping = float(config.damping)
    else:
        # The same deterministic choice training's end makes; also covers a checkpoint written
        # mid-run (a killed run evaluated as it stands).
        choose_eval_damping(trainer)
    results, probs = evaluate_trainer(trainer)
    out = summary(trainer, results, time.perf_counter() - start)
    (trainer.out / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{config.task}: checkpoint at iteration {trainer.iteration}, {_damping_note(trainer)}")
    print(table(results))
    if "oneshot_runs_skipped" in results:
        print(f"one-shot runs not evaluated: {results['oneshot_runs_skipped']}")
    print(f"wrote {trainer.out / 'eval.json'}")
    return 0
