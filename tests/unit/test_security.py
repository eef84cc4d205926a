"""DESIGN.md section 9, enforced on the source: nothing in fracstore unpickles, and the one torch.load (the
migration path for legacy .pt files) passes weights_only=True."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fracstore"
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), filename=str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_module_imports_an_unpickler() -> None:
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in UNPICKLERS]
    assert found == []


def _is_torch_load(call: ast.Call) -> bool:
    func = call.func
    return isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch"


def test_every_torch_load_passes_weights_only_true() -> None:
    calls = [
        (path, node)
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _is_torch_load(node)
    ]
    assert calls, "the migration path's torch.load was not found: this check would prove nothing"
    for path, call in calls:
        weights_only = [k for k in call.keywords if k.arg == "weights_only"]
        assert weights_only, f"{path.name}:{call.lineno} calls torch.load without weights_only=True"
        value = weights_only[0].value
        assert isinstance(value, ast.Constant) and value.value is True, f"{path.name}:{call.lineno}"
    assert {path.name for path, _ in calls} == {"interop.py"}  # the migration path, and nowhere else
