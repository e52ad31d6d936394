"""Tempered and last-layer GLM predictives of a trained Omniglot run, against its point estimate.

For every learner of the run folder and each number of inner steps asked for, on the run's
meta-validation tasks (as ``llama-fast eval`` draws them) it adapts, takes the Laplace
evidence's per-layer deltas, and chooses by the mean query NLL of the probit GLM predictive:

- "scaled": the evidence's deltas times c (``SCALE_GRID[:9]``, 1 .. 1e4), with a posterior
  temperature T (the covariance ``T J H^-1 J^T``, i.e. the precision H / T; 1 .. 1e-6);
- "last-layer": the head's delta over ``DAMPING_GRID``, every other layer's 1e12 (its
  posterior collapsed onto phi_i), with the same temperatures.

It then reports, on the run's held-out tasks (``--eval-tasks`` of the run, as ``eval``): mean
confidence (the largest probability), accuracy, NLL and ECE of the point estimate, of both
chosen variants and of both at T = 1, and the paired NLL differences to the point estimate
(95% CIs over tasks). T -> 0 (or c -> inf) is the point estimate itself, so a variant can only
lose on validation by less than the grid's resolution.

    python scripts/glm_variants.py runs/omniglot --steps 1 3 10
"""

import argparse
from pathlib import Path

import torch

from llama_fast.experiments import data, metrics
from llama_fast.experiments.checkpoint import load_checkpoint
from llama_fast.experiments.columns import categorical_nll, chunks, posteriors
from llama_fast.experiments.config import CHECKPOINT_FILE, CONFIG_FILE, ExperimentConfig
from llama_fast.experiments.evaluation import EVAL_CHUNK
from llama_fast.experiments.learners import TEST_RANK, VAL_RANK, VAL_TASKS, task_batch
from llama_fast.experiments.selection import DAMPING_GRID, SCALE_GRID, evidence_damping
from llama_fast.experiments.training import Trainer
from llama_fast.meta.predictive import probit_softmax

TEMPERATURES = tuple(10.0 ** (-k / 2) for k in range(13))
COLLAPSED = 1e12   # a layer's delta that leaves it out of the posterior (variance <= 1e-12)


def variants(evidence):
    """(name, per-layer deltas) of both families."""
    L = len(evidence)
    return ([(f"scaled c={c:g}", [c * d for d in evidence]) for c in SCALE_GRID[:9]]
            + [(f"last-layer delta={d:g}", [COLLAPSED] * (L - 1) + [d]) for d in DAMPING_GRID])


def covariances(post, x, deltas):
    """[D, T, M, K, K] for D per-layer damping lists."""
    grid = torch.tensor(deltas, dtype=x.dtype, device=x.device).unsqueeze(1).expand(-1, post.tasks, -1)
    return post.functional_covariance(x, damping_grid=grid.contiguous())


def choose(post, batch, evidence):
    """Per family the (variant index, temperature index) with the lowest validation NLL."""
    named = variants(evidence)
    f = post.outputs(batch.query_x)
    cov = covariances(post, batch.query_x, [d for _, d in named])
    nll = torch.stack([torch.stack([categorical_nll(probit_softmax(f, T * c), batch.query_y).mean()
                                    for T in TEMPERATURES]) for c in cov])      # [V, temperatures]
    point = float(categorical_nll(torch.softmax(f, -1), batch.query_y).mean())
    chosen = {}
    for family in ("scaled", "last-layer"):
        rows = [i for i, (name, _) in enumerate(named) if name.startswith(family)]
        i, t = divmod(int(nll[rows].argmin()), len(TEMPERATURES))
        chosen[family] = (rows[i], t)
        print(f"  validation {family}: {named[rows[i]][0]}, T={TEMPERATURES[t]:g}: NLL {float(nll[rows].min()):.4f} "
              f"(point {point:.4f}; best at T=1 {float(nll[rows, 0].min()):.4f})")
    return named, chosen


def held_out_probs(trainer, learner, batch, steps, named, chosen):
    """Query probabilities by column on the held-out tasks."""
    out = {}
    for part in chunks(batch, EVAL_CHUNK["omniglot"]):
        post = posteriors(trainer, learner, part, steps, 1.0)
        f = post.outputs(part.query_x)
        cov = covariances(post, part.query_x, [named[i][1] for i, _ in chosen.values()])
        out.setdefault("point", []).append(torch.softmax(f, -1))
        for c, (family, (_, t)) in zip(cov, chosen.items()):
            out.setdefault(family, []).append(probit_softmax(f, TEMPERATURES[t] * c))
            out.setdefault(f"{family} T=1", []).append(probit_softmax(f, c))
    return {k: torch.cat(v) for k, v in out.items()}


def report(probs, labels):
    nll = {}
    for name, p in probs.items():
        nll[name] = categorical_nll(p, labels)
        acc = metrics.mean_ci95((p.argmax(-1) == labels).double().mean(1))
        loss = metrics.mean_ci95(nll[name])
        print(f"  {name:16s} confidence {float(p.amax(-1).double().mean()):.3f}  accuracy {acc[0]:.3f} ± {acc[1]:.3f}"
              f"  NLL {loss[0]:.3f} ± {loss[1]:.3f}  ECE {metrics.expected_calibration_error(p, labels):.3f}")
    for name in probs:
        if name != "point":
            diff = metrics.mean_ci95(nll[name] - nll["point"])
            print(f"  {name} - point: NLL {diff[0]:+.3f} ± {diff[1]:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an Omniglot run folder (llama-fast train --output)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="inner steps to evaluate")
    args = parser.parse_args(argv)
    config = ExperimentConfig.from_sources(args.run / CONFIG_FILE, {"output": str(args.run), "resume": False})
    if config.task != "omniglot":
        parser.error(f"{args.run} is a {config.task} run; this script compares classification predictives")
    trainer = Trainer(config)
    trainer.load_state_dict(load_checkpoint(args.run / CHECKPOINT_FILE))
    c = trainer.config
    val = task_batch(trainer.tasks.fixed("val", c.shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK).sample())
    test = task_batch(trainer.tasks.fixed("test", c.shots, c.query_shots, c.eval_tasks, TEST_RANK).sample())
    for steps in args.steps:
        for learner in trainer.learners:
            # The mc Fisher's labels come from the global generator: the same draws every run.
            torch.manual_seed(data.derive_seed(c.seed, TEST_RANK))
            print(f"{learner.name.upper()}, {steps} inner step(s):")
            post = posteriors(trainer, learner, val, steps, 1.0)
            evidence, _ = evidence_damping(post, learner.model, val.support_x, val.support_y, trainer.loss)
            named, chosen = choose(post, val, evidence)
            report(held_out_probs(trainer, learner, test, steps, named, chosen), test.query_y)


if __name__ == "__main__":
    main()
