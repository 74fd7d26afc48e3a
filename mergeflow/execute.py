"""Run one shard of a plan: read each input tensor (dequantizing quantized base weights), merge,
cast or re-quantize, and stream it into the shard file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.adapter import Adapter
from mergeflow.checkpoint import DTYPES, Checkpoint
from mergeflow.errors import AdapterError, InputError, MergeError
from mergeflow.lora import embedding_delta, merge_bias, merge_linear
from mergeflow.numerics import all_finite
from mergeflow.plan import MergePlan, ShardPlan, TensorPlan
from mergeflow.quant import dequantize, output_keys, requantize
from mergeflow.vocab import resize_rows
from mergeflow.writer import ShardWriter

Progress = Callable[[TensorPlan], None]


class ShardResult(BaseModel):
    """A finished shard file: its name, size and sha256."""

    filename: str
    size: int
    sha256: str
    resumed: bool = False  # found finished by an earlier run, not written by this one


class TensorSource:
    """Produces output tensors for a plan from the base and the adapter (and, for
    ``--merge-onto original``, the original 16-bit checkpoint), on one device: dequantizing,
    merging and re-quantizing all run there."""

    def __init__(self, base: Checkpoint, adapter: Adapter, device: str = "cpu",
                 original: Checkpoint | None = None) -> None:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {device}: this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); run with --device cpu")
        self.base = base
        self.adapter = adapter
        self.device = torch.device(device)
        self.original = original

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        return self.adapter.read(key).to(self.device)

    def produce(self, plan: TensorPlan) -> torch.Tensor:
        """The output tensor for one plan entry, on the CPU, in the planned dtype (for a
        quantized unit: its stored weight; :meth:`produce_all` gives the siblings too)."""
        if plan.parts:
            return self.produce_all(plan)[0][1]
        tensor = self.read_input(plan)
        if not plan.computes:
            return tensor.to(DTYPES[plan.dtype])
        out = self._compute(plan, tensor).to(DTYPES[plan.dtype])
        _require_finite(plan, out)  # after the cast: an overflow of the output dtype counts too
        return out.cpu()

    def produce_all(self, plan: TensorPlan) -> list[tuple[str, torch.Tensor]]:
        """Every ``(name, tensor)`` one plan entry writes, in :meth:`TensorPlan.outputs` order."""
        if plan.requant is not None:
            merged = self._compute(plan, self.read_input(plan))  # float32, on the device
            _require_finite(plan, merged)
            return list(requantize(plan.requant, merged).items())
        if plan.parts:  # an unchanged quantized unit, copied as stored
            return list(self.base.read_many([name for name, _, _ in plan.outputs()]).items())
        return [(plan.name, self.produce(plan))]

    def _compute(self, plan: TensorPlan, tensor: torch.Tensor) -> torch.Tensor:
        """Resize, merge, add bias, set token rows; float32 (or the source dtype) on the device."""
        tensor = tensor.to(self.device)
        if plan.rows is not None:
            tensor = resize_rows(tensor, plan.rows)
        if plan.lora is not None:
            tensor = self._merge_lora(tensor, plan)
        if plan.embedding_lora is not None:
            spec = self.adapter.modules[plan.embedding_lora]
            delta = embedding_delta(self._adapter_tensor(spec.a_key),
                                    self._adapter_tensor(spec.b_key), spec.scale)
            tensor = tensor.float() + delta  # (rows, dim)
        if plan.lora_bias is not None:
            spec = self.adapter.modules[plan.lora_bias]
            tensor = merge_bias(tensor, self._adapter_tensor(spec.bias_key), spec.scale)
        if plan.token_rows is not None:
            key, indices = self.adapter.token_deltas[plan.token_rows]
            tensor = tensor.float().clone()
            tensor[torch.tensor(indices, device=self.device)] = self._adapter_tensor(key).float()
        return tensor

    def read_input(self, plan: TensorPlan) -> torch.Tensor:
        """The tensor a plan entry starts from, before any merge step: read from the adapter,
        the original checkpoint or the base, a quantized base unit dequantized (float32, on the
        device)."""
        if plan.from_adapter:
            return self.adapter.read(plan.source)
        if plan.from_original:
            if self.original is None:
                raise MergeError(f"'{plan.name}' is planned from the original checkpoint, but "
                                 "none was opened (a planning bug; please report it)")
            return self.original.read(plan.source)
        if plan.dequant is not None:
            stored = self.base.read_many(output_keys(plan.dequant))
            return dequantize(plan.dequant, stored, self.device)  # float32, (out, in)
        return self.base.read(plan.source)

    def _merge_lora(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        spec = self.adapter.modules[plan.lora]
        magnitude = self._adapter_tensor(spec.magnitude_key) if spec.magnitude_key else None
        return merge_linear(tensor, self._adapter_tensor(spec.a_key),
                            self._adapter_tensor(spec.b_key), spec.scale,
                            fan_in_fan_out=plan.transposed, magnitude=magnitude)


def _require_finite(plan: TensorPlan, tensor: torch.Tensor) -> None:
    """Fail the group when a merged tensor holds NaN or Inf, naming it."""
    if not all_finite(tensor):
        raise AdapterError(
            f"merged tensor '{plan.name}' holds NaN or Inf as {plan.dtype}: the merged values "
            "exceed the output dtype's range, or the adapter weights are not finite. Check the "
            "training run, or choose a wider --dtype (bfloat16 or float32)")


def write_shard(shard: ShardPlan, source: TensorSource, folder: Path,
                progress: Progress | None = None) -> ShardResult:
    """Write one planned shard into ``folder`` atomically; memory peaks at one tensor."""
    specs = [spec for t in shard.tensors for spec in t.outputs()]
    with ShardWriter(folder / shard.filename, specs) as writer:
        for plan in shard.tensors:
            for name, tensor in source.produce_all(plan):
                writer.write(name, tensor)
            if progress is not None:
                progress(plan)
    return ShardResult(filename=shard.filename, size=writer.size, sha256=writer.sha256)


def open_source(plan: MergePlan, adapter: Adapter | None = None, device: str = "cpu") -> TensorSource:
    """Open a plan's inputs (headers only) for executing its shards."""
    from mergeflow.adapter import load_adapter

    original = Checkpoint(plan.original) if plan.original else None
    return TensorSource(Checkpoint(plan.base), adapter or load_adapter(plan.adapter), device,
                        original)
