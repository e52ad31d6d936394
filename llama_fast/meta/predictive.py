"""Predictive distributions of the linearised (GLM) Laplace posterior from its function-space
covariance: ``f(x; phi) + J (theta - phi)`` with ``theta ~ N(phi, H^-1)`` is Gaussian,
``N(f, J H^-1 J^T)``, in the network's outputs.

- Gaussian regression: ``N(f, f_cov + sigma^2 I)``, reported as its mean and per-output std.
- Classification, ``link_approx="probit"`` (MacKay 1992; laplace-torch's default): the
  softmax of ``f / sqrt(1 + pi/8 diag f_cov)``.
- Classification, ``link_approx="mc"``: the average softmax of draws ``f + L z``,
  ``L L^T = f_cov`` (K x K per input, cheap next to drawing weights).
"""

import math
import numbers

import torch

__all__ = ["LINKS", "PRED_TYPES", "gaussian_predictive", "mc_softmax", "probit_softmax"]

PRED_TYPES = ("glm", "nn", "point")
LINKS = ("probit", "mc")


def probit_softmax(f, f_cov):
    """``softmax(f * kappa)``, ``kappa = 1 / sqrt(1 + pi/8 * diag(f_cov))``: f ``[..., K]``,
    f_cov ``[..., K, K]``."""
    variance = f_cov.diagonal(dim1=-2, dim2=-1)
    return torch.softmax(f * torch.rsqrt(1.0 + math.pi / 8.0 * variance), dim=-1)


def covariance_root(f_cov):
    """``L`` with ``L L^T = f_cov`` for PSD matrices (an eigendecomposition: f_cov may be
    singular, e.g. along a softmax's constant direction); negative round-off clamped to 0."""
    evals, evecs = torch.linalg.eigh(f_cov)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def mc_softmax(f, f_cov, num_samples, generator=None):
    """The mean of ``softmax(f + L z)`` over ``num_samples`` draws ``z ~ N(0, I)``."""
    root = covariance_root(f_cov)
    z = torch.randn((num_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
    draws = f + (root @ z.unsqueeze(-1)).squeeze(-1)
    return torch.softmax(draws, dim=-1).mean(0)


def gaussian_predictive(f, f_cov, noise):
    """``(mean, std)``: ``f`` and ``sqrt(diag(f_cov) + noise^2)``."""
    return f, torch.sqrt(f_cov.diagonal(dim1=-2, dim2=-1) + noise ** 2)


def check_samples(num_samples, name="num_samples") -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"{name} must be an int >= 1, got {num_samples!r}")
    return int(num_samples)
