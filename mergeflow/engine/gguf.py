"""GGUF straight from the merge, written by llama.cpp's own converter fed the merged tensors.

What each architecture needs in GGUF - hyperparameter keys, tensor names, the q/k row
permutation, Llama 3's ``rope_freqs``, stacked MoE experts, Gemma's norm offset, Phi-3's fused
projections, the vocabulary and its pre-tokenizer - is llama.cpp's knowledge, kept in its
converter (``convert_hf_to_gguf.py`` and its ``conversion/`` package). ``scripts/setup --gguf``
installs that converter, with the ``gguf`` package it was written with, from the same pinned
llama-cpp-python sdist as the quantizer and the client, so all three are one llama.cpp version.
Mergeflow keeps no table of architectures: whatever that converter registers is covered, and
anything else is refused while planning, naming the architecture.

How the converter is driven: its model class for the architecture is subclassed, and its one
tensor iteration point (``index_tensors``) returns, for every planned output tensor, a lazy
tensor the merge produces when the converter asks for it. The converter reads everything else
from a folder holding no weights: the merged model's ``config.json`` and the tokenizer.

Memory: a tensor the converter passes through unchanged (a rename, at most a cast: embeddings,
heads, most projections) is written as it is merged, in row blocks
(:class:`gguf.LazyChunkedTensor`), never whole. A tensor the converter transforms (Llama's q/k
permutation, Gemma's ``+1`` on norms, experts stacked into one tensor) is evaluated whole, one at
a time, as the converter does: the bound is the largest such tensor, about three float32 copies
of it (q_proj at 70B width: 3 x 256 MiB; a Mixtral layer's stacked experts: 3 x 1.8 GiB).

A BPE tokenizer whose pre-tokenizer llama.cpp does not know by its hash (the converter refuses
those) is named from its ``tokenizer.json`` split regex when that regex is one llama.cpp
implements (:func:`bpe_pre_tokenizer`). The file is written under a ``.partial`` name in the
staging folder, fsynced and renamed, so a crash never leaves a finished-looking ``.gguf``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow import faults
from mergeflow.engine.gguf_quant import check_type, split_types
from mergeflow.engine.ops import TensorMerger, require_finite
from mergeflow.engine.shards import ShardResult
from mergeflow.errors import AdapterError, InputError
from mergeflow.math.numerics import all_finite, fits
from mergeflow.model.checkpoint import DTYPES
from mergeflow.model.config import base_config
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.storage.hashing import sha256_file
from mergeflow.storage.staging import Staging, durable_rename

_INSTALL = ("run scripts/setup --gguf (it installs llama-cpp-python and llama.cpp's converter "
            "from one pinned sdist)")
_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_RANGE = {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.float16}


def gguf_filename(gguf_type: str) -> str:
    """The GGUF file's name in the output folder."""
    return f"model-{gguf_type}.gguf"


# -- llama.cpp's converter -------------------------------------------------------------------


