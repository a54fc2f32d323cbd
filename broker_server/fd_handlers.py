"""The FD baseline's request handler and its state: per-class windows beside the shared registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker_server.algorithm import Algorithm
from broker_server.fd import FdAggregate
from broker_server.state import KnowledgeState
from fedwire.messages import FdGlobal, FdUpdate


@dataclass
class FdState:
    """FD's windows, and the knowledge state for who said hello and the deployment's class count."""

    knowledge: KnowledgeState
    aggregate: FdAggregate = field(default_factory=FdAggregate)


def fd_update(state: FdState, request: FdUpdate) -> FdGlobal:
    """Take the device's per-class window and answer with the leave-one-out global per-class teacher."""
    state.knowledge.record(request.device)  # unknown_device before anything else
    classes = state.knowledge.classes
    applied = state.aggregate.update(
        device=request.device,
        classes=classes,
        logits=request.logits,
        counts=request.class_counts,
        version=request.version,
    )
    teacher = state.aggregate.teacher_for(device=request.device, classes=classes)
    return FdGlobal(
        device=request.device,
        cid=request.cid,
        logits=teacher.logits,
        class_counts=teacher.counts,
        encoding=request.encoding,
        applied=int(applied),
    )


FD: Algorithm[FdState] = Algorithm(name="fd", handlers={FdUpdate: fd_update}, new_state=FdState)
