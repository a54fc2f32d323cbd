"""The replication log on Redis: one stream every node appends to (XADD) and tails (XREAD), in one total order.

One stream gives one order for all nodes: a sample's registration always precedes its updates, and every
node numbers samples in that order. Redis must run with `appendonly yes` and `appendfsync always`
(fedwire/redis_server.py starts one so): an XADD that returned is then on disk, which is what lets a node
forget an outbox entry once the log took it.

Trimming: every node publishes its durable cursor (the last entry whose effects its store holds) beside the
stream, and entries older than the lowest cursor of all claimed nodes are removed (XTRIM MINID); the lowest
cursor is remembered as the log's trimmed point. Claiming, publishing and trimming are Lua scripts, so each is
atomic against the others: a node that claims with a cursor behind the trimmed point is refused (it would miss
entries) and must be seeded from a peer's data directory (replication/admin.py); a claimed node that is down
holds trimming back until it returns or an operator forgets it.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

LOG_KEY = "fedcache:v1:log"
_FIELD = b"e"
SOCKET_TIMEOUT_S = 10.0
START_ID = "0-0"

# Stream ids compare as (milliseconds, sequence) pairs; Lua numbers (doubles) hold both exactly.
_LUA_ID_LESS = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""
# KEYS: claim key, cursors hash, trimmed key. ARGV: token, node, cursor.
# -> {token held for the id ('' for none), trimmed point, 1 if now claimed with the cursor recorded else 0}
_CLAIM = (
    _LUA_ID_LESS
    + """
local held = redis.call('GET', KEYS[1]) or ''
local trimmed = redis.call('GET', KEYS[3]) or '0-0'
if (held ~= '' and held ~= ARGV[1]) or id_less(ARGV[3], trimmed) then return {held, trimmed, 0} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return {ARGV[1], trimmed, 1}
"""
)
# KEYS: claim key, cursors hash, trimmed key. ARGV: token, node, cursor. -> {1 if still claimed else 0, trimmed}
_PUBLISH = (
    _LUA_ID_LESS
    + """
local trimmed = redis.call('GET', KEYS[3]) or '0-0'
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, trimmed} end
local known = redis.call('HGET', KEYS[2], ARGV[2])
if not known or id_less(known, ARGV[3]) then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
return {1, trimmed}
"""
)
# KEYS: stream, cursors hash, trimmed key. -> {trimmed point, entries removed}
_TRIM = (
    _LUA_ID_LESS
    + """
local cursors = redis.call('HVALS', KEYS[2])
local trimmed = redis.call('GET', KEYS[3]) or '0-0'
if #cursors == 0 then return {trimmed, 0} end
local lowest = cursors[1]
for i = 2, #cursors do if id_less(cursors[i], lowest) then lowest = cursors[i] end end
if not id_less(trimmed, lowest) then return {trimmed, 0} end
local removed = redis.call('XTRIM', KEYS[1], 'MINID', lowest)
redis.call('SET', KEYS[3], lowest)
return {lowest, removed}
"""
)


class CursorTrimmed(ValueError):
    """A node's cursor is behind the log's trimmed point: entries it has not applied are gone from the log."""


class Claim(NamedTuple):
    """What claiming a node id gave: the token the log holds for it ("" for none), the log's trimmed point, and
    whether the id is now claimed with the node's cursor recorded (False: another directory holds the id, or the
    cursor is behind the trimmed point; then nothing changed)."""

    token: str
    trimmed: str
    recorded: bool


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
        self._scripts: dict[str, Any] = {}

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

    def claim(self, node: str, token: str, *, cursor: str = START_ID) -> Claim:
        """Tie node id `node` to the data directory with `token` (SET NX) and record its cursor, atomically.

        Two data directories under one node id would each skip the other's updates as their own: the second
        one finds another token here. A cursor behind the trimmed point claims nothing: entries it would need
        next are gone.
        """
        try:
            held, trimmed, recorded = self._script(_CLAIM)(
                keys=[self._node_key(node), self._cursors_key, self._trimmed_key], args=[token, node, cursor]
            )
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return Claim(token=_text(held) if held is not None else "", trimmed=_text(trimmed), recorded=bool(recorded))

    def publish_cursor(self, node: str, token: str, cursor: str) -> tuple[bool, str]:
        """Record that node `node` holds the log's effects up to `cursor` (never moving it back); returns
        whether the node is still claimed by `token` (an operator may have forgotten it) and the trimmed point."""
        try:
            claimed, trimmed = self._script(_PUBLISH)(
                keys=[self._node_key(node), self._cursors_key, self._trimmed_key], args=[token, node, cursor]
            )
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return bool(claimed), _text(trimmed)

    def trim(self) -> tuple[str, int]:
        """Remove the entries every claimed node has applied durably; (the trimmed point, entries removed)."""
        try:
            trimmed, removed = self._script(_TRIM)(keys=[self.key, self._cursors_key, self._trimmed_key])
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return _text(trimmed), int(removed)

    def nodes(self) -> dict[str, str]:
        """Every claimed node's published durable cursor."""
        try:
            found = self._redis.hgetall(self._cursors_key)
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return {_text(node): _text(cursor) for node, cursor in found.items()}

    def trimmed(self) -> str:
        """The log's trimmed point: entries older than it are gone ("0-0" while nothing was trimmed)."""
        try:
            value = self._redis.get(self._trimmed_key)
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return START_ID if value is None else _text(value)

    def forget(self, node: str) -> bool:
        """Drop node `node`'s claim and cursor (a node gone for good holds trimming back); whether it was known."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._node_key(node))
            pipe.hdel(self._cursors_key, node)
            deleted, removed = pipe.execute()
        except _TRANSIENT as exc:
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        return bool(deleted or removed)

    def _node_key(self, node: str) -> str:
        return f"{self.key}:node:{node}"

    @property
    def _cursors_key(self) -> str:
        return f"{self.key}:cursors"

    @property
    def _trimmed_key(self) -> str:
        return f"{self.key}:trimmed"

    def _script(self, source: str) -> Any:
        """The registered script for `source` (EVALSHA, loaded again by redis-py when the server lost it)."""
        if source not in self._scripts:
            self._scripts[source] = self._redis.register_script(source)
        return self._scripts[source]

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
