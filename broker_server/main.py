"""`python broker_server/main.py`: run the FedCache knowledge cache server (with a private Mosquitto by default)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker_server.handlers import CacheService
    from fedwire.mosquitto import MosquittoBroker, PortInUseError
    from fedwire.mqtt import BrokerAddress, Credentials

# Run as a script, Python puts this directory first on sys.path, where its module names (cache, metrics, ...)
# could shadow installed packages; the package itself is importable from the project install.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

DEFAULT_DATA_DIR = Path("fedcache-data")
DEFAULT_LISTEN_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_CERT_PORT = 8884
DEFAULT_METRICS_PORT = 9464
EXIT_PORT_IN_USE = 3
EXIT_USAGE = 2
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python broker_server/main.py",
        description="FedCache knowledge cache server. With no options it starts a private Mosquitto "
        "(persistence on) on 127.0.0.1:1883 and keeps its state in ./fedcache-data.",
        epilog="python broker_server/main.py inspect --data-dir DIR [--json]: print what the state in DIR holds, "
        "read-only (see inspect --help). python broker_server/main.py replication status|forget|seed: the "
        "replication log's nodes and trimming (see replication --help).",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        default=None,
        help="serve through an existing broker, e.g. mqtt://10.0.0.5:1883; without it a private Mosquitto is started",
    )
    parser.add_argument(
        "--listen-port", type=int, default=DEFAULT_LISTEN_PORT, help="port of the private Mosquitto (default 1883)"
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address the private Mosquitto listens on; 0.0.0.0 to let devices on the network connect (then "
        "it requires TLS and per-device credentials: see --insecure and docs/security.md)",
    )
    security = parser.add_argument_group(
        "security",
        "Beyond loopback the private broker is secure: TLS with passwords on --tls-port, TLS with client "
        "certificates on --cert-port, per-device ACLs, and a plaintext listener on 127.0.0.1 only (authenticated). "
        "Its CA, certificates and credentials live in DATA_DIR/security; devices get theirs from "
        "`python -m android_harness provision`.",
    )
    security.add_argument("--secure", action="store_true", help="secure even when listening on loopback only")
    security.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback without TLS or authentication: anyone on the network can read and write "
        "every device's knowledge",
    )
    security.add_argument("--tls-port", type=int, default=DEFAULT_TLS_PORT, help="TLS port for password devices")
    security.add_argument(
        "--cert-port", type=int, default=DEFAULT_CERT_PORT, help="TLS port for certificate devices (-1: none)"
    )
    security.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address devices use to reach the broker, added to its TLS certificate (repeatable)",
    )
    security.add_argument("--username", default="", help="with --broker: this server's username there")
    security.add_argument("--password-file", default="", help="with --broker: file holding that user's password")
    security.add_argument("--ca-file", default="", help="with an mqtts:// --broker: the CA that signed its certificate")
    security.add_argument("--cert-file", default="", help="with an mqtts:// --broker: this server's client certificate")
    security.add_argument("--key-file", default="", help="with --cert-file: its private key")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where the server keeps its durable state (and the private broker its persistence)",
    )
    parser.add_argument("--neighbours", type=int, default=16, help="R: neighbours per sample in the relation")
    parser.add_argument(
        "--defences",
        choices=("on", "off"),
        default="off",
        help="on: robust teachers, capped and hub-free relations, per-class quotas and per-device trust against "
        "malicious devices (docs/robustness.md); trust is exported as fedcache_device_trust (default off)",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=120.0,
        help="FedAvg baseline: seconds after a round's first complete model upload before it closes with whoever "
        "arrived (it closes at once when every participant did)",
    )
    parser.add_argument(
        "--fedavg-participants",
        type=int,
        default=0,
        help="FedAvg baseline: a round also waits until this many devices uploaded (up to --round-timeout)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="port of the Prometheus /metrics endpoint on 127.0.0.1 (0 disables it)",
    )
    parser.add_argument("--client-id", default="fedcache-server-0", help="MQTT client id (one per server process)")
    parser.add_argument(
        "--keep-session",
        action="store_true",
        help="on a clean shutdown keep the MQTT session, so requests queue in the broker until this server (same "
        "--client-id) is back; by default a stopping server leaves the shared subscription and ends its session, so "
        "no request is routed to it while it is away (devices resend what goes unanswered)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N > 1: N MQTT front-ends on the share group (client ids CLIENT_ID, CLIENT_ID-w1, ...; their own "
        "identities on a secure broker) over one state process that answers and commits their batches, all "
        "restarted when they die (PIDs in DATA_DIR/workers.json; see docs/scaling.md). Default 1: one process",
    )
    replication = parser.add_argument_group(
        "more than one machine",
        "Several nodes, each serving the devices of its own broker and holding the whole knowledge table: "
        "registrations and updates are replicated through a Redis stream (docs/scaling.md section 5).",
    )
    replication.add_argument(
        "--replicate",
        metavar="URL",
        default=None,
        help="redis://HOST:PORT[/DB]: replicate through the Redis there (appendonly yes, appendfsync always); "
        "default: one node, nothing replicated",
    )
    replication.add_argument(
        "--node-id", default="", help="with --replicate: this node's id, unique among the nodes ([A-Za-z0-9_-])"
    )
    parser.add_argument(
        "--request-path",
        choices=("batched", "legacy"),
        default="batched",
        help="batched (default): one thread reads, answers, commits and acknowledges whole batches; legacy: the "
        "path before issue 14 (paho's thread, a queue, one message at a time), kept for the serving bench",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="profile every thread of the server (cProfile) and write the merged pstats to FILE on shutdown",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    return parser


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def port_in_use_message(exc: PortInUseError) -> str:
    """One line: what holds the port, and the two ways on."""
    host = "127.0.0.1" if exc.host in ("0.0.0.0", "") else exc.host
    return (
        f"fedcache server: cannot start its private Mosquitto: {exc}. Pass --listen-port PORT to run it on another "
        f"port, or --broker mqtt://{host}:{exc.port} to serve through the broker already there."
    )


def _start_private_broker(
    args: argparse.Namespace, *, secure: bool
) -> tuple[MosquittoBroker, list[Credentials | None]]:
    """The private Mosquitto; when secure, with its security directory and an identity for each server worker."""
    from fedwire.dynsec import SERVER_ROLE
    from fedwire.fleet import SECURITY_DIRNAME, SecurityDir
    from fedwire.mosquitto import MosquittoBroker

    data_dir = args.data_dir / "mosquitto"
    workers = max(1, args.workers)
    if not secure:
        return MosquittoBroker(data_dir=data_dir, port=args.listen_port, bind=args.bind).start(), [None] * workers
    hosts = [h for h in (args.bind, *args.hostname) if h not in ("0.0.0.0", "")]
    if args.bind in ("0.0.0.0", ""):
        hosts += _local_addresses()
    security_dir = SecurityDir.ensure(args.data_dir / SECURITY_DIRNAME, hosts=hosts)
    broker = MosquittoBroker(
        data_dir=data_dir,
        port=args.listen_port,
        bind=args.bind,
        security=security_dir.broker_security(tls_port=args.tls_port, cert_port=args.cert_port),
    ).start()
    try:
        with security_dir.admin() as admin:
            identities: list[Credentials | None] = [
                security_dir.ensure_service(admin, worker_client_id(args.client_id, number), role=SERVER_ROLE)
                for number in range(workers)
            ]
    except BaseException:
        broker.stop()
        raise
    return broker, identities


def worker_client_id(client_id: str, number: int) -> str:
    """Front-end `number`'s client id (and username on a secure broker): the first keeps the server's own."""
    return client_id if number == 0 else f"{client_id}-w{number}"


def worker_credentials(credentials: Credentials | None, number: int) -> Credentials | None:
    """Front-end `number`'s credentials on a broker that binds client ids to usernames: its own username, and
    its own password file where the given one names `{worker}` (else the same file)."""
    from dataclasses import replace

    if credentials is None or not credentials.username:
        return credentials
    return replace(
        credentials,
        username=worker_client_id(credentials.username, number),
        password_file=credentials.password_file.replace("{worker}", str(number)),
    )


def _local_addresses() -> list[str]:
    """Every IPv4 address of this machine and its host name: what devices may use to reach a 0.0.0.0 broker."""
    import socket

    import psutil

    addresses = [
        a.address for nic in psutil.net_if_addrs().values() for a in nic if a.family == socket.AF_INET and a.address
    ]
    return [*addresses, socket.gethostname()]


def _public(address: BrokerAddress, args: argparse.Namespace) -> str:
    """The URL to give devices: the first --hostname, else this machine's name when listening on every address."""
    import socket

    host = args.hostname[0] if args.hostname else socket.gethostname() if args.bind in ("0.0.0.0", "") else address.host
    return f"mqtts://{host}:{address.port}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        from broker_server.inspection import main as inspect

        return inspect(argv[1:], prog="python broker_server/main.py inspect", default_data_dir=DEFAULT_DATA_DIR)
    if argv[:1] == ["replication"]:
        from broker_server.replication.admin import main as replication

        return replication(argv[1:], prog="python broker_server/main.py replication")
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    log = logging.getLogger("broker_server")

    from fedwire.mosquitto import PortInUseError, port_holder
    from fedwire.mqtt import BrokerAddress, Credentials

    beyond_loopback = args.bind not in LOOPBACK_BINDS
    if args.secure and args.insecure:
        print("fedcache server: --secure and --insecure contradict each other", file=sys.stderr)
        return EXIT_USAGE
    secure = args.secure or (beyond_loopback and not args.insecure)
    if beyond_loopback and args.insecure and not args.broker:
        log.warning(
            "INSECURE: the broker listens on %s without TLS or authentication; anyone who reaches it can read "
            "and write every device's knowledge",
            args.bind,
        )
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.workers < 1:
        print("fedcache server: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if (problem := _replication_problem(args)) is not None:
        print(f"fedcache server: {problem}", file=sys.stderr)
        return EXIT_USAGE
    broker = None
    credentials: Credentials | None = None
    if args.broker:
        address = BrokerAddress.parse(args.broker)
        credentials = Credentials(
            username=args.username,
            password_file=args.password_file,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        )
        identities = [worker_credentials(credentials, number) for number in range(args.workers)]
        credentials = identities[0]
    else:
        try:
            broker, identities = _start_private_broker(args, secure=secure)
            credentials = identities[0]
        except PortInUseError as exc:
            print(port_in_use_message(exc), file=sys.stderr)
            return EXIT_PORT_IN_USE
        address = broker.address
        log.info("started private mosquitto (pid %d) on %s", broker.process.pid if broker.process else -1, address.url)

    # Imported once the broker is up, so that a taken port is reported before faiss and numpy load.
    from broker_server.handlers import CacheService
    from broker_server.metrics import ServerMetrics
    from broker_server.mqtt_server import make_server
    from broker_server.state_factory import STATE_DIRNAME

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.workers > 1:
        try:
            return _run_workers(args, address=address, identities=identities, broker=broker, stop=stop)
        finally:
            if broker is not None:
                broker.stop()
    service = None
    server = None
    profiles = None
    if args.profile is not None:
        from broker_server.profiling import ThreadProfiles

        profiles = ThreadProfiles()
        profiles.start()
    try:
        if args.replicate:
            from broker_server.replication.journal import NodeMismatch

            try:
                service = _replicated_service(args)
            except NodeMismatch as exc:  # another node claimed the id since the check above
                print(f"fedcache server: {exc}: give each node its own --node-id", file=sys.stderr)
                return EXIT_USAGE
        else:
            service = CacheService.open(
                args.data_dir / STATE_DIRNAME,
                neighbours=args.neighbours,
                round_timeout_s=args.round_timeout,
                min_participants=args.fedavg_participants,
            )
        metrics = ServerMetrics()
        if args.replicate:
            from broker_server.replication import ReplicatedState
            from broker_server.replication.metrics import ReplicationCollector

            assert isinstance(service.state, ReplicatedState)
            metrics.registry.register(ReplicationCollector(service.state))
        if args.defences == "on":
            from broker_server.defences import DefenceCollector

            defences = service.cache.defend()
            metrics.registry.register(DefenceCollector(service.cache))
            log.info("defences on: %s", defences.config)
        if args.metrics_port:
            try:
                metrics.serve(args.metrics_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                print(
                    f"fedcache server: metrics port {args.metrics_port} on 127.0.0.1 is already in use"
                    f"{' by ' + holder if (holder := port_holder(args.metrics_port)) else ''}. Pass --metrics-port "
                    "PORT to serve /metrics elsewhere, or --metrics-port 0 to disable it.",
                    file=sys.stderr,
                )
                return EXIT_PORT_IN_USE
            log.info("metrics on http://127.0.0.1:%d/metrics", args.metrics_port)
        server = make_server(
            request_path=args.request_path,
            service=service,
            address=address,
            client_id=args.client_id,
            metrics=metrics,
            credentials=credentials,
            on_fatal=stop.set,
        )
        server.start()
        if broker is not None and broker.security is not None:
            log.info(
                "ready: devices connect to %s (password) or %s (certificate)",
                _public(broker.tls_address, args),
                _public(broker.cert_address, args) if broker.security.cert_port > 0 else "-",
            )
        else:
            log.info("ready: devices connect to %s", address.url)
        stop.wait()
        if getattr(server, "failed", False):
            log.error("the server stopped by itself (see above); exiting")
            return 1
        log.info("shutting down")
    finally:
        if server is not None:
            server.stop(leave_group=not args.keep_session)
        if service is not None:
            service.close()
        if broker is not None:
            broker.stop()
        if profiles is not None:
            profiles.dump(args.profile)
    return 0


def _replication_problem(args: argparse.Namespace) -> str | None:
    """Why --replicate / --node-id cannot be served as given, or None."""
    if not args.replicate:
        return "--node-id needs --replicate" if args.node_id else None
    from broker_server.replication.journal import NodeMismatch
    from broker_server.replication.node import check_node_directory, check_node_id, check_replication_url
    from broker_server.replication.redis_log import CursorTrimmed
    from broker_server.state_factory import STATE_DIRNAME

    try:
        check_replication_url(args.replicate)
        check_node_id(args.node_id)
    except ValueError as exc:
        return f"{exc} (--replicate needs --node-id NAME, unique among the nodes)" if not args.node_id else str(exc)
    try:
        check_node_directory(args.data_dir / STATE_DIRNAME, node=args.node_id, url=args.replicate)
    except NodeMismatch as exc:
        return f"{exc}: give each node its own --node-id and --data-dir"
    except CursorTrimmed as exc:
        return str(exc)
    if args.defences == "on":
        return "--replicate does not support --defences on yet: their trust follows each node's own order"
    if args.request_path != "batched":
        return "--replicate serves the batched request path only"
    return None


def _replicated_service(args: argparse.Namespace) -> CacheService:
    """This node's service over its replicated state (one process; with --workers the state process opens it)."""
    from broker_server.replication.node import open_replicated_service
    from broker_server.state_factory import STATE_DIRNAME

    return open_replicated_service(
        args.data_dir / STATE_DIRNAME,
        node=args.node_id,
        url=args.replicate,
        neighbours=args.neighbours,
        round_timeout_s=args.round_timeout,
        min_participants=args.fedavg_participants,
    )


def _run_workers(
    args: argparse.Namespace,
    *,
    address: BrokerAddress,
    identities: list[Credentials | None],
    broker: MosquittoBroker | None,
    stop: threading.Event,
) -> int:
    """--workers N: the state process and N front-ends, supervised until SIGINT/SIGTERM."""
    from broker_server.state_factory import STATE_DIRNAME
    from broker_server.workers import FrontendOptions, StateOptions, Supervisor, state_socket_name

    log = logging.getLogger("broker_server")
    socket_name = state_socket_name(f"{os.getpid()}-{os.urandom(4).hex()}")
    state = StateOptions(
        state_dir=args.data_dir / STATE_DIRNAME,
        socket_name=socket_name,
        neighbours=args.neighbours,
        round_timeout_s=args.round_timeout,
        min_participants=args.fedavg_participants,
        defences=args.defences == "on",
        replicate=args.replicate or "",
        node_id=args.node_id,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        log_format=args.log_format,
        profile=args.profile.with_name(args.profile.name + ".state") if args.profile else None,
    )
    frontends = [
        FrontendOptions(
            address=address,
            client_id=worker_client_id(args.client_id, number),
            socket_name=socket_name,
            credentials=identities[number],
            status=number == 0,
            metrics_port=args.metrics_port + 1 + number if args.metrics_port else 0,
            keep_session=args.keep_session,
            log_level=args.log_level,
            log_format=args.log_format,
            profile=args.profile.with_name(f"{args.profile.name}.frontend{number}") if args.profile else None,
        )
        for number in range(args.workers)
    ]
    supervisor = Supervisor(state=state, frontends=frontends, pid_file=args.data_dir / "workers.json")
    try:
        supervisor.start()
        log.info(
            "ready: %d front-ends over one state process on %s%s",
            args.workers,
            address.url,
            f" (devices: {_public(broker.tls_address, args)})" if broker is not None and broker.security else "",
        )
        supervisor.watch(stop)
        log.info("shutting down")
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
