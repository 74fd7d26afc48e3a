"""GGUF straight from the merge: merged row blocks stream into a ``.gguf`` that llama.cpp runs.

``--save-method gguf`` plans the merge as for ``merged_16bit``, then, instead of SafeTensors
shards, writes one GGUF file with the ``gguf`` package's :class:`gguf.GGUFWriter`: the header,
the metadata (hyperparameters, tokenizer) and every tensor's info first - the plan knows every
name, shape and type - then each tensor's data in the same order, produced block by block by
:meth:`mergeflow.engine.ops.TensorMerger.merged_rows` and encoded as it comes (f16, bf16, or q8_0 by
``gguf.quants``). No 16-bit checkpoint is written first, and memory stays at a few row blocks.

What llama.cpp's own converter (``convert_hf_to_gguf.py``) changes per tensor is applied to each
block, otherwise llama.cpp would compute something else:

* Llama/Mistral: q and k rows go from the Hugging Face rotary layout (two halves per head) back
  to llama.cpp's interleaved one (a permutation inside each head, so whole heads per block);
* Gemma: norm weights are stored as ``w - 1`` by transformers; llama.cpp wants ``w``
  (``+ 1``), and reads the output head from the embedding (``lm_head`` is dropped);
* a tied head is simply absent: llama.cpp uses ``token_embd`` when there is no ``output``.

Tensor names come from :func:`gguf.get_tensor_name_map`, keys from :class:`gguf.GGUFWriter`'s
``add_*`` methods, the vocabulary from ``gguf``'s vocab helpers (:class:`gguf.BpeVocab`,
:class:`gguf.SentencePieceVocab`, :class:`gguf.SpecialVocab`: merges, special ids, add_bos/eos,
the chat template). An architecture, rope scaling or tokenizer not covered is refused while
planning, naming it: never a file that loads but computes something else.

The file is written under a ``.partial`` name in the staging folder, fsynced and renamed; the
staging folder itself becomes the output with one durable rename (see :mod:`mergeflow.storage.staging`),
so a crash never leaves a finished-looking ``.gguf``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergeflow import faults
from mergeflow.engine.gguf_quant import check_type, split_types
from mergeflow.engine.ops import TensorMerger
from mergeflow.engine.shards import ShardResult
from mergeflow.errors import AdapterError, InputError
from mergeflow.math.numerics import all_finite, fits
from mergeflow.model.config import base_config, text_config
from mergeflow.model.vocab import set_config_field
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.storage.hashing import sha256_file
from mergeflow.storage.staging import Staging, atomic_write, durable_rename

MODELFILE = "Modelfile"
# rope scaling types whose GGUF keys are written here (others need extra tensors or code)
_ROPE_TYPES = {None, "default", "linear", "yarn"}


@dataclass(frozen=True)
class ArchRule:
    """How one Hugging Face ``model_type`` goes into GGUF: its llama.cpp architecture and the
    per-tensor changes llama.cpp's converter makes for it."""

    arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool = False  # undo the HF rotary layout of q_proj/k_proj (Llama's converter)
    norm_offset: float = 0.0  # added to every "*norm.weight" (Gemma stores w - 1)
    drop_head: bool = False  # the head is the embedding in llama.cpp (Gemma)
    llama_keys: bool = False  # vocab_size and rope_dimension_count (Llama's converter)


# The architectures covered, by config.json model_type. Everything else is refused.
ARCHITECTURES = {
    "llama": ArchRule("LLAMA", permute_qk=True, llama_keys=True),
    "mistral": ArchRule("LLAMA", permute_qk=True, llama_keys=True),
    "qwen2": ArchRule("QWEN2"),
    "qwen3": ArchRule("QWEN3"),
    "gemma": ArchRule("GEMMA", norm_offset=1.0, drop_head=True),
}


def _gguf():
    import gguf

    return gguf


