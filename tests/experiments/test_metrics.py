"""Metrics against hand-computed cases and independent numpy/scipy computations."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from llama_fast.experiments import metrics


def test_accuracy_hand_case():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.2, 0.8]])
    assert metrics.accuracy(probs, torch.tensor([0, 1, 1, 0])) == 0.5
    assert metrics.accuracy(probs.view(2, 2, 2), torch.tensor([[0, 1], [0, 1]])) == 1.0


def test_nll_hand_case_and_cross_entropy():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert metrics.nll(probs, torch.tensor([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    assert metrics.nll(logits.softmax(-1), labels) == pytest.approx(expected, rel=1e-6)
    assert metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def _guo_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s loop: bins (lower, upper] on the max probability."""
    confidences, predictions = probs.max(1), probs.argmax(1)
    accuracies = predictions == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(accuracies[in_bin].mean() - confidences[in_bin].mean())
    return ece


def test_ece_hand_case():
    # Two at confidence 0.95 (one right), two at 0.55 (both right): |0.5-0.95|/2 + |1-0.55|/2.
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 0, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.45)
    count, conf, acc = metrics.calibration_bins(probs, labels)
    assert count.tolist()[14] == 2 and count.tolist()[8] == 2 and count.sum() == 4
    assert acc[14] == 0.5 and conf[8] == pytest.approx(0.55) and torch.isnan(acc[0])


def test_ece_matches_guo_loop_and_detects_overconfidence():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=4000)
    calibrated_labels = np.array([rng.choice(5, p=p) for p in probs])
    wrong_labels = rng.integers(0, 5, size=4000)
    for labels in (calibrated_labels, wrong_labels):
        ours = metrics.expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels))
        assert ours == pytest.approx(_guo_ece(probs, labels), abs=1e-12)
    assert metrics.expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(calibrated_labels)) < 0.03
    assert metrics.expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(wrong_labels)) > 0.3


def test_brier_hand_cases():
    labels = torch.tensor([0, 2])
    assert metrics.brier_score(torch.eye(3)[labels], labels) == 0.0
    assert metrics.brier_score(torch.full((2, 4), 0.25), torch.tensor([1, 3])) == pytest.approx(1 - 1 / 4)
    assert metrics.brier_score(torch.eye(3)[[1, 0]], labels) == 2.0
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert metrics.brier_score(probs, torch.tensor([1])) == pytest.approx(0.49 + 0.64 + 0.01)


def test_mse_and_shape_errors():
    assert metrics.mse(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0])) == pytest.approx(13 / 3)
    with pytest.raises(ValueError, match="differ"):
        metrics.mse(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="class dim"):
        metrics.accuracy(torch.zeros(4, 3), torch.zeros(5))


def test_gaussian_nll_against_scipy():
    rng = np.random.default_rng(1)
    y, mean, std = rng.normal(size=100), rng.normal(size=100), rng.uniform(0.1, 3, size=100)
    expected = -stats.norm.logpdf(y, mean, std).mean()
    ours = metrics.gaussian_nll(*(torch.from_numpy(a) for a in (y, mean, std)))
    assert ours == pytest.approx(expected, rel=1e-12)
    assert metrics.gaussian_nll(torch.zeros(1), torch.zeros(1), torch.ones(1)) == pytest.approx(0.5 * math.log(2 * math.pi))
    with pytest.raises(ValueError, match="positive"):
        metrics.gaussian_nll(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_gaussian_coverage_hand_case_and_calibration():
    target = torch.tensor([0.0, 0.7, 1.0, -1.7, 2.0])  # |z| vs 0.674 / 1.645 / 1.960
    coverage = metrics.gaussian_interval_coverage(target, torch.zeros(5), torch.ones(5))
    assert coverage == {0.5: pytest.approx(0.2), 0.9: pytest.approx(0.6), 0.95: pytest.approx(0.8)}
    doubled = metrics.gaussian_interval_coverage(2 * target, torch.zeros(5), 2 * torch.ones(5))
    assert doubled == coverage
    y = torch.randn(200_000, generator=torch.Generator().manual_seed(2)) * 3 + 1
    calibrated = metrics.gaussian_interval_coverage(y, torch.tensor(1.0), torch.tensor(3.0))
    for level, value in calibrated.items():
        assert value == pytest.approx(level, abs=0.005)
    with pytest.raises(ValueError, match="levels"):
        metrics.gaussian_interval_coverage(y, 0 * y, 1 + 0 * y, levels=(1.0,))


def test_sample_coverage_matches_numpy_quantiles():
    rng = np.random.default_rng(3)
    samples, target = rng.normal(size=(40, 30)), rng.normal(scale=1.5, size=30)
    coverage = metrics.sample_interval_coverage(torch.from_numpy(target), torch.from_numpy(samples))
    for level in (0.5, 0.9, 0.95):
        low, high = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2], axis=0)
        assert coverage[level] == pytest.approx(((low <= target) & (target <= high)).mean())
    # Hand case: samples 0..100 per point, the 90% interval is [5, 95].
    grid = torch.arange(101.0).unsqueeze(1).expand(101, 4)
    assert metrics.sample_interval_coverage(torch.tensor([4.0, 5.0, 95.0, 96.0]), grid, (0.9,)) == {0.9: 0.5}
    with pytest.raises(ValueError, match="samples"):
        metrics.sample_interval_coverage(torch.zeros(3), torch.zeros(5, 4))


