"""Quantized bases and the original: where a planned tensor's input really lives (a bitsandbytes
unit to dequantize, or the original 16-bit checkpoint), and how merged_4bit writes it."""

from __future__ import annotations

from mergeflow.errors import PlanError
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.model.quant import QuantizedBase, QuantSpec, output_infos, output_keys
from mergeflow.plan.inputs import natural_key
from mergeflow.plan.model import (
    AdapterTensor,
    BaseTensor,
    EmbeddingLora,
    OriginalTensor,
    QuantizedUnit,
    Requantize,
    Resize,
    Stored,
    TensorPart,
    TensorPlan,
    TokenRows,
)


def check_original(base: Checkpoint, original: Checkpoint | None) -> None:
    """The original must hold the quantized base's tensors, by name and real shape.

    Raises:
        PlanError: a tensor missing, extra or of another shape.
    """
    if original is None:
        return
    want, have = base.tensors, original.tensors
    where = f"`original_base={original.folder}`"
    missing = sorted(set(want) - set(have), key=natural_key)
    extra = sorted(set(have) - set(want), key=natural_key)
    if missing or extra:
        what = (f"has no '{missing[0]}'" if missing else f"has '{extra[0]}', which the base lacks")
        raise PlanError(
            f"{where}: {what} ({len(missing)} tensor(s) missing, {len(extra)} extra); it is not "
            f"the checkpoint the quantized base {base.folder} was made from. Pass the "
            "16-bit model that was quantized, or merge onto the dequantized weights")
    for name in sorted(want, key=natural_key):
        if have[name].shape != want[name].shape:
            raise PlanError(
                f"{where}: '{name}' has shape {list(have[name].shape)}, but the quantized "
                f"base's is {list(want[name].shape)}; it is not the checkpoint the quantized "
                f"base {base.folder} was made from")


class Placement:
    """Points planned tensors at their real inputs and, for merged_4bit, their stored layout.

    Args:
        stored: the base as stored (packed weights and siblings).
        quantized: the base's bitsandbytes units (None: not quantized).
        original: the 16-bit checkpoint to merge onto instead (``merge_onto=original``).
        requantize: merged_4bit: write changed units re-quantized, unchanged ones as stored.
        adapter_file: the adapter's weights, as messages name it.
    """

    def __init__(self, stored: Checkpoint, quantized: QuantizedBase | None,
                 original: Checkpoint | None, requantize: bool, adapter_file: str) -> None:
        self.stored = stored
        self.units = quantized.units if quantized is not None else {}
        self.original = original
        self.requantize = requantize
        self.adapter_file = adapter_file

    def place(self, plan: TensorPlan) -> TensorPlan:
        """The entry with its base source read from the original or a quantized unit, and its
        merged_4bit encoding."""
        if isinstance(plan.source, BaseTensor):
            if self.original is not None:
                plan = plan.model_copy(update={"source": OriginalTensor(name=plan.source.name)})
            elif plan.source.name in self.units:
                plan = plan.model_copy(update={"source": QuantizedUnit(unit=self.units[plan.source.name])})
        if self.requantize and plan.name in self.units:
            plan = self._quantized_output(plan, self.units[plan.name])
        return plan

    def _quantized_output(self, plan: TensorPlan, unit: QuantSpec) -> TensorPlan:
        """merged_4bit: re-quantize a changed unit with the base's settings; copy an unchanged
        one as stored (its bytes are exact, and re-encoding would round it again)."""
        if plan.find((Resize, EmbeddingLora, TokenRows)) is not None:
            raise PlanError(
                f"{self.adapter_file}: the adapter resizes or changes rows of '{plan.name}', which "
                "the base stores quantized; use `save_method=merged_16bit`")
        if unit.method == "fp8":
            _check_fp8_requantizable(unit, self.stored)
        unchanged = not plan.ops and not isinstance(plan.source, AdapterTensor) \
            and plan.source.name == plan.name
        if unchanged:
            source, encoding = BaseTensor(name=plan.name), Stored()
            infos = [self.stored.tensors[k] for k in output_keys(unit)]
        else:
            source, encoding = plan.source, Requantize(unit=unit)
            infos = output_infos(unit, self.stored)
        return plan.model_copy(update={
            "source": source, "encoding": encoding, "dtype": infos[0].dtype,
            "shape": list(infos[0].shape),
            "parts": [TensorPart(name=i.name, dtype=i.dtype, shape=list(i.shape)) for i in infos[1:]]})


def _check_fp8_requantizable(unit: QuantSpec, stored: Checkpoint) -> None:
    """merged_4bit re-encodes an FP8 weight by row blocks of whole scale blocks: a per-tensor
    scale, or blocks that do not tile the weight (which transformers' own FP8 quantizer leaves
    unquantized), cannot be."""
    rows, cols = unit.shape
    block = unit.block or unit.shape
    where = stored.folder / stored.tensors[unit.weight].file
    if block == [rows, cols] and rows > 1:
        raise PlanError(f"{where}: '{unit.weight}' has one scale for the whole tensor, which "
                        "`save_method=merged_4bit` cannot re-encode by row blocks; use "
                        "`save_method=fp8` (per-channel scales) or `merged_16bit`")
    if block[0] > 1 and (rows % block[0] or cols % block[1]):
        raise PlanError(f"{where}: '{unit.weight}' {unit.shape} is not whole {block} blocks, so "
                        "FP8 quantizers leave it unquantized; use `save_method=fp8` or "
                        "`merged_16bit`")


def quant_notes(quantized: QuantizedBase | None, original: Checkpoint | None, save_method: str,
                tensors: list[TensorPlan]) -> list[str]:
    """What happened to the quantized weights and what the merge was applied onto."""
    q = quantized
    if save_method == "lora":
        return ["save_method lora: the adapter is exported unmerged (checked against the base "
                "first); load it with PeftModel.from_pretrained"]
    if q is None:
        return []
    notes = []
    if original is None:
        notes.append(f"base quantized by {q.library} ({q.describe()}): merged onto its "
                     "dequantized weights, the weights the adapter was trained against "
                     "(`merge_onto=dequantized`)")
    else:
        notes.append(f"merged onto the original weights in {original.folder} "
                     f"(`merge_onto=original`), not onto the dequantized {q.bits}-bit "
                     "weights the adapter was trained against")
    if save_method != "merged_4bit":
        how = "taken from the original" if original is not None else "written dequantized"
        notes.append(f"{len(q.units)} quantized weights {how}; quantization_config removed")
        return notes
    changed = sum(isinstance(t.encoding, Requantize) for t in tensors)
    target = ("int8 with the base's LLM.int8 settings (an 8-bit base stays 8-bit under "
              "merged_4bit)" if q.method == "bnb8" else f"{q.describe()} with the base's settings")
    notes.append(f"{changed} merged weights re-quantized to {target}; "
                 f"{len(q.units) - changed} unchanged quantized weights copied as stored; "
                 "quantization_config kept")
    return notes
