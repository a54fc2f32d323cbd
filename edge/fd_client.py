"""Federated distillation (FD) on a device: upload per-class mean logits, distil from the global per-class mean."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from edge.baseline import NoKnowledge, exchange_metrics, hello_request, next_version, say_hello
from edge.config import DeviceConfig
from edge.link import KnowledgeLink
from fedwire import ErrorReply, FdGlobal, FdUpdate, Reply

log = logging.getLogger(__name__)

FINAL_WAIT_S = 10.0


class FdClient(NoKnowledge):
    """FD's device side; `teacher` is called from the training thread, replies land on paho's thread.

    The device accumulates, per class, the sum of the logits it produced since its last upload; every
    `fd_every_batches` batches (0: once per epoch) it sends the means and counts (`fd_update`) without
    waiting, and keeps the latest leave-one-out global table the server answers with (`fd_global`).
    A sample of class c is then distilled towards row c of that table, with FedCache's loss.
    """

    def __init__(self, *, config: DeviceConfig, link: KnowledgeLink, labels: np.ndarray, classes: int) -> None:
        super().__init__(classes=classes)
        self.config = config
        self.link = link
        self.labels = labels.astype(np.int64)
        self.every = config.train.fd_every_batches
        self._sums = np.zeros((classes, classes), np.float64)
        self._counts = np.zeros(classes, np.int64)
        self._global = np.zeros((classes, classes), np.float32)
        self._has = np.zeros(classes, bool)
        self._lock = threading.Lock()
        self._last: Future[Reply] | None = None
        self._version = 0
        self.exchanges = 0
        self.received = 0
        self.rejections = 0

    def start(self) -> None:
        say_hello(
            self.link,
            hello_request(config=self.config, samples=int(self.labels.size), capability="fd", classes=self.classes),
        )

    def teacher(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._global[labels], self._has[labels]

    def after_step(self, *, ids: np.ndarray, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        np.add.at(self._sums, labels.astype(np.int64), logits.astype(np.float64))
        self._counts += np.bincount(labels, minlength=self.classes)
        if self.every and position % self.every == 0:
            self._exchange()

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        if not self.every or last:
            self._exchange()
        if last and self._last is not None:
            try:  # the final window reaches the server before the device reports and leaves
                self._last.result(timeout=FINAL_WAIT_S)
            except Exception:
                log.warning("final fd_update not answered within %.0f s", FINAL_WAIT_S)

    def _exchange(self) -> None:
        """Send the window (kept when offline, so it goes with the next exchange) and never wait."""
        self.link.forget_older_than(self.config.reply_timeout_s)
        if not self.link.connected:
            return
        means = np.divide(
            self._sums, self._counts[:, None], out=np.zeros_like(self._sums), where=self._counts[:, None] > 0
        )
        # Versions grow across restarts (the server keeps the newest window per device).
        self._version = next_version(self._version)
        request = FdUpdate(
            device=self.config.id,
            cid=self.link.new_cid(),
            logits=means.astype(np.float32),
            class_counts=self._counts.astype(np.uint32),
            version=self._version,
            encoding=self.config.train.logit_encoding,
        )
        self._last = self.link.send(request)
        self._last.add_done_callback(self._on_global)
        self._sums[:] = 0
        self._counts[:] = 0
        self.exchanges += 1

    def _on_global(self, future: Future[Reply]) -> None:
        if future.cancelled():
            return
        reply = future.result()
        if isinstance(reply, ErrorReply):
            self.rejections += 1
            return
        if isinstance(reply, FdGlobal):
            with self._lock:
                self._global = reply.logits.copy()
                self._has = reply.class_counts > 0
                self.received += 1

    def coverage(self) -> float:
        with self._lock:
            return float(self._has[self.labels].mean()) if self.labels.size else 0.0

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            classes_with_teacher = int(self._has.sum())
        # Its own rejection count stays out of the report's `rejections` (FedCache's outbox refusals).
        return exchange_metrics() | {
            "fd_exchanges": self.exchanges,
            "fd_globals_received": self.received,
            "fd_teacher_classes": classes_with_teacher,
        }
