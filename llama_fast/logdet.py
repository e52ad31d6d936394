"""kron_logdet: per-task damped Kronecker log-determinants of K-FAC curvatures, with gradients.

Per layer, ``H = s * (G (x) A) + delta * I`` (DESIGN.md section 1) and, in "exact" mode,
``log det H = sum_{p,q} log(s * mu_p * lambda_q + delta)`` over the eigenvalues of G and A. The
compiled op torch.ops.llama_fast.kron_logdet_exact returns the eigendecompositions it used,
so the backward pass reuses them: ``dA = Q_A diag(w_A) Q_A^T`` with
``w_A[q] = sum_p s mu_p / (s mu_p lambda_q + delta)`` (no eigenvector derivatives).
"""

import math

import torch

from . import _checks
from .kfac import _as_layer_lists

__all__ = ["kron_logdet"]

MODES = ("exact",)


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
        [x.new_empty(x.shape) for x in A],
        [x.new_empty(x.shape[:-1]) for x in G],
        [x.new_empty(x.shape) for x in G],
    )


def _setup_context(ctx, inputs, output):
    _, _, damping, scale = inputs
    _, evals_A, evecs_A, evals_G, evecs_G = output
    # The eigendecompositions are returned for reuse, not differentiated through.
    ctx.mark_non_differentiable(*evals_A, *evecs_A, *evals_G, *evecs_G)
    ctx.layers = len(evals_A)
    ctx.scale = scale
    ctx.save_for_backward(damping, *evals_A, *evecs_A, *evals_G, *evecs_G)


def _rotate_back(evecs, weights):
    """Q diag(weights) Q^T for a batch."""
    return (evecs * weights.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def _backward(ctx, d_logdet, *unused_eig_grads):
    if torch.is_grad_enabled():
        raise RuntimeError("kron_logdet: double backward (create_graph=True through the "
                           "log-determinant) is not supported")
    damping, *saved = ctx.saved_tensors
    L = ctx.layers
    evals_A, evecs_A, evals_G, evecs_G = (saved[i * L:(i + 1) * L] for i in range(4))
    w_A, w_G, w_delta = torch.ops.llama_fast.kron_logdet_weights(evals_A, evals_G, damping, ctx.scale)
    g = d_logdet.unsqueeze(-1)
    dA = [_rotate_back(Q, w * g) for Q, w in zip(evecs_A, w_A)]
    dG = [_rotate_back(Q, w * g) for Q, w in zip(evecs_G, w_G)]
    return dA, dG, w_delta * d_logdet, None


torch.library.register_autograd("llama_fast::kron_logdet_exact", _backward, setup_context=_setup_context)


def _damping_tensor(damping, tasks, like, check):
    if isinstance(damping, torch.Tensor):
        _checks.check_tensor(damping, "damping")
        if damping.dim() == 0:
            damping = damping.expand(tasks)
        if damping.shape != (tasks,):
            raise ValueError(f"damping must be a float or a tensor of shape [T={tasks}], got {tuple(damping.shape)}")
        if damping.dtype != like.dtype or damping.device != like.device:
            raise ValueError(f"damping must have the factors' dtype {like.dtype} and device {like.device}, "
                             f"got {damping.dtype} on {damping.device}")
        if check and not bool((damping > 0).all() & torch.isfinite(damping).all()):
            raise ValueError("damping must be positive and finite")
        return damping
    value = float(damping)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"damping must be positive and finite, got {value}")
    return torch.full((tasks,), value, dtype=like.dtype, device=like.device)


def _check_factors(A_list, G_list, check):
    names, tensors = [], []
    T = A_list[0].shape[0] if A_list[0].dim() == 3 else None
    for l, (A, G) in enumerate(zip(A_list, G_list)):
        for x, kind in ((A, "A"), (G, "G")):
            name = f"{kind}[{l}]" if len(A_list) > 1 else kind
            _checks.check_tensor(x, name, ndim=3)
            if x.shape[1] != x.shape[2]:
                raise ValueError(f"{name} must be square [T, d, d], got {tuple(x.shape)}")
            if x.shape[0] != T:
                raise ValueError(f"{name} has T={x.shape[0]} tasks but {names[0] if names else 'A'} has T={T}")
            if check:
                _checks.check_finite(x, name)
                _checks.check_symmetric(x, name)
            names.append(name)
            tensors.append(x)
    _checks.check_same(tensors, names)
    return T


def kron_logdet(A, G=None, damping=1.0, scale=1.0, mode="exact", *, check=False):
    """Per-task ``log det(s * G (x) A + delta * I)``, summed over layers.

    Args:
        A, G: Kronecker factors ``[T, a, a]`` and ``[T, g, g]`` (symmetric PSD), or lists of
            them (one per layer), or ``A`` a list of ``(A, G)`` pairs.
        damping: ``delta > 0``, the prior precision: a float or a per-task tensor ``[T]``.
        scale: ``s``, the likelihood scale (temperature).
        mode: "exact" (the eigenvalue form above).
        check: validate symmetry, finiteness and (for tensor damping) positivity; syncs.

    Returns:
        ``[T]``, differentiable with respect to A, G and a damping tensor (no double backward).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    A_list, G_list, _ = _as_layer_lists(A, G)
    if not A_list:
        raise ValueError("kron_logdet needs at least one layer")
    T = _check_factors(A_list, G_list, check)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    delta = _damping_tensor(damping, T, A_list[0], check)
    return torch.ops.llama_fast.kron_logdet_exact(A_list, G_list, delta, scale)[0]
