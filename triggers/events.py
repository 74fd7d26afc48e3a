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
device        optional: ``cuda`` (GPU deployment default) or ``cpu``
dtype         optional: ``auto`` (default), ``bfloat16``, ``float16``, ``float32``
save_method   optional: ``merged_16bit`` (default), ``merged_4bit``, ``lora``
============  ==============================================================

The keys are :class:`~mergeflow.spec.MergeSpec`'s own field names. ``destination`` is the
deprecated old name of ``push_to``: the triggers still read it (``push_to`` wins when both are
set), but nothing emits it any more.

The event's resource id routes it: ``mergeflow.adapter.<adapter>`` starts the GPU deployment,
``mergeflow.cpu-adapter.<adapter>`` the CPU one.

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
                  *, target: Target = "gpu", **options: Any):
    """Emit ``mergeflow.adapter.ready`` through Prefect's events client.

    ``options``: ``device``, ``dtype`` or ``save_method`` (the keys the triggers read).
    Returns the emitted :class:`prefect.events.Event` (None when events are disabled).
    """
    from prefect.events import emit_event

    return emit_event(event=ADAPTER_READY, resource=adapter_resource(adapter, target),
                      payload=adapter_ready_payload(adapter, out, base, push_to, **options))


def adapter_ready_event(adapter: str, out: str, base: str | None = None,
                        push_to: str | None = None, *, target: Target = "gpu",
                        event_id: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """The JSON body to POST to ``<PREFECT_API_URL>/events``: a list of one event.

    A fixed ``event_id`` makes a resent event a duplicate the server ignores.
    """
    return [{
        "id": event_id or str(uuid.uuid4()),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": ADAPTER_READY,
        "resource": adapter_resource(adapter, target),
        "payload": adapter_ready_payload(adapter, out, base, push_to, **options),
    }]
