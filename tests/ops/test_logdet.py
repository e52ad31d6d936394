"""kron_logdet against its definition (dense slogdet) and the eigvalsh reference; gradients."""

import pytest
import torch
from torch.library import opcheck

import llama_fast as lf
from llama_fast.ops import reference


def psd_factors(T, d, rows, rng, dtype=torch.float64, device="cpu"):
    """K-FAC-like factors: Gram matrices of `rows` random rows (rank-deficient when rows < d)."""
    x = torch.randn(T, rows, d, generator=rng, dtype=dtype)
    return (x.transpose(1, 2) @ x / rows).to(device)


def conv4_like_factors(rng, dtype, device):
    """Conv-4-like layer sizes (a, g, rows), T=4, and a per-task damping tensor."""
    sizes = [(10, 64, 300), (65, 64, 40), (65, 5, 5)]
    A = [psd_factors(4, a, r, rng, dtype, device) for a, _, r in sizes]
    G = [psd_factors(4, g, r, rng, dtype, device) for _, g, r in sizes]
    return A, G, torch.tensor([0.01, 0.1, 1.0, 3.0], dtype=dtype, device=device)


@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("a,g,rows", [(1, 1, 1), (3, 2, 5), (7, 4, 2), (5, 6, 40)])
def test_matches_dense_definition(device, a, g, rows, damping, rng):
    A = psd_factors(3, a, rows, rng, device=device)
    G = psd_factors(3, g, rows, rng, device=device)
    ld = lf.kron_logdet(A, G, damping=damping, scale=0.7)
    dense = reference.kron_logdet_dense(A, G, damping=damping, scale=0.7)
    torch.testing.assert_close(ld, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_lists_match_reference(device, dtype, rng):
    """Conv-4-like layer sizes, T=4, per-task damping tensor, float32 to 1e-5 relative."""
    A, G, damping = conv4_like_factors(rng, dtype, device)
    ld = lf.kron_logdet(A, G, damping=damping, scale=2.0)
    expected = reference.kron_logdet([x.double() for x in A], [y.double() for y in G],
                                     damping=damping.double(), scale=2.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ld.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    pairs = lf.kron_logdet(list(zip(A, G)), damping=damping, scale=2.0)
    torch.testing.assert_close(pairs, ld)


# (inputs, outputs, rows) of bias-free layers: full-rank factors, and factors of fewer rows than
# their width. In float32 the rank-deficient ones are checked against float64 elsewhere
# (test_layer_lists_match_reference): with G summed over 300 rows, float32 rounding of A's zero
# eigenvalues (~eps * ||A||) times s * mu / delta moves the log-det by ~1e-5 relative, in any
# float32 eigensolver.
FULL_RANK = [(10, 64, 300), (64, 64, 100), (64, 5, 80)]
RANK_DEFICIENT = [(10, 64, 300), (64, 64, 40), (64, 5, 5)]


@pytest.mark.parametrize("dtype,layers,rtol", [
    (torch.float32, FULL_RANK, 1e-5),
    (torch.float64, FULL_RANK, 1e-10),
    (torch.float64, RANK_DEFICIENT, 1e-10),
])
def test_matches_laplace_torch_kron_decomposed(device, dtype, layers, rtol, rng):
    """The same factors through laplace-torch's KronDecomposed (its KronLaplace log-det):
    bias-free layers, the likelihood scale folded into G, the prior precision as deltas."""
    matrix = pytest.importorskip("laplace.utils.matrix", reason="laplace-torch is not installed")
    a, g = [], []
    for i, o, rows in layers:
        a.append(torch.randn(4, rows, i, generator=rng, dtype=dtype).to(device))
        g.append(torch.randn(4, rows, o, generator=rng, dtype=dtype).to(device))
    A, G = lf.kfac_factors(a, g, bias=False)
    delta, s = 0.3, 2.0
    ld = lf.kron_logdet(A, G, damping=delta, scale=s)
    for t in range(4):
        kron = matrix.Kron([[s * G_l[t].double(), A_l[t].double()] for A_l, G_l in zip(A, G)])
        deltas = torch.full((len(A),), delta, dtype=torch.float64, device=device)
        expected = (kron.decompose() + deltas).logdet()
        torch.testing.assert_close(ld[t].double(), expected, rtol=rtol, atol=0,
                                   msg=lambda m: f"{m} (seed {rng.initial_seed()})")


def test_gradcheck_float64(device, rng):
    A = psd_factors(2, 4, 6, rng, device=device).requires_grad_()
    G = psd_factors(2, 3, 6, rng, device=device).requires_grad_()
    damping = torch.tensor([0.3, 1.5], dtype=torch.float64, device=device, requires_grad=True)

    def logdet(A, G, damping):
        # Symmetric perturbations only: the factors are symmetric by construction.
        return lf.kron_logdet(0.5 * (A + A.mT), 0.5 * (G + G.mT), damping=damping, scale=1.3)

    assert torch.autograd.gradcheck(logdet, (A, G, damping))


def test_gradient_matches_reference_autograd(device, rng):
    A = [psd_factors(3, 6, 20, rng, device=device).requires_grad_() for _ in range(2)]
    G = [psd_factors(3, 4, 20, rng, device=device).requires_grad_() for _ in range(2)]
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=device)
    (lf.kron_logdet(A, G, damping=0.1) * weights).sum().backward()
    ours = [x.grad.clone() for x in A + G]
    for x in A + G:
        x.grad = None
    (reference.kron_logdet(A, G, damping=0.1) * weights).sum().backward()
    for got, x in zip(ours, A + G):
        torch.testing.assert_close(got, x.grad)


def test_double_backward_raises(device, rng):
    A = psd_factors(1, 3, 5, rng, device=device).requires_grad_()
    G = psd_factors(1, 2, 5, rng, device=device)
    (grad,) = torch.autograd.grad(lf.kron_logdet(A, G, damping=0.5).sum(), A, create_graph=False)
    assert grad.shape == A.shape
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lf.kron_logdet(A, G, damping=0.5).sum(), A, create_graph=True)


