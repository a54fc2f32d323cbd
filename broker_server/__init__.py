"""The FedCache knowledge-cache server core: relations, state, stores and request handling, without MQTT."""

from broker_server.cache import (
    Admission,
    CacheConfig,
    CacheStats,
    KnowledgeCache,
    Registration,
    Rejected,
    Teachers,
)
from broker_server.handlers import CacheService
from broker_server.relations import EXACT_SEARCH_LIMIT, RelationTable, build_class_neighbours, hash_bytes_of
from broker_server.store import (
    STORE_FILENAME,
    DeviceRecord,
    MemoryStore,
    SqliteStore,
    StateStore,
    StoredState,
    open_store,
)

__all__ = [
    "EXACT_SEARCH_LIMIT",
    "STORE_FILENAME",
    "Admission",
    "CacheConfig",
    "CacheService",
    "CacheStats",
    "DeviceRecord",
    "KnowledgeCache",
    "MemoryStore",
    "Registration",
    "Rejected",
    "RelationTable",
    "SqliteStore",
    "StateStore",
    "StoredState",
    "Teachers",
    "build_class_neighbours",
    "hash_bytes_of",
    "open_store",
]
