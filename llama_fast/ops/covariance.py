"""functional_covariance: the function-space covariance ``J H^-1 J^T`` of the linearised (GLM)
Laplace predictive, for every task, input and K-FAC layer at once.

For output k at input m, layer l's weight Jacobian is ``J_k = sum_r g_{k,r} abar_r^T``
(``[o, i']``; r runs over the positions of a convolution, one for a linear layer), with ``g``
the output's gradient at the layer's pre-activation rows and ``abar`` the layer's input rows
with the bias column. With the cached eigenbases ``(U, mu)`` of G and ``(V, lambda)`` of A,
``Jh_k = U^T J_k V`` and, per layer,

    f_cov[k, j] = R[k, j] / delta + sum_{p,q} Jh_k,pq Jh_j,pq / (s mu_p lambda_q + delta)

where R is the Gram matrix of the part of J outside ``span(U) (x) span(V)`` (low-rank
factors; the precision there is delta alone). The coordinates (``project_rows``) are batched
matmuls that do not depend on delta or s; the weighted contraction is the compiled op
``torch.ops.llama_fast.functional_covariance`` (a hand-written CPU and CUDA kernel sharing
their arithmetic), which takes a grid of D dampings in one pass.
"""

import torch

from . import reference

__all__ = ["project_rows"]


@torch.library.register_fake("llama_fast::functional_covariance")
def _functional_covariance_fake(rotated, evals_G, evals_A, residual, damping, scale):
    T, M, K = rotated[0].shape[:3]
    return damping.new_empty(damping.shape[0], T, M, K, K)


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs


def _backward(ctx, grad):
    """The vector-Jacobian product of the pure-torch oracle (the same sum): a few einsums."""
    rotated, evals_G, evals_A, residual, damping, scale = ctx.inputs
    tensors = (list(rotated), list(evals_G), list(evals_A), residual, damping)

    def oracle(rotated, evals_G, evals_A, residual, damping):
        return reference.functional_covariance(rotated, evals_G, evals_A, residual, damping, scale)

    with torch.enable_grad():
        _, vjp = torch.func.vjp(oracle, *tensors)
        grads = vjp(grad)
    return (*grads, None)


torch.library.register_autograd("llama_fast::functional_covariance", _backward, setup_context=_setup_context)


def project_rows(a, g, basis_G, basis_A, low_rank):
    """Jacobian coordinates of one layer for T tasks, M inputs and K outputs.

    Args:
        a: input rows ``[T, M, R, i']`` (bias column included).
        g: output-gradient rows ``[T, M, K, R, o]``.
        basis_G, basis_A: ``(U [T, o, g], mu [T, g])`` and ``(V [T, i', a], lambda [T, a])``:
            orthonormal eigenvectors (columns; zero columns for dropped directions).
        low_rank: ``(A's basis is partial, G's basis is partial)``.

    Returns:
        ``(Jh [T, M, K, g, a], R [T, M, K, K] or None)``: ``Jh_k = U^T J_k V`` and the Gram
        matrix of ``J - U Jh V^T`` (None where both bases are complete).
    """
    (U, _), (V, _) = basis_G, basis_A
    T, M, K, R, o = g.shape
    gU = torch.bmm(g.reshape(T, -1, o), U).view(T, M, K, R, -1)          # [T, M, K, R, g]
    aV = torch.bmm(a.reshape(T, -1, a.shape[-1]), V).view(T, M, R, -1)    # [T, M, R, a]
    Jh = torch.bmm(gU.transpose(-1, -2).reshape(T * M, -1, R), aV.reshape(T * M, R, -1))
    Jh = Jh.view(T, M, K, gU.shape[-1], aV.shape[-1])
    low_A, low_G = low_rank
    if not (low_A or low_G):
        return Jh, None
    # J - P_G J P_A = (I - P_G) J + P_G J (I - P_A): two Frobenius-orthogonal parts, each a sum
    # over positions of outer products u_r v_r^T, computed from the projected rows directly
    # (not as ||J||^2 - ||Jh||^2, which cancels when J lies almost inside the bases).
    residual = 0
    if low_G:
        g_out = g - (gU.reshape(T, -1, gU.shape[-1]) @ U.mT).view(g.shape)
        residual = residual + _outer_sum_gram(g_out, a)
    if low_A:
        a_out = a - (aV.reshape(T, -1, aV.shape[-1]) @ V.mT).view(a.shape)
        residual = residual + _outer_sum_gram(gU, a_out)
    return Jh, residual


def _outer_sum_gram(u, v):
    """``<sum_r u_k,r v_r^T, sum_r u_j,r v_r^T>`` for u ``[T, M, K, R, o]``, v ``[T, M, R, i]``:
    ``sum_{r,s} (u_k,r . u_j,s) (v_r . v_s)``, ``[T, M, K, K]``."""
    C = v @ v.mT                                   # [T, M, R, R]
    Cu = C.unsqueeze(2) @ u                        # [T, M, K, R, o]
    return torch.einsum("tmkro,tmjro->tmkj", u, Cu)
