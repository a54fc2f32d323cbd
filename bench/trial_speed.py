"""Trial speed: one FedCache epoch as a real trial (processes, MQTT, cache server) vs a per-sample-loop baseline.

Both run the same algorithm on the same models, Dirichlet split, hash encoder and loss/optimiser settings,
with one torch thread per training process:

- **ours**: `android_harness.trial.run_trial`: a private Mosquitto, the cache server and one process per
  device, which register their hashes and then train asynchronously, fetching neighbour knowledge that the
  server averages (one gather and one mean per batch).
- **baseline**: the public FedCache demo's structure, written from its description: one process, devices
  trained one after another batch by batch (round-robin), relations from hnswlib (cosine, M=64,
  ef_construction=1000, ef=1000, one index per class, k=R+1, first hit dropped) over the same hashes as
  +-1 float vectors, a zero-initialised N x C knowledge array, and for every sample of every batch a Python
  loop that fetches its R neighbours' logits and averages them, then the batch's logits written back one
  sample at a time.

The figures say what the deployment's process and wire overheads cost against the demo's one-process
loop, and what the demo's per-sample loops cost against a vectorised server. Each device's model is
evaluated on its own test split after the epoch (MAUA), so the reader sees that both did the same learning.

    python -m bench trial_speed [--quick] [--arch cnn] [--repeats 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from bench._report import machine_line, markdown_table
from bench.relations import DEMO_EF, DEMO_EF_CONSTRUCTION, DEMO_M
from edge.config import TrainConfig
from fedwire.constants import DEFAULT_NEIGHBOURS

SEED = 0
QUICK_DATASET = "digits"
QUICK_DEVICES = 4


@dataclass(frozen=True)
class Recipe:
    """What both implementations share; one object so that neither can drift from the other."""

    dataset: str = "fashion-mnist"
    devices: int = 20
    arch: str = "cnn"
    alpha: float = 1.0
    seed: int = SEED
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    kd_alpha: float = TrainConfig.kd_alpha
    temperature: float = TrainConfig.temperature
    hash_dim: int = 256
    encoder_kind: str = "conv"
    neighbours: int = DEFAULT_NEIGHBOURS

    def train_settings(self) -> dict[str, Any]:
        """The device `TrainConfig` fields the trial gets, spelled out rather than left to defaults."""
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "kd_alpha": self.kd_alpha,
            "temperature": self.temperature,
        }


@dataclass(frozen=True)
class Measurement:
    """One run of one implementation over one epoch."""

    name: str
    wall_s: float  # whole run: data, encoder, hashing, relations, start-up, training, evaluation
    train_s: float  # the training span alone
    samples: int  # training samples over all devices (one epoch)
    maua: float
    relation_s: float | None = None  # the baseline's hnswlib build; ours builds server-side inside its span
    loop_s: float | None = None  # the baseline's per-sample gather and write-back loops, inside train_s
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- the baseline's parts


def demo_relations(vectors: np.ndarray, labels: np.ndarray, *, neighbours: int, seed: int) -> np.ndarray:
    """(N, neighbours) global rows of each sample's same-class neighbours from hnswlib, -1 padded.

    As the demo does: one cosine index per class with M=64, ef_construction=1000, ef=1000, a query for
    k=R+1 and the first hit dropped (taken to be the sample itself). One thread, as the server's faiss runs,
    so the comparison is not about core counts.
    """
    import hnswlib

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.asarray(labels)
    table = np.full((len(labels), neighbours), -1, dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
        index.init_index(max_elements=len(rows), ef_construction=DEMO_EF_CONSTRUCTION, M=DEMO_M, random_seed=seed)
        index.set_num_threads(1)
        index.add_items(vectors[rows], np.arange(len(rows)))
        index.set_ef(DEMO_EF)
        found, _ = index.knn_query(vectors[rows], k=min(neighbours + 1, len(rows)))
        kept = np.asarray(found, dtype=np.int64)[:, 1:]
        table[rows, : kept.shape[1]] = rows[kept]
    return table


def gather_teachers(
    knowledge: np.ndarray, seen: np.ndarray, table: np.ndarray, rows: np.ndarray, *, demo_teacher: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Teachers of a batch, fetched sample by sample and neighbour by neighbour: the demo's hot path.

    The loop is the point of the baseline: for each sample it collects its R neighbours' knowledge
    vectors one by one and averages them. With `demo_teacher` the mean runs over all R vectors, zeros of
    neighbours without knowledge included, and every sample gets that teacher (zero knowledge gives a
    zero teacher, i.e. KL towards uniform), as the demo does. Without it the rule is ours: the mean over
    the neighbours that hold knowledge, and no teacher (mask False, CE only) when none does.
    Returns (teacher float32 (b, C), mask bool (b,)).
    """
    classes = knowledge.shape[1]
    teacher = np.zeros((len(rows), classes), dtype=np.float32)
    mask = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        fetched = []
        contributors = 0
        for neighbour in table[row]:
            if neighbour < 0:
                continue
            fetched.append(knowledge[neighbour])
            contributors += int(seen[neighbour])
        if not fetched:
            continue
        if demo_teacher:
            teacher[i] = np.mean(fetched, axis=0)
            mask[i] = True
        elif contributors:
            teacher[i] = np.sum(fetched, axis=0) / contributors
            mask[i] = True
    return teacher, mask


