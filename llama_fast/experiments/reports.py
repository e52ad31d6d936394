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
            "samples": c.samples, "damping": trainer.eval_damping, "damping_mode": str(c.damping),
            "damping_objective": c.damping_objective,
            # The objective over the grid behind an auto choice (empty for a fixed delta).
            "damping_curve": [list(x) for x in trainer.damping_curve],
            "damping_history": [list(x) for x in trainer.damping_history],
            # sinusoid: the observation noise sigma per results column and setting ({} for
            # omniglot), and under noise = "auto" the validation NLL over NOISE_GRID behind it.
            "noise_mode": str(c.noise), "noise": evaluation.noise, "noise_curve": evaluation.noise_curve,
            "wall_seconds": round(wall_s, 1), "results": evaluation.results}


def _fmt(entry) -> str:
    if isinstance(entry, dict):
        return f"{entry['mean']:.3f} ± {entry['ci95']:.3f}"
    return f"{entry:.3f}"


def damping_note(trainer) -> str:
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
    from . import plots

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
    batch = task_batch(sample)
    fit_y = sample_y = None
    maml, llama = trainer.learner("maml"), trainer.learner("llama")
    if maml is not None:
        fit_y = posteriors(trainer, maml, batch, c.inner_steps).predict(x, pred_type="point")[0].squeeze(-1)
    if llama is not None:
        generator = torch.Generator().manual_seed(data.derive_seed(c.seed, PLOT_RANK))
        post = posteriors(trainer, llama, batch, c.inner_steps)
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
    paths = write_plots(trainer, evaluation.probs)
    print(f"\n{trainer.config.task}: {trainer.iteration} iterations, held-out tasks: {trainer.config.eval_tasks}, "
          f"{damping_note(trainer)}")
    print(table(evaluation.results))
    print(f"wall time {wall_s:.1f} s; wrote {trainer.out / METRICS_JSON}, {trainer.out / METRICS_FILE}, "
          f"{trainer.out / CHECKPOINT_FILE}, " + ", ".join(str(p) for p in paths))
    return out
