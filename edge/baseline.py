"""The comparison's baselines on a device (FD, FedAvg): what the runtime calls, and which one a config asks for."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from edge.config import DeviceConfig
from edge.link import KnowledgeLink
from fedwire import Hello, HelloAck

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
BASELINES = ("fd", "fedavg")


class Baseline(Protocol):
    """Hooks the runtime calls around its unchanged training loop; each may talk to the server."""

    def start(self) -> None:
        """Say hello (blocking, retried): the server must know the device before anything else."""
        ...

    def teacher(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(teacher logits, mask) for a batch; mask False means cross-entropy only."""
        ...

    def after_step(self, *, labels: np.ndarray, logits: np.ndarray, position: int) -> None:
        """Called after every batch with the batch's logits; `position` is the number of batches done."""
        ...

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        """Called when epoch `epoch` (1-based) ends, before the device evaluates and reports."""
        ...

    def coverage(self) -> float:
        """Fraction of local training samples that currently have a teacher."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Extra fields of the device's metrics message."""
        ...


def say_hello(*, link: KnowledgeLink, config: DeviceConfig, classes: int, samples: int, capability: str) -> HelloAck:
    """Hello until the server answers; the deployment's hash layout is declared though no hash is ever sent."""
    while True:
        link.wait_connected(timeout=60)
        request = Hello(
            device=config.id,
            cid=link.new_cid(),
            model=config.train.arch,
            classes=classes,
            samples=samples,
            hash_kind=config.hash.kind,
            hash_dim=config.hash.dim,
            capabilities=(capability, config.train.logit_encoding.value),
        )
        try:
            reply = link.call(request, timeout=HELLO_TIMEOUT_S)
        except TimeoutError:
            log.warning("no reply to hello yet; is the server running? retrying")
            continue
        if not isinstance(reply, HelloAck):
            raise RuntimeError(f"hello rejected: {reply}")
        return reply


def make_baseline(
    *, config: DeviceConfig, link: KnowledgeLink, trainer: Any, labels: np.ndarray, classes: int
) -> Baseline | None:
    """The baseline `config.train.algorithm` names, or None for FedCache and the local baseline."""
    algorithm = config.train.algorithm
    if algorithm == "fd":
        from edge.fd_client import FdClient

        return FdClient(config=config, link=link, labels=labels, classes=classes)
    if algorithm == "fedavg":
        from edge.fedavg_client import FedAvgClient

        model = getattr(trainer, "model", None)
        if config.train.backend != "torch" or model is None:
            raise ValueError("FedAvg averages PyTorch weights: it needs train.backend = 'torch'")
        return FedAvgClient(config=config, link=link, model=model, samples=int(labels.size), classes=classes)
    return None
