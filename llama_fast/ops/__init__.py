"""The ops layer: the compiled extension's registered ops and their Python wrappers.

Every op is registered as ``torch.ops.llama_fast.*`` by ``llama_fast._C``; the names here are
thin wrappers that check their arguments and call it. ``reference`` holds the pure-torch
oracle of every op. Nothing here imports from ``llama_fast.meta`` or ``llama_fast.experiments``.
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
from .sample import kron_sample  # noqa: E402

__all__ = ["KronCurvature", "LowRankFactor", "chol_logdet", "kfac_factors", "kron_logdet",
           "kron_sample", "sym_eig", "reference"]
