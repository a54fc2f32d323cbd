"""The device runtime as a wheel holding only what `python -m edge` imports: edge, fedwire, the device's part of export.

A device must not carry the server, the harness or the exporter (ExecuTorch's compiler, onnx). Which export
modules the device needs is not hard-coded: it is the closure of every first-party import (module level and
inside functions) reachable from the `edge` and `fedwire` packages, minus the workstation-only exporter
entry points. So when edge starts importing another export module, the wheel picks it up.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "fedcache-edge-device"
VERSION = "0.1.0"
# Whole packages a device runs; other first-party packages are reached only through their imports.
DEVICE_PACKAGES = ("edge", "fedwire")
FIRST_PARTY = ("edge", "fedwire", "export", "broker_server", "android_harness", "bench")
# Reached only when a device exports a missing ExecuTorch program itself; a flashed bundle ships the program.
EXPORTER_ONLY = frozenset({"export.artifacts", "export.__main__"})
BASE_DEPENDENCIES = ("numpy>=2.0", "torch==2.13.0", "paho-mqtt==2.2.0", "msgpack>=1.0", "onnxruntime>=1.18")
EXECUTORCH_DEPENDENCY = "executorch==1.5.1"
_PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index")


@dataclass(frozen=True)
class DeviceWheel:
    """A built wheel and what went into it."""

    path: Path
    modules: tuple[str, ...]
    dependencies: tuple[str, ...]


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """First-party modules `path` imports anywhere (a lazy import inside a function counts)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name.split(".")[0] in FIRST_PARTY}


def device_modules(root: Path = REPO_ROOT) -> tuple[str, ...]:
    """Every first-party module a device can import, as dotted names, parents included, sorted."""
    pending = [
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for package in DEVICE_PACKAGES
        for p in sorted((root / package).rglob("*.py"))
    ]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen or module in EXPORTER_ONLY:
            continue
        path = _module_file(module, root)
        if path is None:  # `from pkg import name` where name is not a module
            continue
        seen.add(module)
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        pending += sorted(_imports(path, module))
    return tuple(sorted(seen))


def _pyproject(packages: list[str], dependencies: tuple[str, ...]) -> str:
    quoted = ", ".join(f'"{p}"' for p in packages)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{DISTRIBUTION}"\nversion = "{VERSION}"\n'
        'description = "FedCache device runtime (python -m edge), built by python -m android_harness flash"\n'
        f'requires-python = ">=3.11"\ndependencies = [{deps}]\n\n'
        f"[tool.setuptools]\npackages = [{quoted}]\n"
    )


def build_device_wheel(out: Path, *, executorch: bool, root: Path = REPO_ROOT) -> DeviceWheel:
    """Copy the device's modules into a temporary project and `pip wheel` it (no network, no build isolation)."""
    modules = device_modules(root)
    dependencies = BASE_DEPENDENCIES + ((EXECUTORCH_DEPENDENCY,) if executorch else ())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedcache-wheel-") as tmp:
        src = Path(tmp) / "src"
        packages = sorted({m for m in modules if (root.joinpath(*m.split(".")) / "__init__.py").is_file()})
        for module in modules:
            source = _module_file(module, root)
            assert source is not None
            target = src / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        (src / "pyproject.toml").write_text(_pyproject(packages, dependencies))
        built = Path(tmp) / "dist"
        subprocess.run(
            [*_PIP_WHEEL, "-w", str(built), str(src)],
            check=True,
            capture_output=True,
            text=True,
        )
        (wheel,) = built.glob("*.whl")
        final = out / wheel.name
        shutil.copy2(wheel, final)
    return DeviceWheel(path=final, modules=modules, dependencies=dependencies)


__all__ = [
    "BASE_DEPENDENCIES",
    "DISTRIBUTION",
    "EXECUTORCH_DEPENDENCY",
    "DeviceWheel",
    "build_device_wheel",
    "device_modules",
]
