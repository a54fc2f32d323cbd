"""Defences against malicious devices: robust teachers, capped and hub-free relations, quotas, per-device trust.

The server knows what no parameter-averaging defence knows: every sample's registered label and which device
owns each neighbour. `Defences` uses both, in three places of `KnowledgeCache` (docs/robustness.md):

* relation build (`class_neighbours`, the `NeighbourPolicy` of broker_server/relations.py): a sample that
  appears in many more other devices' lists than R (a hub) is no one's neighbour; a device's samples of a class
  beyond its quota are no one's neighbour; no device other than the sample's owner holds more than `device_cap`
  of its R slots. Rows the caps leave short are searched again, wider, only those rows.
* fetch (`teachers`): the same one gather over the N x R table, then a coordinate-wise trimmed mean (or
  median) over the contributors whose devices the server trusts, instead of the plain mean.
* update (`observe`): evidence per uploaded row, kept as the row's latest: does the upload's argmax equal the
  row's registered label, how close is its distribution to the robust consensus of the row's neighbours on
  other devices, and how much more mass than that consensus it puts on its own runner-up class (an adaptive
  attacker keeps the label on top and raises a wrong class to just below it). A device's trust is its evidence
  relative to the fleet's median.

Evidence is derived from the rows' latest knowledge, which the store keeps: after a restart `settle` rebuilds
it from the state, so trust needs no table of its own. Relations built under the policy are not saved (the
store keeps plain relations only, see `KnowledgeCache.defend`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker_server.records import Teachers
from broker_server.relations import Candidates, ClassIndex, nearest_other_distances
from fedwire.constants import HashKind

if TYPE_CHECKING:
    from broker_server.cache import KnowledgeCache

AGGREGATIONS = ("mean", "trimmed", "median")
_NO_EVIDENCE = np.float32(np.nan)
# Hub detection repeats while it finds new hubs, at most this often (each round one pass over the class's lists).
HUB_ROUNDS = 4
_GOLDEN = (5**0.5 - 1) / 2
_LAST = np.finfo(np.float32).max  # a missing contributor in robust_mean's sort: after every finite logit
_NARROW_ROWS = 64  # `_occurrence` compares columns pairwise up to this row width, and ranks wider rows by sorting


@dataclass(frozen=True)
class DefenceConfig:
    """What the defences do; the defaults are the ones `--defences on` serves with."""

    aggregation: str = "trimmed"  # "mean" | "trimmed" | "median": over a sample's trusted contributors
    trim: float = 0.25  # trimmed: share of contributors cut from each end, per class coordinate
    # Trimmed mean / median over each contributor's logits less its value at its own label (for every
    # contributor the label filter keeps, its maximum). Softmax ignores a constant added to a vector, a
    # coordinate-wise trim does not: PCFDLA adds +-s (|s| up to 100) to every class but one, and with 8 of 20
    # devices attacking more shifted contributors reach a row than the trim cuts, so the served classes other
    # than the label rose towards it (honest MAUA 6.5 points below local training, seed 2, docs/robustness.md).
    # Anchored, an honest vector is unchanged in softmax and a shifted one is its own shape again. The anchor
    # is kept per row as knowledge arrives (`observe`): a max over 10 classes at fetch time cost a fetch of 32
    # ids ~26 us, a fifth of it. The plain mean is shift-free already, so "mean" aggregates as it was.
    shift_free: bool = True
    device_cap: int = 4  # R slots at most one device (other than the sample's owner) holds; 0: no cap
    class_share: float = 0.5  # quota: a device's samples of a class beyond this share of it are no neighbours
    quota_floor: int = 64  # ... and beyond this many (small classes are not quota'd)
    hub_factor: float = 1.5  # a sample in more than hub_factor * R lists of other devices' samples ...
    hub_device_factor: float = 2.5  # ... whose device draws this many times its share of the class's edges: a hub
    # Near copies: a sample whose nearest sample of the same device and class lies within this share of the
    # class's median such distance is crafted (a cluster of copies registered to fill lists): no one's
    # neighbour, reported as a hub. Real FashionMNIST hashes measured 0.2-0.4 % of samples flagged; 0: off.
    near_copy_ratio: float = 0.35
    # Foreign copies (`foreign_copies`): a device sharing near duplicates (a foreign candidate within copy_ratio
    # of the larger of the two devices' median own-device nearest distance) with more than copy_partners of the
    # class's other devices copies them: those samples are no one's neighbour, reported as hubs. Two devices
    # share "many" from max(copy_floor, copy_share x the smaller one's samples of the class) on, counted from
    # both sides. FashionMNIST's real hashes, 20 devices, every class: no device shares many with any other at
    # 0.5 / 0.5 (0.7 / 0.25: 9-15 % of some classes' honest samples flagged; digits: 0.7 / 0.75 flags a few
    # honest devices, 0.5 / 0.5 none). A copier's own median is its copies' distance to their siblings, at most
    # twice their distance to the original, which keeps its copies within reach (docs/robustness.md). 0: off.
    copy_ratio: float = 0.5
    copy_partners: float = 0.5
    copy_floor: int = 4
    copy_share: float = 0.5
    refill_slack: int = 4  # rows the caps leave more than this many slots short are searched again, wider
    trust: bool = True  # gate contributors by their device's trust
    # Use only contributors whose latest knowledge puts its maximum on their own registered label. A sample's
    # neighbours all carry its label (relations are built class by class), so a contributor that contradicts
    # that label tells the sample nothing the server can trust: an honest one is wrong there, an attacker lies.
    label_filter: bool = True
    # Trust: how far a device's evidence lies below the fleet's median, in robust deviations (1.4826 MAD, at
    # least trust_spread): up to trust_z_low deviations trust 1, from trust_z_high on 0 (its knowledge unused).
    trust_z_low: float = 2.0
    trust_z_high: float = 3.5
    trust_spread: float = 0.05
    # Runner-up excess: per row softmax(upload) - softmax(consensus) at the upload's second-ranked class, at
    # excess_temperature; a device whose mean lies above the fleet's median by trust_z_low robust deviations (at
    # least excess_spread) starts losing trust (one-sided: a runner-up below the consensus is not suspicious).
    # Measured on stored FashionMNIST states (docs/robustness.md): honest devices' means -0.02-0.04, the fleet's
    # 1.4826 MAD 0.005-0.02; adaptive attackers' 0.030-0.036 at epoch 2, 0.059-0.090 at epoch 10. The floor,
    # twice the smallest MAD measured, keeps a fleet whose honest spread happens to be tiny from flagging the
    # tail of its noise: an honest device must lie 0.02 above the median before its trust falls; without attack
    # every device lay within 0.009 of it (0.005 would have put one at 1.7 deviations, near trust_z_low).
    excess_temperature: float = 3.0
    excess_spread: float = 0.01
    min_evidence: int = 16  # rows of evidence a device needs before its trust can fall
    consensus_rows: int = 16  # rows of each update compared with their neighbours' consensus
    memory: float = 0.5  # a row's evidence: this much of what it was, the rest from the new upload
    trust_every: int = 32  # updates between recomputations of the trust that gates teachers (reports: always)
    temperature: float = 1.0  # upload and consensus compared as softmax(logits / temperature)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.trim < 0.5 or not 0 < self.class_share <= 1 or self.temperature <= 0:
            raise ValueError("defences: 0 <= trim < 0.5, 0 < class_share <= 1 and temperature > 0 are required")
        if min(self.device_cap, self.quota_floor, self.refill_slack, self.min_evidence, self.consensus_rows) < 0:
            raise ValueError("defences: caps, quotas, slack and evidence counts must be >= 0")
        if self.near_copy_ratio < 0 or self.copy_ratio < 0 or self.copy_floor < 0:
            raise ValueError("defences: near_copy_ratio, copy_ratio and copy_floor must be >= 0")
        if not 0 <= self.copy_partners < 1 or not 0 <= self.copy_share <= 1:
            raise ValueError("defences: 0 <= copy_partners < 1 and 0 <= copy_share <= 1 are required")
        if min(self.hub_factor, self.hub_device_factor) < 0 or not 0 <= self.trust_z_low < self.trust_z_high:
            raise ValueError("defences: hub factors >= 0 and 0 <= trust_z_low < trust_z_high are required")
        if self.trust_spread <= 0 or self.excess_spread <= 0 or self.excess_temperature <= 0:
            raise ValueError("defences: trust_spread, excess_spread and excess_temperature must be > 0")


def near_copies(
    hashes: np.ndarray, owners: np.ndarray, *, kind: HashKind, ratio: float, candidates: Candidates | None = None
) -> np.ndarray:
    """(n,) whether each of one class's samples is a near copy of another sample of its own device.

    Each sample's distance to its nearest other sample of the same device (`own_nearest`) is compared with the
    class's median of that distance: real samples of a device seldom sit within a third of it (0.2-0.4 % on
    FashionMNIST's hashes), while copies of one hash with a few bits flipped always do. `ratio` 0 flags nothing.
    `candidates`: as for `own_nearest`.
    """
    if ratio <= 0 or hashes.shape[0] < 2:
        return np.zeros(hashes.shape[0], bool)
    return _near_copy_flags(own_nearest(hashes, owners, kind=kind, candidates=candidates), ratio)


def _near_copy_flags(nearest: np.ndarray, ratio: float) -> np.ndarray:
    """`near_copies` from each sample's distance to its nearest sample of its own device."""
    finite = np.isfinite(nearest)
    if ratio <= 0 or not finite.any():
        return np.zeros(nearest.shape[0], bool)
    flagged: np.ndarray = nearest <= ratio * float(np.median(nearest[finite]))
    return flagged


