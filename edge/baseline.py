"""The device's `Algorithm` protocol (the hooks the training loop calls) and what the algorithms share."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from edge.config import DeviceConfig
from edge.link import KnowledgeLink
from fedwire import HashKind, Hello, HelloAck

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0


class RegistrationError(RuntimeError):
    """The server refused this device's hello or registration."""


class Algorithm(Protocol):
    """What a federated algorithm does around the device's training loop; each hook may talk to the server.

    The loop calls `start` once, `begin` after its first report, then per batch `teacher` and `after_step`,
    `end_epoch` when an epoch ends (before its checkpoint and report), `checkpoint` with each of its own, and
    `coverage` / `metrics` for every report. An algorithm is built from the device's durable state, so it
    resumes what its last `checkpoint` kept.
    """

    def start(self) -> None:
        """Make the server know the device (hello, registration); may block, boundedly where training can go on."""
        ...

    def begin(self, position: int) -> None:
        """Training starts (or resumes) at batch `position`, right after the device's first report."""
        ...

    def teacher(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(teacher logits, mask) for a batch of sample ids and their labels; mask False means CE only."""
        ...

    def after_step(self, *, ids: np.ndarray, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        """Called after every batch with its logits; `position` is the number of batches done."""
        ...

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        """Called when epoch `epoch` (1-based) ends, before the device checkpoints, evaluates and reports."""
        ...

    def checkpoint(self) -> None:
        """Make the algorithm's own state durable, beside the training checkpoint the device writes."""
        ...

    def coverage(self) -> float:
        """Fraction of local training samples that currently have a teacher."""
        ...

    def metrics(self) -> dict[str, Any]:
        """The algorithm's fields of the device's report (`exchange_metrics` and its own)."""
        ...


def exchange_metrics(
    *, wasted_bytes: int = 0, outbox: int = 0, teachers_received: int = 0, rejections: int = 0
) -> dict[str, Any]:
    """The knowledge-exchange fields every report carries (zero for an algorithm that exchanges none)."""
    return {
        "wasted_bytes": wasted_bytes,
        "outbox": outbox,
        "teachers_received": teachers_received,
        "rejections": rejections,
    }


def next_version(previous: int) -> int:
    """A version above `previous` that also grows across restarts: microseconds since the epoch at least."""
    return max(previous + 1, time.time_ns() // 1000)


def hello_request(
    *,
    config: DeviceConfig,
    samples: int,
    capability: str,
    classes: int,
    hash_kind: HashKind | None = None,
    hash_dim: int | None = None,
) -> Hello:
    """The device's hello (cid 0: `say_hello` numbers each try); the hash layout defaults to the config's."""
    return Hello(
        device=config.id,
        cid=0,
        model=config.train.arch,
        classes=classes,
        samples=samples,
        hash_kind=config.hash.kind if hash_kind is None else hash_kind,
        hash_dim=config.hash.dim if hash_dim is None else hash_dim,
        capabilities=(capability, config.train.logit_encoding.value),
    )


def say_hello(link: KnowledgeLink, hello: Hello) -> HelloAck:
    """Hello (a fresh cid each try) until the server answers; RegistrationError when it refuses."""
    while True:
        link.wait_connected(timeout=60)
        try:
            reply = link.call(replace(hello, cid=link.new_cid()), timeout=HELLO_TIMEOUT_S)
            break
        except TimeoutError:
            log.warning("no reply to hello yet; is the server running? retrying")
    if not isinstance(reply, HelloAck):
        raise RegistrationError(f"hello rejected: {reply}")
    return reply


class NoKnowledge:
    """Hooks of an algorithm that distils from nothing; an algorithm overrides the ones it needs."""

    def __init__(self, *, classes: int) -> None:
        self.classes = classes

    def start(self) -> None:
        return None

    def begin(self, position: int) -> None:
        return None

    def teacher(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((labels.size, self.classes), np.float32), np.zeros(labels.size, bool)

    def after_step(self, *, ids: np.ndarray, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        return None

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        return None

    def checkpoint(self) -> None:
        return None

    def coverage(self) -> float:
        return 0.0

    def metrics(self) -> dict[str, Any]:
        return exchange_metrics()


__all__ = [
    "HELLO_TIMEOUT_S",
    "Algorithm",
    "NoKnowledge",
    "RegistrationError",
    "exchange_metrics",
    "hello_request",
    "next_version",
    "say_hello",
]
