"""Loads the compiled extension llama_fast._C, which registers every torch.ops.llama_fast op.

Fails with one clear ImportError when the extension is missing or was built against a
different torch than the one running, naming both versions.
"""

import importlib
from pathlib import Path

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation ."
PACKAGE = Path(__file__).resolve().parents[1]


def _checkout_hint() -> str | None:
    """Advice when the package imported is a source checkout without a build in it: a user
    who ran `pip install .` and then Python or pytest from the checkout imports the checkout's
    llama_fast/ (the current directory comes first on sys.path), not the installed one."""
    root = PACKAGE.parent
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return None
    if any(PACKAGE.glob("_C*.so")) or any(PACKAGE.glob("_C*.pyd")):
        return None
    return (f"llama_fast is being imported from its source checkout ({PACKAGE}), which holds no "
            f"compiled extension. Build it in place with `pip install -e .` (an editable install; "
            f"add \".[test]\" for the tests), or run Python from another directory so that the "
            f"installed package is imported")


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
        hint = _checkout_hint()
        if hint is not None:
            raise ImportError(hint) from err
        built = info.TORCH_VERSION if info is not None else "unknown"
        raise ImportError(
            f"llama_fast._C, the compiled extension, could not be loaded ({err}). It was built "
            f"against torch {built}; torch {torch.__version__} is running; {REBUILD_HINT}"
        ) from err


def cuda_kernels_built() -> bool:
    """Whether this build contains the CUDA kernels."""
    info = _build_info()
    return bool(info is not None and info.WITH_CUDA)
