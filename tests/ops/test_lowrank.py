"""The low-rank path: A built from fewer rows than its width, never materialised, must give
the dense path's log-determinant and gradients."""

import pytest
import torch

import llama_fast as lf


def layer_inputs(T, N, i, o, rng, device, dtype=torch.float64):
    a = torch.randn(T, N, i, generator=rng, dtype=dtype).to(device)
    g = torch.randn(T, 3 * N, o, generator=rng, dtype=dtype).to(device)
    return a, g


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_only_when_fewer_rows_than_width(device, bias, rng):
    thin, g1 = layer_inputs(2, 5, 64, 4, rng, device)
    tall, g2 = layer_inputs(2, 80, 6, 4, rng, device)
    (A_thin, A_tall), _ = lf.kfac_factors([thin, tall], [g1, g2], bias=bias, low_rank=True)
    assert isinstance(A_thin, lf.LowRankFactor) and isinstance(A_tall, torch.Tensor)
    assert A_thin.shape == (2, 64 + bias, 64 + bias) and A_thin.rank_bound == 5
    dense, _ = lf.kfac_factors(thin, g1, bias=bias)
    torch.testing.assert_close(A_thin.dense(), dense)
    # Its dual Gram matrix comes from the grouped launch: the rows' own formula must agree.
    from_rows = lf.LowRankFactor(thin, bias, A_thin.scale).dual()
    torch.testing.assert_close(A_thin.dual(), from_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,i,o", [(1, 8, 3), (5, 64, 5), (6, 40, 1)])
def test_logdet_equals_dense_path(device, N, i, o, bias, rng):
    a, g = layer_inputs(3, N, i, o, rng, device)
    damping = torch.tensor([0.05, 0.5, 2.0], dtype=torch.float64, device=device)
    A_low, G = lf.kfac_factors(a, g, bias=bias, low_rank=True)
    A_dense, _ = lf.kfac_factors(a, g, bias=bias)
    assert isinstance(A_low, lf.LowRankFactor)
    low = lf.kron_logdet(A_low, G, damping=damping, scale=1.7)
    dense = lf.kron_logdet(A_dense, G, damping=damping, scale=1.7)
    torch.testing.assert_close(low, dense, rtol=1e-10, atol=1e-9)


def test_gradients_equal_dense_path(device, rng):
    """Meta-gradients reach the activations and the damping the same way on both paths."""
    a, g = layer_inputs(2, 4, 30, 3, rng, device)
    grads = []
    for low_rank in (True, False):
        a_ = a.clone().requires_grad_()
        g_ = g.clone().requires_grad_()
        damping = torch.tensor([0.1, 1.0], dtype=torch.float64, device=device, requires_grad=True)
        A, G = lf.kfac_factors(a_, g_, low_rank=low_rank)
        (lf.kron_logdet(A, G, damping=damping) * torch.tensor([1.0, -0.5], dtype=torch.float64, device=device)).sum().backward()
        grads.append((a_.grad, g_.grad, damping.grad))
    for low, dense in zip(*grads):
        torch.testing.assert_close(low, dense, rtol=1e-8, atol=1e-9)


def test_gradcheck_through_low_rank(device, rng):
    a, g = layer_inputs(2, 3, 7, 2, rng, device)
    a.requires_grad_()

    def logdet(a):
        A, G = lf.kfac_factors(a, g, low_rank=True)
        return lf.kron_logdet(A, G, damping=0.3)

    assert torch.autograd.gradcheck(logdet, (a,))


def test_mixed_layers_and_curvature_cache(device, rng):
    layers = [layer_inputs(2, 5, 40, 6, rng, device), layer_inputs(2, 50, 9, 6, rng, device)]
    A, G = lf.kfac_factors([x for x, _ in layers], [y for _, y in layers], low_rank=True)
    curv = lf.KronCurvature(A, G, damping=0.2, scale=2.0)
    assert curv.layers == 2 and curv.tasks == 2
    assert curv.evecs_A[0].shape == (2, 5, 5)  # the dual Gram's eigenbasis
    assert curv.evecs_A[1].shape == (2, 10, 10)
    dense = [x.dense() if isinstance(x, lf.LowRankFactor) else x for x in A]
    torch.testing.assert_close(curv.logdet(), lf.kron_logdet(dense, G, damping=0.2, scale=2.0))


@pytest.mark.parametrize("thin_a", [False, True])
def test_low_rank_G(device, thin_a, rng):
    """G built from fewer rows than its width (alone or with a low-rank A): a LowRankFactor
    whose log-det and gradients (through the a and g rows) equal the dense factors'."""
    a = torch.randn(2, 3 if thin_a else 12, 6, generator=rng, dtype=torch.float64).to(device)
    g = torch.randn(2, 4, 9, generator=rng, dtype=torch.float64).to(device)
    A, G = lf.kfac_factors(a, g, low_rank=True, g_scale=0.5)
    assert isinstance(G, lf.LowRankFactor) and G.rank_bound == 4 and G.width == 9 and not G.bias
    assert isinstance(A, lf.LowRankFactor) == thin_a
    torch.testing.assert_close(G.dense(), lf.kfac_factors(a, g, g_scale=0.5)[1])
    torch.testing.assert_close(G.dual(), 0.5 * g @ g.mT)
    dense = lambda x: x.dense() if isinstance(x, lf.LowRankFactor) else x
    torch.testing.assert_close(lf.kron_logdet(A, G, damping=0.3, scale=1.7),
                               lf.kron_logdet(dense(A), dense(G), damping=0.3, scale=1.7))

    def logdet(a, g, dense_path):
        A, G = lf.kfac_factors(a, g, low_rank=not dense_path, g_scale=0.5)
        return lf.kron_logdet(A, G, damping=0.3, scale=1.7)
    a.requires_grad_(), g.requires_grad_()
    torch.autograd.gradcheck(lambda a, g: logdet(a, g, False), (a, g))
    got = torch.autograd.grad(logdet(a, g, False).sum(), (a, g))
    expected = torch.autograd.grad(logdet(a, g, True).sum(), (a, g))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y)


def test_low_rank_G_with_a_bias_column_is_rejected(device, rng):
    a, g = layer_inputs(1, 2, 10, 3, rng, device)
    A, G = lf.kfac_factors(a, g, low_rank=True)
    with pytest.raises(ValueError, match=r"\bG\b is a LowRankFactor with bias=True"):
        lf.kron_logdet(G, A, damping=1.0)
