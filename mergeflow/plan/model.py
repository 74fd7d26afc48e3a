"""The plan as data: what every output tensor is made of, and which shard holds it.

A :class:`TensorPlan` is a small, explicit union of three parts:

* its **source**: a base tensor, an adapter tensor (a trained replacement), a tensor of the
  original 16-bit checkpoint (``merge_onto=original``), or a quantized base unit to dequantize;
* its **ops**, in order: :class:`Resize`, :class:`Lora`, :class:`EmbeddingLora`,
  :class:`LoraBias`, :class:`TokenRows`, :class:`Experts`;
* its **encoding**: :class:`Cast` to the entry's dtype, :class:`Requantize` with the base's
  bitsandbytes settings, :class:`Stored` (the unit's stored bytes, copied), or :class:`Fp8`
  (compressed-tensors FP8 values and scales).

Execution (:mod:`mergeflow.engine.ops`) and verification
(:mod:`mergeflow.pipeline.verification`) each look an op up once by its type; nothing re-tests optional flags.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field

from mergeflow.math.lora import expert_factors
from mergeflow.model.checkpoint import DTYPES
from mergeflow.model.quant import QuantSpec

PLAN_VERSION = 3  # 3: the Fp8 encoding, QuantSpec.block
DTYPE_CHOICES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# "gguf" is planned as a 16-bit merge (the same tensors, in the same order), then written by
# mergeflow.engine.gguf instead of as shards.
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora", "gguf", "fp8")
ADAPTER_FILE = "adapter_model.safetensors"


def _numel(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorPart(BaseModel):
    """A further tensor written right after its :class:`TensorPlan` (a quantized weight's
    siblings: absmax, quant_map, quant state, SCB, ...)."""

    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * _numel(self.shape)


class LoraPart(BaseModel):
    """The share of one disk tensor in the LoRA of a parameter PEFT adapts whole
    (``target_parameters``): which expert, and which rows and columns of it (see
    :func:`mergeflow.math.lora.expert_factors`). ``scale`` is PEFT's own for that parameter."""

    expert: int
    experts: int
    b_left: bool
    transposed: bool
    rows: tuple[int, int, int]
    cols: tuple[int, int, int]
    scale: float

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This tensor's LoRA factors ``(a2 (r, n1), b2 (n0, r))`` from the module's whole
        ``lora_A``/``lora_B``: its update is ``scale * b2 @ a2``."""
        return expert_factors(a, b, expert=self.expert, experts=self.experts, b_left=self.b_left,
                              transposed=self.transposed, rows=self.rows, cols=self.cols)


# -- sources ----------------------------------------------------------------------------------


class BaseTensor(BaseModel):
    """A tensor of the base checkpoint, as stored."""

    kind: Literal["base"] = "base"
    name: str


class AdapterTensor(BaseModel):
    """A tensor of the adapter (a trained ``modules_to_save`` copy, or the saved base layer)."""

    kind: Literal["adapter"] = "adapter"
    name: str


class OriginalTensor(BaseModel):
    """A tensor of the original 16-bit checkpoint a quantized base was made from."""

    kind: Literal["original"] = "original"
    name: str


class QuantizedUnit(BaseModel):
    """A quantized unit of the base (bitsandbytes, FP8 or MXFP4: the stored weight and its
    siblings), dequantized to float32."""

    kind: Literal["quantized"] = "quantized"
    unit: QuantSpec

    @property
    def name(self) -> str:
        """The tensor the unit decodes to, as the model names it."""
        return self.unit.logical_name


Source = Annotated[BaseTensor | AdapterTensor | OriginalTensor | QuantizedUnit,
                   Field(discriminator="kind")]


# -- ops, applied in order ---------------------------------------------------------------------


class Resize(BaseModel):
    """Grow the table to ``rows`` rows (new rows: the mean of the existing ones) or cut it."""

    op: Literal["resize"] = "resize"
    rows: int


class Lora(BaseModel):
    """Merge module ``module``'s linear LoRA (DoRA when it has a magnitude vector).

    ``transposed``: the weight is stored (in, out) (GPT-2's Conv1D). ``part``: which slice of the
    module's update lands here when the LoRA adapts a whole parameter this tensor is a piece of
    (one MoE expert, ``target_parameters``).
    """

    op: Literal["lora"] = "lora"
    module: str
    transposed: bool = False
    part: LoraPart | None = None


class EmbeddingLora(BaseModel):
    """Add module ``module``'s embedding LoRA, ``scale * (B @ A).T``."""

    op: Literal["embedding_lora"] = "embedding_lora"
    module: str


class LoraBias(BaseModel):
    """Add module ``module``'s ``scale * lora_B.bias`` to this bias."""

    op: Literal["lora_bias"] = "lora_bias"
    module: str


class TokenRows(BaseModel):
    """Overwrite the trainable-token rows of module ``module`` with their trained values."""

    op: Literal["token_rows"] = "token_rows"
    module: str


class Experts(BaseModel):
    """Merge a whole-parameter LoRA (``target_parameters``) into a disk tensor that holds several
    experts, stored ``(count, n0, n1)``: disk expert ``k`` is the parameter's expert
    ``first.expert + k * stride``, and its rows and columns are ``first``'s.

    Streamed as ``(count * n0, n1)`` rows: each row block gets, expert by expert, only that
    expert's factors (never the whole stacked update).
    """

    op: Literal["experts"] = "experts"
    module: str
    first: LoraPart
    count: int
    stride: int = 1
    rows_per_expert: int

    def part(self, k: int) -> LoraPart:
        """The slice of the update that disk expert ``k`` receives."""
        return self.first.model_copy(update={"expert": self.first.expert + k * self.stride})

    @property
    def experts(self) -> list[int]:
        """The parameter's experts held by this tensor, in disk order."""
        return [self.first.expert + k * self.stride for k in range(self.count)]


Op = Annotated[Resize | Lora | EmbeddingLora | LoraBias | TokenRows | Experts,
               Field(discriminator="op")]
LORA_OPS = (Lora, Experts)  # the ops that merge a linear LoRA pair


# -- encodings ----------------------------------------------------------------------------------


class Cast(BaseModel):
    """Write the values in the entry's ``dtype`` (a copy of the stored bytes when they already are)."""

    kind: Literal["cast"] = "cast"


class Requantize(BaseModel):
    """Encode the merged weight in ``unit``'s bitsandbytes layout and settings (merged_4bit)."""

    kind: Literal["requantize"] = "requantize"
    unit: QuantSpec


class Stored(BaseModel):
    """Copy an unchanged quantized unit (the entry and its ``parts``) as stored in the base."""

    kind: Literal["stored"] = "stored"


class Fp8(BaseModel):
    """Encode the merged weight as compressed-tensors FP8 (``save_method=fp8``): float8_e4m3fn
    values, and their scale (the entry's one part) per output row (``channel``) or per 128x128
    block (``block``). The merged values are rounded to ``dtype`` first, as a merged 16-bit
    checkpoint holds them; the scales are stored in ``dtype``."""

    kind: Literal["fp8"] = "fp8"
    scheme: Literal["channel", "block"]
    dtype: str


Encoding = Annotated[Cast | Requantize | Stored | Fp8, Field(discriminator="kind")]


class TensorPlan(BaseModel):
    """How to produce one output tensor: read ``source``, apply ``ops`` in order, write it with
    ``encoding``. ``name``, ``dtype`` and ``shape`` are the written tensor's header.

    ``parts`` are the tensors written with this one as a unit (a quantized weight's siblings):
    re-quantized ones with :class:`Requantize`, copied as stored with :class:`Stored`.
    """

    name: str
    dtype: str
    shape: list[int]
    source: Source
    ops: list[Op] = []
    encoding: Encoding = Field(default_factory=Cast)
    parts: list[TensorPart] = []

    def find(self, op_type: type) -> BaseModel | None:
        """The first op of ``op_type`` (a class or tuple of classes), or None."""
        return next((op for op in self.ops if isinstance(op, op_type)), None)

    @property
    def computes(self) -> bool:
        """True when the tensor is more than a (possibly cast) copy of its source."""
        return bool(self.ops) or isinstance(self.source, QuantizedUnit) \
            or isinstance(self.encoding, (Requantize, Fp8))

    @property
    def row_shape(self) -> list[int]:
        """The shape the tensor is streamed in, row block by row block: a tensor holding several
        experts (:class:`Experts`, ``(count, n0, n1)``) streams its experts' rows one after the
        other, ``(count * n0, n1)``; any other tensor streams as it is shaped."""
        if self.find(Experts) is None or len(self.shape) < 2:
            return self.shape
        return [self.shape[0] * self.shape[1], *self.shape[2:]]

    @property
    def from_adapter(self) -> bool:
        """The tensor starts from an adapter tensor (a trained replacement)."""
        return isinstance(self.source, AdapterTensor)

    @property
    def lora(self) -> str | None:
        """The module whose linear LoRA is merged here (for reports), or None."""
        op = self.find(LORA_OPS)
        return op.module if op is not None else None

    @property
    def lora_bias(self) -> str | None:
        """The module whose ``lora_B.bias`` is added here (for reports), or None."""
        op = self.find(LoraBias)
        return op.module if op is not None else None

    def steps(self) -> tuple:
        """Everything that determines the values, the output name aside."""
        return (self.source, tuple(self.ops), self.dtype)

    def outputs(self) -> list[tuple[str, str, list[int]]]:
        """``(name, dtype, shape)`` of every tensor this entry writes, in file order."""
        return [(self.name, self.dtype, self.shape), *((p.name, p.dtype, p.shape) for p in self.parts)]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * _numel(self.shape) + sum(p.nbytes for p in self.parts)


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
    shards: list[ShardPlan]
    original: str | None = None  # the 16-bit checkpoint merged onto (merge_onto=original)
    config_updates: dict[str, object] = {}  # config.json fields to set (vocab size, tie flag)
    notes: list[str] = []  # decisions taken, for the report
    vocab_groups: list[int] = []  # shards holding the embedding/head (resize and untie)
    # "base"/"adapter"/... -> file -> identity (size and mtime, or a known sha256; see
    # mergeflow.storage.hashing.file_identity); the manifest lists their sha256
    inputs: dict[str, dict[str, str]] = {}
    options: dict[str, object] = {}
    # How this run executes (block size, ...): never changes the output bytes, so it is left
    # out of the fingerprint.
    runtime: dict[str, object] = {}

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def fingerprint(self) -> str:
        """A hash of everything that determines the output bytes."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"runtime"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def save(self, path: Path) -> None:
        """Write the plan durably (see :func:`mergeflow.storage.durable.atomic_write`)."""
        from mergeflow.storage.durable import atomic_write

        atomic_write(path, self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> MergePlan:
        """Read a plan written by :meth:`save`."""
        return cls.model_validate_json(Path(path).read_text())
