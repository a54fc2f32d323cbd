"""The batched request path: the same answers as the per-message path, its serial order, and its MQTT link."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from broker_server.batch_wire import ReplyWriter, decode_logits, finite_rows, scan
from broker_server.batched import Answer, BatchedRequests
from broker_server.handlers import CacheService
from broker_server.legacy_server import LegacyCacheServer, _Inbound
from broker_server.mqtt_link import ServerLink, Will
from broker_server.mqtt_server import REQUEST_PATHS, CacheServer, LocalAnswers, check_envelope, make_server
from broker_server.state import KnowledgeState
from fedwire import (
    ErrorCode,
    ErrorReply,
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    ProtocolError,
    Register,
    RegisterAck,
    TeacherForm,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    encode,
    up_topic,
)
from fedwire.constants import Kind
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, connect_persistent, make_client

CLASSES = 5
HASH_DIM = 32
SAMPLES = 24
DEVICES = ("d0", "d1", "d2", "d3", "d4")
ENCODINGS = tuple(LogitEncoding)


# ---------------------------------------------------------------- a deployment, twice


def _hello(device: str, cid: int = 1) -> Hello:
    return Hello(
        device=device,
        cid=cid,
        model="m",
        classes=CLASSES,
        samples=SAMPLES,
        hash_kind=HashKind.BINARY,
        hash_dim=HASH_DIM,
    )


def _ids_of(device: str) -> np.ndarray:
    """Sparse local ids (not row positions), different per device."""
    return (np.arange(SAMPLES, dtype=np.uint32) * 5 + 3 + DEVICES.index(device) % 3).astype(np.uint32)


def _register(device: str, cid: int = 2) -> Register:
    rng = np.random.default_rng(50 + DEVICES.index(device))
    return Register(
        device=device,
        cid=cid,
        ids=_ids_of(device),
        labels=rng.integers(0, CLASSES, SAMPLES).astype(np.uint16),
        hashes=rng.integers(0, 256, (SAMPLES, HASH_DIM // 8), dtype=np.uint8),
    )


def _service(tmp_path: Path | None, *, devices: tuple[str, ...] = DEVICES[:4]) -> CacheService:
    service = CacheService.open(tmp_path, neighbours=4)
    for device in devices:
        assert isinstance(service.handle(_hello(device)), HelloAck)
        assert isinstance(service.handle(_register(device)), RegisterAck)
    service.cache.refresh_relations()
    service.commit()
    return service


def _legacy(service: CacheService) -> LegacyCacheServer:
    """Today's per-message path, unconnected: its _handle_one is what a batch must reproduce."""
    return LegacyCacheServer(service=service, address=BrokerAddress("127.0.0.1", 1), client_id="unconnected")


def _legacy_answer(server: LegacyCacheServer, device: str, kind: Kind, payload: bytes) -> bytes:
    reply = server._handle_one(_Inbound(up_topic(device, kind), payload, 0, 0, 0.0))
    assert reply is not None
    return encode(reply)


def _batched(service: CacheService) -> BatchedRequests:
    return LocalAnswers(service).batched


def _state_arrays(service: CacheService) -> tuple[np.ndarray, np.ndarray]:
    return service.cache.knowledge.copy(), service.cache.versions.copy()


# ---------------------------------------------------------------- random requests


