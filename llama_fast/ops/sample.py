"""kron_sample: Gaussian posterior samples ``phi ~ N(phi_i, H_i^-1)`` for every task and layer.

Per layer ``E = Q_G [Z * (s * mu lambda^T + delta)^(-1/2)] Q_A^T`` (docs/ops.md, "Conventions") with Z
iid N(0, 1). The compiled op ``torch.ops.llama_fast.kron_scaled_normal`` draws Z and applies the
eigenvalue scaling for all layers at once (one fused kernel: Philox from torch's CUDA generator
on the GPU, torch's CPU generator on the CPU); the two rotations are batched matmuls
(``KronCurvature.sample``). With PyTorch's row-major vec, ``vec(E)`` has covariance ``H^-1``.
"""

import torch

from .curvature import KronCurvature
from .kfac import _as_layer_lists
from .logdet import _check_psd_evals, _width

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
        damping: ``delta > 0``: a float, a per-task tensor ``[T]``, or per layer a sequence of
            L floats or a tensor ``[T, L]``.
        scale: ``s > 0`` (a tensor is used as a constant: no gradient flows to it here).
        num_samples: S >= 1.
        generator: a ``torch.Generator`` on the factors' device; default: the device's default
            generator (seeded by ``torch.manual_seed``).
        check: validate factors (symmetry, finiteness, positive semi-definiteness) and tensor
            damping (positivity); ``ValueError`` naming the argument otherwise. Syncs.

    Returns:
        ``[S, T, o, i']`` (a list per layer for list input), differentiable with respect to
        ``mean`` (reparameterisation: d sample / d mean is the identity). The factors, damping
        and scale are treated as constants for sampling: no gradient flows to them.

    This builds a :class:`~llama_fast.KronCurvature` (eigendecompositions) and calls its
    ``sample``; build one yourself to draw repeatedly from the same posterior.
    """
    if isinstance(scale, torch.Tensor):
        scale = float(scale.detach())   # a constant for sampling, as documented above
    A_list, G_list, single = _as_layer_lists(A, G, names=("A", "G"))
    kept = [l for l in range(len(A_list)) if _width(A_list[l]) and _width(G_list[l])]
    if len(kept) == len(A_list):
        return _sample(mean, A_list, G_list, damping, scale, num_samples, generator, check)
    # A layer with a 0-wide factor has a 0-dimensional posterior: its samples are its (empty)
    # mean; the op's [-1, d, d] view of a 0 x 0 factor is undefined, so it is left out.
    means = [mean] if isinstance(mean, torch.Tensor) and single else list(mean)
    if len(means) != len(A_list):
        raise ValueError(f"mean has {len(means)} entries but there are {len(A_list)} layers")
    out = [None] * len(A_list)
    if kept:
        drawn = _sample([means[l] for l in kept], [A_list[l] for l in kept], [G_list[l] for l in kept],
                        _kept_damping(damping, kept, len(A_list)), scale, num_samples, generator, check)
        for l, x in zip(kept, drawn):
            out[l] = x
    for l in set(range(len(A_list))) - set(kept):
        out[l] = means[l].unsqueeze(0).expand(int(num_samples), *means[l].shape).clone()
    return out[0] if single else out


def _kept_damping(damping, kept, layers):
    """The damping of the layers in ``kept``: per-layer values (L floats, or [T, L]) are
    selected, a shared one passes as it is."""
    if isinstance(damping, (list, tuple)) and len(damping) == layers:
        return [damping[l] for l in kept]
    if isinstance(damping, torch.Tensor) and damping.dim() == 2:
        return damping[:, kept]
    return damping


def _sample(mean, A_list, G_list, damping, scale, num_samples, generator, check):
    with torch.no_grad():
        curvature = KronCurvature(A_list, G_list, damping=damping, scale=scale, check=check)
        if check:
            _check_psd_evals(curvature.evals_A, curvature.evals_G, A_list, G_list)
    return curvature.sample(mean, num_samples=num_samples, generator=generator)
