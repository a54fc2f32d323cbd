"""Sanity check: a device's test accuracy under `--algorithm local` equals a plain PyTorch loop's on its shard.

A local trial (`android_harness.trial.run_trial`, CE only, one process per device, nothing exchanged) must
learn what the textbook loop learns from the same shard: torch.optim.SGD with the device's lr, momentum,
weight decay, batch size and epochs, `F.cross_entropy`, the same initial weights and the same batch order,
evaluated on the same test split. If the deployment's own loop (its SGD, schedule, checkpoints, reports)
lost accuracy anywhere, every FedCache-vs-local figure would be measured against a handicapped baseline.

How it controls for noise: per-device accuracy on a few hundred test samples moves by about a point between
seeds, so both sides are seeded identically (initial weights from the device's model seed, each epoch's
order from `numpy.random.default_rng(train.seed).permutation`, no augmentation on either side) and the
plain loop reads every setting from the very `device.toml` the trial's device ran. What can still differ is
floating-point order only, so the per-device difference is expected to be about zero, and the verdict is on
the mean over the checked devices. `--noise-seeds K` also trains each device with K other batch orders, to
print how far accuracy moves with the seed alone (the scale a real bug would have to hide under).

    python -m bench sanity [--quick] [--max-samples 0] [--archs resnet8] [--check 0,5,7] [--noise-seeds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, pstdev

import numpy as np
import torch
from torch.nn import functional as F

from bench._report import machine_line, markdown_table
from edge.algorithms import model_seed
from edge.config import DeviceConfig, load_config
from edge.data import PARTITIONS, Shard, device_shard, limit_train_samples, load_dataset
from models.zoo import build_model

# The demo's setting (android_harness/demo.py, README "Measured"): 20 devices on FashionMNIST, the paper's
# heterogeneous ResNets, 250 training samples each, 10 epochs, evaluation every 2 epochs.
DATASET = "fashion-mnist"
DEVICES = 20
EPOCHS = 10
ARCHS = ("resnet8", "resnet16", "resnet20")
MAX_SAMPLES = 250
EVAL_EVERY = 2
TOLERANCE_POINTS = 0.3
QUICK = {"dataset": "digits", "devices": 3, "epochs": 2, "archs": "resnet8,cnn", "max_samples": 0, "eval_every": 1}


@dataclass(frozen=True)
class Plain:
    """One device's plain-loop run: its final test accuracy and the wall seconds it took."""

    accuracy: float
    wall_s: float


def device_data(config: DeviceConfig) -> Shard:
    """The shard the device trained on, derived from its config as the device derives it."""
    data, train = config.data, config.train
    shard = device_shard(
        load_dataset(data.dataset),
        num_devices=data.num_devices,
        alpha=data.alpha,
        seed=data.seed,
        index=data.index,
        partition=data.partition,
    )
    return limit_train_samples(shard, max_samples=train.max_samples, seed=data.seed)