def write_back(knowledge: np.ndarray, seen: np.ndarray, rows: np.ndarray, logits: np.ndarray) -> None:
    """The batch's logits into the knowledge array one sample at a time, as the demo's update loop does."""
    for i, row in enumerate(rows):
        knowledge[row] = logits[i]
        seen[row] = True


def run_baseline(recipe: Recipe, *, epochs: int = 1, demo_teacher: bool = False) -> Measurement:
    """One process, devices round-robin batch by batch, per-sample loops around `TorchTrainer.step`."""
    import torch

    from edge.data import device_shard, load_dataset
    from edge.hashing import HashEncoder, unpack_binary
    from edge.knowledge import BatchSchedule
    from edge.trainer import TorchTrainer
    from models.encoder import export_encoder_onnx
    from models.loss import LossSettings
    from models.zoo import build_model

    started = time.perf_counter()
    torch.set_num_threads(1)
    dataset = load_dataset(recipe.dataset)
    shards = [
        device_shard(dataset, num_devices=recipe.devices, alpha=recipe.alpha, seed=recipe.seed, index=index)
        for index in range(recipe.devices)
    ]
    with tempfile.TemporaryDirectory(prefix="trial-speed-encoder-") as tmp:
        path = export_encoder_onnx(
            Path(tmp) / "encoder.onnx",
            input_shape=dataset.input_shape,
            dim=recipe.hash_dim,
            seed=recipe.seed,
            kind=recipe.encoder_kind,
        )
        encoder = HashEncoder(path)
        hashes = np.concatenate([encoder.encode(shard.x_train) for shard in shards])
    # The demo's space is cosine over floats: +-1 per bit, so cosine order is Hamming order.
    vectors = np.where(unpack_binary(hashes), 1.0, -1.0).astype(np.float32)
    labels = np.concatenate([shard.y_train for shard in shards])
    offsets = np.cumsum([0] + [len(shard.y_train) for shard in shards[:-1]])

    relation_start = time.perf_counter()
    table = demo_relations(vectors, labels, neighbours=recipe.neighbours, seed=recipe.seed)
    relation_s = time.perf_counter() - relation_start

    trainers = []
    for index in range(recipe.devices):
        torch.manual_seed(recipe.seed * 1000 + index)  # as each device process seeds itself
        model = build_model(
            recipe.arch, classes=dataset.classes, in_channels=dataset.input_shape[0], seed=recipe.seed + index
        )
        trainers.append(
            TorchTrainer(
                model=model,
                lr=recipe.lr,
                momentum=recipe.momentum,
                weight_decay=recipe.weight_decay,
                loss=LossSettings(kd_alpha=recipe.kd_alpha, temperature=recipe.temperature),
            )
        )
    schedules = [
        BatchSchedule(samples=len(shard.y_train), batch_size=recipe.batch_size, epochs=epochs, seed=recipe.seed)
        for shard in shards
    ]
    knowledge = np.zeros((len(labels), dataset.classes), dtype=np.float32)
    seen = np.zeros(len(labels), dtype=bool)

    loop_s = 0.0
    train_start = time.perf_counter()
    for position in range(max(len(schedule) for schedule in schedules)):
        for shard, schedule, trainer, offset in zip(shards, schedules, trainers, offsets, strict=True):
            if position >= len(schedule):
                continue
            batch = schedule.batches[position]
            rows = offset + batch
            loop_start = time.perf_counter()
            teacher, mask = gather_teachers(knowledge, seen, table, rows, demo_teacher=demo_teacher)
            loop_s += time.perf_counter() - loop_start
            logits = trainer.step(shard.x_train[batch], shard.y_train[batch], teacher, mask)
            loop_start = time.perf_counter()
            write_back(knowledge, seen, rows, logits)
            loop_s += time.perf_counter() - loop_start
    train_s = time.perf_counter() - train_start

    maua = float(np.mean([t.accuracy(s.x_test, s.y_test) for t, s in zip(trainers, shards, strict=True)]))
    return Measurement(
        name="baseline (demo structure, per-sample loops)",
        wall_s=time.perf_counter() - started,
        train_s=train_s,
        samples=len(labels) * epochs,
        maua=maua,
        relation_s=relation_s,
        loop_s=loop_s,
    )


