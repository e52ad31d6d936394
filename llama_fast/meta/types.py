"""The task batch and result types of the meta layer (a leaf module: torch and the argument
checks only)."""

from dataclasses import dataclass

import torch

from .checks import nonempty_sets

__all__ = ["TaskBatch", "MetaStepResult", "local_means"]


@dataclass
class TaskBatch:
    """A batch of T few-shot tasks: support and query sets with a leading task dim.

    Args:
        support_x: ``[T, N, ...]`` float inputs.
        support_y: ``[T, N]`` integer class labels, or ``[T, N, ...]`` float targets.
        query_x: ``[T, M, ...]`` inputs (same per-example shape as support_x).
        query_y: ``[T, M]`` / ``[T, M, ...]`` like support_y.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self):
        names = ("support_x", "support_y", "query_x", "query_y")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() < 2:
                raise ValueError(f"TaskBatch.{name} needs a leading task dim and an example dim "
                                 f"([T, N, ...]), got shape {tuple(value.shape)}")
        T = self.support_x.shape[0]
        for name in names[1:]:
            if getattr(self, name).shape[0] != T:
                raise ValueError(f"TaskBatch.{name} has T={getattr(self, name).shape[0]} tasks "
                                 f"but support_x has T={T}")
        nonempty_sets(self.support_x, self.query_x, prefix="TaskBatch.")
        for x, y, xn, yn in ((self.support_x, self.support_y, *names[:2]),
                             (self.query_x, self.query_y, *names[2:])):
            if y.shape[1] != x.shape[1]:
                raise ValueError(f"TaskBatch.{yn} has {y.shape[1]} examples per task but {xn} "
                                 f"has {x.shape[1]}")
            if not x.dtype.is_floating_point:
                raise ValueError(f"TaskBatch.{xn} must be a floating-point tensor, got {x.dtype}")
            if y.dtype.is_floating_point:
                if y.dtype != x.dtype:
                    raise ValueError(f"TaskBatch.{yn} has dtype {y.dtype} but {xn} has {x.dtype}")
            elif y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise ValueError(f"TaskBatch.{yn} must hold integer class labels or float targets, "
                                 f"got {y.dtype}")
        if self.query_x.shape[2:] != self.support_x.shape[2:]:
            raise ValueError(f"TaskBatch.query_x examples have shape {tuple(self.query_x.shape[2:])} "
                             f"but support_x examples have {tuple(self.support_x.shape[2:])}")
        if self.query_y.dtype != self.support_y.dtype or self.query_y.shape[2:] != self.support_y.shape[2:]:
            raise ValueError("TaskBatch.query_y must have support_y's dtype and per-example shape, got "
                             f"{self.query_y.dtype} {tuple(self.query_y.shape[2:])} vs "
                             f"{self.support_y.dtype} {tuple(self.support_y.shape[2:])}")
        devices = {t.device for t in (self.support_x, self.support_y, self.query_x, self.query_y)}
        if len(devices) > 1:
            raise ValueError(f"TaskBatch tensors must share one device, got {sorted(map(str, devices))}")
        # Integer labels index the classes: int64 is what cross_entropy and one_hot take.
        if not self.support_y.dtype.is_floating_point:
            self.support_y, self.query_y = self.support_y.long(), self.query_y.long()

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def to(self, *args, **kwargs) -> "TaskBatch":
        """A copy moved with ``Tensor.to`` (labels keep their integer dtype)."""
        device = torch.empty(0).to(*args, **kwargs).device

        def move(t):
            return t.to(*args, **kwargs) if t.dtype.is_floating_point else t.to(device)
        return TaskBatch(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass
class MetaStepResult:
    """What one meta_step computed (all detached).

    Attributes:
        meta_loss: the scalar that was back-propagated.
        query_loss: ``[T]`` mean query loss per task at the adapted parameters.
        logdet: ``[T]`` ``log det H_i`` per task (LLAMA), else None.
        query_accuracy: ``[T]`` query accuracy per task (cross_entropy), else None.
        timings: seconds per phase when ``timings=True`` ("forward": inner loop, query loss
            and capture; "curvature": factors and log-det; "backward"; "step"; "total").
        global_means: set by meta_step: ``{"tasks": T, "meta_loss": ..., "query_loss": ...,
            "query_accuracy": ..., "logdet": ...}`` (0-dim float64 tensors, so that no value
            forces a host sync; accuracy and log-det only where computed), the means over the
            whole meta-batch. With a ``grad_sync`` these are
            all-reduced over the ranks (identical everywhere) and ``meta_loss`` is the global
            meta-loss, while the per-task tensors hold this rank's shard only.
        step_skipped: True when the meta-loss or a meta-gradient was not finite, so meta_step
            did not call ``optimizer.step()``.
        nonfinite_grads: how many parameter tensors had a NaN or Inf gradient (all of them
            when the meta-loss was not finite); 0 after an applied step.
    """

    meta_loss: torch.Tensor
    query_loss: torch.Tensor
    logdet: torch.Tensor | None = None
    query_accuracy: torch.Tensor | None = None
    timings: dict | None = None
    global_means: dict | None = None
    step_skipped: bool = False
    nonfinite_grads: int = 0


def local_means(result, tasks):
    """global_means of a single-process step: the means over this batch."""
    f64 = dict(dtype=torch.float64, device=result.meta_loss.device)
    means = {"tasks": torch.tensor(float(tasks), **f64), "meta_loss": result.meta_loss.to(**f64)}
    for name in ("query_loss", "query_accuracy", "logdet"):
        value = getattr(result, name)
        if value is not None:
            means[name] = value.to(**f64).mean()
    return means
