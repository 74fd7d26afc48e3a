"""The merge pipeline as a Prefect flow.

load -> merge each layer group (the embedding/head group resizes the vocabulary and unties the
head) -> finalize (index, config, tokenizer, card, manifest) -> verify -> publish.

Groups run in parallel on the task runner the spec chooses: a bounded thread pool, or an
existing Dask cluster. A rerun resumes: groups whose shard is already written and
checksum-verified are not run again.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from flows import failures
from flows.parameters import MergeRequest, layered
from mergeflow import pipeline
from mergeflow.errors import MergeError, OptionsError
from mergeflow.pipeline import (
    Carried,
    MergeReport,
    PreparedMerge,
    ShardResult,
    Timings,
    VerifyReport,
    resolved_base,
)
from mergeflow.spec import MergeSpec, format_size
from tasks import (
    convert_gguf,
    finalize,
    gguf_low_disk,
    load,
    merge_low_disk,
    merge_shard,
    publish,
    resize_vocab_and_untie,
    upload,
    verify,
    write_gguf,
)

failures.install()  # a MergeError is one line in the run's log, not a traceback


def ref_tail(ref: str, parts: int) -> str:
    """The last ``parts`` parts of a path or ``s3://`` / ``hf://`` reference."""
    return "/".join(Path(ref).parts[-parts:]) if ref else "?"


def run_name(adapter: str, out: str) -> str:
    """A run's name, saying what is merged and where: ``<adapter> -> <out>`` (the adapter by its
    last two path parts, since its own folder is often just "adapter")."""
    return f"{ref_tail(adapter, 2)} -> {ref_tail(out, 1)}"


def _run_name() -> str:
    spec = flow_run.parameters.get("spec") or {}
    field = spec.get if isinstance(spec, dict) else (lambda k: getattr(spec, k, ""))
    return run_name(str(field("adapter") or ""), str(field("out") or ""))


def _shards_run_name() -> str:
    prepared = flow_run.parameters.get("prepared")
    out = prepared.get("out") if isinstance(prepared, dict) else getattr(prepared, "out", "")
    return f"write shards -> {ref_tail(str(out or ''), 1)}"


def current_deployment() -> Any | None:
    """The deployment this flow run was started from (None: a direct call, e.g. the CLI's)."""
    deployment_id = deployment.id
    if not deployment_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id)


def run_origin(found: Any | None) -> str | None:
    """Where the run came from, in words for its error messages (None: not a deployment)."""
    if found is None:
        return None
    return (f"deployment {flow_run.flow_name}/{found.name} (work pool "
            f"{found.work_pool_name or 'none'})")


def run_spec(request: Any, found: Any | None) -> MergeSpec:
    """The run's spec: its ``spec`` parameter layered over its deployment's default ``spec``
    (:func:`flows.parameters.layered`; Prefect itself would replace the whole default).

    Raises:
        OptionsError: the layered spec is incomplete or invalid; the message names the fields.
    """
    try:
        return layered(default_spec(found), request)
    except ValidationError as exc:
        problems = spec_problems(exc)
        where = run_origin(found)
        hint = (f" (the run's spec is layered over the defaults of {where}; give the missing "
                "fields in the run's spec, e.g. --param spec='{\"adapter\": ..., \"out\": ...}')"
                if where else "")
        raise OptionsError(f"invalid merge spec: {problems}{hint}") from None


def default_spec(found: Any | None) -> dict[str, Any]:
    """The deployment's default ``spec`` parameter (empty for a direct call)."""
    return ((found.parameters or {}).get("spec") if found is not None else None) or {}


def spec_problems(exc: ValidationError) -> str:
    """A layered spec's validation errors on one line: ``spec.<field>: <problem>; ...``."""
    return "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"]
                     else e["msg"] for e in exc.errors(include_url=False))


