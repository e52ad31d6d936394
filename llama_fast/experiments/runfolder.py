"""The run folder's exclusive lock: one `llama-fast train` writes into a folder at a time.

The lock is a BSD ``flock`` on the folder itself (no lock file to leave behind or clean up):
the kernel releases it when the holding process exits, however it exits, so a killed run never
leaves a stale lock. A second run into the same folder fails at once instead of interleaving
its config, metrics and checkpoint with the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def locked_run_folder(folder):
    """Create ``folder`` if needed and hold its exclusive lock for the ``with`` block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder} is in use by another llama-fast run (wait for it to finish, "
                                "or choose another --output)") from None
        yield folder
    finally:
        os.close(fd)   # closing the descriptor releases the lock
