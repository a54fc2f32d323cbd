"""Stopping a server process the project started (Mosquitto, redis-server): by its PID, never by name."""

from __future__ import annotations

import signal
import subprocess
from types import FrameType


def terminate(process: subprocess.Popen[bytes] | None, *, timeout: float) -> None:
    """SIGTERM and wait (the server flushes what it persists), SIGKILL if it has not exited within `timeout`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and wait: what a crash of the server looks like to its clients."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit in the main thread, once, so `kill PID` of a command runs its cleanup.

    Why: Python's default SIGTERM ends the process at once and skips every `finally`, and the processes a
    trial or a benchmark started (a private Mosquitto, the cache server, the device processes) are stopped
    by PID only there, so a killed `python -m bench comparison` left them running. A second SIGTERM during
    that cleanup is ignored so that the cleanup finishes; SIGKILL still ends everything at once.
    """

    def _exit(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
