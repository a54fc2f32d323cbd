"""An Android phone over adb: the commands a flash/start/stop would run, and a refusal where no phone can be.

Nothing here has run against a phone: this machine has no adb and no USB device. So every method that needs
a phone first checks for `adb` and for SERIAL in `adb devices`, and raises TargetUnavailable otherwise,
with the planned commands in the message; `plan_*` return those commands so they can be read and reviewed.

The plan assumes a Python 3.11 on the phone that runs as the shell user (`python`, e.g. a static CPython
pushed to /data/local/tmp); the ExecuTorch `.train.pte` in the bundle is the file an Android app would load
through ExecuTorch's Java API instead. The phone reaches the broker on this machine through `adb reverse`,
which is also how its link is cut (`adb reverse --remove`) and restored.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

from android_harness.bundle import CONFIG_NAME, Bundle
from android_harness.targets import STOP_TIMEOUT_S, DeviceTarget, TargetStatus, TargetUnavailable

PHONE_ROOT = "/data/local/tmp/fedcache"
DEFAULT_BROKER_PORT = 1883


@dataclass
class AdbTarget(DeviceTarget):
    """Phone SERIAL; `python` is the interpreter path on the phone, `broker_port` the port `adb reverse` maps."""

    serial: str
    python: str = "python3"
    broker_port: int = DEFAULT_BROKER_PORT
    root: str = PHONE_ROOT

    @property
    def url(self) -> str:  # type: ignore[override]
        return f"adb://{self.serial}"

    def _adb(self, *args: str) -> list[str]:
        return ["adb", "-s", self.serial, *args]

    def _shell(self, script: str) -> list[str]:
        return self._adb("shell", script)

    # ------------------------------------------------------------ plans

    def plan_flash(self, bundle: Bundle) -> list[list[str]]:
        q = shlex.quote(self.root)
        return [
            self._adb("wait-for-device"),
            self._shell("getprop ro.product.cpu.abi"),
            self._shell(f"rm -rf {q}/bundle && mkdir -p {q}"),
            self._adb("push", str(bundle.root), f"{self.root}/bundle"),
            self._shell(f"cd {q}/bundle && sha256sum -c SHA256SUMS"),
            self._shell(f"cd {q} && {self.python} -m venv venv"),
            self._shell(f"cd {q} && venv/bin/python -m pip install bundle/{bundle.wheel}"),
            self._adb("reverse", f"tcp:{self.broker_port}", f"tcp:{self.broker_port}"),
        ]

    def plan_start(self, config: str = CONFIG_NAME) -> list[list[str]]:
        q = shlex.quote(self.root)
        return [
            self._shell(
                f"cd {q}/bundle && nohup ../venv/bin/python -m edge --config {shlex.quote(config)} "
                "> ../device.log 2>&1 < /dev/null & echo $! > ../device.pid"
            )
        ]

    def plan_stop(self) -> list[list[str]]:
        return [self._shell(f"kill $(cat {shlex.quote(self.root)}/device.pid)")]

    def plan_status(self) -> list[list[str]]:
        return [self._shell(f"kill -0 $(cat {shlex.quote(self.root)}/device.pid) && echo running")]

    def plan_logs(self, tail: int | None = None) -> list[list[str]]:
        reader = f"tail -n {int(tail)}" if tail else "cat"
        return [self._shell(f"{reader} {shlex.quote(self.root)}/device.log")]

    def plan_impair(self) -> list[list[str]]:
        return [self._adb("reverse", "--remove", f"tcp:{self.broker_port}")]

    def plan_restore(self) -> list[list[str]]:
        return [self._adb("reverse", f"tcp:{self.broker_port}", f"tcp:{self.broker_port}")]

    # ------------------------------------------------------------ running a plan

    def unavailable_reason(self) -> str | None:
        """Why no phone can be driven from here, or None when SERIAL is attached."""
        if shutil.which("adb") is None:
            return "no adb device can exist on this machine: `adb` is not installed and no phone is attached"
        listed = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=30).stdout
        attached = {line.split()[0] for line in listed.splitlines()[1:] if line.strip().endswith("device")}
        if self.serial not in attached:
            return f"phone {self.serial!r} is not attached (adb devices lists {sorted(attached) or 'none'})"
        return None

    def _execute(self, plan: list[list[str]]) -> str:
        reason = self.unavailable_reason()
        if reason is not None:
            steps = "\n".join("  " + shlex.join(step) for step in plan)
            raise TargetUnavailable(f"{self.url}: {reason}. It would run:\n{steps}")
        output = []
        for step in plan:
            output.append(subprocess.run(step, check=True, capture_output=True, text=True, timeout=600).stdout)
        return "".join(output)

    def flash(self, bundle: Bundle) -> None:
        self._execute(self.plan_flash(bundle))

    def start(self, config: str = CONFIG_NAME) -> int:
        self._execute(self.plan_start(config))
        return int(self._execute([self._shell(f"cat {shlex.quote(self.root)}/device.pid")]).strip())

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> TargetStatus:
        self._execute(self.plan_stop())
        return self.status()

    def status(self) -> TargetStatus:
        running = "running" in self._execute([self._shell(self.plan_status()[0][-1] + " || true")])
        return TargetStatus(target=self.url, installed=True, running=running)

    def logs(self, tail: int | None = None) -> str:
        return self._execute(self.plan_logs(tail))

    def impair(self, *, cut: bool = False, loss: float = 0.0) -> None:
        if loss:
            raise NotImplementedError("adb cannot drop a fraction of a phone's packets; only cut=True")
        if cut:
            self._execute(self.plan_impair())

    def restore(self) -> None:
        self._execute(self.plan_restore())


__all__ = ["AdbTarget"]
