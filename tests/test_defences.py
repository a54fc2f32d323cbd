"""Server defences (broker_server/defences.py) on a real KnowledgeCache with honest and malicious devices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from broker_server.cache import CacheConfig, KnowledgeCache
from broker_server.cached_state import CachedState
from broker_server.defences import DefenceConfig, _capped, _occurrence, near_copies, own_nearest, robust_mean
from broker_server.relations import ClassIndex
from broker_server.state_factory import open_state
from edge.attacks import HubSamples, adaptive, fdla, hub_samples, pcfdla
from fedwire.constants import HashKind

CLASSES = 5
HASH_DIM = 256
R = 16
CONFIG = CacheConfig(classes=CLASSES, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM)
NO_TRUST = DefenceConfig(trust=False)
NO_FILTER = DefenceConfig(trust=False, label_filter=False)


class Fleet:
    """Devices with samples clustered by class (class centre hashes plus 20 % bit noise) and honest logits."""

    def __init__(self, *, devices: int = 20, per_device: int = 60, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.devices = devices
        self.per_device = per_device
        self.centres = self.rng.random((CLASSES, HASH_DIM)) < 0.5
        self.labels = [self.rng.integers(0, CLASSES, size=per_device) for _ in range(devices)]
        self.hashes = [self._hashes(labels) for labels in self.labels]
        # What an honest, well-trained model says: the label clearly on top, some noise.
        self.honest = [
            (3.0 * np.eye(CLASSES)[labels] + self.rng.normal(scale=0.7, size=(per_device, CLASSES))).astype(np.float32)
            for labels in self.labels
        ]

    def _hashes(self, labels: np.ndarray) -> np.ndarray:
        noise = self.rng.random((labels.size, HASH_DIM)) < 0.2
        return np.packbits(self.centres[labels] ^ noise, axis=1)

    def cache(self, defences: DefenceConfig | None = None) -> KnowledgeCache:
        cache = KnowledgeCache(config=CONFIG, neighbours=R)
        if defences is not None:
            cache.defend(defences)
        for index in range(self.devices):
            self.join(cache, index)
        return cache

    def join(self, cache: KnowledgeCache, index: int, *, extra: int = 0) -> None:
        cache.hello(
            device=f"dev{index:02d}", model="cnn", classes=CLASSES, samples=self.per_device + extra,
            hash_kind=HashKind.BINARY, hash_dim=HASH_DIM,
        )  # fmt: skip
        cache.register(
            device=f"dev{index:02d}",
            ids=np.arange(self.per_device, dtype=np.uint32),
            labels=self.labels[index].astype(np.uint16),
            hashes=self.hashes[index],
        )

    def upload(self, cache: KnowledgeCache, index: int, logits: np.ndarray, *, version: int = 1) -> None:
        rows = cache.rows_of(f"dev{index:02d}", np.arange(logits.shape[0], dtype=np.uint32))
        cache.apply_update(rows=rows, logits=logits, version=version)


def _teachers(cache: KnowledgeCache, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teacher means, counts) of `rows`, each less its maximum (what softmax sees: a defended teacher is served
    that way, DefenceConfig.shift_free); every row must have a teacher."""
    teachers = cache.fetch(rows)
    assert np.all(teachers.counts > 0)
    return teachers.logits - teachers.logits.max(axis=1, keepdims=True), teachers.counts


def _honest_rows(cache: KnowledgeCache, attackers: set[int]) -> np.ndarray:
    return np.flatnonzero(~np.isin(cache.sample_devices, sorted(attackers)))


def test_trimmed_mean_and_median_equal_a_per_row_reference() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(300, R, CLASSES)).astype(np.float32)
    mask = rng.random((300, R)) < 0.7
    mask[:, 0] = True
    trimmed = robust_mean(values, mask, aggregation="trimmed", trim=0.25)
    median = robust_mean(values, mask, aggregation="median", trim=0.25)
    for row in range(300):
        kept = np.sort(values[row][mask[row]], axis=0)
        cut = int(np.floor(0.25 * kept.shape[0]))
        assert np.allclose(trimmed[row], kept[cut : kept.shape[0] - cut].mean(axis=0), atol=1e-5)
        assert np.allclose(median[row], np.median(kept, axis=0), atol=1e-5)


