"""Vocabulary size decisions and row resizing for the embedding and the head.

Policy (each decision is recorded as a note in the merge report):

* The training run fixes the vocabulary when it saved full rows: ``modules_to_save`` copies,
  PEFT's saved base layers, embedding LoRA (``lora_embedding_A`` is (r, rows)) or a head LoRA
  (``lora_B`` is (rows, r)). These must agree with each other, and the tokenizer must fit in them.
* With no trained rows, the vocabulary is the base's, grown to the tokenizer's length when the
  tokenizer has added tokens.
* ``pad_to_multiple_of`` then rounds up. A result below the base's rows is a shrink, refused
  unless explicitly allowed.
* New rows are the mean of the existing rows (transformers' ``mean_resizing`` without its
  1e-9-scaled random noise, so merges stay deterministic).
"""

from __future__ import annotations

import torch

from mergeflow.errors import PlanError


def decide_rows(base_rows: int, trained: dict[str, int], tokenizer_len: int | None,
                pad_to_multiple_of: int | None, allow_shrink: bool) -> tuple[int, list[str]]:
    """Decide the merged model's vocabulary rows.

    Args:
        base_rows: rows of the base embedding.
        trained: rows implied by each trained adapter tensor, keyed by adapter key.
        tokenizer_len: ``len(tokenizer)`` of the tokenizer that ships, if any.
        pad_to_multiple_of: round the result up to a multiple of this.
        allow_shrink: permit fewer rows than the base has.

    Returns:
        The final row count and human-readable notes on why.

    Raises:
        PlanError: trained tensors disagree, the tokenizer does not fit, or an unallowed shrink.
    """
    notes = []
    sizes = set(trained.values())
    if len(sizes) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(trained.items()))
        raise PlanError(f"adapter: embedding/head tensors disagree on the vocabulary size ({detail})")
    if sizes:
        rows = sizes.pop()
        if tokenizer_len is not None and tokenizer_len > rows:
            raise PlanError(
                f"tokenizer: {tokenizer_len} tokens, but the adapter's trained embedding/head has "
                f"{rows} rows, so the model would index out of range; ship the tokenizer the "
                "adapter was trained with (`tokenizer=PATH`)"
            )
        if rows != base_rows:
            notes.append(f"vocabulary {base_rows} -> {rows} rows, as trained by the adapter")
    else:
        rows = base_rows
        if tokenizer_len is not None and tokenizer_len > base_rows:
            rows = tokenizer_len
            notes.append(f"vocabulary {base_rows} -> {rows} rows to fit the tokenizer's "
                         f"{tokenizer_len} tokens; the {rows - base_rows} new rows are the mean "
                         "of the existing rows (they were not trained)")
    if pad_to_multiple_of:
        padded = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
        if padded != rows:
            notes.append(f"vocabulary padded {rows} -> {padded} rows "
                         f"(`pad_vocab_to_multiple_of={pad_to_multiple_of}`)")
        rows = padded
    if rows < base_rows and not allow_shrink:
        raise PlanError(
            f"adapter: the merged vocabulary would shrink from {base_rows} to {rows} rows; pass "
            "`allow_vocab_shrink=True` if that is intended"
        )
    return rows, notes


def resize_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Grow (new rows = mean of the existing rows) or truncate a (rows, dim) table."""
    current = table.shape[0]
    if rows <= current:
        return table[:rows]
    mean = table.float().mean(dim=0, keepdim=True)  # (1, dim)
    return torch.cat([table.float(), mean.expand(rows - current, -1)]).to(table.dtype)


def set_config_field(config: dict, key: str, value: object) -> None:
    """Set a field at the top level and in nested text configs that carry it."""
    config[key] = value
    for nested in ("text_config", "language_config", "llm_config"):
        sub = config.get(nested)
        if isinstance(sub, dict) and (key in sub or nested == "text_config"):
            sub[key] = value