def test_negative_roundoff_eigenvalues_are_clamped(device):
    A = torch.tensor([[[1.0, 0.0], [0.0, -1e-12]]], dtype=torch.float64, device=device)
    G = torch.eye(1, dtype=torch.float64, device=device).unsqueeze(0)
    ld = lf.kron_logdet(A, G, damping=0.5)
    expected = torch.log(torch.tensor(1.5)) + torch.log(torch.tensor(0.5))
    torch.testing.assert_close(ld.cpu(), expected.reshape(1).double())


@pytest.mark.parametrize("which", ["A", "G"])
@pytest.mark.parametrize("d", [4, 12])
def test_non_finite_factor_gives_nan_logdet(device, which, d, rng):
    """One NaN (or Inf) anywhere in a task's factor, on either side of the diagonal: that task's
    log-det is NaN, not a plausible number from the other triangle or a NaN eigenvalue clamped
    to 0; the other task's is unchanged. Small factors take the Jacobi path, larger LAPACK's."""
    def spd(n):
        X = torch.randn(2, n, n + 2, generator=rng, dtype=torch.float64)
        return (X @ X.transpose(-1, -2)).to(device)
    A, G = spd(d), spd(3)
    clean = lf.kron_logdet(A, G, damping=1.0)
    for bad, (i, j) in ((float("nan"), (1, 2)), (float("nan"), (2, 1)), (float("inf"), (0, 0))):
        A2, G2 = A.clone(), G.clone()
        (A2 if which == "A" else G2)[0, i, j] = bad
        out = lf.kron_logdet(A2, G2, damping=1.0)
        assert bool(torch.isnan(out[0])), (bad, i, j, out)
        torch.testing.assert_close(out[1], clean[1])


def test_opcheck(device, rng):
    A = [psd_factors(2, 3, 4, rng, device=device)]
    G = [psd_factors(2, 2, 4, rng, device=device)]
    damping = torch.tensor([0.5, 1.0], dtype=torch.float64, device=device)
    opcheck(torch.ops.llama_fast.kron_logdet_exact.default, ([x.requires_grad_() for x in A], G, damping, 1.0))
    w = [torch.linalg.eigvalsh(A[0].detach())], [torch.linalg.eigvalsh(G[0])]
    opcheck(torch.ops.llama_fast.kron_logdet_from_eigs.default, (*w, damping, 1.0))
    opcheck(torch.ops.llama_fast.kron_logdet_weights.default, (*w, damping, 1.0))