def test_sample_coverage_of_a_calibrated_predictive():
    gen = torch.Generator().manual_seed(4)
    samples, target = torch.randn(1000, 5000, generator=gen), torch.randn(5000, generator=gen)
    for level, value in metrics.sample_interval_coverage(target, samples).items():
        assert value == pytest.approx(level, abs=0.02)


def test_mean_ci95():
    mean, half = metrics.mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(1.96 * math.sqrt(1.25) / 2)
    values = np.random.default_rng(5).uniform(size=600)
    mean, half = metrics.mean_ci95(torch.from_numpy(values))
    assert mean == pytest.approx(values.mean()) and half == pytest.approx(1.96 * values.std() / math.sqrt(600))
    assert metrics.mean_ci95([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        metrics.mean_ci95([])


def test_metrics_log_columns_and_resume(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    log = metrics.MetricsLog(path)
    for it in range(1, 6):
        log.log(iteration=it, algorithm="llama", train_loss=1.0 / it)
        if it % 2 == 0:
            log.log(iteration=it, algorithm="llama", val_accuracy=0.5 + it / 100)
    rows = metrics.MetricsLog(path, resume_from=10**9).rows
    assert [r["iteration"] for r in rows] == ["1", "2", "2", "3", "4", "4", "5"]
    assert rows[0]["val_accuracy"] == "" and rows[2]["val_accuracy"] == "0.52" and rows[2]["train_loss"] == ""
    assert path.read_text().splitlines()[0] == "iteration,algorithm,train_loss,val_accuracy"
    # Resume from a checkpoint at iteration 3: the interrupted run's rows 4 and 5 are dropped.
    resumed = metrics.MetricsLog(path, resume_from=3)
    resumed.log(iteration=4, algorithm="llama", train_loss=0.25)
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[-1] == "4,llama,0.25," and len(lines) == 1 + 4 + 1
    fresh = metrics.MetricsLog(path)  # not resuming: a new file
    assert path.read_text() == "" and fresh.rows == []
    with pytest.raises(ValueError, match="iteration"):
        fresh.log(loss=1.0)


def test_undefined_values_are_null_and_nan_not_zero():
    """A NaN prediction makes the interval coverage NaN (not 0.000), and metrics.json's writer
    turns NaN and inf into null: strict JSON that any parser reads."""
    import json

    target = torch.zeros(4)
    mean = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    coverage = metrics.gaussian_interval_coverage(target, mean, torch.ones(4))
    assert all(math.isnan(v) for v in coverage.values())
    text = json.dumps(metrics.strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}),
                      allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_is_the_pairwise_probability_with_ties_halved(ties):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (200,), generator=gen).double() if ties else torch.randn(200, generator=gen)
    positive = torch.rand(200, generator=gen) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert metrics.auroc(scores, positive) == pytest.approx(pairs.mean().item(), rel=1e-12)


def test_auroc_limits_and_empty_classes():
    scores = torch.arange(6.0)
    assert metrics.auroc(scores, scores >= 3) == 1.0
    assert metrics.auroc(-scores, scores >= 3) == 0.0
    assert math.isnan(metrics.auroc(scores, torch.zeros(6, dtype=torch.bool)))


def test_entropy_of_uniform_and_one_hot():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(metrics.entropy(probs), torch.tensor([math.log(4), 0.0], dtype=torch.float64))
