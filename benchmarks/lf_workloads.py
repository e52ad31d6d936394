"""Layer shapes of the benchmark workloads (few-shot sinusoid MLP, Omniglot and miniImageNet
Conv-4), as (a, g) shapes of every K-FAC layer.

a is [T, N*R, fan_in] (unfolded patches for convolutions: "K-FAC expand"), g is
[T, N*R*C, fan_out] with one backpropagated gradient per class (exact Fisher). The support set
is N-way 1-shot: N examples per task.
"""

import statistics
import time

import torch

WAYS = 5


def sinusoid_mlp(T, shots=10):
    # 1-40-40-1 ReLU regression network; one output, so one g per example.
    dims = [1, 40, 40, 1]
    return [((T, shots, i), (T, shots, o)) for i, o in zip(dims[:-1], dims[1:])]


def conv4(T, image_size, hidden, in_channels, shots=1):
    """Finn et al.'s Conv-4: 4 x (3x3 conv 'same', pool 2), linear head, N-way K-shot."""
    n = WAYS * shots
    layers, side, cin = [], image_size, in_channels
    for _ in range(4):
        positions = side * side
        layers.append(((T, n * positions, cin * 9), (T, n * positions * WAYS, hidden)))
        side, cin = side // 2, hidden
    fc_in = hidden * side * side
    layers.append(((T, n, fc_in), (T, n * WAYS, WAYS)))
    return layers


WORKLOADS = {
    "sinusoid": lambda T: sinusoid_mlp(T),
    "conv4-omniglot": lambda T: conv4(T, image_size=28, hidden=64, in_channels=1),
    "conv4-miniimagenet": lambda T: conv4(T, image_size=84, hidden=32, in_channels=3),
}


def factor_sizes(workload, T):
    """{d: number of d x d factors} over A (with bias) and G of every layer, all T tasks."""
    sizes = {}
    for (_, _, i), (_, _, o) in WORKLOADS[workload](T):
        for d in (i + 1, o):
            sizes[d] = sizes.get(d, 0) + T
    return sizes


def timed_call(fn, device):
    """fn wrapped so that CUDA work is finished before the timer stops."""
    if device != "cuda":
        return fn

    def synced(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return synced


# Rounds of a paired benchmark: as many kernels/reference pairs as fit in this many seconds
# (pytest-benchmark's own default budget is one second per benchmark), within these bounds.
PAIRED_SECONDS = 2.0
PAIRED_ROUNDS = (5, 2000)


def alternate(benchmark, target, partner, args=(), rounds=None, warmup=True):
    """pytest-benchmark times ``target(*args)`` while ``partner(*args)`` runs before each of its
    rounds (partner, target, partner, target, ...), timed with the host clock; returns the
    partner's times. Warm-up pairs come first (one, or with ``rounds=None`` as many as fit in a
    tenth of PAIRED_SECONDS): first-call costs (page faults of fresh allocations, lazy
    initialisation) stay out of both, as pytest-benchmark's own warm-up keeps them out of an
    unpaired benchmark. ``rounds=None``: as many rounds as fit in PAIRED_SECONDS, within
    PAIRED_ROUNDS; ``warmup=False`` (with a given ``rounds``): no warm-up pair, for a smoke run
    whose figures mean nothing. Wrap CUDA callables with timed_call first."""
    if rounds is None and not warmup:
        raise ValueError("alternate: rounds=None sizes the rounds from the warm-up pairs")
    pairs, start = 0, time.perf_counter()
    while warmup and (pairs == 0 or (rounds is None and time.perf_counter() - start < PAIRED_SECONDS / 10)):
        target(*args)
        partner(*args)
        pairs += 1
    if rounds is None:
        pair = (time.perf_counter() - start) / pairs
        rounds = int(min(max(PAIRED_SECONDS / max(pair, 1e-9), PAIRED_ROUNDS[0]), PAIRED_ROUNDS[1]))
    partner_times = []

    def time_partner():
        start = time.perf_counter()
        partner(*args)
        partner_times.append(time.perf_counter() - start)
        return args, {}

    benchmark.pedantic(target, setup=time_partner, rounds=rounds, iterations=1)
    return partner_times


def paired_benchmark(benchmark, kernels, reference, device, *args, rounds=None, warmup=True):
    """Times `kernels(*args)` with pytest-benchmark and `reference(*args)` between its rounds
    (``alternate``), so that both see the same machine state.

    Two benchmarks run one after the other are seconds apart, and on a shared 2-vCPU VM the
    speed of the machine moves by up to 2x between such windows (kron_sample sinusoid T=4
    S=100 took 3.8 ms in one window and 9.6 ms in another); a ratio of their medians is then
    as much the machine's drift as the code. The reference's median (and the number of rounds)
    goes into ``extra_info`` ("reference_median", "reference_rounds"); the speed-up table
    reads it from there. ``rounds``, ``warmup``: as for ``alternate``.
    """
    benchmark.extra_info["impl"] = "kernels"
    times = alternate(benchmark, timed_call(kernels, device), timed_call(reference, device), args,
                      rounds=rounds, warmup=warmup)
    benchmark.extra_info["reference_median"] = statistics.median(times)
    benchmark.extra_info["reference_rounds"] = len(times)
