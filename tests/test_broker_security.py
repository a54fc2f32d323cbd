"""The secure set-up against a real Mosquitto 2.0.11: authentication, ACLs, bound client ids, TLS, revocation, limits.

One secure broker (loopback plaintext, TLS+password, TLS+certificate with a CRL), one cache server with its own
identity and a few provisioned devices serve the whole module. Every check waits on a condition with a deadline;
"nothing arrives" is a bounded wait on an event that must stay unset, closed by a sentinel that must arrive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

import broker_server
from broker_server.handlers import CacheService
from broker_server.mqtt_server import CacheServer
from broker_server.state_factory import STATE_DIRNAME
from fedwire import HashKind, Hello, HelloAck, Kind, Register, RegisterAck, decode, down_topic, encode, pki, up_topic
from fedwire.constants import MAX_PAYLOAD_BYTES
from fedwire.dynsec import SERVER_ROLE, observer_acls, server_acls
from fedwire.fleet import Provisioned, SecurityDir
from fedwire.mosquitto import MAX_PACKET_BYTES, MosquittoBroker, free_port
from fedwire.mqtt import AcknowledgedPublisher, BrokerAddress, Credentials, apply_credentials, make_client
from fedwire.topics import SERVER_STATUS, metrics_topic

NOT_AUTHORIZED = 0x87
PACKET_TOO_LARGE = 0x95
ADMINISTRATIVE_ACTION = 0x98
CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 10.0
QUIET_S = 2.0  # how long something that must not happen is given to happen
REVOCATION_DEADLINE_S = 5.0
CLASSES = 4
HASH_BITS = 64
SAMPLES = 16
SERVER_ID = "fedcache-server-0"
SPY = "fedcache-spy"  # reads every fedcache/ topic: stronger than any real observer or the server
PROBE = "fedcache-probe"  # the server's read rights in its own share group, plus the observers'
PROBE_GROUP = "security-probe"
MAIN = Path(broker_server.__file__).resolve().parent / "main.py"
REPO = MAIN.parent.parent
CLI_READY_TIMEOUT_S = 90.0


# ---------------------------------------------------------------- one MQTT connection that records everything


class Connection:
    """One MQTT v5 connection, never reconnected, that records what the broker answered.

    CONNACK, SUBACK and PUBACK reason codes, the DISCONNECT (or loss) and every message, each awaited with a
    deadline. paho's automatic reconnect is off: a broker that drops us must show as a disconnect.
    """

    def __init__(
        self,
        address: BrokerAddress,
        credentials: Credentials | None,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        apply_credentials(self._client, address, credentials)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._changed = threading.Condition()
        self.connack: ReasonCode | None = None
        self.connect_error: Exception | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.messages: list[mqtt.MQTTMessage] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    # -------------------------------------------------------- callbacks (paho's thread)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self.connack = reason
            self._changed.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            if self.disconnect_reason is None:
                self.disconnect_reason = reason
            self.disconnected.set()
            self._changed.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._changed:
            self._subacks[mid] = list(reasons)
            self._changed.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self._pubacks[mid] = reason
            self._changed.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    # -------------------------------------------------------- use

    def open(self, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
        """Connect (clean start) and wait for the CONNACK or the connection's end; a failed handshake is recorded."""
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=30, clean_start=True)
        except (ssl.SSLError, OSError) as exc:
            self.connect_error = exc
            self.disconnected.set()
            return self
        self._client.loop_start()
        with self._changed:
            self._changed.wait_for(lambda: self.connack is not None or self.disconnected.is_set(), timeout)
        return self

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure and not self.disconnected.is_set()

    def subscribe(self, topics: Sequence[str], *, retain_handling: int = 0) -> list[ReasonCode]:
        """One SUBSCRIBE for all `topics`; their SUBACK reason codes in order."""
        options = SubscribeOptions(qos=1, retainHandling=retain_handling)
        _rc, mid = self._client.subscribe([(topic, options) for topic in topics])
        with self._changed:
            if not self._changed.wait_for(lambda: mid in self._subacks or self.disconnected.is_set(), REPLY_TIMEOUT_S):
                raise TimeoutError(f"no SUBACK for {list(topics)}")
            if mid not in self._subacks:
                raise ConnectionError(f"disconnected ({self.disconnect_reason}) before the SUBACK for {list(topics)}")
            return self._subacks[mid]

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = REPLY_TIMEOUT_S
    ) -> ReasonCode | None:
        """QoS 1 publish; the PUBACK's reason code, or None when the connection ended first."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._changed:
            self._changed.wait_for(lambda: info.mid in self._pubacks or self.disconnected.is_set(), timeout)
            return self._pubacks.get(info.mid)

    def mark(self) -> int:
        with self._changed:
            return len(self.messages)

    def since(self, mark: int) -> list[mqtt.MQTTMessage]:
        with self._changed:
            return self.messages[mark:]

    def wait_message(
        self, match: Callable[[mqtt.MQTTMessage], bool], *, after: int = 0, timeout: float = REPLY_TIMEOUT_S
    ) -> mqtt.MQTTMessage | None:
        """The first message from index `after` on that `match`es, waiting up to `timeout`."""

        def found() -> mqtt.MQTTMessage | None:
            return next((m for m in self.messages[after:] if match(m)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None, timeout)
            return found()

    def wait_disconnected(self, timeout: float) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        if not self.disconnected.is_set():
            self._client.disconnect()
        self._client.loop_stop()


def on_topic(topic: str) -> Callable[[mqtt.MQTTMessage], bool]:
    return lambda message: message.topic == topic


# ---------------------------------------------------------------- the secure stack


@dataclass
class SecureStack:
    """A secure broker with its security directory, provisioned devices and test observers."""

    root: Path
    security: SecurityDir
    broker: MosquittoBroker
    devices: dict[str, Provisioned] = field(default_factory=dict)
    observer_credentials: dict[str, Credentials] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path) -> SecureStack:
        security = SecurityDir.ensure(root / "security")
        broker = MosquittoBroker(data_dir=root / "mosquitto", security=security.broker_security()).start()
        stack = cls(root=root, security=security, broker=broker)
        try:
            with security.admin() as admin:
                # Test observers: a spy that reads every fedcache/ topic (no real role can), and a probe with the
                # server's read rights in a share group of its own (so it steals no request from the server).
                everything = [
                    {"acltype": kind, "topic": "fedcache/#", "allow": True}
                    for kind in ("subscribePattern", "publishClientReceive")
                ]
                for username, acls in ((SPY, everything), (PROBE, server_acls(PROBE_GROUP) + observer_acls())):
                    admin.ensure_role(f"{username}-role", acls)
                    password = f"{username}-{os.urandom(12).hex()}"
                    admin.ensure_client_with(username=username, role=f"{username}-role", password=password)
                    secret = root / f"{username}.password"
                    secret.write_text(password)
                    stack.observer_credentials[username] = Credentials(username=username, password_file=str(secret))
        except BaseException:
            broker.stop()
            raise
        return stack

    def provision(self, *devices: tuple[str, str]) -> None:
        """Provision each (device, auth) into root/devices/<device>."""
        with self.security.admin() as admin:
            for device, auth in devices:
                out = self.root / "devices" / device
                self.devices[device] = self.security.provision(admin, device, auth=auth, out=out)

    def service(self, username: str) -> Credentials:
        with self.security.admin() as admin:
            return self.security.ensure_service(admin, username, role=SERVER_ROLE)

    def address_of(self, device: str) -> BrokerAddress:
        """Where a device connects: the password listener or the certificate listener, both TLS."""
        auth = self.devices[device].auth
        return self.broker.tls_address if auth == "password" else self.broker.cert_address

    def connect(self, device: str, *, client_id: str | None = None) -> Connection:
        """The device, connected to its listener with its own credentials (client id as edge/ names it)."""
        return Connection(
            self.address_of(device),
            self.devices[device].credentials,
            client_id=client_id or f"fedcache-device-{device}",
        ).open()

    def observer(self, username: str) -> Connection:
        """A test observer on the loopback listener (where the server connects too)."""
        return Connection(self.broker.address, self.observer_credentials[username], client_id=username).open()

    def broker_log(self) -> str:
        return (self.broker.data_dir / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        self.broker.stop()


def serve(stack: SecureStack, client_id: str, *, data_dir: Path | None = None) -> CacheServer:
    """A cache server under its own service identity, on the loopback listener; its state in data_dir/state
    (where `main.py inspect --data-dir` reads it), or in memory."""
    server = CacheServer(
        service=CacheService.open(data_dir / STATE_DIRNAME if data_dir else None, neighbours=4),
        address=stack.broker.address,
        client_id=client_id,
        credentials=stack.service(client_id),
    )
    server.start()
    return server


def stop_serving(server: CacheServer) -> None:
    server.stop()
    server.service.close()


def handled(server: CacheServer) -> float:
    """How many requests the server took from the broker (every outcome counted; retained ones too)."""
    return sum(
        sample.value
        for metric in server.metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def hello(device: str, cid: int, *, samples: int = SAMPLES) -> Hello:
    return Hello(
        device=device,
        cid=cid,
        model="cnn",
        classes=CLASSES,
        samples=samples,
        hash_kind=HashKind.BINARY,
        hash_dim=HASH_BITS,
    )


def register(device: str, cid: int, seed: int, *, samples: int = SAMPLES) -> Register:
    rng = np.random.default_rng(seed)
    return Register(
        device=device,
        cid=cid,
        ids=np.arange(samples, dtype=np.uint32),
        labels=(np.arange(samples) % CLASSES).astype(np.uint16),
        hashes=rng.integers(0, 256, size=(samples, HASH_BITS // 8), dtype=np.uint8),
    )


def call(connection: Connection, device: str, message: Any, *, timeout: float = REPLY_TIMEOUT_S) -> Any:
    """Publish a request on the device's own up topic and return the decoded reply carrying its cid."""
    mark = connection.mark()
    reason = connection.publish(up_topic(device, message.kind), encode(message))
    assert reason is not None and not reason.is_failure, f"{device}'s {message.kind.value} refused: {reason}"

    def answers(m: mqtt.MQTTMessage) -> bool:
        return m.topic == down_topic(device) and getattr(decode(m.payload), "cid", None) == message.cid

    reply = connection.wait_message(answers, after=mark, timeout=timeout)
    assert reply is not None, f"no reply to {device}'s {message.kind.value} (cid {message.cid})"
    return decode(reply.payload)


