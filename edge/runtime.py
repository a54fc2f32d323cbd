"""One device's life: load its shard, register its hashes once, then train asynchronously with prefetched knowledge."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.config import DeviceConfig
from edge.data import Shard, device_shard, load_dataset
from edge.hashing import HashEncoder
from edge.knowledge import BatchSchedule, Outbox, TeacherCache
from edge.link import KnowledgeLink
from edge.trainer import LossSettings, TorchTrainer
from export.encoder import export_encoder_onnx
from export.zoo import build_model
from fedwire import (
    ErrorReply,
    Fetch,
    Hello,
    HelloAck,
    Knowledge,
    Register,
    RegisterAck,
    Reply,
    UpdateFetch,
)
from fedwire.constants import MAX_IDS_PER_MESSAGE
from fedwire.mqtt import BrokerAddress

log = logging.getLogger(__name__)

REGISTER_CHUNK = 2048
HELLO_ATTEMPTS = 20
FLUSH_TIMEOUT_S = 30.0


class RegistrationError(RuntimeError):
    """The server refused this device's hello or registration."""


class DeviceRuntime:
    """Runs one device end to end; `run()` returns its final summary."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.fedcache = config.train.algorithm == "fedcache"
        dataset = load_dataset(config.data.dataset)
        self.classes = dataset.classes
        self.input_shape = dataset.input_shape
        self.shard: Shard = device_shard(
            dataset,
            num_devices=config.data.num_devices,
            alpha=config.data.alpha,
            seed=config.data.seed,
            index=config.data.index,
        )
        torch.manual_seed(config.train.seed * 1000 + config.data.index)
        model = build_model(
            config.train.arch,
            classes=self.classes,
            in_channels=self.input_shape[0],
            seed=config.train.seed + config.data.index,
        )
        self.trainer = TorchTrainer(
            model=model,
            lr=config.train.lr,
            momentum=config.train.momentum,
            weight_decay=config.train.weight_decay,
            loss=LossSettings(kd_alpha=config.train.kd_alpha, temperature=config.train.temperature),
        )
        samples = len(self.shard.y_train)
        self.teachers = TeacherCache(samples=samples, classes=self.classes)
        self.outbox = Outbox(samples=samples, classes=self.classes)
        self.schedule = BatchSchedule(
            samples=samples, batch_size=config.train.batch_size, epochs=config.train.epochs, seed=config.train.seed
        )
        self.link = KnowledgeLink(
            device_id=config.id, address=BrokerAddress.parse(config.broker), on_reply=self._on_reply
        )
        self._version = 0
        self._fetched_upto = 0
        self._rejections = 0
        self._started = time.monotonic()

    # ------------------------------------------------------------ replies (paho's thread)

    def _on_reply(self, reply: Reply) -> None:
        if isinstance(reply, Knowledge):
            self.teachers.store(reply.ids, reply.counts, reply.logits)
        elif isinstance(reply, ErrorReply):
            self._rejections += 1

    # ------------------------------------------------------------ registration

    def _hashes(self) -> tuple[np.ndarray, HashEncoder]:
        cfg = self.config.hash
        path = Path(cfg.encoder) if cfg.encoder else self._default_encoder_path()
        encoder = HashEncoder(path, hash_kind=cfg.kind)
        return encoder.encode(self.shard.x_train), encoder

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
        """Hello, then send any registration chunks the server does not hold yet (idempotent, resumable)."""
        hashes, encoder = self._hashes()
        samples = len(self.shard.y_train)
        hello = None
        for attempt in range(HELLO_ATTEMPTS):
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
                hello = self.link.call(request, timeout=min(5.0 * (attempt + 1), self.config.reply_timeout_s))
                break
            except TimeoutError:
                log.warning("no hello reply yet (attempt %d); is the server running?", attempt + 1)
        if hello is None:
            raise RegistrationError("the server never answered hello")
        if not isinstance(hello, HelloAck):
            raise RegistrationError(f"hello rejected: {hello}")
        if hello.registered >= samples:
            log.info("server already holds all %d samples; skipping registration", samples)
            return
        labels = self.shard.y_train.astype(np.uint16)
        for start in range(0, samples, REGISTER_CHUNK):
            ids = np.arange(start, min(start + REGISTER_CHUNK, samples), dtype=np.uint32)
            reply = self.link.call(
                Register(
                    device=self.config.id, cid=self.link.new_cid(), ids=ids, labels=labels[ids], hashes=hashes[ids]
                ),
                timeout=self.config.reply_timeout_s,
            )
            if not isinstance(reply, RegisterAck):
                raise RegistrationError(f"registration chunk rejected: {reply}")
        log.info("registered %d samples (%d hash bytes each)", samples, hashes.shape[1])

    # ------------------------------------------------------------ training

    def _next_version(self) -> int:
        """Strictly increasing across restarts too: microseconds since the epoch, bumped if the clock stalls."""
        self._version = max(self._version + 1, time.time_ns() // 1000)
        return self._version

    def _exchange(self, next_position: int) -> None:
        """Upload waiting logits and prefetch knowledge for the next batches, without ever waiting."""
        cfg = self.config.train
        if self.link.outstanding() >= cfg.max_outstanding:
            self.link.forget_older_than(self.config.reply_timeout_s)
            return
        fetch_ids = self.schedule.ids_between(self._fetched_upto, next_position + cfg.prefetch_batches)
        self._fetched_upto = max(self._fetched_upto, min(next_position + cfg.prefetch_batches, len(self.schedule)))
        ids, logits = self.outbox.take(MAX_IDS_PER_MESSAGE)
        if ids.size:
            self.link.send(
                UpdateFetch(
                    device=self.config.id,
                    cid=self.link.new_cid(),
                    ids=ids,
                    logits=logits,
                    version=self._next_version(),
                    fetch_ids=fetch_ids,
                    encoding=cfg.logit_encoding,
                )
            )
        elif fetch_ids.size:
            self.link.send(
                Fetch(device=self.config.id, cid=self.link.new_cid(), ids=fetch_ids, encoding=cfg.logit_encoding)
            )

    def _flush(self) -> None:
        """Send what is left in the outbox and wait (bounded) for the server to take it."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while (len(self.outbox) or self.link.outstanding()) and time.monotonic() < deadline:
            if len(self.outbox) and self.link.outstanding() < self.config.train.max_outstanding:
                self._exchange(len(self.schedule))
            time.sleep(0.01)

    def _report(self, *, epoch: int, step: int, done: bool) -> dict[str, Any]:
        accuracy = self.trainer.accuracy(self.shard.x_test, self.shard.y_test)
        latencies = self.link.latencies_s
        metrics: dict[str, Any] = {
            "device": self.config.id,
            "algorithm": self.config.train.algorithm,
            "arch": self.config.train.arch,
            "epoch": epoch,
            "step": step,
            "accuracy": accuracy,
            "time_s": time.monotonic() - self._started,
            "bytes": self.link.byte_totals(),
            "teacher_coverage": self.teachers.coverage(),
            "teachers_received": self.teachers.received,
            "rejections": self._rejections,
            "latency_ms_p50": float(np.median(latencies) * 1000) if latencies else None,
            "train_samples": len(self.shard.y_train),
            "test_samples": len(self.shard.y_test),
            "done": done,
        }
        self.link.publish_metrics(metrics)
        log.info(
            "epoch %d accuracy %.4f coverage %.2f up %d down %d",
            epoch,
            accuracy,
            metrics["teacher_coverage"],
            metrics["bytes"]["up"],
            metrics["bytes"]["down"],
        )
        return metrics

    def train(self) -> dict[str, Any]:
        """Asynchronous FedCache training: each batch uses whatever teacher has arrived, never waits."""
        x, y = self.shard.x_train, self.shard.y_train
        metrics = self._report(epoch=0, step=0, done=False)
        if self.fedcache:
            self._exchange(0)
        for position, batch in enumerate(self.schedule.batches):
            teacher, mask = self.teachers.lookup(batch)
            if not self.fedcache:
                mask[:] = False
            logits = self.trainer.step(x[batch], y[batch], teacher, mask)
            if self.fedcache:
                self.outbox.put(batch, logits)
                self._exchange(position + 1)
            last_of_epoch = (
                position + 1 == len(self.schedule)
                or self.schedule.epoch_of[position + 1] != self.schedule.epoch_of[position]
            )
            epoch = self.schedule.epoch_of[position] + 1
            if last_of_epoch and (
                epoch % self.config.train.eval_every_epochs == 0 or position + 1 == len(self.schedule)
            ):
                if position + 1 == len(self.schedule) and self.fedcache:
                    self._flush()
                metrics = self._report(epoch=epoch, step=position + 1, done=position + 1 == len(self.schedule))
        if not self.schedule.batches:
            metrics = self._report(epoch=0, step=0, done=True)
        return metrics

    def run(self) -> dict[str, Any]:
        """Connect, register (FedCache only), train, report; always closes the link."""
        torch.set_num_threads(1)
        self.link.start()
        try:
            if self.fedcache:
                self.register()
            self._started = time.monotonic()
            return self.train()
        finally:
            time.sleep(0.2)  # let the last metrics message leave before disconnecting
            self.link.stop()
