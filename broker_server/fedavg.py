"""FedAvg baseline on the server: synchronous rounds of flat float32 models, averaged by sample count.

Participants are the devices that said hello with the `fedavg` capability. Round r closes when every
participant uploaded all parts of its round-r model and at least `min_participants` did (so devices
that start slowly are not left out of round 0; Flower's min_available_clients), or, once the first
complete upload of the round arrived, when `round_timeout_s` passed: then it closes with whoever
arrived (stragglers' later uploads for r are acknowledged with accepted=0 and they receive the global
model of r). The first
complete upload fixes the deployment's model name and size; any other is `model_mismatch`, so
heterogeneous architectures are refused. Closure is checked whenever a FedAvg request arrives (devices
poll with model_get), so the service needs no timer thread. State is in memory only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker_server.records import Rejected
from fedwire.codec import model_part_bounds, model_parts
from fedwire.constants import ErrorCode

DEFAULT_ROUND_TIMEOUT_S = 120.0


@dataclass
class _Upload:
    """One device's model of the open round, assembled part by part (a redelivered part just overwrites)."""

    samples: int
    params: np.ndarray  # float32 (size,)
    parts: set[int] = field(default_factory=set)


@dataclass(frozen=True, eq=False)
class GlobalModel:
    """The average that closed a round."""

    round: int
    params: np.ndarray  # float32 (size,)
    participants: int


@dataclass(frozen=True)
class PartAck:
    """Outcome of one model part: whether it counts for the round, and which round is open now."""

    accepted: bool
    open_round: int


class FedAvgRounds:
    """Round state of FedAvg; not thread-safe (the service serialises calls)."""

    def __init__(
        self,
        *,
        round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
        min_participants: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.round_timeout_s = round_timeout_s
        self.min_participants = min_participants
        self._clock = clock
        self.participants: set[str] = set()
        self.open_round = 0
        self.latest: GlobalModel | None = None
        self._uploads: dict[str, _Upload] = {}
        self._first_complete_at: float | None = None
        self._model: tuple[str, int] | None = None

    def join(self, device: str) -> None:
        """A device takes part from the open round on (a hello with the fedavg capability)."""
        self.participants.add(device)

    def put(
        self, *, device: str, round_: int, model: str, samples: int, size: int, part: int, params: np.ndarray
    ) -> PartAck:
        """Store one part of `device`'s round model; closes the round when it completes the last upload."""
        self.tick()
        if device not in self.participants:
            raise Rejected(ErrorCode.UNKNOWN_DEVICE, f"device '{device}' did not say hello with the fedavg capability")
        if self._model is not None and self._model != (model, size):
            raise Rejected(
                ErrorCode.MODEL_MISMATCH,
                f"FedAvg needs one architecture: this deployment averages '{self._model[0]}' "
                f"({self._model[1]} floats), got '{model}' ({size} floats)",
            )
        if round_ < self.open_round:
            return PartAck(accepted=False, open_round=self.open_round)
        if round_ > self.open_round:
            if self._uploads:
                raise Rejected(ErrorCode.BAD_SHAPE, f"round {round_} is not open yet (open: {self.open_round})")
            self.open_round = round_  # a server that lost its rounds (restart) follows the devices
        upload = self._uploads.get(device)
        if upload is None or upload.params.size != size:
            upload = self._uploads[device] = _Upload(samples=samples, params=np.zeros(size, np.float32))
        start, stop = model_part_bounds(size, part)
        upload.params[start:stop] = params
        upload.samples = samples
        upload.parts.add(part)
        if len(upload.parts) == model_parts(size):
            self._model = self._model or (model, size)
            if self._first_complete_at is None:
                self._first_complete_at = self._clock()
        self.tick()
        return PartAck(accepted=True, open_round=self.open_round)

    def tick(self) -> None:
        """Close the open round if everyone arrived, or the timeout passed since the first complete upload."""
        complete = {
            d: u for d, u in self._uploads.items() if self._model and len(u.parts) == model_parts(u.params.size)
        }
        if not complete:
            return
        everyone = self.participants <= complete.keys() and len(complete) >= self.min_participants
        timed_out = (
            self._first_complete_at is not None and self._clock() - self._first_complete_at >= self.round_timeout_s
        )
        if everyone or timed_out:
            self._close(list(complete.values()))

    def _close(self, uploads: list[_Upload]) -> None:
        weights = np.asarray([max(u.samples, 1) for u in uploads], np.float64)
        stacked = np.stack([u.params for u in uploads])
        average = (weights @ stacked.astype(np.float64)) / weights.sum()
        self.latest = GlobalModel(round=self.open_round, params=average.astype(np.float32), participants=len(uploads))
        self.open_round += 1
        self._uploads.clear()
        self._first_complete_at = None

    def get(self, round_: int) -> GlobalModel | None:
        """The global model of `round_` or a later round, or None while `round_` is still open."""
        self.tick()
        if self.latest is not None and self.latest.round >= round_:
            return self.latest
        return None
