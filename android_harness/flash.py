"""`python -m android_harness flash|provision|revoke`: device bundles, and device credentials from the server's CA."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from android_harness.bundle import build_bundle
from android_harness.targets import InstallOptions, make_target
from edge.config import load_config
from fedwire.fleet import (
    AUTH_KINDS,
    BUNDLE_CERT,
    BUNDLE_KEY,
    BUNDLE_PASSWORD,
    SECURITY_DIRNAME,
    Provisioned,
    SecurityDir,
    check_device_id,
)
from fedwire.mqtt import BrokerAddress, Credentials

# The ports `broker_server/main.py` gives its TLS listeners by default (--tls-port, --cert-port).
DEFAULT_TLS_PORTS = {"password": 8883, "certificate": 8884}
SNIPPET_NAME = "security.toml"


def add_flash_parser(commands: argparse._SubParsersAction) -> None:
    """The `flash`, `provision` and `revoke` subcommands' options."""
    flash = commands.add_parser("flash", help="build a device bundle and install it on a target (docs/targets.md)")
    flash.add_argument(
        "--target", required=True, help="local[:ROOT] | netns[:ROOT] | ssh://user@host:port[/ROOT] | adb://SERIAL"
    )
    flash.add_argument("--device-config", type=Path, required=True, help="the device's TOML (python -m edge format)")
    flash.add_argument("--out", type=Path, help="where the bundle is built (default runs/bundles/DEVICE_ID)")
    flash.add_argument("--broker", help="broker URL the device should use instead of its config's")
    flash.add_argument(
        "--provision",
        choices=AUTH_KINDS,
        help="give the device fresh credentials from the cache server's CA (needs --data-dir): a password or a "
        "client certificate, in the bundle's credentials/ (its own only); the bundle's config gets [security] and "
        "an mqtts:// broker URL (--broker, else the config's host on port 8883 or 8884)",
    )
    flash.add_argument("--data-dir", type=Path, help="with --provision: the cache server's data directory")
    flash.add_argument("--key", type=Path, help="ssh private key (ssh targets)")
    flash.add_argument("--ssh-option", action="append", default=[], help="extra ssh -o option, repeatable")
    flash.add_argument("--python", default="python3", help="interpreter on the host that makes the venv")
    flash.add_argument("--reuse-site-packages", default="", help="host site-packages the venv may import from")
    flash.add_argument("--no-deps", action="store_true", help="install only the bundle's wheel, no dependencies")
    flash.add_argument("--start", action="store_true", help="start the device after installing")
    flash.add_argument("--build-only", action="store_true", help="build the bundle, install nothing")
    flash.add_argument(
        "--native",
        action="store_true",
        help="a native bundle: the C++ device (edge_native/, docs/native.md) instead of the Python one",
    )
    flash.add_argument(
        "--artifacts", type=Path, default=Path("runs/artifacts"), help="with --native: where programs are exported"
    )

    provision = commands.add_parser(
        "provision", help="credentials for devices from the cache server's CA, one directory per device"
    )
    provision.add_argument(
        "--data-dir", type=Path, required=True, help="the cache server's data directory (its CA is DIR/security)"
    )
    provision.add_argument("--devices", required=True, help="comma-separated device ids, e.g. d00,d01,d02")
    provision.add_argument("--auth", choices=AUTH_KINDS, default="password", help="how the devices authenticate")
    provision.add_argument(
        "--broker-url",
        help="mqtts://HOST:PORT the devices connect to (default mqtts://127.0.0.1:8883 for password, :8884 for "
        "certificate); HOST is added to the broker's certificate",
    )
    provision.add_argument(
        "--out", type=Path, required=True, help="OUT/DEVICE/ gets that device's files and a security.toml"
    )

    revoke = commands.add_parser(
        "revoke",
        help="revoke devices: their live sessions are dropped and their reconnects refused (no broker restart)",
    )
    revoke.add_argument("--data-dir", type=Path, required=True, help="the cache server's data directory")
    revoke.add_argument("devices", nargs="+", metavar="DEVICE", help="device ids to revoke")


# ---------------------------------------------------------------- credentials


def device_broker_url(url: str | None, *, auth: str, fallback_host: str = "127.0.0.1") -> BrokerAddress:
    """The mqtts:// address a provisioned device uses: `url` (which must be TLS), else the server's default port
    for `auth` on `fallback_host`."""
    if url is None:
        return BrokerAddress(fallback_host, DEFAULT_TLS_PORTS[auth], tls=True)
    address = BrokerAddress.parse(url)
    if not address.tls:
        raise ValueError(f"a provisioned device connects over TLS: give an mqtts:// broker URL, not {url}")
    return address


def open_security_dir(data_dir: Path, *, hosts: Sequence[str]) -> tuple[SecurityDir, bool]:
    """The server's security directory (CA created once), its broker certificate naming `hosts`; also whether
    that certificate was reissued (a running broker must then reload it)."""
    root = Path(data_dir) / SECURITY_DIRNAME
    before = _mtime(root / "broker.pem")
    security_dir = SecurityDir.ensure(root, hosts=hosts)
    return security_dir, before is not None and _mtime(security_dir.broker_cert) != before


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def security_snippet(provisioned: Provisioned, *, broker: BrokerAddress) -> str:
    """A device config's broker line and [security] section for files that sit beside it (names only)."""
    c = provisioned.credentials
    fields = {
        "username": c.username,
        "password_file": Path(c.password_file).name if c.password_file else "",
        "ca_file": Path(c.ca_file).name if c.ca_file else "",
        "cert_file": Path(c.cert_file).name if c.cert_file else "",
        "key_file": Path(c.key_file).name if c.key_file else "",
    }
    lines = [
        f"# {provisioned.device}: {provisioned.auth} credentials from `python -m android_harness provision`.",
        "# Merge into the device's config. Paths are relative to the directory the device runs in: as written,",
        "# this directory's files sit there; prefix them with where you copy them otherwise.",
        "[device]",
        f'broker = "{broker.url}"',
        "",
        "[security]",
        *(f'{key} = "{value}"' for key, value in fields.items() if value),
    ]
    return "\n".join(lines) + "\n"