def own_nearest(
    hashes: np.ndarray, owners: np.ndarray, *, kind: HashKind, candidates: Candidates | None = None
) -> np.ndarray:
    """(n,) each of one class's samples' distance to its nearest other sample of its own device (inf: none).

    `candidates` (binary hashes only): the class's exact nearest-first search, as the relation build made it.
    An exact search returns every sample nearer than its k-th, so a sample's first candidate of its own device
    is its nearest one, at the Hamming distance the search measured; only the samples with none among their k
    (typically a third on FashionMNIST) are searched for within their device. Float distances are left to the
    per-device search, whose float32 ranking of near ties the class's search need not share.
    """
    count = hashes.shape[0]
    nearest = np.full(count, np.inf)
    if count < 2:
        return nearest
    pending = np.ones(count, bool)
    if candidates is not None and kind is HashKind.BINARY:
        found = candidates.positions
        own_device = (found >= 0) & (owners[np.maximum(found, 0)] == owners[:, None])
        resolved = np.flatnonzero(own_device.any(axis=1))
        nearest[resolved] = candidates.distances[resolved, own_device[resolved].argmax(axis=1)]
        pending[resolved] = False
    # The rest, device by device: the nearest other sample of each asked one.
    by_device = np.argsort(owners, kind="stable")
    for positions in np.split(by_device, np.flatnonzero(np.diff(owners[by_device])) + 1):
        ask = np.flatnonzero(pending[positions])  # within the device
        if positions.size < 2 or ask.size == 0:
            continue
        nearest[positions[ask]] = nearest_other_distances(
            hashes[positions], kind=kind, asked=None if ask.size == positions.size else ask
        )
    return nearest


def _device_medians(values: np.ndarray, owners: np.ndarray, devices: int) -> np.ndarray:
    """(devices,) the median of each device's finite `values` (NaN for a device without one)."""
    finite = np.isfinite(values)
    kept, by = values[finite], owners[finite]
    order = np.lexsort((kept, by))
    kept = kept[order]
    counts = np.bincount(by, minlength=devices)
    starts = np.cumsum(counts) - counts
    out = np.full(devices, np.nan)
    some = counts > 0
    low, high = starts[some] + (counts[some] - 1) // 2, starts[some] + counts[some] // 2
    out[some] = (kept[low] + kept[high]) / 2
    return out


