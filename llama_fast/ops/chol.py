"""chol_logdet: batched Cholesky factorisation and log-determinant of SPD matrices.

The compiled op torch.ops.llama_fast.chol_logdet returns (logdet, L, info); info is 0, or the
first non-positive pivot + 1 (logdet is NaN there), instead of an exception in the kernel.
Backward: d logdet / dM = M^-1, from the factor (cholesky_inverse); its autograd formula is
registered in C++ (csrc/autograd/chol_logdet.cpp), this module adds the fake (meta) implementation
for torch.compile and the user-facing wrapper.
"""

import torch

from . import _checks

__all__ = ["chol_logdet"]


@torch.library.register_fake("llama_fast::chol_logdet")
def _chol_fake(M):
    return M.new_empty(M.shape[:-2]), M.new_empty(M.shape), M.new_empty(M.shape[:-2], dtype=torch.int32)


def chol_logdet(M: torch.Tensor, *, check: bool = False) -> torch.Tensor:
    """``log det M`` of symmetric positive definite ``M [..., d, d]`` via Cholesky.

    With ``check=True`` raises ``ValueError`` for a matrix that is not positive definite
    (syncs); otherwise such a matrix gets NaN.
    """
    _checks.check_tensor(M, "M")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"M must have shape [..., d, d] (square), got {tuple(M.shape)}")
    if M.shape[-1] == 0:
        # log det of a 0 x 0 matrix is 0 (an empty product), as torch.linalg.slogdet; the
        # empty sum keeps the result on M's graph (the op's [-1, d, d] view is undefined here).
        return M.sum((-2, -1))
    logdet, _, info = torch.ops.llama_fast.chol_logdet(M)
    if check and bool((info != 0).any()):
        raise ValueError(f"M is not positive definite ({int((info != 0).sum())} matrices)")
    return logdet
