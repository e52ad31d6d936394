"""The held-out evaluation of every learner and results column: regression (MSE, Gaussian NLL,
interval coverage, predictive std inside and outside the support's range, per support size and
inner steps), classification (accuracy, NLL, Brier, ECE, entropy AUROCs for errors and
out-of-task queries) and Lake's one-shot runs, with 95% confidence intervals over tasks and
paired per-task differences between columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import meta
from . import data, metrics
from .columns import categorical_nll, chunks, columns, gaussian_nll, posteriors, predict
from .learners import SAMPLE_RANK, TEST_RANK, task_batch
from .selection import choice_message, choose_posterior

SINUSOID_EVAL_SHOTS = (5, 10)
EVAL_STEPS = (1, 10)
SINUSOID_EVAL_QUERY = 100    # query points per held-out sinusoid task
EVAL_CHUNK = {"sinusoid": 600, "omniglot": 50}   # tasks per adapt call (memory bound)


@dataclass
class Evaluation:
    """What ``evaluate_trainer`` measured: ``results`` by column and setting; ``paired``, the
    95% CIs of per-task differences between columns on the same tasks, by setting; ``probs``,
    the classification query probabilities by column (for the reliability plots); ``choices``,
    each learner's posterior choices by setting (``PosteriorChoice.as_json``)."""

    results: dict
    paired: dict = field(default_factory=dict)
    probs: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)


# Paired comparisons (A, B): per task A - B, on the same tasks. Each Laplace predictive against
# its own point estimate, and LLAMA against MAML (what LLAMA's meta-training adds).
PAIRS = (("maml_glm", "maml_point"), ("llama_glm", "llama_point"), ("llama_nn", "llama_point"),
         ("llama_point", "maml_point"), ("llama_glm", "maml_glm"))


def _ci(values) -> dict:
    mean, half = metrics.mean_ci95(values)
    return {"mean": mean, "ci95": half}


def _summarise(per_task: dict) -> dict:
    """{metric: tensor [T] or float} -> {metric: {mean, ci95} or float}."""
    return {k: _ci(v) if isinstance(v, torch.Tensor) else v for k, v in per_task.items()}


def _paired(per_task: dict) -> dict:
    """95% CIs of the per-task differences of PAIRS, for every per-task metric both columns have."""
    out = {}
    for a, b in PAIRS:
        if a in per_task and b in per_task:
            out[f"{a} - {b}"] = {k: _ci(per_task[a][k] - per_task[b][k]) for k, v in per_task[a].items()
                                 if isinstance(v, torch.Tensor) and k in per_task[b]}
    return out


def _choose(trainer, learner, shots, steps, setting, choices) -> object:
    choice = choose_posterior(trainer, learner, shots, steps)
    print(choice_message(learner.name, setting, choice))
    choices.setdefault(learner.name, {})[setting] = choice.as_json()
    return choice


def evaluate_regression(trainer) -> Evaluation:
    """Per column, per K and inner steps: MSE, Gaussian NLL, interval coverage and the predictive
    std inside vs outside the support's range (95% CIs over tasks), and the paired differences.
    Each learner's delta and sigmas are chosen per setting on the meta-validation tasks
    (``choose_posterior``)."""
    c = trainer.config
    evaluation = Evaluation({})
    for shots in SINUSOID_EVAL_SHOTS:
        sampler = trainer.tasks.fixed("test", shots, SINUSOID_EVAL_QUERY, c.eval_tasks, TEST_RANK + shots)
        batch = task_batch(sampler.sample())
        for steps in EVAL_STEPS:
            setting = f"K{shots}_steps{steps}"
            per_task = {}
            for learner in trainer.learners:
                choice = _choose(trainer, learner, shots, steps, setting, evaluation.choices)
                point_noise = choice.noise[columns(learner)[0]]
                generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
                post = posteriors(trainer, learner, batch, steps, choice.damping, noise=point_noise)
                for name, (mean, std) in predict(trainer, learner, post, batch.query_x, generator,
                                                  choice.noise).items():
                    per_task[name] = _regression_metrics(mean, std, batch)
            for name, entry in per_task.items():
                evaluation.results.setdefault(name, {})[setting] = _summarise(entry)
            evaluation.paired[setting] = _paired(per_task)
    return evaluation


def _regression_metrics(mean, std, batch) -> dict:
    """Per-task MSE and NLL ``[T]``, pooled coverages, and the mean predictive std of query
    points outside the support's x range minus inside it (tasks with both kinds)."""
    y = batch.query_y
    entry = {"mse": ((mean - y) ** 2).flatten(1).mean(1).double(), "nll": gaussian_nll(mean, std, y)}
    for level, cov in metrics.gaussian_interval_coverage(y, mean, std).items():
        entry[f"coverage_{round(level * 100)}"] = cov
    low, high = batch.support_x.amin(1), batch.support_x.amax(1)            # [T, 1]
    outside = ((batch.query_x < low.unsqueeze(1)) | (batch.query_x > high.unsqueeze(1))).squeeze(-1)
    s = std.squeeze(-1).double()
    both = outside.any(1) & (~outside).any(1)
    inside_mean = (s * ~outside).sum(1) / (~outside).sum(1).clamp_min(1)
    outside_mean = (s * outside).sum(1) / outside.sum(1).clamp_min(1)
    entry["std_inside"] = float(s[~outside].mean())
    entry["std_outside"] = float(s[outside].mean()) if bool(outside.any()) else float("nan")
    if bool(both.any()):
        entry["std_out_minus_in"] = (outside_mean - inside_mean)[both]
    return entry


