"""Stopping a server process the project started (Mosquitto, redis-server): by its PID, never by name."""

from __future__ import annotations

import subprocess


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
