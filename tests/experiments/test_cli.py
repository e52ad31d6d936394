"""The llama-fast command."""

import subprocess
import sys

import pytest
import torch

from llama_fast.experiments import cli


def test_info_lists_ops(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch.ops.llama_fast.kfac_factors" in out and "CUDA kernels built" in out


def _schema_ops():
    """The extension's ops as the TorchScript schema registry lists them (another route than
    the dispatcher's op names that `info` reads)."""
    return {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("llama_fast::")}


@pytest.mark.integration
def test_module_entry_point_lists_every_registered_op():
    """In a fresh process no op has been looked up yet, so `dir(torch.ops.llama_fast)` would
    list none of them: `info` must still list all."""
    result = subprocess.run([sys.executable, "-m", "llama_fast", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("ops: ", 1)[1].strip().split(", ")
    expected = _schema_ops()
    assert len(expected) >= 7 and "kron_scaled_normal" in expected
    assert sorted(listed) == sorted(f"torch.ops.llama_fast.{name}" for name in expected)


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as err:
        cli.main(["nonsense"])
    assert err.value.code == 2


def test_bench_without_checkout(tmp_path, capsys):
    assert cli.main(["bench", "--root", str(tmp_path)]) == 2
    assert "no benchmarks/" in capsys.readouterr().err
