"""A local field trial: a private broker, the cache server and N device processes, driven through their CLIs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from android_harness import native
from android_harness.faults import FaultDriver, FaultPlan, Processes, check_invariants, check_knowledge_flow
from android_harness.netns import NetnsLab, netns_unavailable_reason
from android_harness.processes import (
    STOP_TIMEOUT_S,
    ServerProcess,
    device_command,
    kill_process,
    server_command,
    server_main,
)
from android_harness.progress import progress_bar
from edge.config import (
    ATTACKS,
    KNOWLEDGE_SCHEDULE,
    AttackConfig,
    DataConfig,
    DeviceConfig,
    HashConfig,
    SecurityConfig,
    TrainConfig,
    attack_knobs,
    check_knowledge_schedule,
    config_to_toml,
    torch_only_settings_on,
)
from edge.state import EXIT_UNDELIVERED, read_last_report, read_progress
from fedwire import HashKind, LogitEncoding
from fedwire.dynsec import OBSERVER_ROLE, SERVER_ROLE
from fedwire.fleet import SecurityDir
from fedwire.mosquitto import MosquittoBroker
from fedwire.mqtt import BrokerAddress, Credentials, connect_persistent, make_client
from fedwire.topics import ALL_METRICS, device_of_metrics_topic

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 60.0
# How long the broker may take to hand the watcher a final report it already acknowledged to a device.
REPORT_DELIVERY_GRACE_S = 30.0
# Exit statuses of a device that finished training (the second: its last messages went unacknowledged).
COMPLETED_EXITS = (0, EXIT_UNDELIVERED)
# A secure trial's broker: none (plaintext, anonymous) or tls (per-device identities, ACLs, TLS for devices).
SECURITY_MODES = ("none", "tls")
# How a secure trial's devices authenticate; mixed alternates by device index (even: password, odd: certificate).
AUTH_MODES = ("password", "certificate", "mixed")
# The cache server's --defences (docs/robustness.md).
DEFENCE_MODES = ("on", "off")
# Every concurrently connected tool has its own identity (one username holds one connection).
SERVER_USERNAME = "fedcache-server-0"
WATCHER_USERNAME = "fedcache-observer-watch"
PROBE_USERNAME = "fedcache-observer-probe"


@dataclass(frozen=True)
class TrialSettings:
    """What a trial runs: devices, data split, models, algorithm and where the report goes."""

    out: Path
    dataset: str = "fashion-mnist"
    devices: int = 20
    epochs: int = 3
    algorithm: str = "fedcache"
    archs: tuple[str, ...] = ("cnn",)
    backends: tuple[str, ...] = ("torch",)
    alpha: float = 1.0
    seed: int = 0
    # How the dataset is cut into shards (edge.data.PARTITIONS); "dirichlet-per-class" is the published loader's.
    partition: str = "dirichlet"
    hash_kind: HashKind = HashKind.BINARY
    hash_dim: int = 256
    encoder_kind: str = "conv"
    logit_encoding: LogitEncoding = LogitEncoding.FLOAT16
    timeout_s: float = 3600.0
    extra_train: dict[str, Any] = field(default_factory=dict)
    # An existing broker (mqtt://host:port) instead of a private Mosquitto; no broker restarts then.
    broker_url: str | None = None
    # R for the server's relation (`--neighbours`); None keeps the server's default.
    neighbours: int | None = None
    # Per-device launch delay in seconds, counted from the moment every device with delay 0 is training
    # (the same origin as a FaultPlan's clock); empty or 0 = launched with the others.
    start_after_s: tuple[float, ...] = ()
    # Devices in network namespaces: True = required (error when unavailable), False = never,
    # None = when a fault plan touches links and namespaces are available (else processes are paused).
    netns: bool | None = None
    # "tls": the private broker is secure and every device is provisioned (SECURITY_MODES); "none": plaintext.
    security: str = "none"
    # With security "tls": how devices authenticate (AUTH_MODES).
    auth: str = "password"
    # Per device index its malicious behaviour (edge.config.ATTACKS), "" = honest; devices past the end: honest.
    attacks: tuple[str, ...] = ()
    # The server's --defences ("on" | "off"); None keeps the server's default.
    defences: str | None = None
    # The attackers' knobs (edge.config.AttackConfig fields other than mode and seed, e.g. {"shift": 40.0}).
    attack_options: dict[str, Any] = field(default_factory=dict)

    def attack_of(self, index: int) -> str:
        return self.attacks[index] if index < len(self.attacks) else ""

    @property
    def attackers(self) -> tuple[int, ...]:
        """Indices of the devices with an attack."""
        return tuple(i for i in range(self.devices) if self.attack_of(i))

    def start_delay(self, index: int) -> float:
        return self.start_after_s[index] if index < len(self.start_after_s) else 0.0

    @property
    def late_joiners(self) -> tuple[int, ...]:
        """Indices of the devices launched after the others began training."""
        return tuple(i for i in range(self.devices) if self.start_delay(i) > 0)

    def device_auth(self, index: int) -> str:
        """How device `index` authenticates in a secure trial: password or certificate."""
        if self.auth == "mixed":
            return ("password", "certificate")[index % 2]
        return self.auth

    def check(self) -> None:
        """Refuse combinations a trial cannot run, before any process starts."""
        unknown = sorted({a for a in self.attacks if a and a not in ATTACKS})
        if unknown:
            raise ValueError(f"unknown attacks {unknown}; choose from {ATTACKS}")
        attack_knobs(self.attack_options)  # names, types and ranges, before any process starts
        if self.attackers and self.algorithm != "fedcache":
            raise ValueError(
                f"attacks poison FedCache's knowledge: they need algorithm 'fedcache', not {self.algorithm!r}"
            )
        if self.defences is not None and self.defences not in DEFENCE_MODES:
            raise ValueError(f"defences must be one of {DEFENCE_MODES}, got {self.defences!r}")
        if self.security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {SECURITY_MODES}, got {self.security!r}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, got {self.auth!r}")
        if self.security != "none" and self.broker_url is not None:
            raise ValueError(
                "a secure trial provisions its devices on its own private broker; credentials for an external "
                f"broker ({self.broker_url}) are not supported: drop the broker url or run with security 'none'"
            )
        if self.algorithm == "fedavg" and (len(set(self.archs)) > 1 or set(self.backends) != {"torch"}):
            raise ValueError(
                f"FedAvg averages one architecture's PyTorch weights: got archs {self.archs}, backends "
                f"{self.backends}; use a single --archs and --backends torch (FedCache and FD allow heterogeneity)"
            )
        for name, knob in KNOWLEDGE_SCHEDULE.items():
            check_knowledge_schedule(self.extra_train.get(name, knob.minimum), algorithm=self.algorithm, name=name)
        other = sorted(set(self.backends) - {"torch"})
        torch_only = torch_only_settings_on(self.extra_train)
        if torch_only and other:
            raise ValueError(
                f"{', '.join(torch_only)}: implemented for the torch backend only, not for {other}: run those "
                "devices with --backends torch or turn them off"
            )


@dataclass(frozen=True)
class _ExternalBroker:
    """A broker the trial only connects to: it neither starts, stops nor restarts it."""

    address: BrokerAddress

    @property
    def port(self) -> int:
        return self.address.port

    def __enter__(self) -> _ExternalBroker:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def restart(self) -> None:
        raise RuntimeError(f"cannot restart the external broker {self.address.url}")


@dataclass
class _Collector:
    """Latest metrics per device plus the MAUA curve, fed from the devices' metrics topics."""

    devices: list[str]
    started: float
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: list[list[float]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    # Devices whose final report never arrived over MQTT and was read from their state directory instead.
    read_from_disk: list[str] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        device = device_of_metrics_topic(message.topic)
        if device not in self.devices:
            return
        try:
            metrics = json.loads(message.payload)
        except ValueError:
            log.warning("unreadable metrics from %s", device)
            return
        self.add(device, metrics)

    def add(self, device: str, metrics: dict[str, Any]) -> None:
        """Take one report; an older one (QoS 1 redelivers after a reconnect) never replaces a newer one."""
        with self.lock:
            elapsed = time.monotonic() - self.started
            metrics["trial_time_s"] = elapsed
            self.history.append(metrics)
            previous = self.latest.get(device)
            if previous is not None and metrics.get("wall_time", 0.0) < previous.get("wall_time", 0.0):
                log.info("older report from %s arrived late (redelivered); keeping the newer one", device)
                return
            self.latest[device] = metrics
            if len(self.latest) == len(self.devices):
                self.curve.append([round(elapsed, 3), self.maua()])
            self.lock.notify_all()

    def wait_all_done(self, timeout: float) -> bool:
        """Wait (bounded) for every device's final report; True once all arrived."""
        with self.lock:
            return self.lock.wait_for(self._all_done_locked, timeout=timeout)

    def missing(self) -> list[str]:
        """Devices whose final report has not arrived."""
        with self.lock:
            return [d for d in self.devices if not self.latest.get(d, {}).get("done")]

    def maua(self) -> float:
        """Unweighted mean over devices of each one's latest test accuracy."""
        return sum(m["accuracy"] for m in self.latest.values()) / max(len(self.devices), 1)

    def epochs_done(self) -> int:
        with self.lock:
            return sum(m["epoch"] for m in self.latest.values())

    def all_done(self) -> bool:
        with self.lock:
            return self._all_done_locked()

    def _all_done_locked(self) -> bool:
        return len(self.latest) == len(self.devices) and all(m["done"] for m in self.latest.values())


@dataclass(frozen=True)
class _TrialSecurity:
    """A secure trial's identities: the server's, the two observers' and every device's (broker URL + files).

    Only paths to secret files, never a secret itself: this object may be logged or put in a report.
    """

    server: Credentials
    watcher: Credentials
    probe: Credentials
    device_brokers: dict[str, str]
    device_security: dict[str, SecurityConfig]

    def describe(self) -> dict[str, dict[str, str]]:
        """device -> its auth kind and broker URL, for the report."""
        return {
            device: {"auth": "certificate" if security.cert_file else "password", "broker": self.device_brokers[device]}
            for device, security in self.device_security.items()
        }


def _device_id(index: int) -> str:
    return f"dev{index:03d}"


def _state_dir(settings: TrialSettings, device: str) -> Path:
    """Where a device of this trial keeps its durable state (outbox, checkpoints, last report)."""
    return settings.out / "devices" / device


def _credentials_dir(settings: TrialSettings, device: str) -> Path:
    """Where a secure trial puts one device's credentials (its own only: CA certificate, password or key)."""
    return settings.out / "credentials" / device


def _security_dir(settings: TrialSettings, lab: NetnsLab | None) -> SecurityDir:
    """The trial's CA, broker certificate (naming the lab's bridge when devices reach the broker there) and CRL."""
    return SecurityDir.ensure(settings.out / "security", hosts=[lab.bridge_address] if lab is not None else [])


def _provision(
    settings: TrialSettings, security_dir: SecurityDir, broker: MosquittoBroker, *, device_host: str | None
) -> _TrialSecurity:
    """With one admin session on the running broker: the server's and observers' identities, then every device
    provisioned into its own credentials directory, pointed at the TLS listener its authentication uses."""
    brokers: dict[str, str] = {}
    security: dict[str, SecurityConfig] = {}
    with security_dir.admin() as admin:
        server = security_dir.ensure_service(admin, SERVER_USERNAME, role=SERVER_ROLE)
        watcher = security_dir.ensure_service(admin, WATCHER_USERNAME, role=OBSERVER_ROLE)
        probe = security_dir.ensure_service(admin, PROBE_USERNAME, role=OBSERVER_ROLE)
        for index in range(settings.devices):
            device = _device_id(index)
            auth = settings.device_auth(index)
            given = security_dir.provision(admin, device, auth=auth, out=_credentials_dir(settings, device))
            listener = broker.tls_address if auth == "password" else broker.cert_address
            brokers[device] = BrokerAddress(device_host or listener.host, listener.port, tls=True).url
            security[device] = given.credentials
    log.info("provisioned %d devices (%s)", settings.devices, settings.auth)
    return _TrialSecurity(server=server, watcher=watcher, probe=probe, device_brokers=brokers, device_security=security)


def _device_configs(
    settings: TrialSettings, broker: BrokerAddress, encoder: Path, *, security: _TrialSecurity | None = None
) -> list[DeviceConfig]:
    configs = []
    for index in range(settings.devices):
        device = _device_id(index)
        train = TrainConfig(
            algorithm=settings.algorithm,
            arch=settings.archs[index % len(settings.archs)],
            # A native device (edge_native/) runs the ExecuTorch program; its file says backend = "native".
            backend=_python_backend(settings.backends[index % len(settings.backends)]),
            artifacts_dir=str(settings.out / "artifacts"),
            epochs=settings.epochs,
            seed=settings.seed,
            logit_encoding=settings.logit_encoding,
            **settings.extra_train,
        )
        configs.append(
            DeviceConfig(
                id=device,
                broker=security.device_brokers[device] if security is not None else broker.url,
                state_dir=str(_state_dir(settings, device)),
                data=DataConfig(
                    dataset=settings.dataset,
                    num_devices=settings.devices,
                    alpha=settings.alpha,
                    seed=settings.seed,
                    index=index,
                    partition=settings.partition,
                ),
                train=train,
                hash=HashConfig(
                    encoder=str(encoder), kind=settings.hash_kind, dim=settings.hash_dim, seed=settings.seed
                ),
                security=security.device_security[device] if security is not None else SecurityConfig(),
                attack=AttackConfig(
                    mode=settings.attack_of(index),
                    seed=settings.seed,
                    **(settings.attack_options if settings.attack_of(index) else {}),
                ),
            )
        )
    return configs


def _python_backend(backend: str) -> str:
    """The edge config's backend for a trial backend: a native device trains the same ExecuTorch program."""
    return "executorch" if backend == "native" else backend


def _prepare_shared_artifacts(settings: TrialSettings) -> Path:
    """Decode the dataset into the shared cache and export the encoder once, not once per device."""
    from edge.backends import has_training_program
    from edge.data import load_dataset
    from models.encoder import export_encoder_onnx
    from models.loss import LossSettings

    dataset = load_dataset(settings.dataset)
    executorch_archs = {
        settings.archs[i % len(settings.archs)]
        for i in range(settings.devices)
        if settings.backends[i % len(settings.backends)] in ("executorch", "native")
    }
    loss = LossSettings(**{k: v for k, v in settings.extra_train.items() if k in ("kd_alpha", "temperature")})
    batch = int(settings.extra_train.get("batch_size", TrainConfig.batch_size))
    artifacts = settings.out / "artifacts"
    shape = ",".join(str(d) for d in dataset.input_shape)
    for arch in sorted(executorch_archs):
        # One export per architecture, shared by every ExecuTorch device (each would otherwise export its own),
        # and none when the artifacts directory already holds a program for the devices' loss and batch.
        found = has_training_program(
            artifacts, arch=arch, classes=dataset.classes, input_shape=dataset.input_shape, loss=loss, batch_size=batch
        )
        if not found:
            subprocess.run(
                [sys.executable, "-m", "export", "--arch", arch, "--classes", str(dataset.classes),
                 "--input-shape", shape, "--out", str(artifacts), "--kd-alpha", str(loss.kd_alpha),
                 "--temperature", str(loss.temperature), "--batch", str(max(batch, 8))],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
    if "native" in settings.backends:
        native.ensure_built()
        native.encoder_program(
            artifacts, kind=settings.encoder_kind, input_shape=dataset.input_shape, dim=settings.hash_dim,
            seed=settings.seed,
        )  # fmt: skip
    path = settings.out / "encoder.onnx"
    export_encoder_onnx(
        path, input_shape=dataset.input_shape, dim=settings.hash_dim, seed=settings.seed, kind=settings.encoder_kind
    )
    return path


def _server_command(
    settings: TrialSettings, broker: BrokerAddress, *, credentials: Credentials | None = None
) -> list[str]:
    """The trial's cache server: through its broker, state under the trial's directory, its [server] options.

    With `credentials` (a secure trial) it logs in with its own identity; its password stays in its file.
    """
    options = [
        *(["--neighbours", str(settings.neighbours)] if settings.neighbours is not None else []),
        # FedAvg rounds wait for every device of the trial, not only those that already said hello.
        *(["--fedavg-participants", str(settings.devices)] if settings.algorithm == "fedavg" else []),
        *(["--defences", settings.defences] if settings.defences is not None else []),
    ]
    if credentials is not None:
        options += ["--username", credentials.username, "--password-file", credentials.password_file]
    return server_command(
        broker=broker,
        data_dir=settings.out / "server",
        client_id=credentials.username if credentials is not None else None,
        options=options,
    )


def _open_lab(settings: TrialSettings, faults: FaultPlan | None) -> NetnsLab | None:
    """Namespaces when required (target netns) or when faults touch links and they are available."""
    wanted = settings.netns if settings.netns is not None else faults is not None and faults.touches_links
    if not wanted:
        return None
    if settings.broker_url is not None:
        raise ValueError("devices in network namespaces need the trial's private broker (no broker url)")
    reason = netns_unavailable_reason()
    if reason is None:
        return NetnsLab(devices=settings.devices).open()
    if settings.netns:
        raise RuntimeError(f"target 'netns' needs network namespaces, unavailable here: {reason}")
    log.warning("network namespaces unavailable (%s): outages pause device processes instead", reason)
    return None


def run_trial(settings: TrialSettings, *, progress: bool = True, faults: FaultPlan | None = None) -> dict[str, Any]:
    """Run a trial end to end (optionally under a fault plan) and return (and write) its report."""
    from android_harness.report import build_report, write_report

    settings.check()
    settings.out.mkdir(parents=True, exist_ok=True)
    logs = settings.out / "logs"
    logs.mkdir(exist_ok=True)
    encoder = _prepare_shared_artifacts(settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes: Processes = [None] * settings.devices
    server: list[ServerProcess] = []
    launched_at: dict[str, float] = {}
    lab = _open_lab(settings, faults)
    started = time.monotonic()
    extra_binds = (lab.bridge_address,) if lab is not None else ()
    trial_security: _TrialSecurity | None = None
    try:
        security_dir = _security_dir(settings, lab) if settings.security != "none" else None
        broker_context: MosquittoBroker | _ExternalBroker = (
            MosquittoBroker(
                data_dir=settings.out / "broker",
                extra_binds=extra_binds,
                security=security_dir.broker_security() if security_dir is not None else None,
            )
            if settings.broker_url is None
            else _ExternalBroker(BrokerAddress.parse(settings.broker_url))
        )
        with broker_context as broker:
            if security_dir is not None:
                assert isinstance(broker, MosquittoBroker)  # check() refused an external broker
                device_host = lab.bridge_address if lab is not None else None
                trial_security = _provision(settings, security_dir, broker, device_host=device_host)

            def start_server() -> None:
                own = trial_security.server if trial_security is not None else None
                command = _server_command(settings, broker.address, credentials=own)
                server.append(
                    ServerProcess(
                        command=command,
                        broker=broker.address,
                        log=logs / "server.log",
                        env=env,
                        credentials=trial_security.probe if trial_security is not None else None,
                    )
                )
                server[-1].start(timeout=SERVER_START_TIMEOUT_S)

            def kill_server() -> None:
                server[-1].kill()

            driver = None
            try:
                if settings.algorithm != "local":  # FD and FedAvg go through the same server
                    start_server()
                device_broker = BrokerAddress(lab.bridge_address, broker.port) if lab is not None else broker.address
                configs = _device_configs(settings, device_broker, encoder, security=trial_security)
                collector = _Collector(devices=[c.id for c in configs], started=time.monotonic())
                watcher_credentials = trial_security.watcher if trial_security is not None else None
                watcher = make_client(
                    client_id=WATCHER_USERNAME if watcher_credentials is not None else f"fedcache-trial-{os.getpid()}"
                )
                watcher.on_message = collector.on_message
                watcher.on_connect = lambda c, *_: c.subscribe(ALL_METRICS, qos=1)
                connect_persistent(watcher, broker.address, session_expiry_s=600, credentials=watcher_credentials)
                watcher.loop_start()

                def launch(index: int) -> None:
                    config = configs[index]
                    path = Path(config.state_dir) / "device.toml"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if settings.backends[index % len(settings.backends)] == "native":
                        path = native.prepare_native_device(
                            config, artifacts=settings.out / "artifacts", encoder_kind=settings.encoder_kind
                        )
                        command = native.device_command(path)
                    else:
                        path.write_text(config_to_toml(config))
                        command = device_command(path)
                    processes[index] = process = subprocess.Popen(
                        lab.command(index, command) if lab is not None else command,
                        stdout=subprocess.DEVNULL,
                        stderr=open(logs / f"{config.id}.log", "wb"),  # noqa: SIM115 - the child owns it
                        env=env,
                    )
                    launched_at[config.id] = round(time.monotonic() - collector.started, 3)
                    if driver is not None and driver.mode == "process-pause" and driver.is_down(index):
                        os.kill(process.pid, signal.SIGSTOP)  # launched inside a scheduled outage

                for index in range(settings.devices):
                    if settings.start_delay(index) <= 0:
                        launch(index)
                if faults is not None:
                    driver = FaultDriver(
                        plan=faults,
                        devices=settings.devices,
                        lab=lab,
                        kill_server=kill_server,
                        start_server=start_server,
                        restart_broker=broker.restart,
                        progress_of=lambda index: read_progress(Path(configs[index].state_dir)),
                    )
                    driver.start()
                _follow(settings, collector, processes, progress=progress, driver=driver, launch=launch)
                if driver is not None:
                    driver.release_all(processes)  # links back, so what devices still owe can arrive
                _await_exits(processes, [c.id for c in configs], timeout=max(c.delivery_timeout_s for c in configs))
                watcher.disconnect()
                watcher.loop_stop()
            finally:
                if driver is not None:
                    driver.release_all(processes)
                for process in processes:
                    if process is not None:
                        kill_process(process)
                if server:
                    server[-1].stop()
    finally:
        if lab is not None:
            lab.close()
    report = build_report(
        settings=asdict(settings),
        latest=collector.latest,
        curve=collector.curve,
        history=collector.history,
        wall_s=time.monotonic() - started,
        attackers=[_device_id(i) for i in settings.attackers],
    )
    report["launches"] = launched_at
    if trial_security is not None:
        report["security"] = {"mode": settings.security, "auth": settings.auth, "devices": trial_security.describe()}
    report["exit_status"] = {c.id: p.returncode for c, p in zip(configs, processes, strict=True) if p is not None}
    # Devices that finished but whose final report reached the trial only through their state directory.
    report["last_report_missing"] = sorted(collector.read_from_disk)
    late = tuple(configs[i].id for i in settings.late_joiners)
    if late:
        report["late_joiners"] = {configs[i].id: settings.start_delay(i) for i in settings.late_joiners}
    if driver is not None:
        report["faults"] = driver.describe()
        report["wasted_bytes"] = sum(m.get("wasted_bytes", 0) for m in collector.latest.values())
    if settings.algorithm == "fedcache":
        from edge.data import load_dataset

        # Every fedcache trial gets the invariants that apply: the durability ones always, recovery and
        # offline training only under a fault plan, knowledge flow when nothing else would show it.
        invariants = check_invariants(
            server_data_dir=settings.out / "server",
            device_dirs={c.id: Path(c.state_dir) for c in configs},
            classes=load_dataset(settings.dataset).classes,
            latest=collector.latest,
            curve=collector.curve,
            fault_times=[]
            if driver is None
            else [e["t"] for e in driver.events if e["t"] is not None and e["event"] != "fault plan started"],
            expect_offline_training=faults is not None and faults.has_outages and driver is not None
            and driver.mode == "netns",
            outages=driver.outages_seen if driver is not None else [],
        )  # fmt: skip
        if driver is None:
            invariants.pop("accuracy_recovered")
        if driver is None or late:
            invariants |= check_knowledge_flow(latest=collector.latest, late_joiners=late)
        report["invariants"] = invariants
        if settings.attackers or settings.defences == "on":
            report["defences"] = server_trust(settings.out / "server")
    write_report(report, settings.out)
    return report


def server_trust(server_data_dir: Path) -> dict[str, Any] | None:
    """The defences' per-device trust of the trial's final state, through `inspect --json --trust`."""
    command = [sys.executable, str(server_main()), "inspect", "--data-dir", str(server_data_dir), "--json", "--trust"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    trust: dict[str, Any] | None = json.loads(done.stdout).get("defences")
    return trust


def _await_exits(processes: Processes, names: list[str], *, timeout: float) -> None:
    """Every device reported done: let each finish on its own (it exits once the broker acknowledged what it
    still owes, within its delivery_timeout_s) rather than kill it; a straggler past `timeout` is killed."""
    deadline = time.monotonic() + timeout + STOP_TIMEOUT_S
    for name, process in zip(names, processes, strict=True):
        if process is None:
            continue
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s reported done but had not exited after %.0f s; killing it", name, timeout)
            kill_process(process)


def _complete_from_state(
    settings: TrialSettings, collector: _Collector, *, grace_s: float = REPORT_DELIVERY_GRACE_S
) -> None:
    """Every device exited having finished: learn what its final report said even if the message was lost.

    A device that exits 0 had its last report acknowledged by the broker, which delivers it to our
    watcher's session; wait for that, bounded. A device that exited with EXIT_UNDELIVERED (or whose report
    the broker lost, say in a restart without a flush) still wrote the report to its state directory
    before publishing it: take it from there and name the device in the report.
    """
    if collector.wait_all_done(timeout=grace_s):
        return
    for device in collector.missing():
        report = read_last_report(_state_dir(settings, device))
        if report is not None and report.get("done"):
            log.warning("%s finished but its last report never arrived over MQTT; read it from its state", device)
            collector.add(device, report)
            collector.read_from_disk.append(device)
    missing = collector.missing()
    if missing:
        raise RuntimeError(
            f"devices exited without reporting completion: {', '.join(missing)}; see {settings.out / 'logs'}"
        )


def _follow(
    settings: TrialSettings,
    collector: _Collector,
    processes: Processes,
    *,
    progress: bool,
    driver: FaultDriver | None = None,
    launch: Callable[[int], None] | None = None,
) -> None:
    """Show progress (apply faults, launch late joiners) until every device reports done; fail loudly if one dies.

    The clock of faults and late joiners starts once every device launched at the start is training, so
    late joiners do not hold back the fault plan (nor does the plan wait for devices not yet launched).
    """
    total = settings.devices * settings.epochs
    deadline = time.monotonic() + settings.timeout_s
    on_time = [d for i, d in enumerate(collector.devices) if settings.start_delay(i) <= 0]
    origin: float | None = None
    bar = progress_bar(total=total, desc=f"{settings.algorithm} device-epochs", enabled=progress)
    try:
        while not collector.all_done():
            time.sleep(0.5)
            elapsed = time.monotonic() - collector.started
            with collector.lock:
                final_epoch = [
                    i for i, d in enumerate(collector.devices)
                    if collector.latest.get(d, {}).get("epoch", 0) >= settings.epochs - 1
                ]  # fmt: skip
                if origin is None and all(d in collector.latest for d in on_time):
                    origin = elapsed
            if origin is not None and launch is not None:
                for index, process in enumerate(processes):
                    if process is None and elapsed - origin >= settings.start_delay(index):
                        launch(index)
            if driver is not None:
                for index in final_epoch:
                    driver.exempt(index, processes)
                if origin is not None:
                    driver.begin(origin)
                driver.tick(elapsed, processes)
            done = collector.epochs_done()
            bar.update(done - bar.n)
            with collector.lock:
                if len(collector.latest) == settings.devices:
                    bar.set_postfix(maua=f"{collector.maua():.4f}")
            failed = [p for p in processes if p is not None and p.poll() not in (None, *COMPLETED_EXITS)]
            if failed:
                raise RuntimeError(f"{len(failed)} device process(es) failed; see {settings.out / 'logs'}")
            if all(p is not None and p.poll() is not None for p in processes):
                _complete_from_state(settings, collector)
            if time.monotonic() > deadline:
                raise TimeoutError(f"trial did not finish within {settings.timeout_s} s")
        bar.update(collector.epochs_done() - bar.n)
    finally:
        bar.close()
