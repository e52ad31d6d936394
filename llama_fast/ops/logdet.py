"""kron_logdet: per-task damped Kronecker log-determinants of K-FAC curvatures, with gradients.

Per layer, ``H = s * (G (x) A) + delta * I`` (docs/ops.md, "Conventions") and, in "exact" mode,
``log det H = sum_{p,q} log(s * mu_p * lambda_q + delta)`` over the eigenvalues of G and A. The
compiled op torch.ops.llama_fast.kron_logdet_exact returns the eigendecompositions it used,
so the backward pass reuses them: ``dA = Q_A diag(w_A) Q_A^T`` with
``w_A[q] = sum_p s mu_p / (s mu_p lambda_q + delta)`` (no eigenvector derivatives). Its autograd
formula is registered in C++ (csrc/autograd/kron_logdet.cpp); this module adds the fake (meta)
implementations for torch.compile and the user-facing wrapper.
"""

import torch

from .chol import chol_logdet
from .curvature import KronCurvature, prepare_factors
from .eig import _evecs_like
from .lowrank import LowRankFactor

__all__ = ["kron_logdet"]

MODES = ("exact", "factored")


@torch.library.register_fake("llama_fast::kron_logdet_from_eigs")
def _from_eigs_fake(evals_A, evals_G, damping, scale):
    return damping.new_empty(damping.shape)


@torch.library.register_fake("llama_fast::kron_logdet_weights")
def _weights_fake(evals_A, evals_G, damping, scale):
    return [e.new_empty(e.shape) for e in evals_A], [e.new_empty(e.shape) for e in evals_G], damping.new_empty(damping.shape)


@torch.library.register_fake("llama_fast::kron_logdet_exact")
def _exact_fake(A, G, damping, scale):
    return (
        damping.new_empty(damping.shape),
        [x.new_empty(x.shape[:-1]) for x in A],
        [_evecs_like(x) for x in A],
        [x.new_empty(x.shape[:-1]) for x in G],
        [_evecs_like(x) for x in G],
    )


def factored_damping(A, sG, delta):
    """Martens & Grosse's pi-damped factors: A + sqrt(delta)/pi I and s G + pi sqrt(delta) I,
    with pi = sqrt((tr A / dim A) / (tr sG / dim G)) per task (1 where a trace is 0)."""
    mean_A = A.diagonal(dim1=-2, dim2=-1).mean(-1)
    mean_G = sG.diagonal(dim1=-2, dim2=-1).mean(-1)
    ok = (mean_A > 0) & (mean_G > 0)
    pi = torch.where(ok, torch.sqrt(mean_A.clamp_min(1e-300) / mean_G.clamp_min(1e-300)), torch.ones_like(mean_A))
    root = torch.sqrt(delta)
    eye_A = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    eye_G = torch.eye(sG.shape[-1], dtype=A.dtype, device=A.device)
    return A + (root / pi)[:, None, None] * eye_A, sG + (pi * root)[:, None, None] * eye_G


def _factored_logdet(A_list, G_list, delta, scale):
    """sum_l log det((sG + pi sqrt(delta) I) (x) (A + sqrt(delta)/pi I))
    = sum_l dim G * log det(A_damped) + dim A * log det(G_damped), by batched Cholesky."""
    total = 0
    for A, G in zip(A_list, G_list):
        A = A.dense() if isinstance(A, LowRankFactor) else A
        G = G.dense() if isinstance(G, LowRankFactor) else G
        A_damped, G_damped = factored_damping(A, scale * G, delta)
        total = total + G.shape[-1] * chol_logdet(A_damped) + A.shape[-1] * chol_logdet(G_damped)
    return total


def kron_logdet(A, G=None, damping=1.0, scale=1.0, mode="exact", *, check=False):
    """Per-task ``log det(s * G (x) A + delta * I)``, summed over layers.

    Args:
        A, G: Kronecker factors ``[T, a, a]`` and ``[T, g, g]`` (symmetric PSD), or lists of
            them (one per layer), or ``A`` a list of ``(A, G)`` pairs. An ``A`` may be a
            :class:`~llama_fast.LowRankFactor` (``kfac_factors(..., low_rank=True)``), and so may
            a ``G`` (rows without a bias column).
        damping: ``delta > 0``, the prior precision: a float or a per-task tensor ``[T]``.
        scale: ``s``, the likelihood scale (temperature).
        mode: "exact" (the eigenvalue form above) or "factored": Martens & Grosse's
            pi-damping, ``log det((sG + pi sqrt(delta) I) (x) (A + sqrt(delta)/pi I))`` with
            ``pi = sqrt((tr A / dim A) / (tr sG / dim G))``, by batched Cholesky (a low-rank
            ``A`` is materialised there).
        check: validate symmetry, finiteness and (for tensor damping) positivity; syncs.

    Returns:
        ``[T]``, differentiable with respect to A, G and a damping tensor (no double backward).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "exact":
        return KronCurvature(A, G, damping=damping, scale=scale, check=check).logdet()
    A_list, G_list, _, delta, scale = prepare_factors(A, G, damping, scale, check)
    return _factored_logdet(A_list, G_list, delta, scale)
