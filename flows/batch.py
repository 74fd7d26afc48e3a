"""Several adapters of one base as one Prefect flow run: ``merge-adapters``.

The run's form takes the adapters as a list, optional output names (in the adapters' order)
and the options they share: a partial MergeSpec (:class:`flows.parameters.BatchRequest`)
layered over the deployment's default ``spec``, in which ``out`` is the folder the outputs go
under (``out/<name>``, the adapter folder's name unless ``out_names`` says otherwise) and
``push_to`` may be a template with ``{name}``.

One task, ``merge-many``, calls the core's :func:`mergeflow.pipeline.merge_many`: every output
is planned first (a refused adapter fails the run before anything is written, naming every bad
one), the base is swept once for all of them, then each output is finished, verified and
published on its own, exactly as a single merge of its adapter would be. As each output is
published it gets the artifacts ``merge-adapter`` makes for one output (merge report and
delta-norm table, under that output's keys). The run's persisted result is one report per
output, by output folder; when some outputs fail, the others stay published and the run fails
with one line naming both.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import ValidationError

from flows import failures
from flows.merge import (
    artifact_key,
    current_deployment,
    default_spec,
    manifest_digest,
    ref_tail,
    report_artifacts,
    run_for_cli,
    run_origin,
    spec_problems,
    up_to_date_artifact,
    verification_line,
)
from flows.parameters import BatchRequest, layered
from mergeflow import pipeline
from mergeflow.errors import InputError, OptionsError
from mergeflow.pipeline import Carried, MergeReport, PreparedMerge, resolved_base
from mergeflow.spec import MergeSpec
from tasks.merge import check_device
from tasks.policy import IO_RETRIES

failures.install()  # a MergeError is one line in the run's log, not a traceback

#: MergeSpec fields that differ per output (or are the batch's own): never shared options.
_PER_OUTPUT = ("adapter", "out", "base")


def batch_run_name(adapters: list[str], out: str) -> str:
    """A batch run's name: ``<n> adapters -> <out folder>`` (one adapter: its own name)."""
    what = ref_tail(adapters[0], 2) if len(adapters) == 1 else f"{len(adapters)} adapters"
    return f"{what} -> {ref_tail(out, 1)}"


def _run_name() -> str:
    adapters = list(flow_run.parameters.get("adapters") or [])
    spec = flow_run.parameters.get("spec") or {}
    out = spec.get("out") if isinstance(spec, dict) else getattr(spec, "out", "")
    return batch_run_name(adapters or ["?"], str(out or ""))


def shared_spec(request: Any, adapters: list[str], found: Any | None) -> MergeSpec:
    """The options every output shares: ``request`` over the deployment's default ``spec``,
    checked once as the spec of the first adapter (its ``out`` is the batch's folder).

    Raises:
        InputError: no adapters were given.
        OptionsError: the layered options are incomplete or invalid, naming the fields.
    """
    if not adapters:
        raise InputError("no adapters: give the run's `adapters` as a list of one or more "
                         "adapter locations; nothing was written")
    fields = request.fields_set() if isinstance(request, BatchRequest) else dict(request or {})
    try:
        return layered(default_spec(found), {**fields, "adapter": adapters[0]})
    except ValidationError as exc:
        where = run_origin(found)
        hint = f" (layered over the defaults of {where})" if where else ""
        raise OptionsError(f"invalid batch options: {spec_problems(exc)}{hint}; give `out` (the "
                           "folder the outputs go under) and the shared options in the run's "
                           "`spec`, the adapters in `adapters`") from None


def shared_options(spec: MergeSpec) -> dict[str, Any]:
    """The spec's fields that every output of the batch takes as they are."""
    return spec.model_dump(exclude=set(_PER_OUTPUT))


class _PerOutput:
    """``merge_many``'s ``on_finished``: the flow's report of each published output (timings,
    verification line, manifest sha256) and its artifacts, made as the output is finished."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.reports: dict[str, MergeReport] = {}

    def __call__(self, spec: MergeSpec, prepared: PreparedMerge, carried: Carried) -> None:
        assert carried.report is not None  # every route's first step makes it
        timings = {"batch, until this output was published":
                   round(time.perf_counter() - self.start, 3)}
        report = carried.report.model_copy(update={
            "timings": timings, "manifest_sha256": manifest_digest(spec.out),
            "verification": verification_line(carried.verification)
            if carried.verification else None})
        self.reports[spec.out] = report
        if prepared.up_to_date:
            up_to_date_artifact(spec, report)
        else:
            report_artifacts(spec, prepared, report, carried.results, carried.verification,
                             timings, resolved_base(prepared))
        get_run_logger().info("%s: %s (%s)", spec.out, report.status,
                              report.verification or "verification skipped")


@task(name="merge-many", cache_policy=NO_CACHE, **IO_RETRIES)
def merge_many(spec: MergeSpec, adapters: list[str], out_names: list[str] | None = None
               ) -> dict[str, MergeReport]:
    """Merge every adapter of the batch in one sweep over the base (the core's
    :func:`mergeflow.pipeline.merge_many`), each into ``spec.out/<name>``; artifacts per
    output as each is published.

    Raises:
        InputError: an adapter or output refused while planning (nothing written).
        PartialMergeError: some outputs failed; the others are published and named.
    """
    outputs = pipeline.output_folders(spec.out, adapters, out_names)
    per_output = _PerOutput()
    progress = create_progress_artifact(0.0, key=artifact_key("batch-progress", spec.out),
                                        description="shards swept and outputs published")
    pipeline.merge_many(spec.base, outputs, on_finished=per_output,
                        on_progress=lambda done: update_progress_artifact(progress, 100 * done),
                        **shared_options(spec))
    return {out: per_output.reports[out] for out in outputs}


@flow(name="merge-adapters", flow_run_name=_run_name, persist_result=True,
      result_serializer="json")
def merge_adapters(adapters: list[str], spec: BatchRequest,
                   out_names: list[str] | None = None) -> dict[str, MergeReport]:
    """Merge several LoRA adapters of one base, each into its own output, in one sweep over
    the base, and publish each verified checkpoint.

    ``adapters``: the adapters' locations (folders, ``hf://`` or ``s3://``). ``spec``: the
    options they share, ``out`` being the folder the outputs go under; from a deployment, only
    the fields to change (the rest come from its default ``spec``). ``out_names``: each
    output's folder name, in the adapters' order (default: the adapter folder's name).

    Returns one report per output, by output folder (the run's persisted result).
    """
    found = current_deployment()
    shared = shared_spec(spec, adapters, found)
    check_device(shared.device, run_origin(found))
    get_run_logger().info("batch: %d adapter(s) of base %s -> %s", len(adapters),
                          shared.base or "(named by the adapters' configs)", shared.out)
    return merge_many(shared, list(adapters), out_names)


def run_batch_from_cli(spec: MergeSpec, adapters: list[str], out_names: list[str] | None
                       ) -> tuple[dict[str, MergeReport], str]:
    """Run ``merge-adapters`` here for the CLI (``--prefect`` with several ``--adapter``);
    returns the reports and the run's name as the UI shows it.

    Raises:
        MergeError: the flow's own exception, when the run failed.
    """
    return run_for_cli(merge_adapters, adapters, spec, out_names)
