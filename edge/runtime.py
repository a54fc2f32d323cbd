"""One device's life: load its shard, build its algorithm, then train, checkpoint and report until it is done."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.algorithms import DeviceParts, make_algorithm, model_seed
from edge.backends import Trainer, make_trainer
from edge.baseline import Algorithm
from edge.config import DataConfig, DeviceConfig
from edge.data import Shard, device_shard, limit_train_samples, load_dataset
from edge.knowledge import BatchSchedule
from edge.link import KnowledgeLink
from edge.shard_file import load_shard
from edge.state import Checkpoint, DeviceState, ProgressBeacon
from fedwire.mqtt import BrokerAddress
from models.loss import LossSettings

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_BATCHES = 200
# A run that ends by an exception (Ctrl-C, a refused registration) waits this long for acknowledgements at most.
ABORT_DELIVERY_TIMEOUT_S = 5.0


class UndeliveredError(RuntimeError):
    """The device finished, but the broker did not acknowledge everything it published before the bound passed.

    Its last report is then in `last_report.json` in the state directory, and unacknowledged updates stay
    in the outbox for the next run.
    """

    def __init__(self, undelivered: int, metrics: dict[str, Any]) -> None:
        super().__init__(f"{undelivered} message(s) unacknowledged by the broker at exit")
        self.undelivered = undelivered
        self.metrics = metrics


def _device_shard(data: DataConfig, *, max_samples: int = 0) -> Shard:
    """This device's shard: read from the file a flashed bundle ships, else derived from the whole dataset;
    then cut to `max_samples` training samples (train.max_samples) when that is set."""
    if data.shard:
        shard = load_shard(Path(data.shard), dataset=data.dataset, index=data.index, num_devices=data.num_devices)
    else:
        dataset = load_dataset(data.dataset)
        shard = device_shard(
            dataset,
            num_devices=data.num_devices,
            alpha=data.alpha,
            seed=data.seed,
            index=data.index,
            partition=data.partition,
        )
    return limit_train_samples(shard, max_samples=max_samples, seed=data.seed)


def recalibration_samples(samples: int, *, wanted: int, seed: int) -> np.ndarray:
    """Which training samples a device recomputes its batch-norm statistics over (train.bn_recalibration):
    all of them when `wanted` covers the shard, else a fixed seeded subset, in shard order, so every evaluation
    (and a resumed run) uses the same ones; none when the setting is off."""
    if wanted <= 0:
        return np.zeros(0, dtype=np.int64)
    if wanted >= samples:
        return np.arange(samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).permutation(samples)[:wanted])


class StartupClock:
    """Where a device's start-up went: wall seconds of each phase from process start to its first report.

    Phases in order: `imports` (the interpreter's, torch's), `shard` (dataset and split), `model` (the
    trainer), `state` (durable state, link, algorithm), `join` (the algorithm's start: hello, registration
    and the wait for it), `first_eval` (the evaluation of the first report); plus `cpu`, the CPU seconds
    the process had used by then. Reported in every metrics message as `startup_s`, so a trial can show
    what its processes starting together on one host wait for.
    """

    def __init__(self, started: float | None = None) -> None:
        self._last = time.monotonic() if started is None else started
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """`phase` ended now: it took the time since the previous mark (or the process start)."""
        now = time.monotonic()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now


class DeviceRuntime:
    """Runs one device end to end: the training loop, its checkpoints and reports; `run()` returns the final one.

    Training never waits for the network: what the algorithm exchanges happens in its hooks
    (`edge.baseline.Algorithm`), and a checkpoint lets a killed device resume where it was.
    """

    def __init__(self, config: DeviceConfig, *, started: float | None = None) -> None:
        """`started`: time.monotonic() when the process began (its imports count as start-up); default now."""
        self.config = config
        self.startup = StartupClock(started)
        if started is not None:
            self.startup.mark("imports")
        self.shard: Shard = _device_shard(config.data, max_samples=config.train.max_samples)
        self.startup.mark("shard")
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
            loss=LossSettings(kd_alpha=train.kd_alpha, temperature=train.temperature, teacher_gate=train.teacher_gate),
            artifacts_dir=Path(train.artifacts_dir) if train.artifacts_dir else config.state_path / "artifacts",
            input_shape=self.input_shape,
            batch_size=train.batch_size,
            eval_backend=train.eval_backend,
        )
        self.startup.mark("model")
        self.state = DeviceState(config.state_path, classes=self.classes)
        self.schedule = BatchSchedule(
            samples=len(self.shard.y_train), batch_size=train.batch_size, epochs=train.epochs, seed=train.seed
        )
        self.recalibration = recalibration_samples(
            len(self.shard.y_train), wanted=train.bn_recalibration, seed=train.seed
        )
        self.position = 0
        self.progress = ProgressBeacon(config.state_path)
        checkpoint = self.state.load_checkpoint()
        if checkpoint is not None:
            self.trainer.restore_checkpoint_state(checkpoint.trainer)
            self.position = checkpoint.position
            log.info("resuming at batch %d of %d from the checkpoint", self.position, len(self.schedule))
        self.link = KnowledgeLink(
            device_id=config.id,
            address=BrokerAddress.parse(config.broker),
            credentials=config.security,
        )
        self.algorithm: Algorithm = make_algorithm(
            DeviceParts(
                config=config,
                link=self.link,
                state=self.state,
                schedule=self.schedule,
                shard=self.shard,
                trainer=self.trainer,
            )
        )
        self.offline_steps = 0
        self._started = time.monotonic()
        self.startup.mark("state")

    def _checkpoint(self) -> None:
        self.state.save_checkpoint(Checkpoint(position=self.position, trainer=self.trainer.checkpoint_state()))
        self.algorithm.checkpoint()

    def _recalibrate(self) -> None:
        """Before an evaluation: the batch-norm statistics over the chosen training samples (train.bn_recalibration).

        Runs before the epoch's checkpoint, so what the device evaluates is what it keeps and resumes from.
        Training itself is unaffected: a train-mode step normalises by its batch, never by these buffers.
        """
        if len(self.recalibration):
            self.trainer.recalibrate_batchnorm(self.shard.x_train[self.recalibration])

    def _report(self, *, epoch: int, done: bool) -> dict[str, Any]:
        accuracy = self.trainer.accuracy(self.shard.x_test, self.shard.y_test)
        if "first_eval" not in self.startup.phases:  # the first report carries its own evaluation's time
            self.startup.mark("first_eval")
            self.startup.phases["cpu"] = round(time.process_time(), 3)
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
            "offline_s": self.link.offline_seconds(),
            "offline_steps": self.offline_steps,
            "teacher_coverage": self.algorithm.coverage(),
            "latency_ms_p50": float(np.median(latencies) * 1000) if latencies else None,
            "train_samples": len(self.shard.y_train),
            "test_samples": len(self.shard.y_test),
            "startup_s": self.startup.phases,
            "done": done,
        }
        metrics |= self.algorithm.metrics()
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
        """The training loop: each batch takes whatever teacher the algorithm has, never waits for the network."""
        x, y = self.shard.x_train, self.shard.y_train
        algorithm = self.algorithm
        epoch_done = self.schedule.epoch_of[self.position - 1] + 1 if self.position else 0
        self._recalibrate()
        metrics = self._report(epoch=epoch_done, done=self.position == len(self.schedule))
        algorithm.begin(self.position)
        while self.position < len(self.schedule):
            batch = self.schedule.batches[self.position]
            labels = y[batch]
            teacher, mask = algorithm.teacher(batch, labels)
            logits = self.trainer.step(x[batch], labels, teacher, mask)
            self.position += 1
            self.offline_steps += not self.link.connected
            self.progress.write(self.position, force=self.position == len(self.schedule))
            algorithm.after_step(ids=batch, labels=labels, logits=logits, position=self.position)
            if self.position % CHECKPOINT_EVERY_BATCHES == 0:
                self._checkpoint()
            if self._epoch_ends_at(self.position):
                epoch = self.schedule.epoch_of[self.position - 1] + 1
                last = self.position == len(self.schedule)
                evaluate = epoch % self.config.train.eval_every_epochs == 0 or last
                algorithm.end_epoch(epoch=epoch, last=last)
                if evaluate:
                    self._recalibrate()
                self._checkpoint()
                if evaluate:
                    metrics = self._report(epoch=epoch, done=last)
        return metrics

    def run(self) -> dict[str, Any]:
        """Connect, start the algorithm (hello, registration), train, report; always closes the link and the state.

        Returns only once the broker acknowledged everything the device published (its final report
        included); raises UndeliveredError when `delivery_timeout_s` passed first.
        """
        torch.set_num_threads(1)
        self.link.start()
        try:
            self.algorithm.start()
            self.startup.mark("join")
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
