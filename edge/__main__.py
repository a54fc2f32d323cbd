"""`python -m edge --config device.toml`: run one FedCache device against any MQTT broker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

_STARTED = time.monotonic()  # before the heavy imports below: they count as the device's start-up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge", description="Run one FedCache device.")
    parser.add_argument("--config", type=Path, required=True, help="device TOML file (see docs/device.md)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from edge.config import load_config
    from edge.runtime import DeviceRuntime, UndeliveredError
    from edge.state import EXIT_UNDELIVERED

    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        parser.error(f"bad config {args.config}: {exc}")
    try:
        summary = DeviceRuntime(config, started=_STARTED).run()
    except UndeliveredError as exc:
        logging.getLogger("edge").error("finished, but %s; exiting with status %d", exc, EXIT_UNDELIVERED)
        print(json.dumps(exc.metrics))
        return EXIT_UNDELIVERED
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
