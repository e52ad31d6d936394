"""The results columns of an evaluation and their predictions: each learner's point estimate and
Laplace predictives, and the per-task NLLs the selections and metrics share."""

from __future__ import annotations

import math

import torch

from .. import meta


# The results columns of a learner: its adapted point estimate phi_i, the linearised (GLM)
# predictive of the Laplace posterior N(phi_i, H_i^-1) around it, and for LLAMA the paper's
# weight-sampling predictive ("nn"). MAML gets the same Laplace machinery (adapt works for any
# model), so LLAMA GLM - MAML GLM isolates what LLAMA's meta-training adds.
KINDS = {"maml": ("point", "glm"), "llama": ("point", "glm", "nn")}


def columns(learner) -> tuple:
    """The results columns of a learner: ``<algorithm>_<kind>`` (see ``predict``)."""
    return tuple(f"{learner.name}_{kind}" for kind in KINDS[learner.name])


def column_kind(column: str) -> str:
    return column.rsplit("_", 1)[1]


def posteriors(trainer, learner, batch, steps, damping, noise=None):
    """The learner's posteriors of the tasks in ``batch`` after ``steps`` inner steps, with prior
    precision ``damping`` (a float, or one per K-FAC layer) and, for regression, observation
    noise ``noise`` (the curvature's scale is 1/noise^2)."""
    c = trainer.config
    extra = {} if noise is None else {"noise": noise}
    return meta.adapt(learner.model, batch.support_x, batch.support_y, loss=trainer.loss,
                      inner_lr=c.inner_lr, inner_steps=steps, damping=damping, fisher=c.fisher, **extra)


def predict(trainer, learner, post, x, generator, noise=None) -> dict:
    """Predictions by results column; ``noise``: the regression predictives' observation noise
    sigma by column (the posterior's where absent; classification: none)."""
    return {column: predict_column(trainer, post, x, column, generator,
                                    None if noise is None else noise.get(column))
            for column in columns(learner)}


def predict_column(trainer, post, x, column, generator, sigma=None):
    """One results column's predictions: "point" the adapted phi_i alone, "glm" the linearised
    predictive (probit link for classification), "nn" the average over S weight samples.
    ``sigma`` None: the posterior's own noise (classification has none)."""
    noise = {} if sigma is None else {"noise": sigma}
    kind = column_kind(column)
    if kind == "nn":
        return post.predict(x, pred_type="nn", num_samples=trainer.config.samples, generator=generator, **noise)
    return post.predict(x, pred_type=kind, **noise)


def chunks(batch: meta.TaskBatch, size: int):
    for i in range(0, batch.tasks, size):
        yield meta.TaskBatch(*(t[i:i + size] for t in (batch.support_x, batch.support_y,
                                                      batch.query_x, batch.query_y)))


def gaussian_nll(mean, std, y) -> torch.Tensor:
    """Mean Gaussian NLL per task, ``[T]`` (float64)."""
    z = (y - mean) / std
    return (0.5 * z ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).mean(1).double()


def categorical_nll(probs, labels) -> torch.Tensor:
    """Mean -log p(label) per task, ``[T]`` (float64; probabilities floored at 1e-12)."""
    picked = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().clamp_min(1e-12)
    return -picked.log().flatten(1).mean(1)
