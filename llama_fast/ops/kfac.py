"""kfac_factors: batched Kronecker factors of every K-FAC layer of every task in one op call.

The compiled op is torch.ops.llama_fast.kfac_factors (a grouped kernel over a list of
layers, its autograd formula registered in C++: csrc/autograd/kfac_factors.cpp); this module adds its
fake (meta) implementation for torch.compile and the user-facing wrapper with argument
checking.
"""

import math
from collections.abc import Sequence

import torch

from . import _checks
from .lowrank import LowRankFactor

__all__ = ["kfac_factors"]


@torch.library.register_fake("llama_fast::kfac_factors")
def _kfac_factors_fake(a, g, bias, a_scale, g_scale):
    A = [x.new_empty(x.shape[0], x.shape[2] + int(b), x.shape[2] + int(b)) for x, b in zip(a, bias)]
    G = [y.new_empty(y.shape[0], y.shape[2], y.shape[2]) for y in g]
    return A, G


_KFAC_OP = torch.ops.llama_fast.kfac_factors.default


def _as_layer_lists(a, g, names=("a", "g")):
    """(a_list, g_list, single) from a tensor pair, two lists, or one list of (a, g) pairs;
    `names` are the caller's argument names, for error messages."""
    na, ng = names
    if isinstance(a, (torch.Tensor, LowRankFactor)):
        if not isinstance(g, (torch.Tensor, LowRankFactor)):
            raise TypeError(f"{ng} must be a torch.Tensor when {na} is one, got {type(g).__name__}")
        return [a], [g], True
    if not isinstance(a, Sequence):
        raise TypeError(f"{na} must be a tensor, a list of tensors or a list of ({na}, {ng}) pairs, "
                        f"got {type(a).__name__}")
    if g is None:
        pairs = list(a)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise TypeError(f"{na} given without {ng} must be a list of ({na}, {ng}) pairs, one per layer")
        return [p[0] for p in pairs], [p[1] for p in pairs], False
    if not isinstance(g, Sequence) or len(g) != len(a):
        raise ValueError(f"{ng} must be a list with one tensor per layer of {na} ({len(a)})")
    return list(a), list(g), False


def _check_layers(a_list, g_list, check_finite: bool) -> None:
    names = []
    for l, (a, g) in enumerate(zip(a_list, g_list)):
        a_name, g_name = (f"a[{l}]", f"g[{l}]") if len(a_list) > 1 else ("a", "g")
        for x, name in ((a, a_name), (g, g_name)):
            _checks.check_tensor(x, name, ndim=3)
            if x.shape[1] < 1:
                raise ValueError(f"{name} needs at least one row (shape [T, N>=1, features]), got {tuple(x.shape)}")
            if x.shape[0] != a_list[0].shape[0]:
                raise ValueError(f"{name} has T={x.shape[0]} tasks but {names[0] if names else a_name} has T={a_list[0].shape[0]}")
            if check_finite:
                _checks.check_finite(x, name)
            names.append(name)
    _checks.check_same([x for pair in zip(a_list, g_list) for x in pair], names)


def _scales(value, layers, name, rows=None) -> list[float]:
    scales = _checks.per_layer(value, layers, name)
    out = []
    for l, s in enumerate(scales):
        if s is None and rows is not None:
            s = 1.0 / rows[l]
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"{name} must be finite, got {s}")
        out.append(s)
    return out


