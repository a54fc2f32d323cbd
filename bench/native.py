"""Native (C++) device against the Python ExecuTorch device, same run: peak RSS, installed size, step time, parity.

    python -m bench native                     # digits, cnn at 1x8x8, 3 epochs per device process
    python -m bench native --trial             # also MAUA of a half-native trial against an all-Python one
    python -m bench native --json runs/native.json

Both devices train the same exported .train.pte. Device processes run one after the other against one private
Mosquitto and cache server (never side by side, so neither steals the other's CPU); peak RSS is the process's
VmHWM, polled from /proc until it exits. Step times come from interleaved rounds of the same batches through
ExecuTorchTrainer.step (a Python child process, as a device runs it) and through fedcache-train-check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}


def _vmhwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _run_device(command: list[str], log: Path) -> tuple[int, float, float]:
    """(exit status, peak RSS MiB, wall seconds) of one device process run to its end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env=env, cwd=ROOT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _vmhwm_kib(process.pid))
            time.sleep(0.02)
    return process.returncode, peak / 1024, time.monotonic() - started


def _step_child(program: Path, record_path: Path, batches: Path, init: Path, repeat: int) -> None:
    """A Python ExecuTorch device's training steps (ExecuTorchTrainer, as edge/backends.py builds it)."""
    from android_harness.native import read_weights
    from edge.et_trainer import ExecuTorchTrainer

    record = json.loads(record_path.read_text())
    trainer = ExecuTorchTrainer(program=program, metadata=record["metadata"], initial_state=read_weights(init),
                                **SETTINGS)  # fmt: skip
    x, y = np.load(batches / "x.npy"), np.load(batches / "y.npy")
    teacher, mask, sizes = (
        np.load(batches / "teacher.npy"),
        np.load(batches / "mask.npy"),
        np.load(batches / "sizes.npy"),
    )
    total, steps = 0.0, 0
    for _ in range(repeat):
        at = 0
        for n in sizes:
            start = time.perf_counter()
            trainer.step(x[at : at + n], y[at : at + n], teacher[at : at + n], mask[at : at + n] > 0)
            total += time.perf_counter() - start
            steps += 1
            at += n
    print(json.dumps({"step_ms": total / steps * 1000, "steps": steps}))


