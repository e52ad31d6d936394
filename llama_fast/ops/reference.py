"""Pure-torch oracle for every llama_fast op: the test reference and the benchmark baseline.

Each function computes the same math as its compiled counterpart (docs/ops.md, "Conventions") in the
plainest way torch allows, and takes the same arguments.
"""

import torch
from torch.func import functional_call

__all__ = ["kfac_factors", "sym_eig", "kron_logdet", "kron_logdet_dense", "chol_logdet", "kron_sample",
           "kron_sample_from_eigs", "kron_precision_dense", "kron_solve", "kron_precision_matvec",
           "functional_covariance", "maml_loop"]


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


def sym_eig(M):
    """Symmetric eigendecomposition: torch.linalg.eigh."""
    return torch.linalg.eigh(M)


def _layers(A, G):
    """Per-layer lists of dense factors (a LowRankFactor is materialised)."""
    if isinstance(A, torch.Tensor) or hasattr(A, "dense"):
        A, G = [A], [G]
    elif G is None:
        A, G = [p[0] for p in A], [p[1] for p in A]
    return [_dense(x) for x in A], [_dense(x) for x in G]


def _damping(damping, T, like):
    """[T], or [T, L] for per-layer deltas (a sequence of floats or a [T, L] tensor)."""
    if isinstance(damping, (list, tuple)):
        return torch.tensor([float(x) for x in damping], dtype=like.dtype, device=like.device).expand(T, -1)
    if isinstance(damping, torch.Tensor):
        return damping.to(like) if damping.dim() == 2 else damping.to(like).expand(T)
    return torch.full((T,), float(damping), dtype=like.dtype, device=like.device)


def _layer(delta, l):
    return delta if delta.dim() == 1 else delta[:, l]


def _cholesky_logdet(M):
    return 2 * torch.linalg.cholesky(M).diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _factored(A_list, G_list, delta, scale):
    total = 0
    for l, (A, G) in enumerate(zip(A_list, G_list)):
        sG = scale * G
        delta_l = _layer(delta, l)
        mean_A = A.diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_G = sG.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = torch.sqrt(mean_A / mean_G)
        eye_A = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        eye_G = torch.eye(G.shape[-1], dtype=A.dtype, device=A.device)
        A_damped = A + (delta_l.sqrt() / pi)[:, None, None] * eye_A
        G_damped = sG + (pi * delta_l.sqrt())[:, None, None] * eye_G
        total = total + G.shape[-1] * _cholesky_logdet(A_damped) + A.shape[-1] * _cholesky_logdet(G_damped)
    return total


def kron_logdet(A, G=None, damping=1.0, scale=1.0, mode="exact"):
    """"exact": sum_l sum_{p,q} log(s * mu_p * lambda_q + delta) with eigenvalues from
    torch.linalg.eigvalsh (negative round-off eigenvalues clamped to 0), differentiable through
    torch's eigh. "factored": Martens & Grosse's pi-damped Kronecker factors, by
    torch.linalg.cholesky."""
    A_list, G_list = _layers(A, G)
    delta = _damping(damping, A_list[0].shape[0], A_list[0])
    if mode == "factored":
        return _factored(A_list, G_list, delta, scale)
    if mode != "exact":
        raise ValueError(f"unsupported mode {mode!r}")
    total = 0
    for l, (A_l, G_l) in enumerate(zip(A_list, G_list)):
        lam = torch.linalg.eigvalsh(A_l).clamp_min(0)
        mu = torch.linalg.eigvalsh(G_l).clamp_min(0)
        h = scale * mu.unsqueeze(-1) * lam.unsqueeze(-2) + _layer(delta, l)[:, None, None]
        total = total + torch.log(h).sum(dim=(-1, -2))
    return total


def kron_logdet_dense(A, G, damping=1.0, scale=1.0):
    """The definition itself for one layer: logdet(s * kron(G, A) + delta * I), per task
    (small factors only: the Kronecker product is materialised)."""
    delta = _damping(damping, A.shape[0], A)
    eye = torch.eye(A.shape[-1] * G.shape[-1], dtype=A.dtype, device=A.device)
    H = torch.stack([scale * torch.kron(G[t], A[t]) + delta[t] * eye for t in range(A.shape[0])])
    return torch.linalg.slogdet(H).logabsdet


def chol_logdet(M):
    """log det of SPD matrices via torch.linalg.cholesky."""
    return _cholesky_logdet(M)


def _dense(factor):
    # A LowRankFactor (llama_fast.ops.lowrank) is materialised here: the oracle has no low-rank path.
    return factor.dense() if hasattr(factor, "dense") else factor


