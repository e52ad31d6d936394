"""The networks of the MAML/LLAMA experiments.

``mlp``: the sinusoid regression network (Finn et al. 2017), 1-40-40-1 with ReLU.
``conv4``: Finn et al.'s few-shot classifier, 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool]
and a linear head. Its BatchNorm layers keep no running statistics: they always normalise
with the current batch's statistics (transductive, as in Finn's reference code), which is also
what meta_step and adapt do under vmap.
"""

from torch import nn

__all__ = ["mlp", "conv4"]


def mlp(in_features: int = 1, hidden=(40, 40), out_features: int = 1) -> nn.Sequential:
    """Fully connected ReLU network ``in -> hidden[0] -> ... -> out``."""
    widths = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    if any(w < 1 for w in widths):
        raise ValueError(f"mlp: every width must be >= 1, got {widths}")
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv4(in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28) -> nn.Sequential:
    """Conv-4 for ``[N, in_channels, image_size, image_size]`` images and ``ways`` classes.

    Each of the 4 blocks halves the side (floor), so ``image_size`` must be at least 16;
    28 gives a 1x1 map before the head, 84 a 5x5 one.
    """
    side = int(image_size)
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(f"conv4: image_size must be >= 16 (four 2x2 max-pools), got {image_size}")
    blocks, channels = [], int(in_channels)
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = hidden
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden * side * side, int(ways)))
