"""A device's last messages reach the broker before it exits: over 30 % packet loss, and a bounded wait otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from android_harness.netns import NetnsLab, netns_unavailable_reason
from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_to_toml
from edge.link import KnowledgeLink
from edge.state import EXIT_UNDELIVERED, read_last_report
from fedwire.mosquitto import MosquittoBroker, free_port
from fedwire.mqtt import BrokerAddress, connect_persistent, make_client
from fedwire.topics import ALL_METRICS, device_of_metrics_topic

NETNS = netns_unavailable_reason()
DEVICES = 6
ROUNDS = 3
LOSS = 0.3
REPO = Path(__file__).resolve().parents[1]

BLIP_S = 2.0

# One device's end of run, as edge/runtime.py ends it: report, then close the link (wait for the broker's
# PUBACKs, bounded) and exit with the device's status. Run inside the device's lossy namespace; it reports
# when the test says "go" (after cutting its link).
FINISH_SCRIPT = """
import sys, time
from edge.link import KnowledgeLink
from edge.state import EXIT_UNDELIVERED
from fedwire.mqtt import BrokerAddress
device, url, round_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
link = KnowledgeLink(device_id=device, address=BrokerAddress.parse(url))
link.start(timeout=120)
print("ready", flush=True)
sys.stdin.readline()
link.publish_metrics({"device": device, "round": round_, "done": True, "wall_time": time.time()})
sys.exit(EXIT_UNDELIVERED if link.close(timeout=120) else 0)
"""


def _finish_through_a_blip(lab: NetnsLab, index: int, command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run one device's end: its link drops as it reports and comes back BLIP_S later if the device still
    runs; the moment the device exits its link goes down for good (a phone switched off, a namespace torn
    down), so only what the broker acknowledged before the exit can ever arrive."""
    process = subprocess.Popen(
        lab.command(index, command), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline().strip() == "ready", process.stderr.read() if process.stderr else ""
    lab.cut(index)
    process.stdin.write("go\n")
    process.stdin.flush()
    try:
        process.wait(timeout=BLIP_S)
    except subprocess.TimeoutExpired:
        lab.restore(index)
        process.wait(timeout=300)
    lab.cut(index)
    return process.returncode, process.stderr.read() if process.stderr else ""


class _Reports:
    """(device, round) pairs received on the metrics topics by a watcher on loopback (no loss on its side)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.changed = threading.Condition()

    def on_message(self, _c: Any, _u: Any, message: Any) -> None:
        report = json.loads(message.payload)
        with self.changed:
            self.seen.add((str(device_of_metrics_topic(message.topic)), int(report["round"])))
            self.changed.notify_all()

    def wait_for(self, expected: set[tuple[str, int]], timeout: float) -> set[tuple[str, int]]:
        """What of `expected` is still missing after waiting at most `timeout`."""
        with self.changed:
            self.changed.wait_for(lambda: expected <= self.seen, timeout=timeout)
            return expected - self.seen


@pytest.mark.skipif(NETNS is not None, reason=f"network namespaces unavailable: {NETNS}")
def test_every_final_report_arrives_over_a_lossy_link_that_blips_at_the_end(tmp_path: Path) -> None:
    """30 % packet loss, the link down for BLIP_S as each device sends its final report, and cut for good
    the moment the device exits: every report arrives, because a device exits only once the broker
    acknowledged it. A device that slept 0.2 s and left (the code before) lost every one of them.
    """
    reports = _Reports()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with (
        NetnsLab(devices=DEVICES) as lab,
        MosquittoBroker(data_dir=tmp_path / "broker", extra_binds=(lab.bridge_address,)) as broker,
    ):
        watcher = make_client(client_id=f"final-delivery-watch-{os.getpid()}")
        watcher.on_message = reports.on_message
        subscribed = threading.Event()
        watcher.on_connect = lambda c, *_: c.subscribe(ALL_METRICS, qos=1)
        watcher.on_subscribe = lambda *_: subscribed.set()
        connect_persistent(watcher, broker.address)
        watcher.loop_start()
        try:
            assert subscribed.wait(10)
            url = f"mqtt://{lab.bridge_address}:{broker.port}"
            for round_ in range(ROUNDS):
                for index in range(DEVICES):
                    lab.restore(index)
                    lab.lossy(index, LOSS)
                with ThreadPoolExecutor(max_workers=DEVICES) as pool:
                    running = [
                        pool.submit(
                            _finish_through_a_blip,
                            lab,
                            i,
                            [sys.executable, "-c", FINISH_SCRIPT, f"lossy{i}", url, str(round_)],
                            env,
                        )
                        for i in range(DEVICES)
                    ]
                    outcomes = [future.result() for future in running]
                for returncode, stderr in outcomes:
                    assert returncode == 0, stderr[-2000:]
                expected = {(f"lossy{index}", round_) for index in range(DEVICES)}
                # The broker acknowledged every report before its device exited: it only has to hand them on.
                assert reports.wait_for(expected, timeout=30) == set(), f"round {round_}: reports lost"
        finally:
            watcher.disconnect()
            watcher.loop_stop()


def test_close_reports_what_the_broker_never_acknowledged() -> None:
    """No broker at the address: the report stays unacknowledged, and close() says so after its bound."""
    link = KnowledgeLink(device_id="nobody-listens", address=BrokerAddress("127.0.0.1", free_port()))
    link.start()
    link.publish_metrics({"done": True})
    started = time.monotonic()
    assert link.close(timeout=1.0) == 1
    assert time.monotonic() - started < 10


def test_device_that_cannot_deliver_its_last_report_exits_with_a_distinct_status(tmp_path: Path) -> None:
    """It trains to the end, keeps its last report on disk, logs why, and exits EXIT_UNDELIVERED (not 0)."""
    state = tmp_path / "state"
    config = DeviceConfig(
        id="unheard",
        broker=f"mqtt://127.0.0.1:{free_port()}",
        state_dir=str(state),
        delivery_timeout_s=1.0,
        data=DataConfig(dataset="digits", num_devices=4, index=0),
        train=TrainConfig(algorithm="local", arch="cnn", epochs=1),
        hash=HashConfig(dim=64),
    )
    path = tmp_path / "device.toml"
    path.write_text(config_to_toml(config))
    done = subprocess.run(
        [sys.executable, "-m", "edge", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == EXIT_UNDELIVERED, done.stderr[-2000:]
    assert "unacknowledged by the broker" in done.stderr
    report = read_last_report(state)
    assert report is not None and report["done"] and report["device"] == "unheard"
