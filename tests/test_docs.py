"""Every ```python block of README.md and docs/*.md runs as written: each in a fresh namespace,
in an empty working directory, on the CPU."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in DOCS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(path, match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def test_readme_has_an_example_block():
    assert any(p.values[0].name == "README.md" for p in _blocks())


@pytest.mark.parametrize("path, code", list(_blocks()))
def test_code_block_runs(path, code, tmp_path, monkeypatch, restore_threads):
    # restore_threads: the sinusoid examples set one thread, as the sinusoid job does.
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(path), "exec"), {"__name__": "__main__"})
