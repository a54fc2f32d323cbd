"""FedCache on a device: per-sample logits out through a durable outbox, prefetched teachers in, never waiting."""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.attacks import CraftedRegistration, crafted_registration, logit_attack
from edge.baseline import exchange_metrics, next_version
from edge.config import DeviceConfig
from edge.data import load_dataset
from edge.knowledge import BatchSchedule, TeacherCache
from edge.link import KnowledgeLink
from edge.registration import Registration
from edge.state import DeviceState
from fedwire import ErrorCode, ErrorReply, Fetch, Knowledge, Reply, UpdateAck, UpdateFetch
from fedwire.codec import as_received
from fedwire.constants import MAX_IDS_PER_MESSAGE

if TYPE_CHECKING:
    from edge.data import Shard

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0
REGISTRATION_HEAD_START_S = 120.0
# Errors after which the server evidently lost (or never had) this device's registration.
REREGISTER_CODES = frozenset({ErrorCode.UNKNOWN_DEVICE, ErrorCode.UNKNOWN_SAMPLE})


@dataclass(frozen=True)
class _InFlight:
    """An update the server has not acknowledged yet, as the server will hold it."""

    version: int
    ids: np.ndarray
    logits: np.ndarray


class FedCacheClient:
    """FedCache's device side; replies land on paho's thread, everything durable happens on the training thread.

    Each batch uses the last teacher received for its samples; fresh logits go to the outbox (coalesced by
    sample), which is drained only when the server acknowledges them; what times out or is refused is sent
    again, and a server that lost the device's registration gets it again (CE only meanwhile).
    """

    def __init__(
        self, *, config: DeviceConfig, link: KnowledgeLink, state: DeviceState, schedule: BatchSchedule, shard: Shard
    ) -> None:
        self.config = config
        self.link = link
        self.state = state
        self.schedule = schedule
        self.registration = Registration(config=config, link=link, shard=shard)
        self.teachers = TeacherCache(samples=len(shard.y_train), classes=shard.classes)
        self.teachers.store_all(*state.load_teachers())
        # A malicious device (config [attack]) uploads crafted logits; it trains on its own, like anyone.
        self.attack = logit_attack(config.attack, device_index=config.data.index)
        # A hub or copy device also registers crafted samples, and uploads their poison once registered.
        self.hub: CraftedRegistration | None = crafted_registration(
            config.attack, classes=shard.classes, kind=config.hash.kind, device_index=config.data.index,
            public=self._public_hashes,
        )  # fmt: skip
        if self.hub is not None:
            self.registration.extend = self.hub.extend
        self._replies: queue.SimpleQueue[tuple[Reply, int]] = queue.SimpleQueue()
        self._in_flight: dict[int, _InFlight] = {}
        self._fetched_upto = 0
        self.rejections = 0
        self.wasted_bytes = 0
        link.on_reply = self._on_reply

    # ------------------------------------------------------------ hooks

    def start(self) -> None:
        self.registration.ensure()
        # Knowledge needs a registration: give it a bounded head start, then train regardless
        # (a device that boots offline trains with CE and registers when the link returns).
        if not self.registration.wait(REGISTRATION_HEAD_START_S):
            log.warning("not registered after %.0f s; training with CE until it is", REGISTRATION_HEAD_START_S)

    def begin(self, position: int) -> None:
        self._fetched_upto = position
        if self.hub is not None and self.hub.samples is not None and self.registration.done:
            self.state.outbox_put(self.hub.samples.ids, self.hub.samples.logits)
        self._exchange(position)

    def teacher(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.teachers.lookup(ids)

    def after_step(self, *, ids: np.ndarray, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        if self.schedule.exchanges(position - 1, self.config.train.exchange_epochs):
            self.state.outbox_put(ids, logits if self.attack is None else self.attack(logits, labels))
        # With knowledge_every_batches B, the logits of B batches wait in the (durable) outbox and go out in one
        # message, with one fetch for B batches' samples; the last batch sends what is left.
        if position % self.config.train.knowledge_every_batches == 0 or position == len(self.schedule):
            self._exchange(position)

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        if self.hub is not None and self.hub.samples is not None and self.registration.done:
            self.state.outbox_put(self.hub.samples.ids, self.hub.samples.logits)  # the crafted samples' poison
        if last:  # what the device trained on reaches the server before its final report
            self._flush()

    def _public_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """A copy device's view of the public set: its dataset's training images under the fleet's encoder."""
        public = load_dataset(self.config.data.dataset)
        return self.registration.encoder.encode(public.x_train), public.y_train

    def checkpoint(self) -> None:
        self.state.save_teachers(*self.teachers.snapshot())

    def coverage(self) -> float:
        return self.teachers.coverage()

    def metrics(self) -> dict[str, Any]:
        return exchange_metrics(
            wasted_bytes=self.wasted_bytes,
            outbox=self.state.outbox_size(),
            teachers_received=self.teachers.received,
            rejections=self.rejections,
        )

    # ------------------------------------------------------------ replies

    def _on_reply(self, reply: Reply, request_bytes: int) -> None:
        """paho's thread: keep teachers at once; leave durable bookkeeping to the training thread."""
        if isinstance(reply, Knowledge):
            self.teachers.store(reply.ids, reply.counts, reply.teacher_means())
        self._replies.put((reply, request_bytes))

    def _settle_replies(self, *, wait_s: float = 0.0) -> None:
        """Drain acknowledged updates from the outbox; release what timed out so it is sent again.

        With `wait_s`, first wait that long at most for a reply to arrive (the flush at the end waits on
        replies, not on a clock).
        """
        block = wait_s > 0
        while True:
            try:
                reply, request_bytes = self._replies.get(timeout=wait_s) if block else self._replies.get_nowait()
            except queue.Empty:
                break
            block = False
            sent = self._in_flight.pop(reply.cid, None)
            if isinstance(reply, ErrorReply):
                self.rejections += 1
                if sent is not None:
                    self.state.outbox_release(reply.cid)
                    self.wasted_bytes += request_bytes
                if reply.code in REREGISTER_CODES:
                    self.registration.lost()
            elif sent is not None and isinstance(reply, Knowledge | UpdateAck):
                self.state.outbox_acknowledged(reply.cid, version=sent.version, sent=(sent.ids, sent.logits))
                if reply.stale and sent.ids.size:
                    self.wasted_bytes += request_bytes * reply.stale // sent.ids.size
        for expired in self.link.forget_older_than(self.config.reply_timeout_s):
            if self._in_flight.pop(expired.cid, None) is not None:
                self.state.outbox_release(expired.cid)
            self.wasted_bytes += expired.packet_bytes

    # ------------------------------------------------------------ exchange

    def _next_version(self) -> int:
        """Strictly increasing across restarts: microseconds since the epoch, never below the last one used."""
        version = next_version(self.state.get("version"))
        self.state.put("version", version)
        return version

    def _exchange(self, next_position: int) -> None:
        """Upload waiting logits and prefetch knowledge for the next batches, without ever waiting."""
        cfg = self.config.train
        self._settle_replies()
        if not self.registration.done:
            self.registration.ensure()
            return
        if not self.link.connected or self.link.outstanding() >= cfg.max_outstanding:
            return
        # Up to the batch before the next exchange, and prefetch_batches beyond it.
        stop = min(next_position + cfg.knowledge_every_batches - 1 + cfg.prefetch_batches, len(self.schedule))
        fetch_ids = self.schedule.ids_between(max(self._fetched_upto, next_position), stop, epochs=cfg.exchange_epochs)
        cid = self.link.new_cid()
        ids, logits = self.state.outbox_take(limit=MAX_IDS_PER_MESSAGE, cid=cid)
        if ids.size:
            version = self._next_version()
            request = UpdateFetch(
                device=self.config.id,
                cid=cid,
                ids=ids,
                logits=logits,
                version=version,
                fetch_ids=fetch_ids,
                encoding=cfg.logit_encoding,
                teacher=cfg.teacher_form,
            )
            self._in_flight[cid] = _InFlight(version=version, ids=ids, logits=as_received(logits, cfg.logit_encoding))
            self.link.send(request)
        elif fetch_ids.size:
            fetch = Fetch(
                device=self.config.id, cid=cid, ids=fetch_ids, encoding=cfg.logit_encoding, teacher=cfg.teacher_form
            )
            self.link.send(fetch)
        self._fetched_upto = max(self._fetched_upto, stop)

    def _flush(self) -> bool:
        """Wait (bounded) until the server acknowledged everything in the outbox; True when it did."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            self._exchange(len(self.schedule))
            if self.state.outbox_size() == 0 and not self._in_flight:
                return True
            # Until a reply comes (or, offline, a reconnect may let the outbox go out again within a second).
            self._settle_replies(wait_s=min(remaining, 1.0))
        log.warning(
            "%d updates still unacknowledged; they stay in the outbox for the next run", self.state.outbox_size()
        )
        return False
