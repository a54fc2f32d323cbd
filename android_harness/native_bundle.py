"""A native device bundle: the C++ device (edge_native/) with its libraries, programs, shard and config, checksummed.

Layout (the bundle is the device's working directory; no Python runs on the device):

    bundle.json, SHA256SUMS     as for a Python bundle (android_harness/bundle.py), backend "native", no wheel
    device.toml                 the device config with its [native] section, every path inside the bundle
    bin/fedcache-device         the command-line device (RPATH $ORIGIN/../lib)
    lib/                        libfedcache_native.so (the C API an app links), the executorch wheel's runtime
                                (libexecutorch, kernels_optimized, backend_xnnpack, threadpool) and the system
                                libraries Debian ships but a bare device may lack (Paho MQTT C, msgpack-c, SQLite)
    models/                     the training program, the encoder program, the initial weights (FCW1)
    data/                       the device's shard as .npy files
    credentials/                a provisioned device's own credentials (as in a Python bundle)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from android_harness import bundle as python_bundle
from android_harness import native
from edge.config import DeviceConfig
from fedwire.mqtt import Credentials

BACKEND = "native"
ET_LIBRARIES = (
    "libexecutorch.so",
    "libexecutorch_kernels_optimized.so",
    "libexecutorch_backend_xnnpack.so",
    "libexecutorch_threadpool.so",
)
# Libraries resolved through ldd and copied: everything else the binary needs is glibc, libstdc++ and OpenSSL.
SYSTEM_LIBRARIES = ("libpaho-mqtt3cs.so", "libmsgpackc.so", "libsqlite3.so")


def _ldd(binary: Path) -> dict[str, Path]:
    """Shared libraries of `binary` as the dynamic linker resolves them here (name -> path)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+) => (\S+)", line)
        if match and match.group(2) != "not":
            found[match.group(1)] = Path(match.group(2))
    return found


def _copy_libraries(out: Path) -> None:
    lib = out / "lib"
    lib.mkdir()
    resolved = _ldd(native.DEVICE_BINARY)
    for name in ET_LIBRARIES:
        if name not in resolved:
            raise python_bundle.BundleError(f"fedcache-device does not resolve {name}: run `make native`")
        shutil.copy2(resolved[name], lib / name)
    for prefix in SYSTEM_LIBRARIES:
        matches = [(n, p) for n, p in resolved.items() if n.startswith(prefix)]
        if not matches:
            raise python_bundle.BundleError(f"fedcache-device links no {prefix}*")
        for name, path in matches:
            shutil.copy2(path, lib / name)
    shutil.copy2(native.BUILD_DIR / "libfedcache_native.so", lib / "libfedcache_native.so")


def build_native_bundle(
    config: DeviceConfig,
    out: Path,
    *,
    artifacts: Path,
    broker: str | None = None,
    provision: Callable[[Path], Credentials] | None = None,
    encoder_kind: str = "conv",
) -> python_bundle.Bundle:
    """Build OUT as this device's native bundle (replacing an older bundle there, refusing anything else)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / python_bundle.MANIFEST_NAME).is_file():
            raise python_bundle.BundleError(f"{out} exists and is not a bundle; refusing to overwrite it")
        shutil.rmtree(out)
    native.ensure_built()
    native.ensure_training_program(config, artifacts=artifacts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bin").mkdir()
    shutil.copy2(native.DEVICE_BINARY, out / "bin" / "fedcache-device")
    _copy_libraries(out)
    security = python_bundle._bundle_credentials(config, out, provision)
    staging = out / ".staging"
    staged = replace(config, broker=broker or config.broker, state_dir=str(staging), security=security)
    toml = native.prepare_native_device(staged, artifacts=artifacts, encoder_kind=encoder_kind)
    models, data = out / "models", out / "data"
    models.mkdir()
    head, section = toml.read_text().split("\n[native]\n", 1)
    lines = section.splitlines()
    for i, line in enumerate(lines):  # the [native] files move into the bundle, named relative to it
        key, _, value = line.partition(" = ")
        if key in ("program", "encoder", "initial_weights"):
            source = Path(json.loads(value))
            shutil.copy2(source, models / source.name)
            lines[i] = f"{key} = {json.dumps(f'models/{source.name}')}"
        elif key == "shard":
            lines[i] = 'shard = "data"'
    text = head.replace(f"state_dir = {json.dumps(str(staging))}", 'state_dir = "state"')
    text += "\n[native]\n" + "\n".join(lines) + "\n"
    shutil.copytree(staging / "native-shard", data)
    shutil.rmtree(staging)
    (out / python_bundle.CONFIG_NAME).write_text(text)
    files = python_bundle._checksums(out)
    manifest = {
        "format": python_bundle.BUNDLE_FORMAT,
        "device": config.id,
        "backend": BACKEND,
        "arch": config.train.arch,
        "wheel": "",
        "modules": [],
        "dependencies": [],
        "command": "bin/fedcache-device --config device.toml",
        "config": python_bundle.CONFIG_NAME,
        "files": files,
    }
    (out / python_bundle.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / python_bundle.CHECKSUMS_NAME).write_text("".join(f"{f['sha256']}  {n}\n" for n, f in files.items()))
    built = python_bundle.Bundle.open(out)
    built.verify()
    return built


__all__ = ["BACKEND", "build_native_bundle"]
