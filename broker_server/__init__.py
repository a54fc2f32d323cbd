"""The FedCache knowledge-cache server core: relations, state, stores and request handling, without MQTT."""

from broker_server.algorithm import Algorithm
from broker_server.cache import CacheConfig, KnowledgeCache
from broker_server.cached_state import CachedState, ReadOnlyState
from broker_server.defences import DefenceConfig, Defences
from broker_server.handlers import CacheService, all_algorithms
from broker_server.records import (
    Admission,
    CacheStats,
    DeviceKnowledge,
    DeviceRecord,
    Registration,
    Rejected,
    Teachers,
)
from broker_server.relations import EXACT_SEARCH_LIMIT, RelationTable, build_class_neighbours, hash_bytes_of
from broker_server.state import KnowledgeState
from broker_server.state_factory import open_state
from broker_server.store import (
    STORE_FILENAME,
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
    "Algorithm",
    "CacheConfig",
    "CacheService",
    "CacheStats",
    "CachedState",
    "DefenceConfig",
    "Defences",
    "DeviceKnowledge",
    "DeviceRecord",
    "KnowledgeCache",
    "KnowledgeState",
    "MemoryStore",
    "ReadOnlyState",
    "Registration",
    "Rejected",
    "RelationTable",
    "SqliteStore",
    "StateStore",
    "StoredState",
    "Teachers",
    "all_algorithms",
    "build_class_neighbours",
    "hash_bytes_of",
    "open_state",
    "open_store",
]
