"""functional_covariance: the op against its pure-torch oracle, gradients, opcheck, and
KronCurvature.functional_covariance against the dense definition J H^-1 J^T (explicit
Kronecker precision, explicit Jacobians from the rows), on dense and low-rank factors."""

import pytest
import torch
from torch.library import opcheck

import llama_fast as lf
from llama_fast.ops import reference

op = torch.ops.llama_fast.functional_covariance


def op_inputs(gen, T, M, K, dims, D, residual, dtype=torch.float64, device="cpu"):
    """Random op inputs: per layer rotated [T, M, K, g, a] and eigenvalues (some negative
    round-off and exact zeros), residual Grams (PSD) or None, damping [D, T, L] > 0."""
    rotated, evals_G, evals_A = [], [], []
    for g, a in dims:
        rotated.append(torch.randn(T, M, K, g, a, generator=gen, dtype=dtype))
        mu = torch.rand(T, g, generator=gen, dtype=dtype) * 3
        lam = torch.rand(T, a, generator=gen, dtype=dtype) * 2
        mu[:, 0] = -1e-9   # round-off below zero: clamped
        lam[:, -1] = 0.0
        evals_G.append(mu)
        evals_A.append(lam)
    R = None
    if residual:
        x = torch.randn(len(dims), T, M, K, K + 1, generator=gen, dtype=dtype)
        R = x @ x.mT
    damping = torch.rand(D, T, len(dims), generator=gen, dtype=dtype) + 0.05
    move = (lambda t: t.to(device))
    return ([move(x) for x in rotated], [move(x) for x in evals_G], [move(x) for x in evals_A],
            None if R is None else move(R), move(damping))


SHAPES = [  # (T, M, K, [(g, a) per layer], D)
    (1, 1, 1, [(1, 1)], 1),
    (2, 3, 4, [(3, 5)], 1),
    (3, 2, 5, [(4, 7), (5, 1), (2, 9)], 3),
    (2, 4, 1, [(6, 33), (1, 65)], 2),
    (1, 2, 20, [(20, 41)], 2),
    (2, 1, 3, [(64, 37)], 1),
    (1, 37, 2, [(3, 4), (2, 5)], 4),    # one task: the CPU kernel splits its inputs into runs
]


@pytest.mark.parametrize("T,M,K,dims,D", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_matches_oracle(T, M, K, dims, D, residual, dtype, device, rng):
    inputs = op_inputs(rng, T, M, K, dims, D, residual, dtype, device)
    scale = 0.7
    out = op(*inputs, scale)
    expected = reference.functional_covariance(*inputs, scale)
    assert out.shape == (D, T, M, K, K)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    torch.testing.assert_close(out, out.mT, rtol=0, atol=0)


def test_wide_layer_takes_dampings_in_tiles(rng):
    """A layer of more than 2^20 eigenvector pairs: the CPU kernel holds the weights of one
    damping at a time (float64: float32 sums of a million terms differ from the oracle's
    by their own round-off, ~1e-4)."""
    inputs = op_inputs(rng, 1, 2, 2, [(1024, 1025), (3, 4)], 3, True)
    torch.testing.assert_close(op(*inputs, 0.7), reference.functional_covariance(*inputs, 0.7),
                               rtol=1e-12, atol=1e-12)


def test_many_layers_and_outputs(device, rng):
    """More layers than one CUDA launch takes (16) and more output pairs than one pass of the
    CUDA kernel's threads (K = 48: 1176 pairs)."""
    inputs = op_inputs(rng, 2, 2, 48, [(2, 3)] * 18, 2, True, torch.float64, device)
    torch.testing.assert_close(op(*inputs, 1.3), reference.functional_covariance(*inputs, 1.3),
                               rtol=1e-12, atol=1e-10)


def test_nan_propagates(device, rng):
    rotated, evals_G, evals_A, R, damping = op_inputs(rng, 2, 2, 3, [(3, 4)], 1, False, device=device)
    evals_A[0][1, 2] = float("nan")
    out = op(rotated, evals_G, evals_A, R, damping, 1.0)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, 0]).all()


def test_empty_inputs(device, rng):
    inputs = op_inputs(rng, 2, 0, 3, [(3, 4)], 2, True, device=device)
    assert op(*inputs, 1.0).shape == (2, 2, 0, 3, 3)


def test_gradcheck(rng):
    rotated, evals_G, evals_A, R, damping = op_inputs(rng, 2, 2, 3, [(2, 3), (3, 2)], 2, True)
    evals_G = [e.abs() + 0.1 for e in evals_G]   # away from the clamp's kink
    evals_A = [e.abs() + 0.1 for e in evals_A]
    leaves = [x.requires_grad_() for x in (*rotated, *evals_G, *evals_A, R, damping)]

    def fn(*xs):
        return op(list(xs[0:2]), list(xs[2:4]), list(xs[4:6]), xs[6], xs[7], 0.8)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_opcheck(device, rng):
    for residual in (False, True):
        inputs = op_inputs(rng, 2, 3, 2, [(3, 4), (2, 2)], 2, residual, device=device)
        opcheck(op, (*inputs, 0.5))