class Requests:
    """Random requests, valid and not, as (device, topic kind, payload)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.cid = 1000

    def _next_cid(self) -> int:
        self.cid += 1
        return self.cid

    def ids(self, device: str, *, low: int = 0, high: int = 10, unknown: float = 0.05) -> np.ndarray:
        count = int(self.rng.integers(low, high + 1))
        ids = self.rng.choice(_ids_of(device), size=min(count, SAMPLES), replace=False).astype(np.uint32)
        if ids.size and self.rng.random() < unknown:
            ids[0] = 4_000_000  # never registered
        return ids

    def logits(self, count: int, *, scale: float = 3.0) -> np.ndarray:
        return (scale * self.rng.standard_normal((count, CLASSES))).astype(np.float32)

    def encoding(self) -> LogitEncoding:
        return ENCODINGS[int(self.rng.integers(len(ENCODINGS)))]

    def fetch(self, device: str) -> tuple[str, Kind, bytes]:
        teacher = TeacherForm.RAW if self.rng.random() < 0.1 else TeacherForm.MEAN
        message = Fetch(
            device=device, cid=self._next_cid(), ids=self.ids(device), encoding=self.encoding(), teacher=teacher
        )
        payload = encode(message)
        if teacher is TeacherForm.MEAN and self.rng.random() < 0.2:  # an explicit `teach: mean` is the same
            payload = _repacked(payload, teach="mean")
        return device, Kind.FETCH, payload

    def update(self, device: str, version: int, *, combined: bool) -> tuple[str, Kind, bytes]:
        ids = self.ids(device, low=0 if combined else 1)
        common: dict[str, Any] = {
            "device": device,
            "cid": self._next_cid(),
            "ids": ids,
            "logits": self.logits(ids.size),
            "version": version,
            "encoding": self.encoding(),
        }
        if combined:
            message: Any = UpdateFetch(fetch_ids=self.ids(device), **common)
        else:
            message = Update(**common)
        return device, message.kind, encode(message)

    def invalid(self, device: str) -> tuple[str, Kind, bytes]:
        """A request the server must reject (or, for a few, handle per message), with what makes it so."""
        choice = int(self.rng.integers(12))
        ids = np.sort(self.rng.choice(_ids_of(device), 4, replace=False)).astype(np.uint32)
        good = encode(
            UpdateFetch(device=device, cid=self._next_cid(), ids=ids, logits=self.logits(4), version=1, fetch_ids=ids)
        )
        raw = msgpack.unpackb(good, raw=False)
        if choice == 0:
            return device, Kind.FETCH, b"\xc1garbage"
        if choice == 1:  # another device's payload on this device's topic
            return device, Kind.UPDATE_FETCH, _repacked(good, d="d1" if device != "d1" else "d2")
        if choice == 2:  # a repeated id
            raw["fetch_ids"] = np.array([ids[0], ids[1], ids[0]], "<u4").tobytes()
            return device, Kind.UPDATE_FETCH, msgpack.packb(raw)
        if choice == 3:  # non-finite logits
            raw["logits"]["b"] = np.full((4, CLASSES), np.inf, "<f2").tobytes()
            raw["logits"]["e"] = "f16"
            return device, Kind.UPDATE_FETCH, msgpack.packb(raw)
        if choice == 4:  # another number of classes
            message = Update(
                device=device, cid=self._next_cid(), ids=ids, logits=np.zeros((4, CLASSES + 1), np.float32), version=9
            )
            return device, Kind.UPDATE, encode(message)
        if choice == 5:  # a device that never said hello
            return "stranger", Kind.FETCH, encode(Fetch(device="stranger", cid=self._next_cid(), ids=ids))
        if choice == 6:  # a boolean correlation id
            return device, Kind.UPDATE_FETCH, _repacked(good, c=True)
        if choice == 7:  # the payload's kind differs from the topic's
            return device, Kind.FETCH, good
        if choice == 8:  # a non-finite int8 scale
            raw["logits"] = {
                "e": "i8",
                "n": 4,
                "m": CLASSES,
                "b": bytes(4 * CLASSES),
                "s": np.array([1, np.nan, 1, 1], "<f4").tobytes(),
            }
            return device, Kind.UPDATE_FETCH, msgpack.packb(raw)
        if choice == 9:  # wrong rows
            raw["logits"]["n"] = 3
            raw["logits"]["b"] = raw["logits"]["b"][: 3 * CLASSES * 4]
            return device, Kind.UPDATE_FETCH, msgpack.packb(raw)
        if choice == 10:  # unknown keys are ignored: valid
            return device, Kind.UPDATE_FETCH, _repacked(good, extra=[1, 2], ver=0)
        # a reply kind on a request topic
        return device, Kind.FETCH, _repacked(good, k="knowledge")


def _repacked(payload: bytes, **changes: Any) -> bytes:
    raw = msgpack.unpackb(payload, raw=False)
    raw.update(changes)
    return msgpack.packb(raw, use_bin_type=True)


def _batch(requests: Requests, stale_version: int, fresh_version: int) -> list[tuple[str, Kind, bytes]]:
    """A batch whose arrival order and the batched path's serial order (updates first) give the same answers.

    Fresh updates come first, before any fetch (at most one of them an update_fetch, the last); later in the
    batch only stale updates (they change nothing, so their place does not matter), fetches, invalid requests
    and registrations.
    """
    rng = requests.rng
    batch: list[tuple[str, Kind, bytes]] = []
    for _ in range(int(rng.integers(0, 5))):
        device = DEVICES[int(rng.integers(4))]
        batch.append(requests.update(device, fresh_version + int(rng.integers(-2, 3)), combined=False))
    if rng.random() < 0.5:
        batch.append(requests.update(DEVICES[int(rng.integers(4))], fresh_version + 5, combined=True))
    for _ in range(int(rng.integers(0, 24))):
        device = DEVICES[int(rng.integers(4))]
        pick = rng.random()
        if pick < 0.4:
            batch.append(requests.fetch(device))
        elif pick < 0.7:
            batch.append(requests.update(device, stale_version, combined=bool(rng.random() < 0.8)))
        elif pick < 0.9:
            batch.append(requests.invalid(device))
        elif pick < 0.95:
            batch.append((device, Kind.HELLO, encode(_hello(device, cid=requests._next_cid()))))
        else:
            batch.append((device, Kind.REGISTER, encode(_register(device, cid=requests._next_cid()))))
    return batch


@pytest.mark.parametrize("seed", range(6))
def test_batches_get_the_per_message_paths_answers_byte_for_byte(tmp_path: Path, seed: int) -> None:
    legacy_service = _service(tmp_path / "legacy")
    batched_service = _service(tmp_path / "batched")
    legacy, batched = _legacy(legacy_service), _batched(batched_service)
    requests = Requests(seed)
    warm: list[tuple[str, Kind, bytes]] = []
    for device in DEVICES[:4]:  # every sample holds knowledge at version 1: version 1 is stale from here on
        ids = _ids_of(device)
        warm.append(
            (
                device,
                Kind.UPDATE,
                encode(Update(device=device, cid=1, ids=ids, logits=requests.logits(SAMPLES), version=1)),
            )
        )
    batches = [warm] + [_batch(requests, stale_version=1, fresh_version=10 * (n + 2)) for n in range(12)]
    checked = {"knowledge": 0, "error": 0, "update_ack": 0}
    for batch in batches:
        expected = [_legacy_answer(legacy, *request) for request in batch]
        legacy_service.commit()
        answers = batched.answer(batch)
        batched_service.commit()
        assert [a.payload for a in answers] == expected
        for answer, payload in zip(answers, expected, strict=True):
            reply = decode(payload)
            assert answer.kind == reply.kind.value and answer.device == reply.device
            assert answer.outcome == (reply.code.value if isinstance(reply, ErrorReply) else "ok")
            checked[reply.kind.value] = checked.get(reply.kind.value, 0) + 1
        for mine, theirs in zip(_state_arrays(batched_service), _state_arrays(legacy_service), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    assert checked["knowledge"] > 20 and checked["error"] > 5 and checked["update_ack"] > 2
    legacy_service.close()
    batched_service.close()


def _with_a_neighbour_of(service: CacheService, device: str, owner: str) -> np.ndarray:
    """One id of `device` whose neighbours include a sample of `owner`."""
    rows = service.cache.rows_of(device, _ids_of(device))
    theirs = service.cache.rows_of(owner, _ids_of(owner))
    neighbours = service.cache.relations.neighbours_of(rows)
    position = next(i for i in range(SAMPLES) if np.isin(neighbours[i], theirs).any())
    return _ids_of(device)[position : position + 1]


@pytest.mark.parametrize("seed", range(3))
def test_with_defences_on_a_batch_is_answered_as_the_per_message_path_answers_it(tmp_path: Path, seed: int) -> None:
    """Defences take a batch's evidence once its updates are applied (before its fetches, as the per-message
    path takes each update's before the fetches behind it): the answers are the per-message path's, byte for
    byte, on the batches of the test above."""
    legacy_service, batched_service = _service(tmp_path / "legacy"), _service(tmp_path / "batched")
    legacy_service.cache.defend()
    batched_service.cache.defend()
    assert batched_service.batch_state() is not None
    legacy, batched = _legacy(legacy_service), _batched(batched_service)
    requests = Requests(100 + seed)
    warm = [
        (device, Kind.UPDATE, encode(Update(device=device, cid=1, ids=_ids_of(device),
                                            logits=requests.logits(SAMPLES), version=1)))
        for device in DEVICES[:4]
    ]  # fmt: skip
    knowledge = 0
    for batch in [warm] + [_batch(requests, stale_version=1, fresh_version=10 * (n + 2)) for n in range(8)]:
        expected = [_legacy_answer(legacy, *request) for request in batch]
        legacy_service.commit()
        assert [a.payload for a in batched.answer(batch)] == expected
        batched_service.commit()
        knowledge += sum(isinstance(decode(payload), Knowledge) for payload in expected)
    assert knowledge > 10
    legacy_service.close()
    batched_service.close()


def test_a_segment_applies_its_updates_before_its_fetches_but_keeps_each_devices_own_order() -> None:
    service = _service(None, devices=DEVICES[:2])
    batched = _batched(service)
    ones = np.ones((SAMPLES, CLASSES), np.float32)

    def fetch(device: str, ids: np.ndarray, cid: int) -> tuple[str, Kind, bytes]:
        return device, Kind.FETCH, encode(Fetch(device=device, cid=cid, ids=ids, encoding=LogitEncoding.FLOAT32))

    def update(device: str, logits: np.ndarray, version: int, cid: int) -> tuple[str, Kind, bytes]:
        message = Update(device=device, cid=cid, ids=_ids_of(device), logits=logits, version=version)
        return device, Kind.UPDATE, encode(message)

    # Another device's update, later in the same batch, reaches an earlier fetch: none was answered yet.
    asked = _with_a_neighbour_of(service, "d0", "d1")
    first, _ack = batched.answer([fetch("d0", asked, 1), update("d1", ones, 3, 2)])
    knowledge = decode(first.payload)
    assert isinstance(knowledge, Knowledge) and knowledge.counts[0] >= 1
    np.testing.assert_array_equal(knowledge.logits, np.ones((1, CLASSES), np.float32))
    # A device's own order holds: its fetch, then its own update in the same batch: the fetch does not see it.
    own = _with_a_neighbour_of(service, "d1", "d1")
    before = decode(batched.answer([fetch("d1", own, 3)])[0].payload)
    seen, _ack = batched.answer([fetch("d1", own, 4), update("d1", 2 * ones, 4, 5)])
    after = decode(batched.answer([fetch("d1", own, 6)])[0].payload)
    assert isinstance(before, Knowledge) and isinstance(after, Knowledge)
    assert decode(seen.payload).logits.tolist() == before.logits.tolist()  # type: ignore[attr-defined]
    assert after.logits.tolist() != before.logits.tolist()


def test_repeated_rows_in_one_batch_apply_in_arrival_order() -> None:
    service = _service(None, devices=DEVICES[:1])
    batched = _batched(service)
    ids = _ids_of("d0")[:6]

    def update(version: int, value: float, cid: int) -> tuple[str, Kind, bytes]:
        logits = np.full((ids.size, CLASSES), value, np.float32)
        return (
            "d0",
            Kind.UPDATE,
            encode(
                Update(device="d0", cid=cid, ids=ids, logits=logits, version=version, encoding=LogitEncoding.FLOAT32)
            ),
        )

    answers = batched.answer([update(5, 1.0, 1), update(4, 2.0, 2), update(7, 3.0, 3), update(7, 4.0, 4)])
    acks = [decode(a.payload) for a in answers]
    assert [(a.applied, a.stale) for a in acks] == [(6, 0), (0, 6), (6, 0), (0, 6)]  # type: ignore[attr-defined]
    rows = service.cache.rows_of("d0", ids)
    assert (service.cache.versions[rows] == 7).all() and (service.cache.knowledge[rows] == 3.0).all()


def test_a_batch_failure_answers_internal_errors_and_the_server_keeps_going(monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(None, devices=DEVICES[:1])
    batched = _batched(service)
    fetch = ("d0", Kind.FETCH, encode(Fetch(device="d0", cid=9, ids=_ids_of("d0")[:2])))

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(type(service.state), "fetch", broken)
    (answer,) = batched.answer([fetch])
    reply = decode(answer.payload)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INTERNAL and reply.cid == 9
    monkeypatch.undo()
    assert isinstance(decode(batched.answer([fetch])[0].payload), Knowledge)


# ---------------------------------------------------------------- the wire: scan against the generic decoder


def _mutations(payload: bytes, rng: np.random.Generator) -> Iterator[bytes]:
    raw = msgpack.unpackb(payload, raw=False)
    values: list[Any] = [
        None,
        True,
        False,
        -1,
        2**63,
        2**64 - 1,
        1.5,
        "x",
        b"x",
        [],
        {},
        0,
        1,
        8193,
        "mean",
        "raw",
        "f16",
        "i8",
    ]
    for key in list(raw):
        for value in values:
            yield msgpack.packb({**raw, key: value}, use_bin_type=True)
        yield msgpack.packb({k: v for k, v in raw.items() if k != key}, use_bin_type=True)
    block = raw.get("logits")
    if isinstance(block, dict):
        for key in [*block, "s"]:
            for value in [*values, bytes(3), bytes(4 * block["n"])]:
                yield msgpack.packb({**raw, "logits": {**block, key: value}}, use_bin_type=True)
    for key in ("ids", "fetch_ids"):
        if key in raw:
            for data in (bytes(3), bytes(8), bytes(4 * 8193), np.array([1, 2, 1], "<u4").tobytes()):
                yield msgpack.packb({**raw, key: data}, use_bin_type=True)
    for _ in range(40):  # flipped bytes
        data = bytearray(payload)
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        yield bytes(data)
    yield payload + b"\x00"
    yield payload[:-1]
    yield bytes(4 * 1024 * 1024 + 1)


@pytest.mark.parametrize("kind", [Kind.FETCH, Kind.UPDATE, Kind.UPDATE_FETCH])
def test_scan_accepts_only_what_the_generic_decoder_accepts_with_the_same_values(kind: Kind) -> None:
    rng = np.random.default_rng(7)
    requests = Requests(3)
    accepted = refused = 0
    for n in range(30):
        device = DEVICES[n % 4]
        if kind is Kind.FETCH:
            _d, _k, payload = requests.fetch(device)
        else:
            _d, _k, payload = requests.update(device, 5, combined=kind is Kind.UPDATE_FETCH)
        for candidate in [payload, *_mutations(payload, rng)]:
            for topic_kind in {kind, Kind.FETCH}:
                scanned = scan(candidate, device=device, kind=topic_kind.value)
                try:
                    message = check_envelope(decode(candidate), device=device, topic_kind=topic_kind.value)
                except ProtocolError:
                    message = None
                if scanned is None:
                    refused += 1
                    continue
                accepted += 1
                # Decoded messages pass whatever the batch still checks (finite values) or were refused there.
                if scanned.version >= 0:
                    matrix = decode_logits(scanned.encoding, scanned.cols, [scanned])
                    finite = bool(finite_rows(matrix, scanned.encoding, [scanned]).all()) if scanned.rows else True
                else:
                    finite = True
                if not finite:
                    assert message is None
                    continue
                assert message is not None, candidate
                assert message.cid == scanned.cid and message.kind.value == scanned.kind
                if isinstance(message, Fetch):
                    assert message.teacher is TeacherForm.MEAN and message.encoding.value == scanned.encoding
                    assert message.ids.tobytes() == scanned.fetch_ids
                    continue
                assert isinstance(message, Update | UpdateFetch)
                assert message.ids.tobytes() == scanned.ids and message.version == scanned.version
                assert message.encoding.value == scanned.encoding
                np.testing.assert_array_equal(message.logits, matrix)
                if isinstance(message, UpdateFetch):
                    assert message.teacher is TeacherForm.MEAN and message.fetch_ids.tobytes() == scanned.fetch_ids
    assert accepted > 30 and refused > 300


def test_reply_writer_writes_the_encoders_bytes() -> None:
    rng = np.random.default_rng(2)
    writer = ReplyWriter()
    for encoding in ENCODINGS:
        for teachers in (0, 3):
            counts = np.array([2, 0, 1, 4][: teachers + 1], np.uint16)
            ids = np.arange(counts.size, dtype=np.uint32) * 7
            logits = rng.standard_normal((int(np.count_nonzero(counts)), CLASSES)).astype(np.float32)
            reply = Knowledge(
                device="d0", cid=2**40, ids=ids, counts=counts, logits=logits, encoding=encoding, applied=3, stale=1
            )
            from fedwire.arrays import quantise_logits

            packed = quantise_logits(logits, encoding)
            mine = writer.knowledge(
                device="d0", cid=2**40, ids=ids.tobytes(), counts=counts.tobytes(), encoding=encoding.value,
                rows=packed.rows, cols=CLASSES, data=packed.data, scales=packed.scales, applied=3, stale=1,
            )  # fmt: skip
            assert mine == encode(reply)
    assert writer.update_ack(device="d0", cid=5, applied=2, stale=1) == encode(
        UpdateAck(device="d0", cid=5, applied=2, stale=1)
    )


# ---------------------------------------------------------------- the state's batch methods, against their defaults


class _DefaultsOnly(KnowledgeState):
    """Another backend: delegates the abstract methods, so rows_many and apply_updates run the base defaults."""

    def __init__(self, inner: KnowledgeState) -> None:
        self.inner = inner

    neighbours = property(lambda self: self.inner.neighbours)
    classes = property(lambda self: self.inner.classes)

    def hello(self, **kw: Any) -> Any:
        return self.inner.hello(**kw)

    def register(self, **kw: Any) -> Any:
        return self.inner.register(**kw)

    def record(self, device: str) -> Any:
        return self.inner.record(device)

    def rows(self, device: str, ids: np.ndarray) -> np.ndarray:
        return self.inner.rows(device, ids)

    def apply_update(self, **kw: Any) -> np.ndarray:
        return self.inner.apply_update(**kw)

    def fetch(self, rows: np.ndarray, *, raw: bool = False) -> Any:
        return self.inner.fetch(rows, raw=raw)

    def held(self, device: str) -> Any:
        return self.inner.held(device)

    def devices(self) -> Any:
        return self.inner.devices()

    def commit(self) -> None:
        self.inner.commit()

    def stats(self) -> Any:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def test_batch_methods_match_their_per_message_defaults() -> None:
    fast, slow = _service(None), _service(None)
    default = _DefaultsOnly(slow.state)
    rng = np.random.default_rng(4)
    # An unknown device without ids is still unknown, also when every other id is found.
    lone = _ids_of("d0")[:3]
    assert fast.state.rows_many(["stranger", "d0"], lone, np.array([0, 3]))[1].tolist() == [False, True]
    for _ in range(30):
        devices = [str(rng.choice([*DEVICES, "stranger"])) for _ in range(int(rng.integers(0, 6)))]
        arrays = []
        for device in devices:
            known = _ids_of(device) if device in DEVICES[:4] else np.arange(8, dtype=np.uint32)
            ids = rng.choice(known, size=int(rng.integers(0, 6)), replace=False).astype(np.uint32)
            if ids.size and rng.random() < 0.2:
                ids[-1] = 99_999
            arrays.append(ids)
        counts = np.array([a.size for a in arrays], np.int64)
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        rows, resolved = fast.state.rows_many(devices, ids, counts)
        expected_rows, expected_resolved = default.rows_many(devices, ids, counts)
        assert resolved.tolist() == expected_resolved.tolist()
        keep = np.repeat(resolved, counts)
        assert rows[keep].tolist() == expected_rows[keep].tolist()
        if keep.any():
            chosen = rows[keep]
            chosen = np.concatenate([chosen, chosen[: int(rng.integers(0, chosen.size + 1))]])  # rows twice too
            versions = rng.integers(0, 6, chosen.size)
            logits = rng.standard_normal((chosen.size, CLASSES)).astype(np.float32)
            applied = fast.state.apply_updates(rows=chosen, logits=logits, versions=versions)
            assert applied.tolist() == default.apply_updates(rows=chosen, logits=logits, versions=versions).tolist()
            for mine, theirs in zip(_state_arrays(fast), _state_arrays(slow), strict=True):
                np.testing.assert_array_equal(mine, theirs)


# ---------------------------------------------------------------- over a real Mosquitto


class _Device:
    def __init__(self, address: BrokerAddress, device: str) -> None:
        self.device = device
        self.replies: queue.Queue[bytes] = queue.Queue()
        self.client = make_client(client_id=f"batched-test-{device}-{time.time_ns()}")
        self.client.on_message = lambda _c, _u, m: self.replies.put(bytes(m.payload))
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.on_connect = lambda c, *_: c.subscribe(f"fedcache/v1/{device}/down", qos=1)
        connect_persistent(self.client, address)
        self.client.loop_start()
        subscribed.get(timeout=10)

    def send(self, message: Any, *, retain: bool = False) -> None:
        self.client.publish(
            up_topic(self.device, message.kind), encode(message), qos=1, retain=retain
        ).wait_for_publish(5)

    def call(self, message: Any) -> Any:
        """Send, and return the reply carrying the message's correlation id (skipping replies to resends)."""
        self.send(message)
        while True:
            reply = decode(self.replies.get(timeout=10))
            if reply.cid == message.cid:
                return reply

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("path", REQUEST_PATHS)
def test_both_request_paths_serve_the_same_conversation(broker: MosquittoBroker, path: str) -> None:
    service = CacheService.open(None, neighbours=4)
    server = make_server(
        request_path=path, service=service, address=broker.address, client_id=f"paths-{path}-{time.time_ns()}"
    )
    server.start()
    device = _Device(broker.address, "d0")
    try:
        assert isinstance(device.call(_hello("d0")), HelloAck)
        assert isinstance(device.call(_register("d0")), RegisterAck)
        ids = _ids_of("d0")
        ack = device.call(
            Update(device="d0", cid=3, ids=ids, logits=np.ones((SAMPLES, CLASSES), np.float32), version=1)
        )
        assert isinstance(ack, UpdateAck) and (ack.applied, ack.stale) == (SAMPLES, 0)
        knowledge = device.call(Fetch(device="d0", cid=4, ids=ids[:5], encoding=LogitEncoding.FLOAT32))
        assert isinstance(knowledge, Knowledge) and knowledge.cid == 4
        np.testing.assert_array_equal(knowledge.logits, np.ones((5, CLASSES), np.float32))
        bad = device.call(Fetch(device="d0", cid=5, ids=np.array([1, 1], np.uint32)))
        assert isinstance(bad, ErrorReply) and bad.code is ErrorCode.BAD_SHAPE and bad.cid == 5
        # Many requests in flight at once: every one answered, in its own reply.
        for cid in range(10, 60):
            device.send(Fetch(device="d0", cid=cid, ids=ids[cid % SAMPLES : cid % SAMPLES + 1]))
        cids = sorted(decode(device.replies.get(timeout=10)).cid for _ in range(50))
        assert cids == list(range(10, 60))
        handled = server.metrics.registry.get_sample_value(
            "fedcache_requests_total", {"kind": "fetch", "outcome": "ok"}
        )
        assert handled == 51
    finally:
        device.close()
        server.stop()
        service.close()


