"""Mosquitto's dynamic security plugin: its config file, the roles our topics need, and a control client for it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from fedwire.constants import SERVER_SHARE_GROUP, TOPIC_ROOT
from fedwire.mqtt import BrokerAddress, Credentials, apply_credentials, make_client
from fedwire.topics import ALL_METRICS, SERVER_STATUS, down_topic, metrics_topic

log = logging.getLogger(__name__)

PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
COMMAND_TIMEOUT_S = 10.0
# Role names: one role per device, because the plugin in 2.0.11 substitutes neither %c nor %u in ACL topics.
DEVICE_ROLE_PREFIX = "device-"
SERVER_ROLE = "fedcache-server"
OBSERVER_ROLE = "fedcache-observer"


class DynsecError(RuntimeError):
    """The plugin answered a command with an error (or not at all)."""


def plugin_path() -> str:
    """Path of mosquitto_dynamic_security.so, or a clear error saying how to install it."""
    for path in PLUGIN_PATHS:
        if Path(path).exists():
            return path
    raise FileNotFoundError("Mosquitto's dynamic security plugin is missing: run `make setup` (it installs mosquitto)")


def init_config(path: Path, *, admin_username: str, admin_password: str) -> None:
    """Create the plugin's config file with one admin client, hashed by Mosquitto's own tool.

    `mosquitto_ctrl dynsec init` reads the password from standard input here (never from its arguments,
    which every user on the machine could read in the process list).
    """
    result = subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(path), admin_username],
        input=f"{admin_password}\n{admin_password}\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0 or not path.exists():
        raise DynsecError(f"mosquitto_ctrl dynsec init failed ({result.returncode}): {result.stderr.strip()}")
    os.chmod(path, 0o600)
    # Deny whatever no role grants, delivery included: the tool's default lets every delivery through, so a
    # client that took over another's session would be handed that session's queued messages.
    config = json.loads(path.read_text())
    config["defaultACLAccess"] = dict.fromkeys(
        ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), False
    )
    path.write_text(json.dumps(config, indent=1))


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def device_acls(device: str) -> list[dict[str, Any]]:
    """A device publishes only on its own up tree and metrics topic, and reads only its own down topic."""
    down = down_topic(device)
    return [
        _acl("publishClientSend", f"{TOPIC_ROOT}/{device}/up/#"),
        _acl("publishClientSend", metrics_topic(device)),
        _acl("subscribePattern", down),
        _acl("publishClientReceive", down),
        _acl("unsubscribePattern", down),
    ]


def server_acls(share_group: str = SERVER_SHARE_GROUP) -> list[dict[str, Any]]:
    """The server reads the up tree through its share group (the plugin matches `$share/...` literally),
    writes every down topic and its own status."""
    up = f"{TOPIC_ROOT}/+/up/+"
    return [
        _acl("subscribePattern", f"$share/{share_group}/{up}"),
        _acl("unsubscribePattern", f"$share/{share_group}/{up}"),
        _acl("publishClientReceive", f"{TOPIC_ROOT}/+/up/#"),
        _acl("publishClientSend", f"{TOPIC_ROOT}/+/down"),
        _acl("publishClientSend", SERVER_STATUS),
    ]


def observer_acls() -> list[dict[str, Any]]:
    """Operators' tools (trial watchers, status probes) read metrics and the server status; they publish nothing."""
    return [
        _acl(kind, topic)
        for topic in (ALL_METRICS, SERVER_STATUS)
        for kind in ("subscribePattern", "publishClientReceive", "unsubscribePattern")
    ]


class DynsecAdmin:
    """Sends commands to the plugin over MQTT and waits for their answers.

    The plugin hashes passwords itself (sha512-pbkdf2), so plaintext device passwords only travel to the
    broker over its loopback listener, and no file of ours holds them but the device's own bundle.
    """

    def __init__(self, address: BrokerAddress, credentials: Credentials, *, client_id: str) -> None:
        self._client = make_client(client_id=client_id)
        self._responses: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._subscribed = False
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect = lambda c, *_: c.subscribe(RESPONSE_TOPIC, qos=1)
        apply_credentials(self._client, address, credentials)
        self._client.connect(address.host, address.port)
        self._client.loop_start()
        with self._changed:
            if not self._changed.wait_for(lambda: self._subscribed, timeout=COMMAND_TIMEOUT_S):
                self.close()
                raise DynsecError(f"no answer from the broker's dynamic security plugin on {address.url}")

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        with self._changed:
            self._subscribed = not any(getattr(code, "is_failure", False) for code in codes)
            self._changed.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynamic security response on %s", message.topic)
            return
        with self._changed:
            self._responses.extend(responses)
            self._changed.notify_all()

    def execute(self, commands: Sequence[dict[str, Any]], *, tolerate: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Run commands in order; raise DynsecError on the first error whose text is not in `tolerate`."""
        with self._changed:
            self._responses.clear()
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": list(commands)}), qos=1)
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._responses) >= len(commands), timeout=COMMAND_TIMEOUT_S):
                raise DynsecError(f"the plugin answered {len(self._responses)} of {len(commands)} command(s)")
            responses = list(self._responses)
        for command, response in zip(commands, responses, strict=False):
            error = response.get("error")
            if error and error not in tolerate:
                raise DynsecError(f"{command['command']} failed: {error}")
        return responses

    def ensure_role(self, role: str, acls: Sequence[dict[str, Any]]) -> None:
        """Create the role, or give an existing one exactly these ACLs."""
        self.execute([{"command": "deleteRole", "rolename": role}], tolerate=("Role not found",))
        self.execute([{"command": "createRole", "rolename": role, "acls": list(acls)}])

    def ensure_client_with(self, *, username: str, role: str, password: str | None) -> None:
        """Create the client with its one role, replacing any earlier client of that name (and its session)."""
        self.delete_client(username)
        command: dict[str, Any] = {"command": "createClient", "username": username, "roles": [{"rolename": role}]}
        if password is not None:
            command["password"] = password
        self.execute([command])

    def delete_client(self, username: str) -> bool:
        """Delete a client; the plugin also disconnects its live connection. False if there was none."""
        responses = self.execute([{"command": "deleteClient", "username": username}], tolerate=("Client not found",))
        return "error" not in responses[0]

    def list_clients(self) -> list[str]:
        responses = self.execute([{"command": "listClients", "verbose": False}])
        return list(responses[0].get("data", {}).get("clients", []))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextmanager
def admin_session(address: BrokerAddress, credentials: Credentials) -> Iterator[DynsecAdmin]:
    """A DynsecAdmin for the length of a `with` block."""
    admin = DynsecAdmin(address, credentials, client_id=f"{credentials.username}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        yield admin
    finally:
        admin.close()
