"""Shared fixtures: every op test runs on the CPU and, when a GPU is visible, on CUDA.

Random inputs come from the ``rng`` fixture: a generator seeded per test from one base seed,
12345 by default. ``LLAMA_FAST_TEST_SEED=N`` sets another base seed and
``LLAMA_FAST_TEST_SEED=random`` draws a fresh one; the base seed is printed in pytest's header
so any run can be repeated.
"""

import os
import secrets
import sys
import zlib
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEFAULT_SEED = 12345

# The torchrun workers and other helper scripts (tests/helpers) are imported by some tests.
sys.path.insert(0, str(Path(__file__).parent / "helpers"))


def _base_seed() -> int:
    value = os.environ.get("LLAMA_FAST_TEST_SEED", str(DEFAULT_SEED))
    if value == "random":
        return secrets.randbits(62)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"LLAMA_FAST_TEST_SEED must be an integer or 'random', got {value!r}") from None


BASE_SEED = _base_seed()


def pytest_report_header(config):
    return f"llama_fast test seed: LLAMA_FAST_TEST_SEED={BASE_SEED}"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not CUDA:
        pytest.skip("no GPU: CUDA kernels are compiled but cannot run here")
    return torch.device(request.param)


@pytest.fixture
def rng(request):
    """A generator seeded from the base seed and the test's id: every test (and parameter
    set) gets its own inputs, the same on every run with the same base seed.

    The seed is shown in assertion messages (``rng.initial_seed()``) for reproduction.
    """
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def restore_threads():
    """Torch's thread count as it was before the test, whatever the test sets."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(restore_threads):
    """Torch on one thread for the test: float64 gradgradchecks of small tensors run thousands of
    tiny ops, and on a busy 2-core machine each parallel region can wait for the other core
    (20-100 s per case instead of 4 s); tiny training runs are faster there on one thread too."""
    torch.set_num_threads(1)
