"""Posterior sampling (kron_sample, KronCurvature.sample, the fused op kron_scaled_normal),
solves and precision products: statistics against the dense definition, not bits.

The covariance checks standardise every entry of the empirical covariance by its Monte-Carlo
standard deviation, sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / S) for Gaussian samples, and
require all of them below Z_MAX; test_covariance_check_can_fail shows the same check rejects
a plausible wrong answer (the column-major vec's covariance).
"""

import math

import pytest
import scipy.stats
import torch
from torch.library import opcheck

import llama_fast as lf
from llama_fast.ops import reference

Z_MAX = 5.0
DRAWS = 40_000
SEED = 20261128


def psd(T, d, rows, gen, dtype=torch.float64, device="cpu"):
    x = torch.randn(T, rows, d, generator=gen, dtype=dtype)
    return (x.transpose(1, 2) @ x / rows).to(device)


def layer(T, o, i, rows, gen, device, low_rank=False, bias=True, dtype=torch.float64, g_rows=None):
    """(A, G, mean) of one layer with i' = i + bias, A from `rows` rows and G from `g_rows`
    (default rows + 2); with `low_rank`, each factor with fewer rows than its width is a
    LowRankFactor."""
    g_rows = rows + 2 if g_rows is None else g_rows
    a = torch.randn(T, rows, i, generator=gen, dtype=dtype).to(device)
    g = torch.randn(T, g_rows, o, generator=gen, dtype=dtype).to(device)
    A, G = lf.kfac_factors(a, g, bias=bias, low_rank=low_rank, g_scale=1.0 / g_rows)
    if low_rank:
        assert isinstance(A, lf.LowRankFactor) == (rows < i + bias)
        assert isinstance(G, lf.LowRankFactor) == (g_rows < o)
    mean = torch.randn(T, o, i + bias, generator=gen, dtype=dtype).to(device)
    return A, G, mean


def dense(A):
    return A.dense() if isinstance(A, lf.LowRankFactor) else A


def joint_covariance(layers, damping, scale):
    """Covariance of one draw flattened as [T, layer, o, i'] (tasks and layers independent)."""
    T = layers[0][1].shape[0]
    blocks = []
    for t in range(T):
        for A, G, _ in layers:
            H = reference.kron_precision_dense(dense(A), dense(G), damping, scale)[t]
            blocks.append(torch.linalg.inv(H))
    return torch.block_diag(*blocks)


def flatten_draws(samples):
    """[S, T, o, i'] per layer -> [S, T * sum(o i')] ordered task, layer, row-major vec."""
    S, T = samples[0].shape[:2]
    return torch.cat([x.reshape(S, T, -1) for x in samples], dim=2).reshape(S, -1)


def covariance_z(draws, mean, sigma):
    """Largest standardised deviation of the empirical covariance (known mean) from sigma."""
    centred = draws - mean
    emp = centred.T @ centred / draws.shape[0]
    var = torch.diagonal(sigma)
    sd = torch.sqrt((var[:, None] * var[None, :] + sigma ** 2) / draws.shape[0])
    return float(((emp - sigma).abs() / sd).max())


def mean_z(draws, mean, sigma):
    return float(((draws.mean(0) - mean).abs() / torch.sqrt(torch.diagonal(sigma) / draws.shape[0])).max())


def check_statistics(layers, samples, damping, scale):
    sigma = joint_covariance(layers, damping, scale).cpu()
    draws = flatten_draws([x.double().cpu() for x in samples])
    mean = flatten_draws([m.unsqueeze(0).double().cpu() for _, _, m in layers])[0]
    assert covariance_z(draws, mean, sigma) < Z_MAX
    assert mean_z(draws, mean, sigma) < Z_MAX
    # Whitened draws: L^T (x - m) ~ N(0, I) for H = L L^T; pooled, they must look N(0, 1).
    H = torch.linalg.inv(sigma)
    L = torch.linalg.cholesky(H)
    white = ((draws - mean) @ L).flatten().numpy()
    assert scipy.stats.kstest(white, "norm").pvalue > 1e-3