def test_trimmed_mean_and_median_are_a_masked_sort_and_a_sum_in_rank_order_to_the_bit() -> None:
    """robust_mean sorts in another layout than its reference and sums over another axis: the bytes must not move
    (teachers and consensus evidence stay what they were)."""
    rng = np.random.default_rng(2)
    big = np.finfo(np.float32).max
    for rows, classes in ((1, 1), (7, 3), (64, 10)):
        values = (rng.normal(size=(rows, R, classes)) * 10.0 ** rng.uniform(-3, 4, size=(rows, R, 1))).astype(
            np.float32
        )
        values[0, 0, 0] = big  # a logit equal to the missing contributors' marker ties with them, harmlessly
        mask = rng.random((rows, R)) < 0.6
        mask[:, 0] = True
        mask[-1] = True  # a row where every neighbour contributes
        before = values.copy()
        for aggregation in ("trimmed", "median"):
            got = robust_mean(values, mask, aggregation=aggregation, trim=0.25)
            for row in range(rows):
                kept = np.sort(values[row][mask[row]], axis=0)
                count = kept.shape[0]
                cut = (count - 1) // 2 if aggregation == "median" else int(np.floor(0.25 * count))
                total = kept[cut]
                for rank in range(cut + 1, count - cut):  # float32, one rank after the other
                    total = total + kept[rank]
                expected = (total / np.float64(count - 2 * cut)).astype(np.float32)
                assert got[row].tobytes() == expected.tobytes(), (aggregation, rows, row)
        assert values.tobytes() == before.tobytes()  # the input is sorted in a copy


def _fleet_with_near_copies() -> tuple[HubSamples, np.ndarray, np.ndarray, np.ndarray]:
    """Fleet(seed=5) with device 0 also registering 24 near copies per class of its own hashes: (hub, hashes,
    labels, owners) of every sample, the crafted ones last."""
    fleet = Fleet(seed=5)
    hub = hub_samples(
        fleet.hashes[0], fleet.labels[0], kind=HashKind.BINARY, classes=CLASSES, copies=24,
        rng=np.random.default_rng(1),
    )  # fmt: skip
    hashes = np.concatenate([*fleet.hashes, hub.hashes])
    labels = np.concatenate([*fleet.labels, hub.labels])
    owners = np.concatenate([np.full(len(y), i) for i, y in enumerate(fleet.labels)] + [np.zeros(hub.count, int)])
    return hub, hashes, labels, owners


def test_near_copies_from_the_class_search_equal_a_search_within_each_device() -> None:
    _hub, hashes, labels, owners = _fleet_with_near_copies()
    resolved = 0
    for label in range(CLASSES):
        members = np.flatnonzero(labels == label)
        own, devices = hashes[members], owners[members]
        first = ClassIndex(own, kind=HashKind.BINARY, exact=True).candidates(R + 1)
        found = (first.positions >= 0) & (devices[np.maximum(first.positions, 0)] == devices[:, None])
        resolved += int(found.any(axis=1).sum())
        assert not found.any(axis=1).all()  # some samples still need their device's own search
        for ratio in (0.35, 0.7, 0.9, 1.0):  # the wider ratios flag real samples too: their distances must agree
            plain = near_copies(own, devices, kind=HashKind.BINARY, ratio=ratio)
            assert plain.any()
            fast = near_copies(own, devices, kind=HashKind.BINARY, ratio=ratio, candidates=first)
            assert np.array_equal(fast, plain), ratio
    assert resolved > 0  # and some were answered by the class's search


@pytest.mark.parametrize("kind", [HashKind.BINARY, HashKind.FLOAT16])
def test_own_nearest_and_the_searchs_distances_equal_distances_computed_pair_by_pair(kind: HashKind) -> None:
    rng = np.random.default_rng(5)
    owners = rng.integers(0, 7, size=300)
    owners[-1] = 7  # a device with one sample has no nearest other: inf
    if kind is HashKind.BINARY:
        hashes = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
        hashes[10], owners[11] = hashes[11], owners[10]  # duplicates are other samples, at distance 0
        bits = np.unpackbits(hashes, axis=1).astype(np.int64)
        pairwise = np.abs(bits[:, None, :] - bits[None, :, :]).sum(axis=2).astype(np.float64)
    else:
        values = rng.normal(size=(300, 16)).astype(np.float16)
        hashes = values.view(np.uint8)
        x = values.astype(np.float64)
        pairwise = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    same = owners[:, None] == owners[None, :]
    np.fill_diagonal(same, False)
    expected = np.where(same, pairwise, np.inf).min(axis=1)
    candidates = ClassIndex(hashes, kind=kind, exact=True).candidates(R + 1)
    kept = candidates.positions >= 0
    measured = pairwise[np.arange(300)[:, None], np.maximum(candidates.positions, 0)]
    assert not (candidates.positions == np.arange(300)[:, None]).any()  # itself dropped
    assert np.allclose(candidates.distances[kept], measured[kept], atol=1e-3)
    assert np.isinf(candidates.distances[~kept]).all()
    for given in (None, candidates):
        nearest = own_nearest(hashes, owners, kind=kind, candidates=given)
        assert np.isinf(nearest[-1]) and np.allclose(nearest[:-1], expected[:-1], atol=1e-3)
    if kind is HashKind.BINARY:
        assert nearest[10] == nearest[11] == 0.0


