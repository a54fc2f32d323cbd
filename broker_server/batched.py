"""FedCache's fetch, update and update_fetch answered a batch at a time: one lookup, one update, one gather, one encode.

A batch is taken in arrival order. Runs of fetch / update / update_fetch requests that `batch_wire.scan`
accepts form segments; every other message (hello, register, a raw-teacher fetch, the baselines' kinds, a
malformed payload) goes through the per-message path at its place, so whatever changes registrations
happens between segments. Within a segment the updates are applied first, in arrival order, then every fetch
is answered: none of these requests has been answered yet (replies leave after the commit), so this serial
order is as valid as arrival order, except for a device that sent a fetch and then an update in the same
batch, which starts a new segment so that its own order holds. A request the batch finds invalid (a repeated
id, a non-finite value, another number of classes, an unknown device or sample) changes nothing and is
answered by the per-message path, which gives exactly today's error reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import NamedTuple

import numpy as np

from broker_server.batch_wire import (
    FAST_KINDS,
    PackedLogits,
    ReplyWriter,
    Scanned,
    decode_logits,
    finite_rows,
    pack_logits,
    scan,
)
from broker_server.state import KnowledgeState
from fedwire.constants import ErrorCode, Kind
from fedwire.messages import ErrorReply

log = logging.getLogger(__name__)

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_KNOWLEDGE = Kind.KNOWLEDGE.value
_UPDATE_ACK = Kind.UPDATE_ACK.value


class Answer(NamedTuple):
    """What goes back for one request: the device it goes to, the reply's kind and bytes, and the outcome label."""

    device: str
    kind: str
    payload: bytes
    outcome: str  # "ok" or the error code


# The per-message path: decode, check the envelope, handle, encode (exactly today's behaviour).
PerMessage = Callable[[str, Kind, bytes], Answer]


