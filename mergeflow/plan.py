"""Headers in, MergePlan out: every output tensor, where it comes from, and which shard it is in.

Planning reads no tensor data. It checks the whole request up front (every adapter weight has a
home in the base, every shape fits) so that a bad request fails before a byte is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from peft.tuners.tuners_utils import check_target_module_exists
from pydantic import BaseModel

from mergeflow.adapter import Adapter
from mergeflow.checkpoint import DTYPE_NAMES, DTYPES, Checkpoint, TensorInfo
from mergeflow.errors import InputError, PlanError

PLAN_VERSION = 1
DTYPE_CHOICES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class TensorPlan(BaseModel):
    """How to produce one output tensor.

    ``source`` is read from the base (or from the adapter when ``from_adapter``); then the LoRA
    pair of module ``lora`` is merged in, or the ``lora_bias`` of module ``lora_bias`` is added;
    the result is cast to ``dtype``.
    """

    name: str
    dtype: str
    shape: list[int]
    source: str
    from_adapter: bool = False
    lora: str | None = None
    lora_bias: str | None = None

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


class ShardPlan(BaseModel):
    """One output file and the tensors it holds, in file order."""

    filename: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class MergePlan(BaseModel):
    """The whole merge, decided before any tensor is read. Small enough to pass between tasks."""

    version: int = PLAN_VERSION
    base: str
    adapter: str
    dtype: str
    fan_in_fan_out: bool
    shards: list[ShardPlan]
    inputs: dict[str, dict[str, str]] = {}  # "base"/"adapter" -> file -> sha256
    options: dict[str, object] = {}

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def fingerprint(self) -> str:
        """A hash of everything that determines the output bytes."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> MergePlan:
        return cls.model_validate_json(Path(path).read_text())


