"""Start the merge deployment for one adapter (or the batch deployment for several of one
base), idempotently.

Every trigger (webhook, folder watcher) ends here. The deployment's own default ``spec``
parameter (set in ``deployments/prefect.yaml`` or in the UI: device, workers, dtype, ...) is
layered under the fields the trigger supplies (:func:`flows.parameters.layered`, the rule the
flow itself applies to a run's ``spec``), so site-wide choices live in one place and a
trigger only says which adapter, where to write and where to publish.

A run is created with an idempotency key: the Prefect server answers a second request with the
same key (for the same deployment) with the run it already made, so a redelivered webhook or two
overlapping watcher runs never start the same merge twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

from flows.parameters import layered  # the one layering, the flow's own
from mergeflow.spec import MergeSpec

#: The GPU merge deployment (``<flow name>/<deployment name>``) of deployments/prefect.yaml.
DEFAULT_DEPLOYMENT = "merge-adapter/merge-adapter"
#: The CPU merge deployment, for bases small enough (or quantized enough) to merge on CPU.
CPU_DEPLOYMENT = "merge-adapter/merge-adapter-cpu"
#: The batch deployment (several adapters of one base in one run, ``flows/batch.py``).
DEFAULT_BATCH_DEPLOYMENT = "merge-adapters/merge-adapters"
#: The CPU batch deployment.
CPU_BATCH_DEPLOYMENT = "merge-adapters/merge-adapters-cpu"
#: Run states after which a watcher may start a fresh attempt under a new key.
GIVEN_UP = frozenset({StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})
#: Run states after which a run no longer works on its adapters.
FINAL = GIVEN_UP | {StateType.COMPLETED}

#: A run's flow parameters, built from its deployment's default ``spec`` (None: none).
ParametersFor = Callable[[Mapping[str, Any] | None], dict[str, Any]]


class LaunchError(Exception):
    """The merge run could not be started."""


class PrefectUnavailable(LaunchError):
    """The Prefect API did not answer, or has no such deployment (worth retrying later)."""


class DeploymentMissing(PrefectUnavailable):
    """The Prefect server answers but has no such deployment."""


class RunRefused(LaunchError):
    """The Prefect server refused the run's parameters (the deployment's schema)."""


def spec_parameters(spec: MergeSpec) -> dict[str, Any]:
    """The flow parameters of a merge run: ``{"spec": <spec as JSON, unset options dropped>}``."""
    return {"spec": spec.model_dump(mode="json", exclude_none=True)}


def merge_parameters(fields: Mapping[str, Any]) -> ParametersFor:
    """A ``merge-adapter`` run's parameters: ``fields`` over the deployment's default spec."""
    return lambda defaults: spec_parameters(layered(defaults, fields))


def batch_parameters(fields: Mapping[str, Any], adapters: Sequence[str],
                     out_names: Sequence[str] | None = None) -> ParametersFor:
    """A ``merge-adapters`` run's parameters: the adapters, their output names and the shared
    ``fields`` over the deployment's default spec (checked as the first adapter's spec, then
    sent without ``adapter``; ``out`` is the folder the outputs go under)."""
    def build(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
        spec = layered(defaults, {**fields, "adapter": adapters[0]})
        return {"adapters": list(adapters),
                "spec": spec.model_dump(mode="json", exclude_none=True, exclude={"adapter"}),
                "out_names": list(out_names) if out_names else None}
    return build


def prefect_client(api_url: str | None = None) -> PrefectClient:
    """A client for ``api_url``; without one, Prefect's usual client (``PREFECT_API_URL``, or the
    client of the flow run this is called from)."""
    if not api_url:
        return get_client()
    return PrefectClient(api_url, auth_string=PREFECT_API_AUTH_STRING.value(),
                         api_key=PREFECT_API_KEY.value())


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect's settings see it now (None when unset)."""
    return PREFECT_API_URL.value() or None


async def start_merge(fields: Mapping[str, Any], key: str, *,
                      deployment: str = DEFAULT_DEPLOYMENT, api_url: str | None = None,
                      timeout: float = 15.0) -> FlowRun:
    """Create the merge run for ``fields`` under idempotency ``key`` and return it at once
    (the same run when the key was used before).

    Raises:
        pydantic.ValidationError: ``fields`` over the deployment defaults is no valid spec.
        PrefectUnavailable: the API is unreachable or slow, or the deployment does not exist.
        RunRefused: the server rejected the parameters.
    """
    return await start_run(merge_parameters(fields), key, deployment=deployment,
                           api_url=api_url, timeout=timeout)


