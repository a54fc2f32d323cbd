"""One device's life: load its shard, register its hashes once, then train asynchronously with prefetched knowledge.

Training never waits for the network: each batch uses the last teacher received for its samples,
fresh logits go to a durable outbox (coalesced by sample) that is drained only when the server
acknowledges them, and a checkpoint lets a killed device resume where it was.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.backends import Trainer, make_trainer
from edge.baseline import Baseline, make_baseline
from edge.config import DataConfig, DeviceConfig
from edge.data import Shard, device_shard, load_dataset
from edge.hashing import HashEncoder
from edge.knowledge import BatchSchedule, TeacherCache
from edge.link import KnowledgeLink
from edge.shard_file import load_shard
from edge.state import Checkpoint, DeviceState, ProgressBeacon
from fedwire import (
    ErrorCode,
    ErrorReply,
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
    Register,
    RegisterAck,
    Reply,
    UpdateAck,
    UpdateFetch,
)
from fedwire.codec import as_received
from fedwire.constants import MAX_IDS_PER_MESSAGE
from fedwire.mqtt import BrokerAddress
from models.encoder import export_encoder_onnx
from models.loss import LossSettings

log = logging.getLogger(__name__)

REGISTER_CHUNK = 2048
HELLO_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 60.0
CHECKPOINT_EVERY_BATCHES = 200
REGISTRATION_HEAD_START_S = 120.0
# A run that ends by an exception (Ctrl-C, a refused registration) waits this long for acknowledgements at most.
ABORT_DELIVERY_TIMEOUT_S = 5.0
# Errors after which the server evidently lost (or never had) this device's registration.
REREGISTER_CODES = frozenset({ErrorCode.UNKNOWN_DEVICE, ErrorCode.UNKNOWN_SAMPLE})


class RegistrationError(RuntimeError):
    """The server refused this device's hello or registration."""


class UndeliveredError(RuntimeError):
    """The device finished, but the broker did not acknowledge everything it published before the bound passed.

    Its last report is then in `last_report.json` in the state directory, and unacknowledged updates stay
    in the outbox for the next run.
    """

    def __init__(self, undelivered: int, metrics: dict[str, Any]) -> None:
        super().__init__(f"{undelivered} message(s) unacknowledged by the broker at exit")
        self.undelivered = undelivered
        self.metrics = metrics


@dataclass(frozen=True)
class _InFlight:
    """An update the server has not acknowledged yet, as the server will hold it."""

    version: int
    ids: np.ndarray
    logits: np.ndarray


def _device_shard(data: DataConfig) -> Shard:
    """This device's shard: read from the file a flashed bundle ships, else derived from the whole dataset."""
    if data.shard:
        return load_shard(Path(data.shard), dataset=data.dataset, index=data.index, num_devices=data.num_devices)
    dataset = load_dataset(data.dataset)
    return device_shard(dataset, num_devices=data.num_devices, alpha=data.alpha, seed=data.seed, index=data.index)


def model_seed(config: DeviceConfig) -> int:
    """Seed of the device's initial weights.

    FedCache, FD and local devices each start from their own initialisation (they never share weights).
    FedAvg devices must start from one global model, as if the server had broadcast it: averaging
    independently initialised networks mixes unrelated hidden units and yields a near-chance model.
    A shared seed builds that same model on every device without a round trip.
    """
    if config.train.algorithm == "fedavg":
        return config.train.seed
    return config.train.seed + config.data.index