def gguf_filename(gguf_type: str) -> str:
    """The GGUF file's name in the output folder."""
    return f"model-{gguf_type}.gguf"


def model_config(plan: MergePlan) -> dict:
    """The merged model's text config: the base's config.json with the plan's updates."""
    config = base_config(plan.base)
    for key, value in plan.config_updates.items():
        set_config_field(config, key, value)
    return text_config(config)


def arch_rule(config: dict, where: Path) -> ArchRule:
    """The rule for the config's ``model_type``.

    Raises:
        InputError: the architecture is not covered, naming it.
    """
    model_type = config.get("model_type")
    rule = ARCHITECTURES.get(str(model_type))
    if rule is None:
        names = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise InputError(
            f"{where / 'config.json'}: model_type {model_type!r} ({names}) is not covered by "
            f"`save_method=gguf` (covered: {', '.join(sorted(ARCHITECTURES))}); merge with "
            "`save_method=merged_16bit` and convert the result with llama.cpp's "
            "convert_hf_to_gguf.py")
    return rule


def rope_parameters(config: dict) -> dict:
    """rope_theta and scaling, from ``rope_parameters`` (transformers 5) or the older keys."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def check_supported(base: Path, tokenizer: Path | None, gguf_type: str) -> None:
    """Refuse, before anything is written, what this GGUF writer does not cover.

    Raises:
        InputError: naming the architecture, rope scaling, tokenizer or type.
    """
    for one in split_types(gguf_type):
        check_type(one)  # streamed here, or made by llama.cpp's quantizer
    config = text_config(base_config(base))
    arch_rule(config, base)
    rope_type = rope_parameters(config).get("rope_type")
    if rope_type not in _ROPE_TYPES:
        raise InputError(f"{base / 'config.json'}: rope scaling {rope_type!r} is not covered by "
                         "`save_method=gguf` (covered: none, linear, yarn); merge with "
                         "merged_16bit and convert with llama.cpp's convert_hf_to_gguf.py")
    if tokenizer is None:
        raise InputError("`save_method=gguf` needs a tokenizer (llama.cpp reads the vocabulary "
                         "from the GGUF file): drop `no_tokenizer=True`, or pass `tokenizer=PATH`")
    open_vocab(tokenizer)


# -- the vocabulary --------------------------------------------------------------------------

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
        InputError: a pre-tokenizer llama.cpp would not reproduce (ids would differ).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        name = _PRE_TOKENIZER_REGEX.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name is not None:
            return name
    raise InputError(f"{where}: its pre_tokenizer is not one llama.cpp reproduces here (covered: "
                     f"GPT-2 ByteLevel, {', '.join(sorted(set(_PRE_TOKENIZER_REGEX.values())))}); "
                     "the GGUF would tokenize differently. Convert with llama.cpp's "
                     "convert_hf_to_gguf.py, which knows more tokenizers by their hash")


@dataclass
class VocabInfo:
    """The vocabulary as GGUF stores it."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    folder: Path


def open_vocab(folder: Path) -> VocabInfo:
    """Read a tokenizer folder with ``gguf``'s vocab helpers: ``tokenizer.model`` as
    SentencePiece, else ``tokenizer.json`` as byte-level BPE.

    Raises:
        InputError: neither form (or ``sentencepiece`` missing for a tokenizer.model), or a
            file the ``gguf`` package's readers fail on in any way (naming the file).
    """
    try:
        return _read_vocab(folder)
    except InputError:
        raise
    except Exception as exc:  # the gguf package's readers raise whatever the file trips
        name = "tokenizer.model" if (folder / "tokenizer.model").is_file() else "tokenizer.json"
        raise InputError(f"{folder / name}: the gguf package cannot read this tokenizer "
                         f"({type(exc).__name__}: {exc}); `save_method=gguf` needs a tokenizer "
                         "llama.cpp's converter reads (re-save it with transformers)") from None


