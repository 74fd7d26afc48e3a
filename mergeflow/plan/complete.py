"""Completeness: every adapter weight found its place in the plan, and every module the
adapter's config targets has LoRA weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mergeflow.errors import PlanError
from mergeflow.model.adapter import Adapter, LoraModule
from mergeflow.model.adapter_config import check_target_module_exists
from mergeflow.plan.inputs import PlanInputs, module_of
from mergeflow.plan.model import (
    AdapterTensor,
    EmbeddingLora,
    Experts,
    Lora,
    LoraBias,
    Resize,
    TensorPlan,
    TokenRows,
)


def _pair(op: Lora | Experts | EmbeddingLora, adapter: Adapter) -> set[str]:
    """lora_A and lora_B of the op's module."""
    spec: LoraModule = adapter.modules[op.module]
    return {spec.a_key, spec.b_key}


def _linear_keys(op: Lora, adapter: Adapter) -> set[str]:
    """lora_A, lora_B and (DoRA) the magnitude vector."""
    magnitude = adapter.modules[op.module].magnitude_key
    return _pair(op, adapter) | ({magnitude} if magnitude else set())


# op type -> the adapter keys it reads
_OP_KEYS: dict[type, Callable[[object, Adapter], set[str]]] = {
    Resize: lambda op, adapter: set(),
    Lora: _linear_keys,
    Experts: _pair,
    EmbeddingLora: _pair,
    LoraBias: lambda op, adapter: {adapter.modules[op.module].bias_key},
    TokenRows: lambda op, adapter: {adapter.token_deltas[op.module][0]},
}


def used_keys(plans: Iterable[TensorPlan], adapter: Adapter) -> set[str]:
    """The adapter keys the planned tensors read: trained replacements and each op's weights."""
    used: set[str] = set()
    for plan in plans:
        if isinstance(plan.source, AdapterTensor):
            used.add(plan.source.name)
        for op in plan.ops:
            used |= _OP_KEYS[type(op)](op, adapter)
    return used


def renamed_note(plans: Iterable[TensorPlan]) -> list[str]:
    """The report's word on adapted modules whose checkpoint tensors have other names than the
    model in memory (transformers' conversion mapping: a VLM's ``language_model``, GPT-NeoX's
    head), with one example; whole-parameter expert slices are noted by the count check."""
    renamed = sorted({(op.module, plan.name) for plan in plans for op in plan.ops
                      if isinstance(op, (Lora, EmbeddingLora, LoraBias))
                      and getattr(op, "part", None) is None and module_of(plan.name) != op.module})
    if not renamed:
        return []
    module, disk = renamed[0]
    return [f"{len(renamed)} adapted tensors are stored under the checkpoint's own names "
            f"(transformers' conversion mapping), e.g. '{module}' -> '{disk}'"]


def check_everything_used(inputs: PlanInputs, used: set[str]) -> list[str]:
    """Every adapter weight is read by the plan (extra saved copies of a ``modules_to_save``
    tensor aside, noted); returns the notes.

    Raises:
        PlanError: naming the first adapter tensor that has no place in the base.
    """
    adapter = inputs.adapter
    notes = []
    extra = sorted(k for k, kept in adapter.redundant.items() if kept in used)
    if extra:
        used = used | set(extra)
        notes.append(f"{len(extra)} extra saved copies of modules_to_save tensors were "
                     f"not needed (e.g. '{extra[0]}'); the plain copies were merged")
    unused = sorted(set(adapter.weights) - used)
    if unused:
        raise PlanError(
            f"{inputs.adapter_file}: '{unused[0]}' ({len(unused)} tensor(s) in all) has no "
            f"place in the base at {inputs.base.folder}; was the adapter trained on another "
            "base, or does it adapt a layer type Mergeflow cannot merge?")
    return notes


def expected_targets(inputs: PlanInputs) -> set[str]:
    """Modules (in-memory names) the adapter config says were adapted (PEFT's own matching
    rule), among the base's 2-D weights that are whole modules in memory."""
    adapter, layout = inputs.adapter, inputs.layout
    targets = adapter.config.target_modules
    if targets is None or (isinstance(targets, str) and targets in {"all-linear"}):
        return set()
    modules = {layout.memory_module(k[: -len(".weight")]) for k, v in inputs.base.tensors.items()
               if k.endswith(".weight") and len(v.shape) == 2
               and not layout.model_map.is_piece(k)}
    return {m for m in modules if check_target_module_exists(adapter.config, m)}


def check_targets_present(inputs: PlanInputs) -> None:
    """Every module the config targets has LoRA weights.

    Raises:
        PlanError: naming the first one without.
    """
    missing = sorted(expected_targets(inputs) - set(inputs.adapter.modules))
    if missing:
        raise PlanError(
            f"{inputs.adapter_file}: adapter_config.json targets '{missing[0]}' "
            f"({len(missing)} module(s) in all) but the weights hold no LoRA for it; "
            "the adapter save is incomplete or belongs to another config"
        )
