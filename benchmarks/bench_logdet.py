"""kron_logdet forward + backward over all layers vs the reference (eigvalsh + log-sum,
differentiated through torch's eigh; for mode="factored", Cholesky through torch.linalg), on
the K-FAC factors of the benchmark workloads (few-shot sinusoid MLP, Omniglot and miniImageNet
Conv-4)."""

from functools import partial

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import WORKLOADS, paired_benchmark


def factors(workload, T, device):
    A, G = [], []
    for (_, n, i), (_, m, o) in WORKLOADS[workload](T):
        a = torch.randn(T, min(n, 4 * i), i + 1, device=device)
        g = torch.randn(T, min(m, 4 * o), o, device=device)
        A.append((a.transpose(1, 2) @ a / a.shape[1]).requires_grad_())
        G.append((g.transpose(1, 2) @ g / g.shape[1]).requires_grad_())
    return A, G


def forward_backward(fn, A, G, mode="exact"):
    fn(A, G, damping=0.1, mode=mode).sum().backward()


@pytest.mark.parametrize("workload,T", [(w, T) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)])
def bench_kron_logdet_fwd_bwd(benchmark, device, workload, T):
    A, G = factors(workload, T, device)
    benchmark.group = f"kron_logdet fwd+bwd {workload} T={T} {device}"
    paired_benchmark(benchmark, partial(forward_backward, lf.kron_logdet),
                     partial(forward_backward, reference.kron_logdet), device, A, G)


@pytest.mark.parametrize("workload,T", [(w, T) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)])
def bench_kron_logdet_factored_fwd_bwd(benchmark, device, workload, T):
    """mode="factored" (pi-damped factors, Cholesky) against the reference's factored mode."""
    A, G = factors(workload, T, device)
    benchmark.group = f"kron_logdet factored fwd+bwd {workload} T={T} {device}"
    paired_benchmark(benchmark, partial(forward_backward, lf.kron_logdet, mode="factored"),
                     partial(forward_backward, reference.kron_logdet, mode="factored"), device, A, G)


def activations(workload, T, device):
    shapes = WORKLOADS[workload](T)
    a = [torch.randn(sa, device=device, requires_grad=True) for sa, _ in shapes]
    g = [torch.randn(sg, device=device, requires_grad=True) for _, sg in shapes]
    return a, g


def kernels_from_activations(a, g):
    A, G = lf.kfac_factors(a, g, low_rank=True)
    lf.kron_logdet(A, G, damping=0.1).sum().backward()


def reference_from_activations(a, g):
    A, G = reference.kfac_factors(a, g)
    reference.kron_logdet(A, G, damping=0.1).sum().backward()


@pytest.mark.parametrize("T", [4, 32])
def bench_logdet_from_activations_low_rank(benchmark, device, T):
    """Activations -> factors -> log-det -> gradients on Conv-4 5-way 1-shot: the kernels take
    the low-rank path for the 577-wide factors built from 245 and 45 rows (and the 65-wide
    head from 5 rows); the reference materialises and eigendecomposes every factor."""
    a, g = activations("conv4-omniglot", T, device)
    benchmark.group = f"kfac+kron_logdet fwd+bwd low-rank conv4-omniglot T={T} {device}"
    paired_benchmark(benchmark, kernels_from_activations, reference_from_activations, device, a, g)
