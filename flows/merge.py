"""The merge pipeline as a Prefect flow.

load -> merge each layer group (the embedding/head group resizes the vocabulary and unties the
head) -> finalize (index, config, tokenizer, card, manifest) -> verify -> publish.

Groups run in parallel on the task runner the spec chooses: a bounded thread pool, or an
existing Dask cluster. A rerun resumes: groups whose shard is already written and
checksum-verified are not run again.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow import api, resources
from mergeflow.api import MergeReport, PreparedMerge
from mergeflow.errors import MergeError
from mergeflow.execute import ShardResult
from mergeflow.plan import MergePlan
from mergeflow.spec import MergeSpec
from mergeflow.verify import VerifyReport
from tasks import (
    finalize,
    load,
    merge_group,
    merge_low_disk,
    publish,
    resize_vocab_and_untie,
    upload,
    verify,
    write_gguf,
)


def _run_name() -> str:
    spec = flow_run.parameters.get("spec") or {}
    adapter = spec.get("adapter") if isinstance(spec, dict) else getattr(spec, "adapter", "")
    return f"merge-{Path(str(adapter)).name or 'adapter'}"


class Timings(dict):
    """Wall time per pipeline stage, in seconds."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[stage] = round(time.perf_counter() - start, 3)


def task_runner(spec: MergeSpec):
    """A Dask runner on the cluster at ``spec.dask_address``, else a thread pool of the workers
    :func:`mergeflow.resources.for_spec` decides (``spec.workers``, or from the cores and
    memory; torch's threads are divided between them)."""
    if spec.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec.dask_address)
    decided = resources.for_spec(spec)
    resources.apply_threads(decided)
    return ThreadPoolTaskRunner(max_workers=decided.workers)


@flow(name="merge-groups")
def merge_groups(prepared: PreparedMerge, device: str = "cpu",
                 progress: UUID | None = None) -> list[ShardResult]:
    """Write every layer group's shard that is not already written and verified; update the
    ``progress`` artifact as groups finish."""
    logger = get_run_logger()
    plan = MergePlan.load(Path(prepared.plan_path))
    staging = Path(prepared.staging)
    results: dict[int, ShardResult] = {}
    futures, index_of = [], {}
    for index, shard in enumerate(plan.shards):
        finished = api.finished_shard(staging, shard.filename)
        if finished is not None:
            results[index] = finished
            continue
        step = resize_vocab_and_untie if index in plan.vocab_groups else merge_group
        if device == "cuda":
            step = step.with_options(tags={"gpu"})
        future = step.submit(prepared.plan_path, index, device)
        futures.append(future)
        index_of[future.task_run_id] = index
    total = len(plan.shards)
    if results:
        logger.info("resuming: %d of %d groups already written and verified", len(results), total)
    for future in as_completed(futures):
        results[index_of[future.task_run_id]] = future.result()
        if progress is not None:
            update_progress_artifact(progress, 100 * len(results) / total)
    return [results[i] for i in range(total)]


