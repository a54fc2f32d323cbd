"""ExecuTorch exports: an XNNPACK inference program and a training program holding FedCache's loss and its backward.

The training program has two methods. "forward" takes (images, labels, teacher logits, teacher mask) and
returns the loss, the logits, then the gradients and the parameters (ExecuTorch's training layout; the
device's SGD steps the parameters in place). "predict" takes (images, *parameters, *running statistics)
and returns eval-mode logits, so a device can evaluate the weights it trained without a second program.
Both have a dynamic batch (1..max). BatchNorm running statistics are mutable buffers whose names are
emitted, so a device can read and reset them (`ExecuTorchMethod.get_attribute`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from export.et_graph import TrainingGraphOptions, inference_decompositions, training_decompositions
from models.loss import LossSettings, fedcache_loss

TRAIN_METHOD = "forward"
PREDICT_METHOD = "predict"
FQN_METHOD = "__et_training_fqn_forward"
MODEL_PREFIX = "model."
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_EVAL_BATCH = 32
DEFAULT_MAX_INFERENCE_BATCH = 64
EXECUTORCH_VERSION = importlib.metadata.version("executorch")


class FedCacheTrainingModule(nn.Module):
    """A zoo model and FedCache's loss in one graph, so export can derive the backward of both."""

    def __init__(self, model: nn.Module, loss: LossSettings) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, teacher_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return fedcache_loss(logits, labels, teacher, teacher_mask, self.loss), logits.detach()


class WeightsAsInputs(nn.Module):
    """Eval-mode forward whose weights are inputs: evaluates whatever weights the training method holds."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, images: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, tensors, strict=True)), (images,))


@dataclass(frozen=True)
class TrainingProgram:
    """A serialised training program and what a device needs to drive it."""

    buffer: bytes
    parameter_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    running_stat_names: tuple[str, ...]
    max_batch: int
    max_eval_batch: int
    options: TrainingGraphOptions
    delegated_calls: int
    operator_counts: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """JSON-able description written next to the program (the runtime reads names from it)."""
        return {
            "train_method": TRAIN_METHOD,
            "predict_method": PREDICT_METHOD,
            "parameter_names": list(self.parameter_names),
            "buffer_names": list(self.buffer_names),
            "running_stat_names": list(self.running_stat_names),
            "max_batch": self.max_batch,
            "max_eval_batch": self.max_eval_batch,
            "graph_options": vars(self.options),
            "delegated_calls": self.delegated_calls,
        }


def running_stat_names(model: nn.Module) -> list[str]:
    """Float buffers (BatchNorm running mean/var): what eval mode reads besides the parameters."""
    return [name for name, b in model.named_buffers() if b.is_floating_point()]


def _batch_dim(max_batch: int) -> Any:
    return torch.export.Dim("batch", min=1, max=max_batch)


def _joint_program(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    classes: int,
    loss: LossSettings,
    max_batch: int,
    options: TrainingGraphOptions,
) -> torch.export.ExportedProgram:
    """torch.export the model+loss, then derive the joint forward/backward graph with our decompositions."""
    from torch.export.experimental import _copy_graph_module_and_signature, _remove_detach_pass
    from torch.export.exported_program import _decompose_exported_program

    wrapper = FedCacheTrainingModule(model, loss).train()
    example_batch = min(max_batch, 8) if max_batch > 1 else 2
    example = (
        torch.zeros(example_batch, *input_shape),
        torch.zeros(example_batch, dtype=torch.long),
        torch.zeros(example_batch, classes),
        torch.ones(example_batch),
    )
    batch = _batch_dim(max_batch)
    ep = torch.export.export(
        wrapper, example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}), strict=False
    )
    ep = _decompose_exported_program(
        ep,
        cia_to_decomp={},
        python_decomp_table=training_decompositions(options),
        joint_loss_index=0,
        decompose_custom_triton_ops=False,
    )
    gm, signature = _copy_graph_module_and_signature(ep)
    _remove_detach_pass(gm, signature)
    ep = ep._update(gm, signature)
    return _eliminate_common_subexpressions(ep) if options.common_subexpressions else ep


def _eliminate_common_subexpressions(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Merge identical nodes: the weight gradient's im2col slices repeat the forward's, op for op."""
    from torch.export.graph_signature import ExportGraphSignature, OutputSpec, TensorArgument
    from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

    gm = CSEPass(banned_ops=get_CSE_banned_ops())(ep.graph_module).graph_module
    outputs = list(gm.graph.output_node().args[0])
    old = ep.graph_signature
    specs = [
        OutputSpec(kind=spec.kind, arg=TensorArgument(name=node.name), target=spec.target)
        for spec, node in zip(old.output_specs, outputs, strict=True)
    ]
    return ep._update(gm, ExportGraphSignature(input_specs=old.input_specs, output_specs=specs))


