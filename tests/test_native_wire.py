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
