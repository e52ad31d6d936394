"""kfac_factors (one grouped call for all layers) vs the reference (torch.cat + bmm per layer)."""

import pytest
import torch

import llama_fast as lf
from llama_fast import reference
from lf_workloads import WORKLOADS, paired_benchmark

CASES = [
    (workload, T)
    for workload in WORKLOADS
    for T in (4, 32)
]


def layer_inputs(workload, T, device):
    shapes = WORKLOADS[workload](T)
    a = [torch.randn(sa, device=device) for sa, _ in shapes]
    g = [torch.randn(sg, device=device) for _, sg in shapes]
    return a, g


@pytest.mark.parametrize("workload,T", CASES)
def bench_kfac_factors(benchmark, device, workload, T):
    if device == "cpu" and workload == "conv4-miniimagenet" and T == 32:
        pytest.skip("miniImageNet at T=32 takes minutes per round on a 2-core CPU; run on CUDA")
    a, g = layer_inputs(workload, T, device)
    benchmark.group = f"kfac_factors {workload} T={T} {device}"
    paired_benchmark(benchmark, lf.kfac_factors, reference.kfac_factors, device, a, g)
