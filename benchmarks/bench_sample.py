"""kron_sample vs the reference (torch.randn + scaling + two matmuls per layer) on the K-FAC
factors of the benchmark workloads (few-shot sinusoid MLP, Omniglot and miniImageNet
Conv-4), all layers in one call.

`bench_kron_sample` compares the sampling itself: the eigendecompositions are computed once
outside the timer on both sides (a KronCurvature for the kernels, torch.linalg.eigh for the
reference). `bench_kron_sample_from_factors` times the whole call from the factors, where
the eigendecompositions dominate, and `bench_sample_low_rank` the low-rank path from the
activations (Conv-4 5-way 1-shot).

Each benchmark is paired (lf_workloads.paired_benchmark): the kernels and the reference run
alternately in one benchmark, so the speed-up compares them under the same machine state."""

from functools import partial

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import WORKLOADS, paired_benchmark

DAMPING = 0.1
CASES = [(w, T) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)]


def factors(workload, T, device):
    A, G, means = [], [], []
    for (_, n, i), (_, m, o) in WORKLOADS[workload](T):
        a = torch.randn(T, min(n, 4 * i), i + 1, device=device)
        g = torch.randn(T, min(m, 4 * o), o, device=device)
        A.append(a.transpose(1, 2) @ a / a.shape[1])
        G.append(g.transpose(1, 2) @ g / g.shape[1])
        means.append(torch.randn(T, o, i + 1, device=device))
    return A, G, means


def too_big(device, workload, T, S):
    # Conv-4 at T=32 and S=100 holds 3 x 0.47 GB of float32 samples per call, and the
    # reference's broadcast matmul copies Q_A S times (4.3 GB): not run on a 2-core CPU.
    return device == "cpu" and workload.startswith("conv4") and T * S > 1000


def kernels_sampler(A, G, means):
    curvature = lf.KronCurvature(A, G, damping=DAMPING)
    return lambda S: curvature.sample(means, num_samples=S)


def reference_sampler(A, G, means):
    eigs = [(torch.linalg.eigh(A_l), torch.linalg.eigh(G_l)) for A_l, G_l in zip(A, G)]
    return lambda S: [reference.kron_sample_from_eigs(m, lam, Q_A, mu, Q_G, DAMPING, 1.0, S)
                      for m, ((lam, Q_A), (mu, Q_G)) in zip(means, eigs)]


@pytest.mark.parametrize("S", [1, 10, 100])
@pytest.mark.parametrize("workload,T", CASES)
def bench_kron_sample(benchmark, device, workload, T, S):
    if too_big(device, workload, T, S):
        pytest.skip("too large for the CPU run (see too_big)")
    A, G, means = factors(workload, T, device)
    benchmark.group = f"kron_sample {workload} T={T} S={S} {device}"
    paired_benchmark(benchmark, kernels_sampler(A, G, means), reference_sampler(A, G, means), device, S)


@pytest.mark.parametrize("workload", ["sinusoid", "conv4-omniglot"])
def bench_kron_sample_from_factors(benchmark, device, workload):
    T, S = 4, 10
    A, G, means = factors(workload, T, device)
    benchmark.group = f"kron_sample from factors {workload} T={T} S={S} {device}"
    paired_benchmark(benchmark, partial(lf.kron_sample, damping=DAMPING, num_samples=S),
                     partial(reference.kron_sample, damping=DAMPING, num_samples=S), device, means, A, G)


def low_rank_problem(T, device):
    shapes = WORKLOADS["conv4-omniglot"](T)
    a = [torch.randn(sa, device=device) for sa, _ in shapes]
    g = [torch.randn(sg, device=device) for _, sg in shapes]
    means = [torch.randn(T, sg[2], sa[2] + 1, device=device) for sa, sg in shapes]
    return a, g, means


def kernels_low_rank(a, g, means, S):
    A, G = lf.kfac_factors(a, g, low_rank=True)
    return lf.kron_sample(means, A, G, damping=DAMPING, num_samples=S)


def reference_low_rank(a, g, means, S):
    A, G = reference.kfac_factors(a, g)
    return reference.kron_sample(means, A, G, damping=DAMPING, num_samples=S)


@pytest.mark.parametrize("S", [1, 10])
def bench_sample_low_rank(benchmark, device, S):
    """Activations -> factors -> samples, Conv-4 Omniglot 5-way 1-shot, T=4: the kernels keep
    the 577-wide factors of layers 3-4 (245 and 45 rows) and the head (5 rows) low-rank."""
    T = 4
    a, g, means = low_rank_problem(T, device)
    benchmark.group = f"kfac+kron_sample low-rank conv4-omniglot T={T} S={S} {device}"
    paired_benchmark(benchmark, kernels_low_rank, reference_low_rank, device, a, g, means, S)
