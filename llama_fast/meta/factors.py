"""LLAMA's curvature terms of a batch of tasks: K-FAC factors from the captured rows, one
log-det over all tasks' factors, and the mc Fisher's label noise."""

import torch

from ..ops import reference
from ..ops.kfac import kfac_factors
from ..ops.logdet import kron_logdet
from ..ops.lowrank import LowRankFactor


def curvature_factors(a, g, biases, backend):
    """Per-layer (A, G) lists from the captured rows: one batched call for all layers. A factor
    built from fewer rows than its width (the sinusoid's 40-wide G's from 10 support points,
    Conv-4's 577-wide A's from 45 or 245 patch rows) comes as a LowRankFactor whose dual Gram
    matrix the same launch computes (backend "kernels"; "reference" is dense)."""
    if backend == "kernels":
        return kfac_factors(a, g, bias=biases, low_rank=True)
    return reference.kfac_factors(a, g, bias=biases)


def _cat_factor(parts):
    """One layer's factor of all tasks from its per-call parts (tensors or LowRankFactors)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if not isinstance(first, LowRankFactor):
        return torch.cat(parts)
    return LowRankFactor(torch.cat([x.rows for x in parts]), first.bias, first.scale,
                         dual=torch.cat([x.dual() for x in parts]))


def curvature_logdet(factors, damping, scale, backend):
    """Per-task log det H of all T tasks from the per-call factor lists, in one kron_logdet:
    its eigendecompositions then run over a batch of matrices (the CPU kernel runs one matrix
    per thread, which beats LAPACK's own threading on one 577 x 577 matrix at a time)."""
    A = [_cat_factor(parts) for parts in zip(*(A for A, _ in factors))]
    G = [_cat_factor(parts) for parts in zip(*(G for _, G in factors))]
    if backend == "kernels":
        return kron_logdet(A, G, damping=damping, scale=scale)
    return reference.kron_logdet(A, G, damping=damping, scale=scale)


def mc_noise(loss, samples, tasks, rows, out_shape, like, generator):
    """[T, m, N, C] noise that the mc Fisher turns into sampled labels (Gumbel for CE, normal
    for the Gaussian), drawn outside vmap so that `generator` governs it."""
    shape = (tasks, samples, rows, *out_shape)
    if loss == "mse":
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    exponential = -torch.log(u.clamp_min(tiny))
    return -torch.log(exponential.clamp_min(tiny))
