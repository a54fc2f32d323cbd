"""`python -m bench serving --nodes`: one node, one node writing the replication log, and two nodes on two brokers.

Every variant meets the same closed-loop load as the serving bench's steps (bench/serving.py `run_step`,
lean load generators): `1 node` is today's server on one broker; `1 node + log` is the same server with
`--replicate`, so the difference is what the log costs one node (outbox, XADD, reading its own entries back);
`2 nodes` splits the devices over two brokers, one node each, replicating through one redis-server
(appendfsync always) that both tail. Per row: requests/s, samples/s, p50/p99 at the device, CPU per request
of the nodes (summed), of the brokers (summed) and of Redis, and afterwards how long the nodes took to hold
each other's last entry. The raw QoS 1 rate of each broker is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from android_harness.processes import server_command
from bench._report import markdown_table
from bench.serving import (
    RawRate,
    StepPlan,
    StepResult,
    _BenchServer,
    _Observer,
    _payload_bytes,
    _stop_bench_server,
    device_names,
    launch_bench_server,
    measure_raw,
    measure_raw_lean,
    run_step,
)
from broker_server.replication.journal import JOURNAL_FILENAME
from broker_server.replication.redis_log import LOG_KEY
from broker_server.state_factory import STATE_DIRNAME
from fedwire.mosquitto import MosquittoBroker
from fedwire.redis_server import RedisServer

VARIANTS = ("1 node", "1 node + log", "2 nodes")
CATCH_UP_LIMIT_S = 60.0


@dataclass(frozen=True)
class NodesRow:
    """One variant at one device count, and the time its nodes needed to hold every log entry afterwards."""

    variant: str
    step: StepResult
    catch_up_s: float | None  # None: no log; else seconds from the end of the load until every cursor is at its end
    log_entries: int


def run_nodes(
    args: argparse.Namespace, *, root: Path, plans: Sequence[StepPlan], duration: float, raw_messages: int
) -> tuple[list[NodesRow], list[RawRate]]:
    """Every variant for every plan, back to back, each on fresh servers (and a flushed log)."""
    rows: list[NodesRow] = []
    with ExitStack() as stack:
        store = stack.enter_context(RedisServer(data_dir=root / "redis"))
        brokers = [stack.enter_context(MosquittoBroker(data_dir=root / f"mosquitto-{side}")) for side in "ab"]
        observers = [stack.enter_context(_Observer(broker.address, None)) for broker in brokers]
        payload = _payload_bytes(args.batch)
        raws = [measure_raw(b.address, messages=raw_messages, payload_bytes=payload, timeout=120) for b in brokers]
        raws += [
            measure_raw_lean(b.address, messages=raw_messages, payload_bytes=payload, timeout=120) for b in brokers
        ]
        client = stack.enter_context(closing(redis.Redis.from_url(store.url)))
        assert store.process is not None
        redis_ps = psutil.Process(store.process.pid)
        broker_ps = [psutil.Process(b.process.pid) for b in brokers if b.process is not None]
        for number, plan in enumerate(plans):
            for variant in VARIANTS:
                client.flushall()
                sides = 2 if variant == "2 nodes" else 1
                log_url = store.url if variant != "1 node" else ""
                servers = [
                    _node(
                        brokers[side], observers[side], root=root / "nodes" / f"{number}-{variant[0]}{side}",
                        node=f"n{number}{'ab'[side]}", log_url=log_url,
                    )
                    for side in range(sides)
                ]  # fmt: skip
                try:
                    step = run_step(
                        brokers[0].address,
                        devices=plan.devices,
                        processes=args.processes,
                        samples=args.samples,
                        batch=args.batch,
                        fetch_share=args.fetch_share,
                        duration=duration,
                        seed=args.seed,
                        max_requests=args.max_requests,
                        server=psutil.Process(servers[0].pid),
                        broker=broker_ps[0],
                        observer=observers[0],
                        names=device_names(plan.devices, f"n{VARIANTS.index(variant)}"),
                        loadgen=args.loadgen,
                        path=variant,
                        addresses=[b.address for b in brokers[:sides]],
                        more_servers=[psutil.Process(s.pid) for s in servers[1:]],
                        more_brokers=broker_ps[1:sides],
                        others=[redis_ps] if log_url else [],
                    )
                    catch_up = _catch_up(client, servers) if log_url else None
                    entries = int(client.xlen(LOG_KEY)) if log_url else 0
                finally:
                    for server in servers:
                        _stop_bench_server(server)
                rows.append(NodesRow(variant=variant, step=step, catch_up_s=catch_up, log_entries=entries))
    return rows, raws


def _node(broker: MosquittoBroker, observer: _Observer, *, root: Path, node: str, log_url: str) -> _BenchServer:
    options = ["--log-level", "WARNING"]
    if log_url:
        options += ["--replicate", log_url, "--node-id", node]
    command = server_command(
        broker=broker.address, data_dir=root / "data", client_id=f"bench-node-{os.getpid()}-{node}", options=options
    )
    return launch_bench_server(command, broker=broker, log=root / "server.log", observer=observer)


def _cursor(server: _BenchServer) -> str:
    """A node's committed log cursor, read from its journal (read-only)."""
    path = Path(server.command[server.command.index("--data-dir") + 1]) / STATE_DIRNAME / JOURNAL_FILENAME
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
    return "0-0" if row is None else str(row[0])