def _read_vocab(folder: Path) -> VocabInfo:
    """:func:`open_vocab`'s reading, with the ``gguf`` package's own errors as they come."""
    gguf = _gguf()
    if (folder / "tokenizer.model").is_file():
        try:
            vocab = gguf.SentencePieceVocab(folder)
        except ImportError as exc:
            raise InputError(f"{folder / 'tokenizer.model'}: reading a SentencePiece tokenizer "
                             f"needs the sentencepiece package ({exc}); pip install "
                             "sentencepiece") from None
        pre = None
    else:
        path = folder / "tokenizer.json"
        try:
            vocab = gguf.BpeVocab(folder)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a byte-level BPE tokenizer.json nor a SentencePiece "
                             f"tokenizer.model ({exc}); `save_method=gguf` covers those two") \
                from None
        pre = bpe_pre_tokenizer(json.loads(path.read_text()), path)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode() if isinstance(text, str) else text)
        scores.append(float(score))
        types.append(int(kind))
    for index, special in _added_tokens(folder).items():  # as llama.cpp's converter types them
        if index < len(types):
            types[index] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return VocabInfo(vocab.tokenizer_model, pre, tokens, scores, types, folder)


def _added_tokens(folder: Path) -> dict[int, bool]:
    """tokenizer.json's added tokens: id -> special. llama.cpp splits the text on these before
    tokenizing (CONTROL for special ones, USER_DEFINED for the others), as transformers does,
    also when they are in the model's own vocabulary (gguf's BpeVocab types those NORMAL)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens") or []
    return {int(t["id"]): bool(t.get("special")) for t in added}


def add_vocab(writer, vocab: VocabInfo, n_vocab: int) -> None:
    """Tokenizer keys: the token list padded to the embedding's rows (``[PAD<i>]``, unused),
    merges, special ids, add_bos/add_eos and the chat template (:class:`gguf.SpecialVocab`)."""
    gguf = _gguf()
    if len(vocab.tokens) > n_vocab:
        raise InputError(f"{vocab.folder}: the tokenizer has {len(vocab.tokens)} tokens but the "
                         f"merged embedding only {n_vocab} rows; pass `pad_vocab_to_multiple_of` "
                         "or a matching `tokenizer=PATH`")
    pad = n_vocab - len(vocab.tokens)
    tokens = vocab.tokens + [f"[PAD{i}]".encode() for i in range(len(vocab.tokens), n_vocab)]
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(vocab.scores + [-1000.0] * pad)
    writer.add_token_types(vocab.types + [int(gguf.TokenType.UNUSED)] * pad)
    if vocab.model == "llama":
        writer.add_add_space_prefix(_spm_adds_space(vocab.folder))
    special = gguf.SpecialVocab(vocab.folder, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    # transformers adds no bos/eos unless the tokenizer says so; llama.cpp's default may differ
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def _spm_adds_space(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("add_prefix_space")
        if value is not None:
            return bool(value)
    return True


# -- hyperparameters -------------------------------------------------------------------------


def add_hparams(writer, config: dict, rule: ArchRule, n_vocab: int, file_type: int) -> None:
    """The architecture's hyperparameters under gguf's key names (as llama.cpp's converter
    writes them for these architectures)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    _add_rope_scaling(writer, rope)
    if rule.llama_keys:
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)


def _add_rope_scaling(writer, rope: dict) -> None:
    gguf = _gguf()
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


# -- tensors ---------------------------------------------------------------------------------


@dataclass
class GgufTensor:
    """One planned tensor as GGUF stores it."""

    plan: TensorPlan
    name: str  # the GGUF name (blk.0.attn_q.weight, ...)
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    head_rows: int | None = None  # rows per head, when the rows are permuted per head
    offset: float = 0.0  # added to every value (Gemma's norms)


