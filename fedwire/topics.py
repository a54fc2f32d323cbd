"""MQTT topic names: one tree per device, so a broker ACL can pin each device to its own topics."""

from __future__ import annotations

from fedwire.constants import DEVICE_ID_PATTERN, REQUEST_KINDS, SERVER_SHARE_GROUP, TOPIC_ROOT, Kind


def up_topic(device: str, kind: Kind) -> str:
    """Where a device publishes a request of one kind."""
    return f"{TOPIC_ROOT}/{device}/up/{kind.value}"


def down_topic(device: str) -> str:
    """Where the server publishes every reply to one device."""
    return f"{TOPIC_ROOT}/{device}/down"


def metrics_topic(device: str) -> str:
    """Where a device reports its own metrics (read by trials and dashboards, not the cache server)."""
    return f"{TOPIC_ROOT}/{device}/metrics"


def server_subscription(group: str = SERVER_SHARE_GROUP) -> str:
    """Shared subscription to every device's requests, so more server processes can split the load."""
    return f"$share/{group}/{TOPIC_ROOT}/+/up/+"


ALL_METRICS = f"{TOPIC_ROOT}/+/metrics"
# Retained "online"/"offline" (the latter as the server's MQTT will): clients can wait for the server.
SERVER_STATUS = f"{TOPIC_ROOT}/_server/status"


def parse_up_topic(topic: str) -> tuple[str, Kind] | None:
    """(device, kind) of a request topic, or None when the topic is not one."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "up" or not DEVICE_ID_PATTERN.match(parts[0]):
        return None
    try:
        kind = Kind(parts[2])
    except ValueError:
        return None
    return (parts[0], kind) if kind in REQUEST_KINDS else None


def device_of_metrics_topic(topic: str) -> str | None:
    """The device a metrics topic belongs to, or None."""
    parts = topic.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == TOPIC_ROOT and parts[3] == "metrics":
        return parts[2]
    return None
