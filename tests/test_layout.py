"""The package's layers import one way, ops <- meta <- experiments: a module may import its own
layer and the layers below it, never one above (nor the package root, which imports ops and
meta, from inside them). Every import statement counts, deferred ones inside functions too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llama_fast"
LAYERS = {"ops": 0, "meta": 1, "experiments": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, source: str | None = None):
    """(line, absolute module name) of every import in the file (or in ``source`` as if it
    were that file), relative ones resolved."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import name` may import the submodule pkg.name
            names = [f"{base}.{alias.name}" for alias in node.names] if not node.module or node.level else []
            yield node.lineno, base
            for name in names:
                yield node.lineno, name


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "llama_fast":
        return None
    if len(parts) == 1:
        return "root"
    return parts[1] if parts[1] in LAYERS else None


def _modules():
    return sorted(p for layer in LAYERS for p in (PACKAGE / layer).rglob("*.py"))


def test_every_layer_has_modules():
    assert {p.relative_to(PACKAGE).parts[0] for p in _modules()} == set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_one_way(path):
    own = LAYERS[path.relative_to(PACKAGE).parts[0]]
    wrong = []
    for line, module in _imported_modules(path):
        layer = _layer(module)
        if layer == "root" and own < LAYERS["experiments"]:
            wrong.append(f"line {line}: {module} (the package root imports this layer)")
        elif layer in LAYERS and LAYERS[layer] > own:
            wrong.append(f"line {line}: {module}")
    assert not wrong, f"{path.relative_to(PACKAGE)} imports against ops <- meta <- experiments: {wrong}"


def test_the_checker_sees_a_deferred_wrong_import():
    """Relative imports are resolved and function bodies walked: a meta module importing the
    experiments layer inside a function is caught."""
    probe = PACKAGE / "meta" / "probe.py"
    found = [m for _, m in _imported_modules(probe, "def f():\n    from ..experiments import data\n")]
    assert "llama_fast.experiments" in found and "llama_fast.experiments.data" in found
    assert _layer("llama_fast.experiments.data") == "experiments"
