"""Typed FedCache messages: what a request or reply means, independent of how it is encoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedwire.constants import ErrorCode, HashKind, Kind, LogitEncoding, TeacherForm

# How each message travels (wire keys, types, bounds) is declared in fedwire/schema.py.
__all__ = [
    "ErrorReply",
    "FdGlobal",
    "FdUpdate",
    "Fetch",
    "Hello",
    "HelloAck",
    "Knowledge",
    "Message",
    "ModelAck",
    "ModelGet",
    "ModelPut",
    "ModelState",
    "Register",
    "RegisterAck",
    "Reply",
    "Request",
    "Update",
    "UpdateAck",
    "UpdateFetch",
]


@dataclass(frozen=True, eq=False)
class Hello:
    """A device announces itself (and re-announces after every reconnect)."""

    device: str
    cid: int
    model: str
    classes: int
    samples: int
    hash_kind: HashKind
    hash_dim: int
    capabilities: tuple[str, ...] = ()
    kind: Kind = field(default=Kind.HELLO, init=False)


@dataclass(frozen=True, eq=False)
class Register:
    """One chunk of a device's registration: (sample id, label, hash) triples.

    `hashes` is uint8 of shape (n, hash_bytes): packed sign bits for binary hashes, the raw
    little-endian bytes of float16 features otherwise.
    """

    device: str
    cid: int
    ids: np.ndarray  # uint32 (n,)
    labels: np.ndarray  # uint16 (n,)
    hashes: np.ndarray  # uint8 (n, hash_bytes)
    kind: Kind = field(default=Kind.REGISTER, init=False)


@dataclass(frozen=True, eq=False)
class Fetch:
    """Ask for the averaged neighbour knowledge of some local samples."""

    device: str
    cid: int
    ids: np.ndarray  # uint32 (n,)
    encoding: LogitEncoding = LogitEncoding.FLOAT16  # how the reply's logits should travel
    teacher: TeacherForm = TeacherForm.MEAN  # the mean of each sample's neighbours, or each neighbour's row
    kind: Kind = field(default=Kind.FETCH, init=False)


@dataclass(frozen=True, eq=False)
class Update:
    """Upload fresh logits for some local samples, all stamped with one version."""

    device: str
    cid: int
    ids: np.ndarray  # uint32 (n,)
    logits: np.ndarray  # float32 (n, classes), already decoded
    version: int
    encoding: LogitEncoding = LogitEncoding.FLOAT16
    kind: Kind = field(default=Kind.UPDATE, init=False)


@dataclass(frozen=True, eq=False)
class UpdateFetch:
    """An update and a fetch in one message: one round trip per training batch."""

    device: str
    cid: int
    ids: np.ndarray
    logits: np.ndarray
    version: int
    fetch_ids: np.ndarray
    encoding: LogitEncoding = LogitEncoding.FLOAT16
    teacher: TeacherForm = TeacherForm.MEAN
    kind: Kind = field(default=Kind.UPDATE_FETCH, init=False)


@dataclass(frozen=True, eq=False)
class HelloAck:
    """The server knows the device; `registered` says how many of its samples it already holds."""

    device: str
    cid: int
    registered: int
    neighbours: int
    kind: Kind = field(default=Kind.HELLO_ACK, init=False)


@dataclass(frozen=True, eq=False)
class RegisterAck:
    """A registration chunk is durable; `registered` is the device's running total."""

    device: str
    cid: int
    accepted: int
    registered: int
    kind: Kind = field(default=Kind.REGISTER_ACK, init=False)


@dataclass(frozen=True, eq=False)
class Knowledge:
    """Teachers for the requested ids.

    `counts[i]` is how many neighbours of `ids[i]` contributed; `logits` holds one row per id with
    counts > 0, in order (ids with count 0 get no teacher), or with `teacher` RAW, `counts[i]` rows
    per id, each contributing neighbour's latest logits (`teacher_means` averages them as the server
    would). `applied`/`stale` report the update half of an update-and-fetch.
    """

    device: str
    cid: int
    ids: np.ndarray  # uint32 (n,)
    counts: np.ndarray  # uint16 (n,)
    logits: np.ndarray  # float32 (count_nonzero(counts), classes); RAW: (counts.sum(), classes)
    encoding: LogitEncoding = LogitEncoding.FLOAT16
    applied: int = 0
    stale: int = 0
    teacher: TeacherForm = TeacherForm.MEAN
    kind: Kind = field(default=Kind.KNOWLEDGE, init=False)

    def teacher_means(self) -> np.ndarray:
        """One teacher row per id with counts > 0, whichever form the reply came in."""
        if self.teacher is TeacherForm.MEAN:
            return self.logits
        counts = self.counts[self.counts > 0].astype(np.int64)
        if counts.size == 0:
            return np.zeros((0, self.logits.shape[1]), np.float32)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        return (np.add.reduceat(self.logits.astype(np.float32), starts, axis=0) / counts[:, None]).astype(np.float32)