def listening(connection: Connection, device: str) -> Connection:
    granted = connection.subscribe([down_topic(device)])
    assert [r.value for r in granted] == [1], granted
    return connection


# ---------------------------------------------------------------- raw TLS and MQTT bytes


def tls12_context(ca_file: Path, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context capped at TLS 1.2, where a refused client certificate fails the handshake itself
    (under TLS 1.3 the client's handshake completes and the refusal arrives as an alert on the first read)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


def tls_handshake(address: BrokerAddress, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT_S)
    try:
        return context.wrap_socket(raw, server_hostname=address.host)
    except BaseException:
        raw.close()
        raise


def handshake_refusal(address: BrokerAddress, context: ssl.SSLContext) -> str | None:
    """The OpenSSL reason of a failed TLS handshake, or None when it succeeded."""
    try:
        tls_handshake(address, context).close()
    except ssl.SSLError as exc:
        return str(exc.reason)
    return None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_packet(*, client_id: str, username: str, password: str) -> bytes:
    """An MQTT v5 CONNECT: clean start, username and password, keepalive 30 s, no properties."""
    variable = _string(b"MQTT") + bytes([5, 0xC2]) + struct.pack("!H", 30) + b"\x00"
    body = variable + _string(client_id.encode()) + _string(username.encode()) + _string(password.encode())
    return b"\x10" + _varint(len(body)) + body


def read_packet(sock: ssl.SSLSocket) -> tuple[int, bytes] | None:
    """(first byte, body) of the next MQTT packet, or None at the end of the stream."""

    def exactly(count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    first = exactly(1)
    if first is None:
        return None
    length, shift = 0, 0
    while True:
        digit = exactly(1)
        if digit is None:
            return None
        length |= (digit[0] & 0x7F) << shift
        shift += 7
        if not digit[0] & 0x80:
            break
    body = exactly(length) if length else b""
    return None if body is None else (first[0], body)


# ---------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """One secure broker; devices A and B (passwords), Ac and Bc (certificates), P (retained-request test)."""
    running = SecureStack.start(tmp_path_factory.mktemp("secure"))
    try:
        running.provision(("A", "password"), ("B", "password"), ("Ac", "certificate"), ("Bc", "certificate"))
        running.provision(("P", "password"))
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(stack: SecureStack) -> Iterator[CacheServer]:
    """The module's cache server, under its own identity (fedcache-server-0, the server role)."""
    running = serve(stack, SERVER_ID)
    yield running
    stop_serving(running)


@pytest.fixture(scope="module")
def spy(stack: SecureStack) -> Iterator[Connection]:
    """Reads every fedcache/ topic for the whole module."""
    watching = stack.observer(SPY)
    assert watching.accepted, watching.connack
    assert [r.value for r in watching.subscribe(["fedcache/#"])] == [1]
    yield watching
    watching.close()


# ---------------------------------------------------------------- 1. authentication


@pytest.mark.parametrize("listener", ["plaintext", "tls"])
def test_anonymous_wrong_password_and_unknown_user_are_not_authorized(stack: SecureStack, listener: str) -> None:
    """Every CONNECT without valid credentials gets CONNACK 0x87 (the plugin never answers 0x86 in 2.0.11)."""
    address = stack.broker.address if listener == "plaintext" else stack.broker.tls_address
    trust = Credentials(ca_file=str(stack.security.ca_file)) if listener == "tls" else None
    attempts = {
        "anonymous": {},
        "wrong password": {"username": "A", "password": "not-the-password"},
        "unknown username": {"username": "nobody", "password": "whatever"},
        "no password": {"username": "A", "password": None},
    }
    for what, login in attempts.items():
        connection = Connection(address, trust, client_id=f"intruder-{listener}", **login).open()
        try:
            assert connection.connack is not None, f"{what}: no CONNACK ({connection.disconnect_reason})"
            assert connection.connack.value == NOT_AUTHORIZED, f"{what}: {connection.connack}"
        finally:
            connection.close()
    # The control: the real password on the same listener is accepted.
    real = Credentials(username="A", password_file=stack.devices["A"].credentials.password_file)
    if listener == "tls":
        real = stack.devices["A"].credentials
    good = Connection(address, real, client_id="A").open()
    try:
        assert good.accepted, good.connack
    finally:
        good.close()


def test_a_certificate_device_has_no_password_and_a_password_device_no_certificate(stack: SecureStack) -> None:
    """A certificate device offering nothing on the password listener is anonymous (0x87); a password device on
    the certificate listener never gets past TLS (it has no client certificate)."""
    on_password_listener = Connection(stack.broker.tls_address, stack.devices["Ac"].credentials, client_id="Ac").open()
    on_cert_listener = Connection(stack.broker.cert_address, stack.devices["A"].credentials, client_id="A").open()
    try:
        assert on_password_listener.connack is not None and on_password_listener.connack.value == NOT_AUTHORIZED
        assert on_cert_listener.connack is None and on_cert_listener.disconnected.is_set()
    finally:
        on_password_listener.close()
        on_cert_listener.close()


class CliServer:
    """`python broker_server/main.py ...` as a subprocess, its standard error followed line by line."""

    def __init__(self, arguments: Sequence[str], *, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(MAIN), *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.write(line)
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of stream
            self._changed.notify_all()

    def wait_line(self, text: str, timeout: float = CLI_READY_TIMEOUT_S) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or (self.lines and self.lines[-1] == ""), timeout)
            line = found()
        assert line is not None, f"no line containing {text!r}; the server wrote:\n{''.join(self.lines)}"
        return line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return self.process.returncode


def listeners_of(pid: int) -> set[tuple[str, int]]:
    """Every (address, port) the process listens on over TCP, IPv4 and IPv6."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr
    }


def test_a_secure_cli_binds_plaintext_to_loopback_only_and_insecure_says_so(tmp_path: Path) -> None:
    """`main.py --bind 0.0.0.0`: the broker's plaintext port listens on 127.0.0.1 only and its TLS ports on
    0.0.0.0; the same command with --insecure logs an INSECURE warning (and then listens in plaintext on 0.0.0.0)."""
    plain, tls, cert, insecure_plain = free_port(), free_port(), free_port(), free_port()
    common = ["--bind", "0.0.0.0", "--metrics-port", "0", "--neighbours", "4"]
    secure = CliServer(
        [*common, "--listen-port", str(plain), "--tls-port", str(tls), "--cert-port", str(cert),
         "--data-dir", str(tmp_path / "secure")],
        log=tmp_path / "secure.log",
    )  # fmt: skip
    insecure = CliServer(
        [*common, "--insecure", "--listen-port", str(insecure_plain), "--data-dir", str(tmp_path / "insecure")],
        log=tmp_path / "insecure.log",
    )
    try:
        secure.wait_line("ready: devices connect to mqtts://")
        run = json.loads((tmp_path / "secure" / "security" / "broker.json").read_text())
        broker_pid = int(run["pid"])
        assert psutil.Process(broker_pid).ppid() == secure.process.pid  # the CLI's own private broker
        assert listeners_of(broker_pid) == {("127.0.0.1", plain), ("0.0.0.0", tls), ("0.0.0.0", cert)}
        assert listeners_of(secure.process.pid) == set()  # no metrics endpoint, nothing else
        # Beyond loopback there is nothing in plaintext: the plaintext port refuses a connection on another
        # address of this machine, if it has one.
        others = [a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET]
        for address in [a for a in others if not a.startswith("127.")][:1]:
            with pytest.raises(OSError), socket.create_connection((address, plain), timeout=2):
                pass

        warning = insecure.wait_line("INSECURE")
        assert "WARNING" in warning and "0.0.0.0" in warning
        insecure.wait_line("ready: devices connect to mqtt://")
        insecure_broker = next(p for p in psutil.Process(insecure.process.pid).children() if "mosquitto" in p.name())
        assert listeners_of(insecure_broker.pid) == {("0.0.0.0", insecure_plain)}
        assert not any("INSECURE" in line for line in secure.lines)
    finally:
        codes = (secure.stop(), insecure.stop())
    assert codes == (0, 0), codes


# ---------------------------------------------------------------- 2. subscriptions


@pytest.mark.parametrize("device, other", [("A", "B"), ("Ac", "Bc")])
def test_a_device_may_subscribe_to_its_own_down_topic_only(stack: SecureStack, device: str, other: str) -> None:
    connection = stack.connect(device)
    try:
        assert connection.accepted, connection.connack
        forbidden = [
            down_topic(other),
            "#",
            "$SYS/#",
            f"$share/x/{down_topic(other)}",
            "fedcache/v1/+/down",
            "fedcache/v1/+/up/+",
            "$share/fedcache-server/fedcache/v1/+/up/+",  # joining the server's group would steal requests
            up_topic(device, Kind.HELLO),  # not even its own requests
            "$CONTROL/#",
        ]
        codes = connection.subscribe(forbidden)
        assert [c.value for c in codes] == [NOT_AUTHORIZED] * len(forbidden), dict(zip(forbidden, codes, strict=True))
        assert [c.value for c in connection.subscribe([down_topic(device)])] == [1]
        assert not connection.disconnected.is_set()  # a refused SUBSCRIBE costs nothing else
    finally:
        connection.close()


# ---------------------------------------------------------------- 3. publishes


@pytest.mark.parametrize("device, other", [("A", "B"), ("Ac", "Bc")])
def test_publishes_on_anothers_topics_are_refused_and_reach_nobody(
    stack: SecureStack, server: CacheServer, spy: Connection, device: str, other: str
) -> None:
    """PUBACK 0x87 on another device's up and down topics and on the server status; nobody receives them.
    Mosquitto 2.0.11 then closes the publisher's connection (each attempt gets its own)."""
    victim = listening(stack.connect(other), other)
    spied, served = spy.mark(), handled(server)
    forged = [*(up_topic(other, kind) for kind in (Kind.HELLO, Kind.UPDATE)), down_topic(other), SERVER_STATUS]
    try:
        for topic in forged:
            attacker = stack.connect(device)
            try:
                assert attacker.accepted, attacker.connack
                reason = attacker.publish(topic, encode(hello(other, cid=99)))
                assert reason is not None and reason.value == NOT_AUTHORIZED, (topic, reason)
                assert attacker.wait_disconnected(REPLY_TIMEOUT_S), (
                    f"still connected after a refused publish on {topic}"
                )
            finally:
                attacker.close()
        # A sentinel the spy must see, published after every forged message was refused.
        sentinel = stack.connect(device)
        try:
            assert sentinel.publish(metrics_topic(device), b"sentinel") is not None
        finally:
            sentinel.close()
        assert spy.wait_message(on_topic(metrics_topic(device)), after=spied) is not None
        assert not victim.disconnected.wait(QUIET_S)
        assert [m.topic for m in victim.since(0)] == []
        assert [m.topic for m in spy.since(spied) if m.topic in forged] == []
        assert handled(server) == served
        # The retained status is still the server's own.
        probe = stack.observer(PROBE)
        try:
            probe.subscribe([SERVER_STATUS])
            status = probe.wait_message(on_topic(SERVER_STATUS))
            assert status is not None and status.payload == b"online" and status.retain
        finally:
            probe.close()
    finally:
        victim.close()


# ---------------------------------------------------------------- 4. client ids


@pytest.mark.parametrize("device, other", [("A", "B"), ("Ac", "Bc")])
def test_anothers_client_id_takes_over_nobody_but_oneself(
    stack: SecureStack, server: CacheServer, device: str, other: str
) -> None:
    """With A's credentials and B's client id (edge's `fedcache-device-B`, or plain `B`), the connection is A's:
    A's own earlier connection is taken over, B stays connected and keeps getting its own replies."""
    logged = len(stack.broker_log())
    victim = listening(stack.connect(other), other)
    own = stack.connect(device)
    intruders: list[Connection] = []
    try:
        assert victim.accepted and own.accepted
        for client_id in (f"fedcache-device-{other}", other):
            intruder = stack.connect(device, client_id=client_id)
            intruders.append(intruder)
            assert intruder.accepted, (client_id, intruder.connack)
            assert [c.value for c in intruder.subscribe([down_topic(other)])] == [NOT_AUTHORIZED]
        assert own.wait_disconnected(REPLY_TIMEOUT_S), "A's own session was not the one taken over"
        assert intruders[0].wait_disconnected(REPLY_TIMEOUT_S)  # the second intruder (also A) took it over in turn
        assert not victim.disconnected.wait(QUIET_S), f"{other} was disconnected: {victim.disconnect_reason}"
        reply = call(victim, other, hello(other, cid=7001))
        assert isinstance(reply, HelloAck) and reply.device == other
        assert [m.topic for m in intruders[-1].since(0)] == []
        log = stack.broker_log()[logged:]
        assert f"Client {device} already connected, closing old connection." in log
        assert f"Client {other} already connected" not in log
    finally:
        for connection in (victim, own, *intruders):
            connection.close()


# ---------------------------------------------------------------- 5. TLS on the certificate listener


def test_the_certificate_listener_refuses_no_foreign_and_revoked_certificates(stack: SecureStack) -> None:
    address, ca = stack.broker.cert_address, stack.security.ca_file
    other_ca = pki.create_ca(stack.root / "other-ca", name="Somebody else's CA")
    forged = stack.root / "other-ca" / "Bc"
    # A certificate for a real device's name, from a CA the broker does not trust.
    pki.issue_client_certificate(
        other_ca, common_name="Bc", cert_path=forged.with_suffix(".pem"), key_path=forged.with_suffix(".key")
    )
    stack.provision(("Rv", "certificate"))
    revoked = stack.devices["Rv"].credentials
    assert handshake_refusal(address, tls12_context(ca, revoked.cert_file, revoked.key_file)) is None  # before
    with stack.security.admin() as admin:
        stack.security.revoke(admin, "Rv")

    cases = {
        "no certificate": (None, None, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        "another CA": (str(forged.with_suffix(".pem")), str(forged.with_suffix(".key")), "TLSV1_ALERT_UNKNOWN_CA"),
        "revoked": (revoked.cert_file, revoked.key_file, "SSLV3_ALERT_CERTIFICATE_REVOKED"),
    }
    for what, (cert, key, alert) in cases.items():
        assert handshake_refusal(address, tls12_context(ca, cert, key)) == alert, what
        # paho negotiates TLS 1.3: the refusal comes after its side of the handshake, and no CONNACK ever does.
        credentials = Credentials(ca_file=str(ca), cert_file=cert or "", key_file=key or "")
        attempt = Connection(address, credentials, client_id="Bc").open()
        try:
            assert attempt.connack is None and attempt.disconnected.is_set(), (what, attempt.connack)
        finally:
            attempt.close()
    # The control: a valid certificate's handshake and CONNECT succeed.
    good = stack.devices["Bc"].credentials
    assert handshake_refusal(address, tls12_context(ca, good.cert_file, good.key_file)) is None
    accepted = stack.connect("Bc")
    try:
        assert accepted.accepted, accepted.connack
    finally:
        accepted.close()


# ---------------------------------------------------------------- 6. revocation


def test_revocation_drops_the_device_refuses_its_return_and_touches_nobody_else(stack: SecureStack) -> None:
    stack.provision(("R1", "password"), ("R2", "certificate"))
    revoked = {name: stack.connect(name) for name in ("R1", "R2")}
    bystanders = {name: stack.connect(name) for name in ("B", "Bc")}
    broker = psutil.Process(stack.broker.process.pid if stack.broker.process else -1)
    born = broker.create_time()
    try:
        assert all(c.accepted for c in (*revoked.values(), *bystanders.values()))
        started = time.monotonic()
        with stack.security.admin() as admin:
            for name in revoked:
                stack.security.revoke(admin, name)
        for name, connection in revoked.items():
            assert connection.wait_disconnected(started + REVOCATION_DEADLINE_S - time.monotonic()), name
            assert connection.disconnect_reason is not None
            assert connection.disconnect_reason.value == ADMINISTRATIVE_ACTION, (name, connection.disconnect_reason)
        again = stack.connect("R1")
        try:
            assert again.connack is not None and again.connack.value == NOT_AUTHORIZED, again.connack
        finally:
            again.close()
        again = stack.connect("R2")
        try:
            assert again.connack is None and again.disconnected.is_set(), again.connack
        finally:
            again.close()
        r2 = stack.devices["R2"].credentials
        refusal = handshake_refusal(
            stack.broker.cert_address, tls12_context(stack.security.ca_file, r2.cert_file, r2.key_file)
        )
        assert refusal == "SSLV3_ALERT_CERTIFICATE_REVOKED"
        assert time.monotonic() - started < REVOCATION_DEADLINE_S
        assert stack.security.devices()["R1"]["revoked"] and stack.security.devices()["R2"]["revoked"]

        for name, connection in bystanders.items():
            assert not connection.disconnected.wait(QUIET_S / len(bystanders)), (name, connection.disconnect_reason)
            reason = connection.publish(metrics_topic(name), b"still here")
            assert reason is not None and not reason.is_failure, (name, reason)
        assert stack.broker.process is not None and stack.broker.process.poll() is None
        assert psutil.Process(stack.broker.process.pid).create_time() == born  # the same process, never restarted
        assert json.loads(stack.security.run_file.read_text())["pid"] == broker.pid
    finally:
        for connection in (*revoked.values(), *bystanders.values()):
            connection.close()


# ---------------------------------------------------------------- 7. packet size


def test_an_oversized_packet_is_refused_at_the_broker_and_never_reaches_the_server(
    stack: SecureStack, server: CacheServer, spy: Connection
) -> None:
    topic = up_topic("A", Kind.UPDATE)
    spied, served = spy.mark(), handled(server)
    # Through paho: the whole packet goes out, the broker reads its header, answers DISCONNECT 0x95 and closes; the
    # client, still writing, loses the DISCONNECT in the reset and sees the connection end (no PUBACK ever).
    device = stack.connect("A")
    try:
        assert device.accepted
        assert device.publish(topic, b"\x00" * MAX_PACKET_BYTES, timeout=30) is None
        assert device.wait_disconnected(REPLY_TIMEOUT_S)
    finally:
        device.close()
    assert "Client A disconnected due to oversize packet." in stack.broker_log()

    # Byte by byte: the header alone decides. Mosquitto 2.0.11 counts a packet as its remaining length + 1 (not the
    # 1-4 bytes of the length field), so the smallest refused header announces a remaining length of the limit.
    credentials = stack.devices["A"].credentials
    sock = tls_handshake(stack.broker.tls_address, ssl.create_default_context(cafile=credentials.ca_file))
    try:
        sock.sendall(connect_packet(client_id="A", username="A", password=credentials.password() or ""))
        connack = read_packet(sock)
        assert connack is not None and connack[0] == 0x20 and connack[1][1] == 0x00, connack
        sock.sendall(b"\x32" + _varint(MAX_PACKET_BYTES) + _string(topic.encode()) + b"\x00\x01\x00" + bytes(64))
        answer = read_packet(sock)
        assert answer is not None and answer[0] == 0xE0 and answer[1][0] == PACKET_TOO_LARGE, answer
        assert read_packet(sock) is None  # and the connection is closed
    finally:
        sock.close()

    # Nothing of either packet reached the server or anybody else; a normal request afterwards does.
    device = listening(stack.connect("A"), "A")
    try:
        assert isinstance(call(device, "A", hello("A", cid=7101)), HelloAck)
    finally:
        device.close()
    assert handled(server) == served + 1
    assert [len(m.payload) for m in spy.since(spied) if m.topic == topic] == []


def test_our_publisher_refuses_an_oversized_message_before_it_can_stall_the_link() -> None:
    """paho would resend a packet the broker refused after every reconnect, blocking all queued behind it."""
    publisher = AcknowledgedPublisher(make_client(client_id="oversize-probe"))
    with pytest.raises(ValueError, match="exceeds the wire's"):
        publisher.publish("fedcache/v1/A/up/update", b"\x00" * (MAX_PAYLOAD_BYTES + 1))
    assert publisher.unacknowledged() == 0
    publisher.publish("fedcache/v1/A/up/update", b"\x00" * MAX_PAYLOAD_BYTES)  # queued while offline: at the limit
    assert publisher.unacknowledged() == 1


# ---------------------------------------------------------------- 8. retained requests


def test_a_retained_request_is_never_handled_by_a_server_that_starts_later(
    stack: SecureStack, server: CacheServer, spy: Connection
) -> None:
    device = listening(stack.connect("P"), "P")
    topic = up_topic("P", Kind.HELLO)
    late: CacheServer | None = None
    try:
        # The running server handles the live copy (it arrives without the retain flag): the request is valid.
        mark = device.mark()
        assert device.publish(topic, encode(hello("P", cid=1)), retain=True) is not None
        live = device.wait_message(on_topic(down_topic("P")), after=mark)
        assert live is not None and isinstance(decode(live.payload), HelloAck)
        # The poison is there: a new share-group member subscribing without retain handling 2 is handed it.
        probe = stack.observer(PROBE)
        try:
            probe.subscribe([f"$share/{PROBE_GROUP}/fedcache/v1/+/up/+"])
            poison = probe.wait_message(on_topic(topic))
            assert poison is not None and poison.retain and decode(poison.payload).cid == 1
        finally:
            probe.close()

        after_late = device.mark()
        late = serve(stack, "fedcache-server-1")  # a fresh identity and a fresh state
        assert device.wait_message(on_topic(down_topic("P")), after=after_late, timeout=QUIET_S) is None
        assert handled(late) == 0
        assert late.service.state.devices() == ()

        # Normal requests afterwards are handled (the share group alternates between the two servers).
        cid = 2
        while not late.service.state.devices() and cid < 6:
            assert isinstance(call(device, "P", hello("P", cid=cid)), HelloAck)
            cid += 1
        assert [record.device for record in late.service.state.devices()] == ["P"]
        retained = late.metrics.registry.get_sample_value(
            "fedcache_requests_total", {"kind": Kind.HELLO.value, "outcome": "retained"}
        )
        assert not retained  # retain handling 2: the late server was never even handed the retained copy
        assert device.publish(topic, b"", retain=True) is not None  # clear the retained message
    finally:
        if late is not None:
            stop_serving(late)
        device.close()


def test_registration_over_tls_reaches_the_server_under_its_own_identity(
    stack: SecureStack, server: CacheServer
) -> None:
    """The control for every refusal above: a certificate device's real exchange over the secure stack works."""
    device = listening(stack.connect("Bc"), "Bc")
    try:
        assert isinstance(call(device, "Bc", hello("Bc", cid=1)), HelloAck)
        ack = call(device, "Bc", register("Bc", cid=2, seed=5))
        assert isinstance(ack, RegisterAck) and ack.registered == SAMPLES
    finally:
        device.close()
