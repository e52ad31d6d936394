"""Shared fixtures: every op test runs on the CPU and, when a GPU is visible, on CUDA."""

import secrets

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not CUDA:
        pytest.skip("no GPU: CUDA kernels are compiled but cannot run here")
    return torch.device(request.param)


@pytest.fixture
def rng():
    """A generator with a fresh seed per test run (fresh random inputs every time).

    The seed is shown in assertion messages (``rng.initial_seed()``) for reproduction.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))