def _device_ids(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise SystemExit("--devices: give at least one device id")
    if len(set(devices)) != len(devices):
        raise SystemExit(f"--devices: a device is named twice in {text!r}")
    for device in devices:
        try:
            check_device_id(device)
        except ValueError as exc:
            raise SystemExit(f"--devices: {exc}") from exc
    return devices


def run_provision(args: argparse.Namespace) -> int:
    """Provision each device into OUT/DEVICE/ (its CA certificate, its password or key, a security.toml)."""
    devices = _device_ids(args.devices)
    try:
        broker = device_broker_url(args.broker_url, auth=args.auth)
    except ValueError as exc:
        raise SystemExit(f"--broker-url: {exc}") from exc
    security_dir, reissued = open_security_dir(args.data_dir, hosts=[broker.host])
    known = security_dir.devices()
    with security_dir.admin() as admin:
        if reissued:
            security_dir.reload_broker(admin)  # new handshakes present a certificate that names broker.host
            print(f"broker certificate reissued to name {broker.host}")
        for device in devices:
            directory = Path(args.out) / device
            _remove_stale_credentials(directory)
            provisioned = security_dir.provision(admin, device, auth=args.auth, out=directory)
            (directory / SNIPPET_NAME).write_text(security_snippet(provisioned, broker=broker))
            files = sorted(p.name for p in directory.iterdir())
            again = " (its earlier credentials no longer work)" if device in known else ""
            print(f"{device}: {args.auth} for {broker.url} in {directory}: {', '.join(files)}{again}", flush=True)
    return 0


def _remove_stale_credentials(directory: Path) -> None:
    """A device provisioned again (perhaps with the other kind) keeps no file of its earlier credentials."""
    for name in (BUNDLE_PASSWORD, BUNDLE_CERT, BUNDLE_KEY, SNIPPET_NAME):
        (directory / name).unlink(missing_ok=True)


def run_revoke(args: argparse.Namespace) -> int:
    """Revoke devices through the running broker of DATA_DIR (or offline when none runs); exit 1 on unknown ids."""
    root = Path(args.data_dir) / SECURITY_DIRNAME
    if not (root / "ca.pem").is_file():
        raise SystemExit(f"{root}: no security directory there (nothing was ever provisioned with this data dir)")
    security_dir = SecurityDir(root)
    known = security_dir.devices()
    unknown = [d for d in args.devices if d not in known]
    if unknown:
        raise SystemExit(f"never provisioned here: {', '.join(unknown)} (known: {', '.join(sorted(known)) or '-'})")
    running = security_dir.running_broker()
    where = f"the running broker (pid {running['pid']})" if running is not None else "the security directory"
    print(f"revoking {', '.join(args.devices)} through {where}", flush=True)
    with security_dir.admin() as admin:
        for device in args.devices:
            security_dir.revoke(admin, device)
            what = "certificate on the CRL" if known[device].get("serial") is not None else "password deleted"
            live = "live session dropped, reconnects refused" if running is not None else "refused from now on"
            print(f"{device}: revoked ({what}; {live})", flush=True)
    return 0


# ---------------------------------------------------------------- flash


def run_flash(args: argparse.Namespace) -> int:
    config = load_config(args.device_config)
    out = args.out or Path("runs") / "bundles" / config.id
    broker = args.broker
    provision = None
    if args.provision is not None:
        if args.data_dir is None:
            raise SystemExit("--provision needs --data-dir (the cache server's data directory, whose CA signs)")
        configured = BrokerAddress.parse(config.broker)
        try:
            address = device_broker_url(
                args.broker or (config.broker if configured.tls else None),
                auth=args.provision,
                fallback_host=configured.host,
            )
        except ValueError as exc:
            raise SystemExit(f"--broker: {exc}") from exc
        broker = address.url
        security_dir, reissued = open_security_dir(args.data_dir, hosts=[address.host])
        auth = args.provision

        def provision(directory: Path) -> Credentials:
            with security_dir.admin() as admin:
                if reissued:
                    security_dir.reload_broker(admin)
                return security_dir.provision(admin, config.id, auth=auth, out=directory).credentials

    if args.native:
        from android_harness.native_bundle import build_native_bundle

        bundle = build_native_bundle(config, out, artifacts=args.artifacts, broker=broker, provision=provision)
    else:
        bundle = build_bundle(config, out, broker=broker, provision=provision)
    print(f"bundle {bundle.root}: {len(bundle.files)} files, {bundle.total_bytes / 1024:.1f} KiB")
    if args.provision is not None:
        print(f"{config.id}: {args.provision} credentials in {bundle.root / 'credentials'}; broker {broker}")
    if args.build_only:
        return 0
    install = InstallOptions(python=args.python, reuse_site_packages=args.reuse_site_packages, no_deps=args.no_deps)
    target = make_target(args.target, key=args.key, ssh_options=tuple(args.ssh_option), install=install)
    target.flash(bundle)
    print(f"installed on {target.url}")
    if args.start:
        print(f"started {config.id} as PID {target.start()}; logs: target.logs() or DIR/device.log on the host")
    return 0


__all__ = [
    "add_flash_parser",
    "device_broker_url",
    "run_flash",
    "run_provision",
    "run_revoke",
    "security_snippet",
]
