"""The merge pipeline's tasks. Each is one core call; see ``flows/merge.py`` for the order."""

from __future__ import annotations

import socket
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow import pipeline
from mergeflow.errors import InputError
from mergeflow.pipeline import MergeReport, PreparedMerge, PublishResult, ShardResult, VerifyReport
from mergeflow.spec import MergeSpec
from tasks.policy import IO_RETRIES

# Side-effecting tasks are never served from Prefect's cache: resume is decided by the core,
# which re-verifies each finished shard's sha256 (a cache hit cannot prove a file is intact).
_TASK = {"cache_policy": NO_CACHE, **IO_RETRIES}


@task(name="load", **_TASK)
def load(spec: MergeSpec, prepared: PreparedMerge | None = None,
         origin: str | None = None) -> PreparedMerge:
    """Resolve inputs, read headers, plan and validate the whole merge; set up staging.

    A ``prepared`` merge (planned by the caller moments ago) is reused as it is while its plan
    is still in its staging folder (or it was already finished): the merge is not planned twice.
    ``origin``: where the run came from (a deployment and its pool), for the refusal below.

    Raises:
        InputError: ``device`` is cuda and this machine has no CUDA GPU (before any staging).
    """
    check_device(spec.device, origin)
    if prepared is not None and (prepared.up_to_date or Path(prepared.plan_path).is_file()):
        return prepared
    return pipeline.prepare(spec)


def check_device(device: str, origin: str | None = None) -> None:
    """Refuse ``device`` cuda on a machine without CUDA, in words for where the run came from.

    Raises:
        InputError: no CUDA GPU here.
    """
    if device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    host = socket.gethostname()
    if origin:
        raise InputError(
            f"device cuda: {origin} ran on {host}, which has no CUDA GPU "
            "(torch.cuda.is_available() is False); nothing was written. Run this pool's worker "
            "on a GPU machine, or send the merge to the CPU deployment "
            "(merge-adapter/merge-adapter-cpu; webhook: \"target\": \"cpu\"; event: "
            "adapter_ready(..., target=\"cpu\"))")
    raise InputError(f"device cuda: {host} has no CUDA GPU (torch.cuda.is_available() is "
                     "False); nothing was written. Merge with device cpu")


@task(name="merge-shard", task_run_name="merge-shard-{index}", **_TASK)
def merge_shard(plan_path: str, index: int, device: str = "cpu") -> ShardResult:
    """Dequantize and merge one layer group into its output shard."""
    pipeline.limit_threads()
    return pipeline.run_shard(plan_path, index, device)


@task(name="resize-vocab-and-untie", task_run_name="resize-vocab-and-untie-{index}", **_TASK)
def resize_vocab_and_untie(plan_path: str, index: int, device: str = "cpu") -> ShardResult:
    """Write the group holding the embedding and head: resized, merged, untied as planned."""
    pipeline.limit_threads()
    return pipeline.run_shard(plan_path, index, device)


@task(name="finalize", **_TASK)
def finalize(prepared: PreparedMerge, results: list[ShardResult]) -> MergeReport:
    """Write index, config, tokenizer, model card and - last - the manifest (in staging)."""
    return pipeline.finalize(prepared, results)


@task(name="verify", **_TASK)
def verify(prepared: PreparedMerge, device: str = "cpu",
           results: list[ShardResult] | None = None) -> VerifyReport:
    """Check checksums, completeness, finiteness and the numerics of every merged tensor
    (the shards' sha256 from ``results``, computed as they were written, is trusted).

    Raises:
        VerificationError: any check failed; the output is not published.
    """
    report = pipeline.verify(prepared, device, results)
    pipeline.check_verified(prepared, report)
    return report


@task(name="publish", **_TASK)
def publish(prepared: PreparedMerge) -> str:
    """Move the verified output into place with one rename; returns the output path."""
    pipeline.publish_output(prepared)
    return prepared.out


@task(name="upload", **_TASK)
def upload(spec: MergeSpec) -> PublishResult:
    """Publish the finished output to ``spec.push_to``; files already there are skipped, the
    manifest goes last."""
    return pipeline.upload(spec)


@task(name="merge-low-disk", **_TASK)
def merge_low_disk(prepared: PreparedMerge, spec: MergeSpec) -> MergeReport:
    """Low-disk mode: write, verify, publish and delete one shard at a time, manifest last."""
    return pipeline.merge_low_disk(prepared, spec)[0]


@task(name="gguf-low-disk", **_TASK)
def gguf_low_disk(prepared: PreparedMerge, spec: MergeSpec) -> MergeReport:
    """--save-method gguf --low-disk: write, check, publish and delete one GGUF file at a time,
    then the Modelfile, card and - last - the manifest."""
    pipeline.limit_threads()
    return pipeline.gguf_low_disk(prepared, spec)[0]


@task(name="convert-gguf", **_TASK)
def convert_gguf(prepared: PreparedMerge, spec: MergeSpec, results: list[ShardResult],
                 report: MergeReport) -> MergeReport:
    """--save-method merged_16bit,gguf: the GGUF file(s) converted from the finished shards in
    staging (the base is not read again), checked; card and manifest written again."""
    pipeline.limit_threads()
    return pipeline.convert_gguf_output(prepared, spec, results, report)


@task(name="write-gguf", **_TASK)
def write_gguf(prepared: PreparedMerge, spec: MergeSpec) -> MergeReport:
    """--save-method gguf: stream the merge into one GGUF file (written under a partial name,
    fsynced, renamed), check it, write the Modelfile, card and manifest in staging."""
    pipeline.limit_threads()
    return pipeline.write_gguf_output(prepared, spec)
