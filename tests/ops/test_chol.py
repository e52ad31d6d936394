"""chol_logdet against LAPACK (torch.linalg.cholesky), gradients, failure reporting."""

import pytest
import torch
from torch.library import opcheck

import llama_fast as lf
from llama_fast.ops import reference


@pytest.fixture(params=["auto", "portable", "lapack"])
def cpu_chol(request, monkeypatch):
    """Runs a CPU test under each CPU path (portable is the CUDA kernel's arithmetic; "auto"
    takes it up to order 96, LAPACK above)."""
    monkeypatch.setenv("LLAMA_FAST_CPU_CHOL", request.param)
    return request.param


def spd(batch, d, rng, dtype=torch.float64, cond_shift=1e-3):
    x = torch.randn(*batch, d, d + 2, generator=rng, dtype=torch.float64)
    return (x @ x.transpose(-1, -2) / d + cond_shift * torch.eye(d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 7, 33, 130])
def test_matches_lapack(device, cpu_chol, d, dtype, rng):
    if device.type == "cuda" and cpu_chol != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    M = spd((3,), d, rng, dtype).to(device)
    logdet, L, info = torch.ops.llama_fast.chol_logdet(M)
    expected = reference.chol_logdet(M.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(logdet.double(), expected, rtol=tol, atol=tol * d)
    torch.testing.assert_close((L @ L.mT).double(), M.double(), rtol=tol, atol=tol)
    assert torch.equal(L, L.tril()) and int(info.abs().sum()) == 0


def test_not_positive_definite_is_reported(device, cpu_chol, rng):
    if device.type == "cuda" and cpu_chol != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    M = spd((3,), 5, rng).to(device)
    M[1, 2, 2] = -1.0
    logdet, _, info = torch.ops.llama_fast.chol_logdet(M)
    assert info.tolist()[0] == 0 and info.tolist()[1] > 0 and info.tolist()[2] == 0
    assert torch.isnan(logdet[1]) and torch.isfinite(logdet[[0, 2]]).all()
    with pytest.raises(ValueError, match="not positive definite"):
        lf.chol_logdet(M, check=True)


def test_gradcheck_and_opcheck(device, rng):
    X = spd((2,), 4, rng).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: lf.chol_logdet(0.5 * (X + X.mT)), (X,))
    opcheck(torch.ops.llama_fast.chol_logdet.default, (X,))


def test_bad_input(device):
    with pytest.raises(ValueError, match=r"\bM\b must have shape \[\.\.\., d, d\]"):
        lf.chol_logdet(torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="float32 or float64"):
        lf.chol_logdet(torch.eye(3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("d", [3, 96, 97, 150])
def test_gradient_and_batch_shapes_on_both_sides_of_the_path_switch(device, cpu_chol, d, rng):
    """Leading dims [2, 3] (the op flattens and restores them, LAPACK's factor is column-major),
    orders on both sides of the portable/LAPACK switch: log-det and gradient M^-1 as the
    reference's (autograd through torch.linalg.cholesky), L @ L^T = M."""
    if device.type == "cuda" and cpu_chol != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    M = spd((2, 3), d, rng).to(device).requires_grad_()
    weights = torch.randn(2, 3, generator=rng, dtype=torch.float64).to(device)
    logdet, L, info = torch.ops.llama_fast.chol_logdet(M)
    assert logdet.shape == (2, 3) and L.shape == M.shape and info.shape == (2, 3)
    torch.testing.assert_close(L @ L.mT, M.detach(), rtol=1e-10, atol=1e-10)
    expected = reference.chol_logdet(M)
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10 * d)
    (grad,) = torch.autograd.grad((lf.chol_logdet(M) * weights).sum(), M)
    (want,) = torch.autograd.grad((expected * weights).sum(), M)
    torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-8)


def test_double_backward_raises(device, rng):
    """A backward that would record its own graph (create_graph=True) raises, as kron_logdet's."""
    M = spd((2,), 4, rng).to(device).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lf.chol_logdet(M).sum(), M, create_graph=True)


def test_empty_batch(device):
    logdet, L, info = torch.ops.llama_fast.chol_logdet(torch.empty(0, 4, 4, device=device))
    assert logdet.shape == (0,) and L.shape == (0, 4, 4) and info.shape == (0,)


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 0)])
def test_zero_by_zero_matrices_have_log_det_zero(shape, device):
    """log det of a 0 x 0 matrix is 0, as torch.linalg.slogdet (a reshape error before)."""
    M = torch.zeros(shape, dtype=torch.float64, device=device, requires_grad=True)
    logdet = lf.chol_logdet(M, check=True)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(M.detach()).logabsdet)
    logdet.sum().backward()
    assert M.grad.shape == M.shape