@pytest.mark.parametrize("width", [1, 17, 64, 65, 300])
def test_occurrence_counts_the_earlier_equal_keys_of_each_row(width: int) -> None:
    """Both ways `_occurrence` counts (column by column for neighbour lists, by sorting for wide rows)."""
    keys = np.random.default_rng(width).integers(-1, 7, size=(40, width))
    expected = np.array([[int((row[:column] == row[column]).sum()) for column in range(width)] for row in keys])
    assert np.array_equal(_occurrence(keys), expected)


def test_the_cap_drops_exactly_the_entries_past_it_of_other_devices() -> None:
    rng = np.random.default_rng(3)
    rows, width, cap = 400, 17, 3
    owners = rng.integers(0, 6, size=500)
    candidates = rng.integers(-1, 500, size=(rows, width))
    valid = (candidates >= 0) & (rng.random((rows, width)) < 0.9)
    rows_owners = rng.integers(0, 6, size=rows)
    binding, capped = _capped(candidates, valid, rows_owners=rows_owners, owners=owners, cap=cap)
    after = valid.copy()
    after[binding] = capped
    for row in range(rows):
        seen: dict[int, int] = {}
        for column in range(width):
            device = int(owners[candidates[row, column]])
            keep = bool(valid[row, column])
            if keep and device != rows_owners[row]:
                keep = seen.get(device, 0) < cap
                seen[device] = seen.get(device, 0) + 1
            assert after[row, column] == keep, (row, column)
    assert 0 < binding.size < rows  # the cap bound some rows, not all


def test_fetch_counts_follow_trust_and_label_changes_as_computed_from_scratch() -> None:
    """The defences keep per-row contributor flags between fetches: after every change of trust or of a row's
    argmax, a fetch must count exactly the neighbours a from-scratch evaluation of both counts."""
    fleet = Fleet(seed=11)
    cache = fleet.cache(DefenceConfig(trust_every=1))
    assert cache.defences is not None
    liar = 4
    rows = np.arange(cache.size)

    def expected() -> np.ndarray:
        trusted = cache.defences.trusted(fleet.devices)  # type: ignore[union-attr]
        table = cache.relations.table  # type: ignore[union-attr]
        safe = np.maximum(table, 0)
        usable = (
            (cache.versions >= 0)
            & trusted[cache.sample_devices]
            & (cache.knowledge.argmax(axis=1) == cache.labels)
        )  # fmt: skip
        return ((table >= 0) & usable[safe]).sum(axis=1)

    trusted_seen = set()
    for version, lying in enumerate((False, True, True, False, False, False), start=1):
        for index in range(fleet.devices):
            logits = fleet.honest[index]
            if index == liar and lying:  # two thirds of its rows contradict their labels, a third pass the filter
                logits = np.where((np.arange(logits.shape[0]) % 3 > 0)[:, None], fdla(logits), logits)
            fleet.upload(cache, index, logits, version=version)
            if index % 7 == 0:
                assert np.array_equal(cache.fetch(rows).counts, expected())
        trusted_seen.add(bool(cache.defences.trusted(fleet.devices)[liar]))
        assert np.array_equal(cache.fetch(rows).counts, expected())
    assert trusted_seen == {True, False}  # the liar's gate closed (and the test saw both states)


