"""The device runtime as a wheel of the packages `python -m edge` runs: edge, fedwire and models, nothing else.

A device must not carry the server, the harness or the exporter (ExecuTorch's compiler, onnx). The layering
keeps edge's imports inside edge, fedwire and models (tests/test_layering.py), so the wheel is that declared
list of whole packages. A device has no exporter: a bundle ships its programs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "fedcache-edge-device"
VERSION = "0.1.0"
# Every package a device runs, whole; no other first-party package goes into the wheel.
DEVICE_PACKAGES = ("edge", "fedwire", "models")
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


def device_modules(root: Path = REPO_ROOT) -> tuple[str, ...]:
    """Every module of the device packages, as dotted names (packages as their own name), sorted."""
    return tuple(
        sorted(
            ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for package in DEVICE_PACKAGES
            for p in (root / package).rglob("*.py")
        )
    )


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
    "DEVICE_PACKAGES",
    "DISTRIBUTION",
    "EXECUTORCH_DEPENDENCY",
    "DeviceWheel",
    "build_device_wheel",
    "device_modules",
]