# ---------------------------------------------------------------- ours


def training_span(report: dict[str, Any]) -> float | None:
    """Seconds from the first device's first metrics message to the last device's 'done' message.

    Each device reports once when it starts training (after registration) and once when done, so this
    span leaves out what a trial spends before training: exporting the encoder, starting the broker and
    server, spawning the device processes, hashing and registering. None when the history lacks either end.
    """
    history = report.get("history") or []
    starts = [m["trial_time_s"] for m in history if "trial_time_s" in m]
    ends = [m["trial_time_s"] for m in history if m.get("done") and "trial_time_s" in m]
    if not starts or not ends:
        return None
    return max(ends) - min(starts)


def run_ours(recipe: Recipe, *, out: Path, epochs: int = 1) -> Measurement:
    """A real trial: private Mosquitto, cache server, one process per device (each on one torch thread)."""
    from android_harness.trial import TrialSettings, run_trial

    settings = TrialSettings(
        out=out,
        dataset=recipe.dataset,
        devices=recipe.devices,
        epochs=epochs,
        archs=(recipe.arch,),
        alpha=recipe.alpha,
        seed=recipe.seed,
        hash_dim=recipe.hash_dim,
        encoder_kind=recipe.encoder_kind,
        extra_train=recipe.train_settings(),
        neighbours=recipe.neighbours,
    )
    report = run_trial(settings, progress=False)
    span = training_span(report)
    notes = () if span is not None else ("no metrics history: training span is the whole wall time",)
    return Measurement(
        name="ours (trial: processes + MQTT + cache server)",
        wall_s=float(report["wall_s"]),
        train_s=float(report["wall_s"]) if span is None else span,
        samples=sum(int(d["train_samples"]) for d in report["devices"]) * epochs,
        maua=float(report["maua"]),
        notes=notes,
    )


# ---------------------------------------------------------------- report