def tensor_type(name: str, shape: list[int], gguf_type: str):
    """The GGML type of one tensor, as llama.cpp's converter chooses it: 1-D tensors and norms
    in F32; the rest in the requested type (q8_0 falling back to F16 for a row not a whole number
    of 32-value blocks)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return q.F32
    if gguf_type == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[q.Q8_0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    return q.BF16 if gguf_type == "bf16" else q.F16


def plan_tensors(plan: MergePlan, config: dict, rule: ArchRule, gguf_type: str) -> list[GgufTensor]:
    """Every output tensor of the plan with its GGUF name, type and size, in file order.

    Raises:
        InputError: a tensor gguf's name map does not know for this architecture.
    """
    gguf = _gguf()
    arch = getattr(gguf.MODEL_ARCH, rule.arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    out = []
    for shard in plan.shards:
        for tp in shard.tensors:
            if tp.name.endswith(".rotary_emb.inv_freq") or (rule.drop_head and tp.name ==
                                                            "lm_head.weight"):
                continue
            name = names.get_name(tp.name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InputError(f"{plan.base}: tensor '{tp.name}' has no GGUF name for "
                                 f"{rule.arch.lower()} in the gguf package's name map")
            qtype = tensor_type(name, tp.shape, gguf_type)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            head_rows = None
            if rule.permute_qk and tp.name.endswith(("q_proj.weight", "k_proj.weight")):
                head_rows = tp.shape[0] // (heads if tp.name.endswith("q_proj.weight") else kv_heads)
            offset = rule.norm_offset if tp.name.endswith("norm.weight") else 0.0
            out.append(GgufTensor(tp, name, qtype, math.prod(tp.shape) // block * size,
                                  head_rows, offset))
    return out


def float_blocks(source: TensorMerger, plan: TensorPlan, head_rows: int | None
                 ) -> Iterator[torch.Tensor]:
    """The merged tensor as consecutive float32 row blocks (CPU), one block alive at a time:
    merged in place by :meth:`TensorMerger.merged_rows`, read and widened when unchanged, or a
    quantized unit decoded whole. With ``head_rows``, every block holds whole heads."""
    rows = plan.shape[0] if plan.shape else 1
    row_elems = math.prod(plan.shape[1:]) if plan.shape else 1
    if source.is_unit(plan):  # a bitsandbytes unit whose rows do not decode on their own
        yield source.produce_all(plan)[0][1].float().reshape(rows, *plan.shape[1:])
        return
    step = source.rows_per_block(plan, row_elems)
    if head_rows:
        step = -(-step // head_rows) * head_rows  # whole heads, starting at a head boundary
    if plan.computes:
        for _, _, work in source.merged_rows(plan, rows, row_elems, step):
            yield work.cpu()
        return
    for i in range(0, rows, step):
        yield source.read_rows(plan, i, min(i + step, rows)).float()


def unpermute_heads(block: torch.Tensor, head_rows: int) -> torch.Tensor:
    """Llama's q/k rows from the HF rotary layout (per head: the first halves of all pairs,
    then the second halves) to llama.cpp's interleaved pairs; (k, in) -> (k, in)."""
    k = block.shape[0]
    return (block.reshape(k // head_rows, 2, head_rows // 2, *block.shape[1:])
            .swapaxes(1, 2).reshape(block.shape))


def encode(block: torch.Tensor, tensor: GgufTensor, out_dtype: torch.dtype) -> np.ndarray:
    """One float32 block, transformed as llama.cpp's converter does and encoded in the tensor's
    GGML type (``gguf.quants``; q8_0 blocks run along a row, so whole rows encode alone)."""
    gguf = _gguf()
    if not fits(block, out_dtype) and not all_finite(block.to(out_dtype)):  # one pass if fine
        raise AdapterError(
            f"merged tensor '{tensor.plan.name}' holds NaN or Inf as {tensor.qtype.name}: "
            "the merged values exceed the type's range, or the adapter weights are not "
            "finite; check the training run, or choose `gguf_type=bf16`")
    if tensor.head_rows:
        block = unpermute_heads(block, tensor.head_rows)
    if tensor.offset:
        block = block + tensor.offset
    return gguf.quants.quantize(np.ascontiguousarray(block.numpy()), tensor.qtype)


def _range_dtype(qtype) -> torch.dtype:
    name = getattr(qtype, "name", "")
    return torch.float16 if name in ("F16", "Q8_0") else (
        torch.bfloat16 if name == "BF16" else torch.float32)


def write_gguf(plan: MergePlan, source: TensorMerger, staging: Staging, gguf_type: str,
               model_name: str) -> ShardResult:
    """Write the merged model as one GGUF file into the staging folder, streaming.

    The file is written as ``.<name>.partial``, fsynced and renamed to ``model-<type>.gguf``.
    Returns its name, size and sha256 (for the manifest).
    """
    gguf = _gguf()
    config = model_config(plan)
    rule = arch_rule(config, Path(plan.base))
    tensors = plan_tensors(plan, config, rule, gguf_type)
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = embed.plan.shape[0] if embed is not None else int(config["vocab_size"])
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    filename = gguf_filename(gguf_type)
    final = staging.folder / filename
    partial = staging.partial(filename)
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, rule.arch)])
    writer.add_name(model_name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config, rule, n_vocab, int(file_type))
    tokenizer = plan.options.get("tokenizer")
    add_vocab(writer, open_vocab(Path(str(tokenizer))), n_vocab)
    for t in tensors:
        writer.add_tensor_info(t.name, t.plan.shape, np.dtype(np.float32), t.nbytes,
                               raw_dtype=t.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for t in tensors:
            _write_tensor_data(writer, fout, t, source)
            faults.checkpoint("tensor-written")
        fout.flush()
        os.fsync(fout.fileno())
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    faults.checkpoint("gguf-before-rename")
    durable_rename(partial, final)
    return ShardResult(filename=filename, size=final.stat().st_size, sha256=sha256_file(final))


def _write_tensor_data(writer, fout, tensor: GgufTensor, source: TensorMerger) -> None:
    """One tensor's data, aligned as GGUFWriter aligns it, block by block."""
    writer.write_padding(fout, fout.tell())
    written = 0
    out_dtype = _range_dtype(tensor.qtype)
    for block in float_blocks(source, tensor.plan, tensor.head_rows):
        data = encode(block, tensor, out_dtype)
        data.tofile(fout)
        written += data.nbytes
    if written != tensor.nbytes:
        raise AdapterError(f"'{tensor.plan.name}': wrote {written} bytes of GGUF data, planned "
                           f"{tensor.nbytes} (a planning bug; please report it)")
    writer.write_padding(fout, written)


def check_gguf(path: Path, plan: MergePlan, gguf_type: str) -> list[str]:
    """Read the file back with :class:`gguf.GGUFReader`: every planned tensor is there with its
    shape and type. Returns the problems found (empty: fine)."""
    gguf = _gguf()
    config = model_config(plan)
    rule = arch_rule(config, Path(plan.base))
    expected = {t.name: t for t in plan_tensors(plan, config, rule, gguf_type)}
    reader = gguf.GGUFReader(path)
    problems = []
    found = {t.name: t for t in reader.tensors}
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            problems.append(f"{path.name}: tensor {name} is missing")
        elif got.tensor_type != want.qtype or (list(reversed([int(d) for d in got.shape])) \
                != list(want.plan.shape) and len(want.plan.shape) > 1):
            problems.append(f"{path.name}: tensor {name} is {got.tensor_type.name} "
                            f"{list(got.shape)}, planned {want.qtype.name} {want.plan.shape}")
    problems.extend(f"{path.name}: unplanned tensor {n}" for n in found if n not in expected)
    return problems


def check_quantized(path: Path, plan: MergePlan, source_type: str) -> list[str]:
    """Read a file llama.cpp's quantizer made back: the tensors of the 16-bit file it was made
    from (``source_type``), with their shapes (their types are the quantizer's choice).
    Returns the problems found (empty: fine)."""
    gguf = _gguf()
    config = model_config(plan)
    rule = arch_rule(config, Path(plan.base))
    expected = {t.name: list(t.plan.shape) for t in plan_tensors(plan, config, rule, source_type)}
    found = {t.name: list(reversed([int(d) for d in t.shape]))
             for t in gguf.GGUFReader(path).tensors}
    problems = [f"{path.name}: tensor {n} is missing" for n in expected if n not in found]
    problems += [f"{path.name}: tensor {n} is {found[n]}, planned {shape}"
                 for n, shape in expected.items() if n in found and len(shape) > 1
                 and found[n] != shape]
    problems += [f"{path.name}: unplanned tensor {n}" for n in found if n not in expected]
    return problems


# -- the Ollama Modelfile --------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
_MARK = "\x00{}\x00"


def go_template(chat_template: str, bos: str = "", eos: str = "") -> str | None:
    """The chat template as an Ollama (Go) template, for templates that wrap each message in a
    role-dependent prefix and suffix: the Jinja template is rendered with marker messages and
    cut at the markers. None when it is not of that shape (Ollama then reads the GGUF's own
    ``tokenizer.chat_template``)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(chat_template)

        def render(messages, prompt):
            return template.render(messages=messages, add_generation_prompt=prompt,
                                   bos_token=bos, eos_token=eos)
        messages = [{"role": r, "content": _MARK.format(r)} for r in _ROLES]
        full = render(messages, False)
        with_prompt = render(messages, True)
    except Exception:
        return None
    if not with_prompt.startswith(full):
        return None
    # each role's prefix and suffix, from that role's message rendered alone
    parts = {}
    for role in _ROLES:
        single = render([{"role": role, "content": _MARK.format(role)}], False)
        if bos and single.startswith(bos):
            single = single[len(bos):]
        prefix, sep, suffix = single.partition(_MARK.format(role))
        if not sep:
            return None
        parts[role] = (prefix, suffix)
    start = bos if full.startswith(bos) and bos else ""
    if start + "".join(p + _MARK.format(r) + s for r, (p, s) in parts.items()) != full:
        return None
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go(p)}{{{{ .Content }}}}{_go(s)}'
        for i, (r, (p, s)) in enumerate(parts.items()))
    return (f"{_go(start)}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
            f"{_go(with_prompt[len(full):])}")


def _go(text: str) -> str:
    """Literal text inside a Go template (only ``{{`` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, tokenizer: Path) -> str:
    """An Ollama Modelfile for the GGUF: FROM, the translated chat template (when it translates)
    and the stop tokens (eos and the template's end-of-turn special tokens)."""
    config_path = tokenizer / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if template is None and (tokenizer / "chat_template.jinja").is_file():
        template = (tokenizer / "chat_template.jinja").read_text()
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    lines = [f"FROM ./{gguf_name}"]
    go = go_template(template, bos, eos) if isinstance(template, str) else None
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    stops = [eos] if eos else []
    for token in _special_tokens(tokenizer):
        if isinstance(template, str) and token in template and token not in stops \
                and token != bos and "end" in token.lower():
            stops.append(token)
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    return "\n".join(lines) + "\n"


def _token_text(value) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _special_tokens(tokenizer: Path) -> list[str]:
    path = tokenizer / "tokenizer.json"
    if not path.is_file():
        return []
    added = json.loads(path.read_text()).get("added_tokens") or []
    return [t["content"] for t in added if t.get("special")]


def write_modelfile(staging: Staging, gguf_name: str, tokenizer: Path) -> None:
    """The Modelfile beside the GGUF, written durably."""
    atomic_write(staging.folder / MODELFILE, modelfile(gguf_name, tokenizer))


def ollama_command(out: str | Path, name: str) -> str:
    """The command that imports the published GGUF into Ollama."""
    return f"ollama create {name} -f {Path(out) / MODELFILE}"
