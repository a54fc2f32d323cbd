"""DIR/manifest.json: every exported artifact with its provenance, checksum, size and parity figures.

Devices pick their files from it (edge/backends.py) and check the sha256 before loading, so a manifest is
merged, not overwritten, when several exports share a directory, and it is written under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.files import write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("onnx", "executorch-inference", "executorch-training")


@dataclass(frozen=True)
class ArtifactRecord:
    """One exported file. `version` is the ONNX opset or the ExecuTorch version that wrote it."""

    kind: str
    path: str
    architecture: str
    input_shape: tuple[int, int, int]
    classes: int
    version: str
    sha256: str
    size_bytes: int
    parity: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"artifact kind must be one of {KINDS}, got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactRecord:
        values = dict(data)
        values["input_shape"] = tuple(int(n) for n in values["input_shape"])
        return cls(**values)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_for(
    path: Path,
    *,
    root: Path,
    kind: str,
    architecture: str,
    input_shape: tuple[int, int, int],
    classes: int,
    version: str,
    parity: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ArtifactRecord:
    """Describe a written file (checksum and size are read back from disk, not trusted from memory)."""
    return ArtifactRecord(
        kind=kind,
        path=str(path.relative_to(root)),
        architecture=architecture,
        input_shape=input_shape,
        classes=classes,
        version=version,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        parity=parity or {},
        metadata=metadata or {},
    )


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive lock on the artifact directory: concurrent exporters (device processes) take turns."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".manifest.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(root: Path) -> list[ArtifactRecord]:
    """Records of DIR/manifest.json (empty when there is none yet)."""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unsupported manifest format {data.get('format')!r}")
    return [ArtifactRecord.from_json(item) for item in data["artifacts"]]


def write_manifest(root: Path, records: list[ArtifactRecord], *, environment: dict[str, str]) -> Path:
    """Merge `records` into DIR/manifest.json (same path replaces), sorted by path; call under `locked`."""
    merged = {r.path: r for r in read_manifest(root)}
    merged.update({r.path: r for r in records})
    data = {
        "format": MANIFEST_FORMAT,
        "environment": environment,
        "artifacts": [merged[p].to_json() for p in sorted(merged)],
    }
    return write_atomic(Path(root) / MANIFEST_NAME, (json.dumps(data, indent=2) + "\n").encode())


def verify(root: Path, record: ArtifactRecord) -> Path:
    """The artifact's path, after checking its size and sha256 against the manifest."""
    path = Path(root) / record.path
    if not path.exists():
        raise FileNotFoundError(f"{path} listed in the manifest is missing")
    if path.stat().st_size != record.size_bytes or sha256_file(path) != record.sha256:
        raise ValueError(f"{path} does not match its manifest checksum")
    return path


__all__ = [
    "KINDS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ArtifactRecord",
    "locked",
    "read_manifest",
    "record_for",
    "sha256_file",
    "verify",
    "write_manifest",
]
