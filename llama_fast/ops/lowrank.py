"""Low-rank K-FAC factors: A = s * abar^T abar held through its N rows, N < width (and
likewise a G = s * g^T g from fewer rows than its width, without a bias column).

With 1-shot and 5-shot support sets the input factor of a wide layer is built from fewer rows
than its width (Conv-4's 577-wide conv factors from 45 or 245 rows at 5-way 1-shot, a 1601-wide
linear head from 5), so it has rank <= N. Its nonzero eigenvalues are those of the small dual
Gram matrix ``K = s * abar abar^T`` ([T, N, N]); the other ``width - N`` are exact zeros, each
contributing ``log(delta)`` per eigenvalue of G to the log-determinant. Gradients reach the rows
through K (the zero eigenvalues have none), so the width x width matrix is never formed.
"""

import torch

__all__ = ["LowRankFactor"]


class LowRankFactor:
    """A Kronecker factor ``A = scale * abar^T abar`` ([T, width, width]) kept as its rows.

    Args:
        rows: ``a`` of shape ``[T, N, i]``, N < i + bias.
        bias: whether ``abar = [a, 1]`` (the column of ones is not stored).
        scale: ``s`` (kfac_factors' ``a_scale``; ``1/N`` by default there).
        dual: ``K`` itself when already computed (else :meth:`dual` forms it from the rows).
    """

    def __init__(self, rows: torch.Tensor, bias: bool, scale: float, dual: torch.Tensor | None = None):
        self.rows = rows
        self.bias = bool(bias)
        self.scale = float(scale)
        self._dual = dual   # K, when the caller computed it already (kfac_factors' launch)

    @property
    def width(self) -> int:
        return self.rows.shape[-1] + int(self.bias)

    @property
    def rank_bound(self) -> int:
        return self.rows.shape[-2]

    @property
    def shape(self) -> torch.Size:
        T = self.rows.shape[0]
        return torch.Size((T, self.width, self.width))

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def dual(self) -> torch.Tensor:
        """``K = scale * abar abar^T`` [T, N, N]: the same nonzero eigenvalues as A."""
        if self._dual is not None:
            return self._dual
        K = self.rows @ self.rows.transpose(-1, -2)
        if self.bias:
            K = K + 1.0
        return self.scale * K

    def rows_bar(self) -> torch.Tensor:
        """The rows ``[T, N, width]``, with the bias column of ones appended when ``bias``."""
        if not self.bias:
            return self.rows
        return torch.cat([self.rows, self.rows.new_ones(*self.rows.shape[:-1], 1)], dim=-1)

    def dense(self) -> torch.Tensor:
        """The width x width factor itself (for tests and small layers)."""
        rows = self.rows_bar()
        return self.scale * rows.transpose(-1, -2) @ rows

    def __repr__(self) -> str:
        return (f"LowRankFactor(T={self.shape[0]}, width={self.width}, rows={self.rank_bound}, "
                f"bias={self.bias}, scale={self.scale:g})")
