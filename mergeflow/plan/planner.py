"""Headers in, :class:`MergePlan` out: the planning jobs run in order, each on the read-only
:class:`PlanInputs`, each returning what it decided."""

from __future__ import annotations

from typing import Literal

from mergeflow.errors import InputError
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.model.layout import ModelLayout
from mergeflow.model.modelmap import WrappedParam
from mergeflow.model.quant import QuantizedBase
from mergeflow.plan.complete import (
    check_everything_used,
    check_targets_present,
    renamed_note,
    used_keys,
)
from mergeflow.plan.experts import check_wrapped, plan_piece, wrapped_ops
from mergeflow.plan.export import adapter_shards
from mergeflow.plan.fp8 import fp8_config, fp8_note, fp8_output, fp8_targets
from mergeflow.plan.inputs import PlanInputs, natural_key
from mergeflow.plan.model import SAVE_METHODS, MergePlan, TensorPlan
from mergeflow.plan.quantized import Placement, check_original, quant_notes
from mergeflow.plan.sharding import shard
from mergeflow.plan.tables import VocabOptions, plan_vocab
from mergeflow.plan.tensors import plan_tensor


class Planner:
    """Builds and validates a :class:`MergePlan` from headers alone.

    Args:
        base: the base checkpoint (headers).
        adapter: the parsed adapter.
        layout: embedding/head/tie/Conv1D facts of the base architecture.
        dtype: output float dtype (safetensors name).
        max_shard_size: largest output shard in bytes.
        tokenizer_len: length of the tokenizer that ships with the output, if any.
        pad_to_multiple_of: round the vocabulary up to a multiple of this.
        allow_vocab_shrink: permit a vocabulary smaller than the base's.
        vocab_size: the base config's ``vocab_size``, if it declares one.
        save_method: "merged_16bit", "merged_4bit" (re-quantize changed weights with the base's
            own bitsandbytes settings), "lora" (export the adapter unmerged, after validating
            it against the base), "gguf" (planned as merged_16bit; written as one GGUF file) or
            "fp8" (every Linear but the head as compressed-tensors FP8, ``fp8_scheme``).
        original: the 16-bit checkpoint a quantized base was made from, to merge onto instead
            of the dequantized weights (``merge_onto=original``).
        quantized: what :func:`mergeflow.model.quant.detect` found in the base (None: not quantized).
            The planner then sees each quantized unit as one tensor of its real shape.
        wrapped: the parameters the adapter adapts whole (``target_parameters``), by adapter
            module name (:func:`mergeflow.model.wrappers.read_param_wrappers`).

    The adapter names modules as the model in memory has them; the plan names disk tensors.
    ``layout.model_map`` translates (a VLM's ``language_model`` prefix, GPT-NeoX's head, MoE
    experts stacked in memory and stored one by one or fused).
    """

    def __init__(self, base: Checkpoint, adapter: Adapter, layout: ModelLayout, dtype: str,
                 max_shard_size: int, tokenizer_len: int | None = None,
                 pad_to_multiple_of: int | None = None, allow_vocab_shrink: bool = False,
                 vocab_size: int | None = None, *, save_method: str = "merged_16bit",
                 original: Checkpoint | None = None,
                 quantized: QuantizedBase | None = None,
                 wrapped: dict[str, WrappedParam] | None = None,
                 fp8_scheme: Literal["channel", "block"] = "channel") -> None:
        if save_method not in SAVE_METHODS:
            raise InputError(f"`save_method={save_method}`: choose {', '.join(SAVE_METHODS)}")
        self.save_method = save_method
        self.fp8_scheme = fp8_scheme
        self.original = original
        self.quantized = quantized
        view = quantized.logical_view(base) if quantized is not None else base
        self.inputs = PlanInputs.read(view, base, adapter, layout, dtype)
        self.max_shard_size = max_shard_size
        self.vocab = VocabOptions(tokenizer_len, pad_to_multiple_of, allow_vocab_shrink, vocab_size)
        self.wrapped = wrapped or {}

    def plan(self) -> MergePlan:
        """Plan every output tensor, check that all adapter weights were used, cut shards.

        Raises:
            PlanError: the request cannot be merged as asked (the message names the tensor).
        """
        inputs = self.inputs
        check_original(inputs.base, self.original)
        vocab = plan_vocab(inputs, self.vocab)
        notes = list(vocab.notes)
        planned = dict(vocab.tables)
        planned.update(self._plan_layers(set(planned) | vocab.skipped))
        notes += check_wrapped(self.wrapped, planned)
        notes += check_everything_used(inputs, used_keys(planned.values(), inputs.adapter))
        notes += renamed_note(planned.values())
        check_targets_present(inputs)
        tables = {n for n in (inputs.layout.embed, inputs.layout.head) if n in planned}
        # The embedding/head group comes first, then the layers in order.
        tensors = [planned[n] for n in sorted(planned, key=lambda n: (n not in tables, natural_key(n)))]
        if self.save_method == "lora":
            shards = adapter_shards(inputs.adapter)
        else:
            placement = Placement(inputs.stored, self.quantized, self.original,
                                  self.save_method == "merged_4bit", inputs.adapter_file)
            tensors = [placement.place(t) for t in tensors]
            if self.save_method == "fp8":
                targets = fp8_targets(inputs.layout, inputs.layout.head)
                tensors = [fp8_output(t, targets, self.fp8_scheme) for t in tensors]
                vocab.config_updates["quantization_config"] = fp8_config(self.fp8_scheme)
                notes.append(fp8_note(tensors, self.fp8_scheme))
            shards = shard(tensors, self.max_shard_size)
        notes += quant_notes(self.quantized, self.original, self.save_method, tensors)
        return MergePlan(base=str(inputs.base.folder), adapter=str(inputs.adapter.folder),
                         dtype=inputs.dtype, shards=shards,
                         original=str(self.original.folder) if self.original else None,
                         config_updates=vocab.config_updates, notes=notes,
                         vocab_groups=[i for i, s in enumerate(shards)
                                       if any(t.name in tables for t in s.tensors)])

    def _plan_layers(self, done: set[str]) -> dict[str, TensorPlan]:
        """Every base tensor not in ``done``: with its module's linear LoRA or ``lora_bias``, or
        its share of a wrapped parameter's LoRA."""
        inputs = self.inputs
        disk = inputs.layout.model_map.disk_name
        modules = inputs.adapter.modules
        lora_for = {disk(f"{m}.weight"): m for m, s in modules.items()
                    if s.kind == "linear" and m not in self.wrapped}
        bias_for = {disk(f"{m}.bias"): m for m, s in modules.items() if s.bias_key}
        pieces = wrapped_ops(inputs, self.wrapped, lora_for)
        planned: dict[str, TensorPlan] = {}
        for name in inputs.base.tensors:
            if name in done:
                continue
            if name in pieces:
                planned[name] = plan_piece(inputs, name, pieces[name])
            else:
                planned[name] = plan_tensor(inputs, name, lora_for.get(name), bias_for.get(name))
        return planned
