"""Datasets (FashionMNIST from IDX files, scikit-learn digits) and the deterministic Dirichlet non-IID device splits.

Every device process derives the same partition on its own from (dataset, num_devices, alpha, seed), so no
central party ever ships raw samples; a device only keeps its own shard.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.files import write_atomic

DATASETS = ("fashion-mnist", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "FEDCACHE_FASHION_MNIST_DIR"
CACHE_ENV = "FEDCACHE_CACHE_DIR"
DEFAULT_MIN_SHARD = 10

# Per-dataset pixel mean/std of the training images scaled to [0, 1]; fixed so every device normalises alike.
_NORMALISATION: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "digits": (0.3053, 0.3760),
}
_FASHION_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", 2051),
    "y_train": ("train-labels-idx1-ubyte.gz", 2049),
    "x_test": ("t10k-images-idx3-ubyte.gz", 2051),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 2049),
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CACHE_VERSION = 1
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0
_MAX_PARTITION_TRIES = 1000
# How a dataset is cut into device shards (DataConfig.partition): "dirichlet" draws every class's proportions
# from one stream seeded by (seed, num_devices); "dirichlet-per-class" is the published FedCache/FedML loader's
# procedure, each class's proportions drawn with the class index as seed, so our figures share its split.
PARTITIONS = ("dirichlet", "dirichlet-per-class")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset, normalised: images float32 (N, C, H, W), labels int64 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    input_shape: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Shard:
    """One device's share of a dataset; the indices into the full splits double as stable sample ids."""

    name: str
    index: int
    num_devices: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_indices: np.ndarray
    test_indices: np.ndarray
    classes: int
    input_shape: tuple[int, int, int]


class IdxFormatError(ValueError):
    """A file that is not a well-formed IDX file (bad magic, unknown type, wrong size)."""


