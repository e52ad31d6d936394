"""KronCurvature: the per-task K-FAC Laplace posterior precision of a network, with its
eigendecompositions cached.

Per layer ``H_l = s * (G_l (x) A_l) + delta * I`` (DESIGN.md section 1). Building one runs the
eigendecompositions of every factor once (``torch.ops.llama_fast.kron_logdet_exact``); the
log-determinant is then at hand, differentiable, and the eigenbases are kept for what needs
them next (posterior sampling, solves).
"""

import math

import torch

from . import _checks
from .kfac import _as_layer_lists
from .lowrank import LowRankFactor

__all__ = ["KronCurvature"]

MODES = ("exact",)


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
    """Each factor a [T, d, d] float tensor (an A may be a LowRankFactor: its rows are checked),
    all with one T, dtype and device; with `check`, finite and symmetric. Returns T."""
    names, tensors = [], []
    T = None
    for l, (A, G) in enumerate(zip(A_list, G_list)):
        for x, kind in ((A, "A"), (G, "G")):
            name = f"{kind}[{l}]" if len(A_list) > 1 else kind
            low_rank = isinstance(x, LowRankFactor) and kind == "A"
            if low_rank:
                x, name = x.rows, f"{name}.rows"
            _checks.check_tensor(x, name, ndim=3)
            if not low_rank and x.shape[1] != x.shape[2]:
                raise ValueError(f"{name} must be square [T, d, d], got {tuple(x.shape)}")
            T = x.shape[0] if T is None else T
            if x.shape[0] != T:
                raise ValueError(f"{name} has T={x.shape[0]} tasks but {names[0]} has T={T}")
            if check:
                _checks.check_finite(x, name)
                if not low_rank:
                    _checks.check_symmetric(x, name)
            names.append(name)
            tensors.append(x)
    _checks.check_same(tensors, names)
    return T


def prepare_factors(A, G, damping, scale, check):
    """Validated layer lists, task count, per-task damping tensor and scale (shared by every
    log-det mode)."""
    A_list, G_list, _ = _as_layer_lists(A, G, names=("A", "G"))
    if not A_list:
        raise ValueError("kron_logdet needs at least one layer")
    tasks = _check_factors(A_list, G_list, check)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    like = A_list[0].rows if isinstance(A_list[0], LowRankFactor) else A_list[0]
    return A_list, G_list, tasks, _damping_tensor(damping, tasks, like, check), scale


class KronCurvature:
    """K-FAC curvature ``H_l = s * (G_l (x) A_l) + delta * I`` of every layer of T tasks.

    Args:
        A, G: factors as for :func:`llama_fast.kron_logdet` (tensors ``[T, d, d]``, lists of
            them, a list of ``(A, G)`` pairs; an ``A`` may be a ``LowRankFactor``).
        damping: ``delta > 0``: a float or a per-task tensor ``[T]``.
        scale: ``s > 0``.
        mode: "exact".
        check: validate symmetry, finiteness and damping positivity (syncs with the host).

    Attributes:
        evals_A, evecs_A, evals_G, evecs_G: per-layer eigendecompositions (ascending), detached.
            For a low-rank ``A`` they are those of its dual Gram matrix ``[T, N, N]``.
        damping: the per-task damping tensor ``[T]``.
    """

    def __init__(self, A, G=None, damping=1.0, scale=1.0, mode="exact", *, check=False):
        if mode not in MODES:
            raise ValueError(f"KronCurvature supports mode {MODES}, got {mode!r} "
                             "(kron_logdet also has mode='factored')")
        A_list, G_list, self.tasks, self.damping, self.scale = prepare_factors(A, G, damping, scale, check)
        self.factors_A, self.factors_G = A_list, G_list
        dense_A = [x.dual() if isinstance(x, LowRankFactor) else x for x in A_list]
        out = torch.ops.llama_fast.kron_logdet_exact(dense_A, G_list, self.damping, self.scale)
        self._logdet = out[0] + self._null_pairs() * torch.log(self.damping)
        self.evals_A, self.evecs_A, self.evals_G, self.evecs_G = (list(x) for x in out[1:])

    def _null_pairs(self) -> int:
        """Eigenvalue pairs (lambda, mu) that low-rank factors leave out: lambda is an exact zero
        there, so each contributes log(delta)."""
        return sum((A.width - A.rank_bound) * G.shape[-1]
                   for A, G in zip(self.factors_A, self.factors_G) if isinstance(A, LowRankFactor))

    @property
    def layers(self) -> int:
        return len(self.factors_A)

    def logdet(self) -> torch.Tensor:
        """``sum_l log det H_l`` per task, ``[T]``; differentiable (single backward)."""
        return self._logdet
