"""Device targets behind one interface: flash a bundle, start, stop, status, logs, and impair the link where possible.

`make_target(url)` picks one: `local[:ROOT]` (a process here), `netns[:ROOT]` (a process here in its own network
namespace, whose link can be cut or made lossy), `ssh://user@host:port[/ROOT]` (a Raspberry Pi, a Jetson: any
Linux host with Python 3.11 reachable by ssh key), `adb://SERIAL` (an Android phone, android_harness/adb.py).

The three Linux targets install alike (HostTarget): the bundle is copied to ROOT/bundle and checked against its
SHA256SUMS on the host, a fresh venv is made at ROOT/venv and the bundle's wheel installed into it; the device
then runs as `ROOT/venv/bin/python -m edge --config device.toml` with ROOT/bundle as working directory and no
PYTHONPATH, under nohup, its PID in ROOT/device.pid, its exit status in ROOT/device.exit, its log in
ROOT/device.log. Only the way a command reaches the host differs (host_shell.py).
"""

from __future__ import annotations

import abc
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from android_harness.bundle import CONFIG_NAME, Bundle
from android_harness.host_shell import LocalShell, Shell, SshShell
from android_harness.netns import NetnsLab, netns_unavailable_reason

DEFAULT_ROOT = "fedcache-device"
STOP_TIMEOUT_S = 20.0


class TargetUnavailable(RuntimeError):
    """The target cannot be reached or used from this machine (no phone, no namespaces, no route)."""


@dataclass(frozen=True)
class TargetStatus:
    """What a target reports about its device process."""

    target: str
    installed: bool
    running: bool
    pid: int | None = None
    exit_code: int | None = None


class DeviceTarget(abc.ABC):
    """One place a device runs. `impair`/`restore` raise NotImplementedError where the link cannot be shaped."""

    url: str

    @abc.abstractmethod
    def flash(self, bundle: Bundle) -> None:
        """Install the bundle (replacing any earlier one and its state); stops a running device first."""

    @abc.abstractmethod
    def start(self, config: str = CONFIG_NAME) -> int:
        """Start the device with a config file inside the installed bundle; returns its PID."""

    @abc.abstractmethod
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> TargetStatus:
        """SIGTERM the device, SIGKILL after `timeout_s`; a device that is not running is left alone."""

    @abc.abstractmethod
    def status(self) -> TargetStatus: ...

    @abc.abstractmethod
    def logs(self, tail: int | None = None) -> str:
        """The device's stderr/stdout log (its last `tail` lines)."""

    def impair(self, *, cut: bool = False, loss: float = 0.0) -> None:
        """Cut the device's link, or drop each of its packets with probability `loss`."""
        raise NotImplementedError(f"{type(self).__name__} cannot impair its link")

    def restore(self) -> None:
        """Undo `impair`."""
        raise NotImplementedError(f"{type(self).__name__} cannot impair its link")


@dataclass(frozen=True)
class InstallOptions:
    """How the venv on a host is made.

    `reuse_site_packages` names a site-packages directory on the host whose packages the venv may import
    (through a .pth file, after its own): a host that already holds torch need not download 700 MiB again.
    With `no_deps` only the bundle's wheel is installed, else pip resolves its dependencies from the index.
    """

    python: str = "python3"
    system_site_packages: bool = False
    reuse_site_packages: str = ""
    no_deps: bool = False


_RUN_DEVICE = """#!/bin/sh
# Written by android_harness: run the device from its bundle alone (own venv, bundle as cwd, no PYTHONPATH).
cd "$(dirname "$0")/bundle" || exit 1
unset PYTHONPATH
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
../venv/bin/python -m edge --config "${1:-device.toml}" &
echo $! > ../device.pid
wait $!
echo $? > ../device.exit
"""


# A native bundle (android_harness/native_bundle.py) runs its own binary: no venv, no interpreter.
_RUN_NATIVE_DEVICE = """#!/bin/sh
# Written by android_harness: run the native device from its bundle alone (bundle as cwd).
cd "$(dirname "$0")/bundle" || exit 1
./bin/fedcache-device --config "${1:-device.toml}" &
echo $! > ../device.pid
wait $!
echo $? > ../device.exit
"""