@pytest.mark.parametrize("bad,match", [
    (lambda r, eg, ea, R, d: (r, eg, ea, R, d[0]), "damping must have shape"),
    (lambda r, eg, ea, R, d: (r, eg[:1], ea, R, d), "evals_G"),
    (lambda r, eg, ea, R, d: (r, eg, [ea[0][:, :-1], ea[1]], R, d), r"evals_A\[0\] must have shape"),
    (lambda r, eg, ea, R, d: ([r[0].float(), r[1]], eg, ea, R, d), r"rotated\[0\] must match"),
    (lambda r, eg, ea, R, d: (r, eg, ea, R[:, :, :1], d), "residual must have shape"),
    (lambda r, eg, ea, R, d: (r, eg, ea, R, d[:, :, :1]), "layers"),
])
def test_op_rejects_bad_shapes(bad, match, rng):
    inputs = op_inputs(rng, 2, 3, 2, [(3, 4), (2, 2)], 2, True)
    with pytest.raises(RuntimeError, match=match):
        op(*bad(*inputs), 1.0)


# ---- KronCurvature.functional_covariance against J H^-1 J^T ----------------------------------

def layer_rows(gen, T, M, K, R, o, i, bias):
    """Jacobian rows of one layer: a [T, M, R, i'] (ones column when bias), g [T, M, K, R, o]."""
    a = torch.randn(T, M, R, i, generator=gen, dtype=torch.float64)
    if bias:
        a = torch.cat([a, torch.ones(T, M, R, 1, dtype=torch.float64)], dim=-1)
    return a, torch.randn(T, M, K, R, o, generator=gen, dtype=torch.float64)


def dense_covariance(curvature, a_list, g_list):
    """sum_l J_l H_l^-1 J_l^T with J from the rows and H the explicit Kronecker precision."""
    total = 0
    for l, (a, g) in enumerate(zip(a_list, g_list)):
        A, G = curvature.factors_A[l], curvature.factors_G[l]
        H = reference.kron_precision_dense(A, G, curvature.damping, curvature.scale)   # [T, P, P]
        J = torch.einsum("tmkro,tmri->tmkoi", g, a).flatten(-2)                        # [T, M, K, P]
        total = total + J @ torch.linalg.solve(H[:, None], J.mT)
    return total


def factors(gen, T, o, i, rows, bias, low_rank):
    a = torch.randn(T, rows, i, generator=gen, dtype=torch.float64)
    g = torch.randn(T, rows + 1, o, generator=gen, dtype=torch.float64)
    return lf.kfac_factors(a, g, bias=bias, low_rank=low_rank, g_scale=1.0 / (rows + 1))


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("R", [1, 4])
def test_curvature_matches_dense_definition(low_rank, R, device, rng):
    T, M, K = 2, 3, 4
    specs = [(5, 6, 3, True), (3, 4, 9, False), (6, 2, 2, True)]   # (o, i, factor rows, bias)
    A, G, a_rows, g_rows = [], [], [], []
    for o, i, rows, bias in specs:
        A_l, G_l = factors(rng, T, o, i, rows, bias, low_rank)
        A.append(A_l)
        G.append(G_l)
        a, g = layer_rows(rng, T, M, K, R, o, i, bias)
        a_rows.append(a)
        g_rows.append(g)
    if low_rank:
        assert isinstance(A[0], lf.LowRankFactor) and isinstance(G[2], lf.LowRankFactor)
    damping = torch.tensor([0.3, 2.0], dtype=torch.float64)
    curvature = lf.KronCurvature(A, G, damping=damping, scale=1.7)
    expected = dense_covariance(curvature, a_rows, g_rows)
    move = (lambda xs: [x.to(device) for x in xs])
    on_device = lf.KronCurvature([x.to(device) if isinstance(x, torch.Tensor) else
                                  lf.LowRankFactor(x.rows.to(device), x.bias, x.scale) for x in A],
                                 [x.to(device) if isinstance(x, torch.Tensor) else
                                  lf.LowRankFactor(x.rows.to(device), x.bias, x.scale) for x in G],
                                 damping=damping.to(device), scale=1.7)
    out = on_device.functional_covariance(move(a_rows), move(g_rows))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-10)


def curvature_and_rows(gen, low_rank=True, T=2, M=3, K=3):
    A0, G0 = factors(gen, T, 4, 5, 3, True, low_rank)
    A1, G1 = factors(gen, T, 3, 2, 6, False, low_rank)
    rows = [layer_rows(gen, T, M, K, 2, 4, 5, True), layer_rows(gen, T, M, K, 2, 3, 2, False)]
    return lf.KronCurvature([A0, A1], [G0, G1], damping=0.5, scale=1.0), [r[0] for r in rows], [r[1] for r in rows]