def _checked_labels(labels: np.ndarray, *, num_devices: int, alpha: float, min_size: int) -> np.ndarray:
    """`labels` as an array, refused with a clear error where no Dirichlet split of them can exist."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    if min_size * num_devices > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_devices} devices {min_size} each")
    return labels


def read_idx(path: Path | str, *, expected_magic: int | None = None) -> np.ndarray:
    """Decode an IDX file (gzipped if the name ends in .gz) into a native-endian numpy array.

    The magic number is checked against `expected_magic` (2049 labels, 2051 images) so a swapped or
    truncated file fails loudly instead of producing garbage training data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(f"{path}: bad IDX magic {magic:#010x} (first two bytes must be zero)")
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(f"{path}: IDX magic {magic} where {expected_magic} was expected")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: unknown IDX data type {type_code:#04x}")
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX file with zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(f"{path}: {len(raw) - header} data bytes where shape {shape} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """Write an array as an (optionally gzipped) IDX file; the inverse of `read_idx`, used by tests and tools."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise IdxFormatError(f"dtype {array.dtype} has no IDX type code")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def fashion_mnist_dir() -> Path:
    """Where the FashionMNIST IDX files live: $FEDCACHE_FASHION_MNIST_DIR or the Debian package's directory."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def cache_dir() -> Path:
    """Where decoded arrays are cached: $FEDCACHE_CACHE_DIR or ~/.cache/fedcache."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedcache")


def load_dataset(name: str) -> Dataset:
    """Load a dataset by name ("fashion-mnist" or "digits"), normalised with fixed per-dataset mean/std."""
    if name == "fashion-mnist":
        return _load_fashion_mnist()
    if name == "digits":
        return _load_digits()
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _normalise(images: np.ndarray, name: str, scale: float) -> np.ndarray:
    mean, std = _NORMALISATION[name]
    out = images.astype(np.float32) / np.float32(scale)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


def _load_fashion_mnist() -> Dataset:
    """Read the IDX files once, then memory-map the normalised float32 cache.

    The cache holds the normalised images, so twenty device processes on one host share one page-cached
    copy instead of each decompressing and holding its own ~190 MB.
    """
    source = fashion_mnist_dir()
    paths = {key: source / file for key, (file, _) in _FASHION_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"FashionMNIST not found: missing {', '.join(missing)}. Install it with "
            f"`apt-get install dataset-fashion-mnist`, or point ${FASHION_MNIST_ENV} at a directory holding "
            f"the four *-ubyte.gz IDX files."
        )
    key = hashlib.sha256()
    key.update(f"v{_CACHE_VERSION} {_NORMALISATION['fashion-mnist']}".encode())
    for path in paths.values():
        stat = path.stat()
        key.update(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
    target = cache_dir() / "fashion-mnist" / key.hexdigest()[:16]
    files = {k: target / f"{k}.npy" for k in paths}
    try:
        if not all(f.is_file() for f in files.values()):
            target.mkdir(parents=True, exist_ok=True)
            with _file_lock(target / ".lock"):
                if not all(f.is_file() for f in files.values()):
                    for k, path in paths.items():
                        _atomic_save(files[k], _decode_fashion(k, path))
        arrays = {k: np.asarray(np.load(f, mmap_mode="r")) for k, f in files.items()}
    except OSError as exc:  # read-only or full cache dir: decode into memory instead of failing
        warnings.warn(f"FashionMNIST cache {target} unusable ({exc}); decoding in memory", stacklevel=2)
        arrays = {k: _decode_fashion(k, path) for k, path in paths.items()}
        for array in arrays.values():
            array.flags.writeable = False  # read-only like the memory-mapped cache
    if (
        arrays["x_train"].shape[0] != arrays["y_train"].shape[0]
        or arrays["x_test"].shape[0] != arrays["y_test"].shape[0]
    ):
        raise IdxFormatError(f"FashionMNIST image and label counts differ in {source}")
    return Dataset(
        name="fashion-mnist",
        classes=10,
        input_shape=tuple(int(n) for n in arrays["x_train"].shape[1:]),  # type: ignore[arg-type]
        **arrays,
    )


def _decode_fashion(key: str, path: Path) -> np.ndarray:
    """One FashionMNIST IDX file as the array `Dataset` holds: normalised float32 images or int64 labels."""
    array = read_idx(path, expected_magic=_FASHION_FILES[key][1])
    if key.startswith("x"):
        return _normalise(array[:, None, :, :], "fashion-mnist", 255.0)
    return array.astype(np.int64)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save through an atomic write, so processes reading the shared cache never see half a file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock so processes starting together decode once; a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX hosts just decode redundantly; writes stay atomic.
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, split 75/25 stratified with a fixed seed (no download needed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a dev extra
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = _normalise(bunch.images[:, None, :, :], "digits", 16.0)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test_mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_mask[members[: round(len(members) * _DIGITS_TEST_FRACTION)]] = True
    return Dataset(
        name="digits",
        x_train=images[~test_mask],
        y_train=labels[~test_mask],
        x_test=images[test_mask],
        y_test=labels[test_mask],
        classes=10,
        input_shape=(1, 8, 8),
    )


def dirichlet_proportions(
    labels: np.ndarray, *, num_devices: int, alpha: float, seed: int, min_size: int = DEFAULT_MIN_SHARD
) -> tuple[list[np.ndarray], np.ndarray]:
    """The FedML/FedCache non-IID split plus the per-class device proportions it used.

    Per class, device proportions are drawn from Dir(alpha); a device already holding more than its
    fair share N/num_devices gets no more (FedML's balancing). The whole draw is repeated until every
    device holds at least `min_size` samples. Returns (indices per device, proportions of shape
    (classes, num_devices)); the proportions let the test split follow the same label distribution.
    """
    labels = _checked_labels(labels, num_devices=num_devices, alpha=alpha, min_size=min_size)
    classes = int(labels.max()) + 1 if len(labels) else 0
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_devices]))
    fair_share = len(labels) / num_devices
    for _ in range(_MAX_PARTITION_TRIES):
        batches: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        sizes = np.zeros(num_devices, dtype=np.int64)
        proportions = np.zeros((classes, num_devices))
        for cls in range(classes):
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(num_devices, float(alpha)))
            share = share * (sizes < fair_share)
            total = share.sum()
            share = share / total if total > 0 else np.full(num_devices, 1.0 / num_devices)
            proportions[cls] = share
            for device, part in enumerate(_split_by(members, share)):
                batches[device].append(part)
                sizes[device] += len(part)
        if sizes.min() >= min_size:
            parts = [np.concatenate(b) if b else np.zeros(0, dtype=np.int64) for b in batches]
            return [rng.permutation(p).astype(np.int64) for p in parts], proportions
    raise RuntimeError(
        f"no Dirichlet split with >= {min_size} samples per device after {_MAX_PARTITION_TRIES} draws; "
        f"raise alpha or lower num_devices ({num_devices})"
    )