def artifact_key(kind: str, out: str) -> str:
    """A per-output artifact key: ``<kind>-<output folder name>-<6 hex of its full path>``, in
    the letters Prefect allows (lowercase letters, digits, dashes), so each output keeps its
    own artifact history."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(out).name.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:6]
    return "-".join(part for part in (kind, slug, digest) if part)


def task_runner(spec: MergeSpec, shards: int):
    """A Dask runner on the cluster at ``spec.dask_address``, else a thread pool of the workers
    :func:`mergeflow.pipeline.for_spec` decides (``spec.workers``, or from the cores and
    memory), at most one per shard of the ``shards``; torch's threads are divided between
    them."""
    if spec.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=spec.dask_address)
    decided = pipeline.running(pipeline.for_spec(spec), shards)
    pipeline.apply_threads(decided)
    return ThreadPoolTaskRunner(max_workers=decided.workers)


@flow(name="merge-shards", flow_run_name=_shards_run_name)
def merge_shards(prepared: PreparedMerge, device: str = "cpu",
                 progress: UUID | None = None) -> list[ShardResult]:
    """Write every layer group's shard that is not already written and verified; update the
    ``progress`` artifact as groups finish."""
    logger = get_run_logger()
    shards = pipeline.shard_states(prepared)
    results: dict[int, ShardResult] = {s.index: s.finished for s in shards if s.finished}
    futures, index_of = [], {}
    for shard in shards:
        if shard.finished is not None:
            continue
        step = resize_vocab_and_untie if shard.holds_vocab else merge_shard
        if device == "cuda":
            step = step.with_options(tags={"gpu"})
        future = step.submit(prepared.plan_path, shard.index, device)
        futures.append(future)
        index_of[future.task_run_id] = shard.index
    total = len(shards)
    if results:
        logger.info("resume: %d of %d groups already written and checksum-verified in %s, "
                    "kept: %s; writing %d", len(results), total, prepared.staging,
                    ", ".join(shards[i].filename for i in sorted(results)), len(futures))
    else:
        logger.info("writing all %d groups (nothing to resume in %s)", total, prepared.staging)
    for future in as_completed(futures):
        results[index_of[future.task_run_id]] = future.result()
        if progress is not None:
            update_progress_artifact(progress, 100 * len(results) / total)
    return [results[i] for i in range(total)]


@flow(name="merge-adapter", flow_run_name=_run_name, persist_result=True,
      result_serializer="json")
def merge_adapter(spec: MergeRequest) -> MergeReport:
    """Merge a LoRA adapter into its base and publish a verified SafeTensors checkpoint.

    ``spec``: the merge; from a deployment, only the fields to change - the rest come from the
    deployment's default ``spec`` (:func:`run_spec`). The report is the run's persisted result
    (``run_deployment(...).state.result()``). A merge the CLI planned moments ago in this
    process (:func:`run_from_cli`) is reused, not planned again; it is handed over beside the
    parameters, so the run form shows ``spec`` alone.
    """
    found = current_deployment()
    spec = run_spec(spec, found)
    prepared = _planned_by_cli.pop(str(spec.out), None)
    with pipeline.output_lock(spec.out):  # one writer per output (re-entrant for the CLI's)
        return _merge_locked(spec, prepared, found)


def _merge_locked(spec: MergeSpec, prepared: PreparedMerge | None, found: Any | None
                  ) -> MergeReport:
    """The flow's body, holding the output's lock: load, then the pipeline's steps as tasks."""
    timings = Timings()
    with timings("load"):
        prepared = load(spec, prepared, run_origin(found))
    base = resolved_base(prepared)
    log_plan(prepared, base)
    carried = pipeline.run_steps(prepared, spec, FlowSteps(), around=timings.step)
    assert carried.report is not None  # every route's first step makes the report
    report = carried.report.model_copy(update={
        "timings": dict(timings), "manifest_sha256": manifest_digest(spec.out),
        "verification": verification_line(carried.verification) if carried.verification
        else None})
    if prepared.up_to_date:
        up_to_date_artifact(spec, report)
    else:
        report_artifacts(spec, prepared, report, carried.results, carried.verification,
                         timings, base)
        log_timings(timings)
    return report


def manifest_digest(out: str) -> str | None:
    """sha256 of ``out``'s manifest (None where there is none: a low-disk merge ships it)."""
    path = Path(out) / pipeline.MANIFEST
    return pipeline.sha256_file(path) if path.is_file() else None