def _step_times(program: Path, record: dict[str, Any], work: Path, *, rounds: int, repeat: int) -> dict[str, Any]:
    from android_harness.native import TRAIN_CHECK_BINARY, write_batches, write_names, write_weights
    from edge.backends import make_trainer
    from models.loss import LossSettings

    shape = tuple(record["input_shape"])
    start = make_trainer(backend="torch", arch=record["architecture"], classes=record["classes"],
                         in_channels=shape[0], seed=3, loss=LossSettings(), artifacts_dir=program.parent,
                         **SETTINGS).state_dict()  # fmt: skip
    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((8, *shape)).astype(np.float32), rng.integers(0, record["classes"], 8),
         rng.standard_normal((8, record["classes"])).astype(np.float32), (rng.random(8) < 0.5).astype(np.float32))
        for _ in range(20)
    ]  # fmt: skip
    write_batches(work / "batches", batches)
    write_weights(work / "init.fcw", start)
    write_names(work / "names.txt", record["metadata"])
    (work / "record.json").write_text(json.dumps(record))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    native_ms, python_ms = [], []
    for _ in range(rounds):  # interleaved, so load on this shared machine hits both alike
        out = subprocess.run(
            [str(TRAIN_CHECK_BINARY), "--program", str(program), "--names", str(work / "names.txt"), "--weights",
             str(work / "init.fcw"), "--batches", str(work / "batches"), "--repeat", str(repeat)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        native_ms.append(json.loads(out.stdout.strip().splitlines()[-1])["step_ms"])
        out = subprocess.run(
            [sys.executable, "-m", "bench.native", "--step-child", str(program), str(work / "record.json"),
             str(work / "batches"), str(work / "init.fcw"), str(repeat)],
            capture_output=True, text=True, check=True, env=env, cwd=ROOT,
        )  # fmt: skip
        python_ms.append(json.loads(out.stdout.strip().splitlines()[-1])["step_ms"])
    return {
        "native_step_ms": statistics.median(native_ms),
        "python_step_ms": statistics.median(python_ms),
        "ratios": [n / p for n, p in zip(native_ms, python_ms, strict=True)],
    }


def _parity(program: Path, record: dict[str, Any], work: Path) -> float:
    """Max relative parameter error of 10 native steps against PyTorch's (the export's error measure)."""
    from android_harness.native import TRAIN_CHECK_BINARY, read_weights
    from edge.backends import make_trainer
    from models.loss import LossSettings

    shape = tuple(record["input_shape"])
    torch_trainer = make_trainer(backend="torch", arch=record["architecture"], classes=record["classes"],
                                 in_channels=shape[0], seed=3, loss=LossSettings(), artifacts_dir=program.parent,
                                 **SETTINGS)  # fmt: skip
    subprocess.run(
        [str(TRAIN_CHECK_BINARY), "--program", str(program), "--names", str(work / "names.txt"), "--weights",
         str(work / "init.fcw"), "--batches", str(work / "batches"), "--out", str(work / "out.fcw")],
        capture_output=True, check=True,
    )  # fmt: skip
    x, y = np.load(work / "batches" / "x.npy"), np.load(work / "batches" / "y.npy")
    teacher, mask = np.load(work / "batches" / "teacher.npy"), np.load(work / "batches" / "mask.npy")
    at = 0
    for n in np.load(work / "batches" / "sizes.npy"):
        torch_trainer.step(x[at : at + n], y[at : at + n], teacher[at : at + n], mask[at : at + n] > 0)
        at += n
    native, expected = read_weights(work / "out.fcw"), torch_trainer.state_dict()
    return max(float(np.abs(native[k] - expected[k]).max()) / max(1.0, float(np.abs(expected[k]).max()))
               for k in expected)  # fmt: skip


def _python_install_mib() -> float:
    """What a Python ExecuTorch device installs at least: torch, executorch, numpy (+ numpy.libs)."""
    import importlib.util

    total = 0
    site = Path(next(iter(importlib.util.find_spec("numpy").submodule_search_locations))).parent  # type: ignore[union-attr]
    for name in ("torch", "executorch", "numpy", "numpy.libs", "torch.libs"):
        root = site / name
        if root.is_dir():
            total += sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return total / 2**20


def _devices(artifacts: Path, work: Path, *, epochs: int) -> dict[str, Any]:
    from android_harness.native import device_command as native_command
    from android_harness.native import prepare_native_device
    from android_harness.processes import device_command
    from broker_server.handlers import CacheService
    from broker_server.mqtt_server import CacheServer
    from edge.config import DataConfig, DeviceConfig, HashConfig, TrainConfig, config_to_toml
    from fedwire.mosquitto import MosquittoBroker

    rows: dict[str, Any] = {}
    with MosquittoBroker(data_dir=work / "mosquitto") as broker:
        service = CacheService.open(None)
        server = CacheServer(service=service, address=broker.address, client_id=f"bench-native-{time.time_ns()}")
        server.start()
        try:
            for name in ("python", "native"):
                config = DeviceConfig(
                    id=f"bench-{name}", broker=broker.address.url, state_dir=str(work / name),
                    data=DataConfig(dataset="digits", num_devices=2, index=0),
                    train=TrainConfig(arch="cnn", backend="executorch", eval_backend="executorch", epochs=epochs,
                                      artifacts_dir=str(artifacts)),
                    hash=HashConfig(),
                )  # fmt: skip
                if name == "native":
                    command = native_command(prepare_native_device(config, artifacts=artifacts))
                else:
                    path = work / "python.toml"
                    path.write_text(config_to_toml(config))
                    command = device_command(path)
                status, peak, wall = _run_device(command, work / f"{name}.log")
                report = json.loads((work / name / "last_report.json").read_text())
                rows[name] = {"exit": status, "peak_rss_mib": peak, "wall_s": wall, "accuracy": report["accuracy"],
                              "teacher_coverage": report["teacher_coverage"]}  # fmt: skip
                if name == "native":
                    rows[name]["self_reported_peak_rss_mib"] = report["peak_rss_kib"] / 1024
        finally:
            server.stop()
            service.close()
    return rows


def _trials(work: Path, artifacts: Path, *, devices: int, epochs: int) -> dict[str, float]:
    import shutil

    from android_harness.trial import TrialSettings, run_trial

    maua = {}
    for label, backends in (("all_python_executorch", ("executorch",)), ("half_native", ("executorch", "native"))):
        out = work / label
        shutil.copytree(artifacts, out / "artifacts", dirs_exist_ok=True)
        settings = TrialSettings(out=out, dataset="digits", devices=devices, epochs=epochs, backends=backends)
        maua[label] = float(run_trial(settings, progress=False)["maua"])
    return maua


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench native", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each device process")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved step-time rounds")
    parser.add_argument("--trial", action="store_true", help="also run two digits trials (all Python, half native)")
    parser.add_argument("--trial-devices", type=int, default=8)
    parser.add_argument("--trial-epochs", type=int, default=3)
    parser.add_argument("--artifacts", type=Path, help="export directory to reuse (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step_child:
        program, record, batches, init, repeat = args.step_child
        _step_child(Path(program), Path(record), Path(batches), Path(init), int(repeat))
        return 0
    from android_harness.native import ensure_built, find_training_program
    from android_harness.native_bundle import build_native_bundle
    from edge.backends import make_trainer
    from edge.config import DataConfig, DeviceConfig, TrainConfig
    from models.loss import LossSettings

    ensure_built()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifacts = args.artifacts or work / "artifacts"
        make_trainer(backend="executorch", arch="cnn", classes=10, in_channels=1, seed=0, loss=LossSettings(),
                     artifacts_dir=artifacts, input_shape=(1, 8, 8), **SETTINGS)  # fmt: skip
        program, record = find_training_program(artifacts, arch="cnn", classes=10, input_shape=(1, 8, 8),
                                                 kd_alpha=1.5, temperature=3.0, batch_size=8)  # fmt: skip
        (work / "steps").mkdir()
        steps = _step_times(program, record, work / "steps", rounds=args.rounds, repeat=10)
        parity = _parity(program, record, work / "steps")
        devices = _devices(artifacts, work, epochs=args.epochs)
        bundle = build_native_bundle(
            DeviceConfig(id="bench-bundle", data=DataConfig(dataset="digits", num_devices=2),
                         train=TrainConfig(arch="cnn", backend="executorch")),
            work / "bundle", artifacts=artifacts,
        )  # fmt: skip
        native_install = bundle.total_bytes / 2**20
        runtime_install = sum(f["size"] for n, f in bundle.files.items() if n.startswith(("bin/", "lib/"))) / 2**20
        trials = _trials(work, artifacts, devices=args.trial_devices, epochs=args.trial_epochs) if args.trial else {}
    python_install = _python_install_mib()
    py, nat = devices["python"], devices["native"]
    rows = [
        ("peak RSS of the device process, MiB", nat["peak_rss_mib"], py["peak_rss_mib"], "<= 60 MiB"),
        ("installed size, MiB (native: whole bundle)", native_install, python_install, "<= 25 MiB"),
        ("training step, ms (median of rounds)", steps["native_step_ms"], steps["python_step_ms"], "ratio <= 1"),
        ("device process wall time, s", nat["wall_s"], py["wall_s"], ""),
        ("test accuracy at the end", nat["accuracy"], py["accuracy"], ""),
    ]
    print(f"{'measure':44s} {'native':>10s} {'python ET':>10s} {'ratio':>7s}  target")
    for name, native_value, python_value, target in rows:
        ratio = native_value / python_value if python_value else float("nan")
        print(f"{name:44s} {native_value:10.3f} {python_value:10.3f} {ratio:7.3f}  {target}")
    print(f"native runtime files (bin/ + lib/): {runtime_install:.1f} MiB; native self-reported VmHWM "
          f"{nat['self_reported_peak_rss_mib']:.1f} MiB; step ratios per round: "
          f"{', '.join(f'{r:.2f}' for r in steps['ratios'])}")  # fmt: skip
    print(f"parameters after 20 native steps vs PyTorch: max relative error {parity:.2e} (export tolerance 1e-4)")
    print(f"exit status: native {nat['exit']}, python {py['exit']}; load average {os.getloadavg()[0]:.1f}")
    if trials:
        print(f"MAUA, digits, {args.trial_devices} devices x {args.trial_epochs} epochs: " +
              ", ".join(f"{k} {v:.4f}" for k, v in trials.items()))  # fmt: skip
    if args.json:
        figures = {"devices": devices, "steps": steps, "parity": parity, "install_mib": {
            "native_bundle": native_install, "native_runtime": runtime_install, "python_executorch": python_install},
            "trials": trials}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