def _conversion():
    """llama.cpp's ``conversion`` package (and ``gguf``), or a refusal naming the fix."""
    try:
        import conversion
        import gguf
        from conversion import base
    except ImportError as exc:
        raise InputError(f"`save_method=gguf` is written by llama.cpp's converter, which is not "
                         f"installed ({exc}): {_INSTALL}") from None
    return conversion, base, gguf


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """The converter logs every tensor at INFO and a banner before its own refusals; Mergeflow
    reports progress and errors itself."""
    logs = [logging.getLogger(name) for name in ("hf-to-gguf", "gguf.gguf_writer")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def converter_class(config: dict, where: Path):
    """llama.cpp's converter class for this config's architecture (its ``architectures[0]``, or
    the text model's).

    Raises:
        InputError: the converter is not installed, or does not know the architecture.
    """
    conversion, base, _ = _conversion()
    arch = None
    try:
        arch = base.get_model_architecture(config, base.ModelType.TEXT)
        return conversion.get_model_class(arch)
    except (NotImplementedError, KeyError, TypeError) as exc:
        raise InputError(
            f"{where / 'config.json'}: architecture {arch!r} is not one llama.cpp's converter "
            f"converts ({exc}); merge with `save_method=merged_16bit` instead") from None


def check_supported(base: Path, tokenizer: Path | None, gguf_type: str) -> None:
    """Refuse, before anything is written, what cannot become GGUF: a type llama.cpp does not
    make, an architecture its converter does not know, no tokenizer.

    Raises:
        InputError: naming the type, the architecture or the missing tokenizer.
    """
    for one in split_types(gguf_type):
        check_type(one)  # written by the converter, or made by llama.cpp's quantizer
    converter_class(base_config(base), base)
    if tokenizer is None:
        raise InputError("`save_method=gguf` needs a tokenizer (llama.cpp reads the vocabulary "
                         "from the GGUF file): drop `no_tokenizer=True`, or pass `tokenizer=PATH`")


# -- the pre-tokenizer, when llama.cpp does not know the tokenizer by its hash -----------------

# llama.cpp's pre-tokenizer names for the split regexes of Hugging Face byte-level BPE
# tokenizers (tokenizer.json "pre_tokenizer"); llama.cpp implements each by this name.
_PRE_TOKENIZER_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def bpe_pre_tokenizer(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json: "gpt-2" for a plain
    ByteLevel pre-tokenizer with its own regex, else the name of its Split regex.

    Raises:
        InputError: a pre-tokenizer llama.cpp would not reproduce (ids would differ), or a
            SentencePiece-style BPE tokenizer.json whose tokenizer.model is missing.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if (tokenizer_json.get("model") or {}).get("byte_fallback") \
            or any(step.get("type") == "Metaspace" for step in steps):
        raise InputError(f"{where}: a SentencePiece-style tokenizer (byte fallback, '▁' for "
                         f"spaces) with no tokenizer.model beside it; llama.cpp reads this "
                         f"vocabulary from tokenizer.model. Copy the base model's tokenizer.model "
                         f"into {where.parent}")
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        name = _PRE_TOKENIZER_REGEX.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name is not None:
            return name
    raise InputError(f"{where}: its pre-tokenizer is neither known to llama.cpp by its hash nor "
                     f"one of the split regexes it implements (GPT-2 ByteLevel, "
                     f"{', '.join(sorted(set(_PRE_TOKENIZER_REGEX.values())))}); the GGUF would "
                     "tokenize differently. Use the base model's own tokenizer")


# -- the merged tensors as the converter's source ----------------------------------------------


class _RowBlocks:
    """A merged tensor as float32 row blocks, for :class:`gguf.LazyChunkedTensor`: iterating
    gives one loader per block, each merging its rows when the writer reaches it."""

    def __init__(self, source: TensorMerger, plan: TensorPlan, range_dtype: torch.dtype):
        self.source, self.plan, self.range_dtype = source, plan, range_dtype

    def __iter__(self) -> Iterator[Callable[[], object]]:
        for block in float_blocks(self.source, self.plan):
            _check_range(block, self.plan, self.range_dtype)
            yield lambda b=block: b.numpy()


def float_blocks(source: TensorMerger, plan: TensorPlan) -> Iterator[torch.Tensor]:
    """The merged tensor as consecutive float32 row blocks (CPU), one block alive at a time:
    merged in place by :meth:`TensorMerger.merged_rows`, read and widened when unchanged, or a
    quantized unit decoded whole.

    Every value is first rounded to the tensor's planned dtype (the merge's ``dtype``), as the
    SafeTensors shards of the same merge hold it: the converter then sees the merged model in
    ``dtype``, exactly as llama.cpp's converter sees the shards of a ``merged_16bit`` merge, so
    a GGUF converted from those shards (``save_method=merged_16bit,gguf``) is byte for byte
    the one streamed from the merge."""
    shape = plan.shape or [1]
    rows, row_elems = shape[0], (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1)
    if source.is_unit(plan):  # a bitsandbytes unit whose rows do not decode on their own
        yield source.produce_all(plan)[0][1].float().reshape(shape)  # already in plan.dtype
        return
    step = source.rows_per_block(plan, row_elems)
    if plan.computes:
        for _, _, work in source.merged_rows(plan, rows, row_elems, step):
            yield _as_planned(work.cpu(), plan).reshape(-1, *shape[1:])
        return
    for i in range(0, rows, step):
        block = source.read_rows(plan, i, min(i + step, rows))
        yield _as_planned(block, plan).reshape(-1, *shape[1:])


def _as_planned(block: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
    """``block`` rounded to the tensor's planned dtype, as float32 (the shard writer's cast,
    with its refusal of values that overflow that dtype)."""
    dtype = DTYPES[plan.dtype]
    if block.dtype == dtype:
        return block.float()
    if fits(block, dtype):
        return block.to(dtype).float()
    rounded = block.to(dtype)
    require_finite(plan, rounded)
    return rounded.float()


def whole_tensor(source: TensorMerger, plan: TensorPlan, range_dtype: torch.dtype
                 ) -> torch.Tensor:
    """The merged tensor whole, float32 (CPU), filled block by block into one buffer."""
    out = torch.empty(plan.shape, dtype=torch.float32)  # (rows, ...)
    row = 0
    for block in float_blocks(source, plan):
        _check_range(block, plan, range_dtype)
        out[row:row + block.shape[0]] = block
        row += block.shape[0]
    return out


def _check_range(block: torch.Tensor, plan: TensorPlan, dtype: torch.dtype) -> None:
    """Refuse a merged block that is not finite in the file's type (2-D weights only: 1-D
    tensors and norms are stored as float32)."""
    if block.dim() < 2 or fits(block, dtype) or all_finite(block.to(dtype)):
        return
    raise AdapterError(
        f"merged tensor '{plan.name}' holds NaN or Inf as {dtype}: the merged values exceed the "
        "type's range, or the adapter weights are not finite; check the training run, or "
        "choose `gguf_type=bf16`")


def _merged_model(cls, plan: MergePlan, source: TensorMerger | None, range_dtype: torch.dtype):
    """``cls`` (a converter model class) reading the merge's output tensors, not files.

    Each planned tensor is a lazy tensor of its planned shape, evaluated whole by the merge when
    the converter needs its values; a tensor the converter passes through unchanged is replaced
    by a row-block stream. With ``source=None`` (a dry run) evaluating a tensor raises
    :class:`_NoData`.
    """
    _, base, gguf = _conversion()
    lazy_tensor = base.LazyTorchTensor
    planned = [t for shard in plan.shards for t in shard.tensors]
    tokenizer_folder = Path(str(plan.options.get("tokenizer")))  # named in refusals
    sources: dict[str, TensorPlan] = {}  # the converter's tensor name -> its plan

    def produce(tensor: TensorPlan) -> Callable[[], torch.Tensor]:
        def evaluate(_: object) -> torch.Tensor:
            if source is None:
                raise _NoData(tensor.name)
            return whole_tensor(source, tensor, range_dtype)

        def lazy() -> torch.Tensor:
            meta = lazy_tensor.meta_with_dtype_and_shape(torch.float32, tuple(tensor.shape))
            return lazy_tensor(meta=meta, args=(tensor,), func=evaluate)
        return lazy

    class MergedModel(cls):
        model_arch = cls.model_arch  # the converter checks each subclass names its architecture

        def index_tensors(self, remote_hf_model_id=None):
            index = {}
            for tensor in planned:
                if item := self.filter_tensors((tensor.name, produce(tensor))):
                    index[item[0]] = item[1]
                    sources[item[0]] = tensor
            return index

        def modify_tensors(self, data_torch, name, bid):
            for new_name, data in super().modify_tensors(data_torch, name, bid):
                tensor = sources.get(name)
                if data is data_torch and source is not None and tensor is not None \
                        and tuple(data.shape) == tuple(tensor.shape):
                    data = gguf.LazyChunkedTensor(_RowBlocks(source, tensor, range_dtype),
                                                  shape=tuple(tensor.shape), dtype="float32")
                yield new_name, data

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:  # not known by its hash: by its split regex, or refused
                text = (self.dir_model / "tokenizer.json").read_text()
                return bpe_pre_tokenizer(json.loads(text), tokenizer_folder / "tokenizer.json")

    MergedModel.__name__ = MergedModel.__qualname__ = f"Merged{cls.__name__}"
    return MergedModel


class _NoData(Exception):
    """A dry run's converter asked for a tensor's values."""


@dataclass(frozen=True)
class GgufWritten:
    """A GGUF file the converter wrote: its result for the manifest, and the tensors the
    converter planned (name -> [shape], type name), which the file is checked against."""

    result: ShardResult
    tensors: dict[str, tuple[list[int], str]]


def _open_model(folder: Path, plan: MergePlan, source: TensorMerger | None, gguf_type: str,
                out: Path, model_name: str):
    """The converter's model for the merged model described by ``folder`` (config.json and the
    tokenizer, no weights), reading its tensors from ``source``."""
    _, _, gguf = _conversion()
    config = json.loads((folder / "config.json").read_text())
    cls = converter_class(config, Path(plan.base))
    merged = _merged_model(cls, plan, source, _RANGE[gguf_type])
    file_type = getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type])
    return merged(folder, file_type, out, model_name=model_name, hparams=config)


def _converter_error(exc: Exception, folder: Path, plan: MergePlan) -> InputError:
    """A converter failure as one line naming the model (the converter raises ValueError,
    NotImplementedError, FileNotFoundError, KeyError or AssertionError on inputs it does not
    take), with the scratch folder's paths shown as the tokenizer folder they were copied from."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    what = what.replace(str(folder), str(plan.options.get("tokenizer")))
    return InputError(f"{Path(plan.base) / 'config.json'}: llama.cpp's converter cannot convert "
                      f"this model ({what}). Merge with `save_method=merged_16bit` instead")


def _set_vocab(model, folder: Path, tokenizer: Path) -> None:
    """The converter's vocabulary keys; its bare assertion on token ids beyond the model's
    ``vocab_size`` becomes the refusal that says so."""
    try:
        model.set_vocab()
    except AssertionError:
        from transformers import AutoTokenizer  # as the converter loads it

        size = int(model.hparams.get("vocab_size") or 0)
        top = max(AutoTokenizer.from_pretrained(folder).get_vocab().values())
        if top < size:
            raise
        raise InputError(f"{tokenizer}: the tokenizer (as transformers loads it for this "
                         f"model) has token id {top}, but the merged model has {size} embedding "
                         "rows; pass `pad_vocab_to_multiple_of`, or the tokenizer the adapter "
                         "was trained with (`tokenizer=PATH`)") from None


def check_convertible(folder: Path, plan: MergePlan, gguf_type: str) -> None:
    """A dry run of the converter, before anything is written: hyperparameters, vocabulary and
    every tensor's GGUF name, from ``folder`` (the merged model's config.json and tokenizer) and
    the plan's tensor shapes, evaluating no tensor.

    Raises:
        InputError: what the converter refuses (an architecture, a tokenizer, a tensor it cannot
            name), in one line naming the file.
    """
    with tempfile.TemporaryDirectory() as scratch, _quiet_converter(), torch.inference_mode():
        try:
            model = _open_model(folder, plan, None, gguf_type, Path(scratch) / "dry.gguf", "dry")
            model.set_gguf_parameters()
            _set_vocab(model, folder, Path(str(plan.options.get("tokenizer"))))
            with contextlib.suppress(_NoData):  # a converter that needs values: checked on writing
                model.prepare_tensors()
        except InputError:
            raise
        except Exception as exc:  # whatever the converter trips on: one line, not a traceback
            raise _converter_error(exc, folder, plan) from None


def write_gguf(plan: MergePlan, source: TensorMerger, staging: Staging, folder: Path,
               gguf_type: str, model_name: str, digest: bool = True) -> GgufWritten:
    """Write the merged model as one GGUF file into the staging folder, by llama.cpp's converter
    fed from ``source``; ``folder`` holds the merged model's config.json and tokenizer.

    The file is written as ``.<name>.partial``, fsynced and renamed to ``model-<type>.gguf``.
    Its sha256 is computed for the manifest unless ``digest`` is False (an intermediate file,
    deleted once quantized: its result's sha256 is then empty).
    """
    filename = gguf_filename(gguf_type)
    final, partial = staging.folder / filename, staging.partial(filename)
    with _quiet_converter(), torch.inference_mode():
        try:
            model = _open_model(folder, plan, source, gguf_type, partial, model_name)
            model.prepare_tensors()
            model.prepare_metadata(vocab_only=False)
        except (InputError, AdapterError):
            raise
        except Exception as exc:
            raise _converter_error(exc, folder, plan) from None
        writer = model.gguf_writer
        planned = {name: ([int(d) for d in info.shape], info.dtype.name)
                   for name, info in writer.tensors[0].items()}
        try:
            writer.write_header_to_file(path=partial)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            fout = writer.fout[0]
            fout.flush()
            os.fsync(fout.fileno())
            faults.checkpoint("tensor-written")
        except BaseException:
            writer.close()
            partial.unlink(missing_ok=True)
            raise
        writer.close()
    faults.checkpoint("gguf-before-rename")
    durable_rename(partial, final)
    result = ShardResult(filename=filename, size=final.stat().st_size,
                         sha256=sha256_file(final) if digest else "")
    return GgufWritten(result, planned)


def check_gguf(path: Path, planned: dict[str, tuple[list[int], str]],
               types_too: bool = True) -> list[str]:
    """Read the file back with :class:`gguf.GGUFReader`: every tensor the converter planned is
    there with its shape (and type, ``types_too``; a file llama.cpp's quantizer made has types
    of its choosing), and no other. Returns the problems found (empty: fine)."""
    _, _, gguf = _conversion()
    found = {t.name: ([int(d) for d in reversed(t.shape)], t.tensor_type.name)
             for t in gguf.GGUFReader(path).tensors}
    problems = [f"{path.name}: tensor {n} is missing" for n in planned if n not in found]
    for name, (shape, kind) in planned.items():
        if name not in found:
            continue
        got_shape, got_kind = found[name]
        if got_shape != shape or (types_too and got_kind != kind):
            problems.append(f"{path.name}: tensor {name} is {got_kind} {got_shape}, planned "
                            f"{kind} {shape}")
    problems += [f"{path.name}: unplanned tensor {n}" for n in found if n not in planned]
    return problems

