"""Training checkpoints: atomic writes, safe loads, and every RNG state a resumed run needs.

A checkpoint is ``torch.save({"format": FORMAT, "version": VERSION, "state": state})``.
It is written to a temporary file in the target's directory, fsynced and ``os.replace``d, so
a run killed mid-write leaves the previous checkpoint intact. It is read with
``torch.load(weights_only=True)`` (no arbitrary code from a checkpoint file), so ``state``
must hold only tensors, numbers, strings, None and dicts/lists/tuples of them:
``capture_rng_state`` stores numpy's state as a tensor for that reason.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "llama_fast.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not a llama_fast checkpoint."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class TrainingDiverged(RuntimeError):
    """Meta-training stopped after consecutive non-finite steps; the last checkpoint is kept
    as it was (a skipped step changes no weights, and nothing is written on the way out)."""


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "state": state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # make the rename itself durable
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What torch.load raises on truncated, corrupt or non-torch files, and on pickles that
# weights_only refuses (foreign classes): all become a one-line CheckpointError.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
                AttributeError, KeyError, TypeError, UnicodeDecodeError, ImportError, OSError)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The ``state`` saved by ``save_checkpoint``; CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(path, f"not a readable checkpoint (corrupt, truncated, unreadable "
                                    f"or not a torch file): {type(err).__name__}: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, f"a torch file but not a llama_fast checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(path, f"checkpoint version {payload.get('version')!r}; this llama_fast "
                                    f"reads version {VERSION}")
    if not isinstance(payload.get("state"), dict):
        raise CheckpointError(path, "checkpoint has no state dict")
    return payload["state"]


# ----------------------------------------------------------------------------- RNG states


def check_algorithms(state: dict, algorithms, path) -> None:
    """A checkpoint can continue a run only with the algorithms it holds models for."""
    held = list(state.get("models", {}))
    missing = [name for name in algorithms if name not in held]
    if missing:
        raise CheckpointError(path, f"holds models for {', '.join(held) or 'no algorithm'}, not for "
                                    f"{', '.join(missing)}: resume with --algorithm {','.join(held)}, "
                                    "or train into a new --output")


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state a training loop draws from, in a weights_only-loadable dict.

    torch's CPU generator, every CUDA device's (when CUDA is initialised), numpy's and
    python's global generators, and named ``torch.Generator``s (the task samplers').
    """
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng_state`` saved (same ``generators`` names)."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state({
        "bit_generator": saved["bit_generator"],
        "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
        "has_gauss": saved["has_gauss"],
        "gauss": saved["gauss"],
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(f"checkpoint has RNG states of {len(cuda_states)} CUDA devices, "
                             f"this machine has {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(cuda_states)
    missing = sorted(set(generators or {}) - set(state["generators"]))
    if missing:
        raise ValueError(f"checkpoint has no RNG state for generators {missing}")
    for name, generator in (generators or {}).items():
        generator.set_state(state["generators"][name])
