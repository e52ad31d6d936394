"""Loads the compiled extension llama_fast._C, which registers every torch.ops.llama_fast op.

Fails with one clear ImportError when the extension is missing or was built against a
different torch than the one running, naming both versions.
"""

import importlib

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation ."


def _build_info():
    try:
        return importlib.import_module("llama_fast._build_info")
    except ImportError:
        return None


def _same_release(built: str, running: str) -> bool:
    # "2.14.1+cu130" and "2.14.1" are the same release; the local tag only names the variant.
    return built.split("+")[0] == running.split("+")[0]


def load() -> None:
    info = _build_info()
    if info is not None and not _same_release(info.TORCH_VERSION, torch.__version__):
        raise ImportError(
            f"llama_fast._C was built against torch {info.TORCH_VERSION} but torch "
            f"{torch.__version__} is running; {REBUILD_HINT}"
        )
    try:
        importlib.import_module("llama_fast._C")
    except ImportError as err:
        built = info.TORCH_VERSION if info is not None else "unknown"
        raise ImportError(
            f"llama_fast._C, the compiled extension, could not be loaded ({err}). It was built "
            f"against torch {built}; torch {torch.__version__} is running; {REBUILD_HINT}"
        ) from err


def cuda_kernels_built() -> bool:
    """Whether this build contains the CUDA kernels."""
    info = _build_info()
    return bool(info is not None and info.WITH_CUDA)
