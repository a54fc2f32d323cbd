"""ExecuTorch training backend: runs a FedCache training program (.pte) with ExecuTorch's SGD, same API as TorchTrainer.

A device on this path imports only the runtime: the pybindings extension `_C` and the training
extension `_training_lib` (loaded by file, so `executorch.exir`, the compiler, is never imported; it
costs ~150 MB of RSS and seconds of start-up). The wheel's runtime links libtorch, so torch stays
installed; see docs/export.md for the measured footprint.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

EVAL_BACKENDS = ("executorch", "onnxruntime")
TRAIN_METHOD = "forward"
PREDICT_METHOD = "predict"
FQN_METHOD = "__et_training_fqn_forward"
MODEL_PREFIX = "model."


@dataclass(frozen=True)
class ExecuTorchRuntime:
    """The two native extensions a device needs."""

    pybindings: ModuleType
    training: ModuleType


def _load_extension(name: str, relative: str) -> ModuleType:
    """Load one compiled extension by path, skipping the package __init__ that would pull in exir."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("executorch is not installed (pip install executorch==1.5.1)")
    root = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted((root / relative).parent.glob(Path(relative).name + ".*.so"))
    if not candidates:
        raise ImportError(f"executorch runtime extension {relative} not found under {root}")
    ext_spec = importlib.util.spec_from_file_location(name, candidates[0])
    if ext_spec is None or ext_spec.loader is None:
        raise ImportError(f"cannot load {candidates[0]}")
    module = importlib.util.module_from_spec(ext_spec)
    sys.modules[name] = module
    ext_spec.loader.exec_module(module)
    return module


@cache
def executorch_runtime() -> ExecuTorchRuntime:
    """The runtime extensions, loaded once per process (torch first: they link libtorch)."""
    pybindings = _load_extension("executorch.extension.pybindings._C", "extension/pybindings/_C")
    training = _load_extension(
        "executorch.extension.training.pybindings._training_lib", "extension/training/pybindings/_training_lib"
    )
    return ExecuTorchRuntime(pybindings=pybindings, training=training)


def set_threads(threads: int) -> None:
    """Size ExecuTorch's (XNNPACK's) thread pool; process-wide, like torch.set_num_threads."""
    runtime = executorch_runtime()
    if runtime.pybindings._threadpool_get_thread_count() != threads:
        runtime.pybindings._unsafe_reset_threadpool(threads)


def _strip(name: str) -> str:
    return name[len(MODEL_PREFIX) :] if name.startswith(MODEL_PREFIX) else name


