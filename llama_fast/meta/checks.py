"""Argument checks shared by meta_step and adapt: choices, counts, non-negative numbers, the
prior precision (damping), non-empty task sets and targets that fit the network's output."""

import math
import operator

import torch

ALGORITHMS = ("llama", "maml", "fomaml")
BACKENDS = ("kernels", "reference")
CURVATURE_SETS = ("support", "query")


def choice(value, options, name):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def count(value, name, minimum=0):
    """A whole number >= ``minimum``. A float is refused rather than truncated (inner_steps=1.7
    is not 1 step), and so is a bool (True is not a step count)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)   # int, numpy and 0-dim integer torch scalars
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def nonempty_sets(support_x, query_x, prefix=""):
    """At least one task and one support and query example per task: the meta-loss is a mean
    over tasks, the inner loop's and the query loss means over examples, so an empty set
    would divide by zero or give a NaN meta-loss."""
    if support_x.shape[0] == 0:
        raise ValueError(f"{prefix}support_x holds no tasks (T=0, shape {tuple(support_x.shape)}): "
                         "a batch needs at least one task")
    for x, name, what in ((support_x, "support_x", "support (K)"), (query_x, "query_x", "query (Q)")):
        if x.shape[1] == 0:
            raise ValueError(f"{prefix}{name} has no {what} examples per task (shape {tuple(x.shape)}): "
                             "each task needs at least one")


def nonnegative(value, name):
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_damping(damping, tasks):
    """damping > 0: a float, a tensor [T] (or 0-dim), or per K-FAC layer a sequence of L floats
    or a tensor [T, L] (the layer count is checked where the curvature is built). Returns a
    float, a tuple of floats or a tensor."""
    if damping is None:
        raise ValueError("damping (the prior precision delta > 0) is required for the curvature")
    if isinstance(damping, (list, tuple)):
        values = tuple(float(x) for x in damping)
        if not values or not all(math.isfinite(x) and x > 0 for x in values):
            raise ValueError(f"damping per layer must be a non-empty sequence of positive finite floats, got {damping!r}")
        return values
    if isinstance(damping, torch.Tensor):
        if damping.dim() == 0:
            damping = damping.expand(tasks)
        if damping.dim() not in (1, 2) or damping.shape[0] != tasks:
            raise ValueError(f"damping must be a float, a sequence of floats (per layer) or a tensor of "
                             f"shape [T={tasks}] or [T={tasks}, L], got {tuple(damping.shape)}")
        if not bool(((damping > 0) & torch.isfinite(damping)).all()):
            raise ValueError("damping must be positive and finite")
        return damping
    value = float(damping)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"damping must be positive and finite, got {value}")
    return value


def check_targets(y, out_shape, loss, name):
    """Targets that fit the network output: class labels in [0, C) for cross_entropy, float
    targets of the output's per-example shape for mse."""
    if loss == "cross_entropy":
        if len(out_shape) != 1 or out_shape[0] < 2:
            raise ValueError(f"loss='cross_entropy' needs network outputs of shape [N, C] with C >= 2 "
                             f"classes, got per-example shape {out_shape}; use loss='mse' for regression")
        if y.dtype.is_floating_point or y.dim() != 2:
            raise ValueError(f"loss='cross_entropy' needs integer class labels {name} of shape [T, N], "
                             f"got {y.dtype} {tuple(y.shape)}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= out_shape[0]:
            raise ValueError(f"{name} holds labels in [{low}, {high}] but the network has "
                             f"{out_shape[0]} classes (labels must be in [0, {out_shape[0] - 1}])")
        return
    if not y.dtype.is_floating_point:
        raise ValueError(f"loss='mse' needs float targets {name}, got {y.dtype}; "
                         "use loss='cross_entropy' for class labels")
    if tuple(y.shape[2:]) != tuple(out_shape):
        raise ValueError(f"loss='mse': {name} has per-example shape {tuple(y.shape[2:])} but the network "
                         f"outputs {tuple(out_shape)}")
