"""Run one shard of a plan: read each input tensor, merge, cast, stream it into the shard file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.adapter import Adapter
from mergeflow.checkpoint import DTYPES, Checkpoint
from mergeflow.errors import AdapterError
from mergeflow.lora import embedding_delta, merge_bias, merge_linear
from mergeflow.plan import MergePlan, ShardPlan, TensorPlan
from mergeflow.vocab import resize_rows
from mergeflow.writer import ShardWriter

Progress = Callable[[TensorPlan], None]


class ShardResult(BaseModel):
    """A finished shard file: its name, size and sha256."""

    filename: str
    size: int
    sha256: str


class TensorSource:
    """Produces output tensors for a plan from the base and the adapter, on one device."""

    def __init__(self, base: Checkpoint, adapter: Adapter, device: str = "cpu") -> None:
        self.base = base
        self.adapter = adapter
        self.device = torch.device(device)

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        return self.adapter.read(key).to(self.device)

    def produce(self, plan: TensorPlan) -> torch.Tensor:
        """The output tensor for one plan entry, on the CPU, in the planned dtype."""
        tensor = self._read_source(plan)
        if not plan.computes:
            return tensor.to(DTYPES[plan.dtype])
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
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(
                f"merged tensor '{plan.name}' holds NaN or Inf; the adapter weights that change "
                "it are not finite. Check the training run"
            )
        return tensor.to(DTYPES[plan.dtype]).cpu()

    def _read_source(self, plan: TensorPlan) -> torch.Tensor:
        if plan.from_adapter:
            return self.adapter.read(plan.source)
        return self.base.read(plan.source)

    def _merge_lora(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        spec = self.adapter.modules[plan.lora]
        magnitude = self._adapter_tensor(spec.magnitude_key) if spec.magnitude_key else None
        return merge_linear(tensor, self._adapter_tensor(spec.a_key),
                            self._adapter_tensor(spec.b_key), spec.scale,
                            fan_in_fan_out=plan.transposed, magnitude=magnitude)


def write_shard(shard: ShardPlan, source: TensorSource, folder: Path,
                progress: Progress | None = None) -> ShardResult:
    """Write one planned shard into ``folder`` atomically; memory peaks at one tensor."""
    specs = [(t.name, t.dtype, t.shape) for t in shard.tensors]
    with ShardWriter(folder / shard.filename, specs) as writer:
        for plan in shard.tensors:
            writer.write(plan.name, source.produce(plan))
            if progress is not None:
                progress(plan)
    return ShardResult(filename=shard.filename, size=writer.size, sha256=writer.sha256)


def open_source(plan: MergePlan, adapter: Adapter | None = None, device: str = "cpu") -> TensorSource:
    """Open a plan's inputs (headers only) for executing its shards."""
    from mergeflow.adapter import load_adapter

    return TensorSource(Checkpoint(plan.base), adapter or load_adapter(plan.adapter), device)