@flow(name="merge-adapter", flow_run_name=_run_name)
def merge_adapter(spec: MergeSpec, prepared: PreparedMerge | None = None) -> MergeReport:
    """Merge a LoRA adapter into its base and publish a verified SafeTensors checkpoint.

    ``prepared``: the merge already planned by the caller (the CLI plans first, to fail fast on
    bad input); ``load`` then reuses it instead of planning again.
    """
    timings = Timings()
    with timings("load"):
        prepared = load(spec, prepared)
    if prepared.up_to_date:
        get_run_logger().info("%s already holds this merge; nothing to merge", prepared.out)
        if spec.push_to:
            _upload_published(spec)
        return api.up_to_date_report(prepared)
    if spec.low_disk:  # one shard on disk at a time: write, verify, ship, delete
        with timings("merge, verify and upload"):
            report = merge_low_disk(prepared, spec)
        report_artifacts(spec, prepared, report, [], None, timings)
        return report
    if spec.save_method == "gguf":  # one GGUF file streamed from the merge, then as below
        with timings("merge into gguf"):
            report = write_gguf(prepared, spec)
        with timings("publish"):
            publish(prepared)
        if spec.push_to:
            with timings("upload"):
                _upload_published(spec)
        report_artifacts(spec, prepared, report, [], None, timings)
        return report
    with timings("merge"):
        progress = create_progress_artifact(0.0, key="merge-progress",
                                            description="layer groups written")
        results = merge_groups.with_options(task_runner=task_runner(spec))(
            prepared, spec.device, progress)
    with timings("finalize"):
        report = finalize(prepared, results)
    with timings("verify"):
        verification = verify(prepared, spec.device, results) if spec.verify else None
    with timings("publish"):
        publish(prepared)
    if spec.push_to:
        with timings("upload"):
            _upload_published(spec)
    report_artifacts(spec, prepared, report, results, verification, timings)
    return report


def _upload_published(spec: MergeSpec) -> None:
    """The ``upload`` task, once ``spec.out`` is published: when it fails (after its retries),
    the flow fails with the error that says what is published and what is not
    (:func:`mergeflow.api.upload_error`)."""
    try:
        upload(spec)
    except MergeError as exc:
        raise api.upload_error(spec, exc) from exc


def report_artifacts(spec: MergeSpec, prepared: PreparedMerge, report: MergeReport,
                     results: list[ShardResult], verification: VerifyReport | None,
                     timings: dict[str, float]) -> None:
    """The markdown merge report and the per-tensor delta-norm table."""
    create_markdown_artifact(key="merge-report", markdown=report_markdown(
        spec, prepared, report, results, verification, timings), description="Merge report")
    if verification is not None and verification.checks:
        create_table_artifact(key="delta-norms", description="||W' - W|| / ||W|| per merged tensor",
                              table=[{"tensor": c.name, "kind": c.kind,
                                      "relative delta norm": f"{c.delta_norm:.3e}",
                                      "check error": f"{c.relative_error:.1e}",
                                      "ok": c.ok} for c in verification.checks])


def report_markdown(spec: MergeSpec, prepared: PreparedMerge, report: MergeReport,
                    results: list[ShardResult], verification: VerifyReport | None,
                    timings: dict[str, float]) -> str:
    """The merge report as markdown: inputs, options, plan, shards, timings, checks, decisions."""
    lines = [f"# Merge report: `{Path(spec.adapter).name}`", "",
             f"- base: `{spec.base}`", f"- adapter: `{spec.adapter}`", f"- output: `{report.out}`",
             f"- variant: {report.variant}; dtype: {report.dtype}; device: {spec.device}", "",
             "## Plan", "",
             f"{report.tensors} tensors, {report.lora_modules} LoRA merges, "
             f"{report.replaced_tensors} replaced tensors, {report.lora_biases} LoRA biases; "
             f"{report.total_size / 1e6:.1f} MB in {report.shards} shard(s).", "",
             "| shard | bytes | sha256 |", "| --- | ---: | --- |"]
    lines += [f"| {r.filename} | {r.size} | `{r.sha256[:16]}…` |" for r in results]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in timings.items()]
    lines += ["", "## Verification", ""]
    if verification is None:
        lines.append("skipped (verify=false)")
    else:
        worst = max((c.relative_error for c in verification.checks), default=0.0)
        lines.append(f"{'passed' if verification.ok else 'FAILED'}: {verification.files} files "
                     f"checksummed, {verification.tensors} tensors read, "
                     f"{len(verification.checks)} merged tensors checked numerically "
                     f"(worst relative error {worst:.1e}).")
        lines += [f"- warning: {w}" for w in verification.warnings]
    lines += ["", "## Decisions", ""]
    lines += [f"- {n}" for n in report.notes] or ["- none"]
    return "\n".join(lines) + "\n"