def test_pcfdla_pulls_the_mean_away_from_the_honest_consensus_and_the_defended_teacher_stays() -> None:
    fleet = Fleet()
    attackers = {3, 8, 13, 18}  # 4 of 20
    honest_plain, honest_defended = fleet.cache(), fleet.cache(NO_TRUST)
    plain, defended = fleet.cache(), fleet.cache(NO_TRUST)  # robust aggregation and caps alone, no trust
    for index in range(fleet.devices):
        logits = fleet.honest[index]
        if index in attackers:
            logits = _pcfdla_batches(logits, np.random.default_rng(index))
        for cache, upload in ((honest_plain, fleet.honest[index]), (honest_defended, fleet.honest[index])):
            fleet.upload(cache, index, upload)
        for cache in (plain, defended):
            fleet.upload(cache, index, logits)
    rows = _honest_rows(plain, attackers)
    truth, _ = _teachers(honest_plain, rows)
    poisoned, _ = _teachers(plain, rows)
    robust, _ = _teachers(defended, rows)
    unpoisoned, _ = _teachers(honest_defended, rows)
    poisoned_error = np.abs(poisoned - truth).mean()
    assert poisoned_error > 0.5  # the shapes of logits of a few units pulled by half a unit or more on average
    assert np.abs(robust - unpoisoned).mean() < poisoned_error / 5  # the attack barely moves the robust teacher
    assert np.abs(robust - truth).mean() < poisoned_error / 3  # which stays near the honest mean
    labels = plain.labels[rows]
    assert (robust.argmax(axis=1) == labels).mean() > 0.99
    assert (poisoned.argmax(axis=1) == labels).mean() < 0.95


def test_with_8_of_20_shifting_by_up_to_100_the_shift_free_teacher_keeps_the_honest_shape() -> None:
    """PCFDLA at the bench's strength (s ~ U(-100, 100) per batch) from 8 of 20 devices, trust off: more
    shifted contributors reach a row than the trim cuts. Compared as each contributor's shape (less its own
    maximum) the teacher stays the honest one; compared as raw values it does not."""
    fleet = Fleet()
    attackers = {1, 3, 6, 8, 11, 13, 16, 18}
    honest = fleet.cache(NO_TRUST)
    shapes, values = fleet.cache(NO_TRUST), fleet.cache(DefenceConfig(trust=False, shift_free=False))
    for index in range(fleet.devices):
        logits = fleet.honest[index]
        fleet.upload(honest, index, logits)
        if index in attackers:
            logits = _pcfdla_batches(logits, np.random.default_rng(index), shift=100.0)
        fleet.upload(shapes, index, logits)
        fleet.upload(values, index, logits)
    rows = _honest_rows(honest, attackers)
    truth = _softmax_at(_teachers(honest, rows)[0], 3.0)
    distance = {
        name: 0.5 * np.abs(_softmax_at(_teachers(cache, rows)[0], 3.0) - truth).sum(axis=1)
        for name, cache in (("shapes", shapes), ("values", values))
    }
    assert np.percentile(distance["values"], 95) > 0.25  # raw values: a quarter of the mass moved on 5 % of rows
    assert np.percentile(distance["shapes"], 95) < 0.1
    assert distance["shapes"].mean() < distance["values"].mean() / 3


