"""The FedAvg baseline's request handlers and their state: synchronous rounds beside the shared registry."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from broker_server.algorithm import Algorithm
from broker_server.fedavg import DEFAULT_ROUND_TIMEOUT_S, FedAvgRounds
from broker_server.records import Rejected
from broker_server.state import KnowledgeState
from fedwire.codec import model_part_bounds, model_parts
from fedwire.constants import ErrorCode
from fedwire.messages import ModelAck, ModelGet, ModelPut, ModelState


@dataclass
class FedAvgState:
    """FedAvg's rounds, and the knowledge state for who said hello."""

    knowledge: KnowledgeState
    rounds: FedAvgRounds


def model_put(state: FedAvgState, request: ModelPut) -> ModelAck:
    """Store one part of the device's model for a round."""
    state.knowledge.record(request.device)
    ack = state.rounds.put(
        device=request.device,
        round_=request.round,
        model=request.model,
        samples=request.samples,
        size=request.size,
        part=request.part,
        params=request.params,
    )
    return ModelAck(device=request.device, cid=request.cid, round=ack.open_round, accepted=int(ack.accepted))


def model_get(state: FedAvgState, request: ModelGet) -> ModelState:
    """One part of the global model of the requested round, or `ready=0` while that round is open."""
    state.knowledge.record(request.device)
    model = state.rounds.get(request.round)
    if model is None:
        return ModelState(
            device=request.device,
            cid=request.cid,
            round=state.rounds.open_round,
            ready=0,
            participants=0,
            size=0,
            part=0,
            params=np.zeros(0, np.float32),
        )
    size = int(model.params.size)
    if request.part >= model_parts(size):
        raise Rejected(ErrorCode.BAD_SHAPE, f"part {request.part} of a {size}-float model of {model_parts(size)}")
    start, stop = model_part_bounds(size, request.part)
    return ModelState(
        device=request.device,
        cid=request.cid,
        round=model.round,
        ready=1,
        participants=model.participants,
        size=size,
        part=request.part,
        params=model.params[start:stop],
    )


def _join(state: FedAvgState, device: str) -> None:
    state.rounds.join(device)


def _new_state(knowledge: KnowledgeState, *, round_timeout_s: float, min_participants: int) -> FedAvgState:
    return FedAvgState(
        knowledge=knowledge, rounds=FedAvgRounds(round_timeout_s=round_timeout_s, min_participants=min_participants)
    )


def fedavg(*, round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S, min_participants: int = 0) -> Algorithm[FedAvgState]:
    """FedAvg's table; devices take part by saying hello with the `fedavg` capability."""
    return Algorithm(
        name="fedavg",
        handlers={ModelPut: model_put, ModelGet: model_get},
        new_state=partial(_new_state, round_timeout_s=round_timeout_s, min_participants=min_participants),
        join=_join,
    )
