"""Run POSIX shell scripts and copy directories on a device host: this machine (subprocess) or another (ssh/scp).

Targets that run `python -m edge` on a Linux host (local, network namespace, Raspberry Pi, Jetson) differ only
in how a command reaches the host; the install/start/stop scripts (host_device.py) are the same text for all.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class HostCommandError(RuntimeError):
    """A script on the device host exited non-zero; the message carries its output."""


class Shell(Protocol):
    """How commands and files reach one device host."""

    def run(self, script: str, *, timeout: float = 600.0) -> str: ...

    def put_dir(self, local: Path, remote: str) -> None: ...


def _checked(argv: list[str], *, timeout: float, what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise HostCommandError(f"{what} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class LocalShell:
    """This machine: `sh -c`; files are copied with shutil."""

    def run(self, script: str, *, timeout: float = 600.0) -> str:
        return _checked(["sh", "-c", script], timeout=timeout, what=f"sh -c {script[:80]!r}")

    def put_dir(self, local: Path, remote: str) -> None:
        target = Path(remote)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, target)


@dataclass(frozen=True)
class SshShell:
    """Another host over the system `ssh`/`scp`, key authentication only (BatchMode: never a password prompt)."""

    host: str
    user: str = ""
    port: int = 22
    key: Path | None = None
    options: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("StrictHostKeyChecking=no",)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _common(self) -> list[str]:
        args = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        for option in self.options:
            args += ["-o", option]
        if self.key is not None:
            args += ["-i", str(self.key)]
        return args

    def run(self, script: str, *, timeout: float = 600.0) -> str:
        # The remote login shell parses one string: hand it to `sh -c` so every host runs POSIX sh.
        argv = ["ssh", "-p", str(self.port), *self._common(), self.destination, f"sh -c {shlex.quote(script)}"]
        return _checked(argv, timeout=timeout, what=f"ssh {self.destination}")

    def put_dir(self, local: Path, remote: str) -> None:
        parent = str(Path(remote).parent)
        self.run(f"rm -rf {shlex.quote(remote)} && mkdir -p {shlex.quote(parent)}")
        argv = ["scp", "-q", "-r", "-P", str(self.port), *self._common(), str(local), f"{self.destination}:{remote}"]
        _checked(argv, timeout=600.0, what=f"scp to {self.destination}:{remote}")


__all__ = ["HostCommandError", "LocalShell", "Shell", "SshShell"]
