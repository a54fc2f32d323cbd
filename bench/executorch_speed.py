"""ExecuTorch training vs PyTorch eager per model, the speed ladder of graph choices, and a device's footprint.

`python -m bench.executorch_speed [--quick]` prints, per zoo model: the median step time of the ExecuTorch
training program and of eager PyTorch (batch 8, one thread, same process, interleaved rounds), their ratio,
ONNX Runtime vs eager inference latency, artifact sizes, and the peak RSS of a device-like process per
backend (measured in subprocesses that import only what that backend needs). `--ladder` also exports the
small CNN once per graph choice (docs/export.md "Speed of the ExecuTorch path") to show what each bought.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

BATCH = 8
CLASSES = 10


def _batches(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> list[tuple[np.ndarray, ...]]:
    return [
        (
            rng.standard_normal((BATCH, *shape), dtype=np.float32),
            rng.integers(0, CLASSES, BATCH),
            rng.standard_normal((BATCH, CLASSES), dtype=np.float32),
            rng.random(BATCH) < 0.7,
        )
        for _ in range(count)
    ]


def _median_ms(fn, batches: list, rounds: int) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        for batch in batches:
            start = time.perf_counter()
            fn(*batch)
            times.append((time.perf_counter() - start) * 1000)
    return times


def step_times(et_trainer, torch_trainer, shape: tuple[int, int, int], *, steps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Medians (ms) of ExecuTorch and eager steps on the same batches, alternating short rounds (fair under load)."""
    batches = _batches(np.random.default_rng(0), shape, 5)
    _median_ms(et_trainer.step, batches, 1)  # warm-up
    _median_ms(torch_trainer.step, batches, 1)
    et, eager = [], []
    for _ in range(max(1, steps // len(batches))):
        et += _median_ms(et_trainer.step, batches, 1)
        eager += _median_ms(torch_trainer.step, batches, 1)
    return float(np.median(et)), float(np.median(eager))


def inference_latency(onnx_bytes: bytes, model, shape: tuple[int, int, int], *, batch: int, repeats: int) -> tuple:  # type: ignore[no-untyped-def]
    """Median ms of ONNX Runtime (one thread) and eager PyTorch (one thread, no_grad) on one batch."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((batch, *shape), dtype=np.float32)
    model = model.eval()
    tensor = torch.from_numpy(x)

    def ort_run() -> None:
        session.run(None, {"images": x})

    def torch_run() -> None:
        with torch.no_grad():
            model(tensor)

    for fn in (ort_run, torch_run):
        fn()
    ort_times, torch_times = [], []
    for _ in range(repeats):
        for fn, sink in ((ort_run, ort_times), (torch_run, torch_times)):
            start = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - start) * 1000)
    return float(np.median(ort_times)), float(np.median(torch_times))


def _child_rss(backend: str, *, arch: str, shape: tuple[int, int, int], artifacts: Path, steps: int) -> dict:
    """Run a device-like training loop in a fresh interpreter and read its peak RSS and loaded libraries."""
    command = [
        sys.executable,
        "-m",
        "bench.executorch_speed",
        "--child",
        backend,
        "--arch",
        arch,
        "--shape",
        ",".join(map(str, shape)),
        "--artifacts",
        str(artifacts),
        "--steps",
        str(steps),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mapped_libraries() -> dict[str, float]:
    """MiB of shared libraries this process mapped, by top-level site-packages package (what must be installed)."""
    seen: set[str] = set()
    sizes: dict[str, float] = {}
    with open("/proc/self/maps") as handle:
        for line in handle:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if ".so" not in path or path in seen or not os.path.exists(path):
                continue
            seen.add(path)
            key = path.split("site-packages/")[1].split("/")[0] if "site-packages/" in path else "system"
            sizes[key] = sizes.get(key, 0.0) + os.path.getsize(path) / 2**20
    return {k: round(v, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])}


def _peak_rss_mib() -> float:
    """VmHWM: the peak RSS of this process image (ru_maxrss would include the parent's, kept across exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# executorch 1.5.1's declared dependencies (and ONNX): an ExecuTorch device must run without any of them,
# which proves `pip install --no-deps executorch==1.5.1` (+ torch, numpy) is enough for it.
EXECUTORCH_ONLY_DEPS = frozenset(
    {
        "coremltools", "expecttest", "flatbuffers", "hydra", "hypothesis", "kgb", "omegaconf", "pandas",
        "parameterized", "pytorch_tokenizers", "requests", "ruamel", "sklearn", "tabulate", "torchao", "yaml",
        "cpuinfo", "onnx", "onnxruntime",
    }
)  # fmt: skip


class _BlockImports(importlib.abc.MetaPathFinder):
    """Make importing any of `names` fail, as if the package were not installed."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not part of the device install")
        return None


def install_footprint() -> dict[str, float]:
    """MiB on disk of the packages a device needs, and of the ExecuTorch runtime files it actually loads."""
    import importlib.util

    sizes: dict[str, float] = {}
    for package in ("torch", "executorch", "numpy", "onnxruntime"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        sizes[package] = round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 1)
        if package == "executorch":
            runtime = [*root.glob("lib/*.so"), *root.glob("extension/pybindings/_C*.so")]
            runtime += root.glob("extension/training/pybindings/_training_lib*.so")
            sizes["executorch runtime files"] = round(sum(f.stat().st_size for f in runtime) / 2**20, 1)
    return sizes


def child(backend: str, *, arch: str, shape: tuple[int, int, int], artifacts: Path, steps: int) -> None:
    """A device process for one backend: import what it needs, train `steps` steps, evaluate, report."""
    if backend == "executorch":
        sys.meta_path.insert(0, _BlockImports(EXECUTORCH_ONLY_DEPS))
    start = time.perf_counter()
    from edge.backends import make_trainer
    from models.loss import LossSettings

    trainer = make_trainer(
        backend=backend,
        arch=arch,
        classes=CLASSES,
        in_channels=shape[0],
        seed=0,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        loss=LossSettings(),
        artifacts_dir=artifacts,
        input_shape=shape,
    )
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    ready = time.perf_counter() - start
    for batch in _batches(np.random.default_rng(0), shape, steps):
        trainer.step(*batch)
    trainer.predict(np.zeros((256, *shape), np.float32))
    report = {
        "peak_rss_mib": _peak_rss_mib(),
        "startup_s": ready,
        "exir_imported": "executorch.exir" in sys.modules,
        "blocked_executorch_deps": backend == "executorch",
        "libraries_mib": _mapped_libraries(),
    }
    print(json.dumps(report))


def measure_model(arch: str, shape: tuple[int, int, int], *, artifacts: Path, steps: int, rss: bool) -> dict:
    """Export (if needed) and measure one architecture."""
    import torch

    from edge.backends import make_trainer
    from export.artifacts import ModelSpec, export_model_artifacts
    from export.onnx_export import model_to_onnx_bytes
    from models.loss import LossSettings
    from models.manifest import read_manifest
    from models.zoo import build_model

    torch.set_num_threads(1)
    spec = ModelSpec(arch=arch, classes=CLASSES, input_shape=shape)
    if not any(r.architecture == arch and r.input_shape == shape for r in read_manifest(artifacts)):
        export_model_artifacts(spec, artifacts)
    records = {r.kind: r for r in read_manifest(artifacts) if r.architecture == arch and r.input_shape == shape}
    common = {
        "arch": arch,
        "classes": CLASSES,
        "in_channels": shape[0],
        "seed": 0,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "loss": LossSettings(),
        "artifacts_dir": artifacts,
        "input_shape": shape,
    }
    et_ms, eager_ms = step_times(
        make_trainer(backend="executorch", **common), make_trainer(backend="torch", **common), shape, steps=steps
    )
    model = build_model(arch, classes=CLASSES, in_channels=shape[0], seed=0)
    onnx_bytes = model_to_onnx_bytes(model, input_shape=shape)
    latency = {f"b{b}": inference_latency(onnx_bytes, model, shape, batch=b, repeats=max(10, steps)) for b in (1, 32)}
    row = {
        "arch": arch,
        "et_step_ms": et_ms,
        "eager_step_ms": eager_ms,
        "ratio": et_ms / eager_ms,
        "ort_vs_torch_ms": latency,
        "sizes_kib": {k: round(r.size_bytes / 1024, 1) for k, r in records.items()},
        "delegated_calls": records["executorch-training"].metadata.get("delegated_calls"),
    }
    if rss:
        row["rss"] = {
            b: _child_rss(b, arch=arch, shape=shape, artifacts=artifacts, steps=20) for b in ("torch", "executorch")
        }
    return row


def ladder(shape: tuple[int, int, int], *, steps: int) -> list[dict]:
    """The small CNN's training program under each cumulative graph choice, against eager in the same run."""
    import torch

    from edge.backends import TorchBackendTrainer
    from edge.et_trainer import ExecuTorchTrainer
    from export.et_graph import PORTABLE
    from export.executorch_export import export_training_program
    from models.loss import LossSettings
    from models.zoo import build_model

    torch.set_num_threads(1)
    rungs = [
        ("portable kernels (+ the two required rewrites)", PORTABLE),
        ("+ convolutions as im2col + GEMM (portable/optimized mm)", replace(PORTABLE, gemm_convolution=True)),
        ("+ XNNPACK delegate (static-weight GEMM rules)", replace(PORTABLE, gemm_convolution=True, xnnpack=True)),
        (
            "+ XNNPACK GEMMs with weights as inputs",
            replace(PORTABLE, gemm_convolution=True, xnnpack=True, dynamic_weight_gemm=True),
        ),
    ]
    full = rungs[-1][1]
    full = replace(full, relu_mask_backward=True)
    rungs.append(("+ ReLU backward as mul by ceil(clamp(out,0,1))", full))
    full = replace(full, window_max_pool=True)
    rungs.append(("+ max pool as XNNPACK maxima over windows", full))
    full = replace(full, common_subexpressions=True)
    rungs.append(("+ common-subexpression elimination (= default)", full))
    model = build_model("cnn", classes=CLASSES, in_channels=shape[0], seed=0)
    rows = []
    for label, options in rungs:
        program = export_training_program(
            model, input_shape=shape, classes=CLASSES, loss=LossSettings(), options=options
        )
        et = ExecuTorchTrainer(
            program=program.buffer, metadata=program.metadata(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )
        eager = TorchBackendTrainer(
            model=build_model("cnn", classes=CLASSES, in_channels=shape[0], seed=0),
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            loss=LossSettings(),
        )
        et_ms, eager_ms = step_times(et, eager, shape, steps=steps)
        rows.append(
            {
                "step": label,
                "et_step_ms": et_ms,
                "eager_step_ms": eager_ms,
                "ratio": et_ms / eager_ms,
                "delegated_calls": program.delegated_calls,
            }
        )
    return rows


def _print_tables(rows: list[dict], ladder_rows: list[dict], shape: tuple[int, int, int]) -> None:
    print(f"\ninput {shape}, batch {BATCH}, one thread; medians")
    header = f"{'model':10s} {'ET ms':>8s} {'eager ms':>9s} {'ratio':>6s} | {'ORT b1':>7s} {'torch b1':>8s}"
    print(header + f" {'ORT b32':>8s} {'torch b32':>9s} | sizes KiB (onnx / pte / train.pte)")
    for r in rows:
        lat, s = r["ort_vs_torch_ms"], r["sizes_kib"]
        print(
            f"{r['arch']:10s} {r['et_step_ms']:8.2f} {r['eager_step_ms']:9.2f} {r['ratio']:6.2f} | "
            f"{lat['b1'][0]:7.3f} {lat['b1'][1]:8.3f} {lat['b32'][0]:8.3f} {lat['b32'][1]:9.3f} | "
            f"{s.get('onnx')} / {s.get('executorch-inference')} / {s.get('executorch-training')}"
        )
    if rows and "rss" in rows[0]:
        print(
            "\npeak RSS of a device process (20 steps + one 256-sample evaluation), MiB;"
            " startup s; libraries mapped MiB"
        )
        for r in rows:
            for backend, info in r["rss"].items():
                print(
                    f"{r['arch']:10s} {backend:10s} {info['peak_rss_mib']:7.1f}  start {info['startup_s']:5.2f}s"
                    f"  exir imported: {info['exir_imported']}  libs {json.dumps(info['libraries_mib'])}"
                )
    if ladder_rows:
        print("\nspeed ladder (cnn):")
        for r in ladder_rows:
            print(
                f"  {r['step']:58s} ET {r['et_step_ms']:8.2f} ms  eager {r['eager_step_ms']:6.2f} ms"
                f"  ratio {r['ratio']:6.2f}  delegate calls {r['delegated_calls']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.executorch_speed", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="cnn and resnet8 on 1x8x8, few steps, no ladder")
    parser.add_argument("--ladder", action="store_true", help="also measure each graph choice on the cnn")
    parser.add_argument("--shape", default="1,28,28")
    parser.add_argument("--archs", default="cnn,resnet8,resnet16,resnet20,mobilenet")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--artifacts", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=("torch", "executorch"), help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    if args.child:
        child(args.child, arch=args.arch, shape=shape, artifacts=args.artifacts, steps=args.steps)  # type: ignore[arg-type]
        return 0
    archs = args.archs.split(",")
    steps = args.steps
    if args.quick:
        shape, archs, steps = (1, 8, 8), ["cnn", "resnet8"], 10
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifacts or Path(tmp)
        rows = [measure_model(a, shape, artifacts=artifacts, steps=steps, rss=True) for a in archs]  # type: ignore[arg-type]
        ladder_rows = ladder(shape, steps=steps) if args.ladder and not args.quick else []  # type: ignore[arg-type]
    _print_tables(rows, ladder_rows, shape)  # type: ignore[arg-type]
    footprint = install_footprint()
    print(f"\ninstalled size, MiB: {json.dumps(footprint)}")
    if args.json:
        figures = {"shape": shape, "models": rows, "ladder": ladder_rows, "install_mib": footprint}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
