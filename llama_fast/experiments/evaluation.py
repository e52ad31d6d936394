"""The held-out evaluation of every learner: regression (MSE, Gaussian NLL, interval coverage
per support size and inner steps), classification (accuracy, NLL, Brier, ECE) and Lake's
one-shot runs, with 95% confidence intervals over tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import meta
from . import data, metrics
from .columns import categorical_nll, chunks, columns, gaussian_nll, posteriors, predict
from .learners import SAMPLE_RANK, TEST_RANK, task_batch
from .selection import noise_message, select_noise

SINUSOID_EVAL_SHOTS = (5, 10)
EVAL_STEPS = (1, 10)
SINUSOID_EVAL_QUERY = 100    # query points per held-out sinusoid task
EVAL_CHUNK = {"sinusoid": 600, "omniglot": 50}   # tasks per adapt call (memory bound)


@dataclass
class Evaluation:
    """What ``evaluate_trainer`` measured: ``results`` by column and setting; ``probs``, the
    classification query probabilities by column (for the reliability plots); for the
    sinusoid, ``noise``, the observation noise sigma by column and setting, and under noise
    "auto" ``noise_curve``, the validation NLL over NOISE_GRID behind each choice."""

    results: dict
    probs: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    noise_curve: dict = field(default_factory=dict)


def _ci(values) -> dict:
    mean, half = metrics.mean_ci95(values)
    return {"mean": mean, "ci95": half}


def evaluate_regression(trainer) -> Evaluation:
    """Per algorithm, per K and inner steps: MSE, Gaussian NLL, interval coverage (95% CIs).
    The observation noise sigma of the predictives is ``config.noise``, or under "auto" fitted
    per setting and column on the meta-validation tasks (``select_noise``); the Evaluation
    returned holds the choices for metrics.json."""
    c = trainer.config
    results, eval_noise, noise_curve = {}, {}, {}
    for shots in SINUSOID_EVAL_SHOTS:
        sampler = trainer.tasks.fixed("test", shots, SINUSOID_EVAL_QUERY, c.eval_tasks, TEST_RANK + shots)
        batch = task_batch(sampler.sample())
        for steps in EVAL_STEPS:
            setting = f"K{shots}_steps{steps}"
            if c.noise == "auto":
                chosen = select_noise(trainer, shots, steps)
                print(noise_message(setting, chosen))
            else:
                chosen = {n: (float(c.noise), []) for learner in trainer.learners for n in columns(learner)}
            for column, (sigma, curve) in chosen.items():
                eval_noise.setdefault(column, {})[setting] = sigma
                if curve:
                    noise_curve.setdefault(column, {})[setting] = [list(x) for x in curve]
            noise = {column: sigma for column, (sigma, _) in chosen.items()}
            for learner in trainer.learners:
                generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
                post = posteriors(trainer, learner, batch, steps)
                for name, (mean, std) in predict(trainer, learner, post, batch.query_x, generator,
                                                  noise).items():
                    results.setdefault(name, {})[setting] = _regression_metrics(mean, std, batch.query_y)
    return Evaluation(results, noise=eval_noise, noise_curve=noise_curve)


def _regression_metrics(mean, std, y) -> dict:
    per_task_mse = ((mean - y) ** 2).flatten(1).mean(1)
    per_task_nll = gaussian_nll(mean, std, y)
    entry = {"mse": _ci(per_task_mse), "nll": _ci(per_task_nll)}
    for level, cov in metrics.gaussian_interval_coverage(y, mean, std).items():
        entry[f"coverage_{round(level * 100)}"] = cov
    return entry


def _classification_metrics(probs, labels) -> dict:
    per_task_acc = (probs.argmax(-1) == labels).double().mean(1)
    per_task_nll = categorical_nll(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    per_task_brier = ((probs.double() - onehot) ** 2).sum(-1).mean(1)
    return {"accuracy": _ci(per_task_acc), "nll": _ci(per_task_nll), "brier": _ci(per_task_brier),
            # ECE pools every prediction: a task has too few queries for 15 bins.
            "ece": metrics.expected_calibration_error(probs, labels)}


def classification_probs(trainer, learner, batch, steps, chunk) -> dict:
    """Query-set probabilities ``[T, M, C]`` by results column (see ``predict``)."""
    c = trainer.config
    generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
    parts = {}
    for part in chunks(batch, chunk):
        post = posteriors(trainer, learner, part, steps)
        for name, probs in predict(trainer, learner, post, part.query_x, generator).items():
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
    results, _ = evaluate_classification(trainer, meta.TaskBatch(support_x, support_y, query_x, query_y),
                                         "oneshot_runs")
    return results


def _merge(target: dict, extra: dict) -> dict:
    for name, entries in extra.items():
        if isinstance(entries, dict):
            target.setdefault(name, {}).update(entries)
        else:
            target[name] = entries
    return target


def evaluate_trainer(trainer) -> Evaluation:
    """The held-out evaluation of every learner."""
    c = trainer.config
    torch.manual_seed(data.derive_seed(c.seed, TEST_RANK))   # nothing here depends on prior draws
    if c.task == "sinusoid":
        evaluation = evaluate_regression(trainer)
    else:
        sampler = trainer.tasks.fixed("test", c.shots, c.query_shots, c.eval_tasks, TEST_RANK)
        evaluation = Evaluation(*evaluate_classification(trainer, task_batch(sampler.sample()), "test"))
    if c.oneshot_runs:
        _merge(evaluation.results, evaluate_oneshot(trainer, c.oneshot_runs))
    return evaluation
