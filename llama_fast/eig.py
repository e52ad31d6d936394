"""sym_eig: batched symmetric eigendecomposition, a drop-in for torch.linalg.eigh.

The compiled op torch.ops.llama_fast.sym_eig also returns an info tensor (0: converged,
1: not converged) instead of raising inside the kernel, so CUDA calls never sync the host.
"""

import torch

from . import _checks

__all__ = ["sym_eig"]


@torch.library.register_fake("llama_fast::sym_eig")
def _sym_eig_fake(M):
    return (
        M.new_empty(M.shape[:-1]),
        M.new_empty(M.shape),
        M.new_empty(M.shape[:-2], dtype=torch.int32),
    )


def eigh_input_grad(evals, evecs, d_evals, d_evecs):
    """Gradient of (evals, evecs) = eigh(M) with respect to symmetric M (as torch's eigh)."""
    inner = torch.zeros_like(evecs)
    if d_evecs is not None:
        proj = evecs.transpose(-1, -2) @ d_evecs
        gap = evals.unsqueeze(-2) - evals.unsqueeze(-1)  # gap[i, j] = w_j - w_i
        gap.diagonal(dim1=-2, dim2=-1).fill_(1)
        inner = 0.5 * (proj - proj.transpose(-1, -2)) / gap
        inner.diagonal(dim1=-2, dim2=-1).zero_()
    if d_evals is not None:
        inner = inner + torch.diag_embed(d_evals)
    return evecs @ inner @ evecs.transpose(-1, -2)


def _setup_context(ctx, inputs, output):
    evals, evecs, _ = output
    ctx.save_for_backward(evals, evecs)


def _backward(ctx, d_evals, d_evecs, _d_info):
    evals, evecs = ctx.saved_tensors
    return eigh_input_grad(evals, evecs, d_evals, d_evecs)


torch.library.register_autograd("llama_fast::sym_eig", _backward, setup_context=_setup_context)


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
    _checks.check_tensor(M, "M")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must have shape [..., d, d] (square), got {tuple(M.shape)}")
    if check:
        _checks.check_finite(M, "M")
        _checks.check_symmetric(M, "M")
    evals, evecs, info = torch.ops.llama_fast.sym_eig(M)
    if check and bool((info != 0).any()):
        raise RuntimeError(f"sym_eig: {int((info != 0).sum())} matrices did not converge")
    return evals, evecs
