"""`llama-fast train` / `eval` end to end on tiny configurations (a few iterations and tasks).

Every run goes through the CLI (cli.main), so config.toml handling, the hand-off and the
error paths are the ones users get.
"""

import json
import math
import runpy
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import llama_fast as lf
from llama_fast.experiments import cli, selection, training
from llama_fast.experiments.checkpoint import load_checkpoint
from llama_fast.experiments.config import ConfigError, ExperimentConfig
from llama_fast.meta import distributed

from corrupt import flip_bit_in_tensor_bytes   # tests/helpers

REPO = Path(__file__).resolve().parents[2]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
SMALL = ("images_background_small1.zip", "images_background_small2.zip")
needs_omniglot = pytest.mark.skipif(
    not all((OMNIGLOT / name).is_file() for name in SMALL),
    reason=f"Omniglot small zips not found under {OMNIGLOT}")

TINY = ["--iterations", "6", "--meta-batch", "2", "--eval-tasks", "4", "--samples", "2",
        "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny workloads; far faster on a shared machine


def train(out, *extra):
    return cli.main(["train", "sinusoid", "--output", str(out), *TINY, *extra])


@pytest.mark.integration   # a training run through the CLI
def test_tiny_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--damping-objective", "evidence") == 0
    for name in ("config.toml", "checkpoint.pt", "metrics.csv", "metrics.json",
                 "learning_curves.png", "sinusoid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 6 and summary["damping_objective"] == "evidence"
    settings = ("K5_steps1", "K5_steps10", "K10_steps1", "K10_steps10")
    columns = {"maml": ("maml_point", "maml_glm"), "llama": ("llama_point", "llama_glm", "llama_nn")}
    for learner, names in columns.items():
        for setting in settings:
            choice = summary["posterior"][learner][setting]
            per_layer = [row[1] for row in choice["curve"]]
            assert [d for d, _ in choice["curve"]] == list(selection.DAMPING_GRID)
            assert len(choice["damping"]) == 3 == len(choice["at_grid_edge"])   # one per K-FAC layer
            for l, delta in enumerate(choice["damping"]):   # each layer's evidence maximiser
                assert delta == selection.DAMPING_GRID[max(range(len(per_layer)), key=lambda i: per_layer[i][l])]
                assert choice["at_grid_edge"][l] == (delta in (selection.DAMPING_GRID[0], selection.DAMPING_GRID[-1]))
            for name in names:
                entry = summary["results"][name][setting]
                assert {"mse", "nll", "coverage_50", "coverage_90", "coverage_95", "std_inside",
                        "std_outside"} <= set(entry)
                sigma, curve = choice["noise"][name], choice["noise_curve"][name]
                assert sigma in selection.NOISE_GRID and [s for s, _ in curve] == list(selection.NOISE_GRID)
                assert sigma == min(curve, key=lambda row: row[1])[0]   # the validation NLL's minimiser
        # The GLM predictive's mean is the point estimate's: their per-task MSEs are equal.
        glm_vs_point = summary["paired"]["K10_steps1"][f"{learner}_glm - {learner}_point"]["mse"]
        assert glm_vs_point["mean"] == pytest.approx(0.0, abs=1e-9)
    assert summary["noise_mode"] == "auto"
    printed = capsys.readouterr().out
    assert "MAML POINT" in printed and "LLAMA GLM" in printed and "coverage_90" in printed
    assert "posterior LLAMA K10_steps10: delta per layer by the Laplace evidence" in printed
    assert "paired over tasks" in printed
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,algorithm") and len(rows) > 12


def _parameters(out):
    return load_checkpoint(out / "checkpoint.pt")["models"]


@pytest.mark.integration   # two processes training into one folder
def test_two_runs_into_one_folder_the_second_is_refused(tmp_path, capsys):
    """A second `llama-fast train` into the folder a running one writes stops with a one-line
    error (exit 2); the first finishes normally with its own outputs."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "llama_fast", "train", "sinusoid", "--output", str(out),
                              *TINY, "--iterations", "400", "--checkpoint-every", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "config.toml").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (out / "config.toml").exists(), first.communicate()[0]
        with pytest.raises(SystemExit) as err:
            train(out, "--iterations", "4")
        assert err.value.code == 2 and "is in use by another llama-fast run" in capsys.readouterr().err
    finally:
        output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 400


@pytest.mark.integration   # a training run through the CLI
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(straight) == 0

    original = training.Trainer.step

    def dies_at_iteration_4(self):
        if self.iteration == 3:   # after the checkpoint at 2 and rows logged for 3
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(training.Trainer, "step", dies_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    assert load_checkpoint(killed / "checkpoint.pt")["iteration"] == 2
    monkeypatch.setattr(training.Trainer, "step", original)
    assert cli.main(["train", "--output", str(killed), "--resume"]) == 0

    for name, state in _parameters(straight).items():
        for key, value in state.items():
            assert torch.equal(value, _parameters(killed)[name][key]), (name, key)
    assert (killed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    results = [json.loads((d / "metrics.json").read_text())["results"] for d in (straight, killed)]
    assert results[0] == results[1]


@pytest.mark.integration   # a training run through the CLI
def test_stopped_run_continues_to_more_iterations(tmp_path):
    """Train 4 iterations, then resume with --iterations 6: as if trained 6 at once."""
    straight, short = tmp_path / "straight", tmp_path / "short"
    assert train(straight) == 0
    assert cli.main(["train", "sinusoid", "--output", str(short), *TINY, "--iterations", "4"]) == 0
    assert cli.main(["train", "--output", str(short), "--resume", "--iterations", "6"]) == 0
    for name, state in _parameters(straight).items():
        for key, value in state.items():
            assert torch.equal(value, _parameters(short)[name][key]), (name, key)
    assert (short / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()


@pytest.mark.integration   # a training run through the CLI
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--output", str(out), "--resume", "--iterations", "4"])
    assert err.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "checkpoint.pt" in errors[0] and "not a readable checkpoint" in errors[0]


@pytest.mark.integration   # a training run through the CLI
def test_a_flipped_bit_in_the_checkpoint_stops_resume(tmp_path, capsys):
    """One flipped bit in a weight's bytes (torch.load alone would load it): --resume is a
    one-line error naming the checksum, and the run folder is left exactly as it was."""
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    flip_bit_in_tensor_bytes(out / "checkpoint.pt", record="data/3")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--output", str(out), "--resume", "--iterations", "4"])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert err.value.code == 2 and len(errors) == 1
    assert "checkpoint.pt: corrupt checkpoint" in errors[0] and "checksum" in errors[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.integration   # a training run through the CLI
def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """The CLI's check of a --resume checkpoint and the run share one load (and checksum)."""
    out = tmp_path / "run"
    assert train(out, "--iterations", "2") == 0
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(f) or real_load(f, *a, **k))
    assert cli.main(["train", "--output", str(out), "--resume", "--iterations", "3"]) == 0
    assert [Path(f) for f in loads if Path(f).name == "checkpoint.pt"] == [out / "checkpoint.pt"]


@pytest.mark.integration   # a training run through the CLI
def test_a_failed_resume_leaves_the_run_folder_resumable(tmp_path, capsys):
    """`--resume --algorithm maml,llama` on a LLAMA-only run is a one-line error naming what the
    checkpoint holds, written before config.toml changes; a corrupt checkpoint likewise. A plain
    --resume then still works."""
    out = tmp_path / "run"
    assert train(out, "--iterations", "2", "--algorithm", "llama") == 0
    config = (out / "config.toml").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--output", str(out), "--resume", "--algorithm", "maml,llama", "--iterations", "4"])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert err.value.code == 2 and len(errors) == 1
    assert "holds models for llama, not for maml" in errors[0] and "--algorithm llama" in errors[0]
    assert (out / "config.toml").read_bytes() == config
    checkpoint = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        cli.main(["train", "--output", str(out), "--resume", "--iterations", "5"])
    assert (out / "config.toml").read_bytes() == config
    (out / "checkpoint.pt").write_bytes(checkpoint)
    assert cli.main(["train", "--output", str(out), "--resume", "--iterations", "4"]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 4


@pytest.mark.integration   # a training run through the CLI
def test_a_diverging_run_stops_naming_the_iteration(tmp_path, capsys):
    """--inner-lr 1e12 makes every meta-gradient non-finite: no such step is applied, and after
    NONFINITE_STEPS of them the run stops with a one-line error (exit 1) naming the iteration;
    the checkpoint written before holds finite weights."""
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train(out, "--inner-lr", "1e12", "--iterations", "40", "--algorithm", "maml")
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert err.value.code == 1 and len(errors) == 1, errors
    assert f"iteration {training.NONFINITE_STEPS}: MAML's meta-loss or meta-gradient was NaN" in errors[0]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in state["models"]["maml"].values())


@pytest.mark.integration   # a training run through the CLI
def test_eval_reproduces_the_training_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    assert cli.main(["eval", str(out)]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["iterations"] == 6 and evaluated["results"] == trained["results"]
    assert evaluated["paired"] == trained["paired"] and evaluated["posterior"] == trained["posterior"]
    assert "K10_steps10" in capsys.readouterr().out


def _tiny_oneshot_runs(root: Path, ways: int = 5) -> Path:
    """One run in Lake's layout: drawing 0 of `ways` characters for training, drawing 1 to test."""
    run = root / "run01"
    (run / "training").mkdir(parents=True)
    (run / "test").mkdir()
    with zipfile.ZipFile(OMNIGLOT / SMALL[1]) as archive:
        pngs = sorted(n for n in archive.namelist() if n.endswith(".png"))
    characters = sorted({str(Path(n).parent) for n in pngs})[:ways]
    lines = []
    with zipfile.ZipFile(OMNIGLOT / SMALL[1]) as archive:
        for i, character in enumerate(characters, 1):
            drawings = sorted(n for n in pngs if str(Path(n).parent) == character)
            (run / "training" / f"class{i:02d}.png").write_bytes(archive.read(drawings[0]))
            (run / "test" / f"item{ways + 1 - i:02d}.png").write_bytes(archive.read(drawings[1]))
            lines.append(f"run01/test/item{ways + 1 - i:02d}.png run01/training/class{i:02d}.png")
    (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.integration   # a training run through the CLI
@needs_omniglot
def test_omniglot_tiny_run_and_oneshot_eval(tmp_path, capsys):
    out = tmp_path / "omni"
    argv = ["train", "omniglot", "--data", str(OMNIGLOT), "--output", str(out), "--iterations", "2",
            "--meta-batch", "2", "--eval-tasks", "3", "--samples", "2", "--log-every", "1",
            "--eval-every", "0", "--checkpoint-every", "0", "--damping", "1.0", "--device", "cpu"]
    assert cli.main(argv) == 0
    for name in ("metrics.json", "reliability_maml_point.png", "reliability_llama_glm.png",
                 "reliability_llama_nn.png", "learning_curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    for name in ("maml_point", "maml_glm", "llama_point", "llama_glm", "llama_nn"):
        test = summary["results"][name]["test"]
        assert {"accuracy", "confidence", "nll", "ece", "brier", "auroc_errors", "auroc_ood"} <= set(test)
        assert 0.0 <= test["auroc_errors"] <= 1.0 and 0.0 <= test["auroc_ood"] <= 1.0
        assert 1 / 5 <= test["confidence"]["mean"] <= 1.0
    assert summary["posterior"]["llama"]["test"] == {**summary["posterior"]["llama"]["test"], "damping": 1.0,
                                                     "objective": "fixed"}
    assert "llama_glm - maml_glm" in summary["paired"]["test"]
    glm_variants = runpy.run_path(str(REPO / "scripts" / "glm_variants.py"))
    glm_variants["main"]([str(out), "--steps", "1"])
    printed = capsys.readouterr().out
    for name in ("point", "scaled", "last-layer", "scaled T=1", "last-layer T=1"):
        assert printed.count(f"  {name:16s} confidence") == 2, name     # one line per learner
    runs = _tiny_oneshot_runs(tmp_path / "all_runs")
    assert cli.main(["eval", str(out), "--oneshot-runs", str(runs)]) == 0
    evaluated = json.loads((out / "eval.json").read_text())["results"]
    for name in ("maml_point", "maml_glm", "llama_point", "llama_glm", "llama_nn"):
        assert 0.0 <= evaluated[name]["oneshot_runs"]["accuracy"]["mean"] <= 1.0
    assert "oneshot_runs" in capsys.readouterr().out


def _tiny_posterior(loss, support):
    """A 2-8-out float64 MLP adapted to 3 random tasks of `support` points (with 3 points its
    head's 9-wide A is low-rank)."""
    torch.manual_seed(0)
    out = 1 if loss == "mse" else 4
    model = lf.models.mlp(2, [8], out).double()
    x = torch.randn(3, support, 2, dtype=torch.float64)
    y = (torch.randn(3, support, 1, dtype=torch.float64) if loss == "mse"
         else torch.randint(0, out, (3, support)))
    return model, x, y, lf.adapt(model, x, y, loss=loss, inner_lr=0.1, damping=1.0)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_laplace_evidence_matches_the_dense_log_det(loss):
    """The evidence reuses the posterior's cached eigenvalues (incl. a low-rank head: 3 rows
    for a 9-wide A); its log-det term must equal the reference's at every delta."""
    from llama_fast.ops import reference

    model, x, y, post = _tiny_posterior(loss, support=3)
    nll = torch.rand(3, dtype=torch.float64)
    grid = (1e-3, 0.1, 10.0)
    evidence = selection.laplace_evidence(post, model, nll, grid=grid)
    theta = dict(model.named_parameters())
    sq = sum(((post.params[k] - theta[k].detach()) ** 2).flatten(1).sum(1) for k in post.params)
    P = sum(p.numel() for p in model.parameters())
    for row, delta in zip(evidence, grid):
        dense = [a.dense() if hasattr(a, "dense") else a for a in post.A]
        logdet = reference.kron_logdet(dense, post.G, damping=delta, scale=post.scale)
        expected = -nll - 0.5 * delta * sq + 0.5 * P * torch.log(torch.tensor(delta, dtype=torch.float64)) - 0.5 * logdet
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-8)


@pytest.mark.integration   # a training run through the CLI
def test_damping_objective_nll_picks_the_lowest_validation_nll(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--damping-objective", "nll") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["damping_objective"] == "nll"
    for learner in ("maml", "llama"):
        for setting, choice in summary["posterior"][learner].items():
            assert choice["objective"] == "nll"
            assert [d for d, _ in choice["curve"]] == list(selection.DAMPING_GRID)
            assert choice["damping"] == min(choice["curve"], key=lambda row: row[1])[0]
    assert "by the GLM predictive NLL" in capsys.readouterr().out
    assert cli.main(["eval", str(out)]) == 0   # eval repeats the choice from config.toml
    assert json.loads((out / "eval.json").read_text())["posterior"] == summary["posterior"]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_glm_nll_damping_is_the_glm_predictive_nll_per_delta(loss):
    """glm_nll_damping re-damps one posterior; each grid value equals a fresh adapt at that
    delta predicting with the GLM predictive, scored as the evaluation scores it; the choice
    is the grid's minimum."""
    import math

    model, x, y, post = _tiny_posterior(loss, support=5)
    delta, curve = selection.glm_nll_damping(post, x, y, loss)
    assert [d for d, _ in curve] == list(selection.DAMPING_GRID)
    assert delta == min(curve, key=lambda row: row[1])[0]
    for d, value in curve[::4]:
        pred = lf.adapt(model, x, y, loss=loss, inner_lr=0.1, damping=d).predict(x, pred_type="glm")
        if loss == "mse":
            mean, std = pred
            expected = (0.5 * ((y - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
        else:
            expected = -pred.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12).log().mean(1)
        assert value == pytest.approx(float(expected.mean()), rel=1e-9)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_layer_evidence_is_each_layers_dense_prior_and_occam_terms(loss):
    """Per layer l: -delta/2 ||phi_l - theta_l||^2 + P_l/2 log delta - 1/2 log det H_l, H_l by the
    reference (dense); evidence_damping picks each layer's argmax over the tasks' sum."""
    from llama_fast.ops import reference

    model, x, y, post = _tiny_posterior(loss, support=3)
    grid = (1e-3, 0.1, 10.0)
    values = selection.layer_evidence(post, model, grid=grid)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    names = dict((id(p), n) for n, p in model.named_parameters())
    assert values.shape == (3, 3, len(layers))
    for l, layer in enumerate(layers):
        keys = [names[id(p)] for p in layer.parameters()]
        sq = sum(((post.params[k] - model.get_parameter(k).detach()) ** 2).flatten(1).sum(1) for k in keys)
        P = sum(p.numel() for p in layer.parameters())
        A = post.A[l].dense() if hasattr(post.A[l], "dense") else post.A[l]
        for row, delta in zip(values[..., l], grid):
            logdet = reference.kron_logdet([A], [post.G[l]], damping=delta, scale=post.curvature_scale)
            expected = -0.5 * delta * sq + 0.5 * P * math.log(delta) - 0.5 * logdet
            torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-8)
    chosen, curve = selection.evidence_damping(post, model, x, y, loss)
    full = selection.layer_evidence(post, model).sum(1)
    assert chosen == tuple(selection.DAMPING_GRID[int(i)] for i in full.argmax(0))
    assert len(curve) == len(selection.DAMPING_GRID) and len(curve[0][1]) == len(layers)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_scaled_evidence_damping_scales_the_evidence_by_the_best_factor(loss):
    """evidence-nll: the chosen deltas are c times the evidence's, c (and for regression sigma,
    jointly) minimising the GLM predictive's mean NLL; each curve value is that NLL at c."""
    model, x, y, post = _tiny_posterior(loss, support=5)
    evidence = (0.3, 3.0)
    sigmas = (0.1, 1.0) if loss == "mse" else (None,)
    deltas, curve, sigma = selection.scaled_evidence_damping(post, x, y, loss, evidence, sigmas)
    assert [c for c, _ in curve] == list(selection.SCALE_GRID)
    best = min(curve, key=lambda row: row[1])[0]
    assert deltas == pytest.approx(tuple(best * d for d in evidence))
    for c, value in curve[::5]:
        fresh = lf.adapt(model, x, y, loss=loss, inner_lr=0.1, damping=tuple(c * d for d in evidence))
        nlls = [selection._glm_nll(fresh, x, y, loss, s).mean().item() for s in sigmas]
        assert value == pytest.approx(min(nlls), rel=1e-9)
        if c == best:
            assert sigma == sigmas[nlls.index(min(nlls))]


def test_fit_noise_picks_the_grid_sigma_with_the_lowest_validation_nll():
    """A predictive with mean 0 and no model variance on targets of RMS 0.1: the Gaussian NLL
    is minimised at sigma = RMS, a grid point; the curve is the manual mean NLL."""
    y = torch.tensor([[0.1, -0.1], [0.1, -0.1], [-0.1, 0.1]]).unsqueeze(-1)   # [T=3, M=2, 1]
    def predict(sigma):
        return torch.zeros_like(y), torch.full_like(y, sigma)
    sigma, curve = selection.fit_noise(predict, y)
    assert sigma == pytest.approx(0.1) and sigma in selection.NOISE_GRID
    assert [s for s, _ in curve] == list(selection.NOISE_GRID)
    for s, value in curve:
        assert value == pytest.approx(0.5 * 0.01 / s ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi), rel=1e-5)
    # With model variance v the predictive std is sqrt(v + sigma^2): the best grid sigma is the
    # one bringing it nearest the targets' RMS on the log-likelihood.
    grid = (0.05, 0.1, 0.3, 1.0)
    def predict_var(sigma):
        return torch.zeros_like(y), torch.sqrt(torch.full_like(y, 0.3 ** 2 - 0.1 ** 2) + sigma ** 2)
    y3 = 3 * y
    sigma, curve = selection.fit_noise(predict_var, y3, grid=grid)
    assert sigma == 0.1 and min(curve, key=lambda row: row[1])[0] == 0.1
    with pytest.raises(FloatingPointError, match="noise auto"):
        selection.fit_noise(lambda s: (torch.full_like(y, float("nan")), torch.ones_like(y)), y)


@pytest.mark.integration   # a training run through the CLI
def test_fixed_noise_is_used_and_stored(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--noise", "0.5", "--algorithm", "maml") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["noise_mode"] == "0.5"
    for setting in ("K5_steps1", "K5_steps10", "K10_steps1", "K10_steps10"):
        choice = summary["posterior"]["maml"][setting]
        assert choice["noise"] == {"maml_point": 0.5, "maml_glm": 0.5} and choice["noise_curve"] == {}
    assert "noise auto" not in capsys.readouterr().out


@pytest.mark.integration   # a training run through the CLI
def test_learned_damping_trains_resumes_and_evaluates(tmp_path, capsys):
    """--learn-damping: LLAMA's log delta per K-FAC layer moves from 0 with theta, is
    checkpointed (a resumed run ends where an uninterrupted one does), and LLAMA's evaluation
    uses the learned deltas while MAML's keeps the validation choice."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(whole, "--learn-damping") == 0
    assert train(split, "--learn-damping", "--iterations", "4") == 0
    assert cli.main(["train", "--output", str(split), "--resume", "--iterations", "6"]) == 0
    learned = load_checkpoint(whole / "checkpoint.pt")["log_damping"]
    assert set(learned) == {"llama"} and learned["llama"].shape == (3,)
    assert bool((learned["llama"] != 0).all())
    torch.testing.assert_close(load_checkpoint(split / "checkpoint.pt")["log_damping"]["llama"], learned["llama"],
                               rtol=0, atol=0)
    summary = json.loads((whole / "metrics.json").read_text())
    assert summary["learn_damping"] is True
    deltas = learned["llama"].exp().tolist()
    for setting, choice in summary["posterior"]["llama"].items():
        assert choice["objective"] == "learned" and choice["damping"] == pytest.approx(deltas, rel=1e-6), setting
        assert choice["at_grid_edge"] == [False] * 3
    assert all(c["objective"] == "evidence-nll" for c in summary["posterior"]["maml"].values())
    assert "delta per layer, meta-learned" in capsys.readouterr().out
    # Evaluating MAML alone from such a run needs no learned delta.
    assert cli.main(["eval", str(whole), "--algorithm", "maml", "--eval-tasks", "2"]) == 0


def test_learned_damping_needs_one_process(tmp_path):
    config = ExperimentConfig.from_sources(None, {"learn_damping": True, "output": str(tmp_path / "d")})
    with pytest.raises(ConfigError, match="several processes"):
        training.Trainer(config, distributed.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"),
                                                         group=None))


def test_learned_damping_has_its_own_step_size(tmp_path):
    config = ExperimentConfig.from_sources(None, {"learn_damping": True, "damping_lr": 0.05,
                                                  "output": str(tmp_path / "d")})
    maml, llama = training.build_learners(config, torch.device("cpu"))
    assert maml.log_damping is None and len(maml.optimizer.param_groups) == 1
    weights, deltas = llama.optimizer.param_groups
    assert weights["lr"] == config.meta_lr and deltas["lr"] == 0.05
    assert deltas["params"] == [llama.log_damping] and llama.learned_damping() == (1.0, 1.0, 1.0)
