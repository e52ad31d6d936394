"""Evaluation metrics for meta-learning: accuracy and calibration, regression fit and coverage.

Classification metrics take predictive *probabilities* [..., C] (a posterior predictive is an
average of probabilities over samples, not of logits) and integer labels [...]; every metric
averages over all leading dims. Regression metrics take targets and a Gaussian predictive
(mean, std) or predictive samples [S, ...].
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import NormalDist

import torch

ECE_BINS = 15  # Guo et al. (2017)
INTERVAL_LEVELS = (0.5, 0.9, 0.95)


def _flat(probs: torch.Tensor, labels: torch.Tensor):
    if probs.shape[:-1] != labels.shape:
        raise ValueError(f"probs {tuple(probs.shape)} must be labels {tuple(labels.shape)} plus a class dim")
    return probs.reshape(-1, probs.shape[-1]), labels.reshape(-1).long()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class is the label (works on logits too)."""
    probs, labels = _flat(probs, labels)
    return (probs.argmax(dim=-1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log predictive probability of the label.

    Probabilities are clamped at ``eps`` so one confidently wrong sample-average gives a large
    but finite value (log(1e-12) = -27.6) instead of inf.
    """
    probs, labels = _flat(probs, labels)
    picked = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
    return -picked.double().clamp_min(eps).log().mean().item()


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS):
    """Per-bin (count, mean confidence, accuracy) over equal-width confidence bins.

    Bin b holds confidences in (b/B, (b+1)/B] (the first also takes 0), the convention of
    Guo et al.'s code; empty bins have count 0 and NaN confidence/accuracy.
    """
    probs, labels = _flat(probs, labels)
    confidence, predicted = probs.double().max(dim=-1)
    correct = (predicted == labels).double()
    inner_edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    index = torch.bucketize(confidence, inner_edges, right=False)
    count = torch.bincount(index, minlength=bins).double()
    mean_conf = torch.bincount(index, confidence, minlength=bins) / count
    mean_acc = torch.bincount(index, correct, minlength=bins) / count
    return count, mean_conf, mean_acc


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| on the max probability (Guo et al. 2017)."""
    count, conf, acc = calibration_bins(probs, labels, bins)
    filled = count > 0
    return ((count[filled] / count.sum()) * (acc[filled] - conf[filled]).abs()).sum().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over examples of sum_c (p_c - 1[y = c])^2 (in [0, 2])."""
    probs, labels = _flat(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return ((probs.double() - onehot) ** 2).sum(dim=-1).mean().item()


def mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return ((prediction.double() - target.double()) ** 2).mean().item()


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Mean of -log N(y; mean, std^2) over all elements (full density, with log(2 pi))."""
    target, mean, std = (t.double() for t in torch.broadcast_tensors(target, mean, std))
    if (std <= 0).any():
        raise ValueError("gaussian_nll: std must be positive")
    z = (target - mean) / std
    return (0.5 * z**2 + std.log() + 0.5 * math.log(2 * math.pi)).mean().item()


def _check_levels(levels):
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"interval levels must be in (0, 1), got {level}")


def gaussian_interval_coverage(target, mean, std, levels=INTERVAL_LEVELS) -> dict[float, float]:
    """Fraction of targets inside the central ``level`` interval of N(mean, std^2), per level."""
    _check_levels(levels)
    target, mean, std = (t.double() for t in torch.broadcast_tensors(target, mean, std))
    coverage = {}
    defined = torch.isfinite(target - mean) & torch.isfinite(std)
    for level in levels:
        half_width = NormalDist().inv_cdf(0.5 + level / 2) * std
        inside = ((target - mean).abs() <= half_width).double()
        # A NaN prediction covers nothing and misses nothing: the coverage is undefined (NaN).
        coverage[level] = inside.masked_fill(~defined, float("nan")).mean().item()
    return coverage


def sample_interval_coverage(target, samples, levels=INTERVAL_LEVELS) -> dict[float, float]:
    """Coverage of central intervals from the empirical quantiles of ``samples`` [S, *target.shape].

    For a non-Gaussian predictive (an average over posterior samples): the ``level`` interval
    is [q((1-level)/2), q((1+level)/2)] of the S samples (linear interpolation, numpy's default).
    """
    _check_levels(levels)
    if samples.shape[1:] != target.shape:
        raise ValueError(f"samples {tuple(samples.shape)} must be [S, *{tuple(target.shape)}]")
    samples, target = samples.double(), target.double()
    coverage = {}
    for level in levels:
        q = torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=torch.float64)
        low, high = torch.quantile(samples, q, dim=0)
        coverage[level] = ((low <= target) & (target <= high)).double().mean().item()
    return coverage


def strict_json(value):
    """``value`` with every NaN or infinite float replaced by None, so that ``json.dumps`` writes
    strict JSON (``null``), not the bare ``NaN`` other parsers reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def mean_ci95(values) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)): the +-95% interval MAML papers report over test tasks.

    std is the population std (ddof=0, numpy's default), as in Finn et al.'s evaluation code,
    so figures are comparable with the papers'; with n = 600 tasks ddof=1 differs by 0.08%.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    std = values.std(correction=0)
    return values.mean().item(), (1.96 * std / math.sqrt(values.numel())).item()


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (the probability that a
    random positive scores above a random negative, ties counting half: the Mann-Whitney U
    statistic with average ranks). NaN when either class is empty."""
    scores = torch.as_tensor(scores).flatten().double()
    positive = torch.as_tensor(positive).flatten().bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts                  # values strictly below each unique value
    ranks = (below + (counts + 1) / 2).double()[inverse]      # average rank of each score (1-based)
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``-sum_c p_c log p_c`` over the last dimension (float64)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


# ----------------------------------------------------------------------------- metrics.csv


class MetricsLog:
    """A run's metrics.csv: one row per logged step, columns the union of the keys seen.

    Rows may log different metrics (training loss often, validation now and then); missing
    cells are empty. A resumed run passes ``resume_from`` (the checkpoint's iteration) so rows
    logged after that checkpoint by the interrupted run are dropped and re-logged, and the
    file ends like an uninterrupted run's.
    """

    def __init__(self, path, resume_from: int | None = None, step_key: str = "iteration"):
        self.path, self.step_key = Path(path), step_key
        self.rows: list[dict] = []
        if resume_from is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if float(r[step_key]) <= resume_from]
        self.fields = list(dict.fromkeys(k for row in self.rows for k in row))
        self._rewrite()

    def log(self, **row) -> None:
        if self.step_key not in row:
            raise ValueError(f"MetricsLog.log needs {self.step_key}=...")
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new:  # a new column: rewrite with the wider header (rare: once per metric)
            self.fields += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.fields, restval="").writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, restval="")
            if self.fields:
                writer.writeheader()
            writer.writerows(self.rows)
