"""Wire benchmark: MQTT bytes per sample per epoch of a FedCache device against the payload floor.

A training device sends one update_fetch per batch (the batch's fresh logits, plus the ids of the next
batch to prefetch) and gets one knowledge reply; over an epoch every sample goes up once and comes down
once. The bytes are those of real messages encoded by fedwire, framed as MQTT v5 QoS 1 PUBLISH packets
(`fedwire.mqtt.publish_packet_bytes`, the count the device link reports); the floor is the logits alone,
classes x bytes per value each way. Registration (hello + register chunks) is a one-off cost per sample.

    python -m bench wire [--quick] [--batch 8] [--classes 10] [--samples 3000]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from statistics import median

import numpy as np

from bench._report import machine_line, markdown_table
from fedwire import (
    Fetch,
    HashKind,
    Hello,
    HelloAck,
    Knowledge,
    LogitEncoding,
    Message,
    Register,
    RegisterAck,
    TeacherForm,
    Update,
    UpdateAck,
    UpdateFetch,
    decode,
    down_topic,
    encode,
    up_topic,
)
from fedwire.arrays import LOGIT_DTYPES
from fedwire.constants import DEFAULT_NEIGHBOURS, REGISTER_CHUNK, REQUEST_KINDS
from fedwire.mqtt import publish_packet_bytes

# A v5 PUBACK with reason "success" and no properties: fixed header (2) + packet id (2). Every QoS 1
# PUBLISH on the device's link costs one: the broker acknowledges each request, the device each reply.
PUBACK_BYTES = 4
DEVICE_ID = "dev000"  # the trial harness's naming (android_harness: dev000, dev001, ...)
SEED = 0
NEIGHBOURS = DEFAULT_NEIGHBOURS  # R: contributors per teacher in a warm cache (the server's default)
_CID = 2**47 + 12345  # a device starts its correlation ids at a random 48-bit value: msgpack uint64 either way


def topic_of(message: Message) -> str:
    """The topic a message travels on: the device's up/<kind> for requests, its down topic for replies."""
    return up_topic(message.device, message.kind) if message.kind in REQUEST_KINDS else down_topic(message.device)


def packet_bytes(message: Message) -> int:
    """MQTT v5 QoS 1 PUBLISH packet bytes of one encoded message (no properties; TCP/IP framing excluded)."""
    return publish_packet_bytes(topic_of(message), len(encode(message)))


@dataclass(frozen=True)
class Exchange:
    """One request/reply round (or several): bytes up and down on the device's link, per sample carried."""

    name: str
    encoding: LogitEncoding
    batch: int
    up: int  # PUBLISH bytes device -> broker
    down: int  # PUBLISH bytes broker -> device
    publishes: int  # PUBLISH packets, each answered by one PUBACK
    encode_us: float
    decode_us: float