def parse_size(text: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"500MiB"`` or ``1000000`` into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise InputError(f"--max-shard-size {text!r}: use a size like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise InputError(f"--max-shard-size {text!r}: must be positive")
    return size


def natural_key(name: str) -> list[object]:
    """Sort ``layers.10`` after ``layers.9``, so shards hold consecutive layers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def resolve_dtype(requested: str, config: dict, base: Checkpoint) -> str:
    """The output dtype: the requested one, or for "auto" the base's own float dtype."""
    if requested != "auto":
        if requested not in DTYPE_CHOICES:
            raise InputError(f"--dtype {requested!r}: choose auto, {', '.join(DTYPE_CHOICES)}")
        return DTYPE_CHOICES[requested]
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared in DTYPE_CHOICES:
        return DTYPE_CHOICES[declared]
    counts: dict[str, int] = {}
    for info in base.tensors.values():
        if info.is_float:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.get) if counts else "BF16"


def _check_lora_shapes(module: str, weight: TensorInfo, a: TensorInfo, b: TensorInfo,
                       rank: int, fan_in_fan_out: bool, adapter_file: str) -> None:
    if len(weight.shape) != 2:
        raise PlanError(
            f"{adapter_file}: LoRA on '{module}', whose weight has shape {list(weight.shape)}; "
            "Mergeflow merges LoRA on linear layers (conv layers are not supported)"
        )
    out_f, in_f = reversed(weight.shape) if fan_in_fan_out else weight.shape
    if a.shape != (rank, in_f) or b.shape != (out_f, rank):
        hint = " (is fan_in_fan_out set right?)" if {a.shape[1], b.shape[0]} == {in_f, out_f} else ""
        raise PlanError(
            f"{adapter_file}: '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
            f"but the base weight is {list(weight.shape)} and r={rank}: expected lora_A "
            f"[{rank}, {in_f}] and lora_B [{out_f}, {rank}]{hint}. "
            "Was the adapter trained on another base model?"
        )


def _expected_targets(adapter: Adapter, base: Checkpoint) -> set[str]:
    """Base modules the adapter config says were adapted (PEFT's own matching rule)."""
    targets = adapter.config.target_modules
    if targets is None or (isinstance(targets, str) and targets in {"all-linear"}):
        return set()
    modules = {k[: -len(".weight")] for k, v in base.tensors.items()
               if k.endswith(".weight") and len(v.shape) == 2}
    return {m for m in modules if check_target_module_exists(adapter.config, m)}


class Planner:
    """Builds and validates a :class:`MergePlan` from headers alone."""

    def __init__(self, base: Checkpoint, adapter: Adapter, config: dict, dtype: str,
                 max_shard_size: int) -> None:
        self.base = base
        self.adapter = adapter
        self.config = config
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.fan_in_fan_out = bool(adapter.config.fan_in_fan_out)
        self.adapter_file = str(adapter.folder / adapter.weights_file)

    def plan(self) -> MergePlan:
        """Plan every output tensor, check that all adapter weights were used, cut shards."""
        self._refuse_embedding_changes()
        lora_for = {f"{m}.weight": m for m in self.adapter.modules}
        bias_for = {f"{m}.bias": m for m, s in self.adapter.modules.items() if s.bias_key}
        tensors = []
        for name in sorted(self.base.tensors, key=natural_key):
            tensors.append(self._plan_tensor(name, lora_for.get(name), bias_for.get(name)))
        self._check_everything_used(set(lora_for), set(bias_for))
        self._check_targets_present()
        return MergePlan(
            base=str(self.base.folder),
            adapter=str(self.adapter.folder),
            dtype=self.dtype,
            fan_in_fan_out=self.fan_in_fan_out,
            shards=shard(tensors, self.max_shard_size),
        )

    def _refuse_embedding_changes(self) -> None:
        embedding = [m for m, s in self.adapter.modules.items() if s.kind == "embedding"]
        touched = embedding + list(self.adapter.token_deltas)
        if touched:
            raise PlanError(
                f"{self.adapter_file}: the adapter changes embeddings ({', '.join(touched)}); "
                "merging embedding LoRA and trainable tokens is not supported yet"
            )

    def _plan_tensor(self, name: str, lora: str | None, lora_bias: str | None) -> TensorPlan:
        info = self.base.tensors[name]
        replacement = self.adapter.replacements.get(name)
        source, from_adapter = name, False
        if replacement is not None:
            new = self.adapter.weights[replacement]
            if new.shape != info.shape:
                raise PlanError(
                    f"{self.adapter_file}: '{replacement}' has shape {list(new.shape)} but the "
                    f"base's '{name}' is {list(info.shape)}; was the adapter trained on another base?"
                )
            source, from_adapter = replacement, True
        if lora is not None:
            spec = self.adapter.modules[lora]
            _check_lora_shapes(lora, info, self.adapter.weights[spec.a_key],
                               self.adapter.weights[spec.b_key], spec.rank,
                               self.fan_in_fan_out, self.adapter_file)
        dtype = self.dtype if info.is_float else info.dtype
        return TensorPlan(name=name, dtype=dtype, shape=list(info.shape), source=source,
                          from_adapter=from_adapter, lora=lora, lora_bias=lora_bias)

    def _check_everything_used(self, lora_weights: set[str], lora_biases: set[str]) -> None:
        for name in sorted(lora_weights | lora_biases | set(self.adapter.replacements)):
            if name not in self.base.tensors:
                raise PlanError(
                    f"{self.adapter_file}: the adapter changes '{name}', which the base at "
                    f"{self.base.folder} does not have; was the adapter trained on another base?"
                )

    def _check_targets_present(self) -> None:
        missing = sorted(_expected_targets(self.adapter, self.base) - set(self.adapter.modules))
        if missing:
            raise PlanError(
                f"{self.adapter_file}: adapter_config.json targets '{missing[0]}' "
                f"({len(missing)} module(s) in all) but the weights hold no LoRA for it; "
                "the adapter save is incomplete or belongs to another config"
            )


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


__all__ = ["DTYPE_NAMES", "MergePlan", "Planner", "ShardPlan", "TensorPlan", "parse_size"]