def _median_of(runs: list[Measurement]) -> Measurement:
    """Median of every figure over repeats (the host is shared: one descheduled run must not move it)."""
    relation = [r.relation_s for r in runs if r.relation_s is not None]
    loops = [r.loop_s for r in runs if r.loop_s is not None]
    return Measurement(
        name=runs[0].name,
        wall_s=median(r.wall_s for r in runs),
        train_s=median(r.train_s for r in runs),
        samples=runs[0].samples,
        maua=median(r.maua for r in runs),
        relation_s=median(relation) if relation else None,
        loop_s=median(loops) if loops else None,
        notes=tuple(dict.fromkeys(n for r in runs for n in r.notes)),
    )


def format_table(ours: Measurement, baseline: Measurement) -> str:
    """Markdown table of both implementations; ratios are baseline over ours, so above 1 means ours is faster."""
    rows = []
    for m in (ours, baseline):
        rows.append(
            (
                m.name,
                f"{m.wall_s:.1f}",
                f"{m.train_s:.1f}",
                "-" if m.relation_s is None else f"{m.relation_s:.2f}",
                "-" if m.loop_s is None else f"{m.loop_s:.2f}",
                f"{m.samples / m.train_s:,.0f}" if m.train_s > 0 else "-",
                f"{m.train_s / ours.train_s:.2f}x",
                f"{m.wall_s / ours.wall_s:.2f}x",
                f"{m.maua:.4f}",
            )
        )
    headers = (
        "implementation",
        "wall s (whole run)",
        "training span s",
        "relation build s",
        "per-sample loops s (in span)",
        "samples/s (training)",
        "span vs ours",
        "wall vs ours",
        "MAUA after the epoch",
    )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trial_speed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_DATASET}, {QUICK_DEVICES} devices, 1 epoch: about a minute"
    )
    parser.add_argument("--arch", default="cnn", help="model of every device (models.zoo.ARCHITECTURES)")
    parser.add_argument("--dataset", default=None, help="default fashion-mnist (digits with --quick)")
    parser.add_argument("--devices", type=int, default=None, help=f"default 20 ({QUICK_DEVICES} with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each implementation (median reported)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--demo-teacher",
        action="store_true",
        help="baseline averages over all R neighbours, zeros included, and distils every sample as the demo "
        "does (default: ours' rule, mean over neighbours with knowledge, CE only when none has any)",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the trials' reports go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    recipe = Recipe(
        dataset=args.dataset or (QUICK_DATASET if args.quick else "fashion-mnist"),
        devices=args.devices or (QUICK_DEVICES if args.quick else 20),
        arch=args.arch,
        seed=args.seed,
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-trial-speed-"))

    started = time.perf_counter()
    print(f"# trial_speed: {machine_line()}")
    ours_runs, baseline_runs = [], []
    for repeat in range(args.repeats):
        ours_runs.append(run_ours(recipe, out=out / f"trial-{repeat}"))
        baseline_runs.append(run_baseline(recipe, demo_teacher=args.demo_teacher))
    ours, baseline = _median_of(ours_runs), _median_of(baseline_runs)
    teacher_rule = "the demo's (mean over all R, zeros included)" if args.demo_teacher else "ours (mean over holders)"
    print(
        f"{recipe.dataset}, {recipe.devices} devices, 1 epoch, Dirichlet alpha={recipe.alpha}, arch {recipe.arch}, "
        f"batch {recipe.batch_size}, lr {recipe.lr}, momentum {recipe.momentum}, wd {recipe.weight_decay}, "
        f"alpha {recipe.kd_alpha}, T {recipe.temperature}, R={recipe.neighbours}, {recipe.encoder_kind} encoder "
        f"{recipe.hash_dim} bits, one torch thread per process; median of {args.repeats} run(s) each; "
        f"baseline teacher rule: {teacher_rule}; trial reports under {out}\n"
    )
    print(format_table(ours, baseline))
    for note in ours.notes + baseline.notes:
        print(f"\nnote: {note}")
    print(
        "\nwall: the whole run (ours: broker, server, device processes, registration; baseline: data, hashing, "
        "relations). Training span: ours from the first device's start report to the last one's done report "
        "(relation builds run server-side inside it); baseline: the round-robin loop alone."
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
