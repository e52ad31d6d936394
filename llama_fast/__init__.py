"""llama_fast: fast Bayesian gradient-based meta-learning (MAML and LLAMA).

Three layers, imported one way (``ops <- meta <- experiments``):

- ``llama_fast.ops``: the compiled extension's ops (``torch.ops.llama_fast.*``), their Python
  wrappers and ``reference``, the pure-torch oracle of each;
- ``llama_fast.meta``: meta_step, adapt and the per-task Laplace posterior, distributed
  training helpers, models;
- ``llama_fast.experiments``: the ``llama-fast`` command's jobs (imported on demand).

The public names below are re-exported from the first two.
"""

from . import ops  # noqa: F401  (lf.ops: the ops layer)
from .meta import (MetaStepResult, TaskBatch, TaskPosterior, adapt, distributed, kron_laplace,
                   meta_objective, meta_step, models)
from .ops import (KronCurvature, LowRankFactor, chol_logdet, kfac_factors, kron_logdet, kron_sample,
                  reference, sym_eig)

__version__ = "0.1.0"

__all__ = [
    "KronCurvature",
    "LowRankFactor",
    "MetaStepResult",
    "TaskBatch",
    "TaskPosterior",
    "adapt",
    "kron_laplace",
    "meta_objective",
    "meta_step",
    "models",
    "distributed",
    "chol_logdet",
    "kfac_factors",
    "kron_logdet",
    "kron_sample",
    "sym_eig",
    "reference",
    "__version__",
]
