"""Ordinary tensors: a base tensor (or its trained replacement), with the linear LoRA and the
``lora_bias`` of its module."""

from __future__ import annotations

from mergeflow.errors import PlanError
from mergeflow.model.checkpoint import TensorInfo
from mergeflow.plan.inputs import PlanInputs
from mergeflow.plan.model import AdapterTensor, BaseTensor, Lora, LoraBias, Op, Source, TensorPlan


def source_of(inputs: PlanInputs, name: str) -> tuple[Source, TensorInfo]:
    """Where a base tensor's starting value comes from: an adapter replacement, else the base;
    with that tensor's header."""
    key = inputs.replacements.get(name)
    if key is not None:
        return AdapterTensor(name=key), inputs.adapter.weights[key]
    return BaseTensor(name=name), inputs.base.tensors[name]


def is_transposed(inputs: PlanInputs, module: str) -> bool:
    """True when the module's weight is stored (in, out) (GPT-2's Conv1D, ``fan_in_fan_out``)."""
    layout = inputs.layout
    if layout.conv1d or layout.embed is not None:
        return layout.disk_module(module) in layout.conv1d
    return bool(inputs.adapter.config.fan_in_fan_out)


def check_lora(inputs: PlanInputs, module: str, shape: tuple[int, ...], transposed: bool) -> None:
    """The module's lora_A (r, in) and lora_B (out, r) fit a 2-D weight of ``shape``.

    Raises:
        PlanError: the weight is not 2-D, or the factors' shapes do not fit it.
    """
    spec = inputs.adapter.modules[module]
    a, b = inputs.adapter.weights[spec.a_key], inputs.adapter.weights[spec.b_key]
    if len(shape) != 2:
        raise PlanError(
            f"{inputs.adapter_file}: LoRA on '{module}', whose weight has shape {list(shape)}; "
            "Mergeflow merges LoRA on linear layers (conv layers are not supported)")
    out_f, in_f = (shape[1], shape[0]) if transposed else shape
    if a.shape != (spec.rank, in_f) or b.shape != (out_f, spec.rank):
        raise PlanError(
            f"{inputs.adapter_file}: '{module}' has lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)}, but the base weight is {list(shape)} and r={spec.rank}: "
            f"expected lora_A [{spec.rank}, {in_f}] and lora_B [{out_f}, {spec.rank}]. "
            "Was the adapter trained on another base model?")


def plan_tensor(inputs: PlanInputs, name: str, lora: str | None = None,
                lora_bias: str | None = None) -> TensorPlan:
    """Plan base tensor ``name``: its source, then module ``lora``'s linear LoRA (a weight) or
    module ``lora_bias``'s ``lora_B.bias`` (a bias).

    Raises:
        PlanError: a replacement or LoRA pair that does not fit the base tensor.
    """
    source, src = source_of(inputs, name)
    info = inputs.base.tensors[name]
    check_same_shape(inputs, source, src, info)
    ops: list[Op] = []
    if lora is not None:
        transposed = is_transposed(inputs, lora)
        check_lora(inputs, lora, info.shape, transposed)
        ops.append(Lora(module=lora, transposed=transposed))
    if lora_bias is not None:
        ops.append(LoraBias(module=lora_bias))
    return output_entry(inputs, name, info, source, ops)


def check_same_shape(inputs: PlanInputs, source: Source, src: TensorInfo, info: TensorInfo) -> None:
    """A replacement must have the base tensor's shape.

    Raises:
        PlanError: naming both.
    """
    if src.shape != info.shape:
        raise PlanError(
            f"{inputs.adapter_file}: '{source.name}' has shape {list(src.shape)} but the base's "
            f"'{info.name}' is {list(info.shape)}; was the adapter trained on another base?")


def output_entry(inputs: PlanInputs, name: str, info: TensorInfo, source: Source,
                 ops: list[Op]) -> TensorPlan:
    """The plan entry of base tensor ``info``: float tensors are written in the output dtype,
    the rest as they are stored."""
    dtype = inputs.dtype if info.is_float else info.dtype
    return TensorPlan(name=name, dtype=dtype, shape=list(info.shape), source=source, ops=ops)