@pytest.mark.parametrize("low_rank", [False, True])
def test_grid_equals_recomputation(low_rank, rng):
    curvature, a, g = curvature_and_rows(rng, low_rank)
    grid = [0.01, 0.3, 7.0]
    out = curvature.functional_covariance(a, g, damping_grid=grid)
    for d, delta in enumerate(grid):
        torch.testing.assert_close(out[d], curvature.with_damping(delta).functional_covariance(a, g),
                                   rtol=1e-13, atol=0)
    # per-layer grid [D, T, L] against the dense definition with per-layer deltas
    per_layer = torch.tensor([[[0.2, 3.0], [1.0, 0.05]]], dtype=torch.float64)
    out = curvature.functional_covariance(a, g, damping_grid=per_layer)[0]
    expected = sum(_one_layer_dense(curvature, l, per_layer[0, :, l], a[l], g[l]) for l in range(2))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def _one_layer_dense(curvature, l, delta, a, g):
    H = reference.kron_precision_dense(curvature.factors_A[l], curvature.factors_G[l], delta, curvature.scale)
    J = torch.einsum("tmkro,tmri->tmkoi", g, a).flatten(-2)
    return J @ torch.linalg.solve(H[:, None], J.mT)


def test_coordinates_reused_for_scale(rng):
    curvature, a, g = curvature_and_rows(rng)
    coordinates = curvature.jacobian_coordinates(a, g)
    torch.testing.assert_close(curvature.functional_covariance(coordinates=coordinates, scale=4.0),
                               curvature.with_scale(4.0).functional_covariance(a, g), rtol=1e-13, atol=0)


def test_psd_and_monotone(rng):
    curvature, a, g = curvature_and_rows(rng)
    grid = [1e-3, 1e-2, 0.1, 1.0, 10.0]
    out = curvature.functional_covariance(a, g, damping_grid=grid)
    assert (torch.linalg.eigvalsh(out) > -1e-10).all()
    diff = out[:-1] - out[1:]    # larger delta: smaller covariance (Loewner order)
    assert (torch.linalg.eigvalsh(diff) > -1e-10).all()
    small, large = (curvature.with_scale(s).functional_covariance(a, g) for s in (0.5, 5.0))
    assert (torch.linalg.eigvalsh(small - large) > -1e-10).all()
    # delta -> infinity: the posterior collapses onto its mean
    assert curvature.functional_covariance(a, g, damping_grid=[1e300]).abs().max() < 1e-290


def test_gradient_to_rows(rng):
    curvature, a, g = curvature_and_rows(rng, T=1, M=2, K=2)
    leaves = [x.clone().requires_grad_() for x in (*a, *g)]
    assert torch.autograd.gradcheck(lambda *xs: curvature.functional_covariance(list(xs[:2]), list(xs[2:])),
                                    leaves)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a, g: (a[0], g), ValueError, "a must be a tensor"),
    (lambda a, g: ([a[0][:, :, :, :-1], a[1]], g), ValueError, r"a\[0\] must have shape"),
    (lambda a, g: (a, [g[0], g[1][:, :, :2]]), ValueError, r"g\[1\] must have shape"),
    (lambda a, g: ([a[0].float(), a[1]], g), ValueError, r"a\[0\] must have the factors' dtype"),
    (lambda a, g: ([a[0].to("meta"), a[1]], g), ValueError, r"a\[0\] must have the factors' dtype"),
    (lambda a, g: (a, [g[0], g[1].clone().index_fill_(0, torch.tensor([0]), float("nan"))]),
     ValueError, r"g\[1\] contains NaN"),
    (lambda a, g: ([a[0].clone().fill_(float("inf")), a[1]], g), ValueError, r"a\[0\] contains NaN or Inf"),
])
def test_rejects_bad_rows(mutate, error, match, rng):
    curvature, a, g = curvature_and_rows(rng)
    with pytest.raises(error, match=match):
        curvature.functional_covariance(*mutate(a, g))


def test_unchecked_rows_propagate_nan(rng):
    """check_finite=False: a NaN row reaches the covariance of its own task and input as NaN
    (no error), the others' covariances are unchanged."""
    curvature, a, g = curvature_and_rows(rng)
    clean = curvature.functional_covariance(a, g)
    g = [g[0], g[1].clone()]
    g[1][1, 0] = float("nan")                      # task 1, input 0
    out = curvature.functional_covariance(a, g, check_finite=False)
    assert torch.isnan(out[1, 0]).all()
    keep = torch.ones(out.shape[:2], dtype=torch.bool)
    keep[1, 0] = False
    torch.testing.assert_close(out[keep], clean[keep], rtol=0, atol=0)