def test_the_batched_server_reconnects_after_a_broker_restart(tmp_path: Path) -> None:
    """The link reconnects by itself (at once, then with back-off) and subscribes again.

    Mosquitto 2.0.11 does not restore a shared subscription from its persistence file: a request published
    after the restart and before the server subscribed again reaches nobody (the device resends it), for
    the legacy path alike. So the device here resends until answered.
    """
    with MosquittoBroker(data_dir=tmp_path / "broker") as own:
        service = CacheService.open(None, neighbours=4)
        server = CacheServer(service=service, address=own.address, client_id="restart-server")
        server.start()
        device = _Device(own.address, "d0")
        try:
            assert isinstance(device.call(_hello("d0")), HelloAck)
            device.close()
            own.restart()
            device = _Device(own.address, "d0")
            deadline = time.monotonic() + 20
            reply = None
            while reply is None and time.monotonic() < deadline:
                device.send(_register("d0", cid=7))
                try:
                    reply = decode(device.replies.get(timeout=1.0))
                except queue.Empty:
                    continue
            assert isinstance(reply, RegisterAck) and reply.cid == 7
            assert isinstance(device.call(Fetch(device="d0", cid=8, ids=_ids_of("d0")[:2])), Knowledge)
        finally:
            device.close()
            server.stop()
            service.close()


