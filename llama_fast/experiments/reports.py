"""What a run reports: metrics.json's summary, the printed MAML-vs-LLAMA table, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import data, metrics
from .columns import posteriors
from .config import CHECKPOINT_FILE, METRICS_FILE
from .learners import PLOT_RANK, TEST_RANK, task_batch

METRICS_JSON = "metrics.json"


def summary(trainer, evaluation, wall_s) -> dict:
    """metrics.json: the run's settings and choices, and the evaluation's results."""
    c = trainer.config
    return {"task": c.task, "iterations": trainer.iteration, "eval_tasks": c.eval_tasks,
            "samples": c.samples, "training_damping": trainer.damping, "damping_mode": str(c.damping),
            "damping_objective": c.damping_objective, "learn_damping": c.learn_damping,
            "damping_history": [list(x) for x in trainer.damping_history],
            # Per learner and setting: delta (per layer under evidence), whether it sits at the
            # grid's edge, the objective over the grid, and (sinusoid) sigma per column.
            "posterior": evaluation.choices, "noise_mode": str(c.noise),
            "wall_seconds": round(wall_s, 1), "results": evaluation.results, "paired": evaluation.paired}


def _fmt(entry) -> str:
    if isinstance(entry, dict):
        return f"{entry['mean']:.3f} ± {entry['ci95']:.3f}"
    return f"{entry:.3f}"


def damping_note(trainer) -> str:
    c = trainer.config
    if c.damping == "auto":
        how = {"evidence": "per K-FAC layer by the Laplace evidence",
               "nll": "by the GLM predictive's NLL",
               "evidence-nll": "per K-FAC layer by the Laplace evidence, scaled by the GLM predictive's NLL"
               }[c.damping_objective]
        note = f"posterior delta chosen {how} on meta-validation tasks, per learner and setting"
    else:
        note = f"posterior delta = {trainer.eval_damping:g} (fixed)"
    if c.learn_damping:
        note += "; LLAMA's deltas meta-learned per layer (--learn-damping)"
    note += f", S = {c.samples}"
    if c.task == "sinusoid":
        note += (", sigma fitted per setting and column on the meta-validation tasks"
                 if c.noise == "auto" else f", observation noise sigma = {float(c.noise):g}")
    return note + ("\n(POINT: the adapted phi_i; GLM: the linearised Laplace predictive; NN: the "
                   "average over S weight samples)")


def _column_title(name: str) -> str:
    return name.upper().replace("_", " ")


def table(results: dict) -> str:
    """One row per (setting, metric), one column per results column."""
    names = [n for n, v in results.items() if isinstance(v, dict)]
    settings = list(dict.fromkeys(s for n in names for s in results[n]))
    lines = [f"{'setting':<16}{'metric':<17}" + "".join(f"{_column_title(n):>18}" for n in names)]
    for setting in settings:
        metric_names = list(dict.fromkeys(m for n in names for m in results[n].get(setting, {})))
        for metric in metric_names:
            cells = [_fmt(results[n][setting][metric]) if metric in results[n].get(setting, {}) else "-"
                     for n in names]
            lines.append(f"{setting:<16}{metric:<17}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def paired_table(paired: dict) -> str:
    """Per setting and comparison A - B: the mean per-task difference ± its 95% CI."""
    lines = ["paired over tasks (A - B, mean ± 95% CI):"]
    for setting, comparisons in paired.items():
        for pair, entries in comparisons.items():
            cells = ", ".join(f"{m} {_fmt(v)}" for m, v in entries.items())
            lines.append(f"  {setting:<14}{_column_title(pair):<28}{cells}")
    return "\n".join(lines)


def write_plots(trainer, probs, choices) -> list[Path]:
    # Imported here: matplotlib adds ~1 s to the start of every process, and under torchrun
    # only rank 0 plots.
    from . import plots

    out = trainer.out
    paths = [plots.plot_learning_curves(out / "learning_curves.png", plots.read_metrics_csv(out / METRICS_FILE))]
    if trainer.config.task == "sinusoid":
        paths.append(sinusoid_figure(trainer, out / "sinusoid.png", choices))
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


def _figure_posterior(trainer, learner, batch, choices, shots):
    """The learner's posterior as evaluated at ``shots`` support points and training's inner
    steps (that setting's delta and point sigma), else the fixed delta."""
    c = trainer.config
    choice = choices.get(learner.name, {}).get(f"K{shots}_steps{c.inner_steps}")
    if choice is None:
        return posteriors(trainer, learner, batch, c.inner_steps, trainer.eval_damping)
    damping = tuple(choice["damping"]) if isinstance(choice["damping"], list) else choice["damping"]
    return posteriors(trainer, learner, batch, c.inner_steps, damping,
                      noise=choice["noise"].get(f"{learner.name}_nn", choice["noise"].get(f"{learner.name}_point")))


def sinusoid_figure(trainer, path, choices, tasks=4, shots=10, points=200) -> Path:
    """Support points, true function, MAML's fit, LLAMA's posterior samples and band."""
    c = trainer.config
    sample = trainer.tasks.fixed("test", shots, 1, tasks, PLOT_RANK).sample()
    grid = torch.linspace(-5, 5, points, device=trainer.device)
    x = grid.view(1, -1, 1).expand(tasks, -1, -1)
    true_y = data.sinusoid(x, sample.amplitude, sample.phase).squeeze(-1)
    batch = task_batch(sample)
    fit_y = sample_y = None
    maml, llama = trainer.learner("maml"), trainer.learner("llama")
    if maml is not None:
        fit_y = posteriors(trainer, maml, batch, c.inner_steps, trainer.eval_damping).predict(
            x, pred_type="point")[0].squeeze(-1)
    if llama is not None:
        generator = torch.Generator().manual_seed(data.derive_seed(c.seed, PLOT_RANK))
        post = _figure_posterior(trainer, llama, batch, choices, shots)
        sample_y = _sample_functions(post, x, max(c.samples, 20), generator)
    titles = [f"A={a:.2f}, phase={p:.2f}" for a, p in zip(sample.amplitude.tolist(), sample.phase.tolist())]
    from . import plots

    return plots.plot_sinusoid_tasks(path, grid, true_y, sample.support_x, sample.support_y,
                                     fit_y=fit_y, sample_y=sample_y, titles=titles,
                                     fit_label="MAML point estimate", fit_color=plots.algorithm_color("maml"),
                                     sample_label="LLAMA posterior samples",
                                     sample_color=plots.algorithm_color("llama"))


def report(trainer, evaluation, wall_s) -> dict:
    """Write metrics.json and the plots, print the table; returns metrics.json's content."""
    out = summary(trainer, evaluation, wall_s)
    (trainer.out / METRICS_JSON).write_text(json.dumps(metrics.strict_json(out), indent=2, allow_nan=False) + "\n")
    paths = write_plots(trainer, evaluation.probs, evaluation.choices)
    print(f"\n{trainer.config.task}: {trainer.iteration} iterations, held-out tasks: {trainer.config.eval_tasks}, "
          f"{damping_note(trainer)}")
    print(table(evaluation.results))
    print(paired_table(evaluation.paired))
    print(f"wall time {wall_s:.1f} s; wrote {trainer.out / METRICS_JSON}, {trainer.out / METRICS_FILE}, "
          f"{trainer.out / CHECKPOINT_FILE}, " + ", ".join(str(p) for p in paths))
    return out
