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

from . import _checks
from .chol import chol_logdet
from .curvature import KronCurvature, layer_damping, prepare_factors
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
    for l, (A, G) in enumerate(zip(A_list, G_list)):
        A = A.dense() if isinstance(A, LowRankFactor) else A
        G = G.dense() if isinstance(G, LowRankFactor) else G
        A_damped, G_damped = factored_damping(A, scale * G, layer_damping(delta, l))
        total = total + G.shape[-1] * chol_logdet(A_damped) + A.shape[-1] * chol_logdet(G_damped)
    return total


def kron_logdet(A, G=None, damping=1.0, scale=1.0, mode="exact", *, check=False):
    """Per-task ``log det(s * G (x) A + delta * I)``, summed over layers.

    Args:
        A, G: Kronecker factors ``[T, a, a]`` and ``[T, g, g]`` (symmetric PSD), or lists of
            them (one per layer), or ``A`` a list of ``(A, G)`` pairs. An ``A`` may be a
            :class:`~llama_fast.LowRankFactor` (``kfac_factors(..., low_rank=True)``), and so may
            a ``G`` (rows without a bias column). A layer with a 0-wide factor adds 0 (the
            log-det of a 0 x 0 matrix, as ``torch.linalg.slogdet``).
        damping: ``delta > 0``, the prior precision: a float, a per-task tensor ``[T]``, or per
            layer a sequence of L floats or a tensor ``[T, L]``.
        scale: ``s > 0``, the likelihood scale (temperature): a float, or a 0-dim tensor; one
            that requires grad gets its gradient (``d/ds = sum_pq mu_p lambda_q / (s mu_p
            lambda_q + delta)``).
        mode: "exact" (the eigenvalue form above) or "factored": Martens & Grosse's
            pi-damping, ``log det((sG + pi sqrt(delta) I) (x) (A + sqrt(delta)/pi I))`` with
            ``pi = sqrt((tr A / dim A) / (tr sG / dim G))``, by batched Cholesky (a low-rank
            ``A`` is materialised there).
        check: validate symmetry, finiteness, positive semi-definiteness of every factor (no
            eigenvalue below ``-10 d eps`` times its largest) and, for tensor damping,
            positivity; ``ValueError`` naming the factor otherwise. Syncs with the host.

    Returns:
        ``[T]``, differentiable with respect to A, G, a damping tensor and a scale tensor (no
        double backward).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    s = _checks.scale_tensor(scale, "scale")
    A_list, G_list, _, delta, scale = prepare_factors(A, G, damping, 1.0 if s is not None else scale, check)
    layers = [l for l in range(len(A_list)) if _width(A_list[l]) and _width(G_list[l])]
    total = _empty_layers_zero(A_list, G_list, layers)
    if layers:
        A_kept, G_kept = [A_list[l] for l in layers], [G_list[l] for l in layers]
        if delta.dim() == 2 and len(layers) < len(A_list):   # per-layer damping [T, L]
            delta = delta[:, layers]
        if mode == "exact":
            total = total + _exact_logdet(A_kept, G_kept, delta, scale, s, check)
        else:
            if check:
                _check_psd_dense(A_kept, G_kept)
            total = total + _factored_logdet(A_kept, G_kept, delta, scale if s is None else s)
    return total


def _width(x) -> int:
    return x.width if isinstance(x, LowRankFactor) else x.shape[-1]


def _empty_layers_zero(A_list, G_list, kept):
    """Zeros ``[T]``: the log-det of the layers with a 0-wide factor (0 x 0 precisions), as a
    sum over their empty factors, so that those stay on the autograd graph."""
    parts = [x.rows if isinstance(x, LowRankFactor) else x
             for l, pair in enumerate(zip(A_list, G_list)) if l not in kept for x in pair if not _width(x)]
    first = A_list[0].rows if isinstance(A_list[0], LowRankFactor) else A_list[0]
    return sum((x.sum((-2, -1)) for x in parts), first.new_zeros(first.shape[0]))


def _exact_logdet(A_list, G_list, delta, scale, s, check):
    """The eigenvalue form. A scale tensor ``s`` that requires grad enters through the damping,
    which the op differentiates: ``s (G (x) A) + delta I = s (G (x) A + (delta / s) I)``, so
    ``log det = n log s + log det(G (x) A + (delta / s) I)`` with n = sum_l dim A_l dim G_l."""
    if s is not None:
        s = s.to(dtype=delta.dtype, device=delta.device)
        delta = delta / s
    curvature = KronCurvature(A_list, G_list, damping=delta, scale=scale, check=check)
    if check:
        _check_psd_evals(curvature.evals_A, curvature.evals_G, A_list, G_list)
    logdet = curvature.logdet()
    if s is not None:
        logdet = logdet + sum(_width(A) * _width(G) for A, G in zip(A_list, G_list)) * torch.log(s)
    return logdet


def _factor_names(layers: int):
    return [(f"A[{l}]", f"G[{l}]") if layers > 1 else ("A", "G") for l in range(layers)]


def _check_psd_evals(evals_A, evals_G, A_list, G_list) -> None:
    """Every dense factor is PSD (a LowRankFactor is one by construction: s abar^T abar)."""
    for (name_A, name_G), eA, eG, A, G in zip(_factor_names(len(A_list)), evals_A, evals_G, A_list, G_list):
        for evals, name, x in ((eA, name_A, A), (eG, name_G, G)):
            if not isinstance(x, LowRankFactor):
                _checks.check_psd(evals, name)


def _check_psd_dense(A_list, G_list) -> None:
    evals = [[torch.linalg.eigvalsh(x.detach()) if not isinstance(x, LowRankFactor) else None for x in xs]
             for xs in (A_list, G_list)]
    _check_psd_evals(*evals, A_list, G_list)
