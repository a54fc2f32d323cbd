"""Which `Algorithm` a device runs: one factory from the config's `train.algorithm`, and the seed it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge.backends import Trainer
from edge.baseline import Algorithm
from edge.config import DeviceConfig
from edge.data import Shard
from edge.fd_client import FdClient
from edge.fedavg_client import FedAvgClient
from edge.fedcache_client import FedCacheClient
from edge.knowledge import BatchSchedule
from edge.link import KnowledgeLink
from edge.local_client import LocalClient
from edge.state import DeviceState

# Algorithms whose devices must start from one global model, as if the server had broadcast it: averaging
# independently initialised networks mixes unrelated hidden units and yields a near-chance model.
SHARED_INITIAL_MODEL = frozenset({"fedavg"})


@dataclass(frozen=True)
class DeviceParts:
    """What the runtime built that an algorithm may use: its config, link, durable state, schedule, data, trainer."""

    config: DeviceConfig
    link: KnowledgeLink
    state: DeviceState
    schedule: BatchSchedule
    shard: Shard
    trainer: Trainer


def _fedcache(parts: DeviceParts) -> Algorithm:
    return FedCacheClient(
        config=parts.config, link=parts.link, state=parts.state, schedule=parts.schedule, shard=parts.shard
    )


def _fd(parts: DeviceParts) -> Algorithm:
    return FdClient(config=parts.config, link=parts.link, labels=parts.shard.y_train, classes=parts.shard.classes)


def _fedavg(parts: DeviceParts) -> Algorithm:
    model = getattr(parts.trainer, "model", None)
    if parts.config.train.backend != "torch" or model is None:
        raise ValueError("FedAvg averages PyTorch weights: it needs train.backend = 'torch'")
    shard = parts.shard
    return FedAvgClient(
        config=parts.config, link=parts.link, model=model, samples=int(shard.y_train.size), classes=shard.classes
    )


def _local(parts: DeviceParts) -> Algorithm:
    return LocalClient(classes=parts.shard.classes)


BUILDERS: dict[str, Callable[[DeviceParts], Algorithm]] = {
    "fedcache": _fedcache,
    "fd": _fd,
    "fedavg": _fedavg,
    "local": _local,
}


def make_algorithm(parts: DeviceParts) -> Algorithm:
    """The algorithm `parts.config.train.algorithm` names, built on the runtime's parts."""
    return BUILDERS[parts.config.train.algorithm](parts)


def model_seed(config: DeviceConfig) -> int:
    """Seed of the device's initial weights: one for every device where the algorithm averages weights.

    Otherwise (FedCache, FD, local) each device starts from its own initialisation: they never share weights.
    A shared seed builds the same model on every device without a round trip.
    """
    if config.train.algorithm in SHARED_INITIAL_MODEL:
        return config.train.seed
    return config.train.seed + config.data.index


__all__ = ["BUILDERS", "SHARED_INITIAL_MODEL", "DeviceParts", "make_algorithm", "model_seed"]
