"""kron_sample: Gaussian posterior samples ``phi ~ N(phi_i, H_i^-1)`` for every task and layer.

Per layer ``E = Q_G [Z * (s * mu lambda^T + delta)^(-1/2)] Q_A^T`` (docs/ops.md, "Conventions") with Z
iid N(0, 1). The compiled op ``torch.ops.llama_fast.kron_scaled_normal`` draws Z and applies the
eigenvalue scaling for all layers at once (one fused kernel: Philox from torch's CUDA generator
on the GPU, torch's CPU generator on the CPU); the two rotations are batched matmuls
(``KronCurvature.sample``). With PyTorch's row-major vec, ``vec(E)`` has covariance ``H^-1``.
"""

import torch

from .curvature import KronCurvature

__all__ = ["kron_sample"]


@torch.library.register_fake("llama_fast::kron_scaled_normal")
def _scaled_normal_fake(evals_A, evals_G, damping, scale, num_samples, generator=None):
    return [damping.new_empty(num_samples, damping.shape[0], g.shape[-1], a.shape[-1])
            for a, g in zip(evals_A, evals_G)]


def kron_sample(mean, A, G=None, damping=1.0, scale=1.0, num_samples=1, generator=None, *, check=False):
    """Samples ``mean + E`` with ``vec(E) ~ N(0, H^-1)``, ``H = s * (G (x) A) + delta * I``.

    Args:
        mean: ``[T, o, i']`` (the homogeneous weight ``[W, b]`` of each task), or a list with
            one per layer.
        A, G: Kronecker factors as for :func:`llama_fast.kron_logdet` (``A [T, i', i']``, may
            be a :class:`~llama_fast.LowRankFactor`; ``G [T, o, o]``, may be one too), lists of them, or ``A``
            a list of ``(A, G)`` pairs (then pass ``damping`` etc. by keyword).
        damping: ``delta > 0``, a float or a per-task tensor ``[T]``.
        scale: ``s > 0``.
        num_samples: S >= 1.
        generator: a ``torch.Generator`` on the factors' device; default: the device's default
            generator (seeded by ``torch.manual_seed``).
        check: validate factors and tensor damping (symmetry, finiteness, positivity; syncs).

    Returns:
        ``[S, T, o, i']`` (a list per layer for list input), differentiable with respect to
        ``mean`` (reparameterisation: d sample / d mean is the identity). The factors, damping
        and scale are treated as constants for sampling: no gradient flows to them.

    This builds a :class:`~llama_fast.KronCurvature` (eigendecompositions) and calls its
    ``sample``; build one yourself to draw repeatedly from the same posterior.
    """
    with torch.no_grad():
        curvature = KronCurvature(A, G, damping=damping, scale=scale, check=check)
    return curvature.sample(mean, num_samples=num_samples, generator=generator)
