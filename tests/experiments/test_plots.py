"""Figures: valid PNGs with the expected content, written without pyplot or a display."""

import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llama_fast.experiments import plots
from llama_fast.experiments.data import SinusoidTasks, sinusoid

SUPPORT_RED = np.array([214, 39, 40])  # matplotlib's tab:red
SAMPLE_ORANGE = np.array([255, 127, 14])  # tab:orange, LLAMA's colour


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 10  # not blank
    return pixels


def _has_color(pixels, color, tolerance=12) -> bool:
    return bool((np.abs(pixels - color).max(axis=-1) <= tolerance).any())


def sinusoid_figure_inputs(tasks=3, samples=20, seed=0):
    batch = SinusoidTasks(shots=5, meta_batch=tasks, seed=seed).sample()
    x = torch.linspace(-5, 5, 200)
    true_y = sinusoid(x.expand(tasks, -1), batch.amplitude, batch.phase)
    gen = torch.Generator().manual_seed(seed)
    fit_y = true_y * 0.9 + 0.1
    sample_y = fit_y.unsqueeze(1) + 0.3 * torch.randn(tasks, samples, 1, generator=gen) \
        + 0.2 * torch.randn(tasks, samples, 200, generator=gen).cumsum(-1) / 10
    return x, true_y, batch.support_x[..., 0], batch.support_y[..., 0], fit_y, sample_y


def test_sinusoid_figure(tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    x, true_y, sx, sy, fit_y, sample_y = sinusoid_figure_inputs()
    full = _png(plots.plot_sinusoid_tasks(tmp_path / "fig" / "sinusoid.png", x, true_y, sx, sy,
                                          fit_y=fit_y, sample_y=sample_y))
    assert _has_color(full, SUPPORT_RED) and _has_color(full, SAMPLE_ORANGE)
    bare = _png(plots.plot_sinusoid_tasks(tmp_path / "bare.png", x.numpy(), true_y.numpy(), sx, sy))
    assert _has_color(bare, SUPPORT_RED) and not _has_color(bare, SAMPLE_ORANGE)  # no samples, no band
    assert pyplot_before or "matplotlib.pyplot" not in sys.modules


def test_each_algorithm_keeps_its_colour_and_curves_say_what_they_are():
    """The sinusoid figure labels its curves by algorithm and draws them in the colours the
    learning curves use for the same algorithms."""
    x, true_y, sx, sy, fit_y, sample_y = sinusoid_figure_inputs()
    fig = plots.sinusoid_tasks_figure(x, true_y, sx, sy, fit_y, sample_y, fit_label="MAML point estimate",
                                      fit_color=plots.algorithm_color("maml"),
                                      sample_label="LLAMA posterior samples",
                                      sample_color=plots.algorithm_color("llama"))
    lines = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    assert lines["MAML point estimate"] == plots.algorithm_color("maml")
    assert lines["LLAMA posterior samples"] == plots.algorithm_color("llama")
    rows = [{"iteration": i, "algorithm": a, "loss": 1.0 / (i + 1)} for a in ("llama", "maml") for i in range(5)]
    curves = plots.learning_curves_figure(rows)
    colours = {line.get_label(): line.get_color() for line in curves.axes[0].get_lines()}
    assert colours == {"llama": plots.algorithm_color("llama"), "maml": plots.algorithm_color("maml")}
    assert plots.algorithm_color("maml") != plots.algorithm_color("llama")


def test_learning_curves_from_metrics_csv(tmp_path):
    rows = []
    for algorithm in ("maml", "llama"):
        for it in range(0, 1000, 50):
            rows.append({"iteration": it, "algorithm": algorithm, "train_loss": 2 * np.exp(-it / 300),
                         "val_accuracy": 0.5 + it / 2500 if it % 200 == 0 else ""})
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    loaded = plots.read_metrics_csv(tmp_path / "metrics.csv")
    assert loaded[0]["algorithm"] == "maml" and len(loaded) == 40
    _png(plots.plot_learning_curves(tmp_path / "curves.png", loaded))
    _png(plots.plot_learning_curves(tmp_path / "one.png", loaded, metrics=["val_accuracy"]))
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_learning_curves(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="no numeric columns"):
        plots.plot_learning_curves(tmp_path / "x.png", [{"iteration": 1, "note": "hi"}])


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.4), size=3000)
    labels = np.array([rng.choice(5, p=np.sqrt(p) / np.sqrt(p).sum()) for p in probs])  # overconfident
    pixels = _png(plots.plot_reliability(tmp_path / "reliability.png", torch.from_numpy(probs),
                                         torch.from_numpy(labels)))
    assert _has_color(pixels, np.array([31, 119, 180]))  # tab:blue accuracy bars