def plain_accuracy(config: DeviceConfig, *, order_seed: int | None = None) -> Plain:
    """Train the device's shard in a textbook loop (torch.optim.SGD, cross-entropy only); its test accuracy.

    `order_seed` replaces the batch-order seed (train.seed) to measure seed noise; the weights stay the device's.
    """
    started = time.perf_counter()
    torch.set_num_threads(1)  # as every device process runs
    train = config.train
    shard = device_data(config)
    model = build_model(train.arch, classes=shard.classes, in_channels=shard.input_shape[0], seed=model_seed(config))
    optimiser = torch.optim.SGD(
        model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
    x, y = torch.from_numpy(np.ascontiguousarray(shard.x_train)), torch.from_numpy(shard.y_train)
    orders = np.random.default_rng(train.seed if order_seed is None else order_seed)
    for _ in range(train.epochs):
        model.train()
        order = torch.from_numpy(orders.permutation(len(y)))
        for start in range(0, len(y), train.batch_size):  # consecutive batches, the last one partial
            batch = order[start : start + train.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    model.eval()
    if not len(shard.y_test):
        return Plain(accuracy=0.0, wall_s=time.perf_counter() - started)  # as TorchTrainer.accuracy reports it
    with torch.no_grad():
        x_test = torch.from_numpy(np.ascontiguousarray(shard.x_test))
        logits = torch.cat([model(x_test[start : start + 512]) for start in range(0, len(x_test), 512)])
    accuracy = float((logits.argmax(dim=1).numpy() == shard.y_test).mean())
    return Plain(accuracy=accuracy, wall_s=time.perf_counter() - started)


def verdict(differences: list[float], *, tolerance: float) -> tuple[bool, str]:
    """PASS when the mean trial-minus-plain difference (points) is within the tolerance; the line to print."""
    if not differences:
        return False, "FAIL: no device was compared"
    gap = mean(differences)
    ok = abs(gap) <= tolerance
    worst = max(differences, key=abs)
    return ok, (
        f"{'PASS' if ok else 'FAIL'}: trial - plain = {gap:+.2f} points on average over {len(differences)} devices "
        f"(tolerance {tolerance}); largest single difference {worst:+.2f}, "
        f"{sum(d == 0 for d in differences)} of {len(differences)} identical"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench sanity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 3 devices, 2 epochs, whole shards (smoke)")
    parser.add_argument("--dataset", default=DATASET, choices=["fashion-mnist", "digits"])
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--archs", default=",".join(ARCHS), help="assigned round-robin (default: %(default)s)")
    parser.add_argument("--max-samples", type=int, default=MAX_SAMPLES, help="per device; 0 = whole shards")
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="the trial's devices evaluate this often")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partition", default="dirichlet", choices=PARTITIONS)
    parser.add_argument("--check", default="all", help="device indices to train plainly, e.g. 0,3,7 (default all)")
    parser.add_argument("--noise-seeds", type=int, default=0, help="also train each with this many other orders")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_POINTS, help="points, on the mean difference")
    parser.add_argument("--out", type=Path, help="the trial's directory (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def _checked(spec: str, devices: int) -> list[int]:
    if spec == "all":
        return list(range(devices))
    indices = [int(part) for part in spec.split(",") if part.strip()]
    if not indices or any(not 0 <= i < devices for i in indices):
        raise SystemExit(f"--check {spec!r}: indices must lie in [0, {devices})")
    return indices


def run(args: argparse.Namespace, out: Path) -> int:
    """The trial, then the plain loop per checked device; prints the table and the verdict, returns the exit status."""
    from android_harness.trial import TrialSettings, run_trial  # the harness only where the check runs

    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    settings = TrialSettings(
        out=out,
        dataset=args.dataset,
        devices=args.devices,
        epochs=args.epochs,
        algorithm="local",
        archs=archs,
        alpha=args.alpha,
        seed=args.seed,
        partition=args.partition,
        extra_train={"max_samples": args.max_samples, "eval_every_epochs": args.eval_every},
        timeout_s=args.timeout,
    )
    checked = _checked(args.check, args.devices)
    print(f"machine: {machine_line()}")
    print(
        f"setting: {args.devices} devices on {args.dataset} ({args.partition}, alpha {args.alpha}), "
        f"{'/'.join(archs)}, {args.epochs} epochs, "
        f"{f'{args.max_samples} training samples each' if args.max_samples else 'whole shards'}, seed {args.seed}",
        flush=True,
    )
    started = time.perf_counter()
    report = run_trial(settings, progress=False)
    trial_wall = time.perf_counter() - started
    by_id = {d["id"]: d for d in report["devices"]}
    rows, differences, noise = [], [], []
    plain_wall = 0.0
    for index in checked:
        config = load_config(out / "devices" / f"dev{index:03d}" / "device.toml")
        trial_acc = float(by_id[config.id]["accuracy"])
        plain = plain_accuracy(config)
        plain_wall += plain.wall_s
        difference = 100 * (trial_acc - plain.accuracy)
        differences.append(difference)
        others = [
            plain_accuracy(config, order_seed=config.train.seed + 1 + k).accuracy for k in range(args.noise_seeds)
        ]
        spread = f"{100 * pstdev([plain.accuracy, *others]):.2f}" if others else "-"
        noise += [100 * (o - plain.accuracy) for o in others]
        rows.append(
            [
                config.id,
                config.train.arch,
                by_id[config.id]["train_samples"],
                by_id[config.id]["test_samples"],
                f"{trial_acc:.4f}",
                f"{plain.accuracy:.4f}",
                f"{difference:+.2f}",
                spread,
            ]
        )
        print(f"  {config.id}: trial {trial_acc:.4f} plain {plain.accuracy:.4f} ({plain.wall_s:.0f} s)", flush=True)
    headers = ["device", "arch", "train", "test", "local trial", "plain loop", "trial - plain (points)"]
    print(markdown_table([*headers, "std over seeds (points)"], rows))
    if noise:
        moved = mean(map(abs, noise))
        print(f"seed noise: another batch order moves a device's accuracy by {moved:.2f} points on average")
    ok, line = verdict(differences, tolerance=args.tolerance)
    print(
        f"trial MAUA {report['maua']:.4f}, wall {trial_wall:.0f} s; plain loops {plain_wall:.0f} s; "
        f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end"
    )
    print(line)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.out is not None:
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="sanity-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
