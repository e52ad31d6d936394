"""sym_eig: batched symmetric eigendecomposition, a drop-in for torch.linalg.eigh.

The compiled op torch.ops.llama_fast.sym_eig also returns an info tensor (0: converged,
1: not converged) instead of raising inside the kernel, so CUDA calls never sync the host.
Its gradient (torch.linalg.eigh's formula) is registered in C++: csrc/autograd/sym_eig.cpp.
"""

import torch

from . import _checks

__all__ = ["sym_eig"]


@torch.library.register_fake("llama_fast::sym_eig")
def _sym_eig_fake(M):
    return M.new_empty(M.shape[:-1]), _evecs_like(M), M.new_empty(M.shape[:-2], dtype=torch.int32)


def _evecs_like(M):
    """The eigenvector tensor's layout: column-major per matrix on the CPU (LAPACK's, like
    torch.linalg.eigh), row-major from the CUDA kernels."""
    if M.device.type != "cpu":
        return M.new_empty(M.shape)
    return M.new_empty(M.shape).transpose(-1, -2)


_SYM_EIG_OP = torch.ops.llama_fast.sym_eig.default
_FLOAT_TYPES = (torch.float32, torch.float64)


def _check_input(M) -> None:
    _checks.check_tensor(M, "M")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must have shape [..., d, d] (square), got {tuple(M.shape)}")


def sym_eig(M: torch.Tensor, *, check: bool = False):
    """Eigendecomposition of symmetric matrices ``M [..., d, d]`` (float32/float64).

    Returns ``(eigenvalues [..., d], eigenvectors [..., d, d])`` like ``torch.linalg.eigh``:
    eigenvalues ascending, orthonormal eigenvectors as columns, ``M = Q diag(w) Q^T``.
    Only symmetric input is meaningful (like ``eigh``, nothing checks it by default). With
    ``check=True``, raises ``ValueError`` for non-finite or non-symmetric input and
    ``RuntimeError`` if the solver did not converge (both sync with the host). Without it
    nothing syncs; ``torch.ops.llama_fast.sym_eig`` also returns the per-matrix ``info``
    tensor (0: converged, 1: not converged).
    """
    if check:
        _check_input(M)
        _checks.check_finite(M, "M")
        _checks.check_symmetric(M, "M")
    if M.dim() >= 2 and M.shape[-2:] == (0, 0) and M.dtype in _FLOAT_TYPES:
        # 0 x 0 matrices: no eigenvalues, as torch.linalg.eigh (the op's [-1, d, d] view of
        # the batch is undefined for d = 0); both outputs stay attached to M's graph.
        return M.sum(-1), M.clone()
    if M.dim() >= 2 and M.shape[-2:] == (1, 1) and M.dtype in _FLOAT_TYPES:
        # A 1 x 1 matrix is its own eigenvalue, with eigenvector 1 (the op call's fixed cost
        # is all of the time at this size); differentiable like eigh (d w = d M).
        return M[..., 0].clone(), torch.ones_like(M)
    try:
        evals, evecs, info = _SYM_EIG_OP(M)
    except (RuntimeError, TypeError):
        # The op checks shape and dtype itself (in C++: Python checks on every call cost as
        # much as a 1 x 1 decomposition); on failure, say what was expected the Python way.
        _check_input(M)
        raise
    if check and bool((info != 0).any()):
        raise RuntimeError(f"sym_eig: {int((info != 0).sum())} matrices did not converge")
    return evals, evecs
