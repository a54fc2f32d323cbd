"""A device's one config file (TOML): who it is, where the broker is, its data, model and training settings."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge.backends import BACKENDS
from edge.data import PARTITIONS
from edge.knowledge import ExchangeEpochs
from fedwire import DEVICE_ID_PATTERN, HashKind, LogitEncoding, TeacherForm
from fedwire.mqtt import BrokerAddress, Credentials
from models.loss import TeacherGate

# fd and fedavg are the comparison's baselines (edge/fd_client.py, edge/fedavg_client.py).
ALGORITHMS = ("fedcache", "local", "fd", "fedavg")
EVAL_BACKENDS = ("executorch", "onnxruntime")
# Malicious behaviours a device can be given for robustness trials (edge/attacks.py, docs/robustness.md).
ATTACKS = ("fdla", "pcfdla", "fdsa", "label_flip", "adaptive", "hub", "copy")


@dataclass(frozen=True)
class DataConfig:
    """Which shard of which dataset this device holds; every device derives the same partition."""

    dataset: str = "fashion-mnist"
    num_devices: int = 20
    alpha: float = 1.0
    seed: int = 0
    index: int = 0
    shard: str = ""  # a shard .npz written by edge.shard_file (a flashed bundle's); empty: derive it from the dataset
    # edge.data.PARTITIONS: "dirichlet" (ours, seeded by `seed`) or "dirichlet-per-class" (the published
    # FedCache loader's split, each class seeded by its index, so figures compare with published ones).
    partition: str = "dirichlet"

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"data.partition must be one of {PARTITIONS}, got {self.partition!r}")


# [train] settings only the torch backend implements, with their off values. Why one table: a device file
# holds them only when on (so files of other devices stay as they were, and the native device, whose config
# reader rejects keys it does not know, reads them as before), and every layer that starts other backends
# (the device config, the trial, the native device's set-up) refuses them with the same list.
TORCH_ONLY_TRAIN: dict[str, object] = {"bn_recalibration": 0, "teacher_gate": TeacherGate.NONE}
_ALWAYS = object()


def torch_only_settings_on(train: dict[str, Any]) -> list[str]:
    """The names of the torch-only [train] settings `train` (a TrainConfig's fields or a trial's extras) turns on."""
    return [name for name, off in TORCH_ONLY_TRAIN.items() if name in train and train[name] != off]


@dataclass(frozen=True)
class TrainConfig:
    """FedCache's device loss and optimiser; defaults are the public demo's effective values."""

    algorithm: str = "fedcache"
    arch: str = "cnn"
    backend: str = "torch"  # torch | executorch (the .pte training program)
    eval_backend: str = "executorch"  # for executorch devices: executorch | onnxruntime
    artifacts_dir: str = ""  # where exported programs live; empty: <state_dir>/artifacts
    epochs: int = 5
    # Train on at most this many of the shard's samples (0 = all): a fixed class-stratified subset drawn
    # from the split's seed (edge.data.limit_train_samples), so every run of a device keeps the same one.
    max_samples: int = 0
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kd_alpha: float = 1.5
    temperature: float = 3.0
    seed: int = 0
    prefetch_batches: int = 4
    max_outstanding: int = 8
    logit_encoding: LogitEncoding = LogitEncoding.FLOAT16
    # FedCache's teacher: the server's mean of the R neighbours (default) or every neighbour's row, averaged here
    teacher_form: TeacherForm = TeacherForm.MEAN
    eval_every_epochs: int = 1
    # Before each evaluation, recompute every batch-norm layer's running mean and variance over this many of the
    # device's own training samples (0 = off, the running averages training left; at least the shard's count =
    # all of them; TorchTrainer.recalibrate_batchnorm). Torch backend only: an exported program cannot do it.
    bn_recalibration: int = 0
    # FedCache: distil only from teachers whose top class is the sample's label (models.loss.TeacherGate; "none" =
    # the paper's, every teacher). Torch backend only: an exported training program bakes its loss in.
    teacher_gate: TeacherGate = TeacherGate.NONE
    fd_every_batches: int = 0  # FD: upload per-class logits every this many batches; 0 = once per epoch
    # FedCache: upload logits and fetch teachers in every this-many-th epoch only, from the first after the warm-up
    # (1: every epoch, the paper's); the epochs between train on the teachers last received
    # (edge.knowledge.ExchangeEpochs).
    knowledge_every_epochs: int = 1
    # FedCache: send the waiting logits and fetch teachers every this many batches, one message each way for all
    # of them (1: every batch, the paper's). Fewer, larger messages carry the same knowledge in fewer bytes, as
    # each message's topic, envelope and keys are paid once (docs/benchmarks.md §3); teachers are fetched this
    # many batches further ahead, and logits reach the server up to this many batches later.
    knowledge_every_batches: int = 1
    # FedCache: train this many epochs with cross-entropy only before the first exchange (0: from the first epoch,
    # the paper's): a nearly untrained model's logits cost as many bytes as a trained one's and teach little. The
    # prefetch for the first exchanging epoch lands in the last warm-up epoch (edge.knowledge.ExchangeEpochs).
    knowledge_warmup_epochs: int = 0

    @property
    def exchange_epochs(self) -> ExchangeEpochs:
        """The epochs in which a FedCache device exchanges knowledge."""
        return ExchangeEpochs(every=self.knowledge_every_epochs, warmup=self.knowledge_warmup_epochs)


@dataclass(frozen=True)
class ScheduleKnob:
    """One of FedCache's knowledge-schedule settings: its least value, which is also its default (the paper's)."""

    minimum: int
    meaning: str  # what the default means, for error messages


# FedCache's knowledge schedule: one rule checks every knob (check_knowledge_schedule).
KNOWLEDGE_SCHEDULE = {
    "knowledge_every_epochs": ScheduleKnob(1, "every epoch"),
    "knowledge_every_batches": ScheduleKnob(1, "every batch"),
    "knowledge_warmup_epochs": ScheduleKnob(0, "exchange from the first epoch"),
}


def check_knowledge_schedule(value: object, *, algorithm: str, name: str) -> None:
    """Refuse a knowledge-schedule setting (`name`, one of KNOWLEDGE_SCHEDULE) that is not an integer at least its
    minimum, or other than its default for an algorithm that is not FedCache (FD and FedAvg exchange on their own
    schedules): one rule for device files and trial settings."""
    knob = KNOWLEDGE_SCHEDULE[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < knob.minimum:
        raise ValueError(
            f"train.{name} must be an integer >= {knob.minimum} ({knob.minimum} = {knob.meaning}), got {value!r}"
        )
    if value != knob.minimum and algorithm != "fedcache":
        raise ValueError(
            f"train.{name} applies to fedcache devices only; a {algorithm} device exchanges on its own schedule "
            f"(leave it at {knob.minimum})"
        )


@dataclass(frozen=True)
class HashConfig:
    """The frozen encoder that turns samples into hashes; empty `encoder` means the built-in default."""

    encoder: str = ""
    kind: HashKind = HashKind.BINARY
    dim: int = 256
    seed: int = 0


# How the device proves who it is (a provisioned bundle's files: a password file or a client certificate, and
# the CA that signed the broker's certificate); paths are relative to where the device runs, like every path
# of the config. The wire's own credentials type serves as the config section.
SecurityConfig = Credentials


@dataclass(frozen=True)
class AttackConfig:
    """A malicious device's behaviour (edge/attacks.py); an empty `mode` is an honest device."""

    mode: str = ""  # one of ATTACKS
    seed: int = 0
    shift: float = 20.0  # pcfdla: s ~ U(-shift, shift) per batch
    scale: float = 2.0  # fdsa: the vector is multiplied by this (>= 2)
    pull: float = 0.5  # fdsa: how far the swapped top two move towards their mean, in [0, 1)
    fraction: float = 0.5  # label_flip: share of samples whose maximum moves to a wrong class
    target: int = -1  # adaptive: the wrong class mass is pushed onto (-1: label + 1)
    margin: float = 0.1  # adaptive: the label this share of the top-to-mean gap above the old top, the target half
    hub_copies: int = 64  # hub: crafted hashes registered per class besides the device's own samples
    # copy: perturbed copies registered of every public training sample's hash, and the share of a binary
    # hash's bits flipped in each (8 of 256: nearer to the original than its nearest natural neighbour, median
    # 25 bits on FashionMNIST's hashes, and ~16 bits from each other, so not near copies of one another).
    public_copies: int = 8
    copy_flip_share: float = 8 / 256

    def __post_init__(self) -> None:
        if self.mode and self.mode not in ATTACKS:
            raise ValueError(f"attack.mode must be empty (honest) or one of {ATTACKS}, got {self.mode!r}")
        if not self.shift > 0 or self.scale < 2 or not 0 <= self.pull < 1 or not 0 < self.fraction <= 1:
            raise ValueError("attack: shift > 0, scale >= 2, 0 <= pull < 1 and 0 < fraction <= 1 are required")
        if self.target < -1 or not 0 < self.margin < 1 or self.hub_copies < 0:
            raise ValueError("attack: target >= -1, 0 < margin < 1 and hub_copies >= 0 are required")
        if self.public_copies < 0 or not 0 <= self.copy_flip_share <= 1:
            raise ValueError("attack: public_copies >= 0 and 0 <= copy_flip_share <= 1 are required")


