"""Start the merge deployment for one adapter, idempotently.

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
from collections.abc import Mapping
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
#: Run states after which a watcher may start a fresh attempt under a new key.
GIVEN_UP = frozenset({StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})


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
    try:
        return await asyncio.wait_for(_create(fields, key, deployment, api_url), timeout)
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


async def _create(fields: Mapping[str, Any], key: str, deployment: str,
                  api_url: str | None) -> FlowRun:
    async with prefect_client(api_url) as client:
        found = await client.read_deployment_by_name(deployment)
        spec = layered((found.parameters or {}).get("spec"), fields)
        return await arun_deployment(found.id, client=client, parameters=spec_parameters(spec),
                                     idempotency_key=key, timeout=0, as_subflow=False)


async def ensure_merge(fields: Mapping[str, Any], key: str, *, attempts: int = 3,
                       deployment: str = DEFAULT_DEPLOYMENT,
                       api_url: str | None = None) -> FlowRun:
    """Like :func:`start_merge`, but when the run under ``key`` ended failed, crashed or
    cancelled, start the next attempt (keys ``<key>#2``, ``<key>#3``, ... up to ``attempts``).

    The sequence of keys is fixed, so concurrent callers still share every attempt's run.
    """
    run = await start_merge(fields, key, deployment=deployment, api_url=api_url)
    for attempt in range(2, attempts + 1):
        if not given_up(run):
            break
        run = await start_merge(fields, f"{key}#{attempt}", deployment=deployment,
                                api_url=api_url)
    return run


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
