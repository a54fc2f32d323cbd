"""Trial files: parse and validate a TOML trial spec into the `TrialSettings` and `FaultPlan` a trial runs.

A spec is the whole field trial in one reviewable file (devices, data split, models, connectivity schedule,
faults), so a run can be repeated and a bench scenario is just a file. Every key is checked here, before any
process starts: an unknown key or a bad value fails with the key's full name, not deep inside a device.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from android_harness.faults import FaultPlan
from android_harness.trial import AUTH_MODES, DEFENCE_MODES, SECURITY_MODES, TrialSettings
from edge.config import ALGORITHMS, ATTACKS, KNOWLEDGE_SCHEDULE, attack_knobs, torch_only_settings_on
from edge.data import PARTITIONS
from fedwire import HashKind, LogitEncoding
from fedwire.mqtt import BrokerAddress
from models.loss import TeacherGate

ARCHS = ("resnet8", "resnet16", "resnet20", "cnn", "mobilenet")
BACKENDS = ("torch", "executorch", "native")  # native: the C++ device of edge_native/
DATASETS = ("fashion-mnist", "digits")
TARGETS = ("local", "netns")
REMOTE_TARGETS = ("ssh", "adb")

_SECTIONS = ("trial", "broker", "server", "devices", "faults", "attack")
_TRIAL_KEYS = (
    "description", "dataset", "epochs", "alpha", "partition", "seed", "algorithm", "timeout",
    "hash_kind", "hash_dim", "encoder_kind", "logit_encoding", "bn_recalibration",
    "teacher_gate", "knowledge_every_epochs", "knowledge_every_batches", "knowledge_warmup_epochs",
)  # fmt: skip
_BROKER_KEYS = ("url", "security", "auth")
_SERVER_KEYS = ("neighbours", "defences")
_DEVICE_KEYS = ("count", "arch", "backend", "target", "start_after_s", "outages", "offline_fraction", "attack")
_FAULT_KEYS = ("server_kill_at_s", "server_down_s", "broker_restart_at_s", "loss", "mean_outage_s")


class SpecError(ValueError):
    """A trial file that cannot be run; the message names the offending key."""


@dataclass(frozen=True)
class TrialSpec:
    """A parsed trial file: what to run, the faults to inject (None: no fault plan) and where it came from."""

    settings: TrialSettings
    faults: FaultPlan | None
    source: Path | None = None
    description: str = ""


def load_spec(path: Path, *, out: Path) -> TrialSpec:
    """Read and validate a trial file; the report goes to `out`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the trial file: {exc}") from exc
    try:
        spec = parse_spec(data, out=out)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    return TrialSpec(settings=spec.settings, faults=spec.faults, source=Path(path), description=spec.description)