def test_a_retained_request_is_not_handed_to_a_server_that_subscribes_later(broker: MosquittoBroker) -> None:
    device = _Device(broker.address, "d4")
    service = CacheService.open(None, neighbours=4)
    server: CacheServer | None = None
    topic = up_topic("d4", Kind.HELLO)
    try:
        device.send(_hello("d4", cid=77), retain=True)
        server = CacheServer(service=service, address=broker.address, client_id=f"late-{time.time_ns()}")
        server.start()
        with pytest.raises(queue.Empty):
            device.replies.get(timeout=1.0)
        assert service.state.devices() == ()
        assert isinstance(device.call(_hello("d4", cid=78)), HelloAck)
    finally:
        device.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        device.close()
        if server is not None:
            server.stop()
        service.close()


def test_the_link_drops_acknowledgements_of_a_connection_that_is_gone(broker: MosquittoBroker) -> None:
    link = ServerLink(
        address=broker.address, client_id=f"link-{time.time_ns()}", will=Will("fedcache/v1/_test/will", b"x")
    )
    link.connect()
    epoch = link.epoch
    assert link.ack(5, epoch)
    link.close()
    link.connect()
    assert link.epoch == epoch + 1 and not link.ack(5, epoch)
    link.disconnect(session_expiry_s=0)