def test_bad_input(device, rng):
    A = psd_factors(2, 3, 4, rng, device=device)
    G = psd_factors(2, 2, 4, rng, device=device)
    with pytest.raises(ValueError, match="damping must be positive"):
        lf.kron_logdet(A, G, damping=-1.0)
    with pytest.raises(ValueError, match="damping must be positive"):
        lf.kron_logdet(A, G, damping=torch.tensor([1.0, -1.0], dtype=torch.float64, device=device), check=True)
    with pytest.raises(ValueError, match=r"damping must be a float, a sequence of 1 floats \(per layer\) or a tensor of shape \[T=2\] or \[T=2, L=1\]"):
        lf.kron_logdet(A, G, damping=torch.ones(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"\bA\b must be square"):
        lf.kron_logdet(A[:, :2], G, damping=1.0)
    with pytest.raises(ValueError, match=r"\bG\b has T=1 tasks"):
        lf.kron_logdet(A, G[:1], damping=1.0)
    with pytest.raises(ValueError, match=r"\bA\b contains NaN"):
        lf.kron_logdet(A * float("nan"), G, damping=1.0, check=True)
    with pytest.raises(ValueError, match=r"\bG\b must be symmetric"):
        lf.kron_logdet(A, G + torch.triu(torch.ones_like(G), 1), damping=1.0, check=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        lf.kron_logdet(A, G, damping=1.0, mode="sqrt")
    with pytest.raises(ValueError, match="scale must be positive"):
        lf.kron_logdet(A, G, damping=1.0, scale=0.0)


# ---- factored mode ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_matches_reference(device, dtype, rng):
    A, G, damping = conv4_like_factors(rng, dtype, device)
    ld = lf.kron_logdet(A, G, damping=damping, scale=2.0, mode="factored")
    expected = reference.kron_logdet([x.double() for x in A], [y.double() for y in G],
                                     damping=damping.double(), scale=2.0, mode="factored")
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ld.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_factored_is_the_pi_damped_kronecker_product(device, rng):
    """Against the definition: logdet of the Kronecker product of the damped factors."""
    A = psd_factors(2, 3, 5, rng, device=device)
    G = psd_factors(2, 2, 5, rng, device=device)
    delta, s = 0.3, 1.5
    ld = lf.kron_logdet(A, G, damping=delta, scale=s, mode="factored")
    for t in range(2):
        pi = torch.sqrt((A[t].trace() / 3) / (s * G[t].trace() / 2))
        big = torch.kron(s * G[t] + pi * delta ** 0.5 * torch.eye(2, dtype=A.dtype, device=device),
                         A[t] + delta ** 0.5 / pi * torch.eye(3, dtype=A.dtype, device=device))
        torch.testing.assert_close(ld[t], torch.linalg.slogdet(big).logabsdet)


def test_factored_gradcheck(device, rng):
    A = psd_factors(2, 4, 6, rng, device=device).requires_grad_()
    G = psd_factors(2, 3, 6, rng, device=device).requires_grad_()
    damping = torch.tensor([0.3, 1.5], dtype=torch.float64, device=device, requires_grad=True)

    def logdet(A, G, damping):
        return lf.kron_logdet(0.5 * (A + A.mT), 0.5 * (G + G.mT), damping=damping, scale=1.3, mode="factored")

    assert torch.autograd.gradcheck(logdet, (A, G, damping))


def test_factored_accepts_low_rank_factors(device, rng):
    a = torch.randn(2, 3, 12, generator=rng, dtype=torch.float64).to(device)
    g = torch.randn(2, 6, 4, generator=rng, dtype=torch.float64).to(device)
    A_low, G = lf.kfac_factors(a, g, low_rank=True)
    A_dense, _ = lf.kfac_factors(a, g)
    torch.testing.assert_close(lf.kron_logdet(A_low, G, damping=0.2, mode="factored"),
                               lf.kron_logdet(A_dense, G, damping=0.2, mode="factored"))


def _dense_logdet(A_list, G_list, delta, scale=1.0):
    """log det of the precision itself, H = s G (x) A + delta I, layer by layer (slogdet)."""
    total = 0
    for A, G in zip(A_list, G_list):
        eye = torch.eye(A.shape[-1] * G.shape[-1], dtype=A.dtype)
        total = total + torch.linalg.slogdet(scale * torch.vmap(torch.kron)(G, A) + delta * eye).logabsdet
    return total


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_zero_width_layers_add_zero(mode, rng):
    """A layer with a 0 x 0 factor has a 0 x 0 precision: log det 0 (slogdet's answer), and
    the other layers' log-dets are unchanged; before, the op's batch view raised."""
    A, G = psd_factors(3, 4, 6, rng), psd_factors(3, 2, 6, rng)
    empty = torch.zeros(3, 0, 0, dtype=torch.float64, requires_grad=True)
    alone = lf.kron_logdet(A, G, 0.5, mode=mode)
    with_empty = lf.kron_logdet([A, empty, A, A], [G, G, G, empty], 0.5, mode=mode, check=True)
    torch.testing.assert_close(with_empty, 2 * alone)
    only_empty = lf.kron_logdet(empty, G, 0.5, mode=mode)
    torch.testing.assert_close(only_empty, torch.zeros(3, dtype=torch.float64))
    if mode == "exact":
        torch.testing.assert_close(only_empty, _dense_logdet([empty.detach()], [G], 0.5))
    (with_empty.sum() + only_empty.sum()).backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("negate", ["A", "G", "both"])
def test_check_refuses_factors_that_are_not_psd(mode, negate, rng):
    """kron_logdet(-A, -G, check=True) returned the log-det of G (x) A (the product of two
    negated factors is PSD), 0 vs the dense 6.01 in the report; check=True names the factor."""
    A, G = psd_factors(2, 3, 8, rng), psd_factors(2, 2, 8, rng)
    bad_A, bad_G = (-A if negate in ("A", "both") else A), (-G if negate in ("G", "both") else G)
    name = "A" if negate != "G" else "G"
    with pytest.raises(ValueError, match=f"^{name} must be positive semi-definite"):
        lf.kron_logdet(bad_A, bad_G, 1.0, mode=mode, check=True)
    with pytest.raises(ValueError, match=rf"^{name}\[1\] must be positive semi-definite"):
        lf.kron_logdet([A, bad_A], [G, bad_G], 1.0, mode=mode, check=True)


def test_check_accepts_psd_factors_with_rounding_error(rng):
    """Rank-deficient Gram factors have zero eigenvalues that rounding makes slightly negative
    (float32): still PSD for check=True, and the log-det equals the unchecked one."""
    for rows in (1, 2):
        A = psd_factors(4, 16, rows, rng, dtype=torch.float32)
        G = psd_factors(4, 5, rows, rng, dtype=torch.float32)
        assert float(torch.linalg.eigvalsh(A.double()).min()) > -1e-6
        torch.testing.assert_close(lf.kron_logdet(A, G, 0.1, check=True), lf.kron_logdet(A, G, 0.1))


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_scale_tensor_gets_its_gradient(mode, rng):
    """A scale tensor that requires grad was turned into a float (torch warned, no gradient);
    its gradient now flows, checked by gradcheck and against the dense log-det's."""
    A = [psd_factors(2, 3, 2, rng), psd_factors(2, 4, 6, rng)]
    G = [psd_factors(2, 2, 6, rng), psd_factors(2, 3, 1, rng)]
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    delta = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s, d: lf.kron_logdet(A, G, d, scale=s, mode=mode), (s, delta))
    torch.testing.assert_close(lf.kron_logdet(A, G, delta, scale=s, mode=mode),
                               lf.kron_logdet(A, G, delta, scale=1.7, mode=mode))
    if mode == "exact":
        (got,) = torch.autograd.grad(lf.kron_logdet(A, G, 0.5, scale=s).sum(), s)
        (want,) = torch.autograd.grad(_dense_logdet(A, G, 0.5, s).sum(), s)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        lf.kron_logdet(A, G, 0.5, scale=-s)
