"""The embedding and the head: the vocabulary's rows, their LoRA and trainable tokens, and
whether a tied head must be untied."""

from __future__ import annotations

from dataclasses import dataclass, field

from mergeflow.errors import PlanError
from mergeflow.model.vocab import decide_rows
from mergeflow.plan.inputs import PlanInputs
from mergeflow.plan.model import (
    AdapterTensor,
    BaseTensor,
    EmbeddingLora,
    Lora,
    Op,
    Resize,
    Source,
    TensorPlan,
    TokenRows,
)
from mergeflow.plan.tensors import check_lora


@dataclass(frozen=True)
class VocabOptions:
    """The request's vocabulary options (see :class:`mergeflow.spec.MergeSpec`)."""

    tokenizer_len: int | None = None  # length of the tokenizer that ships, if any
    pad_to_multiple_of: int | None = None
    allow_vocab_shrink: bool = False
    vocab_size: int | None = None  # the base config's ``vocab_size``, if it declares one


@dataclass
class VocabPlan:
    """What planning the embedding and head decided."""

    tables: dict[str, TensorPlan] = field(default_factory=dict)  # by disk name
    skipped: set[str] = field(default_factory=set)  # base tensors not written as themselves
    config_updates: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_vocab(inputs: PlanInputs, options: VocabOptions) -> VocabPlan:
    """Plan the embedding and (unless it stays tied) the head.

    Raises:
        PlanError: the adapter changes a table this architecture has none of, trained sizes
            disagree, or a table does not fit the base.
    """
    lay = inputs.layout
    result = VocabPlan(skipped={lay.head} if lay.tied and lay.head else set())
    if lay.embed is None or lay.embed not in inputs.base.tensors:
        touched = _vocab_touched(inputs)
        if touched:
            raise PlanError(
                f"{inputs.adapter_file}: the adapter changes {', '.join(touched)}, but "
                "Mergeflow cannot identify this architecture's embedding and head")
        return result
    rows = _decide_rows(inputs, options, result)
    embed = _table(inputs, lay.embed, rows, lay.embed)
    result.tables[lay.embed] = embed
    if lay.head is None:
        return result
    if not lay.tied:
        result.tables[lay.head] = _table(inputs, lay.head, rows, lay.head)
        return result
    head = _tied_head(inputs, rows)
    if head.steps() == embed.steps():
        result.notes.append(f"{lay.head} stays tied to {lay.embed}: the adapter changes "
                            "neither of them differently")
    else:
        result.tables[lay.head] = head
        result.config_updates["tie_word_embeddings"] = False
        result.notes.append(f"{lay.head} untied from {lay.embed} and written separately "
                            f"({_untie_reason(inputs, head)}); tie_word_embeddings=false")
    return result


def _vocab_touched(inputs: PlanInputs) -> list[str]:
    """What the adapter changes of the embedding and head, by adapter name."""
    lay, adapter = inputs.layout, inputs.adapter
    names = {n for n in (lay.embed, lay.head) if n}
    touched = [m for m, s in adapter.modules.items() if s.kind == "embedding"]
    disk = lay.model_map.disk_name
    touched += [m for m in adapter.modules if disk(f"{m}.weight") in names]
    touched += list(adapter.token_deltas)
    touched += [n for n in inputs.replacements if n in names]
    return touched


def _untie_reason(inputs: PlanInputs, head: TensorPlan) -> str:
    if head.find(Lora) is not None:
        return "the adapter has LoRA on the head"
    if inputs.layout.head in inputs.replacements:
        return "the adapter trained its own head"
    return "the adapter changed the embedding, while the live head reads the base embedding"


