"""The results columns of an evaluation and their predictions: each learner's point estimate,
LLAMA's posterior predictive, and the per-task NLLs the selections and metrics share."""

from __future__ import annotations

import math

import torch

from .. import meta


def posteriors(trainer, learner, batch, steps):
    c = trainer.config
    return meta.adapt(learner.model, batch.support_x, batch.support_y, loss=trainer.loss,
                    inner_lr=c.inner_lr, inner_steps=steps, damping=trainer.eval_damping, fisher=c.fisher)

POINT = "llama_point"   # results column: LLAMA's adapted mean phi_i alone (no posterior samples)


def columns(learner) -> tuple:
    """The results columns of a learner (see ``predict``)."""
    return (learner.name, POINT) if learner.name == "llama" else (learner.name,)


def predict(trainer, learner, post, x, generator, noise=None) -> dict:
    """Predictions by results column. MAML: its adapted point estimate. LLAMA: the posterior
    predictive with S samples, and (as "llama_point") the point estimate phi_i of the same
    posterior, so that the samples' effect is visible; the point estimate draws nothing, so
    the sampled predictive is the same with or without it. ``noise``: the regression
    predictives' observation noise sigma by column (1 where absent; classification: none)."""
    return {column: predict_column(trainer, post, x, column, generator,
                                    None if noise is None else noise.get(column, 1.0))
            for column in columns(learner)}


def predict_column(trainer, post, x, column, generator, sigma=None):
    """One results column's predictions (``predict``); ``sigma`` None: no noise argument
    (classification's predict takes none)."""
    noise = {} if sigma is None else {"noise": sigma}
    if column == "llama":
        return post.predict(x, pred_type="nn", num_samples=trainer.config.samples, generator=generator, **noise)
    return post.predict(x, pred_type="point", **noise)


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
