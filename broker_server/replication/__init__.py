"""More than one server node: each holds the whole knowledge table, kept alike through a replicated log on Redis."""

from broker_server.replication.entries import (
    EntryError,
    HelloEntry,
    RegisterEntry,
    UpdatesEntry,
    decode_entry,
    encode_entry,
)
from broker_server.replication.journal import Journal, NodeMismatch
from broker_server.replication.node import open_replicated_state
from broker_server.replication.redis_log import LOG_KEY, LogUnavailable, RedisLog
from broker_server.replication.replicated_state import ReplicatedState, ReplicationStats

__all__ = [
    "LOG_KEY",
    "EntryError",
    "HelloEntry",
    "Journal",
    "LogUnavailable",
    "NodeMismatch",
    "RedisLog",
    "RegisterEntry",
    "ReplicatedState",
    "ReplicationStats",
    "UpdatesEntry",
    "decode_entry",
    "encode_entry",
    "open_replicated_state",
]