def parse_spec(data: dict[str, Any], *, out: Path) -> TrialSpec:
    """Validate a decoded trial file (a dict as tomllib returns it) into settings and a fault plan."""
    _check_keys(data, _SECTIONS, where="the top level")
    trial = _table(data, "trial", required=True)
    _check_keys(trial, _TRIAL_KEYS, where="[trial]")
    broker = _table(data, "broker")
    _check_keys(broker, _BROKER_KEYS, where="[broker]")
    server = _table(data, "server")
    _check_keys(server, _SERVER_KEYS, where="[server]")
    faults = _table(data, "faults")
    _check_keys(faults, _FAULT_KEYS, where="[faults]")

    groups = data.get("devices")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise SpecError("[[devices]]: at least one device group is required (a [[devices]] table with a count)")
    devices = [_device_group(group, number=n) for n, group in enumerate(groups, start=1)]
    targets = {g.target for g in devices}
    if len(targets) > 1:
        raise SpecError(f"[[devices]].target: all groups must share one target, got {sorted(targets)}")
    target = targets.pop()
    per_device = [g for g in devices for _ in range(g.count)]
    if all(g.start_after_s > 0 for g in per_device):
        raise SpecError("[[devices]].start_after_s: at least one device must start at 0 (the clock starts with them)")

    url = _opt_str(broker, "url", where="[broker]")
    if url is not None:
        try:
            BrokerAddress.parse(url)
        except ValueError as exc:
            raise SpecError(f"[broker].url: {exc}") from exc
        if target == "netns":
            raise SpecError("[broker].url: devices with target 'netns' need the trial's private broker; drop the url")

    security = _choice(broker, "security", SECURITY_MODES, where="[broker]", default="none")
    auth = _choice(broker, "auth", AUTH_MODES, where="[broker]", default="password")
    if security == "none" and "auth" in broker:
        raise SpecError('[broker].auth: devices authenticate only in a secure trial; add security = "tls"')
    if security != "none" and url is not None:
        raise SpecError(
            f"[broker].security: {security!r} provisions devices on the trial's private broker; credentials for an "
            'external broker ([broker].url) are not supported: drop the url or set security = "none"'
        )

    neighbours = _opt_int(server, "neighbours", where="[server]", minimum=1)
    extra_train: dict[str, object] = {}
    if recalibration := _opt_int(trial, "bn_recalibration", where="[trial]", minimum=0):
        extra_train["bn_recalibration"] = recalibration
    gate = TeacherGate(
        _choice(trial, "teacher_gate", tuple(g.value for g in TeacherGate), where="[trial]", default="none")
    )
    if gate is not TeacherGate.NONE:
        extra_train["teacher_gate"] = gate
    for name, knob in KNOWLEDGE_SCHEDULE.items():
        if (value := _opt_int(trial, name, where="[trial]", minimum=knob.minimum)) not in (None, knob.minimum):
            extra_train[name] = value
    other_backends = sorted({g.backend for g in devices} - {"torch"})
    if (torch_only := torch_only_settings_on(extra_train)) and other_backends:
        raise SpecError(
            f"[trial].{', [trial].'.join(torch_only)}: implemented for the torch backend only; [[devices]] use "
            f"{other_backends}"
        )
    dataset = _choice(trial, "dataset", DATASETS, where="[trial]", default="fashion-mnist")
    algorithm = _choice(trial, "algorithm", ALGORITHMS, where="[trial]", default="fedcache")
    defences = (
        _choice(server, "defences", DEFENCE_MODES, where="[server]", default="off") if "defences" in server else None
    )
    if any(g.attack for g in devices) and algorithm != "fedcache":
        raise SpecError(f"[[devices]].attack: attacks poison FedCache's knowledge; [trial].algorithm is {algorithm!r}")
    attack = _table(data, "attack")
    if attack and not any(g.attack for g in devices):
        raise SpecError("[attack]: its knobs are for attacking devices, and no [[devices]] group has an attack")
    try:
        attack_options = attack_knobs(attack)
    except ValueError as exc:
        raise SpecError(f"[attack]: {exc}") from exc
    settings = TrialSettings(
        out=out,
        dataset=dataset,
        devices=len(per_device),
        epochs=_opt_int(trial, "epochs", where="[trial]", minimum=1) or 3,
        algorithm=algorithm,
        archs=tuple(g.arch for g in per_device),
        backends=tuple(g.backend for g in per_device),
        alpha=_number(trial, "alpha", where="[trial]", default=1.0, positive=True),
        partition=_choice(trial, "partition", PARTITIONS, where="[trial]", default="dirichlet"),
        seed=_opt_int(trial, "seed", where="[trial]", minimum=0) or 0,
        hash_kind=HashKind(
            _choice(trial, "hash_kind", tuple(k.value for k in HashKind), where="[trial]", default="bin")
        ),
        hash_dim=_opt_int(trial, "hash_dim", where="[trial]", minimum=1) or 256,
        encoder_kind=_choice(trial, "encoder_kind", ("conv", "pixel"), where="[trial]", default="conv"),
        logit_encoding=LogitEncoding(
            _choice(trial, "logit_encoding", tuple(e.value for e in LogitEncoding), where="[trial]", default="f16")
        ),
        timeout_s=_number(trial, "timeout", where="[trial]", default=3600.0, positive=True),
        extra_train=extra_train,
        broker_url=url,
        neighbours=neighbours,
        start_after_s=tuple(g.start_after_s for g in per_device) if any(g.start_after_s for g in per_device) else (),
        netns=True if target == "netns" else None,
        security=security,
        auth=auth,
        attacks=tuple(g.attack for g in per_device) if any(g.attack for g in per_device) else (),
        attack_options=attack_options,
        defences=defences,
    )
    plan = _fault_plan(faults, per_device, seed=settings.seed)
    if plan is not None and algorithm == "local":
        raise SpecError("[faults] and device outages need a networked algorithm (the local baseline uses no network)")
    if plan is not None and plan.broker_restart_at_s and url is not None:
        raise SpecError("[faults].broker_restart_at_s: cannot restart an external broker ([broker].url is set)")
    description = _opt_str(trial, "description", where="[trial]") or ""
    return TrialSpec(settings=settings, faults=plan, description=description)


@dataclass(frozen=True)
class _Group:
    count: int
    arch: str
    backend: str
    target: str
    start_after_s: float
    outages: tuple[tuple[float, float], ...]
    offline_fraction: float
    attack: str = ""


