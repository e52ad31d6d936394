"""Figures of a run: sinusoid posterior fits, learning curves, reliability diagrams.

Every function takes plain arrays (numpy or torch) and writes one PNG, so it needs no model.
Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never pyplot: nothing
opens a window, and the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .metrics import ECE_BINS, calibration_bins, expected_calibration_error

TRUE_COLOR, SUPPORT_COLOR = "black", "tab:red"
# One colour per algorithm (and results column) in every figure of a run.
ALGORITHM_COLORS = {"maml": "tab:blue", "fomaml": "tab:cyan", "llama": "tab:orange",
                    "maml_point": "tab:blue", "maml_glm": "tab:cyan", "llama_point": "tab:brown",
                    "llama_glm": "tab:orange", "llama_nn": "tab:red"}
FIT_COLOR, SAMPLE_COLOR = ALGORITHM_COLORS["maml"], ALGORITHM_COLORS["llama"]


def algorithm_color(name: str) -> str | None:
    """The colour of an algorithm or results column; None (matplotlib's cycle) for others."""
    return ALGORITHM_COLORS.get(str(name).lower())


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _grid(n: int, max_columns: int = 4):
    columns = min(n, max_columns)
    return math.ceil(n / columns), columns


# ----------------------------------------------------------------------------- sinusoid


def plot_sinusoid_tasks(path, x, true_y, support_x, support_y, fit_y=None, sample_y=None, **options) -> Path:
    """Write ``sinusoid_tasks_figure`` (same arguments) to ``path``."""
    return _save(sinusoid_tasks_figure(x, true_y, support_x, support_y, fit_y, sample_y, **options), path)


def sinusoid_tasks_figure(x, true_y, support_x, support_y, fit_y=None, sample_y=None,
                          band_level: float = 0.95, titles=None, max_sample_curves: int = 10,
                          fit_label: str = "point estimate", fit_color: str = FIT_COLOR,
                          sample_label: str = "posterior samples", sample_color: str = SAMPLE_COLOR) -> Figure:
    """The paper-style figure: one panel per task.

    x [G] (shared grid), true_y [T, G], support_x/support_y [T, K], fit_y [T, G] (a point
    estimate, labelled ``fit_label``, e.g. "MAML point estimate"), sample_y [T, S, G]
    (predictions of posterior samples, labelled ``sample_label``): drawn as thin curves (at
    most ``max_sample_curves``) with the central ``band_level`` predictive band from their
    empirical quantiles, in ``sample_color``.
    """
    x, true_y = _numpy(x), _numpy(true_y)
    support_x, support_y = _numpy(support_x).reshape(len(true_y), -1), _numpy(support_y).reshape(len(true_y), -1)
    rows, columns = _grid(len(true_y))
    fig = Figure(figsize=(4 * columns, 3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for t, ax in enumerate(axes):
        if t >= len(true_y):
            ax.set_visible(False)
            continue
        if sample_y is not None:
            samples = _numpy(sample_y)[t]
            low, high = np.quantile(samples, [0.5 - band_level / 2, 0.5 + band_level / 2], axis=0)
            ax.fill_between(x, low, high, color=sample_color, alpha=0.2,
                            label=f"{band_level:.0%} band of the {sample_label}")
            for s, curve in enumerate(samples[:max_sample_curves]):
                ax.plot(x, curve, color=sample_color, lw=0.7, alpha=0.6,
                        label=sample_label if s == 0 else None)
        ax.plot(x, true_y[t], color=TRUE_COLOR, lw=1.5, label="true function")
        if fit_y is not None:
            ax.plot(x, _numpy(fit_y)[t], color=fit_color, lw=1.5, ls="--", label=fit_label)
        ax.scatter(support_x[t], support_y[t], color=SUPPORT_COLOR, marker="^", s=40, zorder=5,
                   label=f"support ({support_x.shape[1]} points)")
        ax.set_title(titles[t] if titles is not None else f"task {t}", fontsize=10)
        ax.set_xlabel("x")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8,
               frameon=False)  # below the panels, off the data
    return fig


# ----------------------------------------------------------------------------- learning curves


def read_metrics_csv(path) -> list[dict]:
    """Rows of a metrics.csv as dicts of strings (as written by csv.DictWriter)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _as_float(value):
    if value is None or value == "":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot_learning_curves(path, rows: list[dict], x: str = "iteration", metrics=None,
                         group: str = "algorithm") -> Path:
    """Write ``learning_curves_figure`` (same arguments) to ``path``."""
    return _save(learning_curves_figure(rows, x, metrics, group), path)


def learning_curves_figure(rows: list[dict], x: str = "iteration", metrics=None,
                           group: str = "algorithm") -> Figure:
    """One panel per metric against ``x``, one line per value of ``group`` (e.g. maml, llama),
    each algorithm in its colour (``ALGORITHM_COLORS``).

    ``rows`` as from ``read_metrics_csv`` (strings are fine); empty cells are gaps, so rows
    that log only some metrics (training loss every step, validation now and then) mix.
    ``metrics`` defaults to every numeric column other than ``x``.
    """
    if not rows:
        raise ValueError("plot_learning_curves: no rows to plot")
    if metrics is None:
        columns = [k for k in rows[0] if k not in (x, group)]
        metrics = [k for k in columns if any(_as_float(r.get(k)) is not None for r in rows)]
    if not metrics:
        raise ValueError(f"plot_learning_curves: no numeric columns besides {x!r}")
    groups = sorted({str(r.get(group, "")) for r in rows})
    rows_n, columns = _grid(len(metrics), 3)
    fig = Figure(figsize=(4.5 * columns, 3.2 * rows_n), layout="constrained")
    axes = fig.subplots(rows_n, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for name in groups:
            points = [(_as_float(r.get(x)), _as_float(r.get(metric))) for r in rows
                      if str(r.get(group, "")) == name]
            points = sorted(p for p in points if p[0] is not None and p[1] is not None)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=name or None,
                        color=algorithm_color(name))
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if any(name for name in groups):
            ax.legend(fontsize=8)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


# ----------------------------------------------------------------------------- reliability


def plot_reliability(path, probs, labels, bins: int = ECE_BINS, title: str | None = None) -> Path:
    """Reliability diagram (Guo et al. 2017): accuracy per confidence bin against the diagonal.

    Top: per-bin accuracy (bars) and the gap to the bin's mean confidence (hatched), with
    the ECE; bottom: how many predictions fall in each bin.
    """
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    count, confidence, accuracy = (v.numpy() for v in calibration_bins(probs, labels, bins))
    filled = count > 0
    ece = expected_calibration_error(probs, labels, bins)
    width = 1.0 / bins
    centers = (np.arange(bins) + 0.5) * width
    fig = Figure(figsize=(4.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", color="tab:blue",
            label="accuracy")
    gap_bottom = np.minimum(accuracy, confidence)[filled]
    top.bar(centers[filled], np.abs(confidence - accuracy)[filled], bottom=gap_bottom, width=width,
            edgecolor="tab:red", color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], ls="--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title or f"reliability ({bins} bins): ECE = {100 * ece:.2f}%", fontsize=10)
    bottom.bar(centers, count / count.sum(), width=width, edgecolor="black", color="gray")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("fraction")
    return _save(fig, path)
