"""sym_eig against LAPACK (torch.linalg.eigh in float64) on hard spectra, gradients, bad input."""

import math

import pytest
import torch
from torch.library import opcheck

import llama_fast as lf

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(params=["auto", "jacobi", "lapack"])
def cpu_eig(request, monkeypatch):
    """Runs a CPU test under each CPU path (jacobi is the CUDA kernel's arithmetic; auto takes
    it for d <= 8 and LAPACK above)."""
    monkeypatch.setenv("LLAMA_FAST_CPU_EIG", request.param)
    return request.param


def random_orthogonal(d, rng):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=rng, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(spectrum, rng):
    q = random_orthogonal(spectrum.shape[-1], rng)
    return (q * spectrum) @ q.T


def spectrum(kind, d, rng):
    if kind == "spd":
        x = torch.randn(d, d + 3, generator=rng, dtype=torch.float64)
        return torch.linalg.eigvalsh(x @ x.T / d)
    if kind == "rank-deficient":  # a K-FAC factor of a 1-shot support set: rank <= 3
        w = torch.zeros(d, dtype=torch.float64)
        w[-min(3, d):] = torch.rand(min(3, d), generator=rng, dtype=torch.float64) + 0.5
        return w
    if kind == "repeated":
        return torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=torch.float64).repeat(d // 4 + 1)[:d].sort().values
    if kind == "cond-1e8":
        return torch.logspace(-8, 0, d, dtype=torch.float64)
    if kind == "indefinite":
        return torch.linspace(-3, 2, d, dtype=torch.float64)
    raise ValueError(kind)


KINDS = ["spd", "rank-deficient", "repeated", "cond-1e8", "indefinite"]


def check_decomposition(M, evals, evecs, dtype):
    """Eigenvalues within tol*||M||_2 of LAPACK's (float64); residual and orthogonality of the
    same order (tol * sqrt(d), the Frobenius norm of d columns at the rounding level)."""
    M64 = M.double().cpu()
    w, Q = evals.double().cpu(), evecs.double().cpu()
    d = M.shape[-1]
    norm = max(torch.linalg.matrix_norm(M64, ord=2).max().item(), 1e-300)
    tol = TOL[dtype]
    exact = torch.linalg.eigvalsh(M64)
    assert (w - exact).abs().max().item() <= tol * norm, "eigenvalues off"
    assert bool((w[..., 1:] >= w[..., :-1]).all()), "eigenvalues not ascending"
    rotated = Q.transpose(-1, -2) @ M64 @ Q - torch.diag_embed(w)
    assert torch.linalg.matrix_norm(rotated).max().item() <= tol * math.sqrt(d) * norm * 10
    ortho = Q.transpose(-1, -2) @ Q - torch.eye(d, dtype=torch.float64)
    assert torch.linalg.matrix_norm(ortho).max().item() <= tol * math.sqrt(d) * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 3, 5, 16, 33, 64])
def test_matches_lapack_small(device, cpu_eig, d, kind, dtype, rng):
    if device.type == "cuda" and cpu_eig != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    M = torch.stack([with_spectrum(spectrum(kind, d, rng), rng) for _ in range(3)])
    M = M.to(dtype=dtype, device=device)
    evals, evecs = lf.sym_eig(M)
    check_decomposition(M, evals, evecs, dtype)
    _, _, info = torch.ops.llama_fast.sym_eig(M)
    assert int(info.abs().sum()) == 0


