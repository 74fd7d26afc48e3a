"""The ``mergeflow.adapter.ready`` event: how a trainer says "this adapter is finished".

The merge deployments of ``deployments/prefect.yaml`` carry an event trigger on it; the event's
payload becomes the run's ``spec`` parameter:

============  ==============================================================
payload key   meaning
============  ==============================================================
adapter       the adapter: a folder, ``hf://org/name[@rev]`` or ``s3://...``
out           the output folder of the merge
base          optional: the base model (default: the one the adapter names)
push_to       optional: publish to ``hf://org/name`` or ``s3://bucket/prefix``
device        optional: ``cuda`` (GPU deployment default) or ``cpu`` (routes to the CPU
              deployment unless ``target`` says otherwise)
dtype         optional: ``auto`` (default), ``bfloat16``, ``float16``, ``float32``
save_method   optional: ``merged_16bit`` (default), ``merged_4bit``, ``lora``
============  ==============================================================

The keys are :class:`~mergeflow.spec.MergeSpec`'s own field names. ``destination`` is the
deprecated old name of ``push_to``: the triggers still read it (``push_to`` wins when both are
set), but nothing emits it any more.

The event's resource id routes it: ``mergeflow.adapter.<adapter>`` starts the GPU deployment,
``mergeflow.cpu-adapter.<adapter>`` the CPU one. Without a ``target``, the route follows
``device`` (:func:`route_for`: ``cpu`` -> the CPU deployment, ``cuda`` or none -> the GPU one),
the same rule the webhook (``triggers.webhook``) applies; ``target="cpu"`` with
``device="cuda"`` is refused (:func:`route_problem`) before anything is sent.

From a Prefect flow (or any Python with ``PREFECT_API_URL`` set) call :func:`adapter_ready`;
from anything else POST :func:`adapter_ready_event`'s JSON (a list of one event) to the server's
``/api/events`` (see docs/operations.md for a curl example).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Literal

ADAPTER_READY = "mergeflow.adapter.ready"
RESOURCE_PREFIX = {"gpu": "mergeflow.adapter.", "cpu": "mergeflow.cpu-adapter."}

Target = Literal["gpu", "cpu"]


def route_for(target: Target | None, device: str | None) -> Target:
    """The route of a merge: ``target`` when given, else from ``device`` (``cpu`` -> ``cpu``;
    ``cuda`` or unset -> ``gpu``, the default deployment)."""
    if target is not None:
        return target
    return "cpu" if device == "cpu" else "gpu"


def route_problem(target: Target | None, device: str | None) -> str | None:
    """Why this route cannot run (None: it can): ``device`` cuda sent to the CPU deployment."""
    if route_for(target, device) == "cpu" and device == "cuda":
        return "device cuda cannot run on the CPU deployment (target cpu); drop device, or use " \
            "target gpu"
    return None


def _checked_route(target: Target | None, device: str | None) -> Target:
    problem = route_problem(target, device)
    if problem:
        raise ValueError(problem)
    return route_for(target, device)


def adapter_resource(adapter: str, target: Target = "gpu") -> dict[str, str]:
    """The event resource of an adapter; its id prefix picks the GPU or the CPU deployment."""
    return {"prefect.resource.id": f"{RESOURCE_PREFIX[target]}{adapter}",
            "prefect.resource.name": adapter}


def adapter_ready_payload(adapter: str, out: str, base: str | None = None,
                          push_to: str | None = None, **options: Any) -> dict[str, Any]:
    """The event payload: MergeSpec field names, unset values left out."""
    payload = {"adapter": adapter, "out": out, "base": base, "push_to": push_to, **options}
    return {k: v for k, v in payload.items() if v is not None}


def adapter_ready(adapter: str, out: str, base: str | None = None, push_to: str | None = None,
                  *, target: Target | None = None, **options: Any):
    """Emit ``mergeflow.adapter.ready`` through Prefect's events client.

    ``options``: ``device``, ``dtype`` or ``save_method`` (the keys the triggers read).
    ``target``: the deployment, ``gpu`` or ``cpu``; default: from ``device`` (:func:`route_for`).
    Returns the emitted :class:`prefect.events.Event` (None when events are disabled).

    Raises:
        ValueError: ``device`` cuda routed to the CPU deployment (:func:`route_problem`).
    """
    from prefect.events import emit_event

    route = _checked_route(target, options.get("device"))
    return emit_event(event=ADAPTER_READY, resource=adapter_resource(adapter, route),
                      payload=adapter_ready_payload(adapter, out, base, push_to, **options))


def adapter_ready_event(adapter: str, out: str, base: str | None = None,
                        push_to: str | None = None, *, target: Target | None = None,
                        event_id: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """The JSON body to POST to ``<PREFECT_API_URL>/events``: a list of one event (routed as
    :func:`adapter_ready` routes it).

    A fixed ``event_id`` makes a resent event a duplicate the server ignores.

    Raises:
        ValueError: ``device`` cuda routed to the CPU deployment (:func:`route_problem`).
    """
    route = _checked_route(target, options.get("device"))
    return [{
        "id": event_id or str(uuid.uuid4()),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": ADAPTER_READY,
        "resource": adapter_resource(adapter, route),
        "payload": adapter_ready_payload(adapter, out, base, push_to, **options),
    }]
