"""Behaviour of the benchmarks' measuring functions (no timing): wire byte counts and relation recall."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from bench.__main__ import available
from bench.relations import drop_self, neighbour_recall, pair_distances
from bench.serving import (
    IPV4_TCP_HEADER_BYTES,
    SYS_BYTES,
    SYS_PUBLISH_RECEIVED,
    TcpCounters,
    counter_delta,
    sys_bytes_per_request,
)
from bench.wire import packet_bytes, training_messages
from fedwire import LogitEncoding, TeacherForm, encode, up_topic
from fedwire.constants import Kind


def _varint_len(value: int) -> int:
    length = 1
    while value >= 128:
        value //= 128
        length += 1
    return length


def test_wire_bytes_are_payload_plus_mqtt_publish_header() -> None:
    """One update_fetch: fixed header + remaining-length varint + topic (2+len) + packet id + empty properties."""
    update, reply = training_messages(batch=8, classes=10, encoding=LogitEncoding.FLOAT16, combined=True)
    assert update.kind is Kind.UPDATE_FETCH and reply.kind is Kind.KNOWLEDGE
    payload = len(encode(update))
    topic = up_topic(update.device, update.kind).encode()
    remaining = 2 + len(topic) + 2 + 1 + payload  # topic length prefix, topic, packet id, properties length 0
    assert packet_bytes(update) == 1 + _varint_len(remaining) + remaining
    assert remaining >= 128  # the varint takes two bytes here, so the arithmetic above is really exercised


def test_raw_knowledge_carries_r_rows_per_id_and_costs_about_r_times_the_logit_bytes() -> None:
    mean_up, mean_reply = training_messages(batch=8, classes=10, encoding=LogitEncoding.FLOAT16, combined=True)
    raw_up, raw_reply = training_messages(
        batch=8, classes=10, encoding=LogitEncoding.FLOAT16, combined=True, teacher=TeacherForm.RAW
    )
    assert raw_reply.logits.shape == (8 * 16, 10) and raw_reply.teacher_means().shape == (8, 10)
    extra_rows = 8 * 16 - 8
    # The raw reply is longer by exactly its extra float16 rows (plus a few bytes of msgpack framing and key).
    growth = packet_bytes(raw_reply) - packet_bytes(mean_reply)
    assert extra_rows * 10 * 2 <= growth <= extra_rows * 10 * 2 + 32
    assert 0 < packet_bytes(raw_up) - packet_bytes(mean_up) <= 16  # the request only adds its "teach" key


def test_recall_is_one_for_exact_and_below_one_for_a_broken_table() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(200, 32), dtype=np.uint8)
    distances = np.bitwise_count(codes[:, None, :] ^ codes[None, :, :]).sum(axis=2)
    found = np.argsort(distances, axis=1, kind="stable")[:, :17]
    exact = drop_self(found, 16)
    assert (exact != np.arange(200)[:, None]).all()
    exact_dist = pair_distances(codes, exact, "hamming")
    assert neighbour_recall(exact, exact) == 1.0
    assert neighbour_recall(exact, exact, found_dist=exact_dist, exact_dist=exact_dist) == 1.0

    broken = exact.copy()
    broken[:, 8:] = np.roll(exact[:, 8:], 1, axis=0)  # half of every row now belongs to another sample
    broken[::2, 0] = -1  # and some entries are missing
    broken_dist = pair_distances(codes, broken, "hamming")
    assert neighbour_recall(broken, exact) < 1.0
    assert neighbour_recall(broken, exact, found_dist=broken_dist, exact_dist=exact_dist) < 1.0


def test_recall_rejects_mismatched_tables() -> None:
    with pytest.raises(ValueError):
        neighbour_recall(np.zeros((3, 2), np.int64), np.zeros((4, 2), np.int64))


def test_dispatcher_lists_the_benchmarks_with_a_main() -> None:
    names = available()
    assert {"relations", "serving", "wire"} <= set(names)
    assert all(not name.startswith("_") for name in names)


def test_sys_counters_are_read_over_the_ticks_inside_the_window_only() -> None:
    """Mosquitto's cumulative $SYS counters: ticks before the window (registration) and after it are left out."""
    ticks = [9.5, 11.5, 13.5, 15.5, 17.5]  # arrival times; the window is [10, 16]
    received = [1_000, 5_000, 8_000, 11_000, 99_000]
    sent = [2_000, 6_000, 9_500, 13_000, 99_000]
    publishes = [10, 50, 80, 110, 990]  # two PUBLISHes into the broker per request (request, reply)
    history = {
        SYS_BYTES[0]: list(zip(ticks, received, strict=True)),
        SYS_BYTES[1]: list(zip(ticks, sent, strict=True)),
        SYS_PUBLISH_RECEIVED: list(zip(ticks, publishes, strict=True)),
    }
    assert counter_delta(history[SYS_BYTES[0]], 10.0, 16.0) == 11_000 - 5_000
    requests = (110 - 50) / 2
    assert sys_bytes_per_request(history, 10.0, 16.0) == pytest.approx((6_000 + 7_000) / requests)
    assert counter_delta(history[SYS_BYTES[0]], 10.0, 12.0) is None  # one tick inside: no growth to measure
    assert sys_bytes_per_request(history, 10.0, 12.0) is None


def test_tcp_counters_count_each_direction_of_a_real_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            before = TcpCounters.of(client)
            client.sendall(b"x" * 1000)
            assert len(peer.recv(4096)) == 1000
            peer.sendall(b"y" * 300)
            assert len(client.recv(4096)) == 300
            time.sleep(0.05)  # the peer's ACK of our 1000 bytes (bytes_sent counts acknowledged bytes)
            delta = TcpCounters.of(client) - before
    assert (delta.bytes_sent, delta.bytes_received) == (1000, 300)
    assert delta.segments_out >= 1 and delta.segments_in >= 1
    segments = delta.segments_out + delta.segments_in
    assert delta.wire_bytes == 1300 + IPV4_TCP_HEADER_BYTES * segments
    assert (before + delta) - before == delta
