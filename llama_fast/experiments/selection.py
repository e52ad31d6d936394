"""The evaluation's choices made on meta-validation tasks: LLAMA's posterior damping delta
(Laplace evidence or predictive NLL over a grid) and the regression predictives' observation
noise sigma. Each function returns what it chose and the objective over its grid."""

from __future__ import annotations

import math

import torch

from .. import meta
from . import data
from .columns import categorical_nll, columns, gaussian_nll, posteriors, predict_column
from .learners import VAL_RANK, VAL_TASKS, loss_name, task_batch

# 1e-4 .. 1e4 in half decades (laplace-torch's gridsearch interval). With a 1-shot support set
# almost every direction of H is delta alone, so a useful sampled predictive can need delta >= 1e3.
DAMPING_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 9))

# The observation noise sigma of the regression predictives under noise = "auto": 1e-2 .. 1e1 in
# quarter decades, chosen per evaluation setting and results column on meta-validation tasks.
NOISE_GRID = tuple(10.0 ** (k / 4) for k in range(-8, 5))


def layer_evidence(post, model, grid=DAMPING_GRID) -> torch.Tensor:
    """The prior and Occam terms of the Laplace evidence per (delta, task, K-FAC layer),
    ``[len(grid), T, L]``: for layer l with P_l parameters,
    ``-delta/2 ||phi_l - theta_l||^2 + P_l/2 log delta - 1/2 log det(s G_l (x) A_l + delta I)``.

    The eigenvalues cached by the posterior's KronCurvature are computed once; each delta only
    re-sums ``log(s mu lambda + delta)`` (a low-rank A or G: the eigenvalues of its dual Gram
    matrix; the pairs it leaves out hold an exact zero and add log(delta) each). Layers are
    independent given delta_l, so a per-layer choice maximises each layer's column.
    """
    theta = dict(model.named_parameters())
    curv = post.curvature
    columns = []
    for l, layer in enumerate(post.spec.layers):
        keys = [k for k in (layer.weight, layer.bias) if k is not None]
        sq_dist = sum(((post.params[k] - theta[k].detach()) ** 2).flatten(1).sum(1) for k in keys).double()
        count = sum(theta[k].numel() for k in keys)
        products = (curv.scale * (curv.evals_G[l].clamp_min(0).unsqueeze(-1)
                                  * curv.evals_A[l].clamp_min(0).unsqueeze(-2)).flatten(1)).double()
        null = curv.null_pairs(l)
        columns.append(torch.stack([
            -0.5 * delta * sq_dist + 0.5 * count * math.log(delta)
            - 0.5 * (torch.log(products + delta).sum(1) + null * math.log(delta))
            for delta in grid]))
    return torch.stack(columns, -1)


def laplace_evidence(post, model, support_y_nll, grid=DAMPING_GRID) -> torch.Tensor:
    """Laplace log marginal likelihood per (delta, task), ``[len(grid), T]``, one delta for
    every layer.

    ``log Z(delta) = log p(D|phi) - delta/2 ||phi - theta||^2 + P/2 log delta - 1/2 log det H``
    with ``H = s G (x) A + delta I`` over the P K-FAC parameters (the 2 pi terms cancel).
    """
    return -support_y_nll.double() + layer_evidence(post, model, grid).sum(-1)


def _summed_nll(post, x, y, loss) -> torch.Tensor:
    """sum_n -log p(y_n | x_n, phi_i) per task at the adapted parameters (sigma = 1)."""
    if loss == "mse":
        mean, _ = post.predict(x, pred_type="point")
        return (0.5 * (mean - y) ** 2 + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    probs = post.predict(x, pred_type="point")
    return -probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-12).log().flatten(1).sum(1)


def predictive_nll(post, x, y, loss, samples, seed, grid=DAMPING_GRID) -> torch.Tensor:
    """Mean predictive NLL per (delta, task), ``[len(grid), T]``, of the evaluation's LLAMA
    predictive (``samples`` posterior samples; moment-matched Gaussian for regression) on
    ``(x, y)``. The posterior is re-damped with ``with_damping`` (one adaptation and one
    eigendecomposition for the whole grid) and every delta sees the same normal draws (a
    generator seeded with ``seed`` each time), so the curve is smooth in delta."""
    rows = []
    for delta in grid:
        generator = torch.Generator(device=x.device).manual_seed(seed)
        out = post.with_damping(delta).predict(x, pred_type="nn", num_samples=samples, generator=generator)
        rows.append(gaussian_nll(*out, y) if loss == "mse" else categorical_nll(out, y))
    return torch.stack(rows)


