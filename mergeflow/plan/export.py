"""save_method lora: the adapter exported unmerged, after it was planned against the base."""

from __future__ import annotations

from mergeflow.model.adapter import Adapter
from mergeflow.plan.inputs import natural_key
from mergeflow.plan.model import ADAPTER_FILE, AdapterTensor, ShardPlan, TensorPlan


def adapter_shards(adapter: Adapter) -> list[ShardPlan]:
    """The adapter's own tensors, unmerged and uncast, in one file."""
    weights = adapter.weights
    tensors = [TensorPlan(name=k, dtype=weights[k].dtype, shape=list(weights[k].shape),
                          source=AdapterTensor(name=k))
               for k in sorted(weights, key=natural_key)]
    return [ShardPlan(filename=ADAPTER_FILE, tensors=tensors)]
