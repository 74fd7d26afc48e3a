"""The scheduled watcher: start a merge for every finished adapter that has no merge yet.

``merge_new_adapters`` scans a local folder or an S3 prefix (one folder per adapter; see
:mod:`triggers.finished` for what "finished" means), skips adapters whose merge already exists,
and starts the merge deployment for the others. Each run is created under an idempotency key made
from the adapter's location and the sha256 / ETag of its config and weights, so two overlapping
watcher runs (or a rerun) never start the same merge twice; a merge whose run failed, crashed or
was cancelled gets a fresh attempt (up to ``attempts`` in all).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.policy import IO_RETRIES
from triggers.finished import MARKERS, FinishedAdapter, find_finished, join_ref, merged_already
from triggers.launch import DEFAULT_DEPLOYMENT, ensure_merge

_TASK = {"cache_policy": NO_CACHE, **IO_RETRIES}


@task(name="find-finished-adapters", **_TASK)
def find_adapters(location: str, markers: tuple[str, ...],
                  endpoint_url: str | None = None) -> list[FinishedAdapter]:
    """The finished adapters under ``location``."""
    return find_finished(location, markers, endpoint_url=endpoint_url)


@task(name="merged-already", task_run_name="merged-already-{name}", **_TASK)
def has_merge(name: str, out_root: str, push_root: str | None,
              endpoint_url: str | None = None) -> bool:
    """Whether adapter ``name``'s merge is finished (published manifest, else output folder)."""
    return merged_already(name, out_root, push_root, endpoint_url=endpoint_url)


@task(name="start-merge", task_run_name="start-merge-{adapter.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def start(adapter: FinishedAdapter, fields: dict[str, Any], deployment: str,
          attempts: int) -> dict[str, str]:
    """Start (or find) the adapter's merge run; returns its id, name and state."""
    run = asyncio.run(ensure_merge(fields, adapter.key, attempts=attempts, deployment=deployment))
    return {"adapter": adapter.ref, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": run.state.type.value if run.state else "UNKNOWN"}


def merge_fields(adapter: FinishedAdapter, out_root: str, push_root: str | None,
                 options: dict[str, Any] | None) -> dict[str, Any]:
    """The run's spec fields: the trigger-level options, then adapter, out and push_to."""
    out = Path(out_root).expanduser().resolve() / adapter.name
    push_to = join_ref(push_root, adapter.name) if push_root else None
    return {**(options or {}), "adapter": adapter.ref, "out": str(out), "push_to": push_to}


@flow(name="merge-new-adapters")
def merge_new_adapters(location: str, out_root: str, push_root: str | None = None,
                       deployment: str = DEFAULT_DEPLOYMENT,
                       options: dict[str, Any] | None = None,
                       markers: tuple[str, ...] = MARKERS, attempts: int = 3,
                       s3_endpoint_url: str | None = None) -> list[dict[str, str]]:
    """Start the merge deployment for each finished adapter under ``location`` without a merge.

    Args:
        location: a local folder or ``s3://bucket/prefix`` holding one folder per adapter.
        out_root: the local folder the merges are written under (``<out_root>/<name>``).
        push_root: publish each merge to ``<push_root>/<name>`` (``hf://org`` or
            ``s3://bucket/prefix``); then "merged" means the published manifest exists.
        deployment: the merge deployment, ``<flow>/<deployment>``.
        options: more MergeSpec fields for every run (over the deployment's defaults).
        markers: file names that mark an adapter folder as finished.
        attempts: runs per adapter version when earlier ones failed, crashed or were cancelled.
        s3_endpoint_url: an S3-compatible endpoint (default: the AWS chain, AWS_ENDPOINT_URL).

    Returns:
        One record per run started or found: adapter, flow_run_id, flow_run_name, state.
    """
    logger = get_run_logger()
    adapters = find_adapters(location, markers, s3_endpoint_url)
    logger.info("%d finished adapter(s) under %s", len(adapters), location)
    started = []
    for adapter in adapters:
        if has_merge(adapter.name, out_root, push_root, s3_endpoint_url):
            logger.info("%s: already merged; skipped", adapter.name)
            continue
        record = start(adapter, merge_fields(adapter, out_root, push_root, options), deployment,
                       attempts)
        logger.info("%s: merge run %s (%s)", adapter.name, record["flow_run_name"],
                    record["state"])
        started.append(record)
    return started