def _catch_up(client: redis.Redis, servers: Sequence[_BenchServer]) -> float | None:
    """Seconds until every node's committed cursor reached the log's last entry (None: not within the limit).

    A node's own trailing updates move its cursor too (it reads them back and skips them), so this is also
    the time its outbox took to drain.
    """
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < CATCH_UP_LIMIT_S:
        newest = client.xrevrange(LOG_KEY, count=1)
        if newest:
            entry_id = newest[0][0]
            current = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if current == last and all(_cursor(server) == current for server in servers):
                return time.monotonic() - started
            last = current
        time.sleep(0.05)
    return None


def format_nodes(rows: Sequence[NodesRow], raws: Sequence[RawRate]) -> str:
    """One markdown row per variant and device count."""
    table = []
    for row in rows:
        step = row.step
        table.append(
            [
                row.variant,
                f"{step.devices}",
                f"{step.requests_per_s:.0f}",
                f"{step.samples_per_s:.0f}",
                f"{step.p50_ms:.1f} / {step.p99_ms:.1f}",
                f"{step.cpu_us_per_request(step.server_cpu):.0f}",
                f"{step.cpu_us_per_request(step.broker_cpu):.0f}",
                f"{step.cpu_us_per_request(step.other_cpu):.0f}"
                if row.catch_up_s is not None or row.log_entries
                else "-",
                f"{step.cpu_us_per_request(step.loadgen_cpu):.0f}",
                f"{row.log_entries}" if row.log_entries else "-",
                f"{row.catch_up_s:.2f}" if row.catch_up_s is not None else "-",
                f"{step.errors} / {step.lost}",
            ]
        )
    header = [
        "variant", "devices", "requests/s", "samples/s", "p50 / p99 ms", "nodes CPU µs/req", "brokers CPU µs/req",
        "Redis CPU µs/req", "load gen. CPU µs/req", "log entries", "catch-up s", "errors / lost",
    ]  # fmt: skip
    lines = [markdown_table(header, table)]
    paho = ", ".join(f"broker {'ab'[i]} {raw.rate:.0f}" for i, raw in enumerate(raws[:2]))
    lean = ", ".join(f"broker {'ab'[i]} {raw.rate:.0f}" for i, raw in enumerate(raws[2:]))
    lines.append(f"\nRaw QoS 1 msgs/s in this run: paho clients {paho}; lean clients {lean}.")
    return "\n".join(lines)