def test_a_batch_answer_carries_the_reply_and_its_outcome() -> None:
    assert Answer("d", "error", b"", "bad_shape").outcome == "bad_shape"


@pytest.mark.parametrize("size", [0, 1, 120, 124, 125, 127, 128, 16379, 16380, 16381, 70000])
def test_publish_packets_carry_their_remaining_length_as_a_variable_byte_integer(size: int) -> None:
    from broker_server.mqtt_link import _read_varint, _utf8, publish_packet

    topic = _utf8("fedcache/v1/d0/down")
    packet = publish_packet(topic, bytes(size), 7)
    length, at = _read_varint(packet, 1)
    assert packet[0] == 0x32 and length == len(packet) - at == len(topic) + 3 + size
    assert packet[at : at + len(topic)] == topic and packet[at + len(topic) : at + len(topic) + 3] == b"\x00\x07\x00"


def test_the_counted_latency_histogram_exposes_what_prometheus_histogram_does() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from broker_server.metrics import CountedHistogram

    buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
    theirs_registry, mine_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("h_seconds", "doc", ["kind"], buckets=buckets, registry=theirs_registry)
    mine = CountedHistogram("h_seconds", "doc", ["kind"], buckets=buckets, registry=mine_registry)
    for kind, value, count in [("a", 0.001, 3), ("a", 0.0007, 1), ("b", 3.0, 2), ("a", 0.25, 1), ("b", 0.0, 1)]:
        for _ in range(count):
            theirs.labels(kind).observe(value)
        mine.labels(kind).observe(value, count)

    def lines(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)

    assert lines(mine_registry) == lines(theirs_registry)