def _softmax_at(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
    distribution: np.ndarray = scaled / scaled.sum(axis=1, keepdims=True)
    return distribution


def _pcfdla_batches(logits: np.ndarray, rng: np.random.Generator, batch: int = 8, *, shift: float = 20.0) -> np.ndarray:
    """PCFDLA as a device applies it: one s ~ U(-shift, shift) per batch of `batch` rows."""
    return np.concatenate(
        [pcfdla(logits[i : i + batch], shift=float(rng.uniform(-shift, shift))) for i in range(0, len(logits), batch)]
    )


def test_without_attack_the_defended_teacher_stays_close_to_the_plain_one() -> None:
    fleet = Fleet(seed=2)
    plain, defended = fleet.cache(), fleet.cache(DefenceConfig())
    for index in range(fleet.devices):
        fleet.upload(plain, index, fleet.honest[index])
        fleet.upload(defended, index, fleet.honest[index])
    rows = np.arange(plain.size)
    mean, _counts = _teachers(plain, rows)
    robust, robust_counts = _teachers(defended, rows)
    assert np.array_equal(robust.argmax(axis=1), mean.argmax(axis=1))
    assert np.abs(robust - mean).mean() < 0.2
    assert robust_counts.min() >= R - DefenceConfig().refill_slack  # caps left every list nearly full
    assert defended.defences is not None
    assert np.all(defended.defences.trust(fleet.devices) == 1.0)  # no honest device distrusted


def test_caps_bound_every_other_device_to_its_share_of_each_samples_slots() -> None:
    fleet = Fleet(devices=6, per_device=200, seed=3)
    cache = fleet.cache(DefenceConfig(device_cap=3))
    cache.refresh_relations()
    table = cache.relations.table
    owners = cache.sample_devices
    neighbour_owners = np.where(table >= 0, owners[np.maximum(table, 0)], -1)
    for device in range(fleet.devices):
        held = ((neighbour_owners == device) & (owners[:, None] != device)).sum(axis=1)
        assert held.max() <= 3
    plain = fleet.cache()
    plain.refresh_relations()
    plain_owners = np.where(plain.relations.table >= 0, owners[np.maximum(plain.relations.table, 0)], -1)
    most = max(((plain_owners == d) & (owners[:, None] != d)).sum(axis=1).max() for d in range(fleet.devices))
    assert most > 3  # without the cap some device holds more: the cap did something
    assert (table >= 0).sum(axis=1).min() >= R - DefenceConfig().refill_slack


def test_hub_hashes_take_honest_slots_without_defences_and_are_flagged_and_capped_with_them() -> None:
    fleet = Fleet(devices=10, per_device=120, seed=4)
    attacker = 9
    hub = hub_samples(
        fleet.hashes[attacker], fleet.labels[attacker], kind=HashKind.BINARY, classes=CLASSES, copies=32,
        rng=np.random.default_rng(5),
    )  # fmt: skip
    owners = None
    holdings = {}
    for name, defences in (("plain", None), ("defended", DefenceConfig())):
        cache = KnowledgeCache(config=CONFIG, neighbours=R)
        if defences is not None:
            cache.defend(defences)
        for index in range(fleet.devices):
            fleet.join(cache, index, extra=hub.count if index == attacker else 0)
        cache.register(device=f"dev{attacker:02d}", ids=hub.ids, labels=hub.labels, hashes=hub.hashes)
        cache.refresh_relations()
        owners = cache.sample_devices
        table = cache.relations.table
        honest = np.flatnonzero(owners != attacker)
        holdings[name] = ((table[honest] >= 0) & (owners[np.maximum(table[honest], 0)] == attacker)).sum(axis=1)
        if defences is not None:
            assert cache.defences is not None
            flags = cache.defences.hub_flags(cache.size)
            crafted = cache.rows_of(f"dev{attacker:02d}", hub.ids)
            real = np.setdiff1d(np.arange(cache.size), crafted)
            assert flags[crafted].mean() >= 0.9
            assert flags[real].mean() <= 0.01
            assert not np.isin(table, crafted[flags[crafted]]).any()  # a flagged hub is nobody's neighbour
    assert np.median(holdings["plain"]) >= R / 2  # the threat is real: half the slots or more
    assert holdings["defended"].max() <= DefenceConfig().device_cap


def test_near_copies_of_one_devices_hashes_are_flagged_and_real_samples_are_not() -> None:
    hub, hashes, labels, owners = _fleet_with_near_copies()
    crafted = np.zeros(labels.size, bool)
    crafted[-hub.count :] = True
    flagged = np.zeros(labels.size, bool)
    for label in range(CLASSES):
        members = np.flatnonzero(labels == label)
        flagged[members] = near_copies(hashes[members], owners[members], kind=HashKind.BINARY, ratio=0.35)
    assert flagged[crafted].mean() >= 0.9 and flagged[~crafted].mean() <= 0.01
    assert not near_copies(hashes, owners, kind=HashKind.BINARY, ratio=0.0).any()  # 0: off


def test_quota_keeps_a_devices_samples_beyond_its_share_of_a_class_out_of_every_list() -> None:
    fleet = Fleet(devices=4, per_device=40, seed=6)
    cache = fleet.cache(DefenceConfig(class_share=0.25, quota_floor=8, hub_factor=0))
    flood = 400  # a device floods class 0 with near-copies of real class-0 samples
    hashes = np.packbits(fleet.centres[np.zeros(flood, int)] ^ (fleet.rng.random((flood, HASH_DIM)) < 0.2), axis=1)
    cache.hello(
        device="flood", model="cnn", classes=CLASSES, samples=flood, hash_kind=HashKind.BINARY, hash_dim=HASH_DIM
    )
    cache.register(
        device="flood", ids=np.arange(flood, dtype=np.uint32), labels=np.zeros(flood, np.uint16), hashes=hashes
    )
    for index in range(fleet.devices):
        fleet.upload(cache, index, fleet.honest[index])
    rows = cache.rows_of("flood", np.arange(flood, dtype=np.uint32))
    cache.apply_update(rows=rows, logits=np.tile(np.eye(CLASSES, dtype=np.float32)[0], (flood, 1)), version=1)
    class_size = int((cache.labels == 0).sum())
    quota = max(8, int(np.ceil(0.25 * class_size)))
    listed = np.unique(cache.relations.table[cache.relations.table >= 0])
    assert np.isin(rows[:quota], listed).any()
    assert not np.isin(rows[quota:], listed).any()  # past the quota: registered, taught, never a neighbour
    assert cache.fetch(rows[quota:]).counts.min() > 0


def test_trust_falls_for_a_device_whose_uploads_disagree_with_its_labels_and_its_knowledge_stops_counting() -> None:
    fleet = Fleet(seed=7)
    cache = fleet.cache(DefenceConfig(label_filter=False))  # the trust gate alone (the filter: the next test)
    liar = 5
    for index in range(fleet.devices):
        fleet.upload(cache, index, fdla(fleet.honest[index]) if index == liar else fleet.honest[index])
    assert cache.defences is not None
    trust = cache.defences.trust(fleet.devices)
    assert trust[liar] == 0.0
    assert np.all(np.delete(trust, liar) == 1.0)
    report = cache.defences.describe([f"dev{i:02d}" for i in range(fleet.devices)], owners=cache.sample_devices)
    assert report["devices"]["dev05"]["label_agreement"] < 0.1 < 0.9 < report["devices"]["dev00"]["label_agreement"]
    # The liar's rows are nobody's contributors any more: fetched counts equal its neighbours from others.
    rows = np.arange(cache.size)
    table = cache.relations.table[rows]
    from_others = ((table >= 0) & (cache.sample_devices[np.maximum(table, 0)] != liar)).sum(axis=1)
    assert np.array_equal(cache.fetch(rows).counts, from_others)


def test_contributors_contradicting_their_own_label_teach_no_one_and_a_row_left_without_any_has_no_teacher() -> None:
    fleet = Fleet(seed=4)
    filtered, unfiltered = fleet.cache(DefenceConfig(trust=False)), fleet.cache(NO_FILTER)
    uploads = []
    for index in range(fleet.devices):
        logits = fleet.honest[index].copy()
        wrong = np.arange(logits.shape[0]) % 3 == 0  # a third of every device's rows argue for another class
        logits[wrong] = 5.0 * np.eye(CLASSES)[(fleet.labels[index][wrong] + 1) % CLASSES]
        uploads.append(logits)
        for cache in (filtered, unfiltered):
            fleet.upload(cache, index, logits)
    knowledge = np.concatenate(uploads)  # rows in registration order, device by device
    consistent = knowledge.argmax(axis=1) == filtered.labels
    rows = np.arange(filtered.size)
    table = filtered.relations.table[rows]
    present = table >= 0
    expected = (present & consistent[np.maximum(table, 0)]).sum(axis=1)
    teachers = filtered.fetch(rows)
    assert np.array_equal(teachers.counts, expected) and expected.min() < R
    assert np.array_equal(unfiltered.fetch(rows).counts, present.sum(axis=1))
    taught = teachers.counts > 0
    assert (teachers.logits.argmax(axis=1) == filtered.labels[rows][taught]).all()
    # A row whose every neighbour contradicts the label: no teacher at all (the device trains on its label).
    for index in range(fleet.devices):
        mask = fleet.labels[index] == 0
        uploads[index][mask] = 5.0 * np.eye(CLASSES)[1]
        fleet.upload(filtered, index, uploads[index], version=2)
    zeros = np.flatnonzero(filtered.labels == 0)
    assert np.all(filtered.fetch(zeros).counts == 0)


def test_trust_ranks_adaptive_and_pcfdla_attackers_below_every_honest_device() -> None:
    fleet = Fleet(seed=8)
    cache = fleet.cache(DefenceConfig())
    sneaky, loud = {2, 11}, {6, 15}
    rng = np.random.default_rng(9)
    for round_ in range(1, 4):  # a few epochs
        for index in range(fleet.devices):
            logits = fleet.honest[index]
            if index in sneaky:
                logits = adaptive(logits, fleet.labels[index], target=-1, margin=0.1)
            elif index in loud:
                logits = _pcfdla_batches(logits, rng)
            fleet.upload(cache, index, logits, version=round_)
    assert cache.defences is not None
    _, deviation = cache.defences.scores(fleet.devices)  # how far below the fleet's median, in deviations
    honest = [i for i in range(fleet.devices) if i not in sneaky | loud]
    assert min(deviation[sorted(sneaky | loud)]) > max(deviation[honest])
    trust = cache.defences.trust(fleet.devices)
    assert np.all(trust[honest] == 1.0) and np.all(trust[sorted(sneaky | loud)] == 0.0)


@pytest.mark.parametrize("target", [-1, 3])  # label + 1, or one fixed wrong class for every label
def test_runner_up_excess_ranks_adaptive_attackers_below_every_honest_device_by_their_second_upload(
    target: int,
) -> None:
    """Adaptive rows keep the label on top and agree with the consensus about as well as honest ones; what
    gives them away is the mass their runner-up carries above the consensus's, whichever wrong class it is."""
    fleet = Fleet(seed=21)
    cache = fleet.cache(DefenceConfig())
    sneaky = [1, 7, 12, 18]
    honest = [i for i in range(fleet.devices) if i not in sneaky]
    for round_ in (1, 2):
        for index in range(fleet.devices):
            logits = fleet.honest[index]
            if index in sneaky:
                logits = adaptive(logits, fleet.labels[index], target=target, margin=0.1)
            fleet.upload(cache, index, logits, version=round_)
    assert cache.defences is not None
    report = cache.defences.describe([f"dev{i:02d}" for i in range(fleet.devices)], owners=cache.sample_devices)
    entries = list(report["devices"].values())
    assert all(entries[i]["label_agreement"] == 1.0 for i in sneaky)  # the label filter lets them through
    excess = [entries[i]["runner_up_excess"] for i in range(fleet.devices)]
    assert min(excess[i] for i in sneaky) > 2 * max(excess[i] for i in honest)
    _, deviation = cache.defences.scores(fleet.devices)
    assert deviation[sneaky].min() > deviation[honest].max()
    trust = cache.defences.trust(fleet.devices)
    assert np.all(trust[sneaky] == 0.0) and np.all(trust[honest] == 1.0)


def test_without_attack_the_runner_up_excess_flags_no_one_over_epochs() -> None:
    """Fresh noise every epoch, no attacker: every device's excess deviation stays below trust_z_low."""
    fleet = Fleet(seed=5)
    cache = fleet.cache(DefenceConfig())
    rng = np.random.default_rng(6)
    for round_ in range(1, 5):
        for index in range(fleet.devices):
            noisy = fleet.honest[index] + rng.normal(scale=0.3, size=fleet.honest[index].shape)
            fleet.upload(cache, index, noisy.astype(np.float32), version=round_)
    assert cache.defences is not None
    _, deviation = cache.defences.scores(fleet.devices)
    assert deviation.max() < DefenceConfig().trust_z_low
    assert np.all(cache.defences.trust(fleet.devices) == 1.0)


def _stored_fleet(directory: Path, fleet: Fleet, *, liar: int) -> CachedState:
    """A durable state in `directory` where every device registered and uploaded once (`liar` with FDLA)."""
    state = open_state(directory, config=CONFIG, neighbours=R)
    assert isinstance(state, CachedState)
    for index in range(fleet.devices):
        name = f"dev{index:02d}"
        state.hello(
            device=name, model="cnn", classes=CLASSES, samples=fleet.per_device, hash_kind=HashKind.BINARY,
            hash_dim=HASH_DIM,
        )  # fmt: skip
        ids = np.arange(fleet.per_device, dtype=np.uint32)
        state.register(device=name, ids=ids, labels=fleet.labels[index].astype(np.uint16), hashes=fleet.hashes[index])
        logits = fdla(fleet.honest[index]) if index == liar else fleet.honest[index]
        state.apply_update(rows=state.rows(name, ids), logits=logits, version=1)
    state.commit()
    return state


def test_evidence_and_trust_come_back_after_a_restart(tmp_path: Path) -> None:
    """Trust is derived from the knowledge the store keeps, so a restarted server trusts as before."""
    fleet = Fleet(seed=10)
    liar = 4
    state = _stored_fleet(tmp_path / "state", fleet, liar=liar)
    before = state.cache.defend(DefenceConfig()).trust(fleet.devices).copy()
    rows = np.arange(state.cache.size)
    served = state.cache.fetch(rows).logits
    state.close()
    assert before[liar] == 0.0 and np.all(np.delete(before, liar) == 1.0)
    again = open_state(tmp_path / "state", config=CONFIG, neighbours=R)
    assert isinstance(again, CachedState)
    after = again.cache.defend(DefenceConfig()).trust(fleet.devices)  # evidence rebuilt from stored knowledge
    assert np.array_equal(after, before)
    assert np.array_equal(again.cache.fetch(rows).logits, served)  # each row's shift-free anchor with it
    again.close()


def test_evidence_rebuilt_at_start_up_compares_every_row_with_its_consensus() -> None:
    """Uploads sample their consensus rows (serving stays cheap); a rebuild has no such excuse: a device's
    consensus agreement after a restart rests on all its rows, not on the 16 of one large part."""
    fleet = Fleet(seed=3)
    cache = fleet.cache()
    for index in range(fleet.devices):
        fleet.upload(cache, index, fleet.honest[index])
    defences = cache.defend(DefenceConfig())  # what a restart with defences does: evidence from stored knowledge
    report = defences.describe([f"dev{i:02d}" for i in range(fleet.devices)], owners=cache.sample_devices)
    rows = [entry["consensus_rows"] for entry in report["devices"].values()]
    assert min(rows) >= 0.9 * fleet.per_device and sum(rows) > DefenceConfig().consensus_rows


def test_inspect_reports_trust_without_changing_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from broker_server.inspection import main as inspect

    fleet = Fleet(seed=13)
    _stored_fleet(tmp_path / "state", fleet, liar=9).close()
    args = ["--data-dir", str(tmp_path), "--json"]
    assert inspect(args, prog="inspect", default_data_dir=tmp_path) == 0
    before = json.loads(capsys.readouterr().out)
    assert "defences" not in before  # only when asked: it rebuilds relations
    assert inspect([*args, "--trust"], prog="inspect", default_data_dir=tmp_path) == 0
    report = json.loads(capsys.readouterr().out)
    trust = {name: entry["trust"] for name, entry in report["defences"]["devices"].items()}
    assert trust.pop("dev09") == 0.0 and set(trust.values()) == {1.0}
    assert inspect(args, prog="inspect", default_data_dir=tmp_path) == 0
    assert json.loads(capsys.readouterr().out) == before  # versions and logit digests unchanged


@pytest.mark.parametrize("raw", [False, True])
def test_defences_off_leave_the_fetch_as_it_was(raw: bool) -> None:
    fleet = Fleet(seed=11)
    cache = fleet.cache()
    for index in range(fleet.devices):
        fleet.upload(cache, index, fleet.honest[index])
    assert cache.defences is None
    rows = np.arange(cache.size)
    teachers = cache.fetch(rows, raw=raw)
    table = cache.relations.table
    assert np.array_equal(teachers.counts, (table >= 0).sum(axis=1))


def test_trust_is_exported_to_prometheus_per_device() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from broker_server.defences import DefenceCollector

    fleet = Fleet(seed=12)
    cache = fleet.cache(DefenceConfig())
    for index in range(fleet.devices):
        fleet.upload(cache, index, fdla(fleet.honest[index]) if index == 7 else fleet.honest[index])
    registry = CollectorRegistry()
    registry.register(DefenceCollector(cache))
    text = generate_latest(registry).decode()
    assert 'fedcache_device_trust{device="dev07"} 0.0' in text
    assert 'fedcache_device_trust{device="dev00"} 1.0' in text
    assert 'fedcache_device_runner_up_excess{device="dev19"}' in text  # the last to upload: a consensus
    assert "fedcache_hub_samples 0.0" in text


def test_a_small_trial_with_attackers_and_defences_finishes_and_reports_honest_maua(tmp_path: Path) -> None:
    """Six digits devices, the last two uploading PCFDLA logits over the real wire, the server defended."""
    from android_harness.trial import TrialSettings, run_trial

    attacks = ("", "", "", "", "pcfdla", "pcfdla")
    settings = TrialSettings(
        out=tmp_path, dataset="digits", devices=6, epochs=2, attacks=attacks, defences="on", timeout_s=300
    )
    report = run_trial(settings, progress=False)
    assert report["attackers"] == ["dev004", "dev005"]
    honest = [d["accuracy"] for d in report["devices"] if d["id"] not in report["attackers"]]
    assert report["maua_honest"] == pytest.approx(sum(honest) / 4)
    assert report["maua_honest"] > 0.3  # ten classes: chance is 0.1 (two epochs of small shards)
    assert all(ok["ok"] for ok in report["invariants"].values()), report["invariants"]
    assert set(report["defences"]["devices"]) == {f"dev00{i}" for i in range(6)}  # trust of every device
    # The attack went over the wire: PCFDLA lowers a batch's every logit by s ~ U(-20, 20) but one, so the
    # attackers' stored rows sit far from zero on average, where an honest network's centred logits do not.
    stored = open_state(tmp_path / "server" / "state", read_only=True)
    assert isinstance(stored, CachedState)
    with stored:
        offset = {
            name: float(np.abs(stored.cache.knowledge[stored.cache.samples_of(name)[1]].mean(axis=1)).mean())
            for name in report["defences"]["devices"]
        }
    assert min(offset[a] for a in report["attackers"]) > 3.0 > 1.0 > max(offset[f"dev00{i}"] for i in range(4))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["maua_honest"] == pytest.approx(report["maua_honest"])