@pytest.mark.parametrize("grid,match", [
    ([-0.1], "positive"),
    ([0.0, 1.0], "positive"),
    ([float("inf")], "positive"),
    (torch.ones(2, 5, dtype=torch.float64), "damping_grid must have shape"),
    (torch.ones(2, 2, 3, dtype=torch.float64), "damping_grid must have shape"),
    (torch.ones(2, dtype=torch.float32), "dtype"),
    ([], "non-empty"),
])
def test_rejects_bad_damping_grid(grid, match, rng):
    curvature, a, g = curvature_and_rows(rng)
    with pytest.raises((ValueError, TypeError), match=match):
        curvature.functional_covariance(a, g, damping_grid=grid)


# ---- per-layer damping: every KronCurvature operation against the per-layer dense definition --

def per_layer_setup(gen, low_rank):
    curvature, a, g = curvature_and_rows(gen, low_rank)
    deltas = (0.05, 3.0)
    return lf.KronCurvature(curvature.factors_A, curvature.factors_G, damping=deltas, scale=1.3), deltas, a, g


@pytest.mark.parametrize("low_rank", [False, True])
def test_per_layer_damping(low_rank, rng):
    curvature, deltas, a, g = per_layer_setup(rng, low_rank)
    A, G = curvature.factors_A, curvature.factors_G
    T = curvature.tasks
    assert curvature.damping.shape == (T, 2)
    # log-det: the sum of each layer's own
    expected = sum(reference.kron_logdet_dense(reference._dense(A[l]), reference._dense(G[l]), deltas[l], 1.3)
                   for l in range(2))
    torch.testing.assert_close(curvature.logdet(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lf.kron_logdet(A, G, damping=deltas, scale=1.3), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference.kron_logdet(A, G, damping=deltas, scale=1.3), expected, rtol=1e-10, atol=1e-10)
    per_task = torch.tensor([[0.05, 3.0], [0.5, 0.02]], dtype=torch.float64)
    expected_t = torch.stack([sum(reference.kron_logdet_dense(reference._dense(A[l])[t:t + 1], reference._dense(G[l])[t:t + 1],
                                                              float(per_task[t, l]), 1.3)[0] for l in range(2))
                              for t in range(T)])
    torch.testing.assert_close(curvature.with_damping(per_task).logdet(), expected_t, rtol=1e-10, atol=1e-10)
    # solves, products and the functional covariance
    V = [torch.randn(3, T, *curvature.layer_shape(l), generator=rng, dtype=torch.float64) for l in range(2)]
    for l in range(2):
        torch.testing.assert_close(curvature.solve(V)[l], reference.kron_solve(V[l], A[l], G[l], deltas[l], 1.3),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(curvature.precision_matvec(V)[l],
                                   reference.kron_precision_matvec(V[l], A[l], G[l], deltas[l], 1.3), rtol=1e-10, atol=1e-10)
    expected_cov = sum(_one_layer_dense(curvature, l, torch.full((T,), deltas[l], dtype=torch.float64), a[l], g[l])
                       for l in range(2))
    torch.testing.assert_close(curvature.functional_covariance(a, g), expected_cov, rtol=1e-10, atol=1e-12)


def test_per_layer_sampling_covariance(rng):
    """Draws with per-layer deltas: each layer's empirical covariance within 5 standard errors
    of H_l^-1 with its own delta."""
    curvature, deltas, _, _ = per_layer_setup(rng, True)
    S = 40_000
    means = [torch.zeros(curvature.tasks, *curvature.layer_shape(l), dtype=torch.float64) for l in range(2)]
    draws = curvature.sample(means, num_samples=S, generator=torch.Generator().manual_seed(1))
    for l in range(2):
        x = draws[l][:, 0].flatten(1)                       # task 0, [S, P]
        emp = x.mT @ x / S
        H = reference.kron_precision_dense(curvature.factors_A[l], curvature.factors_G[l], deltas[l], 1.3)[0]
        exact = torch.linalg.inv(H)
        se = torch.sqrt((exact.diagonal().unsqueeze(-1) * exact.diagonal().unsqueeze(-2) + exact ** 2) / S)
        assert ((emp - exact).abs() / se).max() < 5


@pytest.mark.parametrize("damping,match", [
    ((0.1,), "one delta per layer: expected 2 values, got 1"),
    ((0.1, -1.0), "positive"),
    (torch.ones(2, 3, dtype=torch.float64), r"tensor of shape \[T=2\] or \[T=2, L=2\]"),
])
def test_per_layer_damping_rejects(damping, match, rng):
    curvature, _, _ = curvature_and_rows(rng)
    with pytest.raises(ValueError, match=match):
        lf.KronCurvature(curvature.factors_A, curvature.factors_G, damping=damping)
