"""The evaluation's choices made on meta-validation tasks, per learner and setting: the prior
precision delta of the Laplace posterior (per layer by the Laplace evidence, or isotropic by the
GLM predictive's NLL, over a grid) and the regression predictives' observation noise sigma."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    """sum_n -log p(y_n | x_n, phi_i) per task at the adapted parameters (regression: with the
    posterior's observation noise sigma, which also scales its curvature)."""
    if loss == "mse":
        mean, std = post.predict(x, pred_type="point")
        z = (mean - y) / std
        return (0.5 * z ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    probs = post.predict(x, pred_type="point")
    return -probs.gather(-1, y.unsqueeze(-1)).clamp_min(1e-12).log().flatten(1).sum(1)


def select_damping(config, model, tasks) -> float:
    """One isotropic delta for LLAMA's meta-parameters, chosen on the meta-validation tasks over
    DAMPING_GRID (logged during training as ``damping_selected``): "nll" minimises the GLM
    predictive's mean NLL of the query sets, the others maximise the summed Laplace evidence of
    the support sets."""
    sampler = tasks.fixed("val", config.shots, config.query_shots, VAL_TASKS[config.task], VAL_RANK)
    batch = task_batch(sampler.sample())
    loss = loss_name(config)
    post = meta.adapt(model, batch.support_x, batch.support_y, loss=loss, inner_lr=config.inner_lr,
                      inner_steps=config.inner_steps, damping=1.0, fisher=config.fisher)
    if config.damping_objective == "nll":
        return glm_nll_damping(post, batch.query_x, batch.query_y, loss)[0]
    values = laplace_evidence(post, model, _summed_nll(post, batch.support_x, batch.support_y, loss))
    finite = torch.isfinite(values).all(0)
    if not bool(finite.any()):
        raise FloatingPointError("damping auto: the Laplace evidence is not finite for any validation "
                                 "task (did meta-training diverge?)")
    return DAMPING_GRID[int(values[:, finite].sum(1).argmax())]


def fit_noise(predict, y, grid=NOISE_GRID) -> tuple[float, list]:
    """The observation noise sigma on ``grid`` with the lowest mean Gaussian predictive NLL of
    ``y [T, M, D]``; ``predict(sigma)`` returns the predictive ``(mean, std)`` with noise sigma
    (each call must see the same posterior draws). Tasks whose NLL is not finite at some sigma
    are left out. Returns sigma and ``[(sigma, mean NLL)]`` over the grid."""
    values = torch.stack([gaussian_nll(*predict(sigma), y) for sigma in grid])    # [len(grid), T]
    return grid_minimum(values, grid, "noise auto: the validation NLL")


def grid_minimum(values, grid, what) -> tuple[float, list]:
    """The grid value with the lowest mean of ``values [len(grid), T]`` over the tasks whose
    values are all finite, and ``[(grid value, mean)]``; FloatingPointError naming ``what`` if
    no task is finite."""
    finite = torch.isfinite(values).all(0)
    if not bool(finite.any()):
        raise FloatingPointError(f"{what} is not finite for any validation task (did meta-training diverge?)")
    curve = values[:, finite].mean(1)
    return grid[int(curve.argmin())], [(x, float(v)) for x, v in zip(grid, curve)]


@dataclass
class PosteriorChoice:
    """What the evaluation chose for one learner and setting on the meta-validation tasks: the
    prior precision (a float, or one delta per K-FAC layer), the objective over DAMPING_GRID
    behind it (empty when fixed), and for regression the observation noise sigma by results
    column with its validation NLL curve."""

    damping: object
    objective: str
    curve: list = field(default_factory=list)
    noise: dict = field(default_factory=dict)
    noise_curve: dict = field(default_factory=dict)
    evidence_damping: tuple = ()     # "evidence-nll": the evidence's deltas before scaling
    scale_curve: list = field(default_factory=list)   # "evidence-nll": [(c, NLL)]

    def at_grid_edge(self) -> list:
        """Per delta: whether it sits at the grid's edge (there the posterior vanishes, or is
        as wide as the largest prior allows: the GLM predictive then equals the point estimate)."""
        values = self.damping if isinstance(self.damping, tuple) else (self.damping,)
        if self.objective == "evidence-nll":   # the largest factor: the posterior is switched off
            top = self.scale_curve and min(self.scale_curve, key=lambda row: row[1])[0] == SCALE_GRID[-1]
            return [bool(top) or e in (DAMPING_GRID[0], DAMPING_GRID[-1]) for e in self.evidence_damping]
        on_grid = self.objective not in ("fixed", "learned")
        return [on_grid and d in (DAMPING_GRID[0], DAMPING_GRID[-1]) for d in values]

    def as_json(self) -> dict:
        damping = list(self.damping) if isinstance(self.damping, tuple) else self.damping
        return {"damping": damping, "objective": self.objective, "at_grid_edge": self.at_grid_edge(),
                "curve": [[d, v] for d, v in self.curve], "noise": self.noise,
                "evidence_damping": list(self.evidence_damping), "scale_curve": [list(x) for x in self.scale_curve],
                "noise_curve": {k: [list(x) for x in v] for k, v in self.noise_curve.items()}}


def evidence_damping(post, model, x, y, loss) -> tuple[tuple, list]:
    """One delta per K-FAC layer, each maximising that layer's summed Laplace evidence over the
    tasks (the layers' terms separate given their deltas; the likelihood term does not depend on
    delta). Tasks with a non-finite term are left out. Returns the deltas and
    ``[(delta, [objective per layer])]``."""
    values = layer_evidence(post, model)                               # [D, T, L]
    finite = torch.isfinite(values).all(0).all(-1) & torch.isfinite(_summed_nll(post, x, y, loss))
    if not bool(finite.any()):
        raise FloatingPointError("damping auto: the Laplace evidence is not finite for any validation "
                                 "task (did meta-training diverge?)")
    total = values[:, finite].sum(1)                                   # [D, L]
    best = total.argmax(0)
    return (tuple(DAMPING_GRID[int(b)] for b in best),
            [(d, [float(v) for v in row]) for d, row in zip(DAMPING_GRID, total)])


def glm_nll_damping(post, x, y, loss) -> tuple[float, list]:
    """One delta for all layers minimising the mean NLL of the GLM predictive on ``(x, y)``
    (laplace-torch's gridsearch on validation NLL); the adaptation and eigendecompositions are
    shared by the whole grid (``with_damping``)."""
    values = torch.stack([_glm_nll(post.with_damping(delta), x, y, loss) for delta in DAMPING_GRID])
    return grid_minimum(values, DAMPING_GRID, "damping auto: the GLM predictive NLL")


# The factors c >= 1 of "evidence-nll": delta_l = c * (the evidence's delta_l), up to 1e8 (where
# the GLM predictive is the point estimate's to within 1e-4 on the sinusoid and Conv-4).
SCALE_GRID = tuple(10.0 ** (k / 2) for k in range(0, 17))


def scaled_evidence_damping(post, x, y, loss, evidence, noise_grid=(None,)) -> tuple:
    """The evidence's per-layer deltas times the factor c in SCALE_GRID whose GLM predictive has
    the lowest mean NLL on ``(x, y)``: the evidence sets the layers' relative precisions, the
    query sets how far to trust the posterior (c large: the point estimate). Regression fits
    the GLM's sigma jointly, over ``noise_grid`` (the curvature's scale follows sigma): fitted
    one after the other, a sigma fitted to the point estimate makes any posterior spread look
    harmful. Returns the deltas, ``[(c, NLL at the best sigma)]`` and the sigma (None for
    classification)."""
    values = torch.stack([torch.stack([
        _glm_nll(post.with_damping(tuple(c * d for d in evidence)), x, y, loss, sigma) for sigma in noise_grid])
        for c in SCALE_GRID])                                          # [C, S, T]
    finite = torch.isfinite(values).all(0).all(0)
    if not bool(finite.any()):
        raise FloatingPointError("damping auto: the GLM predictive NLL is not finite for any validation "
                                 "task (did meta-training diverge?)")
    mean = values[..., finite].mean(-1)                                # [C, S]
    best_c, best_s = divmod(int(mean.argmin()), len(noise_grid))
    curve = [(c, float(v)) for c, v in zip(SCALE_GRID, mean.amin(1))]
    return tuple(SCALE_GRID[best_c] * d for d in evidence), curve, noise_grid[best_s]


def _glm_nll(post, x, y, loss, sigma=None) -> torch.Tensor:
    """Mean NLL per task of the GLM predictive (regression: with observation noise ``sigma``)."""
    if loss == "mse":
        return gaussian_nll(*post.predict(x, pred_type="glm", **({} if sigma is None else {"noise": sigma})), y)
    return categorical_nll(post.predict(x, pred_type="glm"), y)


def choose_posterior(trainer, learner, shots, steps) -> PosteriorChoice:
    """The posterior of ``learner`` for an evaluation setting (``shots`` support examples,
    ``steps`` inner steps), chosen on the meta-validation tasks.

    Regression first fits the point estimate's sigma (it does not depend on delta) and builds
    the curvature with it (scale 1/sigma^2); then delta: a learner's meta-learned deltas
    (``--learn-damping``), else under damping "auto" per layer by the
    Laplace evidence ("evidence"), those deltas scaled by the factor >= 1 with the lowest GLM
    predictive NLL ("evidence-nll", the GLM's sigma fitted jointly) or isotropic by that NLL
    ("nll"), else the fixed value; then each remaining column's own sigma, with that delta.
    """
    c = trainer.config
    sampler = trainer.tasks.fixed("val", shots, c.query_shots, VAL_TASKS[c.task], VAL_RANK)
    batch = task_batch(sampler.sample())
    fixed = c.damping != "auto"
    post = posteriors(trainer, learner, batch, steps, trainer.eval_damping if fixed else 1.0)
    names = columns(learner)
    choice = PosteriorChoice(trainer.eval_damping, "fixed")
    if trainer.loss == "mse":
        _fit_column_noise(trainer, post, batch, names[0], choice)
        post = post.with_noise(choice.noise[names[0]])
    learned = learner.learned_damping()
    if learned is not None:   # --learn-damping: LLAMA's meta-learned deltas, whatever --damping says
        choice.damping, choice.objective = learned, "learned"
    elif not fixed and c.damping_objective in ("evidence", "evidence-nll"):
        choice.damping, choice.curve = evidence_damping(post, learner.model, batch.support_x, batch.support_y,
                                                        trainer.loss)
        choice.objective = "evidence"
        if c.damping_objective == "evidence-nll":
            noise_grid = (None,) if trainer.loss != "mse" else (
                NOISE_GRID if c.noise == "auto" else (float(c.noise),))
            choice.evidence_damping = choice.damping
            choice.damping, choice.scale_curve, sigma = scaled_evidence_damping(
                post, batch.query_x, batch.query_y, trainer.loss, choice.damping, noise_grid)
            choice.objective = "evidence-nll"
            if sigma is not None:
                choice.noise[names[1]] = sigma
    elif not fixed:
        choice.damping, choice.curve = glm_nll_damping(post, batch.query_x, batch.query_y, trainer.loss)
        choice.objective = "nll"
    if trainer.loss == "mse":
        post = post.with_damping(choice.damping)
        for name in names[1:]:
            if name not in choice.noise:
                _fit_column_noise(trainer, post, batch, name, choice)
    return choice


def _fit_column_noise(trainer, post, batch, column, choice) -> None:
    """sigma of one regression column: the fixed --noise, or under "auto" ``fit_noise`` on the
    validation query sets (the same posterior draws for every sigma)."""
    c = trainer.config
    if c.noise != "auto":
        choice.noise[column] = float(c.noise)
        return
    seed = data.derive_seed(c.seed, VAL_RANK)

    def predict(sigma):
        generator = torch.Generator().manual_seed(seed)
        return predict_column(trainer, post, batch.query_x, column, generator, sigma)
    choice.noise[column], choice.noise_curve[column] = fit_noise(predict, batch.query_y)


def choice_message(learner, setting, choice) -> str:
    """One line per learner and setting: the deltas (grid edges flagged) and the sigmas."""
    deltas = choice.damping if isinstance(choice.damping, tuple) else (choice.damping,)
    shown = ", ".join(f"{d:g}" + (" (grid edge)" if edge else "") for d, edge in zip(deltas, choice.at_grid_edge()))
    what = {"evidence": "per layer by the Laplace evidence", "nll": "by the GLM predictive NLL",
            "evidence-nll": "per layer by the Laplace evidence, scaled by the GLM predictive NLL",
            "learned": "per layer, meta-learned", "fixed": "fixed"}[choice.objective]
    line = f"posterior {learner.upper()} {setting}: delta {what}: {shown}"
    if choice.noise:
        line += "; sigma " + ", ".join(f"{k.upper().replace('_', ' ')} {v:.3g}" for k, v in choice.noise.items())
    return line