def _classification_metrics(probs, labels, point_errors, ood_probs=None) -> dict:
    """Per-task accuracy, mean confidence, NLL, Brier ``[T]``; pooled ECE and the entropy AUROCs: for the
    learner's point-estimate errors (``point_errors [T, M]``, the same targets for all its
    columns) and, given ``ood_probs`` (the same posteriors on other tasks' queries), for
    out-of-task queries."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    entry = {"accuracy": (probs.argmax(-1) == labels).double().mean(1),
             # Mean largest probability: below the accuracy, the predictions are underconfident
             # (ECE alone does not say which way they miss).
             "confidence": probs.amax(-1).double().mean(1),
             "nll": categorical_nll(probs, labels),
             "brier": ((probs.double() - onehot) ** 2).sum(-1).mean(1),
             # ECE pools every prediction: a task has too few queries for 15 bins.
             "ece": metrics.expected_calibration_error(probs, labels),
             "auroc_errors": metrics.auroc(metrics.entropy(probs), point_errors)}
    if ood_probs is not None:
        scores = torch.cat([metrics.entropy(probs).flatten(), metrics.entropy(ood_probs).flatten()])
        is_ood = torch.cat([torch.zeros(probs.shape[:-1].numel()), torch.ones(ood_probs.shape[:-1].numel())])
        entry["auroc_ood"] = metrics.auroc(scores, is_ood)
    return entry


def classification_probs(trainer, learner, batch, steps, chunk, damping, ood=False) -> tuple[dict, dict]:
    """Query-set probabilities ``[T, M, C]`` by results column (see ``predict``), and with
    ``ood`` the same posteriors' probabilities on out-of-task queries: task t's posterior on the
    queries of task t+1 of its chunk (other characters of the same held-out alphabets; two
    tasks rarely share a character)."""
    c = trainer.config
    generator = torch.Generator().manual_seed(data.derive_seed(c.seed, SAMPLE_RANK))
    parts, ood_parts = {}, {}
    for part in chunks(batch, chunk):
        post = posteriors(trainer, learner, part, steps, damping)
        for name, probs in predict(trainer, learner, post, part.query_x, generator).items():
            parts.setdefault(name, []).append(probs)
        if ood and part.tasks > 1:
            for name, probs in predict(trainer, learner, post, part.query_x.roll(1, 0), generator).items():
                ood_parts.setdefault(name, []).append(probs)
    return ({name: torch.cat(p) for name, p in parts.items()},
            {name: torch.cat(p) for name, p in ood_parts.items()})


def evaluate_classification(trainer, batch, tag, ood=True) -> Evaluation:
    """Accuracy, NLL, Brier (95% CIs over tasks), 15-bin ECE and entropy AUROCs per column, the
    paired differences and the probs. Each learner's delta is chosen on the meta-validation
    tasks (``choose_posterior``)."""
    c = trainer.config
    evaluation, per_task = Evaluation({}), {}
    for learner in trainer.learners:
        choice = _choose(trainer, learner, c.shots, c.inner_steps, tag, evaluation.choices)
        probs, ood_probs = classification_probs(trainer, learner, batch, c.inner_steps, EVAL_CHUNK[c.task],
                                                choice.damping, ood=ood)
        point_errors = probs[columns(learner)[0]].argmax(-1) != batch.query_y
        for name, p in probs.items():
            evaluation.probs[name] = p
            per_task[name] = _classification_metrics(p, batch.query_y, point_errors, ood_probs.get(name))
            evaluation.results[name] = {tag: _summarise(per_task[name])}
    evaluation.paired[tag] = _paired(per_task)
    return evaluation


def evaluate_oneshot(trainer, runs_dir) -> Evaluation:
    """Lake et al.'s 20-way one-shot runs, each a task (20 support, 20 query images)."""
    runs = data.load_oneshot_runs(runs_dir)
    support_x, support_y, query_x, query_y = (t.to(trainer.device) for t in data.stack_runs(runs))
    if trainer.config.ways != support_y.shape[1]:
        # The head has config.ways outputs; a 20-way run needs a 20-way model.
        return Evaluation({"oneshot_runs_skipped": f"the model is {trainer.config.ways}-way, the runs are "
                           f"{support_y.shape[1]}-way; train with --ways {support_y.shape[1]}"})
    return evaluate_classification(trainer, meta.TaskBatch(support_x, support_y, query_x, query_y),
                                   "oneshot_runs", ood=False)


def _merge(target: Evaluation, extra: Evaluation) -> Evaluation:
    for name, entries in extra.results.items():
        if isinstance(entries, dict):
            target.results.setdefault(name, {}).update(entries)
        else:
            target.results[name] = entries
    target.paired.update(extra.paired)
    for learner, settings in extra.choices.items():
        target.choices.setdefault(learner, {}).update(settings)
    return target


def evaluate_trainer(trainer) -> Evaluation:
    """The held-out evaluation of every learner."""
    c = trainer.config
    torch.manual_seed(data.derive_seed(c.seed, TEST_RANK))   # nothing here depends on prior draws
    if c.task == "sinusoid":
        evaluation = evaluate_regression(trainer)
    else:
        sampler = trainer.tasks.fixed("test", c.shots, c.query_shots, c.eval_tasks, TEST_RANK)
        evaluation = evaluate_classification(trainer, task_batch(sampler.sample()), "test")
    if c.oneshot_runs:
        _merge(evaluation, evaluate_oneshot(trainer, c.oneshot_runs))
    return evaluation
