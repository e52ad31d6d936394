"""The llama-fast command."""

import subprocess
import sys

import pytest

from llama_fast import cli


def test_info_lists_ops(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch.ops.llama_fast.kfac_factors" in out and "CUDA kernels built" in out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "llama_fast", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "llama_fast" in result.stdout


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as err:
        cli.main(["nonsense"])
    assert err.value.code == 2


def test_bench_without_checkout(tmp_path, capsys):
    assert cli.main(["bench", "--root", str(tmp_path)]) == 2
    assert "no benchmarks/" in capsys.readouterr().err