class ExecuTorchTrainer:
    """Trains a device model inside an ExecuTorch training program; TorchTrainer's interface.

    Parameters live in the program's memory: the first `forward` call exposes them (ExecuTorch's training
    API only hands them out then), and SGD updates them in place. Running statistics are the program's
    mutable buffers, read and written by name. `initial_state` (a zoo state dict) replaces the program's
    baked weights, so one program serves every seed and matches TorchTrainer's start exactly.
    """

    def __init__(
        self,
        *,
        program: bytes | Path,
        metadata: Mapping[str, Any] | Path,
        lr: float,
        momentum: float,
        weight_decay: float,
        initial_state: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        eval_backend: str = "executorch",
        onnx_path: Path | None = None,
        threads: int = 1,
    ) -> None:
        if eval_backend not in EVAL_BACKENDS:
            raise ValueError(f"eval_backend must be one of {EVAL_BACKENDS}, got {eval_backend!r}")
        if eval_backend == "onnxruntime" and onnx_path is None:
            raise ValueError("eval_backend 'onnxruntime' needs onnx_path")
        meta: Mapping[str, Any] = json.loads(metadata.read_text()) if isinstance(metadata, Path) else metadata
        buffer = program.read_bytes() if isinstance(program, Path) else program
        runtime = executorch_runtime()
        set_threads(threads)
        self.eval_backend = eval_backend
        self.onnx_path = onnx_path
        self.max_batch = int(meta["max_batch"])
        self.max_eval_batch = int(meta["max_eval_batch"])
        self.buffer_names: tuple[str, ...] = tuple(meta["buffer_names"])
        self.running_stat_names: tuple[str, ...] = tuple(meta["running_stat_names"])
        self._buffer = buffer  # the loaded program points into these bytes: they must outlive it
        self._program = runtime.pybindings._load_program_from_buffer(buffer)
        self._train = self._program.load_method(TRAIN_METHOD)
        # Methods loaded from one pybindings program evidently share planned memory: running predict
        # there overwrote the training method's parameters. A second program instance keeps them apart.
        self._eval_program = runtime.pybindings._load_program_from_buffer(buffer)
        self._predict = self._eval_program.load_method(PREDICT_METHOD)
        fqns = self._program.load_method(FQN_METHOD).call([])
        self.parameter_names: tuple[str, ...] = tuple(_strip(n) for n in fqns)
        if list(self.parameter_names) != list(meta["parameter_names"]):
            raise ValueError("program and metadata disagree on the parameter list")
        input_meta = self._train.method_meta().input_tensor_meta(0)
        self.input_shape = tuple(int(s) for s in input_meta.sizes()[1:])
        self.classes = int(self._train.method_meta().input_tensor_meta(2).sizes()[1])
        self.buffers: dict[str, torch.Tensor] = {
            name: self._train.get_attribute(MODEL_PREFIX + name) for name in self.buffer_names
        }
        baked_buffers = {name: tensor.clone() for name, tensor in self.buffers.items()}
        self.parameters = self._expose_parameters()
        # The exposing call updated the running statistics; put them back, then load the requested start.
        self.load_state_dict(baked_buffers)
        if initial_state is not None:
            self.load_state_dict(initial_state)
        self.optimizer = runtime.training.get_sgd_optimizer(self.parameters, lr, momentum, 0.0, weight_decay, False)
        self.last_loss = float("nan")
        self.steps = 0

    def _expose_parameters(self) -> dict[str, torch.Tensor]:
        """Run forward once on a zero batch: ExecuTorch returns the parameters (aliases) among its outputs."""
        batch = min(2, self.max_batch)
        outputs = self._train.call(
            [
                torch.zeros(batch, *self.input_shape),
                torch.zeros(batch, dtype=torch.long),
                torch.zeros(batch, self.classes),
                torch.zeros(batch),
            ],
            clone_outputs=False,
        )
        k = len(self.parameter_names)
        return dict(zip(self.parameter_names, outputs[-k:], strict=True))

    def load_state_dict(self, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy weights (parameters and/or buffers, zoo names) into the program's memory in place."""
        for name, value in state.items():
            target = self.parameters.get(name) if hasattr(self, "parameters") else None
            if target is None:
                target = self.buffers.get(name)
            if target is None:
                raise KeyError(f"{name!r} is neither a parameter nor a buffer of this program")
            source = torch.as_tensor(np.asarray(value)).to(target.dtype)
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{name}: shape {tuple(source.shape)} != {tuple(target.shape)}")
            target.copy_(source)

    def checkpoint_state(self) -> dict[str, Any]:
        """Weights for a resumable checkpoint (ExecuTorch's SGD momentum buffers are not exposed: they restart)."""
        return {"weights": self.state_dict()}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["weights"])

    def state_dict(self) -> dict[str, np.ndarray]:
        """The personalised weights in the zoo's state-dict names (copies), for export or upload."""
        state = {name: tensor.detach().numpy().copy() for name, tensor in self.parameters.items()}
        state.update({name: tensor.numpy().copy() for name, tensor in self.buffers.items()})
        return state

    def step(self, x: np.ndarray, y: np.ndarray, teacher: np.ndarray, teacher_mask: np.ndarray) -> np.ndarray:
        """One SGD step in ExecuTorch; returns the batch's logits (from the forward pass, before the update)."""
        if not 1 <= len(x) <= self.max_batch:
            raise ValueError(f"batch of {len(x)} outside the program's 1..{self.max_batch}")
        outputs = self._train.call(
            [
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(teacher, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(teacher_mask, dtype=np.float32)),
            ],
            clone_outputs=False,
        )
        k = len(self.parameter_names)
        self.last_loss = float(outputs[0])
        logits = outputs[1].numpy().copy()
        self.optimizer.step(dict(zip(self.parameter_names, outputs[-2 * k : -k], strict=True)))
        self.steps += 1
        return logits

    def _eval_inputs(self) -> list[torch.Tensor]:
        return [self.parameters[n] for n in self.parameter_names] + [self.buffers[n] for n in self.running_stat_names]

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Eval-mode logits of the current weights, through ExecuTorch's predict method or ONNX Runtime."""
        if len(x) == 0:
            return np.zeros((0, self.classes), np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.eval_backend == "onnxruntime":
            return self._predict_onnxruntime(x, batch_size)
        step = min(batch_size, self.max_eval_batch)
        weights = self._eval_inputs()
        outputs = [
            self._predict.call([torch.from_numpy(x[i : i + step]), *weights], clone_outputs=True)[0].numpy()
            for i in range(0, len(x), step)
        ]
        return np.concatenate(outputs)

    def _predict_onnxruntime(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """ONNX Runtime on the exported inference model, its initializers overridden by the trained weights."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        # ORT's graph optimisations fold the file's initializers (Conv+BatchNorm fusion) before overrides
        # apply, so overridden weights are partly ignored (measured: 15.8 max error); evaluate unoptimised.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        keep = []
        for name, value in self.state_dict().items():
            if name in self.buffer_names and name not in self.running_stat_names:
                continue
            ort_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            keep.append(ort_value)
            options.add_initializer(name, ort_value)
        session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        del keep
        return np.concatenate(outputs)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy on a labelled set."""
        if len(x) == 0:
            return 0.0
        return float((self.predict(x).argmax(axis=1) == y).mean())

    def recalibrate_batchnorm(self, x: np.ndarray) -> None:
        """Refused: the program's train method updates running statistics only with its baked momentum, over
        batches of at most `max_batch`, and exposes no layer's input, so the exact statistics TorchTrainer
        records cannot be had here (DeviceConfig refuses train.bn_recalibration for this backend first)."""
        raise NotImplementedError("batch-norm recalibration (train.bn_recalibration) needs the torch backend")


__all__ = ["EVAL_BACKENDS", "ExecuTorchRuntime", "ExecuTorchTrainer", "executorch_runtime", "set_threads"]
