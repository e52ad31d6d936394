"""chol_logdet (the factored log-det's Cholesky) vs the reference (torch.linalg.cholesky and
the log of its diagonal, differentiated by autograd), forward and forward + backward, on
damped matrices of Conv-4's K-FAC factor sizes, batched as kron_logdet batches them (T tasks x
the layers of that size)."""

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import factor_sizes, paired_benchmark

# Conv-4's factor sizes (5 to 577) span the sinusoid MLP's (1 to 41) as well; one workload,
# and the forward alone at T=4 only, keep the suite short on the GPU machine
# (scripts/device_check.sh runs every CUDA case).
CASES = [("conv4-omniglot", T, d, n) for T in (4, 32)
         for d, n in sorted(factor_sizes("conv4-omniglot", T).items())]
FORWARD_CASES = [case for case in CASES if case[1] == 4]


def damped(count, d, device):
    x = torch.randn(count, d, d + 2, device=device)
    return (x @ x.transpose(1, 2) / d + 0.1 * torch.eye(d, device=device)).requires_grad_()


def forward_backward(fn, M):
    fn(M).sum().backward()


@pytest.mark.parametrize("workload,T,d,count", FORWARD_CASES)
def bench_chol_logdet(benchmark, device, workload, T, d, count):
    M = damped(count, d, device).detach()
    benchmark.group = f"chol_logdet {workload} T={T} {count}x[{d}x{d}] {device}"
    paired_benchmark(benchmark, lf.chol_logdet, reference.chol_logdet, device, M)


@pytest.mark.parametrize("workload,T,d,count", CASES)
def bench_chol_logdet_fwd_bwd(benchmark, device, workload, T, d, count):
    M = damped(count, d, device)
    benchmark.group = f"chol_logdet fwd+bwd {workload} T={T} {count}x[{d}x{d}] {device}"
    paired_benchmark(benchmark, lambda M: forward_backward(lf.chol_logdet, M),
                     lambda M: forward_backward(reference.chol_logdet, M), device, M)