class HostTarget(DeviceTarget):
    """A Linux host reached through a Shell; `launch` prefixes the device command (e.g. `ip netns exec NS`)."""

    def __init__(self, *, url: str, shell: Shell, root: str, install: InstallOptions, launch: str = "") -> None:
        self.url = url
        self.shell = shell
        self.root = root
        self.install = install
        self.launch = launch

    @property
    def _q(self) -> str:
        return shlex.quote(self.root)

    def flash(self, bundle: Bundle) -> None:
        bundle.verify()
        if self.status().running:
            self.stop()
        self.shell.run(f"mkdir -p {self._q}")
        self.shell.put_dir(bundle.root, f"{self.root}/bundle")
        opts = self.install
        venv_flags = " --system-site-packages" if opts.system_site_packages else ""
        pip_flags = " --no-deps" if opts.no_deps else ""
        lines = [
            "set -e",
            f"cd {self._q}",
            "(cd bundle && sha256sum -c --quiet SHA256SUMS)",
            "rm -rf venv device.pid device.exit",
        ]
        if bundle.backend == "native":
            lines.append(f"cat > run-device.sh <<'FEDCACHE_EOF'\n{_RUN_NATIVE_DEVICE}FEDCACHE_EOF")
            self.shell.run("\n".join(lines))
            return
        lines.append(f"{shlex.quote(opts.python)} -m venv{venv_flags} venv")
        if opts.reuse_site_packages:
            purelib = "venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'"
            lines.append(f'echo {shlex.quote(opts.reuse_site_packages)} > "$({purelib})/fedcache-reused-site.pth"')
        lines += [
            "venv/bin/python -m pip install -q --disable-pip-version-check"
            f"{pip_flags} bundle/{shlex.quote(bundle.wheel)}",
            f"cat > run-device.sh <<'FEDCACHE_EOF'\n{_RUN_DEVICE}FEDCACHE_EOF",
        ]
        self.shell.run("\n".join(lines))

    def start(self, config: str = CONFIG_NAME) -> int:
        status = self.status()
        if not status.installed:
            raise RuntimeError(f"{self.url}: no bundle installed under {self.root}; flash first")
        if status.running:
            raise RuntimeError(f"{self.url}: device already running as PID {status.pid}")
        launch = f"{self.launch} " if self.launch else ""
        out = self.shell.run(
            f"cd {self._q} && rm -f device.pid device.exit && "
            f"{launch}nohup sh run-device.sh {shlex.quote(config)} >> device.log 2>&1 < /dev/null &\n"
            f"cd {self._q}; i=0; while [ ! -s device.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
            "cat device.pid"
        )
        return int(out.split()[-1])

    def status(self) -> TargetStatus:
        out = self.shell.run(
            f"cd {self._q} 2>/dev/null || {{ echo installed=0; exit 0; }}\n"
            "installed=0; [ -f bundle/bundle.json ] && { [ -x venv/bin/python ] || [ -x bundle/bin/fedcache-device ]; }"
            " && installed=1\n"
            "pid=$(cat device.pid 2>/dev/null || true); code=$(cat device.exit 2>/dev/null || true)\n"
            'running=0; if [ -n "$pid" ] && [ -z "$code" ] && kill -0 "$pid" 2>/dev/null; then running=1; fi\n'
            'echo "installed=$installed running=$running pid=$pid exit=$code"'
        )
        fields = dict(item.split("=", 1) for item in out.split())
        return TargetStatus(
            target=self.url,
            installed=fields.get("installed") == "1",
            running=fields.get("running") == "1",
            pid=int(fields["pid"]) if fields.get("pid") else None,
            exit_code=int(fields["exit"]) if fields.get("exit") else None,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> TargetStatus:
        status = self.status()
        if not status.running or status.pid is None:
            return status
        steps = max(1, int(timeout_s * 10))
        self.shell.run(
            f"cd {self._q}; pid={status.pid}; kill -TERM $pid 2>/dev/null || true\n"
            f"i=0; while kill -0 $pid 2>/dev/null && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done\n"
            "kill -KILL $pid 2>/dev/null || true\n"
            "i=0; while [ ! -f device.exit ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done",
            timeout=timeout_s + 30,
        )
        return self.status()

    def logs(self, tail: int | None = None) -> str:
        reader = f"tail -n {int(tail)}" if tail else "cat"
        return self.shell.run(f"cd {self._q} && {reader} device.log 2>/dev/null || true")

    def run_in_venv(self, code: str) -> str:
        """Run Python `code` the way the device runs (its venv, bundle as cwd, no PYTHONPATH); returns stdout."""
        return self.shell.run(
            f"cd {self._q}/bundle && env -u PYTHONPATH ../venv/bin/python -c {shlex.quote(code)}", timeout=120
        )


class LocalProcessTarget(HostTarget):
    """A device process on this machine, installed under ROOT like any host."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, *, install: InstallOptions | None = None) -> None:
        root = str(Path(root).resolve())
        super().__init__(url=f"local:{root}", shell=LocalShell(), root=root, install=install or InstallOptions())


class NetnsTarget(HostTarget):
    """A device process on this machine inside network namespace `index` of a NetnsLab (needs root).

    The device reaches the broker at the lab's bridge address (`target.bridge_address`, 10.203.0.1 unless another
    lab holds that range), so flash it with `broker=f"mqtt://{target.bridge_address}:PORT"` and let the broker
    listen there too.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        lab: NetnsLab | None = None,
        index: int = 0,
        install: InstallOptions | None = None,
    ) -> None:
        if lab is None:
            reason = netns_unavailable_reason()
            if reason is not None:
                raise TargetUnavailable(f"network namespaces unavailable: {reason}")
            lab = NetnsLab(devices=index + 1).open()
            self._owns_lab = True
        else:
            self._owns_lab = False
        self.lab = lab
        self.index = index
        root = str(Path(root).resolve())
        super().__init__(
            url=f"netns:{root}",
            shell=LocalShell(),
            root=root,
            install=install or InstallOptions(),
            launch=" ".join(shlex.quote(a) for a in lab.command(index, [])),
        )

    @property
    def bridge_address(self) -> str:
        """Where a broker on this machine is reachable from the device's namespace."""
        return self.lab.bridge_address

    def impair(self, *, cut: bool = False, loss: float = 0.0) -> None:
        if cut:
            self.lab.cut(self.index)
        if loss:
            self.lab.lossy(self.index, loss)

    def restore(self) -> None:
        self.lab.restore(self.index)
        self.lab.clear_loss(self.index)

    def close(self) -> None:
        """Remove the namespace this target made (a lab passed in belongs to its caller)."""
        if self._owns_lab:
            self.lab.close()


