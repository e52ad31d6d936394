"""Argument checks shared by the op wrappers: errors that name the argument and what was expected."""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(x, name: str, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    return x


def check_same(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """All tensors share the first one's dtype and device."""
    first, first_name = tensors[0], names[0]
    for x, name in zip(tensors[1:], names[1:]):
        if x.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")


def check_finite(x: torch.Tensor, name: str) -> None:
    # One host sync; only done when the caller asks for it (check_finite=True).
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_symmetric(M: torch.Tensor, name: str) -> None:
    """M equals its transpose up to rounding (one host sync)."""
    if M.numel() == 0:
        return   # 0 x 0 matrices (or none): symmetric; max() has nothing to reduce
    tol = 100 * torch.finfo(M.dtype).eps * max(1.0, float(M.abs().max()))
    if float((M - M.transpose(-1, -2)).abs().max()) > tol:
        raise ValueError(f"{name} must be symmetric (M == M^T up to {tol:.2g})")


def per_layer(value, layers: int, name: str) -> list:
    """A scalar setting broadcast to every layer, or a sequence with one entry per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise ValueError(f"{name} has {len(value)} entries but there are {layers} layers")
        return list(value)
    return [value] * layers


def check_psd(evals: torch.Tensor, name: str) -> None:
    """Eigenvalues ``[..., d]`` of symmetric matrices that are positive semi-definite up to
    rounding: none below ``-10 * d * eps`` times the matrix's largest |eigenvalue| (numpy's
    matrix_rank tolerance, with a margin). One host sync."""
    if evals.numel() == 0:
        return
    d = evals.shape[-1]
    tol = (10 * d * torch.finfo(evals.dtype).eps * evals.abs().amax(-1)).reshape(-1)
    low = evals.amin(-1).reshape(-1)
    bad = low < -tol
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be positive semi-definite, but {int(bad.sum())} of its {bad.numel()} "
                         f"matrices have a negative eigenvalue (matrix {first}: {float(low[first]):.3g}, "
                         f"tolerance {float(tol[first]):.2g})")


def scale_tensor(value, name: str):
    """``value`` if it is a tensor that requires grad (a scale to differentiate through), as a
    finite, positive 0-dim tensor; None for a number or a constant tensor (used as a float)."""
    if not (isinstance(value, torch.Tensor) and value.requires_grad):
        return None
    if value.dim() != 0 or not value.is_floating_point():
        raise ValueError(f"{name} must be a number or a 0-dim float tensor, got {value.dtype} "
                         f"{tuple(value.shape)}")
    if not bool(torch.isfinite(value) & (value > 0)):
        raise ValueError(f"{name} must be positive and finite, got {float(value.detach())}")
    return value
