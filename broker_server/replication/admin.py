"""`python broker_server/main.py replication status|forget|seed`: the operator's side of a trimmed replication log.

The log keeps only what some claimed node has yet to apply durably (redis_log.py). Two consequences need an
operator: a node gone for good holds trimming back until it is forgotten, and a node that joins once the log was
trimmed cannot replay the log from its start, so it starts from a copy of a peer's state instead (`seed`).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from broker_server.replication.journal import JOURNAL_FILENAME, START_CURSOR, Journal, NodeMismatch
from broker_server.replication.node import check_node_id, check_replication_url, remove_state_files
from broker_server.replication.redis_log import CursorTrimmed, LogUnavailable, RedisLog, id_key
from broker_server.state_factory import STATE_DIRNAME
from broker_server.store import STORE_FILENAME

EXIT_FAILED = 1
EXIT_USAGE = 2
SEED_ATTEMPTS = 5  # a claim races the peer's cursor against the others' trims; each retry re-reads the cursor


class SeedError(RuntimeError):
    """Seeding cannot go ahead as asked (a directory in the way, a peer that is not a node's)."""


def _read_journal(directory: Path) -> tuple[str, str]:
    """(node id, cursor) of the journal in `directory`, read-only (the peer may be running)."""
    path = directory / JOURNAL_FILENAME
    if not path.is_file():
        raise SeedError(f"{directory} holds no replication journal ({JOURNAL_FILENAME}): not a node's state")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    if "node" not in meta:
        raise SeedError(f"{path} names no node")
    return str(meta["node"]), str(meta.get("cursor", START_CURSOR))


def seed_node(*, peer_dir: Path, data_dir: Path, node: str, url: str) -> str:
    """Make `data_dir` node `node`'s state, copied from the node whose state is `peer_dir`; returns its cursor.

    The peer's cursor is read before its store is copied: the peer commits its store before its cursor, so the
    copy holds at least the effects up to that cursor (entries after it applied again change nothing). The new
    node is claimed with that cursor at once, which holds trimming back for it from then on.
    """
    source, target = peer_dir / STATE_DIRNAME, data_dir / STATE_DIRNAME
    peer_node, _ = _read_journal(source)
    if peer_node == node:
        raise SeedError(f"{peer_dir} is node '{node}' itself: give the new node its own --node-id")
    if not (source / STORE_FILENAME).is_file():
        raise SeedError(f"{source} holds no store ({STORE_FILENAME})")
    in_the_way = [name for name in (STORE_FILENAME, JOURNAL_FILENAME) if (target / name).exists()]
    if in_the_way:
        raise SeedError(f"{target} already holds {', '.join(in_the_way)}: seed into an empty --data-dir")
    journal = Journal(target, node=node)
    log = RedisLog(url)
    claimed = False
    try:
        for _attempt in range(SEED_ATTEMPTS):
            _, cursor = _read_journal(source)
            claim = log.claim(node, journal.token, cursor=cursor)
            if claim.token not in ("", journal.token):
                raise NodeMismatch(f"node id '{node}' is already used by another data directory at {url}")
            if claim.recorded:
                claimed = True
                break
        else:
            raise CursorTrimmed(f"{url} kept trimming past peer '{peer_node}''s cursor; is the peer running?")
        _copy_store(source / STORE_FILENAME, target / STORE_FILENAME)
        journal.commit(bodies=[], cursor=cursor)
        journal.close()
        return cursor
    except BaseException:
        journal.close()
        remove_state_files(target)
        if claimed:
            log.forget(node)
        raise
    finally:
        log.close()


def _copy_store(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite store `source` (SQLite's online backup: the peer may write meanwhile)."""
    reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer)
    finally:
        writer.close()
        reader.close()


def _print_status(log: RedisLog, *, as_json: bool) -> None:
    entries, trimmed, nodes = log.length(), log.trimmed(), dict(sorted(log.nodes().items()))
    lowest = min(nodes, key=lambda name: id_key(nodes[name])) if nodes else None
    if as_json:
        print(json.dumps({"entries": entries, "trimmed": trimmed, "nodes": nodes, "holding_back": lowest}))
        return
    print(f"log {log.url}: {entries} entries, trimmed up to {trimmed}")
    for name, cursor in nodes.items():
        note = "  (the lowest: trimming waits for it)" if name == lowest else ""
        print(f"  node {name}: durable up to {cursor}{note}")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="the log's length, trimmed point and every node's durable cursor")
    status.add_argument("--replicate", required=True, metavar="redis://HOST:PORT")
    status.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    forget = commands.add_parser(
        "forget", help="drop a node gone for good (it holds trimming back); it must be seeded again to return"
    )
    forget.add_argument("--replicate", required=True, metavar="redis://HOST:PORT")
    forget.add_argument("--node-id", required=True)
    seed = commands.add_parser(
        "seed",
        help="start a new node's --data-dir from a copy of a peer's (the peer may be running), for a trimmed log",
    )
    seed.add_argument("--replicate", required=True, metavar="redis://HOST:PORT")
    seed.add_argument("--node-id", required=True, help="the new node's id")
    seed.add_argument("--data-dir", required=True, type=Path, help="the new node's --data-dir (empty)")
    seed.add_argument("--from", dest="peer_dir", required=True, type=Path, help="a peer node's --data-dir")
    return parser


def main(argv: list[str], *, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        check_replication_url(args.replicate)
        if args.command != "status":
            check_node_id(args.node_id)
    except ValueError as exc:
        print(f"fedcache replication: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log = RedisLog(args.replicate)
    try:
        if args.command == "status":
            _print_status(log, as_json=args.json)
            return 0
        if args.command == "forget":
            if not log.forget(args.node_id):
                print(f"fedcache replication: no node '{args.node_id}' in {args.replicate}", file=sys.stderr)
                return EXIT_FAILED
            print(f"forgot node {args.node_id}: trimming no longer waits for it")
            return 0
        cursor = seed_node(peer_dir=args.peer_dir, data_dir=args.data_dir, node=args.node_id, url=args.replicate)
        print(f"seeded node {args.node_id} in {args.data_dir} from {args.peer_dir} at log cursor {cursor}")
        return 0
    except (LogUnavailable, SeedError, NodeMismatch, CursorTrimmed) as exc:
        print(f"fedcache replication: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        log.close()
