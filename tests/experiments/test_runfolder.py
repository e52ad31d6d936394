"""The run folder: its lock, what a killed run leaves behind, and folders that cannot be one."""

import os
import signal
import subprocess
import sys
import types

import pytest

from llama_fast.experiments import cli
from llama_fast.experiments.checkpoint import load_checkpoint, save_checkpoint
from llama_fast.experiments.runfolder import RunFolderUnusable, locked_run_folder


def test_taking_the_lock_removes_stale_temp_files_of_killed_writes(tmp_path):
    """kill -9 during save_checkpoint or config.save leaves `.checkpoint.pt.<x>.tmp` /
    `.config.toml.<pid>.tmp`; the next run to lock the folder removes them, and nothing else."""
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", {"iteration": 2})
    stale = [run / ".checkpoint.pt.k1l2m3.tmp", run / ".config.toml.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    kept = [run / "notes.tmp", run / ".checkpoint.pt.keep", run / "metrics.csv"]
    for path in kept:
        path.write_text("the user's\n")
    with locked_run_folder(run):
        assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint.pt", *(p.name for p in kept)])
    assert load_checkpoint(run / "checkpoint.pt") == {"iteration": 2}


KILLED_WRITER = """
import os, signal, sys, torch
from llama_fast.experiments.checkpoint import save_checkpoint

def killed_mid_write(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)   # no except/finally runs, as with kill -9

torch.save = killed_mid_write
save_checkpoint(sys.argv[1], {"iteration": 3})
"""


@pytest.mark.integration   # starts a process
def test_a_checkpoint_write_killed_by_sigkill_is_cleaned_by_the_next_train(tmp_path, monkeypatch):
    """SIGKILL inside save_checkpoint leaves the previous checkpoint and an orphan temp file;
    the next `llama-fast train` into the folder removes the orphan once it holds the lock."""
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", {"iteration": 2, "models": {"maml": {}, "llama": {}}})
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run / "checkpoint.pt")])
    assert killed.returncode == -signal.SIGKILL
    orphans = list(run.glob(".checkpoint.pt.*.tmp"))
    assert len(orphans) == 1 and orphans[0].read_bytes() == b"half a checkpoint"
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 2

    calls = []
    fake = types.ModuleType("llama_fast.experiments.run")
    fake.run = lambda config, checkpoint=None: calls.append(checkpoint["iteration"])
    monkeypatch.setitem(sys.modules, "llama_fast.experiments.run", fake)
    (run / "config.toml").write_text('task = "sinusoid"\n')
    assert cli.main(["train", "--output", str(run), "--resume"]) == 0
    assert calls == [2] and not orphans[0].exists()


def test_a_path_under_a_file_is_unusable(tmp_path):
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "file", tmp_path / "file" / "run", tmp_path / "file" / "a" / "b"):
        with pytest.raises(RunFolderUnusable, match=f"{tmp_path / 'file'} is a file, not a folder"):
            with locked_run_folder(folder):
                pass


def test_a_folder_without_write_permission_is_unusable(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # as a user without the right
    with pytest.raises(RunFolderUnusable, match="not writable by this user"):
        with locked_run_folder(tmp_path / "run"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_folder_is_unusable(tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    for folder in (tmp_path / "ro", tmp_path / "ro" / "run"):
        with pytest.raises(RunFolderUnusable, match=str(folder)):
            with locked_run_folder(folder):
                pass