def _predict_program(
    model: nn.Module, *, input_shape: tuple[int, int, int], max_eval_batch: int, options: TrainingGraphOptions
) -> torch.export.ExportedProgram:
    names = [n for n, _ in model.named_parameters()] + running_stat_names(model)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    eval_model = copy.deepcopy(model).eval()
    wrapper = WeightsAsInputs(eval_model, names)
    tensors = tuple(state[n].detach().clone() for n in names)
    example = (torch.zeros(2, *input_shape), *tensors)
    dynamic: tuple[Any, ...] = ({0: _batch_dim(max_eval_batch)}, tuple(None for _ in tensors))
    ep = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    return ep.run_decompositions(inference_decompositions(options))


def _parameter_targets(ep: torch.export.ExportedProgram) -> list[str]:
    return sorted(s.target for s in ep.graph_signature.input_specs if s.kind.name == "PARAMETER" and s.target)


def _count_ops(ep: torch.export.ExportedProgram) -> tuple[dict[str, int], int]:
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            counts[name] = counts.get(name, 0) + 1
    return counts, counts.get("executorch_call_delegate", 0)


def export_training_program(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    classes: int,
    loss: LossSettings,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_eval_batch: int = DEFAULT_MAX_EVAL_BATCH,
    options: TrainingGraphOptions | None = None,
) -> TrainingProgram:
    """Export `model` (its current weights are the program's initial ones) as a FedCache training program.

    XNNPACK may only take ops whose weights stay inputs: a delegate that packed a parameter as a constant
    would keep training it frozen, silently. The parameter list is therefore checked before and after
    lowering, and the parity check (export/parity.py) proves updated weights reach the forward pass.
    """
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    options = options or TrainingGraphOptions()
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = _joint_program(
            model, input_shape=input_shape, classes=classes, loss=loss, max_batch=max_batch, options=options
        )
        predict = _predict_program(model, input_shape=input_shape, max_eval_batch=max_eval_batch, options=options)
        partitioner: list[Any] = []
        if options.xnnpack:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            partitioner = [XnnpackPartitioner(force_non_static_weights_for_f32_linear=options.dynamic_weight_gemm)]
        before = _parameter_targets(joint)
        edge = to_edge_transform_and_lower({TRAIN_METHOD: joint, PREDICT_METHOD: predict}, partitioner=partitioner)
        lowered = edge.exported_program(TRAIN_METHOD)
        after = _parameter_targets(lowered)
        if before != after:
            captured = sorted(set(before) - set(after))
            raise RuntimeError(f"a delegate captured trainable parameters as constants: {captured}")
        counts, delegated = _count_ops(lowered)
        program = edge.to_executorch(ExecutorchBackendConfig(emit_mutable_buffer_names=True))
    params = tuple(name for name, _ in model.named_parameters())
    return TrainingProgram(
        buffer=program.buffer,
        parameter_names=params,
        buffer_names=tuple(name for name, _ in model.named_buffers()),
        running_stat_names=tuple(running_stat_names(model)),
        max_batch=max_batch,
        max_eval_batch=max_eval_batch,
        options=options,
        delegated_calls=delegated,
        operator_counts=counts,
    )


def export_inference_program(
    module: nn.Module, *, input_shape: tuple[int, int, int], max_batch: int = DEFAULT_MAX_INFERENCE_BATCH
) -> bytes:
    """An eval-mode program lowered to XNNPACK (weights packed as constants), dynamic batch 1..max_batch."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = copy.deepcopy(module).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(
            module, (torch.zeros(2, *input_shape),), dynamic_shapes=({0: _batch_dim(max_batch)},), strict=False
        )
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_EVAL_BATCH",
    "DEFAULT_MAX_INFERENCE_BATCH",
    "EXECUTORCH_VERSION",
    "FQN_METHOD",
    "MODEL_PREFIX",
    "PREDICT_METHOD",
    "TRAIN_METHOD",
    "FedCacheTrainingModule",
    "TrainingProgram",
    "WeightsAsInputs",
    "export_inference_program",
    "export_training_program",
    "running_stat_names",
]
