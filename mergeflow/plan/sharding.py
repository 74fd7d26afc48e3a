"""Cutting the planned tensors into output shards."""

from __future__ import annotations

from mergeflow.plan.model import ShardPlan, TensorPlan


def shard(tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """Pack tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own (as ``save_pretrained`` does).
    """
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(filename=f, tensors=g) for f, g in zip(names, groups, strict=False)]
