"""The run folder's exclusive lock: one `llama-fast train` writes into a folder at a time.

The lock is a BSD ``flock`` on the folder itself (no lock file to leave behind or clean up):
the kernel releases it when the holding process exits, however it exits, so a killed run never
leaves a stale lock. A second run into the same folder fails at once instead of interleaving
its config, metrics and checkpoint with the first one's.

A run killed while it writes a checkpoint or config.toml (temp file + rename) leaves that temp
file behind (``.checkpoint.pt.<random>.tmp``); the previous file is intact. Whoever takes the
lock next removes such files: holding the lock, no other run can be writing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .config import CHECKPOINT_FILE, CONFIG_FILE

# The temp files of checkpoint.save_checkpoint and ExperimentConfig.save; nothing else is removed.
STALE_TEMP_FILES = tuple(f".{name}.*.tmp" for name in (CHECKPOINT_FILE, CONFIG_FILE))


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunFolderUnusable(ValueError):
    """The run folder cannot be created, opened or written (a file in the way, no permission)."""


@contextlib.contextmanager
def locked_run_folder(folder):
    """Create ``folder`` if needed and hold its exclusive lock for the ``with`` block; stale
    temp files of killed writes are removed once the lock is held."""
    folder = Path(folder)
    fd = _open_folder(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder} is in use by another llama-fast run (wait for it to finish, "
                                "or choose another --output)") from None
        remove_stale_temp_files(folder)
        yield folder
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def _open_folder(folder: Path) -> int:
    """A descriptor of ``folder`` (created if missing), which this process can write into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{in_the_way} is a file, not a folder" if in_the_way is not None
                  else f"cannot create or open it ({err.strerror or type(err).__name__})")
        raise RunFolderUnusable(f"{folder}: {reason}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        os.close(fd)
        raise RunFolderUnusable(f"{folder}: not writable by this user")
    return fd


def remove_stale_temp_files(folder) -> list[Path]:
    """Remove the temp files killed writes left in ``folder`` (call with its lock held)."""
    removed = []
    for pattern in STALE_TEMP_FILES:
        for path in Path(folder).glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