async def start_run(parameters_for: ParametersFor, key: str, *, deployment: str,
                    api_url: str | None = None, timeout: float = 15.0) -> FlowRun:
    """Create a run of ``deployment`` with the parameters ``parameters_for`` builds from its
    default spec, under idempotency ``key``; return it at once (the same run when the key was
    used before). Raises as :func:`start_merge`."""
    try:
        return await asyncio.wait_for(_create(parameters_for, key, deployment, api_url),
                                      timeout)
    except ObjectNotFound as exc:
        raise DeploymentMissing(f"deployment {deployment!r} not found on the Prefect server; "
                                 "deploy it (deployments/deploy.sh)") from exc
    except PrefectHTTPStatusError as exc:
        status = exc.response.status_code
        if status in (409, 422):
            raise RunRefused(f"the Prefect server refused the run (HTTP {status}): "
                             f"{_detail(exc.response)}") from exc
        raise PrefectUnavailable(f"the Prefect API answered HTTP {status}") from exc
    except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
        raise PrefectUnavailable(f"the Prefect API is unreachable ({type(exc).__name__})") from exc


async def _create(parameters_for: ParametersFor, key: str, deployment: str,
                  api_url: str | None) -> FlowRun:
    async with prefect_client(api_url) as client:
        found = await client.read_deployment_by_name(deployment)
        parameters = parameters_for((found.parameters or {}).get("spec"))
        return await arun_deployment(found.id, client=client, parameters=parameters,
                                     idempotency_key=key, timeout=0, as_subflow=False)


async def ensure_merge(fields: Mapping[str, Any], key: str, *, attempts: int = 3,
                       deployment: str = DEFAULT_DEPLOYMENT,
                       api_url: str | None = None) -> FlowRun:
    """Like :func:`start_merge`, but when the run under ``key`` ended failed, crashed or
    cancelled, start the next attempt (keys ``<key>#2``, ``<key>#3``, ... up to ``attempts``).

    The sequence of keys is fixed, so concurrent callers still share every attempt's run.
    """
    return await ensure_run(merge_parameters(fields), key, attempts=attempts,
                            deployment=deployment, api_url=api_url)


async def ensure_run(parameters_for: ParametersFor, key: str, *, attempts: int = 3,
                     deployment: str = DEFAULT_DEPLOYMENT,
                     api_url: str | None = None) -> FlowRun:
    """:func:`start_run` with :func:`ensure_merge`'s attempts (``<key>#2``, ...)."""
    run = await start_run(parameters_for, key, deployment=deployment, api_url=api_url)
    for attempt in range(2, attempts + 1):
        if not given_up(run):
            break
        run = await start_run(parameters_for, f"{key}#{attempt}", deployment=deployment,
                              api_url=api_url)
    return run


async def adapters_in_flight(deployments: Sequence[str], api_url: str | None = None
                             ) -> set[str]:
    """The adapters that runs of these deployments not yet finished (scheduled, pending,
    running, paused, ...) are working on: ``spec.adapter`` of a merge run, every entry of
    ``adapters`` of a batch run. A deployment the server does not know has none.

    Raises:
        PrefectUnavailable: the API is unreachable.
    """
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    busy: set[str] = set()
    try:
        async with prefect_client(api_url) as client:
            for name in deployments:
                try:
                    found = await client.read_deployment_by_name(name)
                except ObjectNotFound:
                    continue
                offset = 0
                while True:
                    runs = await client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
                        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                            type=FlowRunFilterStateType(not_any_=list(FINAL)))),
                        limit=200, offset=offset)
                    busy.update(a for run in runs for a in run_adapters(run.parameters))
                    if len(runs) < 200:
                        break
                    offset += len(runs)
    except (httpx.HTTPError, OSError) as exc:
        raise PrefectUnavailable(f"the Prefect API is unreachable ({type(exc).__name__})") from exc
    return busy


def run_adapters(parameters: Mapping[str, Any]) -> list[str]:
    """The adapters a run's parameters name (a merge run's ``spec.adapter``, a batch run's
    ``adapters``)."""
    spec = parameters.get("spec") or {}
    single = [spec["adapter"]] if isinstance(spec, Mapping) and spec.get("adapter") else []
    return [*single, *(parameters.get("adapters") or [])]


def given_up(run: FlowRun) -> bool:
    """Whether the run ended without completing (failed, crashed or cancelled)."""
    return run.state is not None and run.state.type in GIVEN_UP


async def api_healthy(api_url: str | None = None, timeout: float = 5.0) -> bool:
    """Whether the Prefect API answers its health check within ``timeout`` seconds."""
    try:
        async with prefect_client(api_url) as client:
            problem = await asyncio.wait_for(client.api_healthcheck(), timeout)
    except Exception:
        return False
    return problem is None


def _detail(response: httpx.Response) -> str:
    """The ``detail`` of an API error answer, on one line."""
    try:
        detail = response.json().get("detail", "")
    except ValueError:
        detail = response.text
    return " ".join(str(detail).split())[:500]
