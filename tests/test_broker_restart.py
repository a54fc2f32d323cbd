"""Mosquitto as the project configures it: a persistent session's queued QoS 1 messages survive a broker restart."""

from __future__ import annotations

import queue
from pathlib import Path

from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import connect_persistent, make_client


def test_queued_messages_of_a_persistent_session_survive_a_broker_restart(tmp_path: Path) -> None:
    received: queue.Queue[bytes] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    with MosquittoBroker(data_dir=tmp_path / "broker") as broker:
        device = make_client(client_id="sleepy-device")
        device.on_message = lambda _c, _u, m: received.put(bytes(m.payload))
        device.on_subscribe = lambda *_: subscribed.put(True)
        device.on_connect = lambda c, *_: c.subscribe("fedcache/v1/sleepy/down", qos=1)
        connect_persistent(device, broker.address)
        device.loop_start()
        subscribed.get(timeout=10)
        device.disconnect()  # away: replies must wait in the broker
        device.loop_stop()

        server = make_client(client_id="replying-server")
        server.connect(broker.address.host, broker.address.port)
        server.loop_start()
        for n in range(50):
            server.publish("fedcache/v1/sleepy/down", f"reply-{n}".encode(), qos=1).wait_for_publish(5)
        server.disconnect()
        server.loop_stop()

        broker.restart()  # SIGTERM writes the persistence file; the new process reads it

        device.on_connect = lambda *_: None  # the session (and its subscription) is the broker's to restore
        connect_persistent(device, broker.address)
        device.loop_start()
        try:
            got = [received.get(timeout=10) for _ in range(50)]
        finally:
            device.disconnect()
            device.loop_stop()
    assert got == [f"reply-{n}".encode() for n in range(50)]
