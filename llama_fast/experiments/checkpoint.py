"""Training checkpoints: atomic writes, safe loads, and every RNG state a resumed run needs.

A checkpoint is ``torch.save({"format": FORMAT, "version": VERSION, "sha256": digest,
"state": state})``. It is written to a temporary file in the target's directory, fsynced and
``os.replace``d, so a run killed mid-write leaves the previous checkpoint intact (and, at worst,
an orphan ``.checkpoint.pt.*.tmp``, removed by the next run that locks the folder). It is read
with ``torch.load(weights_only=True)`` (no arbitrary code from a checkpoint file), so ``state``
must hold only tensors, numbers, strings, None and dicts/lists/tuples of them:
``capture_rng_state`` stores numpy's state as a tensor for that reason.

``digest`` is a SHA-256 of ``state``'s content (every key, value, tensor dtype, shape and byte),
recomputed on load: torch.load does not check the zip's CRCs, so without it one flipped bit in
a tensor's bytes loads as a wrong weight. Hashing the loaded content rather than the file's
bytes keeps the checksum inside the one file (no sidecar to fall out of step with it after a
kill) and the file an ordinary torch file. Version-1 checkpoints (written before the checksum)
still load, with a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "llama_fast.checkpoint"
VERSION = 2
UNVERIFIED_VERSION = 1   # the format before the checksum: loaded with a warning


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
    payload = {"format": FORMAT, "version": VERSION, "sha256": state_digest(state), "state": state}
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


def state_digest(state) -> str:
    """SHA-256 of a checkpoint state's content: equal for a state and its save/load round
    trip, different after any change to a key, a value, or a tensor's dtype, shape or bytes."""
    digest = hashlib.sha256()
    _hash_into(digest, state)
    return digest.hexdigest()


def _hash_into(digest, value) -> None:
    # Every item is tagged with its type (and containers with their length), so that no two
    # different states feed the same byte stream: [1, 2] differs from [[1], 2] and from (1, 2).
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"T{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(data.numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _hash_into(digest, key)
            _hash_into(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _hash_into(digest, item)
    elif isinstance(value, float):
        digest.update(b"F" + struct.pack("<d", value))   # bit-exact, NaN and -0.0 included
    elif value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device)):
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"a checkpoint state cannot hold a {type(value).__name__} (weights_only "
                        "loads tensors, numbers, strings, None and dicts/lists/tuples of them)")


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
    if payload.get("version") not in (VERSION, UNVERIFIED_VERSION):
        raise CheckpointError(path, f"checkpoint version {payload.get('version')!r}; this llama_fast "
                                    f"reads versions {UNVERIFIED_VERSION} and {VERSION}")
    if not isinstance(payload.get("state"), dict):
        raise CheckpointError(path, "checkpoint has no state dict")
    _verify(path, payload)
    return payload["state"]


def _verify(path: Path, payload: dict) -> None:
    """The state's content matches the checksum written with it (version 2)."""
    if payload["version"] == UNVERIFIED_VERSION:
        warnings.warn(f"{path}: a version-{UNVERIFIED_VERSION} checkpoint, written without a checksum: "
                      "loaded unverified (the next checkpoint of the run is written with one)",
                      stacklevel=3)
        return
    saved = payload.get("sha256")
    if not isinstance(saved, str):
        raise CheckpointError(path, "checkpoint has no checksum (sha256): corrupt or not written by "
                                    "llama_fast")
    try:
        actual = state_digest(payload["state"])
    except TypeError as err:
        raise CheckpointError(path, f"corrupt checkpoint: {err}") from None
    if actual != saved:
        raise CheckpointError(path, f"corrupt checkpoint: its content does not match the checksum "
                                    f"written with it (sha256 {actual[:12]}... instead of {saved[:12]}...); "
                                    "restore it from a copy or train into a new --output")


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
