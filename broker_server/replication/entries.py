"""The replication log's entries (hello, register, updates) as msgpack maps, each validated before it is applied.

An entry comes from another server node, through a store an operator runs: it is checked like a device's
message (types, lengths, dtypes, finite logits, device ids), and a bad one is an `EntryError` that the
applier logs and skips instead of stopping replication. Updates name samples by (device id, local sample
id), never by a node's row, so an entry means the same on every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fedwire.constants import DEVICE_ID_PATTERN, HashKind

ENTRY_VERSION = 1
# One entry stays well under Redis's 512 MB string limit and the wire's own 4 MiB payloads.
MAX_ENTRY_BYTES = 16 * 1024 * 1024
MAX_NODE_ID_LEN = 64
_U2 = np.dtype("<u2")
_U4 = np.dtype("<u4")
_I8 = np.dtype("<i8")
_F4 = np.dtype("<f4")


class EntryError(ValueError):
    """A log entry that is not a valid hello, register or updates entry; it changes nothing."""


@dataclass(frozen=True)
class HelloEntry:
    """A device's hello as its node accepted it for the log: applied on every node in log order."""

    origin: str
    device: str
    model: str
    classes: int
    samples: int
    hash_kind: HashKind
    hash_dim: int


@dataclass(frozen=True, eq=False)
class RegisterEntry:
    """A registration chunk: applied on every node in log order, so every node numbers samples alike."""

    origin: str
    device: str
    ids: np.ndarray  # uint32 (n,)
    labels: np.ndarray  # uint16 (n,)
    hashes: np.ndarray  # uint8 (n, hash bytes)


@dataclass(frozen=True, eq=False)
class UpdatesEntry:
    """Knowledge a node accepted: sample (devices[owners[i]], ids[i]) takes logits[i] if versions[i] is newer."""

    origin: str
    devices: tuple[str, ...]
    owners: np.ndarray  # uint32 (n,): index into devices
    ids: np.ndarray  # uint32 (n,)
    versions: np.ndarray  # int64 (n,)
    logits: np.ndarray  # float32 (n, classes)


Entry = HelloEntry | RegisterEntry | UpdatesEntry


def encode_entry(entry: Entry) -> bytes:
    """The entry's bytes in the log: a msgpack map with the entry version, kind ("h", "r", "u") and origin node."""
    body: dict[str, Any] = {"v": ENTRY_VERSION, "o": entry.origin}
    if isinstance(entry, HelloEntry):
        body |= {
            "k": "h",
            "d": entry.device,
            "m": entry.model,
            "c": entry.classes,
            "s": entry.samples,
            "hk": entry.hash_kind.value,
            "hd": entry.hash_dim,
        }
    elif isinstance(entry, RegisterEntry):
        hashes = np.ascontiguousarray(entry.hashes, dtype=np.uint8)
        body |= {
            "k": "r",
            "d": entry.device,
            "i": np.asarray(entry.ids, dtype=_U4).tobytes(),
            "l": np.asarray(entry.labels, dtype=_U2).tobytes(),
            "hw": int(hashes.shape[1]),
            "h": hashes.tobytes(),
        }
    else:
        logits = np.ascontiguousarray(entry.logits, dtype=_F4)
        body |= {
            "k": "u",
            "ds": list(entry.devices),
            "w": np.asarray(entry.owners, dtype=_U4).tobytes(),
            "i": np.asarray(entry.ids, dtype=_U4).tobytes(),
            "n": np.asarray(entry.versions, dtype=_I8).tobytes(),
            "c": int(logits.shape[1]),
            "x": logits.tobytes(),
        }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_entry(data: bytes, *, skip_updates_from: str = "") -> Entry | None:
    """The entry `data` holds, fully validated; EntryError says what is wrong otherwise.

    None for an updates entry of node `skip_updates_from`: a node reads its own updates back from the log and
    has nothing to do with them, so their arrays are not even looked at.
    """
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_ENTRY_BYTES:
        raise EntryError("an entry is bytes of at most 16 MiB")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EntryError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise EntryError("an entry is a map")
    if body.get("v") != ENTRY_VERSION:
        raise EntryError(f"entry version {body.get('v')!r}, this node reads {ENTRY_VERSION}")
    origin = _text(body, "o", limit=MAX_NODE_ID_LEN)
    kind = body.get("k")
    if kind == "h":
        return HelloEntry(
            origin=origin,
            device=_device(body.get("d")),
            model=_text(body, "m", limit=256),
            classes=_count(body, "c"),
            samples=_count(body, "s"),
            hash_kind=_hash_kind(body.get("hk")),
            hash_dim=_count(body, "hd"),
        )
    if kind == "r":
        ids = _array(body, "i", _U4)
        width = _count(body, "hw")
        hashes = _array(body, "h", np.dtype(np.uint8))
        if width == 0 or hashes.size != ids.size * width:
            raise EntryError(f"{hashes.size} hash bytes for {ids.size} samples of {width} bytes")
        labels = _array(body, "l", _U2)
        if labels.size != ids.size:
            raise EntryError(f"{labels.size} labels for {ids.size} samples")
        return RegisterEntry(origin=origin, device=_device(body.get("d")), ids=ids, labels=labels,
                             hashes=hashes.reshape(ids.size, width))  # fmt: skip
    if kind == "u":
        if origin == skip_updates_from:
            return None
        devices = body.get("ds")
        if not isinstance(devices, list):
            raise EntryError("'ds' must be a list of device ids")
        names = tuple(_device(name) for name in devices)
        owners, ids, versions = _array(body, "w", _U4), _array(body, "i", _U4), _array(body, "n", _I8)
        classes = _count(body, "c")
        logits = _array(body, "x", _F4)
        if not owners.size == ids.size == versions.size or logits.size != ids.size * classes or classes == 0:
            raise EntryError(f"{owners.size} owners, {ids.size} ids, {versions.size} versions, {logits.size} logits")
        if owners.size and int(owners.max()) >= len(names):
            raise EntryError("an owner index points past the entry's devices")
        if versions.size and int(versions.min()) < 0:
            raise EntryError("a version is negative")
        if not np.isfinite(logits).all():
            raise EntryError("logits hold NaN or infinite values")
        return UpdatesEntry(origin=origin, devices=names, owners=owners, ids=ids, versions=versions,
                            logits=logits.reshape(ids.size, classes))  # fmt: skip
    raise EntryError(f"unknown entry kind {kind!r}")


def _text(body: dict[str, Any], key: str, *, limit: int) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise EntryError(f"'{key}' must be a non-empty string of at most {limit} characters")
    return value


def _device(value: object) -> str:
    if not isinstance(value, str) or not DEVICE_ID_PATTERN.match(value):
        raise EntryError(f"not a device id: {value!r}")
    return value


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise EntryError(f"'{key}' must be an integer in [0, 2^31)")
    return value


def _hash_kind(value: object) -> HashKind:
    if not isinstance(value, str):
        raise EntryError(f"unknown hash kind {value!r}")
    try:
        return HashKind(value)
    except ValueError:
        raise EntryError(f"unknown hash kind {value!r}") from None


def _array(body: dict[str, Any], key: str, dtype: np.dtype) -> np.ndarray:
    value = body.get(key)
    if not isinstance(value, bytes) or len(value) % dtype.itemsize:
        raise EntryError(f"'{key}' must be bytes holding {dtype.str} values")
    # A copy: the applier keeps these arrays beyond the entry's bytes, and numpy wants them writeable.
    return np.frombuffer(value, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)
