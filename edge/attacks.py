"""Malicious device behaviours for robustness trials: poisoned logit uploads and hub (Sybil) registrations.

A malicious device is an ordinary device process on the real wire: it registers, trains and uploads like
anyone, passes every validation, and only the values it uploads (or the hashes it registers) are crafted.
Every transform works on a whole batch at once (no per-sample Python loop) and draws from its own seeded
generator, so a trial with attackers is repeatable. docs/robustness.md describes each attack and its source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge.config import ATTACKS, AttackConfig
from fedwire import HashKind

# What a hub device's crafted samples upload: a confident vector whose top class is the one after the label.
HUB_LOGIT = 10.0
# Share of a crafted binary hash's bits flipped away from the class centre (near-copies, not one hash).
HUB_FLIP_SHARE = 0.02
# Copies of public samples (`public_copies`): how many per public sample, and the share of a binary hash's bits
# flipped in each (edge.config.AttackConfig says why these).
COPY_COPIES = AttackConfig.public_copies
COPY_FLIP_SHARE = AttackConfig.copy_flip_share
# Attacks that craft registrations (`crafted_registration`) rather than uploads.
REGISTRATION_ATTACKS = ("hub", "copy")
_FLOAT16 = np.dtype("<f2")
_COPY_CHUNK = 1 << 15

LogitAttack = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _ranked(logits: np.ndarray) -> np.ndarray:
    """(n, C) class indices of each row ordered from the highest logit down (ties: lower class first)."""
    return np.argsort(-logits, axis=1, kind="stable")


def fdla(logits: np.ndarray) -> np.ndarray:
    """FDLA: each row's values shifted one rank: the top value goes to the second class, the second's to the
    third, ..., and the lowest to the top class (a cyclic shift of the ranking)."""
    logits = np.asarray(logits, dtype=np.float32)
    order = _ranked(logits)
    values = np.take_along_axis(logits, order, axis=1)
    out = np.empty_like(logits)
    np.put_along_axis(out, np.roll(order, -1, axis=1), values, axis=1)
    return out


def pcfdla(logits: np.ndarray, *, shift: float) -> np.ndarray:
    """PCFDLA with one drawn `shift` s: every class lowered by s except the second-highest, raised by s.

    With s > 0 the second class gains 2s on all others (a large s makes it the top); with s < 0 the top
    class is sharpened instead. The caller draws s ~ U(-20, 20) once per batch.
    """
    logits = np.asarray(logits, dtype=np.float32)
    out = logits - np.float32(shift)
    second = _ranked(logits)[:, 1:2]
    np.put_along_axis(out, second, np.take_along_axis(logits, second, axis=1) + np.float32(shift), axis=1)
    return out


def fdsa(logits: np.ndarray, *, scale: float, pull: float) -> np.ndarray:
    """FDSA: the top two values swapped and pulled towards their mean by `pull`, then the row times `scale`."""
    logits = np.asarray(logits, dtype=np.float32)
    two = _ranked(logits)[:, :2]
    top = np.take_along_axis(logits, two, axis=1)  # (n, 2): highest, second
    mean = top.mean(axis=1, keepdims=True)
    swapped = mean + (1 - np.float32(pull)) * (top[:, ::-1] - mean)
    out = logits.copy()
    np.put_along_axis(out, two, swapped, axis=1)
    return out * np.float32(scale)


def label_flip(logits: np.ndarray, labels: np.ndarray, *, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """On a `fraction` of the rows (drawn), the maximum swapped with a random class other than the label."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    count, classes = logits.shape
    chosen = rng.random(count) < fraction
    wrong = (labels + rng.integers(1, classes, size=count)) % classes
    top = logits.argmax(axis=1)
    rows = np.flatnonzero(chosen)
    out = logits.copy()
    out[rows, wrong[rows]] = logits[rows, top[rows]]
    out[rows, top[rows]] = logits[rows, wrong[rows]]
    return out