def select_damping(config, model, tasks) -> tuple[float, list]:
    """LLAMA's posterior delta, chosen on the meta-validation tasks over DAMPING_GRID.

    ``config.damping_objective``: "evidence" maximises the summed Laplace evidence of the
    support sets (laplace-torch's marginal-likelihood choice); "nll" minimises the mean
    predictive NLL of the query sets under the evaluation's S-sample predictive (laplace-torch's
    ``optimize_prior_precision(method="gridsearch")`` on validation NLL). Returns the delta and
    ``[(delta, objective)]`` over the grid.
    """
    sampler = tasks.fixed("val", config.shots, config.query_shots, VAL_TASKS[config.task], VAL_RANK)
    batch = task_batch(sampler.sample())
    loss = loss_name(config)
    post = meta.adapt(model, batch.support_x, batch.support_y, loss=loss, inner_lr=config.inner_lr,
                    inner_steps=config.inner_steps, damping=1.0, fisher=config.fisher)
    if config.damping_objective == "nll":
        values = predictive_nll(post, batch.query_x, batch.query_y, loss, config.samples,
                                data.derive_seed(config.seed, VAL_RANK))
        what = "predictive NLL"
    else:
        values = laplace_evidence(post, model, _summed_nll(post, batch.support_x, batch.support_y, loss))
        what = "Laplace evidence"
    finite = torch.isfinite(values).all(0)
    if not bool(finite.all()):
        print(f"damping auto: {int((~finite).sum())} of {finite.numel()} validation tasks have a "
              f"non-finite {what}; left out of it")
    total = values[:, finite].sum(1) if config.damping_objective == "evidence" else values[:, finite].mean(1)
    if not bool(torch.isfinite(total).any()):
        raise FloatingPointError(f"damping auto: the {what} is not finite for any delta "
                                 "(did meta-training diverge?)")
    if config.damping_objective == "nll":
        best = int(total.nan_to_num(nan=math.inf).argmin())
    else:
        best = int(total.nan_to_num(nan=-math.inf).argmax())
    return DAMPING_GRID[best], [(d, float(e)) for d, e in zip(DAMPING_GRID, total)]


def damping_message(config, curve, delta) -> str:
    """One line: the objective over the grid and the choice (flagged at the grid's edge)."""
    if config.damping_objective == "nll":
        head = (f"damping auto (nll): mean predictive NLL (S = {config.samples}) of the meta-validation "
                "query sets per delta: ")
    else:
        head = "damping auto (evidence): Laplace evidence of the meta-validation support sets per delta: "
    edge = " (the edge of the grid)" if delta in (DAMPING_GRID[0], DAMPING_GRID[-1]) else ""
    return head + ", ".join(f"{d:g}: {e:.4g}" for d, e in curve) + f" -> delta = {delta:g}{edge}"


def fit_noise(predict, y, grid=NOISE_GRID) -> tuple[float, list]:
    """The observation noise sigma on ``grid`` with the lowest mean Gaussian predictive NLL of
    ``y [T, M, D]``; ``predict(sigma)`` returns the predictive ``(mean, std)`` with noise sigma
    (each call must see the same posterior draws). Tasks whose NLL is not finite at some sigma
    are left out. Returns sigma and ``[(sigma, mean NLL)]`` over the grid."""
    values = torch.stack([gaussian_nll(*predict(sigma), y) for sigma in grid])    # [len(grid), T]
    finite = torch.isfinite(values).all(0)
    if not bool(finite.any()):
        raise FloatingPointError("noise auto: the validation NLL is not finite for any task "
                                 "(did meta-training diverge?)")
    curve = values[:, finite].mean(1)
    return grid[int(curve.argmin())], [(sigma, float(v)) for sigma, v in zip(grid, curve)]


def select_noise(trainer, shots, steps) -> dict:
    """noise = "auto": per results column, ``fit_noise`` on the meta-validation tasks (those of
    ``select_damping``: ``tasks.fixed("val", ...)``, seeded with VAL_RANK, here with ``shots``
    support points) adapted with ``steps`` inner steps, the evaluation's predictive (S samples
    for LLAMA, the same draws for every sigma). Returns ``{column: (sigma, curve)}``."""
    c = trainer.config
    sampler = trainer.tasks.fixed("val", shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK)
    batch = task_batch(sampler.sample())
    seed = data.derive_seed(c.seed, VAL_RANK)
    chosen = {}
    for learner in trainer.learners:
        post = posteriors(trainer, learner, batch, steps)
        for column in columns(learner):
            def predict(sigma, column=column):   # this column only, the same draws every time
                generator = torch.Generator().manual_seed(seed)
                return predict_column(trainer, post, batch.query_x, column, generator, sigma)
            chosen[column] = fit_noise(predict, batch.query_y)
    return chosen


def noise_message(setting, chosen) -> str:
    """One line per evaluation setting: each column's sigma and its validation NLL."""
    parts = []
    for column, (sigma, curve) in chosen.items():
        edge = " (grid edge)" if sigma in (NOISE_GRID[0], NOISE_GRID[-1]) else ""
        parts.append(f"{column.upper().replace('_', ' ')} {sigma:.3g}{edge} (NLL {dict(curve)[sigma]:.4g})")
    return (f"noise auto, {setting}: sigma minimising the mean predictive NLL of the meta-validation "
            "query sets: " + ", ".join(parts))
