"""Headers in, MergePlan out: every output tensor, where it comes from, and which shard it is in.

Planning reads no tensor data. It checks the whole request up front (every adapter weight has a
home in the base, every shape fits) so that a bad request fails before a byte is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.adapter import Adapter
from mergeflow.adapter_config import check_target_module_exists
from mergeflow.checkpoint import DTYPE_NAMES, DTYPES, Checkpoint, TensorInfo
from mergeflow.errors import InputError, PlanError
from mergeflow.layout import ModelLayout
from mergeflow.lora import expert_factors
from mergeflow.modelmap import WrappedParam, expert_slice
from mergeflow.quant import QuantizedBase, QuantSpec, output_infos, output_keys
from mergeflow.spec import size_bytes
from mergeflow.vocab import decide_rows

PLAN_VERSION = 1
DTYPE_CHOICES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
ADAPTER_FILE = "adapter_model.safetensors"


class TensorPart(BaseModel):
    """A further tensor written right after its :class:`TensorPlan` (a quantized weight's
    siblings: absmax, quant_map, quant state, SCB, ...)."""

    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


class LoraPart(BaseModel):
    """The share of one disk tensor in the LoRA of a parameter PEFT adapts whole
    (``target_parameters``): which expert, and which rows and columns of it (see
    :func:`mergeflow.lora.expert_factors`). ``scale`` is PEFT's own for that parameter."""

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


