"""Opens the server's knowledge state: the one place that picks a backend for a path."""

from __future__ import annotations

from pathlib import Path

from broker_server.cache import CacheConfig
from broker_server.cached_state import CachedState
from broker_server.relations import EXACT_SEARCH_LIMIT
from broker_server.state import KnowledgeState
from broker_server.store import open_store
from fedwire.constants import DEFAULT_NEIGHBOURS

# Where `python broker_server/main.py --data-dir DIR` keeps its state: DIR/state (the private broker's is beside it).
STATE_DIRNAME = "state"


def open_state(
    path: Path | None,
    *,
    config: CacheConfig | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    exact_limit: int = EXACT_SEARCH_LIMIT,
    read_only: bool = False,
) -> KnowledgeState:
    """The state kept in directory `path` (SQLite, created if missing), or in memory only when `path` is None.

    Opening loads what was committed and builds every class's relations; `read_only` opens an existing
    directory for inspection without building relations or writing anything (changes then raise).
    `config` fixes classes and hash layout before any hello; a stored state that disagrees is refused.
    """
    store = open_store(path, read_only=read_only)
    return CachedState.open(store, config=config, neighbours=neighbours, exact_limit=exact_limit, read_only=read_only)
