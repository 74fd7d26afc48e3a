"""MergeSpec: one merge request, validated. The CLI, the Python API and the Prefect flow's
parameter form all take this same model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeSpec(BaseModel):
    """Everything that defines one merge."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base model folder (model.safetensors or shards + index).")
    adapter: str = Field(description="PEFT LoRA adapter folder (adapter_config.json + weights).")
    out: str = Field(description="Output folder; it appears only once the merge is complete.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Output dtype; 'auto' keeps the base's own float dtype.")
    max_shard_size: str = Field(
        "5GB", pattern=r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$",
        description="Largest output shard, e.g. 5GB or 500MiB.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder to ship; default: the adapter's, else the base's.")
    no_tokenizer: bool = Field(
        False, description="Write no tokenizer files (otherwise a missing tokenizer is an error).")
    pad_vocab_to_multiple_of: int | None = Field(
        None, ge=1, le=4096, description="Round the vocabulary up to a multiple of this.")
    allow_vocab_shrink: bool = Field(
        False, description="Allow a merged vocabulary smaller than the base's.")
    overwrite: bool = Field(
        False, description="Replace a finished output made from other inputs or options.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the merge math runs.")
