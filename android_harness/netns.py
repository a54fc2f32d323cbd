"""Devices in their own network namespaces, bridged to the broker, with links that can be cut or made lossy.

Each device namespace gets a veth pair whose host end joins one bridge; the broker listens on the
bridge address. `ip link set ... down` cuts a device off; iptables' statistic match inside the
namespace drops a fraction of its packets (`tc netem` has no qdisc in this kernel). Needs root.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SUBNET_PREFIX = "10.203"
BRIDGE_ADDRESS = f"{SUBNET_PREFIX}.0.1"
# Second octets a lab may take when another lab on this host already holds 10.203.0.0/16.
_SPARE_OCTETS = range(204, 255)


def _free_subnet_prefix() -> str:
    """SUBNET_PREFIX unless an address in it is already up on this host (another trial's lab): then the first
    free 10.x/16 above it. Two bridges on one /16 steal each other's routes and devices never connect."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    used = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", shown)}
    for octet in (int(SUBNET_PREFIX.split(".")[1]), *_SPARE_OCTETS):
        if octet not in used:
            return f"10.{octet}"
    raise RuntimeError("no free 10.x.0.0/16 subnet for a device lab")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (`make setup-test` or `scripts/setup-system.sh --test` installs it)"
    probe = f"fcprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` failed: {getattr(exc, 'stderr', exc)}"
    return None


_labs_made = itertools.count()


def _new_tag() -> str:
    """Names of this lab's links and namespaces: unique per process and per lab within it. A lab's host veths
    outlive `ip netns del` for a moment (the kernel tears a namespace down asynchronously), so a second lab in
    the same process with the same names could find them still there."""
    return f"{os.getpid() % 10000}{next(_labs_made) % 100:02d}"


@dataclass
class NetnsLab:
    """A bridge and one namespace per device; `close()` removes everything it made."""

    devices: int
    tag: str = field(default_factory=_new_tag)
    _made: list[str] = field(default_factory=list)
    # 10.x of this lab's /16, chosen at open() (SUBNET_PREFIX unless another lab on the host holds it).
    prefix: str = SUBNET_PREFIX

    @property
    def bridge_address(self) -> str:
        """Where the broker listens for this lab's devices (BRIDGE_ADDRESS unless that was taken)."""
        return f"{self.prefix}.0.1"

    @property
    def bridge(self) -> str:
        return f"fcbr{self.tag}"

    def namespace(self, index: int) -> str:
        return f"fc{self.tag}d{index}"

    def device_veth(self, index: int) -> str:
        """The device's end of its link, inside its namespace."""
        return f"fc{self.tag}p{index}"

    def host_veth(self, index: int) -> str:
        return f"fc{self.tag}h{index}"

    def device_address(self, index: int) -> str:
        return f"{self.prefix}.{1 + (index + 1) // 250}.{1 + (index + 1) % 250}"

    def open(self) -> NetnsLab:
        if self.devices > 2000:
            raise ValueError("at most 2000 namespaced devices")
        self.prefix = _free_subnet_prefix()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append("bridge")
        _run("ip", "addr", "add", f"{self.bridge_address}/16", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for index in range(self.devices):
            ns, host, peer = self.namespace(index), self.host_veth(index), self.device_veth(index)
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "link", "set", host, "master", self.bridge)
            _run("ip", "link", "set", host, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.device_address(index)}/16", "dev", peer)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        log.info("made %d device namespaces on bridge %s (%s)", self.devices, self.bridge, self.bridge_address)
        return self

    def command(self, index: int, argv: list[str]) -> list[str]:
        """`argv` run inside device `index`'s namespace."""
        return ["ip", "netns", "exec", self.namespace(index), *argv]

    def cut(self, index: int) -> None:
        """Take the device's link down: its packets go nowhere until `restore`."""
        _run("ip", "link", "set", self.host_veth(index), "down")

    def restore(self, index: int) -> None:
        _run("ip", "link", "set", self.host_veth(index), "up")

    def lossy(self, index: int, probability: float) -> None:
        """Drop each packet in and out of the device's link with this probability (iptables statistic match).

        Only the link: the namespace's loopback stays clean, as on a real device. (Dropping loopback packets
        too once hung paho for good: it connects a socket pair over 127.0.0.1 at every reconnect and blocks in
        accept() when the handshake's SYN retries run out.)
        """
        self.clear_loss(index)
        veth = self.device_veth(index)
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run(
                "ip", "netns", "exec", self.namespace(index), "iptables", "-A", chain, direction, veth,
                "-m", "statistic", "--mode", "random", "--probability", f"{probability:.3f}", "-j", "DROP",
            )  # fmt: skip

    def clear_loss(self, index: int) -> None:
        for chain in ("INPUT", "OUTPUT"):
            _run("ip", "netns", "exec", self.namespace(index), "iptables", "-F", chain)

    def close(self) -> None:
        for name in reversed(self._made):
            try:
                if name == "bridge":
                    _run("ip", "link", "del", self.bridge)
                else:
                    _run("ip", "netns", "del", name)  # takes its veth pair with it
            except subprocess.CalledProcessError as exc:
                log.warning("could not remove %s: %s", name, exc.stderr)
        self._made.clear()

    def __enter__(self) -> NetnsLab:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()
