"""`python -m android_harness flash`: build one device's bundle from its config and install it on a target."""

from __future__ import annotations

import argparse
from pathlib import Path

from android_harness.bundle import build_bundle
from android_harness.targets import InstallOptions, make_target
from edge.config import load_config


def add_flash_parser(commands: argparse._SubParsersAction) -> None:
    """The `flash` subcommand's options."""
    flash = commands.add_parser("flash", help="build a device bundle and install it on a target (docs/targets.md)")
    flash.add_argument(
        "--target", required=True, help="local[:ROOT] | netns[:ROOT] | ssh://user@host:port[/ROOT] | adb://SERIAL"
    )
    flash.add_argument("--device-config", type=Path, required=True, help="the device's TOML (python -m edge format)")
    flash.add_argument("--out", type=Path, help="where the bundle is built (default runs/bundles/DEVICE_ID)")
    flash.add_argument("--broker", help="broker URL the device should use instead of its config's")
    flash.add_argument("--key", type=Path, help="ssh private key (ssh targets)")
    flash.add_argument("--ssh-option", action="append", default=[], help="extra ssh -o option, repeatable")
    flash.add_argument("--python", default="python3", help="interpreter on the host that makes the venv")
    flash.add_argument("--reuse-site-packages", default="", help="host site-packages the venv may import from")
    flash.add_argument("--no-deps", action="store_true", help="install only the bundle's wheel, no dependencies")
    flash.add_argument("--start", action="store_true", help="start the device after installing")
    flash.add_argument("--build-only", action="store_true", help="build the bundle, install nothing")


def run_flash(args: argparse.Namespace) -> int:
    config = load_config(args.device_config)
    out = args.out or Path("runs") / "bundles" / config.id
    bundle = build_bundle(config, out, broker=args.broker)
    print(f"bundle {bundle.root}: {len(bundle.files)} files, {bundle.total_bytes / 1024:.1f} KiB")
    if args.build_only:
        return 0
    install = InstallOptions(python=args.python, reuse_site_packages=args.reuse_site_packages, no_deps=args.no_deps)
    target = make_target(args.target, key=args.key, ssh_options=tuple(args.ssh_option), install=install)
    target.flash(bundle)
    print(f"installed on {target.url}")
    if args.start:
        print(f"started {config.id} as PID {target.start()}; logs: target.logs() or DIR/device.log on the host")
    return 0


__all__ = ["add_flash_parser", "run_flash"]