@pytest.mark.parametrize("kind", ["spd", "cond-1e8", "rank-deficient"])
@pytest.mark.parametrize("d", [129, 577])
def test_matches_lapack_large(device, d, kind, rng):
    """The K-FAC factor sizes of Conv-4 (577) and a mid size, float32."""
    M = with_spectrum(spectrum(kind, d, rng), rng).float().to(device).unsqueeze(0)
    evals, evecs = lf.sym_eig(M)
    check_decomposition(M, evals, evecs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_of_wide_matrices(device, dtype, rng):
    """From 200 wide the CPU decomposes a batch matrix by matrix in parallel: every matrix of
    a mixed batch (leading dims included) must come out right and in its own slot."""
    M = torch.stack([with_spectrum(spectrum(kind, 257, rng), rng)
                     for kind in ("spd", "cond-1e8", "rank-deficient", "repeated")])
    M = M.to(dtype=dtype, device=device).reshape(2, 2, 257, 257)
    evals, evecs = lf.sym_eig(M)
    assert evals.shape == (2, 2, 257) and evecs.shape == (2, 2, 257, 257)
    check_decomposition(M.reshape(4, 257, 257), evals.reshape(4, 257), evecs.reshape(4, 257, 257), dtype)
    for b in range(4):
        torch.testing.assert_close(evals.reshape(4, 257)[b], lf.sym_eig(M.reshape(4, 257, 257)[b])[0])


def test_largest_factor_size_1601(device, rng):
    M = with_spectrum(spectrum("rank-deficient", 1601, rng), rng).to(device)
    evals, evecs = lf.sym_eig(M)
    check_decomposition(M, evals, evecs, torch.float64)


def test_jacobi_float32_mid_size(monkeypatch, rng):
    """The GPU's Jacobi arithmetic on a size that runs in global memory on the GPU."""
    monkeypatch.setenv("LLAMA_FAST_CPU_EIG", "jacobi")
    M = with_spectrum(spectrum("spd", 130, rng), rng).float().unsqueeze(0)
    evals, evecs = lf.sym_eig(M)
    check_decomposition(M, evals, evecs, torch.float32)


def dead_relu_output_factors():
    """G = g^T g of 600 tasks from 5 rows of 40 outputs, with dead units (exact zero columns)
    and scales from 1e-6 to 1e2: float32 factors on which LAPACK's syevd fails to converge
    for some tasks (element 440 of this seeded batch with MKL)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(600, 5, 40, generator=gen)
    g = g * (torch.rand(600, 5, 40, generator=gen) > 0.5) * (torch.rand(600, 1, 40, generator=gen) > 0.6)
    g = g * 10 ** (torch.rand(600, 1, 1, generator=gen) * 8 - 6)
    return g.transpose(1, 2) @ g


def test_lapack_failures_fall_back_to_jacobi():
    """Every matrix gets an accurate eigendecomposition (info 0), also where LAPACK gives up."""
    G = dead_relu_output_factors()
    evals, evecs, info = torch.ops.llama_fast.sym_eig(G)
    assert not bool(info.any())
    exact = torch.linalg.eigvalsh(G.double())
    norm = torch.linalg.matrix_norm(G.double()).unsqueeze(-1)
    assert bool(((evals.double() - exact).abs() <= TOL[torch.float32] * norm).all())
    eye = torch.eye(40, dtype=torch.float64)
    assert float((evecs.double().mT @ evecs.double() - eye).abs().max()) < 1e-5


def test_leading_dims_and_non_contiguous(device, rng):
    M = torch.stack([with_spectrum(spectrum("spd", 7, rng), rng) for _ in range(6)]).to(device)
    M = M.reshape(2, 3, 7, 7).transpose(-1, -2)  # symmetric, so the same matrices
    evals, evecs = lf.sym_eig(M)
    assert evals.shape == (2, 3, 7) and evecs.shape == (2, 3, 7, 7)
    check_decomposition(M.reshape(6, 7, 7), evals.reshape(6, 7), evecs.reshape(6, 7, 7), torch.float64)


def test_gradcheck_float64(device, rng):
    X = torch.randn(2, 5, 5, generator=rng, dtype=torch.float64).to(device).requires_grad_()

    def sign_invariant(X):
        evals, evecs = lf.sym_eig(X + X.transpose(-1, -2))
        return evals, evecs * evecs

    assert torch.autograd.gradcheck(sign_invariant, (X,))


def test_one_by_one_matrices(device, rng):
    """1 x 1 matrices skip the op (its fixed cost is all of the time there): the same values,
    layout-free eigenvectors and gradient as torch.linalg.eigh; a new tensor, not a view of M;
    integer input still rejected."""
    M = torch.randn(3, 4, 1, 1, generator=rng, dtype=torch.float64).to(device)
    X1, X2 = M.clone().requires_grad_(), M.clone().requires_grad_()
    weights = torch.randn(3, 4, 1, generator=rng, dtype=torch.float64).to(device)
    for fn, x in ((lf.sym_eig, X1), (torch.linalg.eigh, X2)):
        w, Q = fn(x)
        torch.testing.assert_close(w, M[..., 0])
        torch.testing.assert_close(Q.abs(), torch.ones_like(M))
        (w * weights).sum().backward()
    torch.testing.assert_close(X1.grad, X2.grad)
    w, _ = lf.sym_eig(M)
    w.add_(1.0)
    assert not torch.equal(w, M[..., 0])
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        lf.sym_eig(torch.ones(2, 1, 1, dtype=torch.int64, device=device))


def test_gradient_matches_torch_eigh(device, rng):
    X = torch.randn(3, 6, 6, generator=rng, dtype=torch.float64).to(device)
    X1 = X.clone().requires_grad_()
    X2 = X.clone().requires_grad_()
    weights = torch.randn(6, 6, generator=rng, dtype=torch.float64).to(device)
    for fn, x in ((lf.sym_eig, X1), (torch.linalg.eigh, X2)):
        w, Q = fn(x + x.transpose(-1, -2))
        (w.sum() + ((Q * Q) * weights).sum()).backward()
    torch.testing.assert_close(X1.grad, X2.grad)


@pytest.mark.parametrize("spectrum", [[0.0, 0.0, 0.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0],
                                      [0.5, 3.0, 3.0, 3.0, 7.0]])
def test_eigenvalue_gradient_is_finite_at_repeated_eigenvalues(device, cpu_eig, spectrum, rng):
    """Only the eigenvalues used: the eigenvector gradient is absent, not zeros divided by a zero
    gap, so the gradient is finite at exactly repeated eigenvalues (the zero matrix, the
    identity, diag(1, 1, 2), a rotated spectrum with a triple value), as torch.linalg.eigh's is.
    With weights 1 the gradient of sum(w) = trace(M) is the identity whatever the basis."""
    d = len(spectrum)
    M = torch.diag(torch.tensor(spectrum, dtype=torch.float64))
    if d > 3:
        Q = random_orthogonal(d, rng)
        M = Q @ M @ Q.T
    weights = torch.randn(d, generator=rng, dtype=torch.float64).to(device)
    x = M.to(device).clone().requires_grad_()
    (lf.sym_eig(x)[0] * weights).sum().backward()
    assert bool(torch.isfinite(x.grad).all()), x.grad
    x = M.to(device).clone().requires_grad_()
    lf.sym_eig(x)[0].sum().backward()
    torch.testing.assert_close(x.grad, torch.eye(d, dtype=torch.float64, device=device))


SCALES = {torch.float32: [1e-30, 1e-22, 1e-10, 1.0, 1e10, 1e19, 1e30],
          torch.float64: [1e-300, 1e-160, 1e-50, 1.0, 1e50, 1e155, 1e300]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [2, 5, 8, 16])
def test_eigenvalues_at_every_scale(device, cpu_eig, d, dtype, rng):
    """Uniformly tiny or huge matrices (float32 1e-30..1e30, float64 1e-300..1e300) with random,
    repeated and clustered spectra: eigenvalues within tol * ||M|| of float64 LAPACK's, and
    info 0. Unscaled, the Jacobi convergence test's sums of squares underflowed or overflowed
    and no rotation ran (34-78% of ||M|| off for float32 below ~1e-22)."""
    base = [torch.randn(d, generator=rng, dtype=torch.float64),
            torch.tensor([1.0, 1.0, -2.0, 3.0] * d, dtype=torch.float64)[:d],
            1.0 + 1e-4 * torch.randn(d, generator=rng, dtype=torch.float64)]
    for spectrum in base:
        M1 = with_spectrum(spectrum, rng)
        for scale in SCALES[dtype]:
            M = (M1 * scale).to(dtype)
            M = (0.5 * (M + M.transpose(-1, -2))).to(device)
            evals, _, info = torch.ops.llama_fast.sym_eig(M)
            exact = torch.linalg.eigvalsh(M.double().cpu())
            norm = torch.linalg.matrix_norm(M.double().cpu(), ord=2).item()
            err = (evals.double().cpu() - exact).abs().max().item()
            assert int(info) == 0 and err <= 4 * TOL[dtype] * norm, (scale, err / norm, rng.initial_seed())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("d", [3, 8, 20])
def test_non_finite_matrix_gives_nan_and_info(device, cpu_eig, d, bad, rng):
    """One NaN or inf entry: that matrix's eigenvalues are NaN with info 1 (as LAPACK's info),
    the other matrices of the batch are unaffected, on the Jacobi and LAPACK paths alike."""
    M = torch.stack([with_spectrum(torch.rand(d, generator=rng, dtype=torch.float64) + 0.1, rng)
                     for _ in range(2)]).float()
    M[1, 0, d - 1] = bad
    M[1, d - 1, 0] = bad
    evals, evecs, info = torch.ops.llama_fast.sym_eig(M.to(device))
    assert info.tolist() == [0, 1]
    assert bool(torch.isnan(evals[1]).all()) and bool(torch.isfinite(evals[0]).all())
    torch.testing.assert_close(evals[0].cpu().double(), torch.linalg.eigvalsh(M[0].double()), rtol=0, atol=1e-5)


def test_opcheck(device, rng):
    M = with_spectrum(spectrum("spd", 6, rng), rng).expand(2, 6, 6).contiguous().to(device)
    opcheck(torch.ops.llama_fast.sym_eig.default, (M.float(),))
    opcheck(torch.ops.llama_fast.sym_eig.default, (M.requires_grad_(),), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device, rng):
    M = with_spectrum(spectrum("spd", 5, rng), rng).to(device)
    compiled = torch.compile(lambda m: lf.sym_eig(m)[0].sum(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(M), torch.linalg.eigvalsh(M).sum())


def test_bad_input(device):
    with pytest.raises(ValueError, match=r"\bM\b must have shape \[\.\.\., d, d\]"):
        lf.sym_eig(torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match=r"\bM\b must have shape"):
        lf.sym_eig(torch.randn(4, device=device))
    with pytest.raises(ValueError, match=r"\bM\b must be float32 or float64"):
        lf.sym_eig(torch.eye(3, dtype=torch.long, device=device))
    bad = torch.eye(3, device=device)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"\bM\b contains NaN or Inf"):
        lf.sym_eig(bad, check=True)
    with pytest.raises(ValueError, match=r"\bM\b must be symmetric"):
        lf.sym_eig(torch.tensor([[1.0, 2.0], [0.0, 1.0]], device=device), check=True)
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.llama_fast.sym_eig(torch.randn(2, 3, device=device))


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0), (2, 0, 0, 0)])
def test_zero_by_zero_matrices_match_eigh(shape, device):
    """0 x 0 matrices have no eigenvalues (torch.linalg.eigh's answer); the op's batch view
    failed on them with a reshape error. check=True accepts them too."""
    M = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
    evals, evecs = lf.sym_eig(M, check=True)
    want = torch.linalg.eigh(M.detach())
    assert evals.shape == want.eigenvalues.shape and evecs.shape == want.eigenvectors.shape
    (evals.sum() + evecs.sum()).backward()
    assert M.grad.shape == M.shape
