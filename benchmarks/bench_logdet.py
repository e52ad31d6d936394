"""kron_logdet forward + backward over all layers vs the reference (eigvalsh + log-sum,
differentiated through torch's eigh), on the K-FAC factors of the DESIGN.md workloads."""

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import WORKLOADS, timed_call

IMPLS = {"kernels": lf.kron_logdet, "reference": reference.kron_logdet}


def factors(workload, T, device):
    A, G = [], []
    for (_, n, i), (_, m, o) in WORKLOADS[workload](T):
        a = torch.randn(T, min(n, 4 * i), i + 1, device=device)
        g = torch.randn(T, min(m, 4 * o), o, device=device)
        A.append((a.transpose(1, 2) @ a / a.shape[1]).requires_grad_())
        G.append((g.transpose(1, 2) @ g / g.shape[1]).requires_grad_())
    return A, G


def forward_backward(fn, A, G):
    fn(A, G, damping=0.1).sum().backward()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("workload,T", [(w, T) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)])
def bench_kron_logdet_fwd_bwd(benchmark, device, workload, T, impl):
    A, G = factors(workload, T, device)
    benchmark.group = f"kron_logdet fwd+bwd {workload} T={T} {device}"
    benchmark.extra_info["impl"] = impl
    benchmark(timed_call(forward_backward, device), IMPLS[impl], A, G)
