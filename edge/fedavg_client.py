"""FedAvg on a device: after every local epoch (one round) upload the weights, wait for the average, load it."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from edge.baseline import NoKnowledge, exchange_metrics, hello_request, say_hello
from edge.config import DeviceConfig
from edge.link import KnowledgeLink
from fedwire import ErrorReply, ModelAck, ModelGet, ModelPut, ModelState, Reply, Request
from fedwire.codec import model_part_bounds, model_parts

log = logging.getLogger(__name__)

ROUND_WAIT_S = 600.0  # longer than the server's round timeout: the server, not the device, ends a round
POLL_MIN_S = 0.05
POLL_MAX_S = 1.0


class FedAvgRejected(RuntimeError):
    """The server refused this device's model (e.g. another architecture than the deployment's)."""


def flat_state(model: nn.Module) -> np.ndarray:
    """The model's floating-point state as one float32 vector, in state_dict order."""
    tensors = [t.detach().reshape(-1).float() for t in model.state_dict().values() if t.is_floating_point()]
    return torch.cat(tensors).numpy().astype(np.float32, copy=False) if tensors else np.zeros(0, np.float32)


@torch.no_grad()
def load_flat_state(model: nn.Module, flat: np.ndarray) -> None:
    """Copy a vector made by `flat_state` back into the model, in place."""
    offset = 0
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            count = tensor.numel()
            tensor.copy_(torch.from_numpy(flat[offset : offset + count]).reshape(tensor.shape))
            offset += count
    if offset != flat.size:
        raise ValueError(f"global model has {flat.size} floats, this model {offset}")


def digest(flat: np.ndarray) -> str:
    """Short fingerprint of a weight vector: equal on every device that loaded the same global model."""
    return hashlib.sha256(np.ascontiguousarray(flat, np.float32).tobytes()).hexdigest()[:16]


class FedAvgClient(NoKnowledge):
    """FedAvg's device side; everything runs on the training thread (a round is a barrier anyway).

    The model travels as one flat float32 vector of its floating-point state (parameters and batch-norm
    statistics, in `state_dict` order; integer buffers such as `num_batches_tracked` stay local), in
    parts of MODEL_CHUNK_FLOATS so any model fits the protocol's payload limit. Rounds are synchronous:
    the device polls `model_get` with a growing interval until the server closes the round. No teacher:
    training between rounds is CE only.
    """

    def __init__(
        self, *, config: DeviceConfig, link: KnowledgeLink, model: nn.Module, samples: int, classes: int
    ) -> None:
        super().__init__(classes=classes)
        self.config = config
        self.link = link
        self.model = model
        self.samples = samples
        self.next_round = 0
        self.round: int | None = None
        self.participants = 0
        self.digest = ""
        self.start_digest = ""
        self.waited_s = 0.0

    def start(self) -> None:
        # The weights training starts from: equal on every device of a fresh trial (one global initial model).
        self.start_digest = digest(flat_state(self.model))
        say_hello(
            self.link,
            hello_request(config=self.config, samples=self.samples, capability="fedavg", classes=self.classes),
        )

    def end_epoch(self, *, epoch: int, last: bool) -> None:
        round_ = max(epoch - 1, self.next_round)
        self._upload(round_)
        started = time.monotonic()
        flat, state = self._download(round_)
        self.waited_s += time.monotonic() - started
        if flat is None or state is None:
            log.warning("round %d did not close within %.0f s; training on with the local model", round_, ROUND_WAIT_S)
            return
        load_flat_state(self.model, flat)
        self.round, self.participants, self.digest = state.round, state.participants, digest(flat)
        self.next_round = state.round + 1

    def _call(self, request: Request) -> Reply:
        """A request/reply that retries on timeout (the server may be restarting) and fails on rejection."""
        while True:
            try:
                reply = self.link.call(request, timeout=self.config.reply_timeout_s)
            except TimeoutError:
                log.warning("%s timed out; sending it again", request.kind.value)
                continue
            if isinstance(reply, ErrorReply):
                raise FedAvgRejected(f"server rejected {request.kind.value}: {reply.code.value} {reply.message}")
            return reply

    def _upload(self, round_: int) -> None:
        flat = flat_state(self.model)
        for part in range(model_parts(flat.size)):
            start, stop = model_part_bounds(flat.size, part)
            request = ModelPut(
                device=self.config.id,
                cid=self.link.new_cid(),
                round=round_,
                model=self.config.train.arch,
                samples=self.samples,
                size=int(flat.size),
                part=part,
                params=flat[start:stop],
            )
            ack = self._call(request)
            if isinstance(ack, ModelAck) and not ack.accepted:
                log.warning("round %d closed before this device's model arrived (open round %d)", round_, ack.round)
                return

    def _download(self, round_: int) -> tuple[np.ndarray | None, ModelState | None]:
        """Poll until the round closed, then fetch every part of one global model (restart if a newer one closes)."""
        deadline = time.monotonic() + ROUND_WAIT_S
        delay = POLL_MIN_S
        while time.monotonic() < deadline:
            first = self._get(round_, 0)
            if not first.ready:
                time.sleep(delay)
                delay = min(delay * 1.5, POLL_MAX_S)
                continue
            flat = np.empty(first.size, np.float32)
            flat[: first.params.size] = first.params
            consistent = True
            for part in range(1, model_parts(first.size)):
                state = self._get(first.round, part)
                if state.round != first.round or state.size != first.size:
                    consistent = False
                    break
                start, stop = model_part_bounds(first.size, part)
                flat[start:stop] = state.params
            if consistent:
                return flat, first
        return None, None

    def _get(self, round_: int, part: int) -> ModelState:
        reply = self._call(ModelGet(device=self.config.id, cid=self.link.new_cid(), round=round_, part=part))
        if not isinstance(reply, ModelState):
            raise FedAvgRejected(f"unexpected reply to model_get: {reply.kind.value}")
        return reply

    def metrics(self) -> dict[str, Any]:
        return exchange_metrics() | {
            "fedavg_round": self.round,
            "fedavg_participants": self.participants,
            "model_digest": self.digest,
            "start_model_digest": self.start_digest,
            "round_wait_s": round(self.waited_s, 3),
        }