class DeviceRuntime:
    """Runs one device end to end; `run()` returns its final summary."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.fedcache = config.train.algorithm == "fedcache"
        self.shard: Shard = _device_shard(config.data)
        self.classes = self.shard.classes
        self.input_shape = self.shard.input_shape
        torch.manual_seed(config.train.seed * 1000 + config.data.index)
        train = config.train
        self.trainer: Trainer = make_trainer(
            backend=train.backend,
            arch=train.arch,
            classes=self.classes,
            in_channels=self.input_shape[0],
            seed=model_seed(config),
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
            loss=LossSettings(kd_alpha=train.kd_alpha, temperature=train.temperature),
            artifacts_dir=Path(train.artifacts_dir) if train.artifacts_dir else config.state_path / "artifacts",
            input_shape=self.input_shape,
            batch_size=train.batch_size,
            eval_backend=train.eval_backend,
        )
        samples = len(self.shard.y_train)
        self.state = DeviceState(config.state_path, classes=self.classes)
        self.teachers = TeacherCache(samples=samples, classes=self.classes)
        self.teachers.store_all(*self.state.load_teachers())
        self.schedule = BatchSchedule(
            samples=samples, batch_size=config.train.batch_size, epochs=config.train.epochs, seed=config.train.seed
        )
        self.position = 0
        self.progress = ProgressBeacon(config.state_path)
        checkpoint = self.state.load_checkpoint()
        if checkpoint is not None:
            self.trainer.restore_checkpoint_state(checkpoint.trainer)
            self.position = checkpoint.position
            log.info("resuming at batch %d of %d from the checkpoint", self.position, len(self.schedule))
        self.link = KnowledgeLink(
            device_id=config.id, address=BrokerAddress.parse(config.broker), on_reply=self._on_reply
        )
        self._replies: queue.SimpleQueue[tuple[Reply, int]] = queue.SimpleQueue()
        # The comparison's FD / FedAvg baselines hook into the same loop; None for FedCache and local.
        self.baseline: Baseline | None = make_baseline(
            config=config, link=self.link, trainer=self.trainer, labels=self.shard.y_train, classes=self.classes
        )
        self._in_flight: dict[int, _InFlight] = {}
        self._fetched_upto = self.position
        self._registered = threading.Event()
        self._registration: threading.Thread | None = None
        self._registration_error: Exception | None = None
        self._hash_cache: tuple[np.ndarray, HashEncoder] | None = None
        self.rejections = 0
        self.wasted_bytes = 0
        self.offline_steps = 0
        self._started = time.monotonic()

    # ------------------------------------------------------------ replies

    def _on_reply(self, reply: Reply, request_bytes: int) -> None:
        """paho's thread: keep teachers at once; leave durable bookkeeping to the training thread."""
        if isinstance(reply, Knowledge):
            self.teachers.store(reply.ids, reply.counts, reply.teacher_means())
        if self.fedcache:  # baselines settle their own replies
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
                    self._registered.clear()
            elif sent is not None and isinstance(reply, Knowledge | UpdateAck):
                self.state.outbox_acknowledged(reply.cid, version=sent.version, sent=(sent.ids, sent.logits))
                if reply.stale and sent.ids.size:
                    self.wasted_bytes += request_bytes * reply.stale // sent.ids.size
        for expired in self.link.forget_older_than(self.config.reply_timeout_s):
            if self._in_flight.pop(expired.cid, None) is not None:
                self.state.outbox_release(expired.cid)
            self.wasted_bytes += expired.packet_bytes

    # ------------------------------------------------------------ registration

    def _hashes(self) -> tuple[np.ndarray, HashEncoder]:
        if self._hash_cache is None:
            cfg = self.config.hash
            path = Path(cfg.encoder) if cfg.encoder else self._default_encoder_path()
            encoder = HashEncoder(path, hash_kind=cfg.kind)
            self._hash_cache = (encoder.encode(self.shard.x_train), encoder)
        return self._hash_cache

    def _default_encoder_path(self) -> Path:
        """The built-in encoder is deterministic from (shape, dim, seed): every device builds the same file."""
        cfg = self.config.hash
        shape = "x".join(str(s) for s in self.input_shape)
        path = self.config.state_path / f"encoder-{shape}-{cfg.dim}-{cfg.seed}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_encoder_onnx(path, input_shape=self.input_shape, dim=cfg.dim, seed=cfg.seed)
        return path

    def register(self) -> None:
        """Hello until the server answers, then send the chunks it does not hold yet (resumable)."""
        hashes, encoder = self._hashes()
        samples = len(self.shard.y_train)
        while True:
            self.link.wait_connected(timeout=60)
            request = Hello(
                device=self.config.id,
                cid=self.link.new_cid(),
                model=self.config.train.arch,
                classes=self.classes,
                samples=samples,
                hash_kind=encoder.hash_kind,
                hash_dim=encoder.hash_dim,
                capabilities=("update_fetch", self.config.train.logit_encoding.value),
            )
            try:
                hello = self.link.call(request, timeout=HELLO_TIMEOUT_S)
                break
            except TimeoutError:
                log.warning("no reply to hello yet; is the server running? retrying")
        if not isinstance(hello, HelloAck):
            raise RegistrationError(f"hello rejected: {hello}")
        labels = self.shard.y_train.astype(np.uint16)
        # Chunks go in id order and each is acknowledged before the next, so the server's count is a prefix.
        start = min(hello.registered, samples)
        if start:
            log.info("server already holds %d of %d samples; resuming registration there", start, samples)
        while start < samples:
            ids = np.arange(start, min(start + REGISTER_CHUNK, samples), dtype=np.uint32)
            request = Register(
                device=self.config.id, cid=self.link.new_cid(), ids=ids, labels=labels[ids], hashes=hashes[ids]
            )
            try:
                reply = self.link.call(request, timeout=self.config.reply_timeout_s)
            except TimeoutError:
                log.warning("registration chunk at %d timed out; sending it again", start)
                continue
            if not isinstance(reply, RegisterAck):
                raise RegistrationError(f"registration chunk rejected: {reply}")
            start = int(ids[-1]) + 1
        if hello.registered < samples:
            log.info("registered %d samples (%d hash bytes each)", samples, hashes.shape[1])
        self._registered.set()

    def _register_in_background(self) -> None:
        try:
            self.register()
        except Exception as exc:  # surfaced on the training thread, which stops the device
            self._registration_error = exc

    def _ensure_registration(self) -> None:
        """(Re-)register in the background so that training goes on meanwhile (CE only until then)."""
        if self._registration_error is not None:
            raise RegistrationError(repr(self._registration_error)) from self._registration_error
        if self._registered.is_set() or (self._registration is not None and self._registration.is_alive()):
            return
        self._registration = threading.Thread(target=self._register_in_background, name="registration", daemon=True)
        self._registration.start()

    # ------------------------------------------------------------ exchange

    def _next_version(self) -> int:
        """Strictly increasing across restarts: microseconds since the epoch, never below the last one used."""
        version = max(self.state.get("version") + 1, time.time_ns() // 1000)
        self.state.put("version", version)
        return version

    def _exchange(self, next_position: int) -> None:
        """Upload waiting logits and prefetch knowledge for the next batches, without ever waiting."""
        cfg = self.config.train
        self._settle_replies()
        if not self._registered.is_set():
            self._ensure_registration()
            return
        if not self.link.connected or self.link.outstanding() >= cfg.max_outstanding:
            return
        stop = min(next_position + cfg.prefetch_batches, len(self.schedule))
        fetch_ids = self.schedule.ids_between(max(self._fetched_upto, next_position), stop)
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

    # ------------------------------------------------------------ training

    def _checkpoint(self) -> None:
        self.state.save_checkpoint(Checkpoint(position=self.position, trainer=self.trainer.checkpoint_state()))
        self.state.save_teachers(*self.teachers.snapshot())

    def _report(self, *, epoch: int, done: bool) -> dict[str, Any]:
        accuracy = self.trainer.accuracy(self.shard.x_test, self.shard.y_test)
        latencies = self.link.latencies_s
        metrics: dict[str, Any] = {
            "device": self.config.id,
            "algorithm": self.config.train.algorithm,
            "arch": self.config.train.arch,
            "epoch": epoch,
            "step": self.position,
            "accuracy": accuracy,
            "time_s": time.monotonic() - self._started,
            "wall_time": time.time(),
            "bytes": self.link.byte_totals(),
            "wasted_bytes": self.wasted_bytes,
            "offline_s": self.link.offline_seconds(),
            "offline_steps": self.offline_steps,
            "outbox": self.state.outbox_size(),
            "teacher_coverage": self.baseline.coverage() if self.baseline else self.teachers.coverage(),
            "teachers_received": self.teachers.received,
            "rejections": self.rejections,
            "latency_ms_p50": float(np.median(latencies) * 1000) if latencies else None,
            "train_samples": len(self.shard.y_train),
            "test_samples": len(self.shard.y_test),
            "done": done,
        }
        if self.baseline is not None:
            metrics |= self.baseline.metrics()
        # On disk first: a harness knows the device's last report even if the message never arrives.
        self.state.write_last_report(metrics)
        self.link.publish_metrics(metrics)
        log.info(
            "epoch %d accuracy %.4f coverage %.2f up %d down %d offline %.0fs outbox %d",
            epoch,
            accuracy,
            metrics["teacher_coverage"],
            metrics["bytes"]["up"],
            metrics["bytes"]["down"],
            metrics["offline_s"],
            metrics["outbox"],
        )
        return metrics

    def _epoch_ends_at(self, position: int) -> bool:
        """True when batch `position - 1` was the last of its epoch."""
        return (
            position == len(self.schedule) or self.schedule.epoch_of[position] != self.schedule.epoch_of[position - 1]
        )

    def train(self) -> dict[str, Any]:
        """Asynchronous FedCache training: each batch uses whatever teacher has arrived, never waits."""
        x, y = self.shard.x_train, self.shard.y_train
        epoch_done = self.schedule.epoch_of[self.position - 1] + 1 if self.position else 0
        metrics = self._report(epoch=epoch_done, done=self.position == len(self.schedule))
        if self.fedcache:
            self._exchange(self.position)
        while self.position < len(self.schedule):
            batch = self.schedule.batches[self.position]
            teacher, mask = self.teachers.lookup(batch)
            if not self.fedcache:
                mask[:] = False
            if self.baseline is not None:
                teacher, mask = self.baseline.teacher(y[batch])
            logits = self.trainer.step(x[batch], y[batch], teacher, mask)
            self.position += 1
            self.offline_steps += not self.link.connected
            self.progress.write(self.position, force=self.position == len(self.schedule))
            if self.fedcache:
                self.state.outbox_put(batch, logits)
                self._exchange(self.position)
            if self.baseline is not None:
                self.baseline.after_step(labels=y[batch], logits=logits, position=self.position)
            if self.position % CHECKPOINT_EVERY_BATCHES == 0:
                self._checkpoint()
            if self._epoch_ends_at(self.position):
                epoch = self.schedule.epoch_of[self.position - 1] + 1
                last = self.position == len(self.schedule)
                if last and self.fedcache:
                    self._flush()
                if self.baseline is not None:
                    self.baseline.end_epoch(epoch=epoch, last=last)
                self._checkpoint()
                if epoch % self.config.train.eval_every_epochs == 0 or last:
                    metrics = self._report(epoch=epoch, done=last)
        return metrics

    def run(self) -> dict[str, Any]:
        """Connect, register (FedCache only), train, report; always closes the link and the state.

        Returns only once the broker acknowledged everything the device published (its final report
        included); raises UndeliveredError when `delivery_timeout_s` passed first.
        """
        torch.set_num_threads(1)
        self.link.start()
        try:
            if self.fedcache:
                self._ensure_registration()
                # Knowledge needs a registration: give it a bounded head start, then train regardless
                # (a device that boots offline trains with CE and registers when the link returns).
                if not self._registered.wait(REGISTRATION_HEAD_START_S):
                    log.warning("not registered after %.0f s; training with CE until it is", REGISTRATION_HEAD_START_S)
            if self.baseline is not None:
                self.baseline.start()
            metrics = self.train()
        except BaseException:
            self.link.close(timeout=ABORT_DELIVERY_TIMEOUT_S)
            self.state.close()
            raise
        undelivered = self.link.close(timeout=self.config.delivery_timeout_s)
        self.state.close()
        if undelivered:
            raise UndeliveredError(undelivered, metrics)
        return metrics