def kron_sample_from_eigs(mean, evals_A, evecs_A, evals_G, evecs_G, damping=1.0, scale=1.0,
                          num_samples=1, generator=None):
    """One layer from given eigendecompositions: mean + Q_G [Z * (s mu lambda^T + delta)^(-1/2)]
    Q_A^T with Z = torch.randn([S, T, o, i']) (negative round-off eigenvalues clamped to 0)."""
    T = mean.shape[0]
    delta = _damping(damping, T, mean)
    std = (scale * evals_G.clamp_min(0).unsqueeze(-1) * evals_A.clamp_min(0).unsqueeze(-2)
           + delta[:, None, None]).rsqrt()
    Z = torch.randn((num_samples, *std.shape), generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + evecs_G @ (Z * std) @ evecs_A.mT


def kron_sample(mean, A, G=None, damping=1.0, scale=1.0, num_samples=1, generator=None):
    """Samples mean + E, vec(E) ~ N(0, (s G (x) A + delta I)^-1): torch.linalg.eigh of each
    factor, torch.randn and two matmuls per layer. Same argument forms as llama_fast's."""
    A_list, G_list = _layers(A, G)
    means = [mean] if isinstance(mean, torch.Tensor) else list(mean)
    delta = _damping(damping, means[0].shape[0], means[0])
    out = []
    for l, (m, A_l, G_l) in enumerate(zip(means, A_list, G_list)):
        lam, Q_A = torch.linalg.eigh(A_l)
        mu, Q_G = torch.linalg.eigh(G_l)
        out.append(kron_sample_from_eigs(m, lam, Q_A, mu, Q_G, _layer(delta, l), scale, num_samples, generator))
    return out[0] if isinstance(mean, torch.Tensor) else out


def kron_precision_dense(A, G, damping=1.0, scale=1.0):
    """H = s * kron(G, A) + delta * I per task, [T, o*i', o*i'] (small layers only)."""
    A, G = _dense(A), _dense(G)
    delta = _damping(damping, A.shape[0], A)
    eye = torch.eye(A.shape[-1] * G.shape[-1], dtype=A.dtype, device=A.device)
    return torch.stack([scale * torch.kron(G[t], A[t]) + delta[t] * eye for t in range(A.shape[0])])


def kron_solve(V, A, G, damping=1.0, scale=1.0):
    """H^-1 v for one layer, V [..., T, o, i']: torch.linalg.solve against the dense H."""
    H = kron_precision_dense(A, G, damping, scale)
    flat = V.reshape(*V.shape[:-2], -1, 1)
    return torch.linalg.solve(H, flat).reshape(V.shape)


def kron_precision_matvec(V, A, G, damping=1.0, scale=1.0):
    """H v for one layer, V [..., T, o, i']: the dense H times row-major vec(V)."""
    H = kron_precision_dense(A, G, damping, scale)
    return (H @ V.reshape(*V.shape[:-2], -1, 1)).reshape(V.shape)


def functional_covariance(rotated, evals_G, evals_A, residual, damping, scale):
    """The functional_covariance op in plain torch: per layer the weights
    ``1 / (s mu_p lambda_q + delta)`` ``[D, T, g, a]`` and one einsum over the eigenvector pairs,
    plus ``residual / delta``. Same arguments: ``rotated[l] [T, M, K, g, a]``, ``evals_G[l]
    [T, g]``, ``evals_A[l] [T, a]``, ``residual [L, T, M, K, K]`` or None (symmetric: only its
    lower triangle is read, as LAPACK's ``uplo="L"``), ``damping [D, T, L]``; returns
    ``[D, T, M, K, K]``."""
    if residual is not None:
        residual = residual.tril() + residual.tril(-1).mT
    total = 0
    for l, (J, mu, lam) in enumerate(zip(rotated, evals_G, evals_A)):
        delta = damping[:, :, l]
        weight = 1.0 / (scale * mu.clamp_min(0)[:, :, None] * lam.clamp_min(0)[:, None, :]
                        + delta[:, :, None, None])
        total = total + torch.einsum("tmkpq,dtpq,tmjpq->dtmkj", J, weight, J)
        if residual is not None:
            total = total + residual[l] / delta[:, :, None, None, None]
    return total


def _mean_loss(out, y, loss):
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, y)
    return torch.nn.functional.mse_loss(out, y)


def maml_loop(model, batch, *, loss, inner_lr, inner_steps=1, first_order=False):
    """MAML's meta-loss the way learn2learn/higher compute it: a Python loop over tasks, each
    adapted with plain ``torch.autograd.grad`` (``create_graph`` unless first order).

    Every parameter is adapted except BatchNorm's; the model runs as it is (for the meta_step
    semantics it must be in train mode, its BatchNorm layers without running statistics, and
    without active Dropout). Returns the mean query loss, differentiable w.r.t. the model.
    """
    norms = {name for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    params = dict(model.named_parameters())
    fast_names = [k for k in params if k.rpartition(".")[0] not in norms]
    losses = []
    for t in range(batch.support_x.shape[0]):
        fast = {k: params[k] for k in fast_names}
        for _ in range(inner_steps):
            out = functional_call(model, {**params, **fast}, (batch.support_x[t],))
            grads = torch.autograd.grad(_mean_loss(out, batch.support_y[t], loss), list(fast.values()),
                                        create_graph=not first_order)
            fast = {k: v - inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        out = functional_call(model, {**params, **fast}, (batch.query_x[t],))
        losses.append(_mean_loss(out, batch.query_y[t], loss))
    return torch.stack(losses).mean()
