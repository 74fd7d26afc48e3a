"""What every planning job reads: the base's headers, the adapter and the layout, seen once.

:class:`PlanInputs` is read-only: the jobs (``tensors``, ``tables``, ``experts``,
``quantized``, ``export``, ``complete``, ``sharding``) take it and return what they decided,
so no job depends on another's side effects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mergeflow.errors import InputError
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.model.layout import ModelLayout
from mergeflow.plan.model import DTYPE_CHOICES
from mergeflow.spec import size_bytes


@dataclass(frozen=True)
class PlanInputs:
    """The facts a plan is made from, headers only.

    Args:
        base: the model's view of the base (a quantized base's units at their real shapes).
        stored: the base as stored (a quantized unit's packed weight and siblings).
        adapter: the parsed adapter.
        layout: embedding/head/tie/Conv1D facts and the in-memory -> disk map.
        dtype: the output float dtype (safetensors name).
    """

    base: Checkpoint
    stored: Checkpoint
    adapter: Adapter
    layout: ModelLayout
    dtype: str
    # adapter replacements by the disk name of the tensor they replace
    replacements: dict[str, str] = field(default_factory=dict)
    base_layer: frozenset[str] = frozenset()  # disk names whose replacement is PEFT's base layer

    @classmethod
    def read(cls, base: Checkpoint, stored: Checkpoint, adapter: Adapter, layout: ModelLayout,
             dtype: str) -> PlanInputs:
        """Collect the inputs, translating the adapter's in-memory names to disk names."""
        disk = layout.model_map.disk_name
        return cls(base=base, stored=stored, adapter=adapter, layout=layout, dtype=dtype,
                   replacements={disk(k): v for k, v in adapter.replacements.items()},
                   base_layer=frozenset(disk(k) for k in adapter.base_layer))

    @property
    def adapter_file(self) -> str:
        """The adapter's weights file, as error messages name it."""
        return str(self.adapter.folder / self.adapter.weights_file)

    def memory_module(self, tensor_name: str) -> str:
        """The in-memory module (the adapter's name for it) of a disk tensor."""
        return module_of(self.layout.model_map.memory_name(tensor_name))


def module_of(tensor_name: str) -> str:
    """``a.b.weight`` -> ``a.b``."""
    return tensor_name.rsplit(".", 1)[0]


def parse_size(text: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"5gb"``, ``"500MiB"`` or ``1000000`` into bytes
    (:func:`mergeflow.spec.size_bytes`, the parser the spec's size fields validate with).

    Raises:
        InputError: naming `max_shard_size`.
    """
    try:
        return size_bytes(text)
    except ValueError as exc:
        raise InputError(f"`max_shard_size` {exc}") from None


def natural_key(name: str) -> list[object]:
    """Sort ``layers.10`` after ``layers.9``, so shards hold consecutive layers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def resolve_dtype(requested: str, config: dict, base: Checkpoint) -> str:
    """The output dtype: the requested one, or for "auto" the base's own float dtype."""
    if requested != "auto":
        if requested not in DTYPE_CHOICES:
            raise InputError(f"`dtype={requested}`: choose auto, {', '.join(DTYPE_CHOICES)}")
        return DTYPE_CHOICES[requested]
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared in DTYPE_CHOICES:
        return DTYPE_CHOICES[declared]
    counts: dict[str, int] = {}
    for info in base.tensors.values():
        if info.is_float:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else "BF16"