ATTACK_KNOBS = tuple(f.name for f in fields(AttackConfig) if f.name not in ("mode", "seed"))


def attack_knobs(raw: dict[str, Any]) -> dict[str, int | float]:
    """An attack's knobs (AttackConfig's fields other than mode and seed), typed and range-checked.

    A trial sets them for all of its attackers, from a command line's KEY=VALUE strings or a trial file's
    numbers; a string is read as the knob's type (that of its default), so `shift=40` and `shift = 40.0` agree.
    Raises ValueError naming the knob, before any device process starts.
    """
    unknown = sorted(set(raw) - set(ATTACK_KNOBS))
    if unknown:
        raise ValueError(f"unknown attack knobs {unknown}; known: {sorted(ATTACK_KNOBS)}")
    kinds: dict[str, type[int] | type[float]] = {
        f.name: int if isinstance(f.default, int) else float for f in fields(AttackConfig) if f.name in ATTACK_KNOBS
    }
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        kind = kinds[name]
        wanted = "an integer" if kind is int else "a finite number"
        try:
            number: object = kind(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        numeric = int if kind is int else int | float
        if isinstance(number, bool) or not isinstance(number, numeric) or not math.isfinite(number):
            raise ValueError(f"attack knob {name}: {value!r} is not {wanted}")
        typed[name] = kind(number)
    AttackConfig(**typed)  # the knobs' own range checks
    return typed


@dataclass(frozen=True)
class DeviceConfig:
    """Everything one device process needs."""

    id: str
    broker: str = "mqtt://127.0.0.1:1883"
    state_dir: str = "edge-state"
    reply_timeout_s: float = 30.0
    # How long a device that finished waits for the broker to acknowledge what it still owes (its last
    # metrics, updates in flight) before it exits with EXIT_UNDELIVERED; long enough for TCP retransmission
    # and a reconnect or two on a lossy link.
    delivery_timeout_s: float = 120.0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self) -> None:
        if not DEVICE_ID_PATTERN.match(self.id):
            raise ValueError(f"device id {self.id!r} must match [A-Za-z0-9_-]{{1,64}}")
        address = BrokerAddress.parse(self.broker)  # a clear error for a bad URL at load time, not at connect
        if self.security.cert_file and not address.tls:
            raise ValueError(f"[security] cert_file needs an mqtts:// broker, not {self.broker}")
        if self.train.backend not in BACKENDS:
            raise ValueError(f"train.backend must be one of {BACKENDS}, got {self.train.backend!r}")
        if self.train.eval_backend not in EVAL_BACKENDS:
            raise ValueError(f"train.eval_backend must be one of {EVAL_BACKENDS}, got {self.train.eval_backend!r}")
        if self.train.algorithm not in ALGORITHMS:
            raise ValueError(f"train.algorithm must be one of {ALGORITHMS}, got {self.train.algorithm!r}")
        if self.train.eval_every_epochs < 1:
            raise ValueError(f"train.eval_every_epochs must be >= 1, got {self.train.eval_every_epochs}")
        for name in KNOWLEDGE_SCHEDULE:
            check_knowledge_schedule(getattr(self.train, name), algorithm=self.train.algorithm, name=name)
        if self.train.max_samples < 0:
            raise ValueError(f"train.max_samples must be >= 0 (0 = every sample), got {self.train.max_samples}")
        recalibration = self.train.bn_recalibration
        if isinstance(recalibration, bool) or not isinstance(recalibration, int) or recalibration < 0:
            raise ValueError(
                f"train.bn_recalibration must be >= 0 (0 = off, N = recompute over N training samples), got "
                f"{recalibration!r}"
            )
        on = torch_only_settings_on(vars(self.train))
        if on and self.train.backend != "torch":
            raise ValueError(
                f"train.{', train.'.join(on)}: implemented for the torch backend only, not for backend "
                f"{self.train.backend!r} (its training program bakes the loss in and keeps the running statistics "
                "inside); turn them off"
            )
        if not 0 <= self.data.index < self.data.num_devices:
            raise ValueError(f"data.index {self.data.index} outside [0, {self.data.num_devices})")
        if self.hash.kind is HashKind.BINARY and self.hash.dim % 8:
            raise ValueError("hash.dim must be a multiple of 8 for binary hashes")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "hash": HashConfig,
    "security": SecurityConfig,
    "attack": AttackConfig,
}
_ENUM_FIELDS: dict[str, type] = {
    "logit_encoding": LogitEncoding,
    "teacher_form": TeacherForm,
    "teacher_gate": TeacherGate,
    "kind": HashKind,
}


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
    values = {key: _ENUM_FIELDS[key](value) if key in _ENUM_FIELDS else value for key, value in raw.items()}
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> DeviceConfig:
    """Build a config from parsed TOML, rejecting unknown keys so typos do not pass silently."""
    device = dict(raw.get("device", {}))
    unknown_sections = set(raw) - {"device", *_SECTIONS}
    if unknown_sections:
        raise ValueError(f"unknown config sections: {sorted(unknown_sections)}")
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    if "id" not in device:
        raise ValueError("[device] needs an id")
    known = {f.name for f in fields(DeviceConfig)} - set(_SECTIONS)
    unknown = set(device) - known
    if unknown:
        raise ValueError(f"unknown keys in [device]: {sorted(unknown)}; known: {sorted(known)}")
    return DeviceConfig(**device, **sections)


def load_config(path: Path) -> DeviceConfig:
    """Read a device config TOML file."""
    with open(path, "rb") as handle:
        return config_from_dict(tomllib.load(handle))


def config_to_toml(config: DeviceConfig) -> str:
    """Serialise a config to TOML text (used by the harness to write device files)."""
    lines = ["[device]"]
    for f in fields(DeviceConfig):
        if f.name not in _SECTIONS:
            lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
    for name in _SECTIONS:
        if name == "attack" and not config.attack.mode:
            continue  # honest devices' files stay as they were
        lines.append(f"\n[{name}]")
        section = getattr(config, name)
        lines += [
            f"{f.name} = {_toml_value(getattr(section, f.name))}"
            for f in fields(section)
            if not (name == "train" and TORCH_ONLY_TRAIN.get(f.name, _ALWAYS) == getattr(section, f.name))
        ]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = [
    "ATTACK_KNOBS",
    "AttackConfig",
    "DataConfig",
    "DeviceConfig",
    "HashConfig",
    "SecurityConfig",
    "TrainConfig",
    "attack_knobs",
    "check_knowledge_schedule",
    "config_from_dict",
    "config_to_toml",
    "load_config",
]
