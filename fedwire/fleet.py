"""A project's security directory (CA, broker certificate, CRL, plugin config) and device provisioning/revocation."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedwire.constants import DEVICE_ID_PATTERN, SERVER_SHARE_GROUP
from fedwire.dynsec import (
    DEVICE_ROLE_PREFIX,
    OBSERVER_ROLE,
    SERVER_ROLE,
    DynsecAdmin,
    admin_session,
    device_acls,
    init_config,
    observer_acls,
    plugin_path,
    server_acls,
)
from fedwire.mosquitto import LOOPBACK, BrokerSecurity, MosquittoBroker, is_mosquitto
from fedwire.mqtt import BrokerAddress, Credentials
from fedwire.pki import (
    ensure_ca,
    issue_client_certificate,
    issue_server_certificate,
    load_ca,
    write_crl,
)

log = logging.getLogger(__name__)

SECURITY_DIRNAME = "security"
ADMIN_USERNAME = "fedcache-admin"
# Usernames of services (server workers, observers) start with this; no device id may.
SERVICE_PREFIX = "fedcache-"
AUTH_KINDS = ("password", "certificate")
PASSWORD_BYTES = 16  # 128 random bits per device
BUNDLE_CA = "ca.pem"
BUNDLE_PASSWORD = "password"
BUNDLE_CERT = "device.pem"
BUNDLE_KEY = "device.key"


def _write_secret(path: Path, text: str) -> None:
    """A file only its owner can read, created with that mode (never world-readable for an instant)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")


def check_device_id(device: str) -> None:
    if not DEVICE_ID_PATTERN.match(device):
        raise ValueError(f"device id {device!r} must match [A-Za-z0-9][A-Za-z0-9_-]{{0,63}}")
    if device.startswith(SERVICE_PREFIX):
        raise ValueError(f"device id {device!r} must not start with {SERVICE_PREFIX!r} (reserved for services)")


@dataclass(frozen=True)
class Provisioned:
    """What provisioning handed one device: its credentials (paths inside its own credentials directory)."""

    device: str
    auth: str
    credentials: Credentials


