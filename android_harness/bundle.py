"""A device bundle: everything one device needs to run from nothing but a Python interpreter, checksummed.

Layout (all paths relative to the bundle, which is the device's working directory):

    bundle.json                 format, device, backend, dependencies, sha256 and size of every other file
    SHA256SUMS                  the same checksums in `sha256sum -c` form, so a device verifies with coreutils
    device.toml                 the device config, rewritten to point inside the bundle
    wheels/fedcache_edge_device-*.whl   the edge, fedwire and models packages (device_wheel.py)
    models/manifest.json        models/manifest.py's list of the files below (sha256-checked by edge.backends)
    models/initial-ARCH-sSEED.npz       the device's initial PyTorch weights (what build_model(seed) gives)
    models/ARCH-cC-CxHxW.onnx   the same model for ONNX Runtime inference
    models/*.pte, *.train.pte   ExecuTorch inference and training programs (executorch devices only)
    models/encoder-*.onnx       the frozen hash encoder
    data/shard.npz              this device's train/test shard (edge/shard_file.py)
    credentials/                a provisioned device's own credentials (0700): ca.pem and its password or its
                                device.pem + device.key (secrets 0600); device.toml's [security] points here

Credential files are checksummed like every other file (integrity; a sha256 of a 128-bit random password or of a
key reveals neither) and keep their 0600 mode through the build and a local or scp install.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from android_harness.device_wheel import build_device_wheel
from edge.config import DeviceConfig, SecurityConfig, config_to_toml
from edge.data import device_shard, load_dataset
from edge.shard_file import load_shard, save_shard
from fedwire.mqtt import Credentials
from models.loss import LossSettings
from models.manifest import sha256_file

if TYPE_CHECKING:
    from torch import nn

    from edge.data import Shard
    from export.artifacts import ModelSpec

BUNDLE_FORMAT = 1
MANIFEST_NAME = "bundle.json"
CHECKSUMS_NAME = "SHA256SUMS"
CONFIG_NAME = "device.toml"
SHARD_PATH = "data/shard.npz"
MODELS_DIR = "models"
STATE_DIR = "state"
CREDENTIALS_DIR = "credentials"
# [security] keys that name a file, and whether that file is a secret (kept 0600).
_CREDENTIAL_FILES = {"password_file": True, "ca_file": False, "cert_file": False, "key_file": True}


class BundleError(ValueError):
    """A bundle that is incomplete or whose files do not match bundle.json."""


@dataclass(frozen=True)
class Bundle:
    """A built bundle on disk, as bundle.json describes it."""

    root: Path
    device_id: str
    backend: str
    wheel: str
    dependencies: tuple[str, ...]
    files: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, root: Path) -> Bundle:
        """Read ROOT/bundle.json."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{root} is not a bundle: no {MANIFEST_NAME}")
        data = json.loads(path.read_text())
        if data.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: unsupported bundle format {data.get('format')!r}")
        return cls(
            root=Path(root),
            device_id=data["device"],
            backend=data["backend"],
            wheel=data["wheel"],
            dependencies=tuple(data["dependencies"]),
            files=data["files"],
        )

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def verify(self) -> None:
        """Check every listed file's size and sha256, and that nothing unlisted was added."""
        present = {
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and p.name not in (MANIFEST_NAME, CHECKSUMS_NAME)
        }
        extra = present - set(self.files)
        missing = set(self.files) - present
        if extra or missing:
            raise BundleError(f"{self.root}: files missing {sorted(missing)}, unlisted {sorted(extra)}")
        for name, entry in self.files.items():
            path = self.root / name
            if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{path} does not match its sha256 in {MANIFEST_NAME}")


def _write_models(config: DeviceConfig, models: Path, *, input_shape: tuple[int, int, int], classes: int) -> None:
    """Initial weights, ONNX (always) and the ExecuTorch programs (executorch devices) into `models`."""
    from edge.algorithms import model_seed
    from export.artifacts import ModelSpec, export_model_artifacts
    from export.weights import save_weights
    from models.zoo import build_model

    train = config.train
    seed = model_seed(config)  # the seed the device builds its initial model with
    model = build_model(train.arch, classes=classes, in_channels=input_shape[0], seed=seed).eval()
    save_weights(models / f"initial-{train.arch}-s{seed}.npz", model.state_dict())
    spec = ModelSpec(arch=train.arch, classes=classes, input_shape=input_shape)
    if train.backend == "executorch":
        loss = LossSettings(kd_alpha=train.kd_alpha, temperature=train.temperature)
        export_model_artifacts(spec, models, seed=seed, loss=loss, max_batch=max(train.batch_size, 8))
    else:
        _write_onnx(model, models, spec=spec)
    (models / ".manifest.lock").unlink(missing_ok=True)  # export's lock file is no artifact


def _write_onnx(model: nn.Module, models: Path, *, spec: ModelSpec) -> None:
    """Only the ONNX file (parity-checked, in export's manifest): a torch device trains in PyTorch."""
    from export.artifacts import environment
    from export.onnx_export import ONNX_OPSET, model_to_onnx_bytes
    from export.parity import INFERENCE_TOLERANCE, check, onnx_parity
    from models.manifest import locked, record_for, write_manifest

    input_shape = spec.input_shape
    onnx_bytes = model_to_onnx_bytes(model, input_shape=input_shape)
    diff = onnx_parity(model, onnx_bytes, input_shape=input_shape)
    check({"max_onnx_diff": diff}, what=f"{spec.stem}.onnx")
    path = models / f"{spec.stem}.onnx"
    path.write_bytes(onnx_bytes)
    record = record_for(
        path,
        root=models,
        kind="onnx",
        architecture=spec.arch,
        input_shape=input_shape,
        classes=spec.classes,
        version=str(ONNX_OPSET),
        parity={"max_abs_diff": diff, "tolerance": INFERENCE_TOLERANCE},
    )
    with locked(models):
        write_manifest(models, [record], environment=environment())