class SshTarget(HostTarget):
    """A Raspberry Pi, a Jetson or any Linux host with Python 3.11, over the system ssh/scp with a key."""

    def __init__(
        self,
        host: str,
        *,
        user: str = "",
        port: int = 22,
        key: Path | None = None,
        root: str = DEFAULT_ROOT,
        ssh_options: tuple[str, ...] = (),
        install: InstallOptions | None = None,
    ) -> None:
        shell = SshShell(host=host, user=user, port=port, key=key, options=ssh_options)
        url = f"ssh://{shell.destination}:{port}/{root.lstrip('/')}"
        super().__init__(url=url, shell=shell, root=root, install=install or InstallOptions())


def make_target(
    url: str,
    *,
    key: Path | None = None,
    ssh_options: tuple[str, ...] = (),
    install: InstallOptions | None = None,
) -> DeviceTarget:
    """A target from `local[:ROOT]`, `netns[:ROOT]`, `ssh://[user@]host[:port][/ROOT]` or `adb://SERIAL`.

    An ssh ROOT after the host is taken as given (`ssh://pi@pi7/srv/fedcache` is /srv/fedcache; without a
    path ROOT is ~/fedcache-device).
    """
    scheme, _, rest = url.partition(":")
    if scheme in ("local", "netns") and not rest.startswith("//"):
        root = rest or DEFAULT_ROOT
        if scheme == "local":
            return LocalProcessTarget(root, install=install)
        return NetnsTarget(root, install=install)
    parsed = urlparse(url)
    if parsed.scheme == "ssh":
        if not parsed.hostname:
            raise ValueError(f"no host in {url!r}")
        return SshTarget(
            parsed.hostname,
            user=parsed.username or "",
            port=parsed.port or 22,
            key=key,
            root=parsed.path or DEFAULT_ROOT,
            ssh_options=ssh_options,
            install=install,
        )
    if parsed.scheme == "adb":
        from android_harness.adb import AdbTarget

        return AdbTarget(serial=parsed.netloc or parsed.path.lstrip("/"))
    raise ValueError(
        f"unknown target {url!r}: use local[:ROOT], netns[:ROOT], ssh://user@host:port[/ROOT], adb://SERIAL"
    )


__all__ = [
    "DeviceTarget",
    "HostTarget",
    "InstallOptions",
    "LocalProcessTarget",
    "NetnsTarget",
    "SshTarget",
    "TargetStatus",
    "TargetUnavailable",
    "make_target",
]
