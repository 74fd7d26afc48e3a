"""The scheduled watcher: start a merge for every finished adapter that has no merge yet.

``merge_new_adapters`` scans a local folder or an S3 prefix (one folder per adapter; see
:mod:`triggers.finished` for what "finished" means), skips adapters whose merge already exists,
and starts the merge deployment for the others. Each run is created under an idempotency key made
from the adapter's location and the sha256 / ETag of its config and weights, so two overlapping
watcher runs (or a rerun) never start the same merge twice; a merge whose run failed, crashed or
was cancelled gets a fresh attempt (up to ``attempts`` in all).

With ``window_seconds`` (default 0: one run per adapter, as above), the adapters of one base that
arrive within the window are merged in one run of the batch deployment (``merge-adapters``, one
sweep over the base; e.g. every checkpoint a run writes). The finished adapters without a merge
are grouped by the base their ``adapter_config.json`` names (``base_model_name_or_path``; the
watcher's ``options.base``, when given, is every adapter's base). A group is held back while its
newest adapter finished less than ``window_seconds`` ago (local: the newest modification time of
its config, weights and marker; S3: their LastModified), so a new arrival extends the wait: the
group starts once no adapter of that base has finished for a whole window. Then one batch run
starts, under an idempotency key made from the group's sorted fingerprints; a group of one is
that adapter's single merge, under its own key. Adapters that a run not yet finished (of either
deployment) is merging are left out of the groups, so a group that grows while its first run
works is never merged twice; they come back only if that run fails (then the attempts above).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.policy import IO_RETRIES
from triggers.finished import (
    MARKERS,
    AdapterGroup,
    FinishedAdapter,
    adapter_base,
    find_finished,
    group_by_base,
    join_ref,
    merged_already,
)
from triggers.launch import (
    DEFAULT_BATCH_DEPLOYMENT,
    DEFAULT_DEPLOYMENT,
    adapters_in_flight,
    batch_parameters,
    ensure_merge,
    ensure_run,
)

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


@task(name="group-by-base", **_TASK)
def group_adapters(adapters: list[FinishedAdapter], base: str | None = None,
                   endpoint_url: str | None = None) -> list[AdapterGroup]:
    """The adapters grouped by the base their configs name (``base``: every adapter's)."""
    bases = [base or adapter_base(a, endpoint_url=endpoint_url) for a in adapters]
    return group_by_base(adapters, bases)


@task(name="adapters-in-flight", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def in_flight(deployments: list[str]) -> set[str]:
    """The adapters runs of these deployments are merging now (not yet finished)."""
    return asyncio.run(adapters_in_flight(deployments))


@task(name="start-batch", task_run_name="start-batch-{group.adapters[0].name}",
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_batch(group: AdapterGroup, fields: dict[str, Any], deployment: str,
                attempts: int) -> dict[str, Any]:
    """Start (or find) the group's batch run; returns its adapters, id, name and state."""
    refs, names = [a.ref for a in group.adapters], [a.name for a in group.adapters]
    run = asyncio.run(ensure_run(batch_parameters(fields, refs, names), group.key,
                                 attempts=attempts, deployment=deployment))
    return {"adapters": refs, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": run.state.type.value if run.state else "UNKNOWN"}


def merge_fields(adapter: FinishedAdapter, out_root: str, push_root: str | None,
                 options: dict[str, Any] | None) -> dict[str, Any]:
    """The run's spec fields: the trigger-level options, then adapter, out and push_to."""
    out = Path(out_root).expanduser().resolve() / adapter.name
    push_to = join_ref(push_root, adapter.name) if push_root else None
    return {**(options or {}), "adapter": adapter.ref, "out": str(out), "push_to": push_to}


def batch_fields(out_root: str, push_root: str | None, options: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """A batch run's shared spec fields: the options, then ``out`` (the root the outputs go
    under, ``<out_root>/<name>``) and ``push_to`` (``<push_root>/{name}``)."""
    out = Path(out_root).expanduser().resolve()
    push_to = join_ref(push_root, "{name}") if push_root else None
    return {**(options or {}), "out": str(out), "push_to": push_to}


@flow(name="merge-new-adapters")
def merge_new_adapters(location: str, out_root: str, push_root: str | None = None,
                       deployment: str = DEFAULT_DEPLOYMENT,
                       options: dict[str, Any] | None = None,
                       markers: tuple[str, ...] = MARKERS, attempts: int = 3,
                       s3_endpoint_url: str | None = None, window_seconds: float = 0,
                       batch_deployment: str = DEFAULT_BATCH_DEPLOYMENT
                       ) -> list[dict[str, Any]]:
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
        window_seconds: 0: one run per adapter. More: the adapters of one base are merged in
            one run of ``batch_deployment`` once none of them finished within this many
            seconds (see the module's text).
        batch_deployment: the batch deployment for ``window_seconds``, ``<flow>/<deployment>``.

    Returns:
        One record per run started or found: adapter (a batch run: adapters), flow_run_id,
        flow_run_name, state.
    """
    logger = get_run_logger()
    adapters = find_adapters(location, markers, s3_endpoint_url)
    logger.info("%d finished adapter(s) under %s", len(adapters), location)
    pending = []
    for adapter in adapters:
        if has_merge(adapter.name, out_root, push_root, s3_endpoint_url):
            logger.info("%s: already merged; skipped", adapter.name)
        else:
            pending.append(adapter)
    if window_seconds > 0:
        return _start_groups(pending, out_root, push_root, deployment, batch_deployment,
                             options, attempts, s3_endpoint_url, window_seconds)
    started = []
    for adapter in pending:
        record = start(adapter, merge_fields(adapter, out_root, push_root, options), deployment,
                       attempts)
        logger.info("%s: merge run %s (%s)", adapter.name, record["flow_run_name"],
                    record["state"])
        started.append(record)
    return started


def _start_groups(pending: list[FinishedAdapter], out_root: str, push_root: str | None,
                  deployment: str, batch_deployment: str, options: dict[str, Any] | None,
                  attempts: int, endpoint_url: str | None, window_seconds: float
                  ) -> list[dict[str, Any]]:
    """The window's way: leave out adapters a run is merging, group the others by base, hold
    back groups with a recent arrival, start one run per group that is ready."""
    logger = get_run_logger()
    busy = in_flight([deployment, batch_deployment]) if pending else set()
    for adapter in (a for a in pending if a.ref in busy):
        logger.info("%s: a merge run is working on it; skipped", adapter.name)
    waiting = [a for a in pending if a.ref not in busy]
    groups = group_adapters(waiting, (options or {}).get("base"), endpoint_url) if waiting else []
    now, started = time.time(), []
    for group in groups:
        names = ", ".join(a.name for a in group.adapters)
        if not group.ready(now, window_seconds):
            logger.info("%s (base %s): held back; the newest finished %.0f s ago, the window is "
                        "%.0f s", names, group.base, now - group.newest, window_seconds)
            continue
        if len(group.adapters) == 1:
            adapter = group.adapters[0]
            record = start(adapter, merge_fields(adapter, out_root, push_root, options),
                           deployment, attempts)
        else:
            record = start_batch(group, batch_fields(out_root, push_root, options),
                                 batch_deployment, attempts)
        logger.info("%s (base %s): merge run %s (%s)", names, group.base,
                    record["flow_run_name"], record["state"])
        started.append(record)
    return started
