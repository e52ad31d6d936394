"""Pure-torch oracle for every llama_fast op: the test reference and the benchmark baseline.

Each function computes the same math as its compiled counterpart (DESIGN.md section 1) in the
plainest way torch allows, and takes the same arguments.
"""

import torch

__all__ = ["kfac_factors"]


def _layer_factors(a, g, bias, a_scale, g_scale):
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    if a_scale is None:
        a_scale = 1.0 / a.shape[1]
    A = a_scale * torch.bmm(a.transpose(1, 2), a)
    G = g_scale * torch.bmm(g.transpose(1, 2), g)
    return A, G


def kfac_factors(a, g=None, bias=True, a_scale=None, g_scale=1.0):
    """K-FAC factors A = a_scale * abar^T abar, G = g_scale * g^T g (torch.cat + bmm per layer)."""
    if isinstance(a, torch.Tensor):
        return _layer_factors(a, g, bias, a_scale, g_scale)
    if g is None:
        a, g = [p[0] for p in a], [p[1] for p in a]
    layers = len(a)

    def per_layer(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * layers

    out = [
        _layer_factors(x, y, b, sa, sg)
        for x, y, b, sa, sg in zip(a, g, per_layer(bias), per_layer(a_scale), per_layer(g_scale))
    ]
    return [A for A, _ in out], [G for _, G in out]