@dataclass(frozen=True, eq=False)
class UpdateAck:
    """An update is durable: `applied` rows were newer than what the server held, `stale` were not."""

    device: str
    cid: int
    applied: int
    stale: int
    kind: Kind = field(default=Kind.UPDATE_ACK, init=False)


@dataclass(frozen=True, eq=False)
class ErrorReply:
    """A request was rejected; nothing it carried touched the server's state."""

    device: str
    cid: int
    code: ErrorCode
    message: str
    request: str = ""
    kind: Kind = field(default=Kind.ERROR, init=False)


# ---------------------------------------------------------------- baselines of the comparison (protocol §16)


@dataclass(frozen=True, eq=False)
class FdUpdate:
    """Federated distillation: the device's per-class mean logits since its last upload, with sample counts.

    Row c of `logits` is the mean of the device's logits over its samples of class c; rows of classes
    with count 0 carry no information (zeros by convention). An empty window (all counts 0) only asks
    for the current global teacher.
    """

    device: str
    cid: int
    logits: np.ndarray  # float32 (classes, classes)
    class_counts: np.ndarray  # uint32 (classes,)
    version: int
    encoding: LogitEncoding = LogitEncoding.FLOAT16
    kind: Kind = field(default=Kind.FD_UPDATE, init=False)


@dataclass(frozen=True, eq=False)
class FdGlobal:
    """The global per-class teacher for one device: other devices' per-class means, weighted by their counts.

    `class_counts[c]` is how many samples of class c (of the other devices) went into row c; 0 means no
    teacher for that class yet. `applied` is 1 when the request's window was newer than what the server held.
    """

    device: str
    cid: int
    logits: np.ndarray  # float32 (classes, classes)
    class_counts: np.ndarray  # uint32 (classes,)
    encoding: LogitEncoding = LogitEncoding.FLOAT16
    applied: int = 0
    kind: Kind = field(default=Kind.FD_GLOBAL, init=False)


@dataclass(frozen=True, eq=False)
class ModelPut:
    """FedAvg: one part of a device's model after a round, as a flat float32 vector.

    Part p covers floats [p * MODEL_CHUNK_FLOATS, min((p + 1) * MODEL_CHUNK_FLOATS, size)); `samples`
    is the device's training-set size, the weight of its model in the average.
    """

    device: str
    cid: int
    round: int
    model: str
    samples: int
    size: int
    part: int
    params: np.ndarray  # float32 (length of this part,)
    kind: Kind = field(default=Kind.MODEL_PUT, init=False)


@dataclass(frozen=True, eq=False)
class ModelAck:
    """A model part was received; `accepted` 0 means its round had already closed (a straggler)."""

    device: str
    cid: int
    round: int  # the server's open round after this part
    accepted: int
    kind: Kind = field(default=Kind.MODEL_ACK, init=False)


@dataclass(frozen=True, eq=False)
class ModelGet:
    """FedAvg: ask for one part of the global model of `round` (or of a later round, if one closed since)."""

    device: str
    cid: int
    round: int
    part: int
    kind: Kind = field(default=Kind.MODEL_GET, init=False)


@dataclass(frozen=True, eq=False)
class ModelState:
    """One part of the global model, or `ready` 0 (no params) while the requested round is still open.

    When ready, `round` is the round the global model closes (>= the requested one) and `participants`
    how many devices' models were averaged; when not ready, `round` is the server's open round.
    """

    device: str
    cid: int
    round: int
    ready: int
    participants: int
    size: int
    part: int
    params: np.ndarray  # float32 (length of this part,), empty when not ready
    kind: Kind = field(default=Kind.MODEL_STATE, init=False)


Request = Hello | Register | Fetch | Update | UpdateFetch | FdUpdate | ModelPut | ModelGet
Reply = HelloAck | RegisterAck | Knowledge | UpdateAck | ErrorReply | FdGlobal | ModelAck | ModelState
Message = Request | Reply
