"""`kill PID` of a trial or of a benchmark stops the broker, the cache server and the devices it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTED_TIMEOUT_S = 240.0
EXIT_TIMEOUT_S = 90.0


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, from /proc (the comm field may hold spaces, so split after its ')')."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> dict[int, str]:
    tree, found, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "android_harness", "trial", "--dataset", "digits", "--devices", "2", "--epochs", "40"],
        ["-m", "bench", "comparison", "--quick", "--epochs", "40", "--methods", "fedcache"],
    ],
    ids=["trial", "bench-comparison"],
)
def test_sigterm_stops_everything_the_command_started(command: list[str], tmp_path: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    top = subprocess.Popen(
        [sys.executable, *command, "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + STARTED_TIMEOUT_S
        while time.monotonic() < deadline and top.poll() is None:
            started = _descendants(top.pid)
            lines = started.values()
            if sum("edge" in c for c in lines) >= 2 and any("broker_server" in c for c in lines):
                break
            time.sleep(0.5)
        lines = list(started.values())
        assert sum("edge" in c for c in lines) >= 2, f"the devices never started: {lines}"
        assert any("broker_server" in c for c in lines) and any("mosquitto" in c for c in lines), lines
        top.send_signal(signal.SIGTERM)
        assert top.wait(timeout=EXIT_TIMEOUT_S) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        left = {pid: line for pid, line in started.items() if _alive(pid)}
        assert not left, f"still running after the command exited: {left}"
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        for pid in started:  # a failed run must not leave them to the next test (they outlive their parent)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
