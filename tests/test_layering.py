"""The packages' import directions: fedwire and models at the bottom, edge above them, export and the server beside."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = frozenset({"fedwire", "models", "edge", "export", "broker_server", "android_harness", "bench", "tests"})
# Which of our packages each package may import (itself always). Today's truth: broker_server imports fedwire only.
ALLOWED: dict[str, frozenset[str]] = {
    "fedwire": frozenset(),
    "models": frozenset({"fedwire"}),
    "edge": frozenset({"fedwire", "models"}),
    "export": frozenset({"models"}),
    "broker_server": frozenset({"fedwire"}),
}
# export may run a device trainer to check parity, from inside a function of this module only.
LOCAL_ONLY: dict[str, frozenset[str]] = {"export.parity": frozenset({"edge"})}


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is and whether it sits inside a function body."""

    module: str
    target: str
    line: int
    in_function: bool

    @property
    def package(self) -> str:
        return self.target.split(".")[0]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[Import]:
    """Every import in `path` (relative ones resolved), marked when it is inside a function body."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - child.level + 1])
                    target = f"{anchor}.{target}" if target else anchor
                found.append(Import(module, target, child.lineno, in_function))
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def _package_imports(package: str) -> list[Import]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return [imp for path in files for imp in _imports(path) if imp.package in OURS]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package: str) -> None:
    wrong = []
    for imp in _package_imports(package):
        if imp.package == package or imp.package in ALLOWED[package]:
            continue
        if imp.in_function and imp.package in LOCAL_ONLY.get(imp.module, frozenset()):
            continue
        wrong.append(f"{imp.module}:{imp.line} imports {imp.target}{' (in a function)' if imp.in_function else ''}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package] | {package})}:\n" + "\n".join(wrong)


def test_export_reaches_edge_only_inside_parity_functions() -> None:
    into_edge = [imp for imp in _package_imports("export") if imp.package == "edge"]
    assert into_edge, "export.parity runs the device trainers; the rule below would test nothing"
    assert {imp.module for imp in into_edge} == {"export.parity"}
    assert all(imp.in_function for imp in into_edge), into_edge


def test_the_checker_tells_function_level_from_module_level_imports() -> None:
    found = _imports(ROOT / "export" / "parity.py")
    assert any(imp.target == "edge.et_trainer" and imp.in_function for imp in found)
    assert any(imp.target == "models.loss" and not imp.in_function for imp in found)


def test_importing_the_device_runtime_loads_no_upper_layer() -> None:
    """What actually loads: `python -m edge`'s modules pull in only edge, fedwire and models of ours."""
    code = (
        "import sys, json, models, edge.__main__, edge.runtime, edge.backends, edge.et_trainer, edge.baseline;"
        "import edge.fd_client, edge.fedavg_client;"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(OURS)!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == ["edge", "fedwire", "models"]
