"""The native codec speaks docs/protocol.md byte for byte: every golden vector of tests/vectors/ passes in C++."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from android_harness.native import WIRE_CHECK_BINARY, ensure_built

VECTORS = Path(__file__).parent / "vectors"
# The comparison benchmark's baselines (protocol §16): a native device runs FedCache only, so it need not speak them.
BASELINE_KINDS = {"fd_update", "fd_global", "model_put", "model_ack", "model_get", "model_state"}


@pytest.fixture(scope="module")
def native_results() -> dict[str, dict[str, Any]]:
    """One native decode (and re-encode) of every vector, keyed by vector name."""
    ensure_built()
    files = sorted(VECTORS.glob("*.bin"))
    out = subprocess.run(
        [str(WIRE_CHECK_BINARY), *map(str, files)], capture_output=True, text=True, check=True, timeout=60
    )
    results = [json.loads(line) for line in out.stdout.splitlines()]
    return {Path(r["file"]).stem: r for r in results}


def _vectors() -> list[str]:
    return sorted(p.stem for p in VECTORS.glob("*.json"))


def _same(decoded: Any, expected: Any) -> bool:
    if isinstance(expected, list) and expected and isinstance(expected[0], list | float):
        return bool(np.array_equal(np.asarray(decoded, np.float32), np.asarray(expected, np.float32)))
    return bool(decoded == expected)


def test_every_vector_is_checked(native_results: dict[str, dict[str, Any]]) -> None:
    assert len(native_results) == len(_vectors()) > 60


@pytest.mark.parametrize("name", _vectors())
def test_vector(name: str, native_results: dict[str, dict[str, Any]]) -> None:
    vector = json.loads((VECTORS / f"{name}.json").read_text())
    result = native_results[name]
    if "error" in vector:
        assert result.get("error") == vector["error"], result
        return
    if vector["kind"] in BASELINE_KINDS:
        assert "does not implement" in result.get("unsupported", ""), result
        return
    assert result.get("kind") == vector["kind"], result
    assert result["reencoded_equal"] is True  # encoding the decoded fields gives the file byte for byte
    fields = result["fields"]
    assert fields.keys() == vector["fields"].keys()
    mismatched = {k: (fields[k], v) for k, v in vector["fields"].items() if not _same(fields[k], v)}
    assert not mismatched


def test_mangled_payloads_are_rejected_never_crash(tmp_path: Path) -> None:
    """Bit flips, truncations and splices of every valid vector: each is decoded or rejected with a code."""
    ensure_built()
    rng = np.random.default_rng(7)
    valid = [p.read_bytes() for p in sorted(VECTORS.glob("*.bin")) if not p.name.startswith("invalid_")]
    files = []
    for i in range(400):
        data = bytearray(valid[i % len(valid)])
        mode = i % 4
        if mode == 0 and data:
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif mode == 1:
            data = data[: int(rng.integers(len(data) + 1))]
        elif mode == 2:
            other = valid[int(rng.integers(len(valid)))]
            data = data[: len(data) // 2] + other[len(other) // 2 :]
        else:
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        path = tmp_path / f"m{i:03d}.bin"
        path.write_bytes(bytes(data))
        files.append(path)
    out = subprocess.run([str(WIRE_CHECK_BINARY), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(files)
    codes = {"too_large", "bad_encoding", "bad_version", "bad_schema", "bad_dtype", "bad_shape", "non_finite"}
    assert all(r.get("error") in codes or "kind" in r or "unsupported" in r for r in results)
    assert sum("error" in r for r in results) > 100  # most mangled payloads are caught