def foreign_copies(
    owners: np.ndarray,
    candidates: Candidates,
    *,
    nearest: np.ndarray,
    ratio: float,
    partners: float,
    floor: int,
    share: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) whether each of one class's samples is a copier device's near duplicate of another device's sample,
    and (devices,) which devices copy (device indices as in `owners`).

    A device that registers copies of public images (FashionMNIST is public, and honest devices' samples are
    drawn from it) holds a near duplicate of samples of nearly *every* other device, while an honest device's
    near duplicates lie on few: the copiers, and now and then a natural twin. So, within the class:

    * a near duplicate is a candidate of another device within `ratio` of the larger of the two devices'
      median distance from a sample to its nearest own-device sample (`nearest`); the larger, because a copier
      can shrink its own median (copies close to each other) but not an honest device's;
    * two devices share many near duplicates when each holds at least max(`floor`, `share` x the smaller
      device's count in the class) samples with a near duplicate on the other;
    * a device that shares many with more than `partners` of the class's other devices holding at least
      `floor` samples (and with two at least) copies: its samples with a near duplicate on such a partner are
      flagged. An honest device shares many only with copiers, a minority under the honest-majority assumption.

    `candidates`: the class's nearest-first search without the samples themselves, with the distances it
    measured. A copy's original and an original's copies lie among the first few of them, so no further search
    is made, and no distance is computed again.
    """
    count = owners.shape[0]
    flagged = np.zeros(count, bool)
    devices = int(owners.max()) + 1 if count else 0
    none = np.zeros(devices, bool)
    finite = np.isfinite(nearest)
    if ratio <= 0 or count < 2 or candidates.positions.shape[1] == 0 or not finite.any():
        return flagged, none
    scale = _device_medians(nearest, owners, devices)
    scale = np.where(np.isnan(scale), float(np.median(nearest[finite])), scale)  # single samples: the class's
    # The nearest candidate lies no farther than any: a row whose first lies past the widest threshold has none.
    rows = np.flatnonzero(candidates.distances[:, 0] <= ratio * float(scale.max()))
    if rows.size == 0:
        return flagged, none
    found, distance = candidates.positions[rows], candidates.distances[rows]
    partner = owners[np.maximum(found, 0)]
    duplicate = (
        (found >= 0)
        & (partner != owners[rows][:, None])
        & (distance <= ratio * np.maximum(scale[owners[rows]][:, None], scale[partner]))
    )
    row, column = np.nonzero(duplicate)
    # (sample, partner device) once each, then per (device, partner device) how many samples have one there.
    sample_partner = np.unique(rows[row] * devices + partner[row, column])
    samples, partner_of = sample_partner // devices, sample_partner % devices
    pairs, held = np.unique(owners[samples] * devices + partner_of, return_counts=True)
    mirror = (pairs % devices) * devices + pairs // devices
    at = np.minimum(np.searchsorted(pairs, mirror), pairs.size - 1)
    both = np.minimum(held, np.where(pairs[at] == mirror, held[at], 0))  # counted from either side
    sizes = np.bincount(owners, minlength=devices)
    smaller = np.minimum(sizes[pairs // devices], sizes[pairs % devices])
    heavy = pairs[both >= np.maximum(floor, share * smaller)]
    many = np.bincount(heavy // devices, minlength=devices)
    eligible = sizes >= max(floor, 1)
    others = int(eligible.sum()) - eligible.astype(np.int64)
    copier = (many >= 2) & (many > partners * others)
    if copier.any():
        counted = copier[owners[samples]] & np.isin(owners[samples] * devices + partner_of, heavy)
        flagged[samples[counted]] = True
    return flagged, copier


@dataclass(frozen=True)
class _Pass:
    """One selection from a search's candidates without the cap: which are valid (eligible) and the first k
    of them per row; the hub rounds' last one is the final fill's, when no round changed eligibility after it."""

    valid: np.ndarray
    chosen: np.ndarray


def _grown(array: np.ndarray, size: int, fill: Any) -> np.ndarray:
    """`array` extended to `size` entries (amortised doubling of its capacity is the caller's `size`)."""
    if array.shape[0] >= size:
        return array
    grown = np.full((max(size, 2 * array.shape[0]), *array.shape[1:]), fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """(n, k): how many earlier entries of the same row hold the same key (0 for the first of each).

    Narrow rows (neighbour lists) compare each column with the columns before it, all rows at once:
    k(k - 1)/2 comparisons a row in k vector operations. On lists of 17 that took 0.47 ms for 1,500 rows (what
    the cap binds in a FashionMNIST class) and 2.1 ms for 6,000, against 1.3 and 17 ms for ranking every row by
    a stable argsort, which is what wide rows (a class's owners in one row, for the quota) still get.
    """
    width = keys.shape[1]
    if width == 0:
        return np.zeros(keys.shape, np.int64)
    if width <= _NARROW_ROWS:
        columns = np.ascontiguousarray(keys.T)
        earlier = np.zeros(columns.shape, np.int64)
        for column in range(1, width):
            np.sum(columns[:column] == columns[column], axis=0, out=earlier[column])
        return earlier.T
    order = np.argsort(keys, axis=1, kind="stable")
    ranked = np.take_along_axis(keys, order, axis=1)
    starts = np.ones(keys.shape, bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    positions = np.broadcast_to(np.arange(width), keys.shape)
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    occurrence = np.empty(keys.shape, np.int64)
    np.put_along_axis(occurrence, order, positions - first, axis=1)
    return occurrence


def _first_valid(candidates: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, width)) each row's first k `valid` candidates in order, -1 padded.

    Most rows keep their first k candidates as they are; only the others are compacted, each valid entry
    written at its rank among the row's valid ones (what a stable argsort of ~valid would gather, at half
    the cost).
    """
    width = min(k, candidates.shape[1])
    whole = np.all(valid[:, :width], axis=1)
    chosen = np.where(whole[:, None], candidates[:, :width], -1)
    rest = np.flatnonzero(~whole)
    if rest.size:
        part = valid[rest]
        rank = np.cumsum(part, axis=1) - 1
        row, column = np.nonzero(part & (rank < width))
        compact = np.full((rest.size, width), -1, np.int64)
        compact[row, rank[row, column]] = candidates[rest[row], column]
        chosen[rest] = compact
    return chosen


def _capped(
    candidates: np.ndarray, valid: np.ndarray, *, rows_owners: np.ndarray, owners: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """The per-device cap of the neighbour lists: the rows it changes and their `valid` after it.

    An entry of another device than its row's loses its validity when `cap` or more valid entries of the same
    device precede it in the row. Only rows where some other device holds more than `cap` valid entries lose
    one (about a quarter of FashionMNIST's rows): in a row sorted by device such a device is a run longer than
    `cap`, which one sort of all rows' few entries finds, and only those rows are ranked entry by entry.
    """
    keys = np.where(valid, owners[np.maximum(candidates, 0)], -1)
    foreign = np.where(keys != rows_owners[:, None], keys, -1)  # the sample's own device is not capped
    if cap >= foreign.shape[1]:
        return np.zeros(0, np.int64), np.zeros((0, foreign.shape[1]), bool)
    ranked = np.sort(foreign, axis=1)
    binding = np.flatnonzero(((ranked[:, cap:] == ranked[:, :-cap]) & (ranked[:, cap:] >= 0)).any(axis=1))
    part = foreign[binding]
    return binding, valid[binding] & ((part < 0) | (_occurrence(part) < cap))


def robust_mean(
    values: np.ndarray, mask: np.ndarray, *, aggregation: str, trim: float, counts: np.ndarray | None = None
) -> np.ndarray:
    """(t, C) per row the mean, trimmed mean or median over axis 1 of `values` (t, R, C) where `mask` (t, R);
    `counts`: the mask's row sums, when the caller has them already.

    Coordinate-wise: each class's values are sorted over the row's contributors and the lowest and highest
    floor(trim * count) of them (median: all but the middle one or two) dropped. Every row needs a contributor.

    On a fetch's few rows numpy's per-call and per-slice costs dominate, so the layout is chosen for them: the
    sort runs along R made contiguous, (t, C, R), twice as fast as along the middle axis, with a missing
    contributor as float32's maximum (it sorts after every finite logit; a logit equal to it ties at the same
    value, so the values kept are those of a masked sort). The kept ranks are then summed over a (R, t, C) copy
    along its first axis: rank by rank in order, as a sum over R in (t, R, C) adds, so the result is the same
    to the bit (a sum along the contiguous axis adds pairwise and rounds differently).
    """
    if counts is None:
        counts = mask.sum(axis=1)
    if aggregation == "mean":
        sums: np.ndarray = np.einsum("nr,nrc->nc", mask.astype(np.float32), values)
        mean: np.ndarray = sums / counts[:, None]
        return mean
    if mask.all():  # every neighbour contributes: nothing to mark missing
        ranked = values.transpose(0, 2, 1).copy()  # a copy, sorted in place below, never the caller's array
    else:
        ranked = np.ascontiguousarray(np.where(mask[:, None, :], values.transpose(0, 2, 1), _LAST))
    ranked.sort(axis=2)
    keep, kept_count = _rank_band(values.shape[1], aggregation, trim)
    by_rank = np.ascontiguousarray(ranked.transpose(2, 0, 1))
    kept: np.ndarray = np.add.reduce(by_rank, axis=0, where=keep[:, counts, None])
    trimmed: np.ndarray = (kept / kept_count[counts, None]).astype(np.float32)
    return trimmed


@functools.lru_cache(maxsize=16)
def _rank_band(width: int, aggregation: str, trim: float) -> tuple[np.ndarray, np.ndarray]:
    """For every contributor count 0..width: which sorted ranks robust_mean keeps ((width, width + 1), rank by
    count) and how many (float64, the divisor the kept sum has always been divided by); looked up per row."""
    counts = np.arange(width + 1)
    low = (counts - 1) // 2 if aggregation == "median" else np.floor(trim * counts).astype(np.int64)
    high = counts - low
    ranks = np.arange(width)[:, None]
    keep = (ranks >= low) & (ranks < high)
    keep.flags.writeable = False
    kept = (high - low).astype(np.float64)
    kept.flags.writeable = False
    return keep, kept


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits / np.float32(temperature)
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    out: np.ndarray = scaled / scaled.sum(axis=1, keepdims=True)
    return out


def _scores(sums: np.ndarray, config: DefenceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per device (rows of `sums`: label sum, rows, consensus sum, rows, excess sum, rows) its relative score
    (from the two agreements) and deviation (the largest of the three: agreements below the median, the
    runner-up excess above it)."""
    relative = np.ones(sums.shape[0])
    deviation = np.zeros(sums.shape[0])
    for column in (0, 2, 4):
        enough = sums[:, column + 1] >= max(1, config.min_evidence)
        if not enough.any():
            continue
        share = sums[enough, column] / sums[enough, column + 1]
        median = float(np.median(share))
        floor = config.excess_spread if column == 4 else config.trust_spread
        spread = max(1.4826 * float(np.median(np.abs(share - median))), floor)
        if column == 4:  # one-sided high: mass raised on a wrong class; not a score of agreement
            deviation[enough] = np.fmax(deviation[enough], (share - median) / spread)
            continue
        relative[enough] = np.fmin(relative[enough], share / median if median > 0 else 1.0)
        deviation[enough] = np.fmax(deviation[enough], (median - share) / spread)
    return relative, deviation


def _trust_of(deviation: np.ndarray, config: DefenceConfig) -> np.ndarray:
    span = config.trust_z_high - config.trust_z_low
    trust: np.ndarray = np.clip((config.trust_z_high - deviation) / span, 0.0, 1.0)
    return trust


class Defences:
    """The defences' state: per row hub/quota flags and evidence, per device evidence sums and trust.

    Not thread-safe, like the cache that owns it; `describe` may be called from a metrics thread (it reads
    copies). Arrays grow with the cache's rows and devices.
    """

    def __init__(self, config: DefenceConfig | None = None) -> None:
        self.config = config or DefenceConfig()
        self._hub = np.zeros(0, bool)
        self._in_degree = np.zeros(0, np.int32)
        self._over_quota = np.zeros(0, bool)
        self._label_evidence = np.zeros(0, np.float32)  # per row: argmax == label (1/0), NaN: none
        self._consistent = np.zeros(0, bool)  # per row: its latest knowledge's argmax is its label
        self._anchor = np.zeros(0, np.float32)  # per row: its latest knowledge's value at its label (shift_free)
        self._consensus_evidence = np.zeros(0, np.float32)  # per row: 1 - TV to the consensus, NaN: none
        self._excess_evidence = np.zeros(0, np.float32)  # per row: runner-up excess over the consensus, NaN: none
        # per device: label sum, label rows, consensus sum, rows, excess sum, rows
        self._sums = np.zeros((0, 6), np.float64)
        self._trust: np.ndarray | None = None  # per device, as of the last computation
        self._gate: np.ndarray | None = None  # per device: trust > 0, what teachers are gated by
        self._gate_version = 0  # bumped whenever `_gate` changes
        self._contributor = np.zeros(0, bool)  # per row: may contribute (`_contributors`), for the first ...
        self._contributor_rows = 0  # ... this many rows, as of gate version ...
        self._contributor_gate = -1  # ... this one
        self._changes = 0  # evidence updates since `_trust` was computed
        self.widened_rows = 0  # rows searched again, wider, because caps left them short
        self._observed = 0  # updates observed, to move the sample of large ones

    # ------------------------------------------------------------ relation build

    def class_neighbours(
        self,
        *,
        rows: np.ndarray,
        hashes: np.ndarray,
        owners: np.ndarray,
        kind: HashKind,
        neighbours: int,
        exact_limit: int,
    ) -> np.ndarray:
        """One class's neighbour lists (positions within the class): hubs and over-quota samples excluded,
        other devices capped; records the class's hub and quota flags by global row."""
        cfg = self.config
        count = rows.size
        table = np.full((count, neighbours), -1, np.int64)
        self._ensure_rows(int(rows.max()) + 1 if count else 0)
        if count <= 1 or neighbours == 0:
            self._hub[rows] = False
            self._over_quota[rows] = False
            self._in_degree[rows] = 0
            return table
        owners = np.asarray(owners, dtype=np.int64)
        index = ClassIndex(hashes, kind=kind, exact=count <= exact_limit)
        searched = index.candidates(min(neighbours + 1, count))
        first = searched.positions
        # Quotas: a device's samples of the class past max(quota_floor, class_share * count), in row order.
        quota = max(cfg.quota_floor, math.ceil(cfg.class_share * count))
        over_quota = _occurrence(owners[None, :])[0] >= quota
        # The first search is exact below exact_limit: near copies then start from its candidates.
        candidates = searched if count <= exact_limit else None
        nearest = (
            own_nearest(hashes, owners, kind=kind, candidates=candidates)
            if cfg.near_copy_ratio > 0 or cfg.copy_ratio > 0
            else np.full(count, np.inf)
        )
        copied, copiers = np.zeros(count, bool), np.zeros(int(owners.max()) + 1, bool)
        if cfg.copy_ratio > 0:
            copied, copiers = foreign_copies(
                owners, searched, nearest=nearest, ratio=cfg.copy_ratio,
                partners=cfg.copy_partners, floor=cfg.copy_floor, share=cfg.copy_share,
            )  # fmt: skip
        hubs = _near_copy_flags(nearest, cfg.near_copy_ratio) | copied
        counted = ~copiers[owners]  # rows whose lists count towards in-degrees
        in_degree = np.zeros(count, np.int64)
        # Hubs: samples in more than hub_factor * R lists of other devices' samples, counted on uncapped lists.
        # Excluding the strongest hubs lets the next ones take their slots, so detection repeats (a few rounds,
        # each only while it finds new hubs: once without an attack).
        limit = cfg.hub_factor * neighbours
        devices = int(owners.max()) + 1
        uncapped: _Pass | None = None  # the last round's selection, while it is the final eligibility's
        # A copier's rows are not searched again when short: its copies crowd each other's candidates, and
        # widening ~all of its rows would cost the server more than the rest of the class (its lists count
        # for nothing in the hub rounds, and only its own samples are taught from them).
        widen = counted if copiers.any() else None
        for _ in range(HUB_ROUNDS if cfg.hub_factor > 0 and count > limit else 0):
            lists, uncapped = self._fill(
                index, first, owners=owners, eligible=~(hubs | over_quota), k=neighbours, cap=0, widen=widen
            )  # fmt: skip
            # A copier's lists are not counted: its copies point at the originals they copy, which would make
            # every copied honest sample look like a hub of its device (3/4 of honest samples flagged on digits).
            foreign = (lists >= 0) & (owners[np.maximum(lists, 0)] != owners[:, None]) & counted[:, None]
            degree = np.bincount(lists[foreign], minlength=count)
            in_degree = np.maximum(in_degree, degree)
            # Natural hubs (samples central to their class) are spread over honest devices; crafted ones make
            # their device draw far more of the class's foreign edges than its share of the class's samples.
            edges = np.bincount(owners, weights=degree, minlength=devices) / max(1, int(degree.sum()))
            samples = np.bincount(owners[counted], minlength=devices) / max(1, int(counted.sum()))
            excess = np.divide(edges, samples, out=np.zeros(devices), where=samples > 0)
            found = (degree > limit) & (excess[owners] > cfg.hub_device_factor) & ~hubs
            if not found.any():
                break
            hubs |= found
            uncapped = None
        self._hub[rows], self._over_quota[rows], self._in_degree[rows] = hubs, over_quota, in_degree
        eligible = ~(hubs | over_quota)
        table[:], _ = self._fill(
            index, first, owners=owners, eligible=eligible, k=neighbours, cap=cfg.device_cap, uncapped=uncapped,
            widen=widen,
        )  # fmt: skip
        return table

    def _fill(
        self,
        index: ClassIndex,
        first: np.ndarray,
        *,
        owners: np.ndarray,
        eligible: np.ndarray,
        k: int,
        cap: int,
        uncapped: _Pass | None = None,
        widen: np.ndarray | None = None,
    ) -> tuple[np.ndarray, _Pass]:
        """(n, k) lists from the first search's candidates; rows left short are searched again, twice as
        wide each time, only those rows (of `widen`'s, when given), until filled or the whole class was searched.

        Also returns the first search's uncapped selection, which a later fill of the same candidates and
        eligibility passes back as `uncapped` instead of selecting again."""
        chosen, short, uncapped = self._select(
            first, rows_owners=owners, owners=owners, eligible=eligible, k=k, cap=cap, uncapped=uncapped
        )
        table = np.full((first.shape[0], k), -1, np.int64)
        table[:, : chosen.shape[1]] = chosen
        if widen is not None:
            short = short[widen[short]]
        width = first.shape[1] + 1
        while short.size and width < index.size:
            width = min(2 * width, index.size)
            self.widened_rows += int(short.size)
            wider = index.candidates(width, short).positions
            chosen, still, _ = self._select(
                wider, rows_owners=owners[short], owners=owners, eligible=eligible, k=k, cap=cap
            )
            table[short] = -1
            table[short, : chosen.shape[1]] = chosen
            short = short[still]
        return table, uncapped

    def _select(
        self,
        candidates: np.ndarray,
        *,
        rows_owners: np.ndarray,
        owners: np.ndarray,
        eligible: np.ndarray,
        k: int,
        cap: int,
        uncapped: _Pass | None = None,
    ) -> tuple[np.ndarray, np.ndarray, _Pass]:
        """The first `k` eligible candidates of each row (positions in the class, nearest first) within the
        cap (0: none), -1 padded, the rows (indices into `candidates`) left more than refill_slack slots short,
        and the selection without the cap (`uncapped`, when given, is that of these candidates already).

        `rows_owners` are the querying rows' devices, `owners` and `eligible` the whole class's. The cap only
        changes the rows it binds (`_capped`): the others keep their uncapped selection.
        """
        cfg = self.config
        if uncapped is None:
            valid = (candidates >= 0) & eligible[np.maximum(candidates, 0)]
            uncapped = _Pass(valid=valid, chosen=_first_valid(candidates, valid, k))
        valid, chosen = uncapped.valid, uncapped.chosen
        if cap > 0:
            binding, capped = _capped(candidates, valid, rows_owners=rows_owners, owners=owners, cap=cap)
            if binding.size:
                valid, chosen = valid.copy(), chosen.copy()
                valid[binding] = capped
                chosen[binding] = _first_valid(candidates[binding], capped, k)
        short = np.flatnonzero(np.minimum(valid.sum(axis=1), chosen.shape[1]) < k - cfg.refill_slack)
        return chosen, short, uncapped

    # ------------------------------------------------------------ fetch

    def teachers(
        self,
        *,
        knowledge: np.ndarray,
        owners: np.ndarray,
        neighbours: np.ndarray,
        contributing: np.ndarray,
        devices: int,
        raw: bool = False,
        gather_limit: int = 1 << 22,
    ) -> Teachers:
        """Robust teachers of the rows whose (safe) neighbour rows and contributing mask are given."""
        used = self._usable(contributing, neighbours=neighbours, owners=owners, devices=devices)
        counts = used.sum(axis=1)
        if raw:
            return Teachers(counts=counts.astype(np.uint16), logits=knowledge[neighbours[used]].copy())
        teach = np.flatnonzero(counts)
        taught = counts
        if teach.size < counts.size:  # the usual fetch has a teacher for every row: no copies then
            neighbours, used, taught = neighbours[teach], used[teach], counts[teach]
        return Teachers(
            counts=counts.astype(np.uint16),
            logits=self.aggregate(knowledge, neighbours, used, counts=taught, gather_limit=gather_limit),
        )

    def _usable(self, used: np.ndarray, *, neighbours: np.ndarray, owners: np.ndarray, devices: int) -> np.ndarray:
        """`used` (rows x R) less the contributors whose device is not trusted or whose knowledge contradicts
        their label (`label_filter`); `neighbours` are safe row indices."""
        usable = self._contributors(owners, devices)
        return used if usable is None else used & usable[neighbours]

    def _contributors(self, owners: np.ndarray, devices: int) -> np.ndarray | None:
        """Per row whether it may contribute, by its device's gate and its label agreement (None: no filter).

        Kept between requests, as the gate and the rows' latest argmax change it: a fetch then gathers one
        flag per neighbour instead of its device, its device's gate and its label agreement (three gathers).
        The gate is recomputed where it was (`_gated`); a changed gate rebuilds the flags, `observe` keeps the
        rows it updates in step, and rows registered since are added when first asked for.
        """
        cfg = self.config
        if not (cfg.trust or cfg.label_filter):
            return None
        if cfg.trust:
            self._gated(devices)
        if self._contributor_gate != self._gate_version:
            self._contributor_rows, self._contributor_gate = 0, self._gate_version
        size = owners.shape[0]
        if self._contributor_rows < size:
            start = self._contributor_rows
            self._ensure_rows(size)
            self._contributor = _grown(self._contributor, size, True)
            self._contributor[start:size] = self._may_contribute(np.arange(start, size), owners)
            self._contributor_rows = size
        return self._contributor

    def _may_contribute(self, rows: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """`rows`' contributor flags from their label agreement and their devices' current gate."""
        may = self._consistent[rows] if self.config.label_filter else np.ones(rows.size, bool)
        if self.config.trust:
            assert self._gate is not None
            may = may & self._gate[owners[rows]]
        return may

    def aggregate(
        self,
        knowledge: np.ndarray,
        neighbours: np.ndarray,
        mask: np.ndarray,
        *,
        counts: np.ndarray | None = None,
        gather_limit: int = 1 << 22,
    ) -> np.ndarray:
        """The robust mean of each row's masked neighbours' knowledge (`counts`: the mask's row sums, if known),
        sliced only when the gather is huge."""
        classes = knowledge.shape[1]
        step = max(1, gather_limit // max(1, neighbours.shape[1] * classes))
        config = self.config
        if neighbours.shape[0] <= step:  # one slice (every fetch): no output buffer to copy into
            whole = robust_mean(
                self._gathered(knowledge, neighbours), mask, aggregation=config.aggregation, trim=config.trim,
                counts=counts,
            )  # fmt: skip
            return np.asarray(whole, dtype=np.float32)
        out = np.empty((neighbours.shape[0], classes), np.float32)
        for start in range(0, neighbours.shape[0], step):
            stop = start + step
            out[start:stop] = robust_mean(
                self._gathered(knowledge, neighbours[start:stop]), mask[start:stop],
                aggregation=config.aggregation, trim=config.trim,
            )  # fmt: skip
        return out

    def _gathered(self, knowledge: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
        """(t, R, C) the neighbours' knowledge as the aggregation compares it (`shift_free`: less each row's
        anchor, its value at its label; the gather is a copy, so it is shifted in place)."""
        values: np.ndarray = knowledge[neighbours]
        if self.config.shift_free and self.config.aggregation != "mean":
            self._ensure_rows(knowledge.shape[0])
            values -= self._anchor[neighbours][:, :, None]
        return values

    # ------------------------------------------------------------ trust

    def observe(
        self,
        *,
        rows: np.ndarray,
        logits: np.ndarray,
        labels: np.ndarray,
        owners: np.ndarray,
        knowledge: np.ndarray,
        table: np.ndarray,
        versions: np.ndarray,
        devices: int,
        every_row: bool = False,
    ) -> None:
        """Evidence from freshly applied knowledge of `rows` (logits as stored); replaces those rows' evidence.

        An upload's consensus evidence is a sample of its rows (`consensus_rows`), so serving stays cheap;
        `every_row` compares all of them (`settle`: evidence rebuilt once, at start-up or inspection).

        `labels`, `owners`, `knowledge` and `versions` are the cache's per-row arrays, `table` its neighbour
        table for the rows it covers so far.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        self._ensure_rows(labels.shape[0])
        self._ensure_devices(devices)
        logits = np.asarray(logits, dtype=np.float32)
        consistent = logits.argmax(axis=1) == labels[rows]
        self._consistent[rows] = consistent
        self._anchor[rows] = logits[np.arange(rows.size), labels[rows]]
        if self._contributor_gate == self._gate_version:  # the contributor flags follow (others: rebuilt later)
            held = rows[rows < self._contributor_rows]
            self._contributor[held] = self._may_contribute(held, owners)
        label = consistent.astype(np.float32)
        self._replace(self._label_evidence, rows, label, owners=owners, column=0, memory=self.config.memory)
        if not self.config.consensus_rows or not table.shape[0]:
            return
        # Every row of a small update, a strided sample of a large one (its offset moving from update to update).
        stride = 1 if every_row else max(1, -(-rows.size // self.config.consensus_rows))
        self._observed += 1
        offset = int((self._observed * _GOLDEN) % 1.0 * stride)  # a Weyl sequence: no period to fall in step with
        picked = np.arange(offset, rows.size, stride)
        sample = rows[picked]
        agreement, excess = self._consensus_agreement(
            rows=sample,
            logits=logits[picked],
            owners=owners,
            knowledge=knowledge,
            table=table,
            versions=versions,
            devices=devices,
        )
        self._replace(self._consensus_evidence, sample, agreement, owners=owners, column=2, memory=self.config.memory)
        self._replace(self._excess_evidence, sample, excess, owners=owners, column=4, memory=self.config.memory)

    def _consensus_agreement(
        self,
        *,
        rows: np.ndarray,
        logits: np.ndarray,
        owners: np.ndarray,
        knowledge: np.ndarray,
        table: np.ndarray,
        versions: np.ndarray,
        devices: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row 1 - total variation between its upload and its other-device neighbours' robust consensus
        (as softmax at `temperature`), and the runner-up excess: softmax(upload) - softmax(consensus) at
        `excess_temperature`, taken at the upload's second-ranked class; both NaN where no other device's
        neighbour holds knowledge."""
        covered = rows < table.shape[0]
        if covered.all():  # rows registered since the last build have no neighbours yet
            neighbours = table[rows]
        else:
            neighbours = np.full((rows.size, table.shape[1]), -1, np.int64)
            neighbours[covered] = table[rows[covered]]
        present = neighbours >= 0
        safe = np.where(present, neighbours, 0)
        used = present & (versions[safe] >= 0) & (owners[safe] != owners[rows][:, None])
        used = self._usable(used, neighbours=safe, owners=owners, devices=devices)
        agreement = np.full(rows.size, _NO_EVIDENCE, np.float32)
        excess = np.full(rows.size, _NO_EVIDENCE, np.float32)
        some = np.flatnonzero(used.any(axis=1))
        if some.size:
            if some.size < rows.size:
                safe, used, logits = safe[some], used[some], logits[some]
            consensus = self.aggregate(knowledge, safe, used)
            t, hot = self.config.temperature, self.config.excess_temperature
            distance = 0.5 * np.abs(_softmax(logits, t) - _softmax(consensus, t)).sum(axis=1)
            agreement[some] = 1.0 - distance
            if logits.shape[1] > 1:
                second = np.argpartition(logits, -2, axis=1)[:, -2:-1]  # the upload's second-ranked class
                raised = _softmax(logits, hot) - _softmax(consensus, hot)
                excess[some] = np.take_along_axis(raised, second, axis=1)[:, 0]
        return agreement, excess

    def _replace(
        self,
        evidence: np.ndarray,
        rows: np.ndarray,
        values: np.ndarray,
        *,
        owners: np.ndarray,
        column: int,
        memory: float = 0.0,
    ) -> None:
        """Swap rows' evidence for `values`, keeping the per-device sums (columns: sum, rows) in step."""
        devices = owners[rows]
        old = evidence[rows]
        had = ~np.isnan(old)
        fresh = ~np.isnan(values)
        if memory:  # what the row showed before still counts: one good upload does not wipe out a bad record
            values = np.where(had & fresh, memory * old + (1 - memory) * values, values)
        values = np.where(fresh, values, old)  # no new evidence (no consensus yet): the old one stands
        has = ~np.isnan(values)
        gained = np.where(has, values, 0.0).astype(np.float64) - np.where(had, old, 0.0)
        counted = has.astype(np.int64) - had
        if devices.size and np.all(devices == devices[0]):  # one device's update: two scalar sums
            self._sums[devices[0], column] += gained.sum()
            self._sums[devices[0], column + 1] += counted.sum()
        else:
            size = self._sums.shape[0]
            self._sums[:, column] += np.bincount(devices, weights=gained, minlength=size)
            self._sums[:, column + 1] += np.bincount(devices, weights=counted, minlength=size)
        evidence[rows] = values
        self._changes += 1

    def settle(
        self,
        *,
        labels: np.ndarray,
        owners: np.ndarray,
        knowledge: np.ndarray,
        table: np.ndarray,
        versions: np.ndarray,
        devices: int,
    ) -> int:
        """Evidence for every row holding knowledge but none yet (after a restart, or once defences are
        switched on); returns how many rows it took."""
        self._ensure_rows(labels.shape[0])
        pending = np.flatnonzero((versions >= 0) & np.isnan(self._label_evidence[: labels.shape[0]]))
        step = 4096
        for start in range(0, pending.size, step):
            part = pending[start : start + step]
            held = {"labels": labels, "owners": owners, "knowledge": knowledge, "table": table, "versions": versions}
            # Every row of every part is compared with its consensus: what the uploads sampled over time, at once.
            self.observe(rows=part, logits=knowledge[part], devices=devices, every_row=True, **held)
        return int(pending.size)

    def scores(self, devices: int) -> tuple[np.ndarray, np.ndarray]:
        """(devices,) each: the lower of a device's label and consensus agreement relative to the fleet's median
        (1: typical, 0: never agrees), and the largest robust deviation of its evidence from the median, below it
        for the agreements, above it for the runner-up excess (0: typical).

        A kind of evidence counts once at least one device has min_evidence rows of it; devices with fewer
        rows (just joined) score 1 and deviate 0 on it.
        """
        self._ensure_devices(devices)
        relative, deviation = _scores(self._sums, self.config)
        return relative[:devices], deviation[:devices]

    def trust(self, devices: int) -> np.ndarray:
        """(devices,) trust in [0, 1] from the deviation of `scores`: 1 up to trust_z_low, 0 from trust_z_high."""
        return self._computed(devices, every=1)

    def trusted(self, devices: int) -> np.ndarray:
        """(devices,) whether each device's knowledge is used (trust above 0), as of now."""
        trusted: np.ndarray = self.trust(devices) > 0
        return trusted

    def _gated(self, devices: int) -> np.ndarray:
        """(devices,) the gate of teachers and consensus: `trusted`, recomputed every trust_every updates."""
        self._computed(devices, every=max(1, self.config.trust_every))
        assert self._gate is not None
        return self._gate[:devices]

    def _computed(self, devices: int, *, every: int) -> np.ndarray:
        self._ensure_devices(devices)
        if self._trust is None or self._trust.size < devices or self._changes >= every:
            self._trust = _trust_of(_scores(self._sums, self.config)[1], self.config)
            gate = self._trust > 0
            if self._gate is None or not np.array_equal(gate, self._gate):
                self._gate_version += 1
            self._gate = gate
            self._changes = 0
        return self._trust[:devices]

    # ------------------------------------------------------------ reporting

    def describe(self, names: list[str], *, owners: np.ndarray) -> dict[str, Any]:
        """Per device (by index: `names`) its trust and evidence, hub and over-quota samples; totals.

        Changes nothing and reads each array once, so a metrics thread may call it while the server serves.
        """
        devices = len(names)
        sums = _grown(self._sums.copy(), devices, 0.0)
        relative, deviation = _scores(sums, self.config)
        trust = _trust_of(deviation, self.config)
        hub, over_quota = self._hub, self._over_quota
        size = min(owners.shape[0], hub.shape[0], over_quota.shape[0])
        hubs = np.bincount(owners[:size][hub[:size]], minlength=devices)
        over = np.bincount(owners[:size][over_quota[:size]], minlength=devices)
        per_device = {
            name: {
                "trust": round(float(trust[i]), 4),
                "score": round(float(relative[i]), 4),
                "deviation": round(float(deviation[i]), 2),
                "label_agreement": round(float(sums[i, 0] / sums[i, 1]), 4) if sums[i, 1] else None,
                "consensus_agreement": round(float(sums[i, 2] / sums[i, 3]), 4) if sums[i, 3] else None,
                "runner_up_excess": round(float(sums[i, 4] / sums[i, 5]), 4) if sums[i, 5] else None,
                "evidence_rows": int(sums[i, 1]),
                "consensus_rows": int(sums[i, 3]),
                "hub_samples": int(hubs[i]),
                "over_quota_samples": int(over[i]),
            }
            for i, name in enumerate(names)
        }
        return {
            "config": dict(self.config.__dict__),
            "hub_samples": int(hubs.sum()),
            "over_quota_samples": int(over.sum()),
            "widened_rows": self.widened_rows,
            "devices": per_device,
        }

    def hub_flags(self, size: int) -> np.ndarray:
        """(size,) whether each row was flagged a hub at its class's last relation build."""
        self._ensure_rows(size)
        return self._hub[:size].copy()

    # ------------------------------------------------------------ growth

    def _ensure_rows(self, size: int) -> None:
        if self._hub.shape[0] >= size:  # the per-row arrays grow together: one holds as many rows as all
            return
        self._hub = _grown(self._hub, size, False)
        self._in_degree = _grown(self._in_degree, size, 0)
        self._over_quota = _grown(self._over_quota, size, False)
        self._label_evidence = _grown(self._label_evidence, size, _NO_EVIDENCE)
        self._consistent = _grown(self._consistent, size, True)
        self._anchor = _grown(self._anchor, size, 0.0)
        self._consensus_evidence = _grown(self._consensus_evidence, size, _NO_EVIDENCE)
        self._excess_evidence = _grown(self._excess_evidence, size, _NO_EVIDENCE)

    def _ensure_devices(self, devices: int) -> None:
        if self._sums.shape[0] < devices:
            self._sums = _grown(self._sums, devices, 0.0)
            self._trust = None


class DefenceCollector(Collector):
    """Prometheus series of a defended cache, read at each scrape: per device trust, score and hub samples."""

    def __init__(self, cache: KnowledgeCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        defences = self.cache.defences
        if defences is None:
            return
        records = sorted(self.cache.devices.values(), key=lambda record: record.index)
        report = defences.describe([record.device for record in records], owners=self.cache.sample_devices)
        series = {
            "trust": GaugeMetricFamily(
                "fedcache_device_trust", "Trust in a device's knowledge (0: unused)", labels=["device"]
            ),
            "score": GaugeMetricFamily(
                "fedcache_device_trust_score", "A device's evidence relative to the fleet median", labels=["device"]
            ),
            "hub_samples": GaugeMetricFamily(
                "fedcache_device_hub_samples", "A device's samples flagged as hubs", labels=["device"]
            ),
            "over_quota_samples": GaugeMetricFamily(
                "fedcache_device_over_quota_samples", "A device's samples beyond its class quota", labels=["device"]
            ),
        }
        excess = GaugeMetricFamily(
            "fedcache_device_runner_up_excess",
            "A device's mean mass above its neighbours' consensus on its uploads' runner-up class",
            labels=["device"],
        )
        for name, entry in report["devices"].items():
            for key, family in series.items():
                family.add_metric([name], float(entry[key]))
            if entry["runner_up_excess"] is not None:  # no consensus compared yet: no series
                excess.add_metric([name], float(entry["runner_up_excess"]))
        yield from series.values()
        yield excess
        yield GaugeMetricFamily("fedcache_hub_samples", "Samples flagged as hubs", value=report["hub_samples"])