class TensorPlan(BaseModel):
    """How to produce one output tensor.

    Steps, in order: read ``source`` from the base (or from the adapter when ``from_adapter``,
    or from the original 16-bit checkpoint when ``from_original``), dequantizing it first when
    ``dequant`` describes a quantized base unit; resize it to ``rows`` rows; merge the LoRA pair
    of module ``lora`` (weight stored (in, out) when ``transposed``) or the embedding LoRA of
    ``embedding_lora``; add the ``lora_bias`` of that module; overwrite the trainable-token rows
    of ``token_rows``; cast to ``dtype``, or re-quantize with the ``requant`` settings.

    ``lora_part`` says which slice of module ``lora``'s update lands here when the LoRA adapts
    a whole parameter that this tensor is a piece of (an MoE expert; ``target_parameters``).

    ``parts`` are the tensors written with this one as a unit (a quantized weight's siblings):
    re-quantized ones when ``requant`` is set, else copied as stored from the base.
    """

    name: str
    dtype: str
    shape: list[int]
    source: str
    from_adapter: bool = False
    rows: int | None = None
    lora: str | None = None
    lora_part: LoraPart | None = None
    transposed: bool = False
    embedding_lora: str | None = None
    lora_bias: str | None = None
    token_rows: str | None = None
    from_original: bool = False
    dequant: QuantSpec | None = None
    requant: QuantSpec | None = None
    parts: list[TensorPart] = []

    @property
    def computes(self) -> bool:
        """True when the tensor is more than a (possibly cast) copy of its source."""
        return any(x is not None for x in (self.rows, self.lora, self.embedding_lora,
                                           self.lora_bias, self.token_rows, self.dequant,
                                           self.requant))

    def steps(self) -> tuple:
        """Everything that determines the values, the output name aside."""
        return (self.source, self.from_adapter, self.from_original, self.rows, self.lora,
                self.lora_part, self.transposed, self.embedding_lora, self.lora_bias,
                self.token_rows, self.dtype)

    def outputs(self) -> list[tuple[str, str, list[int]]]:
        """``(name, dtype, shape)`` of every tensor this entry writes, in file order."""
        return [(self.name, self.dtype, self.shape), *((p.name, p.dtype, p.shape) for p in self.parts)]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n + sum(p.nbytes for p in self.parts)


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
    original: str | None = None  # the 16-bit checkpoint merged onto (--merge-onto original)
    config_updates: dict[str, object] = {}  # config.json fields to set (vocab size, tie flag)
    notes: list[str] = []  # decisions taken, for the report
    vocab_groups: list[int] = []  # shards holding the embedding/head (resize and untie)
    # "base"/"adapter"/... -> file -> identity (size and mtime, or a known sha256; see
    # mergeflow.hashing.file_identity); the manifest lists their sha256
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
        """Write the plan durably (see :func:`mergeflow.durable.atomic_write`)."""
        from mergeflow.durable import atomic_write

        atomic_write(path, self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> MergePlan:
        return cls.model_validate_json(Path(path).read_text())


def parse_size(text: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"5gb"``, ``"500MiB"`` or ``1000000`` into bytes
    (:func:`mergeflow.spec.size_bytes`, the parser the spec's size fields validate with).

    Raises:
        InputError: naming ``--max-shard-size``.
    """
    try:
        return size_bytes(text)
    except ValueError as exc:
        raise InputError(f"--max-shard-size {exc}") from None


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


def _expected_targets(adapter: Adapter, base: Checkpoint, layout: ModelLayout) -> set[str]:
    """Modules (in-memory names) the adapter config says were adapted (PEFT's own matching
    rule), among the base's 2-D weights that are whole modules in memory."""
    targets = adapter.config.target_modules
    if targets is None or (isinstance(targets, str) and targets in {"all-linear"}):
        return set()
    modules = {layout.memory_module(k[: -len(".weight")]) for k, v in base.tensors.items()
               if k.endswith(".weight") and len(v.shape) == 2
               and not layout.model_map.is_piece(k)}
    return {m for m in modules if check_target_module_exists(adapter.config, m)}


def _module(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


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
            own bitsandbytes settings) or "lora" (export the adapter unmerged, after validating
            it against the base).
        original: the 16-bit checkpoint a quantized base was made from, to merge onto instead
            of the dequantized weights (``--merge-onto original``).
        quantized: what :func:`mergeflow.quant.detect` found in the base (None: not quantized).
            The planner then sees each quantized unit as one tensor of its real shape.
        wrapped: the parameters the adapter adapts whole (``target_parameters``), by adapter
            module name (:func:`mergeflow.layout.read_param_wrappers`).

    The adapter names modules as the model in memory has them; the plan names disk tensors.
    ``layout.model_map`` translates (a VLM's ``language_model`` prefix, GPT-NeoX's head, MoE
    experts stacked in memory and stored one by one).
    """

    def __init__(self, base: Checkpoint, adapter: Adapter, layout: ModelLayout, dtype: str,
                 max_shard_size: int, tokenizer_len: int | None = None,
                 pad_to_multiple_of: int | None = None, allow_vocab_shrink: bool = False,
                 vocab_size: int | None = None, *, save_method: str = "merged_16bit",
                 original: Checkpoint | None = None,
                 quantized: QuantizedBase | None = None,
                 wrapped: dict[str, WrappedParam] | None = None) -> None:
        if save_method not in SAVE_METHODS:
            raise InputError(f"--save-method {save_method!r}: choose {', '.join(SAVE_METHODS)}")
        self.save_method = save_method
        self.original = original
        self.quantized = quantized
        self.stored = base  # the base as stored; self.base is the model's view of it
        base = quantized.logical_view(base) if quantized is not None else base
        self.base = base
        self.adapter = adapter
        self.layout = layout
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.tokenizer_len = tokenizer_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.allow_vocab_shrink = allow_vocab_shrink
        self.vocab_size = vocab_size
        self.adapter_file = str(adapter.folder / adapter.weights_file)
        self.wrapped = wrapped or {}
        disk = layout.model_map.disk_name
        # adapter replacements by the disk name of the tensor they replace
        self.replacements = {disk(k): v for k, v in adapter.replacements.items()}
        self.base_layer = {disk(k) for k in adapter.base_layer}
        self.consumed: set[str] = set()  # adapter keys that found their place in the plan
        self.config_updates: dict[str, object] = {}
        self.notes: list[str] = []

    def plan(self) -> MergePlan:
        """Plan every output tensor, check that all adapter weights were used, cut shards."""
        self._check_original()
        planned = self._plan_vocab()
        disk = self.layout.model_map.disk_name
        lora_for = {disk(f"{m}.weight"): m for m, s in self.adapter.modules.items()
                    if s.kind == "linear" and m not in self.wrapped}
        bias_for = {disk(f"{m}.bias"): m for m, s in self.adapter.modules.items() if s.bias_key}
        part_for = self._wrapped_parts(lora_for)
        for name in self.base.tensors:
            if name not in planned and name not in self._skipped:
                planned[name] = self._plan_tensor(name, lora_for.get(name), bias_for.get(name),
                                                  part_for.get(name))
        self._check_wrapped(planned)
        self._check_everything_used()
        self._check_targets_present()
        vocab = {n for n in (self.layout.embed, self.layout.head) if n in planned}
        # The embedding/head group comes first, then the layers in order.
        tensors = [planned[n] for n in sorted(planned, key=lambda n: (n not in vocab, natural_key(n)))]
        if self.save_method == "lora":
            shards = self._adapter_shards()
        else:
            tensors = [self._place(t) for t in tensors]
            shards = shard(tensors, self.max_shard_size)
        self._quant_notes(tensors)
        return MergePlan(base=str(self.base.folder), adapter=str(self.adapter.folder),
                         dtype=self.dtype, shards=shards,
                         original=str(self.original.folder) if self.original else None,
                         config_updates=self.config_updates, notes=self.notes,
                         vocab_groups=[i for i, s in enumerate(shards)
                                       if any(t.name in vocab for t in s.tensors)])

    # -- quantized bases, the original, save methods ----------------------------------------

    def _check_original(self) -> None:
        """The original must hold the quantized base's tensors, by name and real shape."""
        if self.original is None:
            return
        want, have = self.base.tensors, self.original.tensors
        where = f"--original-base {self.original.folder}"
        missing = sorted(set(want) - set(have), key=natural_key)
        extra = sorted(set(have) - set(want), key=natural_key)
        if missing or extra:
            what = (f"has no '{missing[0]}'" if missing else f"has '{extra[0]}', which the base lacks")
            raise PlanError(
                f"{where}: {what} ({len(missing)} tensor(s) missing, {len(extra)} extra); it is not "
                f"the checkpoint the quantized base {self.base.folder} was made from. Pass the "
                "16-bit model that was quantized, or merge onto the dequantized weights")
        for name in sorted(want, key=natural_key):
            if have[name].shape != want[name].shape:
                raise PlanError(
                    f"{where}: '{name}' has shape {list(have[name].shape)}, but the quantized "
                    f"base's is {list(want[name].shape)}; it is not the checkpoint the quantized "
                    f"base {self.base.folder} was made from")

    def _place(self, plan: TensorPlan) -> TensorPlan:
        """Point a planned tensor at its real input (the original checkpoint, or a quantized unit
        to dequantize) and, for merged_4bit, at its quantized output layout."""
        units = self.quantized.units if self.quantized is not None else {}
        if not plan.from_adapter:
            if self.original is not None:
                plan.from_original = True
            elif plan.source in units:
                plan.dequant = units[plan.source]
        if self.save_method == "merged_4bit" and plan.name in units:
            self._quantized_output(plan, units[plan.name])
        return plan

    def _quantized_output(self, plan: TensorPlan, unit: QuantSpec) -> None:
        """merged_4bit: re-quantize a changed unit with the base's settings; copy an unchanged
        one as stored (its bytes are exact, and re-encoding would round it again)."""
        if any(x is not None for x in (plan.rows, plan.embedding_lora, plan.token_rows)):
            raise PlanError(
                f"{self.adapter_file}: the adapter resizes or changes rows of '{plan.name}', which "
                "the base stores quantized; use --save-method merged_16bit")
        unchanged = plan.lora is None and not plan.from_adapter and plan.source == plan.name
        if unchanged:
            plan.dequant, plan.from_original = None, False
            infos = [self.stored.tensors[k] for k in output_keys(unit)]
        else:
            plan.requant = unit
            infos = output_infos(unit, self.stored)
        plan.dtype, plan.shape = infos[0].dtype, list(infos[0].shape)
        plan.parts = [TensorPart(name=i.name, dtype=i.dtype, shape=list(i.shape)) for i in infos[1:]]

    def _adapter_shards(self) -> list[ShardPlan]:
        """save_method lora: the adapter's own tensors, unmerged and uncast, in one file."""
        weights = self.adapter.weights
        tensors = [TensorPlan(name=k, dtype=weights[k].dtype, shape=list(weights[k].shape),
                              source=k, from_adapter=True)
                   for k in sorted(weights, key=natural_key)]
        return [ShardPlan(filename=ADAPTER_FILE, tensors=tensors)]

    def _quant_notes(self, tensors: list[TensorPlan]) -> None:
        """Say what happened to the quantized weights and what the merge was applied onto."""
        q = self.quantized
        if self.save_method == "lora":
            self.notes.append("save_method lora: the adapter is exported unmerged (checked "
                              "against the base first); load it with PeftModel.from_pretrained")
            return
        if q is None:
            return
        if self.original is None:
            self.notes.append(f"base quantized by bitsandbytes ({q.describe()}): merged onto its "
                              "dequantized weights, the weights the adapter was trained against "
                              "(--merge-onto dequantized)")
        else:
            self.notes.append(f"merged onto the original weights in {self.original.folder} "
                              f"(--merge-onto original), not onto the dequantized {q.bits}-bit "
                              "weights the adapter was trained against")
        if self.save_method == "merged_16bit":
            how = ("taken from the original" if self.original is not None
                   else "written dequantized")
            self.notes.append(f"{len(q.units)} quantized weights {how}; quantization_config removed")
            return
        changed = sum(t.requant is not None for t in tensors)
        target = ("int8 with the base's LLM.int8 settings (an 8-bit base stays 8-bit under "
                  "merged_4bit)" if q.method == "bnb8" else f"{q.describe()} with the base's settings")
        self.notes.append(f"{changed} merged weights re-quantized to {target}; "
                          f"{len(q.units) - changed} unchanged quantized weights copied as stored; "
                          "quantization_config kept")

    # -- ordinary tensors -------------------------------------------------------------------

    def _transposed(self, module: str) -> bool:
        if self.layout.conv1d or self.layout.embed is not None:
            return self.layout.disk_module(module) in self.layout.conv1d
        return bool(self.adapter.config.fan_in_fan_out)

    def _source(self, name: str) -> tuple[str, bool, TensorInfo]:
        """Where a tensor's starting value comes from: an adapter replacement, else the base."""
        key = self.replacements.get(name)
        if key is not None:
            self.consumed.add(key)
            return key, True, self.adapter.weights[key]
        return name, False, self.base.tensors[name]

    def _plan_tensor(self, name: str, lora: str | None, lora_bias: str | None,
                     part: LoraPart | None = None) -> TensorPlan:
        source, from_adapter, src = self._source(name)
        info = self.base.tensors[name]
        if src.shape != info.shape:
            raise PlanError(
                f"{self.adapter_file}: '{source}' has shape {list(src.shape)} but the base's "
                f"'{name}' is {list(info.shape)}; was the adapter trained on another base?")
        transposed = False
        if part is not None:
            self.consumed.update((self.adapter.modules[lora].a_key, self.adapter.modules[lora].b_key))
        elif lora is not None:
            transposed = self._transposed(lora)
            self._check_lora(lora, info.shape, transposed)
        if lora_bias is not None:
            self.consumed.add(self.adapter.modules[lora_bias].bias_key)
        dtype = self.dtype if info.is_float else info.dtype
        return TensorPlan(name=name, dtype=dtype, shape=list(info.shape), source=source,
                          from_adapter=from_adapter, lora=lora, lora_part=part,
                          transposed=transposed, lora_bias=lora_bias)

    def _check_lora(self, module: str, shape: tuple[int, ...], transposed: bool) -> None:
        spec = self.adapter.modules[module]
        a, b = self.adapter.weights[spec.a_key], self.adapter.weights[spec.b_key]
        self.consumed.update(k for k in (spec.a_key, spec.b_key, spec.magnitude_key) if k)
        if len(shape) != 2:
            raise PlanError(
                f"{self.adapter_file}: LoRA on '{module}', whose weight has shape {list(shape)}; "
                "Mergeflow merges LoRA on linear layers (conv layers are not supported)")
        out_f, in_f = (shape[1], shape[0]) if transposed else shape
        if a.shape != (spec.rank, in_f) or b.shape != (out_f, spec.rank):
            raise PlanError(
                f"{self.adapter_file}: '{module}' has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}, but the base weight is {list(shape)} and r={spec.rank}: "
                f"expected lora_A [{spec.rank}, {in_f}] and lora_B [{out_f}, {spec.rank}]. "
                "Was the adapter trained on another base model?")

    # -- embedding and head -----------------------------------------------------------------

    @property
    def _skipped(self) -> set[str]:
        """Base tensors not written as themselves: a tied head stored anyway."""
        lay = self.layout
        return {lay.head} if lay.tied and lay.head else set()

    def _vocab_touched(self) -> list[str]:
        lay = self.layout
        names = {n for n in (lay.embed, lay.head) if n}
        touched = [m for m, s in self.adapter.modules.items() if s.kind == "embedding"]
        disk = self.layout.model_map.disk_name
        touched += [m for m in self.adapter.modules if disk(f"{m}.weight") in names]
        touched += list(self.adapter.token_deltas)
        touched += [n for n in self.replacements if n in names]
        return touched

    def _plan_vocab(self) -> dict[str, TensorPlan]:
        lay = self.layout
        if lay.embed is None or lay.embed not in self.base.tensors:
            touched = self._vocab_touched()
            if touched:
                raise PlanError(
                    f"{self.adapter_file}: the adapter changes {', '.join(touched)}, but "
                    "Mergeflow cannot identify this architecture's embedding and head")
            return {}
        rows = self._decide_rows()
        embed = self._table(lay.embed, rows, lay.embed)
        plans = {lay.embed: embed}
        if lay.head is None:
            return plans
        if not lay.tied:
            plans[lay.head] = self._table(lay.head, rows, lay.head)
            return plans
        head = self._tied_head(rows)
        if head.steps() == embed.steps():
            self.notes.append(f"{lay.head} stays tied to {lay.embed}: the adapter changes "
                              "neither of them differently")
        else:
            plans[lay.head] = head
            self.config_updates["tie_word_embeddings"] = False
            self.notes.append(f"{lay.head} untied from {lay.embed} and written separately "
                              f"({self._untie_reason(head)}); tie_word_embeddings=false")
        return plans

    def _untie_reason(self, head: TensorPlan) -> str:
        if head.lora:
            return "the adapter has LoRA on the head"
        if self.layout.head in self.replacements:
            return "the adapter trained its own head"
        return "the adapter changed the embedding, while the live head reads the base embedding"

    def _decide_rows(self) -> int:
        lay, a = self.layout, self.adapter
        base_rows = self.base.tensors[lay.embed].shape[0]
        trained: dict[str, int] = {}
        for name in (lay.embed, lay.head):
            key = self.replacements.get(name) if name else None
            if key is not None:
                trained[key] = a.weights[key].shape[0]
        embed_lora = a.modules.get(self._memory_module(lay.embed))
        if embed_lora is not None:
            if embed_lora.kind != "embedding":
                raise PlanError(f"{self.adapter_file}: '{embed_lora.module}' is an embedding "
                                "but its LoRA weights are saved as a linear layer's")
            trained[embed_lora.a_key] = a.weights[embed_lora.a_key].shape[1]
        head_lora = a.modules.get(self._memory_module(lay.head)) if lay.head else None
        if head_lora is not None:
            trained[head_lora.b_key] = a.weights[head_lora.b_key].shape[0]
        rows, notes = decide_rows(base_rows, trained, self.tokenizer_len,
                                  self.pad_to_multiple_of, self.allow_vocab_shrink)
        self.notes.extend(notes)
        if rows != base_rows or (self.vocab_size is not None and rows != self.vocab_size):
            self.config_updates["vocab_size"] = rows
        return rows

    def _table(self, name: str, rows: int, base_name: str,
               tied_tokens: str | None = None) -> TensorPlan:
        """Plan the embedding or (untied) head table: source, resize, LoRA, token rows."""
        a = self.adapter
        module = self._memory_module(name)
        key = self.replacements.get(name)
        if key is not None:
            source, from_adapter, src = key, True, a.weights[key]
            self.consumed.add(key)
        else:
            source, from_adapter, src = base_name, False, self.base.tensors[base_name]
        dim = self.base.tensors[base_name].shape[1]
        if len(src.shape) != 2 or src.shape[1] != dim:
            raise PlanError(f"{self.adapter_file}: '{source}' has shape {list(src.shape)}, but "
                            f"the base's rows are {dim} wide; was it trained on another base?")
        spec = a.modules.get(module)
        lora = embedding_lora = None
        if spec is not None and spec.kind == "embedding":
            embedding_lora = module
            self.consumed.update((spec.a_key, spec.b_key))
        elif spec is not None:
            lora = module
            self._check_lora(module, (rows, dim), False)
        tokens = module if module in a.token_deltas else tied_tokens
        if tokens is not None:
            self._check_tokens(tokens, rows, dim)
        return TensorPlan(name=name, dtype=self.dtype, shape=[rows, dim], source=source,
                          from_adapter=from_adapter,
                          rows=rows if src.shape[0] != rows else None, lora=lora,
                          embedding_lora=embedding_lora, token_rows=tokens)

    def _tied_head(self, rows: int) -> TensorPlan:
        """The head of a tied base as the live adapter computes it.

        PEFT's head on a tied model reads the embedding's *base* weight: a trained
        ``modules_to_save`` copy or LoRA of the embedding does not reach it, while trainable
        tokens do (PEFT ties those).
        """
        lay, a = self.layout, self.adapter
        if a.config.ensure_weight_tying:
            raise PlanError(f"{self.adapter_file}: ensure_weight_tying=True on a tied base is "
                            "not supported yet; merge an adapter saved without it")
        embed_module = self._memory_module(lay.embed)
        tied_tokens = embed_module if embed_module in a.token_deltas else None
        plan = self._table(lay.head, rows, lay.embed, tied_tokens)
        if lay.head not in self.replacements and lay.embed in self.base_layer:
            key = self.replacements[lay.embed]  # PEFT saved the (possibly resized) base embedding
            plan.source, plan.from_adapter = key, True
            plan.rows = rows if a.weights[key].shape[0] != rows else None
        return plan

    def _check_tokens(self, module: str, rows: int, dim: int) -> None:
        key, indices = self.adapter.token_deltas[module]
        self.consumed.add(key)
        delta = self.adapter.weights[key]
        if delta.shape != (len(indices), dim):
            raise PlanError(f"{self.adapter_file}: '{key}' has shape {list(delta.shape)}, "
                            f"expected [{len(indices)}, {dim}] for trainable tokens {indices}")
        bad = [i for i in indices if not 0 <= i < rows]
        if bad:
            raise PlanError(f"adapter_config.json: trainable token indices {bad} are outside "
                            f"the {rows}-row vocabulary")

    def _memory_module(self, tensor_name: str) -> str:
        """The in-memory module (the adapter's name for it) of a disk tensor."""
        return _module(self.layout.model_map.memory_name(tensor_name))

    # -- parameters adapted whole (target_parameters: MoE experts) ---------------------------

    def _wrapped_parts(self, lora_for: dict[str, str]) -> dict[str, LoraPart]:
        """Each disk tensor that holds a piece of a wrapped parameter, with its share of the
        update; ``lora_for`` gains those tensors."""
        parts: dict[str, LoraPart] = {}
        for module, wrapped in sorted(self.wrapped.items()):
            spec = self.adapter.modules.get(module)
            if spec is None:
                raise PlanError(
                    f"{self.adapter_file}: adapter_config.json targets the parameter "
                    f"'{wrapped.param}' (target_parameters), but the weights hold no LoRA for "
                    f"'{module}'; the adapter save is incomplete or belongs to another config")
            self._check_wrapped_shapes(module, wrapped)
            for piece in self.layout.model_map.pieces_of(wrapped.param, wrapped.shape):
                if piece.disk in lora_for or piece.disk in parts:
                    raise PlanError(f"{self.adapter_file}: '{piece.disk}' gets two LoRA updates "
                                    f"('{module}' and '{lora_for.get(piece.disk)}')")
                if piece.disk not in self.base.tensors:
                    raise PlanError(f"{self.base.folder}: no tensor '{piece.disk}', which holds "
                                    f"part of '{wrapped.param}'; the base checkpoint is incomplete")
                lora_for[piece.disk] = module
                parts[piece.disk] = LoraPart(experts=wrapped.experts, b_left=wrapped.b_left,
                                             scale=wrapped.scale, **expert_slice(piece, wrapped))
        return parts

    def _check_wrapped_shapes(self, module: str, wrapped: WrappedParam) -> None:
        """lora_A (r·E, in) and lora_B (out, r·E), as PEFT's wrapper of that parameter has them."""
        spec = self.adapter.modules[module]
        a, b = self.adapter.weights[spec.a_key], self.adapter.weights[spec.b_key]
        d1, d2 = wrapped.shape[-2:]
        in_f, out_f = (d2, d1) if wrapped.b_left else (d1, d2)
        width = wrapped.rank * wrapped.experts
        if a.shape != (width, in_f) or b.shape != (out_f, width):
            raise PlanError(
                f"{self.adapter_file}: '{module}' has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}, but '{wrapped.param}' is {list(wrapped.shape)} with "
                f"{wrapped.experts} expert(s) and r={wrapped.rank}: expected lora_A "
                f"[{width}, {in_f}] and lora_B [{out_f}, {width}]. Was the adapter trained on "
                "another base model?")

    def _check_wrapped(self, planned: dict[str, TensorPlan]) -> None:
        """Count check: every expert of every wrapped parameter is merged exactly once."""
        for module, wrapped in self.wrapped.items():
            merged = [t for t in planned.values() if t.lora == module and t.lora_part is not None]
            experts = {t.lora_part.expert for t in merged}
            if len(experts) != wrapped.experts:
                raise PlanError(
                    f"'{wrapped.param}': the plan merges {len(experts)} of its "
                    f"{wrapped.experts} experts; refusing to drop any silently")
        if self.wrapped:
            n = sum(t.lora_part is not None for t in planned.values())
            self.notes.append(f"LoRA on {len(self.wrapped)} whole parameters (target_parameters) "
                              f"merged into {n} disk tensors, one expert slice each")

    # -- completeness -----------------------------------------------------------------------

    def _check_everything_used(self) -> None:
        extra = sorted(k for k, used in self.adapter.redundant.items() if used in self.consumed)
        if extra:
            self.consumed.update(extra)
            self.notes.append(f"{len(extra)} extra saved copies of modules_to_save tensors were "
                              f"not needed (e.g. '{extra[0]}'); the plain copies were merged")
        unused = sorted(set(self.adapter.weights) - self.consumed)
        if unused:
            raise PlanError(
                f"{self.adapter_file}: '{unused[0]}' ({len(unused)} tensor(s) in all) has no "
                f"place in the base at {self.base.folder}; was the adapter trained on another "
                "base, or does it adapt a layer type Mergeflow cannot merge?")

    def _check_targets_present(self) -> None:
        expected = _expected_targets(self.adapter, self.base, self.layout)
        missing = sorted(expected - set(self.adapter.modules))
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
