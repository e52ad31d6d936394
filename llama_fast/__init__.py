"""llama_fast: fast Bayesian gradient-based meta-learning (MAML and LLAMA).

Ops are registered as torch.ops.llama_fast.* by the compiled extension; the names here are
thin Python wrappers around them. ``llama_fast.reference`` holds the pure-torch oracle.
"""

from . import _extension

_extension.load()

from . import reference  # noqa: E402
from .chol import chol_logdet  # noqa: E402
from .curvature import KronCurvature  # noqa: E402
from .eig import sym_eig  # noqa: E402
from .kfac import kfac_factors  # noqa: E402
from .logdet import kron_logdet  # noqa: E402
from .lowrank import LowRankFactor  # noqa: E402
from . import models  # noqa: E402
from .meta import MetaStepResult, TaskBatch, meta_step  # noqa: E402
from .posterior import TaskPosterior, adapt, kron_laplace  # noqa: E402
from .sample import kron_sample  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "KronCurvature",
    "LowRankFactor",
    "MetaStepResult",
    "TaskBatch",
    "TaskPosterior",
    "adapt",
    "kron_laplace",
    "meta_step",
    "models",
    "chol_logdet",
    "kfac_factors",
    "kron_logdet",
    "kron_sample",
    "sym_eig",
    "reference",
    "__version__",
]