class BatchedRequests:
    """Answers a batch of (device, kind, payload) requests; `per_message` answers what the batch does not."""

    def __init__(self, *, state: Callable[[], KnowledgeState | None], per_message: PerMessage) -> None:
        """`state` gives FedCache's knowledge state when it serves fetch / update / update_fetch (else None)."""
        self._state = state
        self._per_message = per_message
        self._writer = ReplyWriter()
        self._encode_error = _ErrorWriter()

    def answer(self, requests: Sequence[tuple[str, Kind, bytes]]) -> list[Answer]:
        """One answer per request, in order; changes are staged in the state (the caller commits them)."""
        answers: list[Answer | None] = [None] * len(requests)
        # A Kind is a StrEnum: the str it stands for, without the cost of `.value`.
        state = self._state() if any(kind in FAST_KINDS for _d, kind, _p in requests) else None
        segment: list[tuple[int, Scanned]] = []
        fetched: set[str] = set()  # devices with a fetch in the current segment
        for index, (device, kind, payload) in enumerate(requests):
            scanned = scan(payload, device=device, kind=kind) if state is not None else None
            if scanned is None:
                self._flush(segment, answers, state)
                fetched.clear()
                answers[index] = self._per_message(device, kind, payload)
                continue
            if scanned.version >= 0 and device in fetched:
                self._flush(segment, answers, state)
                fetched.clear()
            segment.append((index, scanned))
            if scanned.fetch_ids is not None:
                fetched.add(device)
        self._flush(segment, answers, state)
        assert all(answer is not None for answer in answers)
        return answers  # type: ignore[return-value]

    def _flush(
        self, segment: list[tuple[int, Scanned]], answers: list[Answer | None], state: KnowledgeState | None
    ) -> None:
        if not segment:
            return
        assert state is not None
        try:
            for index, answer in self._segment(state, [s for _i, s in segment]):
                answers[segment[index][0]] = answer
        except Exception:
            # A bug, not a bad request: the requests are answered as the per-message path answers a handler's
            # exception (their updates may be staged; redelivery after a restart is harmless).
            log.exception("internal error on a batch of %d requests", len(segment))
            for index, scanned in segment:
                answers[index] = self._encode_error.internal(scanned)
        segment.clear()

    def _segment(self, state: KnowledgeState, batch: list[Scanned]) -> list[tuple[int, Answer]]:
        """Answers of one segment, as (position in the segment, answer)."""
        classes = state.classes
        updating = [i for i, s in enumerate(batch) if s.version >= 0]
        fetching = [i for i, s in enumerate(batch) if s.fetch_ids is not None]
        # One search for every id of the segment: the updates' ids first, then the fetches'.
        arrays = [batch[i].ids for i in updating] + [batch[i].fetch_ids or b"" for i in fetching]
        sizes = [len(array) >> 2 for array in arrays]
        starts = [0, *accumulate(sizes)]
        owners = [batch[i].device for i in updating] + [batch[i].device for i in fetching]
        ids = np.frombuffer(b"".join(arrays), _U32)
        rows, resolved_array = state.rows_many(owners, ids, np.array(sizes, np.int64))
        resolved = resolved_array.tolist()
        good = [True] * len(batch)
        for slot, i in enumerate(updating):
            if not resolved[slot] or batch[i].cols != classes or classes == 0:
                good[i] = False
        for slot, i in enumerate(fetching, start=len(updating)):
            if not resolved[slot]:
                good[i] = False
        if updating:
            logits = self._logits(batch, updating, sizes, starts, classes, good)
        out: list[tuple[int, Answer]] = []
        for i, ok in enumerate(good):  # rejected: nothing of theirs changes the state
            if not ok:
                out.append((i, self._per_message(batch[i].device, Kind(batch[i].kind), batch[i].payload)))
        applied = self._apply(state, batch, updating, sizes, starts, rows, logits, good) if updating else {}
        teachers = self._teachers(state, batch, fetching, sizes, starts, rows, len(updating), good) if fetching else {}
        writer = self._writer
        for i, ok in enumerate(good):
            if not ok:
                continue
            scanned = batch[i]
            done = applied.get(i, 0)
            stale = (scanned.rows if scanned.version >= 0 else 0) - done
            if scanned.fetch_ids is None:
                payload = writer.update_ack(device=scanned.device, cid=scanned.cid, applied=done, stale=stale)
                out.append((i, Answer(scanned.device, _UPDATE_ACK, payload, "ok")))
                continue
            counts, rows_taught, data, scales = teachers[i]
            payload = writer.knowledge(
                device=scanned.device,
                cid=scanned.cid,
                ids=scanned.fetch_ids,
                counts=counts,
                encoding=scanned.encoding,
                rows=rows_taught,
                cols=classes,
                data=data,
                scales=scales,
                applied=done,
                stale=stale,
            )
            out.append((i, Answer(scanned.device, _KNOWLEDGE, payload, "ok")))
        return out

    @staticmethod
    def _logits(
        batch: list[Scanned], updating: list[int], sizes: list[int], starts: list[int], classes: int, good: list[bool]
    ) -> np.ndarray:
        """Every update's logits as one float32 matrix, one row per update id (rows of rejected ones are zeros).

        Marks a message whose values are not all finite as rejected in `good`.
        """
        slots = [slot for slot, i in enumerate(updating) if good[i]]
        encodings = {batch[updating[slot]].encoding for slot in slots}
        if len(encodings) == 1 and len(slots) == len(updating):  # the usual batch: one encoding, all accepted
            encoding = encodings.pop()
            members = [batch[i] for i in updating]
            logits = decode_logits(encoding, classes, members)
            finite = finite_rows(logits, encoding, members)
            if not finite.all():
                BatchedRequests._mark_non_finite(finite, slots, updating, starts, good)
            return logits
        logits = np.zeros((starts[len(updating)], classes), np.float32)
        for encoding in encodings:
            mine = [slot for slot in slots if batch[updating[slot]].encoding == encoding]
            members = [batch[updating[slot]] for slot in mine]
            matrix = decode_logits(encoding, classes, members)
            finite = finite_rows(matrix, encoding, members)
            local = [0, *accumulate(sizes[slot] for slot in mine)]
            if not finite.all():
                for k, slot in enumerate(mine):
                    if not finite[local[k] : local[k + 1]].all():
                        good[updating[slot]] = False
            for k, slot in enumerate(mine):
                logits[starts[slot] : starts[slot + 1]] = matrix[local[k] : local[k + 1]]
        return logits

    @staticmethod
    def _mark_non_finite(
        finite: np.ndarray, slots: list[int], updating: list[int], starts: list[int], good: list[bool]
    ) -> None:
        for slot in slots:
            if not finite[starts[slot] : starts[slot + 1]].all():
                good[updating[slot]] = False

    @staticmethod
    def _apply(
        state: KnowledgeState,
        batch: list[Scanned],
        updating: list[int],
        sizes: list[int],
        starts: list[int],
        rows: np.ndarray,
        logits: np.ndarray,
        good: list[bool],
    ) -> dict[int, int]:
        """Apply the accepted updates in arrival order; returns each one's applied count."""
        slots = [slot for slot, i in enumerate(updating) if good[i]]
        if not slots:
            return {}
        versions = np.repeat(
            np.array([batch[updating[slot]].version for slot in slots], np.int64), [sizes[slot] for slot in slots]
        )
        if len(slots) == len(updating):
            chosen_rows, chosen_logits = rows[: starts[len(updating)]], logits
        else:
            keep = np.concatenate([np.arange(starts[slot], starts[slot + 1]) for slot in slots])
            chosen_rows, chosen_logits = rows[keep], logits[keep]
        mask = state.apply_updates(rows=chosen_rows, logits=chosen_logits, versions=versions)
        done = [0, *accumulate(np.asarray(mask, bool).tolist())]
        out: dict[int, int] = {}
        first = 0
        for slot in slots:
            last = first + sizes[slot]
            out[updating[slot]] = done[last] - done[first]
            first = last
        return out

    @staticmethod
    def _teachers(
        state: KnowledgeState,
        batch: list[Scanned],
        fetching: list[int],
        sizes: list[int],
        starts: list[int],
        rows: np.ndarray,
        offset: int,
        good: list[bool],
    ) -> dict[int, tuple[bytes, int, bytes, bytes | None]]:
        """Per accepted fetch: its counts' bytes, its number of teacher rows, their bytes (and int8 scales).

        One gather for every fetch of the segment, and one quantisation per reply encoding: every encoding
        works row by row, so a reply's slice of the whole equals encoding its rows alone.
        """
        slots = [offset + k for k, i in enumerate(fetching) if good[i]]
        if not slots:
            return {}
        if len(slots) == len(fetching):
            wanted = rows[starts[offset] :]
        else:
            wanted = rows[np.concatenate([np.arange(starts[slot], starts[slot + 1]) for slot in slots])]
        teachers = state.fetch(wanted)
        counts_bytes = teachers.counts.astype(_U16).tobytes()
        taught = [0, *accumulate((teachers.counts > 0).tolist())]  # teacher rows before each id
        # Each accepted fetch's ids and teacher rows within the gathered ones.
        spans: list[tuple[int, int, int, int]] = []
        first = 0
        for slot in slots:
            last = first + sizes[slot]
            spans.append((first, last, taught[first], taught[last]))
            first = last
        encodings = {batch[fetching[slot - offset]].encoding for slot in slots}
        # Per encoding its replies' rows packed; per reply k, its index among its encoding's replies and first row.
        packed: dict[str, PackedLogits] = {}
        index, offsets = [0] * len(slots), [0] * len(slots)
        for encoding in encodings:
            members = [k for k, slot in enumerate(slots) if batch[fetching[slot - offset]].encoding == encoding]
            lengths = [spans[k][3] - spans[k][2] for k in members]
            for position, (k, first_row) in enumerate(zip(members, accumulate([0, *lengths]), strict=False)):
                index[k], offsets[k] = position, first_row
            if len(encodings) == 1:  # the usual batch: every reply's rows, in order, are the gathered ones
                packed[encoding] = pack_logits(teachers.logits, encoding, lengths)
                continue
            picked = np.concatenate([np.arange(spans[k][2], spans[k][3]) for k in members] or [np.zeros(0, np.int64)])
            packed[encoding] = pack_logits(teachers.logits[picked], encoding, lengths)
        out: dict[int, tuple[bytes, int, bytes, bytes | None]] = {}
        for k, slot in enumerate(slots):
            scanned = batch[fetching[slot - offset]]
            first_id, last_id, first_row, last_row = spans[k]
            begin, end = offsets[k], offsets[k] + (last_row - first_row)
            data, scales = packed[scanned.encoding].reply(index[k], begin, end)
            out[fetching[slot - offset]] = (counts_bytes[2 * first_id : 2 * last_id], end - begin, data, scales)
        return out


class _ErrorWriter:
    """An `internal` error reply for a request the batch failed on."""

    def internal(self, scanned: Scanned) -> Answer:
        from fedwire.codec import encode

        reply = ErrorReply(
            device=scanned.device,
            cid=scanned.cid,
            code=ErrorCode.INTERNAL,
            message="internal error",
            request=scanned.kind,
        )
        return Answer(scanned.device, Kind.ERROR.value, encode(reply), ErrorCode.INTERNAL.value)
