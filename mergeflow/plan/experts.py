"""Parameters PEFT adapts whole (``target_parameters``, ``lora.ParamWrapper``: MoE experts):
which disk tensors hold each expert, and the count check that no expert is dropped."""

from __future__ import annotations

from mergeflow.errors import PlanError
from mergeflow.model.modelmap import ExpertSlice, WrappedParam, expert_slice
from mergeflow.plan.inputs import PlanInputs
from mergeflow.plan.model import Experts, Lora, LoraPart, Op, TensorPlan
from mergeflow.plan.tensors import check_same_shape, output_entry, source_of


def wrapped_ops(inputs: PlanInputs, wrapped: dict[str, WrappedParam],
                taken: dict[str, str]) -> dict[str, Op]:
    """The LoRA op of each disk tensor that holds a piece of a wrapped parameter: a
    :class:`Lora` with one expert's :class:`LoraPart`, or :class:`Experts` for a tensor holding
    several experts (fused on disk). ``taken``: disk tensors that already get a module's linear
    LoRA (disk name -> module).

    Raises:
        PlanError: a wrapped parameter without LoRA weights, factors of the wrong shape, a disk
            tensor that would get two updates, or a missing piece.
    """
    ops: dict[str, Op] = {}
    for module, param in sorted(wrapped.items()):
        if module not in inputs.adapter.modules:
            raise PlanError(
                f"{inputs.adapter_file}: adapter_config.json targets the parameter "
                f"'{param.param}' (target_parameters), but the weights hold no LoRA for "
                f"'{module}'; the adapter save is incomplete or belongs to another config")
        check_wrapped_shapes(inputs, module, param)
        for piece in inputs.layout.model_map.pieces_of(param.param, param.shape):
            if piece.disk in taken or piece.disk in ops:
                other = ops[piece.disk].module if piece.disk in ops else taken[piece.disk]
                raise PlanError(f"{inputs.adapter_file}: '{piece.disk}' gets two LoRA updates "
                                f"('{module}' and '{other}')")
            if piece.disk not in inputs.base.tensors:
                raise PlanError(f"{inputs.base.folder}: no tensor '{piece.disk}', which holds "
                                f"part of '{param.param}'; the base checkpoint is incomplete")
            ops[piece.disk] = _piece_op(module, param, expert_slice(piece, param))
    return ops


def _piece_op(module: str, param: WrappedParam, where: ExpertSlice) -> Lora | Experts:
    """The op merging ``module``'s update into one disk piece of ``param`` (``where``: its
    :class:`mergeflow.model.modelmap.ExpertSlice`)."""
    first = LoraPart(expert=where.expert, experts=param.experts, b_left=param.b_left,
                     transposed=where.transposed, rows=where.rows, cols=where.cols,
                     scale=param.scale)
    if where.count is None:
        return Lora(module=module, part=first)
    return Experts(module=module, first=first, count=where.count, stride=where.stride,
                   rows_per_expert=where.rows[2])


def plan_piece(inputs: PlanInputs, name: str, op: Op) -> TensorPlan:
    """Plan disk tensor ``name``, a piece of a wrapped parameter, with its LoRA ``op``."""
    source, src = source_of(inputs, name)
    info = inputs.base.tensors[name]
    check_same_shape(inputs, source, src, info)
    return output_entry(inputs, name, info, source, [op])


def check_wrapped_shapes(inputs: PlanInputs, module: str, param: WrappedParam) -> None:
    """lora_A (r·E, in) and lora_B (out, r·E), as PEFT's wrapper of that parameter has them.

    Raises:
        PlanError: naming the expected shapes.
    """
    spec = inputs.adapter.modules[module]
    a, b = inputs.adapter.weights[spec.a_key], inputs.adapter.weights[spec.b_key]
    d1, d2 = param.shape[-2:]
    in_f, out_f = (d2, d1) if param.b_left else (d1, d2)
    width = param.rank * param.experts
    if a.shape != (width, in_f) or b.shape != (out_f, width):
        raise PlanError(
            f"{inputs.adapter_file}: '{module}' has lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)}, but '{param.param}' is {list(param.shape)} with "
            f"{param.experts} expert(s) and r={param.rank}: expected lora_A "
            f"[{width}, {in_f}] and lora_B [{out_f}, {width}]. Was the adapter trained on "
            "another base model?")
    if spec.magnitude_key is not None:
        raise PlanError(f"{inputs.adapter_file}: '{module}' is DoRA on a whole parameter "
                        f"('{param.param}'); Mergeflow merges plain LoRA there only")


def merged_experts(plan: TensorPlan, module: str) -> list[int]:
    """The experts of ``module``'s wrapped parameter that ``plan`` merges (with repeats: one per
    piece of an expert)."""
    found: list[int] = []
    for op in plan.ops:
        if isinstance(op, Lora) and op.module == module and op.part is not None:
            found.append(op.part.expert)
        elif isinstance(op, Experts) and op.module == module:
            found.extend(op.experts)
    return found


def check_wrapped(wrapped: dict[str, WrappedParam], planned: dict[str, TensorPlan]) -> list[str]:
    """Count check: every expert of every wrapped parameter is merged, counting the experts
    inside fused disk tensors; returns the note for the report.

    Raises:
        PlanError: an expert is missing or out of range.
    """
    pieces = 0
    for module, param in wrapped.items():
        merged = [e for t in planned.values() for e in merged_experts(t, module)]
        pieces += sum(1 for t in planned.values() if merged_experts(t, module))
        if set(merged) != set(range(param.experts)):
            raise PlanError(
                f"'{param.param}': the plan merges {len(set(merged))} of its "
                f"{param.experts} experts; refusing to drop any silently")
    if not wrapped:
        return []
    fused = sum(1 for t in planned.values() if t.find(Experts) is not None)
    how = (f", {fused} of them holding several experts each" if fused
           else ", one expert slice each")
    return [f"LoRA on {len(wrapped)} whole parameters (target_parameters) merged into "
            f"{pieces} disk tensors{how}"]
