"""Native devices join real trials next to Python devices: one knowledge cache, both directions, TLS too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from android_harness.trial import TrialSettings, run_trial
from broker_server.state_factory import STATE_DIRNAME, open_state

ROOT = Path(__file__).resolve().parent.parent


def _server_holdings(server_dir: Path) -> dict[str, tuple[int, int]]:
    """Per device (registered samples, samples holding knowledge), read through the server's own inspect command."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "broker_server" / "main.py"), "inspect", "--data-dir", str(server_dir)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    holdings = {}
    for line in out.splitlines():
        if ": model " in line:
            device, rest = line.split(": model ", 1)
            registered = int(rest.split("registered ")[1].split(" of ")[0])
            holding = int(rest.split(", ")[2].split(" holding")[0])
            holdings[device] = (registered, holding)
    return holdings


def _neighbour_shares(server_dir: Path, *, native: set[str]) -> dict[str, float]:
    """Over the relation the server builds from its stored state (opened from a copy): the share of Python
    devices' samples with a native neighbour holding knowledge, and the converse."""
    copy = server_dir.parent / "state-copy"
    shutil.copytree(server_dir / STATE_DIRNAME, copy)
    with open_state(copy) as state:
        cache = state.cache  # type: ignore[attr-defined]
        names = [r.device for r in sorted(cache.devices.values(), key=lambda record: record.index)]
        is_native = np.array([name in native for name in names])[cache.sample_devices]
        table = cache.relations.table
        safe = np.maximum(table, 0)
        teaching = (table >= 0) & (cache.versions[safe] >= 0)
        from_native = (teaching & is_native[safe]).any(axis=1)
        from_python = (teaching & ~is_native[safe]).any(axis=1)
        return {
            "python_taught_by_native": float(from_native[~is_native].mean()),
            "native_taught_by_python": float(from_python[is_native].mean()),
        }


def test_half_native_trial_shares_one_knowledge_cache(native_artifacts: Path, tmp_path: Path) -> None:
    shutil.copytree(native_artifacts, tmp_path / "artifacts", dirs_exist_ok=True)
    settings = TrialSettings(out=tmp_path, dataset="digits", devices=4, epochs=3, backends=("torch", "native"))
    report = run_trial(settings, progress=False)
    assert report["exit_status"] == {f"dev00{i}": 0 for i in range(4)}
    assert all(check["ok"] for check in report["invariants"].values()), report["invariants"]
    configs = {i: (tmp_path / "devices" / f"dev00{i}" / "device.toml").read_text() for i in range(4)}
    assert all('backend = "native"' in configs[i] and "[native]" in configs[i] for i in (1, 3))
    assert all('backend = "torch"' in configs[i] for i in (0, 2))
    by_id = {d["id"]: d for d in report["devices"]}
    for device in by_id.values():  # every device, native or not, trained with teachers from the shared cache
        assert device["teacher_coverage"] > 0.5 and device["accuracy"] > 0.5, device
    # The native devices' uploads are in the server's table (so they serve as neighbours for everyone) ...
    holdings = _server_holdings(tmp_path / "server")
    for native in ("dev001", "dev003"):
        assert holdings[native][0] == holdings[native][1] == by_id[native]["train_samples"]
    # Both directions in the server's own relation: Python devices' samples have native neighbours holding
    # knowledge (their teachers average native uploads) and native devices' samples have Python ones.
    shares = _neighbour_shares(tmp_path / "server", native={"dev001", "dev003"})
    assert shares["python_taught_by_native"] > 0.2 and shares["native_taught_by_python"] > 0.2, shares
    # ... and they spoke the protocol like the Python devices: no request of theirs was rejected.
    for native in ("dev001", "dev003"):
        last = json.loads((tmp_path / "devices" / native / "last_report.json").read_text())
        assert last["backend"] == "native" and last["rejections"] == 0 and last["teachers_received"] > 0


def test_native_devices_join_a_secure_trial(native_artifacts: Path, tmp_path: Path) -> None:
    """TLS with a password device and a certificate device (auth 'mixed'), both native."""
    shutil.copytree(native_artifacts, tmp_path / "artifacts", dirs_exist_ok=True)
    settings = TrialSettings(
        out=tmp_path, dataset="digits", devices=2, epochs=1, backends=("native",), security="tls", auth="mixed"
    )
    report = run_trial(settings, progress=False)
    assert report["exit_status"] == {"dev000": 0, "dev001": 0}
    assert all(check["ok"] for check in report["invariants"].values()), report["invariants"]
    configs = [(tmp_path / "devices" / d / "device.toml").read_text() for d in ("dev000", "dev001")]
    assert all('broker = "mqtts://' in c for c in configs)
    assert 'password_file = "/' in configs[0] and 'cert_file = "/' in configs[1]