class SecurityDir:
    """Everything secret a deployment keeps on the server side, in one 0700 directory.

    ca.pem/ca.key (the project CA, created once), broker.pem/broker.key (the broker's TLS certificate),
    crl.pem, dynamic-security.json (the plugin's clients, roles and password hashes), secrets/ (passwords
    of the admin and of service identities, 0600) and devices.json (which device authenticates how, its
    certificate serial, whether it is revoked). Device passwords are not kept: only their hashes, in the
    plugin's file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ca_file = self.root / "ca.pem"
        self.broker_cert = self.root / "broker.pem"
        self.broker_key = self.root / "broker.key"
        self.crl_file = self.root / "crl.pem"
        self.dynsec_config = self.root / "dynamic-security.json"
        self.secrets = self.root / "secrets"
        self.registry_file = self.root / "devices.json"
        self.run_file = self.root / "broker.json"
        self.hosts_file = self.root / "broker-hosts.json"

    @classmethod
    def ensure(cls, root: Path, *, hosts: Sequence[str] = ()) -> SecurityDir:
        """Create what is missing; reissue the broker's certificate if it does not name every host in `hosts`."""
        self = cls(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        ca = ensure_ca(self.root)
        named = set(json.loads(self.hosts_file.read_text())) if self.hosts_file.exists() else set()
        wanted = named | set(hosts) | {LOOPBACK, "localhost"}
        if not self.broker_cert.exists() or not wanted <= named:
            issue_server_certificate(ca, cert_path=self.broker_cert, key_path=self.broker_key, hosts=sorted(wanted))
            self.hosts_file.write_text(json.dumps(sorted(wanted)))
        if not self.crl_file.exists():
            write_crl(ca, revoked_serials=[], path=self.crl_file)
        if not self.dynsec_config.exists():
            init_config(self.dynsec_config, admin_username=ADMIN_USERNAME, admin_password=self._secret(ADMIN_USERNAME))
        return self

    # ------------------------------------------------------------ secrets and identities

    def secret_file(self, username: str) -> Path:
        return self.secrets / f"{username}.password"

    def _secret(self, username: str) -> str:
        """The service's password, created on first use."""
        path = self.secret_file(username)
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(PASSWORD_BYTES))
        return path.read_text().strip()

    def credentials(self, username: str) -> Credentials:
        """A service identity's credentials (its password file stays in this directory)."""
        return Credentials(username=username, password_file=str(self.secret_file(username)), ca_file=str(self.ca_file))

    @property
    def admin_credentials(self) -> Credentials:
        return self.credentials(ADMIN_USERNAME)

    def broker_security(self, *, tls_port: int = 0, cert_port: int = 0) -> BrokerSecurity:
        return BrokerSecurity(
            dynsec_config=self.dynsec_config,
            dynsec_plugin=plugin_path(),
            ca_file=self.ca_file,
            cert_file=self.broker_cert,
            key_file=self.broker_key,
            crl_file=self.crl_file,
            run_file=self.run_file,
            tls_port=tls_port,
            cert_port=cert_port,
        )

    # ------------------------------------------------------------ talking to the broker

    def running_broker(self) -> dict[str, Any] | None:
        """The broker serving this directory right now (pid, loopback port), or None."""
        try:
            info: dict[str, Any] = json.loads(self.run_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return info if is_mosquitto(int(info["pid"])) else None

    @contextmanager
    def admin(self) -> Iterator[DynsecAdmin]:
        """A control session with the broker serving this directory, or with a short-lived private one."""
        info = self.running_broker()
        if info is not None:
            with admin_session(BrokerAddress(LOOPBACK, int(info["port"])), self.admin_credentials) as admin:
                yield admin
            return
        offline = replace(self.broker_security(), tls_port=-1, cert_port=-1, run_file=self.root / "offline-broker.json")
        with (
            MosquittoBroker(data_dir=self.root / "offline-broker", persistence=False, security=offline) as broker,
            admin_session(broker.address, self.admin_credentials) as admin,
        ):
            yield admin

    def reload_broker(self, admin: DynsecAdmin) -> None:
        """SIGHUP the running broker (it rereads the CRL and certificates) and wait until it has.

        Mosquitto handles the signal's flag at the top of its main loop, so one command answered after the
        signal proves the reload is done.
        """
        info = self.running_broker()
        if info is None:
            return
        os.kill(int(info["pid"]), signal.SIGHUP)
        admin.list_clients()

    def ensure_service(self, admin: DynsecAdmin, username: str, *, role: str) -> Credentials:
        """A server worker's or an observer's identity (role created on first use), with its password file."""
        if not username.startswith(SERVICE_PREFIX):
            raise ValueError(f"service usernames start with {SERVICE_PREFIX!r}: {username!r}")
        acls = {SERVER_ROLE: server_acls(SERVER_SHARE_GROUP), OBSERVER_ROLE: observer_acls()}[role]
        admin.execute([{"command": "createRole", "rolename": role, "acls": acls}], tolerate=("Role already exists",))
        fresh = not self.secret_file(username).exists()
        password = self._secret(username)
        if fresh or username not in admin.list_clients():
            admin.ensure_client_with(username=username, role=role, password=password)
        return self.credentials(username)

    # ------------------------------------------------------------ devices

    def _registry(self) -> dict[str, dict[str, Any]]:
        if not self.registry_file.exists():
            return {}
        registry: dict[str, dict[str, Any]] = json.loads(self.registry_file.read_text())
        return registry

    def _save_registry(self, registry: dict[str, dict[str, Any]]) -> None:
        temporary = self.registry_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(registry, indent=1, sort_keys=True))
        os.replace(temporary, self.registry_file)

    def devices(self) -> dict[str, dict[str, Any]]:
        """device id -> {auth, serial, revoked}: what was provisioned (no secrets)."""
        return self._registry()

    def provision(self, admin: DynsecAdmin, device: str, *, auth: str, out: Path) -> Provisioned:
        """Give `device` fresh credentials in `out` (its CA certificate and its own password or key, nothing else).

        Provisioning a device again replaces its credentials: the old password stops working and an old
        certificate is revoked.
        """
        check_device_id(device)
        if auth not in AUTH_KINDS:
            raise ValueError(f"auth must be one of {AUTH_KINDS}, got {auth!r}")
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        shutil.copyfile(self.ca_file, out / BUNDLE_CA)
        registry = self._registry()
        old_serial = registry.get(device, {}).get("serial")
        role = DEVICE_ROLE_PREFIX + device
        admin.execute(
            [{"command": "createRole", "rolename": role, "acls": device_acls(device)}],
            tolerate=("Role already exists",),
        )
        serial: int | None = None
        if auth == "password":
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            _write_secret(out / BUNDLE_PASSWORD, password)
            admin.ensure_client_with(username=device, role=role, password=password)
            credentials = Credentials(
                username=device, password_file=str(out / BUNDLE_PASSWORD), ca_file=str(out / BUNDLE_CA)
            )
        else:
            serial = issue_client_certificate(
                load_ca(self.root), common_name=device, cert_path=out / BUNDLE_CERT, key_path=out / BUNDLE_KEY
            )
            # A certificate device authenticates by its certificate; the plugin client (no password) carries its
            # role, and deleting it kicks the live session at revocation.
            admin.ensure_client_with(username=device, role=role, password=None)
            credentials = Credentials(
                ca_file=str(out / BUNDLE_CA), cert_file=str(out / BUNDLE_CERT), key_file=str(out / BUNDLE_KEY)
            )
        old_serials = set(registry.get(device, {}).get("old_serials", []))
        if old_serial is not None:
            old_serials.add(int(old_serial))
        registry[device] = {"auth": auth, "serial": serial, "revoked": False, "old_serials": sorted(old_serials)}
        self._save_registry(registry)
        if old_serial is not None:
            self._write_crl(registry, admin)
        log.info("provisioned %s (%s)", device, auth)
        return Provisioned(device=device, auth=auth, credentials=credentials)

    def revoke(self, admin: DynsecAdmin, device: str) -> None:
        """Revoke `device`: refuse its reconnects (plugin client deleted; certificate on the CRL, broker reloaded)
        and drop its live session. No other session is touched and the broker keeps running."""
        registry = self._registry()
        if device not in registry:
            raise KeyError(f"device {device!r} was never provisioned here")
        registry[device]["revoked"] = True
        self._save_registry(registry)
        if registry[device].get("serial") is not None:
            self._write_crl(registry, admin)  # before the kick, so its reconnect meets the new CRL
        admin.delete_client(device)
        role = DEVICE_ROLE_PREFIX + device
        admin.execute([{"command": "deleteRole", "rolename": role}], tolerate=("Role not found",))
        log.info("revoked %s", device)

    @staticmethod
    def _revoked_serials(registry: dict[str, dict[str, Any]]) -> list[int]:
        serials: set[int] = set()
        for entry in registry.values():
            serials.update(int(s) for s in entry.get("old_serials", []))
            if entry.get("revoked") and entry.get("serial") is not None:
                serials.add(int(entry["serial"]))
        return sorted(serials)

    def _write_crl(self, registry: dict[str, dict[str, Any]], admin: DynsecAdmin) -> None:
        write_crl(load_ca(self.root), revoked_serials=self._revoked_serials(registry), path=self.crl_file)
        self.reload_broker(admin)