def kfac_factors(a, g=None, bias=True, a_scale=None, g_scale=1.0, *, check_finite=False,
                 low_rank=False):
    """Kronecker factors A and G of K-FAC for a batch of tasks.

    ``A = a_scale * abar^T abar`` with ``abar = [a, 1]`` when ``bias`` (the column of ones is
    never materialised), default ``a_scale = 1/N``; ``G = g_scale * g^T g``.

    Args:
        a: layer inputs ``[T, N, i]``, or a list of them (one per layer), or a list of
            ``(a, g)`` pairs (then ``g`` is omitted).
        g: pre-activation output gradients ``[T, M, o]``, or a list of them.
        bias: whether each layer has a bias (bool, or one per layer).
        a_scale: scale of A; ``None`` means ``1/N`` of that layer (float or one per layer).
        g_scale: scale of G (float or one per layer). A scale may be a 0-dim tensor; one that
            requires grad gets its gradient (``low_rank=False`` only; ``ValueError`` otherwise).
        check_finite: raise ``ValueError`` if an input holds NaN or Inf (one host sync).
        low_rank: hand over every A built from fewer rows than its width (N < i + bias), and
            every G built from fewer rows than its width (M < o), as a
            :class:`~llama_fast.LowRankFactor` instead of a dense matrix; kron_logdet,
            KronCurvature and kron_sample then take its eigenvalues from the small dual Gram
            matrix (computed in the same launch) and give its null space exactly delta.

    Returns:
        ``(A, G)`` with ``A [T, i+bias, i+bias]`` and ``G [T, o, o]``; for list input, two
        lists. All layers are computed in one kernel launch.
    """
    a_list, g_list, single = _as_layer_lists(a, g)
    if not a_list:
        return [], []
    if check_finite:
        _check_layers(a_list, g_list, check_finite)
    grad_scales = _grad_scales(a_scale, g_scale, len(a_list), low_rank)
    if grad_scales is not None:
        A, G = kfac_factors(a_list, g_list, bias, *grad_scales[:2])
        A, G = ([x if t is None else t * x for x, t in zip(F, ts)] for F, ts in zip((A, G), grad_scales[2:]))
        return (A[0], G[0]) if single else (A, G)
    try:
        A, G = _grouped_factors(a_list, g_list, bias, a_scale, g_scale, low_rank)
    except (RuntimeError, TypeError, AttributeError, IndexError, ZeroDivisionError):
        # The op checks its arguments too (in C++, without the cost of Python checks on
        # every call); on failure, name the offending argument the Python way.
        _check_layers(a_list, g_list, False)
        raise
    return (A[0], G[0]) if single else (A, G)


def _grad_scales(a_scale, g_scale, layers, low_rank):
    """None, unless a scale is a tensor that requires grad: then the op runs with scale 1 there
    (it takes floats) and the factor is multiplied by the tensor afterwards, so the gradient
    reaches it. Returns (a_scales, g_scales for the op, a_tensors, g_tensors), per layer."""
    a_scales = _checks.per_layer(a_scale, layers, "a_scale")
    g_scales = _checks.per_layer(g_scale, layers, "g_scale")
    a_tensors = [_checks.scale_tensor(s, "a_scale") for s in a_scales]
    g_tensors = [_checks.scale_tensor(s, "g_scale") for s in g_scales]
    if all(t is None for t in a_tensors + g_tensors):
        return None
    if low_rank:
        raise ValueError("a_scale and g_scale tensors that require grad need low_rank=False: a "
                         "LowRankFactor holds its scale as a float")
    # An A scale of None means 1/N; a tensor one replaces it, so its op scale is 1.
    a_op = [1.0 if t is not None else s for s, t in zip(a_scales, a_tensors)]
    g_op = [1.0 if t is not None else s for s, t in zip(g_scales, g_tensors)]
    return a_op, g_op, a_tensors, g_tensors


def _grouped_factors(a_list, g_list, bias, a_scale, g_scale, low_rank):
    """One grouped op call for all layers; low-rank A's and G's come back as LowRankFactor."""
    layers = len(a_list)
    biases = [bool(b) for b in _checks.per_layer(bias, layers, "bias")]
    a_scales = _scales(a_scale, layers, "a_scale", rows=[x.shape[1] for x in a_list])
    g_scales = _scales(g_scale, layers, "g_scale")
    if not low_rank:
        A, G = _KFAC_OP(a_list, g_list, biases, a_scales, g_scales)
        return list(A), list(G)
    thin = [x.shape[1] < x.shape[2] + b for x, b in zip(a_list, biases)]
    thin_g = [x.shape[1] < x.shape[2] for x in g_list]
    # A low-rank layer's slot in the grouped launch computes its dual Gram matrix instead:
    # the rows transposed, without the bias column, give s * a a^T; abar's ones add s.
    a_launch = [x.transpose(1, 2) if t else x for x, t in zip(a_list, thin)]
    b_launch = [b and not t for b, t in zip(biases, thin)]
    g_launch = [x.transpose(1, 2) if t else x for x, t in zip(g_list, thin_g)]
    A, G = _KFAC_OP(a_launch, g_launch, b_launch, a_scales, g_scales)
    A = [LowRankFactor(x, b, s, dual=K + s if b else K) if t else K
         for x, b, s, t, K in zip(a_list, biases, a_scales, thin, A)]
    G = [LowRankFactor(x, False, s, dual=K) if t else K for x, s, t, K in zip(g_list, g_scales, thin_g, G)]
    return A, G
