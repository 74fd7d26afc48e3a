"""The results the pipeline's steps pass to one another and to their callers: small pydantic
models (and paths inside them), never tensors, so a Prefect task can return and persist them."""

from __future__ import annotations

from pydantic import BaseModel

from mergeflow.engine.shards import ShardResult
from mergeflow.pipeline.verification import VerifyReport
from mergeflow.remote.publish import PublishResult

__all__ = ["MergeReport", "PreparedMerge", "PublishResult", "ShardResult", "VerifyReport"]


class PreparedMerge(BaseModel):
    """The result of planning: where the plan lives and whether there is anything to do."""

    out: str
    staging: str
    plan_path: str
    fingerprint: str
    up_to_date: bool
    shard_count: int
    tensor_count: int
    total_size: int
    # shards merged while a new base's layout was learnt, already in staging and recorded
    # (mergeflow.pipeline.ahead): the run takes them as written, without reading them again
    written_ahead: list[ShardResult] = []


class MergeReport(BaseModel):
    """What a merge did, for people: printed by the CLI, stored in the manifest."""

    out: str
    status: str  # "merged" or "up-to-date"
    dtype: str
    shards: int
    tensors: int
    total_size: int
    lora_modules: int
    replaced_tensors: int
    lora_biases: int
    variant: str
    notes: list[str] = []
    save_method: str = "merged_16bit"
    shards_resumed: int = 0  # shards an interrupted earlier run had already written
    # save_method gguf (alone or with merged_16bit): each GGUF file written, name -> bytes
    gguf_files: dict[str, int] = {}
    # save_method gguf: llama.cpp's score of each quantized file against the 16-bit one
    gguf_scores: dict[str, dict[str, float]] = {}
    # this run, as the Prefect flow records it in its persisted result:
    timings: dict[str, float] = {}  # wall seconds per pipeline step
    verification: str | None = None  # the verification's outcome, in words
    manifest_sha256: str | None = None  # sha256 of the published output's manifest

    def durable(self) -> dict:
        """The fields that describe the output itself (stored in the manifest and model card);
        how this particular run got there (resumed shards, paths, timings) is left out."""
        return self.model_dump(exclude={"out", "status", "shards_resumed", "timings",
                                        "verification", "manifest_sha256"})