def _write_encoder(config: DeviceConfig, models: Path, *, input_shape: tuple[int, int, int]) -> str:
    """The device's hash encoder in the bundle: the one its config names, else the built-in default."""
    from models.encoder import DEFAULT_ENCODER_KIND, export_encoder_onnx

    cfg = config.hash
    if cfg.encoder:
        target = models / Path(cfg.encoder).name
        shutil.copy2(cfg.encoder, target)
    else:
        shape = "x".join(str(n) for n in input_shape)
        target = models / f"encoder-{DEFAULT_ENCODER_KIND}-{shape}-d{cfg.dim}-s{cfg.seed}.onnx"
        export_encoder_onnx(target, input_shape=input_shape, dim=cfg.dim, seed=cfg.seed)
    return f"{MODELS_DIR}/{target.name}"


def _write_shard(config: DeviceConfig, path: Path) -> Shard:
    """The device's shard: cut here exactly as the device would, or copied from the file its config names."""
    data = config.data
    if data.shard:
        shard = load_shard(Path(data.shard), dataset=data.dataset, index=data.index, num_devices=data.num_devices)
    else:
        dataset = load_dataset(data.dataset)
        shard = device_shard(
            dataset,
            num_devices=data.num_devices,
            alpha=data.alpha,
            seed=data.seed,
            index=data.index,
            partition=data.partition,
        )
    save_shard(path, shard)
    return shard


def _bundle_credentials(
    config: DeviceConfig, out: Path, provision: Callable[[Path], Credentials] | None
) -> SecurityConfig:
    """The device's credentials inside the bundle (OUT/credentials) and its [security] with paths relative to OUT.

    `provision` writes fresh credentials into the directory it is given; without it, the files the config's own
    [security] names (relative to where flash runs) are copied, so the bundle never points outside itself.
    """
    directory = out / CREDENTIALS_DIR
    if provision is not None:
        security = provision(directory)
    elif any(getattr(config.security, key) for key in _CREDENTIAL_FILES):
        directory.mkdir(mode=0o700)
        copied = {}
        for key, secret in _CREDENTIAL_FILES.items():
            source = getattr(config.security, key)
            if not source:
                continue
            if not Path(source).is_file():
                raise BundleError(f"[security] {key} = {source!r}: no such file to put in the bundle")
            target = directory / Path(source).name
            if target.exists():
                raise BundleError(f"[security] names two files called {target.name}; rename one")
            shutil.copyfile(source, target)
            os.chmod(target, 0o600 if secret else 0o644)
            copied[key] = str(target)
        security = replace(config.security, **copied)
    else:
        return config.security
    named = {key: getattr(security, key) for key in _CREDENTIAL_FILES if getattr(security, key)}
    return replace(security, **{key: str(Path(path).relative_to(out)) for key, path in named.items()})


def _checksums(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST_NAME, CHECKSUMS_NAME)
    }


def build_bundle(
    config: DeviceConfig,
    out: Path,
    *,
    broker: str | None = None,
    provision: Callable[[Path], Credentials] | None = None,
) -> Bundle:
    """Build OUT as this device's bundle (OUT is replaced if it holds an older bundle, refused if it holds else).

    `broker` overrides the config's broker URL, e.g. the address a namespaced or remote device reaches.
    `provision` gives the device its credentials: called with OUT/credentials, it writes them there (the
    device's own only: `fedwire.fleet.SecurityDir.provision`) and returns them.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise BundleError(f"{out} exists and is not a bundle; refusing to overwrite it")
        shutil.rmtree(out)
    models = out / MODELS_DIR
    models.mkdir(parents=True)
    wheel = build_device_wheel(out / "wheels", executorch=config.train.backend == "executorch")
    shard = _write_shard(config, out / SHARD_PATH)
    _write_models(config, models, input_shape=shard.input_shape, classes=shard.classes)
    encoder = _write_encoder(config, models, input_shape=shard.input_shape)
    security = _bundle_credentials(config, out, provision)
    device_config = replace(
        config,
        broker=broker or config.broker,
        state_dir=STATE_DIR,
        data=replace(config.data, shard=SHARD_PATH),
        train=replace(config.train, artifacts_dir=MODELS_DIR),
        hash=replace(config.hash, encoder=encoder),
        security=security,
    )
    (out / CONFIG_NAME).write_text(config_to_toml(device_config))
    files = _checksums(out)
    manifest = {
        "format": BUNDLE_FORMAT,
        "device": config.id,
        "backend": config.train.backend,
        "arch": config.train.arch,
        "wheel": str(wheel.path.relative_to(out)),
        "modules": list(wheel.modules),
        "dependencies": list(wheel.dependencies),
        "config": CONFIG_NAME,
        "files": files,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / CHECKSUMS_NAME).write_text("".join(f"{f['sha256']}  {name}\n" for name, f in files.items()))
    bundle = Bundle.open(out)
    bundle.verify()
    return bundle


__all__ = [
    "BUNDLE_FORMAT",
    "CONFIG_NAME",
    "CREDENTIALS_DIR",
    "MANIFEST_NAME",
    "Bundle",
    "BundleError",
    "build_bundle",
]
