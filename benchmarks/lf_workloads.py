"""Layer shapes of the DESIGN.md workloads, as (a, g) shapes of every K-FAC layer.

a is [T, N*R, fan_in] (unfolded patches for convolutions: "K-FAC expand"), g is
[T, N*R*C, fan_out] with one backpropagated gradient per class (exact Fisher). The support set
is N-way 1-shot: N examples per task.
"""

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


def timed_call(fn, device):
    """fn wrapped so that CUDA work is finished before the timer stops."""
    if device != "cuda":
        return fn

    def synced(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return synced
