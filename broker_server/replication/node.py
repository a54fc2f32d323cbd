"""Opens one server node's replicated state: its own SQLite store and journal, tailing the log at a redis:// URL."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from broker_server.cache import CacheConfig
from broker_server.cached_state import CachedState
from broker_server.relations import EXACT_SEARCH_LIMIT
from broker_server.replication.journal import JOURNAL_FILENAME, Journal, NodeMismatch
from broker_server.replication.redis_log import CursorTrimmed, LogUnavailable, RedisLog
from broker_server.replication.replicated_state import FLUSH_S, TRIM_S, ReplicatedState
from broker_server.store import STORE_FILENAME, open_store
from fedwire.constants import DEFAULT_NEIGHBOURS

if TYPE_CHECKING:
    from broker_server.handlers import CacheService

log = logging.getLogger(__name__)

NODE_ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def check_replication_url(url: str) -> str:
    """`url` if it names a Redis (redis://host:port[/db]); ValueError saying what is wrong otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname:
        raise ValueError(f"--replicate takes redis://HOST:PORT[/DB], not {url!r}")
    return url


def check_node_id(node: str) -> str:
    """`node` if it is a valid node id ([A-Za-z0-9][A-Za-z0-9_-]{0,63}); ValueError otherwise."""
    if not NODE_ID_PATTERN.match(node):
        raise ValueError(f"a node id is [A-Za-z0-9][A-Za-z0-9_-]{{0,63}}, not {node!r}")
    return node


def check_node_directory(path: Path, *, node: str, url: str) -> None:
    """NodeMismatch when the state directory `path` belongs to another node id, or when the log at `url` ties
    `node` to another data directory; CursorTrimmed when the log lost entries the directory has yet to apply
    (neither checked while the log is unreachable)."""
    with contextlib.suppress(LogUnavailable):
        _claimed_journal(path, node=node, url=url).close()


def remove_state_files(path: Path) -> None:
    """Delete a node's journal and store (with their WAL files) from state directory `path`."""
    for name in (JOURNAL_FILENAME, STORE_FILENAME):
        for suffix in ("", "-wal", "-shm"):
            (path / (name + suffix)).unlink(missing_ok=True)


def _claimed_journal(path: Path, *, node: str, url: str) -> Journal:
    """The journal in `path`, its node id claimed for it in the log at `url` with its cursor (LogUnavailable
    while the log is down: the journal is then closed, and claimed at the next start).

    NodeMismatch when another directory holds the id; CursorTrimmed when the log no longer holds what this
    directory has yet to apply. A directory this call created is removed again on refusal, so that it can be
    seeded (replication/admin.py) or used under another id without tripping over a stray journal.
    """
    fresh = not (path / JOURNAL_FILENAME).exists() and not (path / STORE_FILENAME).exists()
    journal = Journal(path, node=node)
    try:
        probe = RedisLog(url)
        try:
            claim = probe.claim(node, journal.token, cursor=journal.cursor)
        finally:
            probe.close()
        if claim.token not in ("", journal.token):
            raise NodeMismatch(f"node id '{node}' is already used by another data directory at {url}")
        if not claim.recorded:
            raise CursorTrimmed(
                f"node '{node}' has applied the log up to {journal.cursor}, but the log at {url} was trimmed up to "
                f"{claim.trimmed}: seed this node from a peer's data directory (python broker_server/main.py "
                "replication seed --help)"
            )
    except BaseException as exc:
        journal.close()
        if fresh and isinstance(exc, (NodeMismatch, CursorTrimmed)):
            remove_state_files(path)
        raise
    return journal


def open_replicated_service(
    path: Path,
    *,
    node: str,
    url: str,
    neighbours: int = DEFAULT_NEIGHBOURS,
    round_timeout_s: float,
    min_participants: int,
) -> CacheService:
    """FedCache and the baselines over this node's replicated state (the baselines' states stay local)."""
    from broker_server.handlers import CacheService, all_algorithms

    state = open_replicated_state(path, node=node, url=url, neighbours=neighbours)
    log.info("node %s: replicating through %s", node, url)
    return CacheService(
        state=state, algorithms=all_algorithms(round_timeout_s=round_timeout_s, min_participants=min_participants)
    )


def open_replicated_state(
    path: Path,
    *,
    node: str,
    url: str,
    config: CacheConfig | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    exact_limit: int = EXACT_SEARCH_LIMIT,
    flush_s: float = FLUSH_S,
    trim_s: float = TRIM_S,
) -> ReplicatedState:
    """The state in directory `path` (SQLite store and replication journal), replicated through `url`, started.

    The node serves at once from what it committed; its tailer then applies what the log gained meanwhile.
    An unreachable log is logged, not fatal: updates wait in the outbox, registrations wait up to LOG_WAIT_S.
    """
    check_node_id(node)
    check_replication_url(url)
    try:
        journal = _claimed_journal(path, node=node, url=url)
    except LogUnavailable as exc:
        log.warning("node %s: replication log unavailable for now (updates wait in the outbox): %s", node, exc)
        journal = Journal(path, node=node)
    try:
        inner = CachedState.open(open_store(path), config=config, neighbours=neighbours, exact_limit=exact_limit)
    except BaseException:
        journal.close()
        raise
    log.info("node %s: replicating through %s from cursor %s", node, url, journal.cursor)
    return ReplicatedState(inner=inner, node=node, url=url, journal=journal, flush_s=flush_s, trim_s=trim_s).start()
