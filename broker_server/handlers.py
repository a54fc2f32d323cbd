"""Routes each validated request to its algorithm's handler over one knowledge state; knows nothing of MQTT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from broker_server.algorithm import Algorithm
from broker_server.cache import CacheConfig, KnowledgeCache
from broker_server.cached_state import CachedState
from broker_server.fd_handlers import FD
from broker_server.fedavg import DEFAULT_ROUND_TIMEOUT_S
from broker_server.fedavg_handlers import fedavg
from broker_server.fedcache_handlers import FEDCACHE, fetch, update, update_fetch
from broker_server.records import Rejected
from broker_server.relations import EXACT_SEARCH_LIMIT
from broker_server.state import KnowledgeState
from broker_server.state_factory import open_state
from fedwire.constants import DEFAULT_NEIGHBOURS, ErrorCode
from fedwire.errors import ProtocolError
from fedwire.messages import ErrorReply, Fetch, Hello, Message, Reply, Request, Update, UpdateFetch


def all_algorithms(
    *, round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S, min_participants: int = 0
) -> tuple[Algorithm[Any], ...]:
    """FedCache and the paper's baselines (docs/protocol.md §16), served side by side as the server always has."""
    return (FEDCACHE, FD, fedavg(round_timeout_s=round_timeout_s, min_participants=min_participants))


class CacheService:
    """The server without transport: `handle()` answers one request, `commit()` makes answers durable.

    Replies may be published right away, but the glue must acknowledge the requests to the broker
    only after commit(): a crash in between then leads to redelivery, which is harmless because
    registration and updates are idempotent. A rejected request changes nothing. Each algorithm's
    state is made the first time one of its requests (or, for a joining algorithm, a hello naming it
    as a capability) arrives; the baselines' states live in memory only.
    Not thread-safe: the caller serialises handle() and commit().
    """

    def __init__(self, *, state: KnowledgeState, algorithms: Sequence[Algorithm[Any]] | None = None) -> None:
        """Serve `algorithms` (all of them by default, FedAvg with its default rounds) over `state`."""
        self.state = state
        self._algorithms = all_algorithms() if algorithms is None else tuple(algorithms)
        self._routes: dict[type, Algorithm[Any]] = {}
        for algorithm in self._algorithms:
            for kind in algorithm.handlers:
                if kind in self._routes:
                    other = self._routes[kind].name
                    raise ValueError(f"{kind.__name__} is handled by both {other} and {algorithm.name}")
                self._routes[kind] = algorithm
        self._states: dict[str, Any] = {}

    @classmethod
    def open(
        cls,
        data_dir: Path | None,
        *,
        neighbours: int = DEFAULT_NEIGHBOURS,
        exact_limit: int = EXACT_SEARCH_LIMIT,
        config: CacheConfig | None = None,
        round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
        min_participants: int = 0,
    ) -> CacheService:
        """Every algorithm over the state `data_dir` holds (in memory when None), relations built."""
        state = open_state(data_dir, config=config, neighbours=neighbours, exact_limit=exact_limit)
        algorithms = all_algorithms(round_timeout_s=round_timeout_s, min_participants=min_participants)
        return cls(state=state, algorithms=algorithms)

    def __enter__(self) -> CacheService:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ API for the glue

    def handle(self, request: Request) -> Reply:
        """Answer one request; rule violations become an ErrorReply, anything else (a bug) propagates."""
        algorithm = self._routes.get(type(request))
        if algorithm is None:
            raise TypeError(f"not a request: {type(request).__name__}")
        try:
            reply = algorithm.handlers[type(request)](self._state_of(algorithm), request)
        except Rejected as rejection:
            return ErrorReply(
                device=request.device,
                cid=request.cid,
                code=rejection.code,
                message=rejection.detail,
                request=request.kind.value,
            )
        if isinstance(request, Hello):
            self._join(request)
        return reply

    def commit(self) -> None:
        """Make every change handle() made since the last commit durable."""
        self.state.commit()

    def stats(self) -> dict[str, float]:
        """devices, samples, with_knowledge, dirty_classes and cache_fill, for a metrics endpoint."""
        return self.state.stats().as_dict()

    def close(self) -> None:
        """Close the state; changes not committed are dropped (their requests were never acknowledged)."""
        self.state.close()

    def batch_state(self) -> KnowledgeState | None:
        """FedCache's state when FedCache's own handlers serve fetch, update and update_fetch and the state is
        `batchable` (else None), so the batched request path may answer those; made on first use, like every
        algorithm's state."""
        for kind, handler in ((Fetch, fetch), (Update, update), (UpdateFetch, update_fetch)):
            algorithm = self._routes.get(kind)
            if algorithm is not FEDCACHE or algorithm.handlers.get(kind) is not handler:
                return None
        state: KnowledgeState = self._state_of(FEDCACHE)
        return state if state.batchable else None

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the algorithms whose state exists: those a request (or a joining hello) has needed."""
        return tuple(self._states)

    @property
    def cache(self) -> KnowledgeCache:
        """The default backend's in-memory cache, for tests that look inside it; other backends have none."""
        if not isinstance(self.state, CachedState):
            raise AttributeError(f"{type(self.state).__name__} keeps no in-memory KnowledgeCache")
        return self.state.cache

    # ------------------------------------------------------------ algorithms' states

    def _state_of(self, algorithm: Algorithm[Any]) -> Any:
        """The algorithm's state, made on first use."""
        if algorithm.name not in self._states:
            self._states[algorithm.name] = algorithm.new_state(self.state)
        return self._states[algorithm.name]

    def _join(self, request: Hello) -> None:
        """Tell each joining algorithm the hello named as a capability that the device takes part."""
        for algorithm in self._algorithms:
            if algorithm.join is not None and algorithm.name in request.capabilities:
                algorithm.join(self._state_of(algorithm), request.device)


def check_envelope(message: Message, *, device: str, topic_kind: str) -> Request:
    """A device may only speak for itself, and the topic names the message's kind."""
    if not isinstance(message, Request):
        raise ProtocolError(
            ErrorCode.BAD_SCHEMA, f"'{message.kind.value}' is a reply kind, not a request", cid=message.cid
        )
    if message.device != device:
        raise ProtocolError(
            ErrorCode.DEVICE_MISMATCH,
            f"payload device '{message.device}' published on {device}'s topic",
            cid=message.cid,
        )
    if message.kind.value != topic_kind:
        raise ProtocolError(
            ErrorCode.BAD_SCHEMA, f"payload kind '{message.kind.value}' on a '{topic_kind}' topic", cid=message.cid
        )
    return message