def adaptive(logits: np.ndarray, labels: np.ndarray, *, target: int, margin: float) -> np.ndarray:
    """Top class kept equal to the label and the row's L2 norm kept, but the wrong class `target` (label + 1
    where the label is the target, or target -1) raised above every other class, just below the label: the
    label `margin` of the row's top-to-mean gap above the old top, the target half as far.

    It passes every check a server can make on one row (argmax equals the registered label, an ordinary
    norm) while a teacher built from it puts almost as much mass on `target` as on the true class.
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    classes = logits.shape[1]
    wrong = (labels + 1) % classes if target < 0 else np.where(labels == target, (target + 1) % classes, target)
    top = logits.max(axis=1)
    gap = np.maximum(top - logits.mean(axis=1), np.float32(1e-3))
    rows = np.arange(logits.shape[0])
    out = logits.copy()
    out[rows, labels] = top + np.float32(margin) * gap
    out[rows, wrong] = top + np.float32(margin / 2) * gap
    norm = np.linalg.norm(logits, axis=1, keepdims=True)
    scaled: np.ndarray = out * (norm / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12)))
    return scaled.astype(np.float32)


def logit_attack(config: AttackConfig, *, device_index: int = 0) -> LogitAttack | None:
    """The upload transform `(logits, labels) -> logits` a device with this attack applies; None when honest.

    The generator is seeded from (attack seed, device index), so two attackers of one trial differ and a
    rerun repeats. A hub or copy device uploads its own samples honestly (its crafted samples carry the poison).
    """
    if config.mode not in ATTACKS or config.mode in REGISTRATION_ATTACKS:
        return None
    rng = np.random.default_rng([config.seed, device_index])
    mode = config.mode

    def attack(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if mode == "fdla":
            return fdla(logits)
        if mode == "pcfdla":
            return pcfdla(logits, shift=float(rng.uniform(-config.shift, config.shift)))
        if mode == "fdsa":
            return fdsa(logits, scale=config.scale, pull=config.pull)
        if mode == "label_flip":
            return label_flip(logits, labels, rng=rng, fraction=config.fraction)
        return adaptive(logits, labels, target=config.target, margin=config.margin)

    return attack


@dataclass(frozen=True, eq=False)
class HubSamples:
    """Crafted samples a hub device registers after its own: ids continue its local ids."""

    ids: np.ndarray  # uint32 (m,)
    labels: np.ndarray  # uint16 (m,)
    hashes: np.ndarray  # uint8 (m, hash_bytes)
    logits: np.ndarray  # float32 (m, classes): what it uploads for them

    @property
    def count(self) -> int:
        return int(self.ids.size)


def hub_samples(
    hashes: np.ndarray,
    labels: np.ndarray,
    *,
    kind: HashKind,
    classes: int,
    copies: int,
    rng: np.random.Generator,
) -> HubSamples:
    """Per class the device holds, `copies` near-copies of the class centre of its own hashes.

    In a few hundred dimensions a class centre lies nearer to most of the class's samples than they lie to
    each other (hubness), so near-copies of it fill the R slots of honest samples of every device. Binary
    hashes: the per-bit majority with HUB_FLIP_SHARE of the bits flipped at random per copy; float16 hashes:
    the mean plus small Gaussian noise. Their logits put a confident maximum on the class after the label.
    """
    hashes = np.asarray(hashes, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    held = np.unique(labels)
    count = held.size * copies
    crafted_labels = np.repeat(held, copies)
    if count == 0:
        crafted = np.zeros((0, hashes.shape[1]), np.uint8)
    elif kind is HashKind.BINARY:
        bits = np.unpackbits(hashes, axis=1).astype(np.float32)
        sums = np.zeros((classes, bits.shape[1]), np.float32)
        np.add.at(sums, labels, bits)
        centres = sums[held] / np.bincount(labels, minlength=classes)[held, None] >= 0.5
        flips = rng.random((count, bits.shape[1])) < HUB_FLIP_SHARE
        crafted = np.packbits(np.repeat(centres, copies, axis=0) ^ flips, axis=1)
    else:
        features = np.ascontiguousarray(hashes).view(_FLOAT16).astype(np.float32)
        sums = np.zeros((classes, features.shape[1]), np.float32)
        np.add.at(sums, labels, features)
        centres = sums[held] / np.bincount(labels, minlength=classes)[held, None]
        noise = rng.normal(0.0, 0.01 * float(features.std() or 1.0), size=(count, features.shape[1]))
        crafted = (np.repeat(centres, copies, axis=0) + noise).astype(_FLOAT16).view(np.uint8)
    logits = np.zeros((count, classes), np.float32)
    logits[np.arange(count), (crafted_labels + 1) % classes] = HUB_LOGIT
    first = labels.size
    return HubSamples(
        ids=np.arange(first, first + count, dtype=np.uint32),
        labels=crafted_labels.astype(np.uint16),
        hashes=np.ascontiguousarray(crafted, dtype=np.uint8),
        logits=logits,
    )


def public_copies(
    public_hashes: np.ndarray,
    public_labels: np.ndarray,
    *,
    kind: HashKind,
    classes: int,
    copies: int,
    first_id: int,
    rng: np.random.Generator,
    flip_share: float = COPY_FLIP_SHARE,
) -> HubSamples:
    """`copies` perturbed copies of each public sample's hash, labelled with its public label, ids from `first_id`.

    FashionMNIST is public and honest devices' samples are drawn from it, so an attacker that encodes the
    public images with the fleet's encoder holds the very hashes honest devices register. Copies a few bits
    away from each lie nearer to the original than any natural neighbour does: they fill the first `copies`
    of its R slots, whichever mode of its class it lies in. Binary hashes: exactly round(flip_share x bits)
    distinct bits flipped per copy (so copies of one hash lie ~2x that apart, no near copies of each other);
    float16 hashes: Gaussian noise of flip_share x the features' standard deviation. Their logits put a
    confident maximum on the class after the label, as the hub's crafted samples do.
    """
    public_hashes = np.asarray(public_hashes, dtype=np.uint8)
    labels = np.repeat(np.asarray(public_labels, dtype=np.int64), copies)
    count = labels.size
    source = np.repeat(np.arange(public_hashes.shape[0]), copies)
    crafted = np.empty((count, public_hashes.shape[1]), np.uint8)
    if kind is HashKind.BINARY:
        bits = public_hashes.shape[1] * 8
        flips = min(bits, max(0, round(flip_share * bits)))
        for start in range(0, count, _COPY_CHUNK):  # bounded memory: one (chunk, bits) draw at a time
            part = source[start : start + _COPY_CHUNK]
            chosen = rng.random((part.size, bits)).argpartition(flips, axis=1)[:, :flips] if flips else None
            mask = np.zeros((part.size, bits), bool)
            if chosen is not None:
                np.put_along_axis(mask, chosen, True, axis=1)
            crafted[start : start + part.size] = public_hashes[part] ^ np.packbits(mask, axis=1, bitorder="little")
    else:
        features = np.ascontiguousarray(public_hashes).view(_FLOAT16).astype(np.float32)
        sigma = flip_share * float(features.std() or 1.0)
        noisy = features[source] + rng.normal(0.0, sigma, size=(count, features.shape[1])).astype(np.float32)
        crafted = np.ascontiguousarray(noisy.astype(_FLOAT16)).view(np.uint8)
    logits = np.zeros((count, classes), np.float32)
    logits[np.arange(count), (labels + 1) % classes] = HUB_LOGIT
    return HubSamples(
        ids=np.arange(first_id, first_id + count, dtype=np.uint32),
        labels=labels.astype(np.uint16),
        hashes=np.ascontiguousarray(crafted),
        logits=logits,
    )


class CraftedRegistration:
    """A device that registers crafted samples after its own (Registration.extend) and uploads their poisoned
    logits once registered; its own samples it trains and uploads honestly. Subclasses say what to craft."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.samples: HubSamples | None = None

    def _craft(self, hashes: np.ndarray, labels: np.ndarray) -> HubSamples:
        raise NotImplementedError

    def extend(self, hashes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The device's (hashes, labels) with the crafted ones appended (drawn once, the same on a re-register)."""
        if self.samples is None:
            self.samples = self._craft(hashes, labels)
        crafted = self.samples
        return np.concatenate([hashes, crafted.hashes]), np.concatenate([labels, crafted.labels]).astype(np.uint16)


class CopyAttack(CraftedRegistration):
    """A copying hub device: after its own samples it registers `copies` perturbed copies of the hash of every
    public sample (`public_copies`), through its real Registration (`extend`, as `HubAttack`), and uploads
    their poisoned logits once registered; its own samples it trains and uploads honestly.

    `public`: what the attacker holds of the public images (FashionMNIST's training set), their hashes under
    the fleet's encoder and their labels, as it encodes them on its device (`HashEncoder.encode`); asked for
    once, when the device first registers (a device process encodes 60,000 images then, not at start).
    """

    def __init__(
        self,
        *,
        public: Callable[[], tuple[np.ndarray, np.ndarray]],
        classes: int,
        kind: HashKind,
        copies: int = COPY_COPIES,
        flip_share: float = COPY_FLIP_SHARE,
        seed: int = 0,
        device_index: int = 0,
    ) -> None:
        if copies < 0 or not 0 <= flip_share <= 1:
            raise ValueError("copy attack: copies >= 0 and 0 <= flip_share <= 1 are required")
        self.public = public
        self.classes = classes
        self.kind = kind
        self.copies = copies
        self.flip_share = flip_share
        super().__init__(np.random.default_rng([seed, device_index, 2]))

    def _craft(self, hashes: np.ndarray, labels: np.ndarray) -> HubSamples:
        public_hashes, public_labels = self.public()
        return public_copies(
            public_hashes, public_labels, kind=self.kind, classes=self.classes, copies=self.copies,
            first_id=len(labels), rng=self.rng, flip_share=self.flip_share,
        )  # fmt: skip


class HubAttack(CraftedRegistration):
    """A hub device: registers `hub_copies` crafted samples per class after its own (Registration.extend) and
    uploads their poisoned logits once it is registered; its own samples it trains and uploads honestly."""

    def __init__(self, config: AttackConfig, *, classes: int, kind: HashKind, device_index: int = 0) -> None:
        self.config = config
        self.classes = classes
        self.kind = kind
        super().__init__(np.random.default_rng([config.seed, device_index, 1]))

    def _craft(self, hashes: np.ndarray, labels: np.ndarray) -> HubSamples:
        return hub_samples(
            hashes, labels, kind=self.kind, classes=self.classes, copies=self.config.hub_copies, rng=self.rng
        )


def crafted_registration(
    config: AttackConfig,
    *,
    classes: int,
    kind: HashKind,
    device_index: int,
    public: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> CraftedRegistration | None:
    """What a hub or copy device registers besides its own samples; None for every other device.

    `public`: the public images' hashes and labels, asked for only by a copy device (`CopyAttack`)."""
    if config.mode == "hub":
        return HubAttack(config, classes=classes, kind=kind, device_index=device_index)
    if config.mode == "copy":
        return CopyAttack(
            public=public, classes=classes, kind=kind, copies=config.public_copies, flip_share=config.copy_flip_share,
            seed=config.seed, device_index=device_index,
        )  # fmt: skip
    return None


__all__ = [
    "COPY_COPIES",
    "COPY_FLIP_SHARE",
    "REGISTRATION_ATTACKS",
    "CopyAttack",
    "CraftedRegistration",
    "HubAttack",
    "HubSamples",
    "LogitAttack",
    "adaptive",
    "crafted_registration",
    "fdla",
    "fdsa",
    "hub_samples",
    "label_flip",
    "logit_attack",
    "public_copies",
]