def _logits(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    return (3.0 * rng.standard_normal((rows, classes))).astype(np.float32)


def _micros(fn: object, repeats: int) -> float:
    """Median microseconds of a call, timed in groups of 20 so the clock's resolution does not matter."""
    samples = []
    for _ in range(max(1, repeats // 20)):
        start = time.perf_counter()
        for _ in range(20):
            fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / 20 * 1e6)
    return median(samples)


def training_messages(
    *,
    batch: int,
    classes: int,
    encoding: LogitEncoding,
    combined: bool,
    teacher: TeacherForm = TeacherForm.MEAN,
    seed: int = SEED,
) -> list[Message]:
    """The messages of one training step: update_fetch + knowledge, or update + ack + fetch + knowledge.

    The knowledge reply carries a teacher for every fetched id from all R = 16 neighbours (every count
    is R): the steady state once the cache is warm, and the largest reply, R rows per id in raw form.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(batch, dtype=np.uint32)
    fetch_ids = np.arange(batch, 2 * batch, dtype=np.uint32)
    logits = _logits(rng, batch, classes)
    rows = batch * NEIGHBOURS if teacher is TeacherForm.RAW else batch
    knowledge = Knowledge(
        device=DEVICE_ID,
        cid=_CID,
        ids=fetch_ids,
        counts=np.full(batch, NEIGHBOURS, np.uint16),
        logits=_logits(rng, rows, classes),
        encoding=encoding,
        applied=batch if combined else 0,
        teacher=teacher,
    )
    version = time.time_ns() // 1000  # the device's versions are microseconds since the epoch
    if combined:
        update = UpdateFetch(
            device=DEVICE_ID,
            cid=_CID,
            ids=ids,
            logits=logits,
            version=version,
            fetch_ids=fetch_ids,
            encoding=encoding,
            teacher=teacher,
        )
        return [update, knowledge]
    return [
        Update(device=DEVICE_ID, cid=_CID, ids=ids, logits=logits, version=version, encoding=encoding),
        UpdateAck(device=DEVICE_ID, cid=_CID, applied=batch, stale=0),
        Fetch(device=DEVICE_ID, cid=_CID + 1, ids=fetch_ids, encoding=encoding, teacher=teacher),
        knowledge,
    ]


def measure_exchange(
    *,
    batch: int,
    classes: int,
    encoding: LogitEncoding,
    combined: bool,
    repeats: int,
    teacher: TeacherForm = TeacherForm.MEAN,
) -> Exchange:
    """Encode the step's messages, count their packet bytes per direction and time encode/decode."""
    messages = training_messages(batch=batch, classes=classes, encoding=encoding, combined=combined, teacher=teacher)
    name = "update_fetch + knowledge" if combined else "update + update_ack + fetch + knowledge"
    up = sum(packet_bytes(m) for m in messages if m.kind in REQUEST_KINDS)
    down = sum(packet_bytes(m) for m in messages if m.kind not in REQUEST_KINDS)
    payloads = [encode(m) for m in messages]
    return Exchange(
        name=name if teacher is TeacherForm.MEAN else f"{name} (raw: R={NEIGHBOURS} rows per id)",
        encoding=encoding,
        batch=batch,
        up=up,
        down=down,
        publishes=len(messages),
        encode_us=sum(_micros(lambda m=m: encode(m), repeats) for m in messages),
        decode_us=sum(_micros(lambda p=p: decode(p), repeats) for p in payloads),
    )


def floor_per_sample(classes: int, encoding: LogitEncoding) -> int:
    """Logit bytes one sample must move per epoch: classes x bytes per value, once up and once down."""
    return 2 * classes * LOGIT_DTYPES[encoding].itemsize


def format_training(rows: list[Exchange], classes: int) -> str:
    """Per-sample-per-epoch table; the ratio is against the floor of the same encoding."""
    body = []
    for r in rows:
        floor = floor_per_sample(classes, r.encoding)
        total = (r.up + r.down) / r.batch
        acked = total + r.publishes * PUBACK_BYTES / r.batch
        body.append(
            (
                r.name,
                r.encoding.value,
                r.batch,
                f"{r.up / r.batch:.1f}",
                f"{r.down / r.batch:.1f}",
                f"{total:.1f}",
                f"{acked:.1f}",
                floor,
                f"{total / floor:.2f}x",
                f"{r.encode_us:.0f} / {r.decode_us:.0f}",
            )
        )
    headers = (
        "messages per step",
        "logits",
        "batch",
        "up B/sample",
        "down B/sample",
        "PUBLISH B/sample/epoch",
        "+ PUBACKs",
        "floor B",
        "vs floor",
        "encode / decode µs per step",
    )
    return markdown_table(headers, body)


@dataclass(frozen=True)
class Registration:
    """A device's one-off registration: hello and its ack, then register chunks and their acks."""

    kind: HashKind
    hash_bytes: int
    samples: int
    up: int
    down: int
    publishes: int


def measure_registration(*, samples: int, classes: int, kind: HashKind, dim: int) -> Registration:
    """Bytes of registering `samples` samples in chunks of REGISTER_CHUNK, as edge.registration does."""
    rng = np.random.default_rng(SEED)
    hash_bytes = dim // 8 if kind is HashKind.BINARY else 2 * dim
    messages: list[Message] = [
        Hello(
            device=DEVICE_ID,
            cid=_CID,
            model="cnn",
            classes=classes,
            samples=samples,
            hash_kind=kind,
            hash_dim=dim,
            capabilities=("update_fetch", LogitEncoding.FLOAT16.value),
        ),
        HelloAck(device=DEVICE_ID, cid=_CID, registered=0, neighbours=16),
    ]
    for start in range(0, samples, REGISTER_CHUNK):
        count = min(REGISTER_CHUNK, samples - start)
        messages.append(
            Register(
                device=DEVICE_ID,
                cid=_CID + 1 + start,
                ids=np.arange(start, start + count, dtype=np.uint32),
                labels=rng.integers(0, classes, count).astype(np.uint16),
                hashes=rng.integers(0, 256, (count, hash_bytes), dtype=np.uint8),
            )
        )
        messages.append(RegisterAck(device=DEVICE_ID, cid=_CID + 1 + start, accepted=count, registered=start + count))
    return Registration(
        kind=kind,
        hash_bytes=hash_bytes,
        samples=samples,
        up=sum(packet_bytes(m) for m in messages if m.kind in REQUEST_KINDS),
        down=sum(packet_bytes(m) for m in messages if m.kind not in REQUEST_KINDS),
        publishes=len(messages),
    )


def format_registration(rows: list[Registration]) -> str:
    """Per-sample registration table; the floor is id (4) + label (2) + hash bytes."""
    body = []
    for r in rows:
        floor = 4 + 2 + r.hash_bytes
        total = r.up + r.down
        body.append(
            (
                f"{r.kind.value} ({r.hash_bytes} B hash)",
                r.samples,
                f"{r.up / r.samples:.2f}",
                f"{r.down / r.samples:.3f}",
                f"{(total + r.publishes * PUBACK_BYTES) / r.samples:.2f}",
                floor,
                f"{total / r.samples / floor:.3f}x",
                f"{total / 1024:.1f}",
            )
        )
    headers = (
        "hash",
        "samples",
        "up B/sample",
        "down B/sample",
        "total incl. PUBACKs B/sample",
        "floor B (id+label+hash)",
        "PUBLISH vs floor",
        "device total KiB",
    )
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench wire", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (byte counts are exact anyway)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size (edge default 8)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=3000, help="samples of the registering device (60k / 20)")
    parser.add_argument("--dim", type=int, default=256, help="hash dimension (bits, or float16 values)")
    args = parser.parse_args(argv)
    repeats = 200 if args.quick else 2000
    print(f"# wire: {machine_line()}")
    print(
        f"device id '{DEVICE_ID}', {args.classes} classes; MQTT v5 QoS 1 PUBLISH bytes (fixed header, topic, "
        f"packet id, empty properties, payload); a PUBACK is {PUBACK_BYTES} B; encode/decode: median µs\n"
    )
    print(f"Training: bytes per sample per epoch (batch {args.batch}; amortisation rows for other batch sizes)")
    rows = [
        measure_exchange(batch=args.batch, classes=args.classes, encoding=e, combined=c, repeats=repeats)
        for c in (True, False)
        for e in LogitEncoding
    ]
    rows += [  # amortisation: the same exchange at other batch sizes (or knowledge_every_batches x batch)
        measure_exchange(batch=b, classes=args.classes, encoding=e, combined=True, repeats=repeats)
        for e in (LogitEncoding.FLOAT16, LogitEncoding.INT8_BLOCK)
        for b in (1, 32, 128)
        if b != args.batch
    ]
    rows += [  # FedCache's raw variant: every neighbour's row comes down, the device averages
        measure_exchange(
            batch=args.batch, classes=args.classes, encoding=e, combined=True, repeats=repeats, teacher=TeacherForm.RAW
        )
        for e in (LogitEncoding.FLOAT16, LogitEncoding.INT8)
    ]
    print(format_training(rows, args.classes))
    print(f"\nRegistration: one device with {args.samples} samples, chunks of {REGISTER_CHUNK} (edge.registration)")
    print(
        format_registration(
            [
                measure_registration(samples=args.samples, classes=args.classes, kind=k, dim=args.dim)
                for k in (HashKind.BINARY, HashKind.FLOAT16)
            ]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
