"""Headers in, MergePlan out: every output tensor, where it comes from, and which shard it is in.

Planning reads no tensor data. It checks the whole request up front (every adapter weight has a
home in the base, every shape fits) so that a bad request fails before a byte is written.

The package follows planning's jobs:

* :mod:`~mergeflow.plan.model`: the plan as data (:class:`TensorPlan`: source, ops, encoding;
  :class:`ShardPlan`, :class:`MergePlan`);
* :mod:`~mergeflow.plan.inputs`: the read-only facts every job takes (:class:`PlanInputs`);
* :mod:`~mergeflow.plan.tensors`: ordinary tensors, their linear LoRA and ``lora_bias``;
* :mod:`~mergeflow.plan.tables`: the embedding and head, vocabulary rows, untying;
* :mod:`~mergeflow.plan.experts`: parameters adapted whole (MoE experts), and their count check;
* :mod:`~mergeflow.plan.quantized`: quantized units, the original checkpoint, merged_4bit;
* :mod:`~mergeflow.plan.export`: save_method lora;
* :mod:`~mergeflow.plan.fp8`: save_method fp8 (which weights become float8, and the config);
* :mod:`~mergeflow.plan.complete`: every adapter weight used, every target present;
* :mod:`~mergeflow.plan.sharding`: cutting shards;
* :mod:`~mergeflow.plan.planner`: :class:`Planner`, running the jobs in order.
"""

from mergeflow.model.checkpoint import DTYPE_NAMES
from mergeflow.plan.inputs import PlanInputs, natural_key, parse_size, resolve_dtype
from mergeflow.plan.model import (
    ADAPTER_FILE,
    DTYPE_CHOICES,
    PLAN_VERSION,
    SAVE_METHODS,
    AdapterTensor,
    BaseTensor,
    Cast,
    EmbeddingLora,
    Encoding,
    Experts,
    Fp8,
    Lora,
    LoraBias,
    LoraPart,
    MergePlan,
    Op,
    OriginalTensor,
    QuantizedUnit,
    Requantize,
    Resize,
    ShardPlan,
    Source,
    Stored,
    TensorPart,
    TensorPlan,
    TokenRows,
)
from mergeflow.plan.planner import Planner
from mergeflow.plan.sharding import shard

__all__ = [
    "ADAPTER_FILE", "DTYPE_CHOICES", "DTYPE_NAMES", "PLAN_VERSION", "SAVE_METHODS",
    "AdapterTensor", "BaseTensor", "Cast", "EmbeddingLora", "Encoding", "Experts", "Fp8", "Lora",
    "LoraBias", "LoraPart", "MergePlan", "Op", "OriginalTensor", "PlanInputs", "Planner",
    "QuantizedUnit", "Requantize", "Resize", "ShardPlan", "Source", "Stored", "TensorPart",
    "TensorPlan", "TokenRows", "natural_key", "parse_size", "resolve_dtype", "shard",
]
