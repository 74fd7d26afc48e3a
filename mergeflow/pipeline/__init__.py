"""The merge pipeline: the one step order both routes follow (:mod:`.order`), the steps
(:mod:`.steps`), the results passed between them (:mod:`.results`), the in-process route
(:mod:`.local`), several adapters in one sweep over the base (:mod:`.many`) and the checks
around them (:mod:`.preflight`, :mod:`.verify`, :mod:`.resources`).

The names below are this package's public surface: ``flows/``, ``tasks/`` and ``triggers/``
import these and nothing else of the core (besides ``spec`` and ``errors``; a contract in
``pyproject.toml`` enforces it). They load on first use (PEP 562), so importing one light module
of the pipeline never pays for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    # the order and the routes
    "steps_for": "order", "run_steps": "order", "Carried": "order", "Steps": "order",
    "STEP_LABELS": "order", "Timings": "order",
    "merge": "local", "run_local": "local", "run_shards": "local",
    # several adapters of one base, one sweep over it
    "merge_many": "many", "output_folders": "many", "PartialMergeError": "many",
    # the steps
    "prepare": "steps", "run_shard": "steps", "finalize": "steps", "verify": "steps",
    "check_verified": "steps", "publish_output": "steps", "upload": "steps",
    "upload_error": "steps", "upload_published": "steps", "merge_low_disk": "steps",
    "write_gguf_output": "steps", "convert_gguf_output": "steps", "gguf_low_disk": "steps",
    "up_to_date_report": "steps", "finished_shard": "steps",
    "shard_states": "steps", "resolved_base": "steps",
    # the results
    "MergeReport": "results", "PreparedMerge": "results", "ShardResult": "results",
    "VerifyReport": "results", "PublishResult": "results",
    # workers and threads
    "for_spec": "resources", "apply_threads": "resources", "limit_threads": "resources",
    "running": "resources",
    # one writer per output
    "output_lock": "local",
    # what the watchers for finished adapters and outputs read
    "MANIFEST": "watch", "read_manifest": "watch", "HashCache": "watch", "sha256_file": "watch",
    "HF_SCHEME": "watch", "S3_SCHEME": "watch", "list_s3_prefix": "watch",
    "parse_hf_ref": "watch", "parse_s3_ref": "watch", "raise_s3": "watch", "s3_client": "watch",
    "s3_key": "watch",
}

__all__ = ["Carried", "HF_SCHEME", "HashCache", "MANIFEST", "MergeReport", "PartialMergeError",
           "PreparedMerge", "PublishResult", "S3_SCHEME", "STEP_LABELS", "ShardResult", "Steps", "Timings",
           "VerifyReport",
           "apply_threads", "check_verified", "convert_gguf_output", "finalize", "finished_shard",
           "for_spec", "gguf_low_disk", "limit_threads", "list_s3_prefix", "merge",
           "merge_low_disk", "merge_many", "output_folders", "output_lock",
           "parse_hf_ref", "parse_s3_ref", "prepare", "publish_output", "raise_s3", "read_manifest",
           "resolved_base", "run_local", "run_shard", "run_shards", "run_steps", "running", "s3_client",
           "s3_key", "sha256_file", "shard_states", "steps_for", "up_to_date_report", "upload",
           "upload_error", "upload_published", "verify", "write_gguf_output"]

if TYPE_CHECKING:
    from mergeflow.pipeline.local import merge, output_lock, run_local, run_shards
    from mergeflow.pipeline.many import PartialMergeError, merge_many, output_folders
    from mergeflow.pipeline.order import STEP_LABELS, Carried, Steps, Timings, run_steps, steps_for
    from mergeflow.pipeline.resources import apply_threads, for_spec, limit_threads, running
    from mergeflow.pipeline.results import (
        MergeReport,
        PreparedMerge,
        PublishResult,
        ShardResult,
        VerifyReport,
    )
    from mergeflow.pipeline.steps import (
        check_verified,
        convert_gguf_output,
        finalize,
        finished_shard,
        gguf_low_disk,
        merge_low_disk,
        prepare,
        publish_output,
        resolved_base,
        run_shard,
        shard_states,
        up_to_date_report,
        upload,
        upload_error,
        upload_published,
        verify,
        write_gguf_output,
    )
    from mergeflow.pipeline.watch import (
        HF_SCHEME,
        MANIFEST,
        S3_SCHEME,
        HashCache,
        list_s3_prefix,
        parse_hf_ref,
        parse_s3_ref,
        raise_s3,
        read_manifest,
        s3_client,
        s3_key,
        sha256_file,
    )


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mergeflow.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mergeflow.pipeline.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
