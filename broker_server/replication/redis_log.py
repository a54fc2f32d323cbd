"""The replication log on Redis: one stream every node appends to (XADD) and tails (XREAD), in one total order.

One stream gives one order for all nodes: a sample's registration always precedes its updates, and every
node numbers samples in that order. Redis must run with `appendonly yes` and `appendfsync always`
(fedwire/redis_server.py starts one so): an XADD that returned is then on disk, which is what lets a node
forget an outbox entry once the log took it.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

LOG_KEY = "fedcache:v1:log"
_FIELD = b"e"
SOCKET_TIMEOUT_S = 10.0


class LogUnavailable(RuntimeError):
    """The log's store did not answer (down, restarting, loading its append-only file)."""


_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    OSError,
)


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id "ms-seq" as a tuple that orders like Redis orders ids."""
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLog:
    """A client of the stream at `url` (redis://host:port[/db]); one per thread that blocks on it."""

    def __init__(self, url: str, *, key: str = LOG_KEY) -> None:
        self.url = url
        self.key = key
        # No retries inside the client: the callers retry (and say so) in one place, and a sender must see a
        # failed XADD as failed, never as a success after a reconnect it did not notice.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
        )

    def append(self, bodies: list[bytes]) -> list[str]:
        """XADD every body in one pipelined round trip; their ids, in order."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for body in bodies:
                pipe.xadd(self.key, {_FIELD: body})
            return [_text(entry_id) for entry_id in pipe.execute()]
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc

    def read(self, *, after: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        """Up to `count` entries after id `after`, waiting up to `block_ms` for the first one."""
        try:
            answer = self._redis.xread({self.key: after}, count=count, block=block_ms)
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        if not answer:
            return []
        streams = list(answer.values()) if isinstance(answer, dict) else [stream[1] for stream in answer]
        return self._entries(streams[0])

    def between(self, *, after: str, through: str, count: int) -> list[tuple[str, bytes]]:
        """Up to `count` entries with ids in (after, through], oldest first (XRANGE with an exclusive start)."""
        try:
            found = self._redis.xrange(self.key, min=f"({after}", max=through, count=count)
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return self._entries(found)

    def claim(self, node: str, token: str) -> str:
        """Tie node id `node` to the data directory with `token` (SET NX); returns the token the log holds for it.

        Two data directories under one node id would each skip the other's updates as their own: the second
        one finds another token here and is refused.
        """
        key = f"{self.key}:node:{node}"
        try:
            self._redis.set(key, token, nx=True)
            held = self._redis.get(key)
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return _text(held) if held is not None else ""

    def length(self) -> int:
        """Entries in the stream."""
        try:
            return int(self._redis.xlen(self.key))
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc

    @staticmethod
    def _entries(found: Any) -> list[tuple[str, bytes]]:
        """(id, body) pairs; an entry without our field gets empty bytes, which decoding rejects (and skips)."""
        return [(_text(entry_id), (fields or {}).get(_FIELD, b"")) for entry_id, fields in found or ()]

    def close(self) -> None:
        self._redis.close()