def _split_by(members: np.ndarray, share: np.ndarray) -> list[np.ndarray]:
    """Cut `members` into consecutive pieces whose sizes follow `share` (FedML's cumsum rounding)."""
    cuts = (np.cumsum(share) * len(members)).astype(np.int64)[:-1]
    return np.split(members, cuts)


def dirichlet_partition(
    labels: np.ndarray, *, num_devices: int, alpha: float, seed: int, min_size: int = DEFAULT_MIN_SHARD
) -> list[np.ndarray]:
    """Indices of each device's samples: disjoint, covering every sample once, each >= `min_size`."""
    parts, _ = dirichlet_proportions(labels, num_devices=num_devices, alpha=alpha, seed=seed, min_size=min_size)
    return parts


def split_like(labels: np.ndarray, proportions: np.ndarray, *, seed: int) -> list[np.ndarray]:
    """Partition `labels` with given per-class device proportions (classes, devices), e.g. a test split."""
    labels = np.asarray(labels)
    classes, num_devices = proportions.shape
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_devices, 1]))
    batches: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in range(classes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        for device, part in enumerate(_split_by(members, proportions[cls])):
            batches[device].append(part)
    return [np.sort(np.concatenate(b)).astype(np.int64) if b else np.zeros(0, np.int64) for b in batches]


def per_class_seeded_proportions(
    labels: np.ndarray, *, num_devices: int, alpha: float, min_size: int = DEFAULT_MIN_SHARD
) -> tuple[list[np.ndarray], np.ndarray]:
    """The published FedCache loader's Dirichlet split (FedML's): class k's draw seeded with k alone.

    For class k, a legacy MT19937 stream seeded with k draws the device proportions from Dir(alpha) and then
    shuffles the class's sample indices (in that order, as `np.random.seed(k)` followed by `dirichlet` and
    `shuffle` does), so the split depends on nothing but the labels, alpha and num_devices: not on any seed
    of ours. A device already holding more than N/num_devices gets no more of later classes (FedML's
    balancing). Because every class reseeds, a redraw repeats the same split exactly: the published
    `while min_size < 10` loop would spin forever on a split that fails, so a failing split is an error
    here. Returns (sorted indices per device, proportions actually used, shape (classes, num_devices)).
    """
    labels = _checked_labels(labels, num_devices=num_devices, alpha=alpha, min_size=min_size)
    classes = int(labels.max()) + 1 if len(labels) else 0
    fair_share = len(labels) / num_devices
    batches: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    sizes = np.zeros(num_devices, dtype=np.int64)
    proportions = np.zeros((classes, num_devices))
    for cls in range(classes):
        members = np.flatnonzero(labels == cls)
        stream = np.random.RandomState(cls)  # the published np.random.seed(k), without touching global state
        share = stream.dirichlet(np.full(num_devices, float(alpha)))
        stream.shuffle(members)
        share = share * (sizes < fair_share)
        total = share.sum()
        share = share / total if total > 0 else np.full(num_devices, 1.0 / num_devices)
        proportions[cls] = share
        for device, part in enumerate(_split_by(members, share)):
            batches[device].append(part)
            sizes[device] += len(part)
    if sizes.min() < min_size:
        raise RuntimeError(
            f"the per-class-seeded split gives device {int(sizes.argmin())} only {int(sizes.min())} of "
            f"{len(labels)} samples (< {min_size}); it is the same on every redraw (each class reseeds with its "
            f"index), so raise alpha or lower num_devices ({num_devices})"
        )
    parts = [np.sort(np.concatenate(b)).astype(np.int64) if b else np.zeros(0, np.int64) for b in batches]
    return parts, proportions


def partition_shards(
    dataset: Dataset, *, num_devices: int, alpha: float, seed: int, partition: str = "dirichlet"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train indices, test indices) of every device under the named partition (one of PARTITIONS).

    "dirichlet": the train split's per-class proportions also cut the test split (`split_like`).
    "dirichlet-per-class": the published loader runs its procedure on the test labels again; the per-class
    seeds make its Dirichlet draws the very ones of the train split, so a device's test mix follows its
    train mix (only FedML's balancing, computed on each split's own running sizes, may differ). `seed`
    is not used by this one.
    """
    if partition == "dirichlet":
        train_parts, proportions = dirichlet_proportions(
            dataset.y_train, num_devices=num_devices, alpha=alpha, seed=seed
        )
        return train_parts, split_like(dataset.y_test, proportions, seed=seed)
    if partition == "dirichlet-per-class":
        train_parts, _ = per_class_seeded_proportions(dataset.y_train, num_devices=num_devices, alpha=alpha)
        test_parts, _ = per_class_seeded_proportions(dataset.y_test, num_devices=num_devices, alpha=alpha)
        return train_parts, test_parts
    raise ValueError(f"unknown partition {partition!r}; known: {', '.join(PARTITIONS)}")


def device_shard(
    dataset: Dataset, *, num_devices: int, alpha: float, seed: int, index: int, partition: str = "dirichlet"
) -> Shard:
    """Device `index`'s train and test data under Dir(alpha); its test data follows its train label mix.

    The paper evaluates each device on test samples drawn with its own label distribution, so the test
    split is cut with the same per-class proportions as the train split (`partition_shards`).
    """
    if not 0 <= index < num_devices:
        raise ValueError(f"index {index} outside [0, {num_devices})")
    train_parts, test_parts = partition_shards(
        dataset, num_devices=num_devices, alpha=alpha, seed=seed, partition=partition
    )
    train_idx = np.sort(train_parts[index])
    test_idx = test_parts[index]
    return Shard(
        name=dataset.name,
        index=index,
        num_devices=num_devices,
        x_train=np.ascontiguousarray(dataset.x_train[train_idx]),
        y_train=np.asarray(dataset.y_train[train_idx]),
        x_test=np.ascontiguousarray(dataset.x_test[test_idx]),
        y_test=np.asarray(dataset.y_test[test_idx]),
        train_indices=train_idx,
        test_indices=test_idx,
        classes=dataset.classes,
        input_shape=dataset.input_shape,
    )


def limit_train_samples(shard: Shard, *, max_samples: int, seed: int) -> Shard:
    """The shard with at most `max_samples` training samples (0 or more than it holds: unchanged).

    The subset is stratified by class (largest-remainder quotas of the shard's own label counts), so the
    device keeps the label mix its test split follows; which samples of a class stay is drawn from
    (seed, num_devices, index), so every run of a device keeps the same ones. The test split is untouched.
    """
    total = len(shard.y_train)
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    if max_samples == 0 or total <= max_samples:
        return shard
    counts = np.bincount(shard.y_train, minlength=shard.classes)
    exact = counts * (max_samples / total)
    quotas = np.floor(exact).astype(np.int64)
    # Largest remainders first, ties to the lower class: deterministic, and the quotas sum to max_samples.
    by_remainder = np.lexsort((np.arange(len(exact)), -(exact - quotas)))
    quotas[by_remainder[: max_samples - int(quotas.sum())]] += 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, shard.num_devices, shard.index, 2]))
    keep = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(shard.y_train == cls))[:quota] for cls, quota in enumerate(quotas)]
        )
    )
    return replace(
        shard,
        x_train=np.ascontiguousarray(shard.x_train[keep]),
        y_train=np.asarray(shard.y_train[keep]),
        train_indices=np.asarray(shard.train_indices[keep]),
    )


__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "IdxFormatError",
    "Shard",
    "cache_dir",
    "device_shard",
    "dirichlet_partition",
    "dirichlet_proportions",
    "fashion_mnist_dir",
    "limit_train_samples",
    "load_dataset",
    "partition_shards",
    "per_class_seeded_proportions",
    "read_idx",
    "split_like",
    "write_idx",
]