def _device_group(group: dict[str, Any], *, number: int) -> _Group:
    where = f"[[devices]] #{number}"
    _check_keys(group, _DEVICE_KEYS, where=where)
    target = group.get("target", "local")
    if target in REMOTE_TARGETS or (isinstance(target, str) and target.split(":")[0] in REMOTE_TARGETS):
        raise SpecError(
            f"{where}.target: {target!r} is a remote device; ssh/adb targets are run with "
            "`python -m android_harness flash`, a trial file runs 'local' or 'netns' devices"
        )
    if target not in TARGETS:
        raise SpecError(f"{where}.target: {target!r} is not one of {list(TARGETS)}")
    count = _opt_int(group, "count", where=where, minimum=1)
    if count is None:
        raise SpecError(f"{where}.count: required (how many devices this group has)")
    outages_raw = group.get("outages", [])
    if not isinstance(outages_raw, list):
        raise SpecError(f"{where}.outages: must be a list of [start_s, length_s] pairs")
    outages = []
    for pair in outages_raw:
        ok = isinstance(pair, list) and len(pair) == 2 and all(_is_number(v) for v in pair)
        if not ok or pair[0] < 0 or pair[1] <= 0:
            raise SpecError(f"{where}.outages: {pair!r} is not a [start_s >= 0, length_s > 0] pair")
        outages.append((float(pair[0]), float(pair[1])))
    fraction = _number(group, "offline_fraction", where=where, default=0.0)
    if not 0 <= fraction < 1:
        raise SpecError(f"{where}.offline_fraction: {fraction} is not in [0, 1)")
    return _Group(
        count=count,
        arch=_choice(group, "arch", ARCHS, where=where, default="cnn"),
        backend=_choice(group, "backend", BACKENDS, where=where, default="torch"),
        target=target,
        start_after_s=_number(group, "start_after_s", where=where, default=0.0, non_negative=True),
        outages=tuple(outages),
        offline_fraction=fraction,
        attack=_choice(group, "attack", ("", *ATTACKS), where=where, default=""),
    )


def _fault_plan(faults: dict[str, Any], per_device: list[_Group], *, seed: int) -> FaultPlan | None:
    """The trial's FaultPlan, or None when the file asks for no fault at all (a steady trial)."""
    outages = tuple((i, start, length) for i, g in enumerate(per_device) for start, length in g.outages)
    fractions = tuple((i, g.offline_fraction) for i, g in enumerate(per_device) if g.offline_fraction > 0)
    kills = _times(faults, "server_kill_at_s")
    restarts = _times(faults, "broker_restart_at_s")
    loss = _number(faults, "loss", where="[faults]", default=0.0)
    if not 0 <= loss < 1:
        raise SpecError(f"[faults].loss: {loss} is not a drop probability in [0, 1)")
    server_down = _number(faults, "server_down_s", where="[faults]", default=5.0, positive=True)
    mean_outage = _number(faults, "mean_outage_s", where="[faults]", default=10.0, positive=True)
    if not (outages or fractions or kills or restarts or loss > 0):
        return None
    return FaultPlan(
        offline_fractions=fractions,
        mean_outage_s=mean_outage,
        outages=outages,
        loss=loss,
        server_kill_at_s=kills,
        server_down_s=server_down,
        broker_restart_at_s=restarts,
        seed=seed,
    )


# ---------------------------------------------------------------- small validators


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], *, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def _table(data: dict[str, Any], name: str, *, required: bool = False) -> dict[str, Any]:
    if name not in data:
        if required:
            raise SpecError(f"[{name}]: this table is required")
        return {}
    value = data[name]
    if not isinstance(value, dict):
        raise SpecError(f"[{name}]: must be a table, got {type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(
    table: dict[str, Any],
    key: str,
    *,
    where: str,
    default: float,
    positive: bool = False,
    non_negative: bool = False,
) -> float:
    value = table.get(key, default)
    if not _is_number(value):
        raise SpecError(f"{where}.{key}: {value!r} is not a number")
    if positive and value <= 0:
        raise SpecError(f"{where}.{key}: {value} must be > 0")
    if non_negative and value < 0:
        raise SpecError(f"{where}.{key}: {value} must be >= 0")
    return float(value)


def _opt_int(table: dict[str, Any], key: str, *, where: str, minimum: int) -> int | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{where}.{key}: {value!r} is not an integer")
    if value < minimum:
        raise SpecError(f"{where}.{key}: {value} must be >= {minimum}")
    return value


def _opt_str(table: dict[str, Any], key: str, *, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise SpecError(f"{where}.{key}: {value!r} is not a string")
    return value


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], *, where: str, default: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise SpecError(f"{where}.{key}: {value!r} is not one of {list(choices)}")
    return str(value)


def _times(faults: dict[str, Any], key: str) -> tuple[float, ...]:
    value = faults.get(key, [])
    if _is_number(value):
        value = [value]
    if not isinstance(value, list) or not all(_is_number(v) and v >= 0 for v in value):
        raise SpecError(f"[faults].{key}: {value!r} is not a list of seconds >= 0")
    return tuple(float(v) for v in value)
