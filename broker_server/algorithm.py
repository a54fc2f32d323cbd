"""What an algorithm brings to the server: a dispatch table of plain request handlers and how its state is made."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from broker_server.state import KnowledgeState
from fedwire.messages import Reply

S = TypeVar("S")


@dataclass(frozen=True)
class Algorithm(Generic[S]):
    """One algorithm's request kinds, each answered by a plain function `(state, request) -> reply`.

    `new_state` makes the algorithm's state from the shared knowledge state (registry and classes) the
    first time the algorithm is needed, so a deployment that never uses it never builds it. `join`, when
    set, is told of every device whose accepted hello declares the capability `name`.
    """

    name: str
    handlers: Mapping[type, Callable[[S, Any], Reply]]
    new_state: Callable[[KnowledgeState], S]
    join: Callable[[S, str], None] | None = None
