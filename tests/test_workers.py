"""`main.py --workers N` with real processes over a real Mosquitto: kill -9 of any one loses nothing acknowledged."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from android_harness.processes import ServerProcess, server_command
from broker_server.handlers import CacheService
from broker_server.mqtt_server import LocalAnswers
from broker_server.workers import RemoteAnswers, StateServer, state_socket_name
from fedwire import Fetch, HashKind, Hello, HelloAck, Knowledge, LogitEncoding, Register, RegisterAck, Update, UpdateAck
from fedwire import encode as encode_message
from fedwire.constants import Kind
from fedwire.mosquitto import MosquittoBroker
from tests.test_batched_path import _Device

CLASSES = 4
SAMPLES = 32


def _hello(cid: int) -> Hello:
    return Hello(
        device="w0", cid=cid, model="m", classes=CLASSES, samples=SAMPLES, hash_kind=HashKind.BINARY, hash_dim=32
    )


def _register() -> Register:
    rng = np.random.default_rng(3)
    return Register(
        device="w0",
        cid=2,
        ids=np.arange(SAMPLES, dtype=np.uint32),
        labels=(np.arange(SAMPLES) % CLASSES).astype(np.uint16),
        hashes=rng.integers(0, 256, (SAMPLES, 4), dtype=np.uint8),
    )


def _pids(data_dir: Path) -> dict[str, object]:
    pids: dict[str, object] = json.loads((data_dir / "workers.json").read_text())
    return pids


def _wait_restarted(data_dir: Path, key: str, old: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _pids(data_dir)
        current = pids[key] if key == "state" else pids["frontends"][int(key)]  # type: ignore[index]
        if current != old:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{key} was not started again")


def test_kill_9_of_any_one_worker_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data_dir = tmp_path / "server"
    with MosquittoBroker(data_dir=tmp_path / "broker") as broker:
        command = server_command(
            broker=broker.address, data_dir=data_dir, client_id="workers-test", options=["--workers", "2"]
        )
        server = ServerProcess(command=command, broker=broker.address, log=tmp_path / "server.log").start()
        device = _Device(broker.address, "w0")
        acknowledged: dict[int, np.ndarray] = {}
        version = 0

        def update(timeout: float = 20.0) -> None:
            nonlocal version
            version += 1
            ids = rng.choice(SAMPLES, size=8, replace=False).astype(np.uint32)
            logits = rng.normal(size=(8, CLASSES)).astype(np.float32)
            message = Update(
                device="w0", cid=100 + version, ids=ids, logits=logits, version=version, encoding=LogitEncoding.FLOAT32
            )
            device.send(message)
            deadline = time.monotonic() + timeout
            while True:  # the reply to this request (the broker may hold it while a worker comes back)
                reply = device.replies.get(timeout=max(0.1, deadline - time.monotonic()))
                ack = _decode(reply)
                if ack.cid == message.cid:
                    break
            assert isinstance(ack, UpdateAck) and ack.applied == 8
            for i, row in zip(ids.tolist(), logits, strict=True):
                acknowledged[i] = row

        try:
            assert isinstance(device.call(_hello(1)), HelloAck)
            assert isinstance(device.call(_register()), RegisterAck)
            for _ in range(6):
                update()
            pids = _pids(data_dir)
            frontends: list[int] = pids["frontends"]  # type: ignore[assignment]
            assert len(frontends) == 2 and len({*frontends, pids["state"], pids["supervisor"]}) == 4

            os.kill(frontends[1], signal.SIGKILL)  # a front-end: the other keeps serving, the dead one comes back
            for _ in range(6):
                update()
            _wait_restarted(data_dir, "1", frontends[1])
            for _ in range(4):
                update()

            state = int(pids["state"])  # type: ignore[call-overload]
            os.kill(state, signal.SIGKILL)
            for _ in range(4):  # answered once the state process is back: the front-ends kept these requests
                update()
            _wait_restarted(data_dir, "state", state)
            fetched = device.call(Fetch(device="w0", cid=999, ids=np.arange(4, dtype=np.uint32)))
            assert isinstance(fetched, Knowledge)
        finally:
            device.close()
            server.stop(timeout=60)
        assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert not (data_dir / "workers.json").exists()
    with CacheService.open(data_dir / "state", neighbours=16) as service:
        ids = np.array(sorted(acknowledged), dtype=np.uint32)
        stored = service.cache.knowledge[service.cache.rows_of("w0", ids)]
        np.testing.assert_array_equal(stored, np.stack([acknowledged[i] for i in ids.tolist()]))


def _decode(payload: bytes) -> object:
    from fedwire import decode

    return decode(payload)


def test_the_state_process_answers_front_ends_as_the_local_path_would(tmp_path: Path) -> None:
    """Two front-ends' batches through one StateServer (a group commit) get the local path's answers."""
    remote_service = CacheService.open(tmp_path / "remote", neighbours=4)
    local_service = CacheService.open(tmp_path / "local", neighbours=4)
    local = LocalAnswers(local_service)
    name = state_socket_name(f"test-{os.getpid()}-{time.time_ns()}")
    stop = threading.Event()
    ready = threading.Event()
    thread = threading.Thread(
        target=StateServer(service=remote_service, socket_name=name).serve, args=(stop, ready), daemon=True
    )
    thread.start()
    assert ready.wait(10)
    first, second = RemoteAnswers(name), RemoteAnswers(name)
    try:
        setup = [
            ("w0", Kind.HELLO, encode_message(_hello(1))),
            ("w0", Kind.REGISTER, encode_message(_register())),
        ]
        assert first.answer(setup, idle=lambda: None) == local.answer(setup, idle=lambda: None)
        batch = [
            ("w0", Kind.UPDATE, encode_message(Update(device="w0", cid=5, ids=np.arange(4, dtype=np.uint32),
             logits=np.ones((4, CLASSES), np.float32), version=3))),
            ("w0", Kind.FETCH, encode_message(Fetch(device="w0", cid=6, ids=np.arange(8, dtype=np.uint32)))),
            ("w0", Kind.FETCH, b"garbage"),
        ]  # fmt: skip
        results: dict[str, object] = {}
        threads = [
            threading.Thread(target=lambda: results.setdefault("a", first.answer(batch[:1], idle=lambda: None))),
            threading.Thread(target=lambda: results.setdefault("b", second.answer(batch[1:], idle=lambda: None))),
        ]
        threads[0].start()
        threads[0].join()
        threads[1].start()
        threads[1].join()
        expected = local.answer(batch, idle=lambda: None)
        assert [*results["a"], *results["b"]] == expected  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(5)
        remote_service.close()
        local_service.close()


def test_on_a_secure_broker_every_front_end_connects_under_its_own_identity(tmp_path: Path) -> None:
    """`main.py --secure --workers 2`: two service identities (the client id is the username there), both
    connected, and a password device over TLS is answered."""
    from fedwire.fleet import SecurityDir
    from fedwire.mosquitto import free_port
    from fedwire.mqtt import BrokerAddress
    from tests.test_broker_security import CliServer

    data_dir = tmp_path / "server"
    plain, tls = free_port(), free_port()
    cli = CliServer(
        ["--secure", "--workers", "2", "--listen-port", str(plain), "--tls-port", str(tls), "--cert-port", "-1",
         "--metrics-port", "0", "--neighbours", "4", "--client-id", "fedcache-server-0", "--data-dir", str(data_dir)],
        log=tmp_path / "cli.log",
    )  # fmt: skip
    device = None
    try:
        cli.wait_line("ready: 2 front-ends")
        security = SecurityDir.ensure(data_dir / "security")
        with security.admin() as admin:
            assert {"fedcache-server-0", "fedcache-server-0-w1"} <= set(admin.list_clients())
            provisioned = security.provision(admin, "sw0", auth="password", out=tmp_path / "sw0")
        # "ready" once both are started: they connect (each as its own user) right after.
        deadline = time.monotonic() + 20
        wanted = [f"as {name} (p5, c0, k30, u'{name}')" for name in ("fedcache-server-0", "fedcache-server-0-w1")]
        log = ""
        while not all(line in log for line in wanted) and time.monotonic() < deadline:
            time.sleep(0.2)
            log = (data_dir / "mosquitto" / "mosquitto.log").read_text()
        assert all(line in log for line in wanted), log[-2000:]
        from broker_server.mqtt_link import ServerLink

        device = ServerLink(
            address=BrokerAddress("127.0.0.1", tls, tls=True), client_id="sw0", credentials=provisioned.credentials
        )
        device.connect()
        device.subscribe("fedcache/v1/sw0/down", qos=1)
        hello = Hello(
            device="sw0", cid=3, model="m", classes=CLASSES, samples=4, hash_kind=HashKind.BINARY, hash_dim=32
        )
        device.publish("fedcache/v1/sw0/up/hello", encode_message(hello))
        deadline = time.monotonic() + 20
        replies: list[object] = []
        while not replies and time.monotonic() < deadline:
            for message in device.poll(0.2):
                device.ack(message.mid, message.epoch)
                replies.append(_decode(message.payload))
        assert replies and isinstance(replies[0], HelloAck) and replies[0].cid == 3
    finally:
        if device is not None:
            device.disconnect(session_expiry_s=0)
        assert cli.stop() == 0