@pytest.mark.parametrize("damping", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("o,i,bias,rows", [(1, 1, False, 3), (1, 2, True, 4), (2, 2, True, 6), (3, 4, True, 2),
                                           (6, 5, False, 9), (4, 5, True, 3)])
def test_dense_statistics(device, o, i, bias, rows, damping):
    gen = torch.Generator().manual_seed(SEED + 7 * o + i)
    A, G, mean = layer(2, o, i, rows, gen, device, bias=bias)
    torch.manual_seed(SEED)
    samples = lf.kron_sample(mean, A, G, damping=damping, scale=0.7, num_samples=DRAWS)
    assert samples.shape == (DRAWS, 2, o, i + bias)
    check_statistics([(A, G, mean)], [samples], damping, 0.7)


@pytest.mark.parametrize("damping", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("o,i,bias,rows", [(1, 3, True, 1), (3, 5, True, 2), (2, 4, False, 3), (4, 5, True, 4)])
def test_low_rank_statistics(device, o, i, bias, rows, damping):
    gen = torch.Generator().manual_seed(SEED + 11 * o + i)
    A, G, mean = layer(2, o, i, rows, gen, device, low_rank=True, bias=bias)
    torch.manual_seed(SEED + 1)
    samples = lf.kron_sample(mean, A, G, damping=damping, scale=1.3, num_samples=DRAWS)
    assert samples.shape == (DRAWS, 2, o, i + bias)
    check_statistics([(A, G, mean)], [samples], damping, 1.3)


@pytest.mark.parametrize("damping", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("o,i,bias,rows,g_rows", [(5, 2, True, 6, 2), (4, 5, True, 2, 3), (6, 1, False, 3, 1)])
def test_low_rank_G_statistics(device, o, i, bias, rows, g_rows, damping):
    """G from fewer rows than its width (alone, and with a low-rank A): same statistics."""
    gen = torch.Generator().manual_seed(SEED + 13 * o + i)
    A, G, mean = layer(2, o, i, rows, gen, device, low_rank=True, bias=bias, g_rows=g_rows)
    torch.manual_seed(SEED + 2)
    samples = lf.kron_sample(mean, A, G, damping=damping, scale=0.9, num_samples=DRAWS)
    assert samples.shape == (DRAWS, 2, o, i + bias)
    check_statistics([(A, G, mean)], [samples], damping, 0.9)


def test_low_rank_with_repeated_rows(device):
    """Rank-deficient dual (two identical rows): its zero eigenvalue is dropped, not divided by."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    a[:, 2] = a[:, 0]
    g = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    A, G = lf.kfac_factors(a.to(device), g.to(device), low_rank=True)
    mean = torch.zeros(2, 3, 6, dtype=torch.float64, device=device)
    torch.manual_seed(SEED)
    samples = lf.kron_sample(mean, A, G, damping=0.3, num_samples=DRAWS)
    assert torch.isfinite(samples).all()
    check_statistics([(A, G, mean)], [samples], 0.3, 1.0)


def test_layer_lists_and_tasks_are_independent(device):
    """Dense and low-rank layers in one call; joint covariance over tasks and layers is block
    diagonal (a kernel reusing normals across layers or tasks would fail here)."""
    gen = torch.Generator().manual_seed(SEED)
    layers = [layer(3, 2, 3, 6, gen, device), layer(3, 3, 4, 2, gen, device, low_rank=True),
              layer(3, 1, 2, 4, gen, device, bias=False)]
    damping = torch.tensor([0.1, 1.0, 4.0], dtype=torch.float64, device=device)
    torch.manual_seed(SEED)
    samples = lf.kron_sample([m for *_, m in layers], [A for A, *_ in layers], [G for _, G, _ in layers],
                             damping=damping, scale=0.5, num_samples=DRAWS)
    assert [x.shape for x in samples] == [(DRAWS, 3, 2, 4), (DRAWS, 3, 3, 5), (DRAWS, 3, 1, 2)]
    check_statistics(layers, samples, damping, 0.5)
    pairs = lf.kron_sample([m for *_, m in layers], [(A, G) for A, G, _ in layers], damping=damping,
                           scale=0.5, num_samples=3)
    assert [x.shape[0] for x in pairs] == [3, 3, 3]


def test_covariance_check_can_fail(device):
    """The same statistic rejects the column-major vec's covariance (kron(A, G) instead of
    kron(G, A)): the tolerance is tight enough to see a transposed convention."""
    gen = torch.Generator().manual_seed(SEED)
    A, G, mean = layer(1, 3, 3, 6, gen, device)
    torch.manual_seed(SEED)
    samples = lf.kron_sample(mean, A, G, damping=0.2, num_samples=DRAWS)
    draws = samples.reshape(DRAWS, -1).cpu()
    # vec in column-major order of [o, i'] with the covariance kron(A, G)-based:
    wrong = torch.linalg.inv(torch.kron(A[0], G[0]).cpu() + 0.2 * torch.eye(12, dtype=torch.float64))
    right = torch.linalg.inv(torch.kron(G[0], A[0]).cpu() + 0.2 * torch.eye(12, dtype=torch.float64))
    m = mean.reshape(-1).cpu()
    assert covariance_z(draws, m, right) < Z_MAX
    assert covariance_z(draws, m, wrong) > 10 * Z_MAX


def test_float32(device):
    gen = torch.Generator().manual_seed(SEED)
    A, G, mean = layer(2, 3, 4, 3, gen, device, low_rank=False)
    A32, G32, mean32 = A.float(), G.float(), mean.float()
    torch.manual_seed(SEED)
    samples = lf.kron_sample(mean32, A32, G32, damping=0.5, num_samples=DRAWS)
    assert samples.dtype == torch.float32
    check_statistics([(A, G, mean)], [samples], 0.5, 1.0)


def test_curvature_sample_reuses_eigendecompositions(device):
    gen = torch.Generator().manual_seed(SEED)
    (A1, G1, m1), (A2, G2, m2) = layer(2, 2, 3, 5, gen, device), layer(2, 3, 6, 2, gen, device, low_rank=True)
    curv = lf.KronCurvature([A1, A2], [G1, G2], damping=0.4)
    torch.manual_seed(SEED)
    out = curv.sample([m1, m2], num_samples=DRAWS)
    check_statistics([(A1, G1, m1), (A2, G2, m2)], out, 0.4, 1.0)
    single = lf.KronCurvature(A1, G1, damping=0.4).sample(m1, num_samples=2)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 2, 2, 4)
    # kron_sample is KronCurvature(...).sample(...): the same draws from the same seed.
    torch.manual_seed(3)
    a = curv.sample([m1, m2], num_samples=4)
    torch.manual_seed(3)
    b = lf.kron_sample([m1, m2], [A1, A2], [G1, G2], damping=0.4, num_samples=4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_gradient_flows_to_mean_only(device):
    gen = torch.Generator().manual_seed(SEED)
    A, G, mean = layer(2, 2, 3, 2, gen, device, low_rank=True)
    mean.requires_grad_()
    A.rows.requires_grad_()
    w = torch.randn(5, 2, 2, 4, dtype=torch.float64, generator=gen).to(device)
    (lf.kron_sample(mean, A, G, damping=0.1, num_samples=5) * w).sum().backward()
    torch.testing.assert_close(mean.grad, w.sum(0))
    assert A.rows.grad is None


# ---- seeds and generators ---------------------------------------------------------------------

def small_problem(device, low_rank=False):
    gen = torch.Generator().manual_seed(SEED)
    return layer(2, 3, 4, 2, gen, device, low_rank=low_rank)


@pytest.mark.parametrize("low_rank", [False, True])
def test_same_seed_same_samples(device, low_rank):
    A, G, mean = small_problem(device, low_rank)
    torch.manual_seed(123)
    a = lf.kron_sample(mean, A, G, damping=0.3, num_samples=7)
    b = lf.kron_sample(mean, A, G, damping=0.3, num_samples=7)
    torch.manual_seed(123)
    c = lf.kron_sample(mean, A, G, damping=0.3, num_samples=7)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)  # the generator advanced


def test_explicit_generator_is_honoured(device):
    A, G, mean = small_problem(device)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gen = torch.Generator(device=device).manual_seed(99)
        draws.append(lf.kron_sample(mean, A, G, damping=0.3, num_samples=5, generator=gen))
    assert torch.equal(draws[0], draws[1])  # torch.manual_seed does not touch it
    other = lf.kron_sample(mean, A, G, damping=0.3, num_samples=5,
                           generator=torch.Generator(device=device).manual_seed(100))
    assert not torch.equal(draws[0], other)
    # ... and it is the generator that advances, not the default one.
    torch.manual_seed(5)
    state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state()
    lf.kron_sample(mean, A, G, damping=0.3, num_samples=5, generator=torch.Generator(device=device).manual_seed(1))
    after = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state()
    assert torch.equal(state, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_normals_are_standard(device, dtype):
    """The fused op alone: output / (s mu lambda + delta)^(-1/2) is N(0, 1) (KS), across two
    layers and a per-task damping."""
    gen = torch.Generator().manual_seed(SEED)
    eA = [torch.rand(3, 5, generator=gen, dtype=dtype).to(device) * 4, torch.rand(3, 2, generator=gen, dtype=dtype).to(device)]
    eG = [torch.rand(3, 4, generator=gen, dtype=dtype).to(device), torch.rand(3, 3, generator=gen, dtype=dtype).to(device) * 9]
    eA[0][0, 0] = -1e-7  # negative round-off: clamped to 0
    damping = torch.tensor([0.1, 1.0, 5.0], dtype=dtype, device=device)
    torch.manual_seed(SEED)
    out = torch.ops.llama_fast.kron_scaled_normal(eA, eG, damping, 0.8, 3001, None)
    z = []
    for o, a, g in zip(out, eA, eG):
        assert o.shape == (3001, 3, g.shape[1], a.shape[1]) and o.dtype == dtype
        std = (0.8 * g.clamp_min(0).unsqueeze(-1) * a.clamp_min(0).unsqueeze(-2) + damping[:, None, None]).rsqrt()
        z.append((o / std).flatten())
    z = torch.cat(z).double().cpu()
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # Every element is drawn: none left at zero (and in float64 no two equal).
    assert (z != 0).all()
    if dtype == torch.float64:
        assert z.unique().numel() == z.numel()


def test_cpu_draws_do_not_depend_on_thread_count():
    """The CPU op draws fixed chunks of the output (several here, across two layers) with one
    generator each, in parallel: one thread and two give the same samples from the same seed."""
    eA = [torch.rand(2, 300), torch.rand(2, 7)]
    eG = [torch.rand(2, 64), torch.rand(2, 5)]
    damping = torch.tensor([0.5, 2.0])
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(SEED)
            draws.append(torch.ops.llama_fast.kron_scaled_normal(eA, eG, damping, 1.0, 5, None))
    finally:
        torch.set_num_threads(threads)
    assert draws[0][0].numel() > 2 * 16384  # more than two chunks
    for one, two in zip(*draws):
        assert torch.equal(one, two)


def test_op_opcheck(device):
    """Schema and fake-tensor checks. test_autograd_registration is left out (the op has no
    autograd formula by design: its inputs are eigenvalues treated as constants, and the
    wrappers detach them), and so is test_aot_dispatch_dynamic, which compares the op's
    outputs between an eager and a compiled call: two calls of a random op draw different
    normals (the op is tagged nondeterministic_seeded)."""
    eA = [torch.rand(2, 3, dtype=torch.float64, device=device), torch.rand(2, 1, dtype=torch.float64, device=device)]
    eG = [torch.rand(2, 2, dtype=torch.float64, device=device), torch.rand(2, 4, dtype=torch.float64, device=device)]
    damping = torch.tensor([0.5, 1.0], dtype=torch.float64, device=device)
    op = torch.ops.llama_fast.kron_scaled_normal.default
    for gen in (None, torch.Generator(device=device).manual_seed(0)):
        opcheck(op, (eA, eG, damping, 1.5, 3, gen), test_utils=("test_schema", "test_faketensor"))
    assert torch.Tag.nondeterministic_seeded in op.tags


def test_op_bad_input(device):
    eA, eG = [torch.rand(2, 3, device=device)], [torch.rand(2, 2, device=device)]
    damping = torch.ones(2, device=device)
    with pytest.raises(RuntimeError, match="num_samples must be >= 0"):
        torch.ops.llama_fast.kron_scaled_normal(eA, eG, damping, 1.0, -1, None)
    with pytest.raises(RuntimeError, match="must have shape"):
        torch.ops.llama_fast.kron_scaled_normal(eA, [torch.rand(3, 2, device=device)], damping, 1.0, 1, None)
    empty = torch.ops.llama_fast.kron_scaled_normal(eA, eG, damping, 1.0, 0, None)
    assert empty[0].shape == (0, 2, 2, 3)


# ---- solve and precision products -------------------------------------------------------------

@pytest.mark.parametrize("low_rank", ["none", "A", "G", "both"])
def test_solve_and_matvec_match_dense(device, low_rank):
    gen = torch.Generator().manual_seed(SEED)
    rows, g_rows = {"none": (7, 5), "A": (2, 5), "G": (7, 2), "both": (2, 2)}[low_rank]
    layers = [layer(3, 3, 5, rows, gen, device, low_rank=True, g_rows=g_rows), layer(3, 2, 2, 4, gen, device)]
    damping = torch.tensor([0.05, 0.7, 3.0], dtype=torch.float64, device=device)
    curv = lf.KronCurvature([A for A, *_ in layers], [G for _, G, _ in layers], damping=damping, scale=1.4)
    V = [torch.randn(4, *m.shape, generator=gen, dtype=torch.float64).to(device) for *_, m in layers]
    solved, product = curv.solve(V), curv.precision_matvec(V)
    for (A, G, _), v, x, y in zip(layers, V, solved, product):
        torch.testing.assert_close(x, reference.kron_solve(v, dense(A), dense(G), damping, 1.4), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(y, reference.kron_precision_matvec(v, dense(A), dense(G), damping, 1.4),
                                   rtol=1e-10, atol=1e-10)
    for v, back in zip(V, curv.solve(curv.precision_matvec(V))):
        torch.testing.assert_close(back, v, rtol=1e-9, atol=1e-10)
    # A single [T, o, i'] tensor for a one-layer curvature.
    one = lf.KronCurvature(layers[0][0], layers[0][1], damping=damping, scale=1.4)
    torch.testing.assert_close(one.solve(V[0][0]), solved[0][0])
    torch.testing.assert_close(one.precision_matvec(V[0][0]), product[0][0])


# ---- bad input --------------------------------------------------------------------------------

def test_bad_input(device):
    A, G, mean = small_problem(device)
    with pytest.raises(ValueError, match=r"mean must have shape \[T=2, o=3, i'=5\]"):
        lf.kron_sample(mean[:, :, :4], A, G, damping=0.3)
    with pytest.raises(ValueError, match=r"mean\[1\] must have shape"):
        lf.kron_sample([mean, mean], [A, A], [G, G[:, :2, :2]], damping=0.3)
    with pytest.raises(ValueError, match="one tensor per layer"):
        lf.kron_sample(mean, [A, A], [G, G], damping=0.3)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        lf.kron_sample(mean, A, G, damping=0.3, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        lf.kron_sample(mean, A, G, damping=0.3, num_samples=2.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be positive"):
            lf.kron_sample(mean, A, G, damping=bad)
    with pytest.raises(ValueError, match="damping must be positive"):
        lf.kron_sample(mean, A, G, damping=torch.tensor([1.0, 0.0], dtype=torch.float64, device=device), check=True)
    with pytest.raises(ValueError, match="mean must have the factors' dtype"):
        lf.kron_sample(mean.float(), A, G, damping=0.3)
    with pytest.raises(ValueError, match="G has dtype"):
        lf.kron_sample(mean, A, G.float(), damping=0.3)
    with pytest.raises(TypeError, match=r"mean\[0\] must be a torch.Tensor"):
        lf.kron_sample([mean.tolist()], [A], [G], damping=0.3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        lf.kron_sample(mean, A, G, damping=0.3, generator=5)
    curv = lf.KronCurvature(A, G, damping=0.3)
    with pytest.raises(ValueError, match=r"V must have shape \[\.\.\., T=2, o=3, i'=5\]"):
        curv.solve(mean.mT)
    with pytest.raises(ValueError, match=r"V must have shape"):
        curv.precision_matvec(mean[0])


def test_generator_on_other_device_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to put the generator elsewhere")
    A, G, mean = small_problem("cpu")
    with pytest.raises(ValueError, match="generator is on"):
        lf.kron_sample(mean, A, G, damping=0.3, generator=torch.Generator(device="cuda"))


# ---- CUDA only --------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_graph_capture_replays_new_draws():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    gen = torch.Generator().manual_seed(SEED)
    eA = [torch.rand(4, 33, generator=gen).cuda(), torch.rand(4, 7, generator=gen).cuda()]
    eG = [torch.rand(4, 5, generator=gen).cuda(), torch.rand(4, 3, generator=gen).cuda()]
    damping = torch.full((4,), 0.5, device="cuda")
    op = torch.ops.llama_fast.kron_scaled_normal
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(eA, eG, damping, 1.0, 2, None)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(eA, eG, damping, 1.0, 200, None)
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append([x.clone() for x in out])
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[1][1], draws[2][1])
    std = [(g.unsqueeze(-1) * a.unsqueeze(-2) + 0.5).rsqrt() for a, g in zip(eA, eG)]
    z = torch.cat([(x / s).flatten() for d in draws for x, s in zip(d, std)]).double().cpu()
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_zero_width_layers_sample_their_empty_mean(rng):
    """A 0-wide factor makes a 0-dimensional posterior: its samples are [S, T, o, 0] (or
    [S, T, 0, i']); the other layers draw exactly what they draw alone (a reshape error before)."""
    A, G = psd(2, 3, 5, rng), psd(2, 2, 5, rng)
    mean = torch.randn(2, 2, 3, generator=rng, dtype=torch.float64)
    empty_A, empty_G = torch.zeros(2, 0, 0, dtype=torch.float64), torch.zeros(2, 0, 0, dtype=torch.float64)
    alone = lf.kron_sample(mean, A, G, 0.5, num_samples=3, generator=torch.Generator().manual_seed(1))
    drawn = lf.kron_sample([mean, torch.zeros(2, 2, 0, dtype=torch.float64), torch.zeros(2, 0, 3, dtype=torch.float64)],
                           [A, empty_A, A], [G, G, empty_G], 0.5, num_samples=3,
                           generator=torch.Generator().manual_seed(1), check=True)
    assert [tuple(x.shape) for x in drawn] == [(3, 2, 2, 3), (3, 2, 2, 0), (3, 2, 0, 3)]
    torch.testing.assert_close(drawn[0], alone)
    assert lf.kron_sample(torch.zeros(2, 2, 0, dtype=torch.float64), empty_A, G, 0.5, num_samples=4).shape == (4, 2, 2, 0)


def test_check_refuses_factors_that_are_not_psd(rng):
    A, G = psd(2, 3, 5, rng), psd(2, 2, 5, rng)
    mean = torch.zeros(2, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="^G must be positive semi-definite"):
        lf.kron_sample(mean, A, -G, 0.5, check=True)

