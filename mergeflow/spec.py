"""MergeSpec: one merge request, validated. The CLI, the Python API and the Prefect flow's
parameter form all take this same model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MergeSpec(BaseModel):
    """Everything that defines one merge."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(
        None, description="Base model: a folder (model.safetensors or shards + index), "
        "hf://org/name[@revision] or s3://bucket/prefix. Default: the base the adapter's "
        "config names.")
    adapter: str = Field(description="PEFT LoRA adapter: a folder (adapter_config.json + "
                         "weights), hf://org/name[@revision] or s3://bucket/prefix.")
    out: str = Field(description="Output folder; it appears only once the merge is complete.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Output dtype; 'auto' keeps the base's own float dtype (for a "
        "4-bit base merged to 16 bits: its bnb_4bit_compute_dtype; an 8-bit one: bfloat16; "
        "merged onto the original: the original's dtype).")
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
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where dequantizing, the merge math and re-quantizing run.")
    save_method: Literal["merged_16bit", "merged_4bit", "lora"] = Field(
        "merged_16bit", description="merged_16bit: a plain checkpoint in --dtype. merged_4bit: "
        "merge, then re-quantize the changed weights with the quantized base's own bitsandbytes "
        "settings (an 8-bit base stays 8-bit). lora: no merge; export the adapter as "
        "adapter_model.safetensors, checked against the base.")
    merge_onto: Literal["dequantized", "original"] = Field(
        "dequantized", description="For a quantized base: merge onto its dequantized weights "
        "(what the adapter was trained against) or onto the original 16-bit weights "
        "(--original-base).")
    original_base: str | None = Field(
        None, description="The 16-bit checkpoint the quantized base was made from "
        "(needed by merge_onto=original; tensor names and shapes must match).")
    verify: bool = Field(
        True, description="Check checksums, completeness and the numerics of every merged "
        "tensor before publishing.")
    workers: int | None = Field(
        None, ge=1, le=64, description="Layer groups merged in parallel (thread pool size); "
        "default: decided from the cores and memory available (see mergeflow.resources).")
    block_size: str = Field(
        "24MiB", pattern=r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]i?[Bb]|[Bb])?\s*$",
        description="Bytes of one row block: every tensor is read, merged and written in "
        "blocks of about this many float32 bytes, so memory never follows a tensor's size.")
    memory_limit: str | None = Field(
        None, pattern=r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]i?[Bb]|[Bb])?\s*$",
        description="Budget for the merge's working memory beyond the process baseline "
        "(workers x blocks must fit); default: a quarter of the available memory.")
    dask_address: str | None = Field(
        None, description="Run layer groups on this existing Dask cluster (e.g. "
        "tcp://scheduler:8786) instead of local threads; workers must see the same paths.")
    push_to: str | None = Field(
        None, pattern=r"^(hf|s3)://.+", description="Publish the verified output to "
        "hf://org/name or s3://bucket/prefix (the manifest goes last).")
    private: bool = Field(False, description="hf:// only: create the repo private.")
    revision: str | None = Field(None, description="hf:// only: branch to commit to.")
    create_pr: bool = Field(False, description="hf:// only: open a pull request instead.")
    commit_message: str | None = Field(None, description="hf:// only: the commit message.")
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="s3:// only: server-side encryption.")
    s3_kms_key_id: str | None = Field(None, description="s3:// only: KMS key for aws:kms.")
    low_disk: bool = Field(
        False, description="With push_to: publish each shard as soon as it is written and "
        "verified, then delete it locally (local disk stays near one shard).")

    @model_validator(mode="after")
    def _low_disk_needs_destination(self) -> MergeSpec:
        if self.low_disk and not self.push_to:
            raise ValueError("low_disk needs push_to: shards are shipped and deleted as they go")
        return self
