"""The meta-learning layer: MAML and LLAMA over batches of tasks, on top of ``llama_fast.ops``.

``types`` (TaskBatch, MetaStepResult) is a leaf; ``functional`` and ``backprop`` capture each
K-FAC layer's inputs and output gradients; ``step`` holds meta_step and meta_objective;
``posterior`` adapt, kron_laplace and TaskPosterior; ``distributed`` data-parallel training
helpers; ``models`` the reference networks. Nothing here imports from ``llama_fast.experiments``.
"""

from . import distributed, models
from .posterior import TaskPosterior, adapt, kron_laplace
from .step import meta_objective, meta_step
from .types import MetaStepResult, TaskBatch

__all__ = ["MetaStepResult", "TaskBatch", "TaskPosterior", "adapt", "distributed", "kron_laplace",
           "meta_objective", "meta_step", "models"]