def test_a_reply_over_the_payload_limit_becomes_a_too_large_error_and_the_server_keeps_going() -> None:
    """A mean fetch of very many ids with many classes cannot travel: the device is told so (and the link is
    never handed a packet the broker would disconnect it for)."""
    from broker_server.mqtt_link import Inbound

    classes, count = 1000, 1100  # 1100 x 1000 float32 teacher rows: 4.4 MB, over the 4 MiB limit
    service = CacheService.open(None, neighbours=4)
    server = CacheServer(service=service, address=BrokerAddress("127.0.0.1", 1), client_id="unconnected")
    ids = np.arange(count, dtype=np.uint32)
    rng = np.random.default_rng(9)
    hello = Hello(
        device="big", cid=1, model="m", classes=classes, samples=count, hash_kind=HashKind.BINARY, hash_dim=32
    )
    register = Register(
        device="big", cid=2, ids=ids, labels=np.zeros(count, np.uint16),
        hashes=rng.integers(0, 256, (count, 4), dtype=np.uint8),
    )  # fmt: skip
    updates = [
        Update(device="big", cid=3 + n, ids=part, logits=np.ones((part.size, classes), np.float32), version=1,
               encoding=LogitEncoding.FLOAT32)
        for n, part in enumerate(np.array_split(ids, 2))
    ]  # fmt: skip
    fetch = Fetch(device="big", cid=9, ids=ids, encoding=LogitEncoding.FLOAT32)
    small = Fetch(device="big", cid=10, ids=ids[:3], encoding=LogitEncoding.FLOAT32)
    messages = [hello, register, *updates, fetch, small]
    inbound = [Inbound(up_topic("big", m.kind), encode(m), n + 1, 1, False, 0) for n, m in enumerate(messages)]
    for message in inbound:
        assert server._process([message])
    replies = [decode(payload) for _topic, payload, _retain in server._link._inflight.values()]
    refused = next(r for r in replies if r.cid == 9)
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.TOO_LARGE
    assert isinstance(next(r for r in replies if r.cid == 10), Knowledge)
    with pytest.raises(ValueError, match="exceeds the wire's"):
        server._link.publish("fedcache/v1/big/down", bytes(4 * 1024 * 1024 + 1))
    service.close()