class FlowSteps:
    """Each pipeline step as this flow's task (the order is :func:`mergeflow.pipeline.steps_for`'s).
    Steps after the shards are submitted with their dependencies, so the run's graph shows
    finalize -> verify -> publish."""

    def __init__(self) -> None:
        self.last = None  # the future the next step waits for

    def up_to_date(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        get_run_logger().info("%s already holds this merge; nothing to merge", prepared.out)
        carried.report = pipeline.up_to_date_report(prepared)

    def merge_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = merge_low_disk(prepared, spec)

    def gguf_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = gguf_low_disk(prepared, spec)

    def write_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = write_gguf(prepared, spec)

    def write_shards(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        progress = create_progress_artifact(0.0, key=artifact_key("merge-progress", spec.out),
                                            description="layer groups written")
        runner = task_runner(spec, prepared.shard_count)
        carried.results = merge_shards.with_options(task_runner=runner)(prepared, spec.device,
                                                                        progress)

    def finalize(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        self.last = finalize.submit(prepared, carried.results)
        carried.report = self.last.result()

    def verify(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        self.last = verify.submit(prepared, spec.device, carried.results, wait_for=[self.last])
        carried.verification = self.last.result()
        log_verification(carried.verification)

    def convert_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        self.last = convert_gguf.submit(prepared, spec, carried.results, carried.report,
                                        wait_for=[self.last])
        carried.report = self.last.result()
        get_run_logger().info("converted the shards into %s", ", ".join(carried.report.gguf_files))

    def publish(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        if spec.save_method != "gguf" and not spec.verify:
            get_run_logger().info("verification skipped (verify=false)")
        publish.submit(prepared, wait_for=[self.last] if self.last else []).result()
        get_run_logger().info("published %s", prepared.out)

    def upload(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        _upload_published(spec)


#: Merges the CLI planned in this process, by output, for the flow run it starts to reuse
#: (:func:`run_from_cli`); kept off the flow's parameters, so the run form does not show them.
_planned_by_cli: dict[str, PreparedMerge] = {}

#: Flow runs this process started for the CLI (``run_from_cli``) and that are running now.
_cli_runs: set[UUID] = set()


def _note_running(flow: Any, run: Any, state: Any) -> None:
    """``on_running`` hook: remember the run, so an interrupt can mark it crashed."""
    _cli_runs.add(run.id)


def run_from_cli(spec: MergeSpec, prepared: PreparedMerge) -> tuple[MergeReport, str]:
    """Run ``merge-adapter`` here on a merge the CLI planned; returns its report and the run's
    name as the UI shows it.

    Raises:
        MergeError: the flow's own exception, when the run failed.
    """
    _planned_by_cli[str(spec.out)] = prepared
    try:
        return run_for_cli(merge_adapter, spec)
    finally:
        _planned_by_cli.pop(str(spec.out), None)


def run_for_cli(flow_to_run: Any, *args: Any) -> tuple[Any, str]:
    """Run ``flow_to_run(*args)`` here for the CLI, remembered while it runs (so that an
    interrupt marks it crashed, :func:`abandon_cli_runs`); returns its result and the run's
    name as the UI shows it.

    Raises:
        MergeError: the flow's own exception, when the run failed.
    """
    state = flow_to_run.with_options(on_running=[_note_running])(*args, return_state=True)
    run_id = state.state_details.flow_run_id
    _cli_runs.discard(run_id)
    return state.result(), flow_run_name(run_id)


def flow_run_name(flow_run_id: UUID) -> str:
    """The flow run's name as the Prefect UI shows it (its id if the API cannot say)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).name
    except Exception:
        return str(flow_run_id)


def abandon_cli_runs(message: str, timeout: float = 5.0) -> None:
    """The CLI is stopping on a signal: mark the runs it started crashed with ``message`` (so
    the UI does not show them running for ever) and stop Prefect's temporary server, each
    within about ``timeout`` seconds; nothing here raises."""
    def mark() -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            for run_id in list(_cli_runs):
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)

    if _cli_runs:
        marking = threading.Thread(target=mark, name="mergeflow-abandon", daemon=True)
        marking.start()
        marking.join(timeout)
    server_module = sys.modules.get("prefect.server.api.server")  # started only if it was used
    servers = getattr(getattr(server_module, "SubprocessASGIServer", None), "_instances", {})
    for server in list(servers.values()):
        with suppress(Exception):  # the process is exiting anyway
            server.stop()


def log_plan(prepared: PreparedMerge, base: str | None) -> None:
    """The plan's summary in the flow run's log."""
    get_run_logger().info(
        "plan: base %s -> %s: %d tensors in %d shard(s), %s; staging %s%s", base,
        prepared.out, prepared.tensor_count, prepared.shard_count,
        format_size(prepared.total_size), prepared.staging,
        " (up to date)" if prepared.up_to_date else "")


def verification_line(verification: VerifyReport) -> str:
    """The verification's outcome in words (the log line, and the persisted result's)."""
    worst = max((c.relative_error for c in verification.checks), default=0.0)
    warnings = "".join(f"; warning: {w}" for w in verification.warnings)
    return (f"verification {'passed' if verification.ok else 'FAILED'}: {verification.files} "
            f"files checksummed, {verification.tensors} tensors read, {len(verification.checks)} "
            f"merged tensors checked numerically (worst relative error {worst:.1e}){warnings}")


def log_verification(verification: VerifyReport) -> None:
    """The verification's outcome in the flow run's log."""
    get_run_logger().info("%s", verification_line(verification))


def log_timings(timings: dict[str, float]) -> None:
    """Each stage's wall time in the flow run's log."""
    get_run_logger().info("timings: %s", ", ".join(f"{stage} {seconds:.2f} s"
                                                     for stage, seconds in timings.items()))


def _upload_published(spec: MergeSpec) -> None:
    """The ``upload`` task, once ``spec.out`` is published: when it fails (after its retries),
    the flow fails with the error that says what is published and what is not
    (:func:`mergeflow.pipeline.upload_error`)."""
    try:
        upload(spec)
    except MergeError as exc:
        raise pipeline.upload_error(spec, exc) from exc


def up_to_date_artifact(spec: MergeSpec, report: MergeReport) -> None:
    """The short merge report of an output that already held this merge (nothing written)."""
    create_markdown_artifact(
        key=artifact_key("merge-report", spec.out), description=f"Merge report: {spec.out}",
        markdown=f"# Merge report: `{Path(spec.adapter).name}`\n\n`{spec.out}` already holds "
                 f"this merge (manifest sha256 `{report.manifest_sha256}`); nothing was "
                 "written.\n")


def report_artifacts(spec: MergeSpec, prepared: PreparedMerge, report: MergeReport,
                     results: list[ShardResult], verification: VerifyReport | None,
                     timings: dict[str, float], base: str | None = None) -> None:
    """The markdown merge report and the per-tensor delta-norm table, under keys of this
    output's own (:func:`artifact_key`)."""
    create_markdown_artifact(key=artifact_key("merge-report", spec.out), markdown=report_markdown(
        spec, prepared, report, results, verification, timings, base),
        description=f"Merge report: {spec.out}")
    if verification is not None and verification.checks:
        create_table_artifact(key=artifact_key("delta-norms", spec.out),
                              description="||W' - W|| / ||W|| per merged tensor",
                              table=[{"tensor": c.name, "kind": c.kind,
                                      "relative delta norm": f"{c.delta_norm:.3e}",
                                      "check error": f"{c.relative_error:.1e}",
                                      "ok": c.ok} for c in verification.checks])


def report_markdown(spec: MergeSpec, prepared: PreparedMerge, report: MergeReport,
                    results: list[ShardResult], verification: VerifyReport | None,
                    timings: dict[str, float], base: str | None = None) -> str:
    """The merge report as markdown: inputs (``base``: the base folder read, as resolved from
    ``spec.base`` or the adapter's config), options, plan, shards, timings, checks, decisions."""
    given = f" (given as `{spec.base}`)" if spec.base and spec.base != base else \
        ("" if spec.base else " (named by the adapter's config)")
    lines = [f"# Merge report: `{Path(spec.adapter).name}`", "",
             f"- base: `{base or spec.base}`{given}", f"- adapter: `{spec.adapter}`",
             f"- output: `{report.out}`",
             f"- variant: {report.variant}; dtype: {report.dtype}; device: {spec.device}", "",
             "## Plan", "",
             f"{report.tensors} tensors, {report.lora_modules} LoRA merges, "
             f"{report.replaced_tensors} replaced tensors, {report.lora_biases} LoRA biases; "
             f"{format_size(report.total_size)} in {report.shards} shard(s).", "",
             "| shard | bytes | sha256 |", "| --- | ---: | --- |"]
    lines += [f"| {r.filename} | {r.size} | `{r.sha256[:16]}…` |" for r in results]
    if report.gguf_files and results:  # merged_16bit,gguf: converted from those shards
        lines += ["", "GGUF, converted from those shards: " + ", ".join(
            f"`{name}` ({size} bytes)" for name, size in report.gguf_files.items()) + "."]
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