def _decide_rows(inputs: PlanInputs, options: VocabOptions, result: VocabPlan) -> int:
    """The vocabulary's rows (:func:`mergeflow.model.vocab.decide_rows`); notes and the config's
    ``vocab_size`` go to ``result``."""
    lay, a = inputs.layout, inputs.adapter
    base_rows = inputs.base.tensors[lay.embed].shape[0]
    trained: dict[str, int] = {}
    for name in (lay.embed, lay.head):
        key = inputs.replacements.get(name) if name else None
        if key is not None:
            trained[key] = a.weights[key].shape[0]
    embed_lora = a.modules.get(inputs.memory_module(lay.embed))
    if embed_lora is not None:
        if embed_lora.kind != "embedding":
            raise PlanError(f"{inputs.adapter_file}: '{embed_lora.module}' is an embedding "
                            "but its LoRA weights are saved as a linear layer's")
        trained[embed_lora.a_key] = a.weights[embed_lora.a_key].shape[1]
    head_lora = a.modules.get(inputs.memory_module(lay.head)) if lay.head else None
    if head_lora is not None:
        trained[head_lora.b_key] = a.weights[head_lora.b_key].shape[0]
    rows, notes = decide_rows(base_rows, trained, options.tokenizer_len,
                              options.pad_to_multiple_of, options.allow_vocab_shrink)
    result.notes.extend(notes)
    if rows != base_rows or (options.vocab_size is not None and rows != options.vocab_size):
        result.config_updates["vocab_size"] = rows
    return rows


def _table(inputs: PlanInputs, name: str, rows: int, base_name: str,
           tied_tokens: str | None = None, source: Source | None = None) -> TensorPlan:
    """Plan the embedding or (untied) head table ``name`` of ``rows`` rows: its source (a trained
    copy, else ``base_name`` of the base, unless ``source`` is given), resize, LoRA, token rows."""
    a = inputs.adapter
    module = inputs.memory_module(name)
    if source is None:
        key = inputs.replacements.get(name)
        source = AdapterTensor(name=key) if key is not None else BaseTensor(name=base_name)
    src = a.weights[source.name] if isinstance(source, AdapterTensor) \
        else inputs.base.tensors[source.name]
    dim = inputs.base.tensors[base_name].shape[1]
    if len(src.shape) != 2 or src.shape[1] != dim:
        raise PlanError(f"{inputs.adapter_file}: '{source.name}' has shape {list(src.shape)}, but "
                        f"the base's rows are {dim} wide; was it trained on another base?")
    ops: list[Op] = [Resize(rows=rows)] if src.shape[0] != rows else []
    spec = a.modules.get(module)
    if spec is not None and spec.kind == "embedding":
        ops.append(EmbeddingLora(module=module))
    elif spec is not None:
        check_lora(inputs, module, (rows, dim), False)
        ops.append(Lora(module=module))
    tokens = module if module in a.token_deltas else tied_tokens
    if tokens is not None:
        _check_tokens(inputs, tokens, rows, dim)
        ops.append(TokenRows(module=tokens))
    return TensorPlan(name=name, dtype=inputs.dtype, shape=[rows, dim], source=source, ops=ops)


def _tied_head(inputs: PlanInputs, rows: int) -> TensorPlan:
    """The head of a tied base as the live adapter computes it.

    PEFT's head on a tied model reads the embedding's *base* weight: a trained
    ``modules_to_save`` copy or LoRA of the embedding does not reach it, while trainable
    tokens do (PEFT ties those).
    """
    lay, a = inputs.layout, inputs.adapter
    if a.config.ensure_weight_tying:
        raise PlanError(f"{inputs.adapter_file}: ensure_weight_tying=True on a tied base is "
                        "not supported yet; merge an adapter saved without it")
    embed_module = inputs.memory_module(lay.embed)
    tied_tokens = embed_module if embed_module in a.token_deltas else None
    source = None
    if lay.head not in inputs.replacements and lay.embed in inputs.base_layer:
        # PEFT saved the (possibly resized) base embedding: the head reads that
        source = AdapterTensor(name=inputs.replacements[lay.embed])
    return _table(inputs, lay.head, rows, lay.embed, tied_tokens, source)


def _check_tokens(inputs: PlanInputs, module: str, rows: int, dim: int) -> None:
    key, indices = inputs.adapter.token_deltas[module]
    delta = inputs.adapter.weights[key]
    if delta.shape != (len(indices), dim):
        raise PlanError(f"{inputs.adapter_file}: '{key}' has shape {list(delta.shape)}, "
                        f"expected [{len(indices)}, {dim}] for trainable tokens {indices}")
    bad = [i for i in indices if not 0 <= i < rows]
    if bad:
        raise PlanError(f"adapter_config.json: trainable token indices {bad} are outside "
                        f"the {rows}-row vocabulary")
