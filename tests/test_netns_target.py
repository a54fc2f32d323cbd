"""A device flashed into its own network namespace boots with its link cut, trains once `restore()` reconnects it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from android_harness.bundle import build_bundle
from android_harness.netns import netns_unavailable_reason
from android_harness.targets import InstallOptions, NetnsTarget
from broker_server.handlers import CacheService
from broker_server.mqtt_server import CacheServer
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig
from fedwire.mosquitto import MosquittoBroker

REASON = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")


def _reaches(target: NetnsTarget, port: int) -> bool:
    """Whether a TCP connection from inside the target's namespace reaches the broker."""
    address = (target.bridge_address, port)
    code = f"import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex({address!r}))"
    done = subprocess.run(
        target.lab.command(target.index, [sys.executable, "-c", code]), capture_output=True, text=True
    )
    return done.stdout.strip() == "0"


def test_netns_device_boots_cut_off_and_trains_after_restore(tmp_path: Path, reuse_install: InstallOptions) -> None:
    config = DeviceConfig(
        id="ns-dev",
        data=DataConfig(dataset="digits", num_devices=2, index=1),
        train=TrainConfig(arch="cnn", epochs=2),
        hash=HashConfig(dim=64),
    )
    target = NetnsTarget(tmp_path / "dev", install=reuse_install)  # makes the bridge the broker listens on
    try:
        _run_cut_then_restored(target, config, tmp_path)
    finally:
        target.stop()
        target.close()


def _run_cut_then_restored(target: NetnsTarget, config: DeviceConfig, tmp_path: Path) -> None:
    bridge = target.bridge_address
    with MosquittoBroker(data_dir=tmp_path / "broker", extra_binds=(bridge,)) as broker:
        service = CacheService.open(None)
        server = CacheServer(service=service, address=broker.address, client_id=f"ns-server-{time.time_ns()}")
        server.start()
        try:
            bundle = build_bundle(config, tmp_path / "bundle", broker=f"mqtt://{bridge}:{broker.port}")
            target.flash(bundle)
            assert _reaches(target, broker.port)
            target.impair(cut=True)
            assert not _reaches(target, broker.port)
            pid = target.start()
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            time.sleep(3)
            assert target.status().running and service.cache.registered("ns-dev") == 0
            target.restore()
            assert _reaches(target, broker.port)
            deadline = time.monotonic() + 90
            while target.status().running:
                assert time.monotonic() < deadline, target.logs(tail=30)
                time.sleep(0.5)
            log = target.logs()
            assert target.status().exit_code == 0, log
            summary = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
            assert summary["done"] and service.cache.registered("ns-dev") == summary["train_samples"]
        finally:
            target.stop()
            server.stop()
            service.close()
