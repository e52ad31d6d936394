"""sym_eig vs torch.linalg.eigh on the K-FAC factors of the benchmark workloads (few-shot
sinusoid MLP, Omniglot and miniImageNet Conv-4).

Factors of equal size are batched together (T tasks x the layers of that size), as
kron_logdet does.
"""

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import factor_sizes, paired_benchmark


CASES = [(w, T, d, n) for w in ("sinusoid", "conv4-omniglot") for T in (4, 32)
         for d, n in sorted(factor_sizes(w, T).items())]


@pytest.mark.parametrize("workload,T,d,count", CASES)
def bench_sym_eig(benchmark, device, workload, T, d, count):
    x = torch.randn(count, d, d + 2, device=device)
    M = x @ x.transpose(1, 2) / d
    benchmark.group = f"sym_eig {workload} T={T} {count}x[{d}x{d}] {device}"
    paired_benchmark(benchmark, lf.sym_eig, reference.sym_eig, device, M)
