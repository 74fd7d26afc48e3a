"""Notifiers for :class:`mergeflow.live.callback.MergeOnTrainEnd`: hand a finished adapter's merge
to the merge deployments instead of merging in the training process.

* :class:`PrefectEvent`: POSTs ``mergeflow.adapter.ready`` (see :mod:`triggers.events`) to the
  Prefect API's ``/events``; the deployment trigger starts the merge on the GPU (or CPU) pool.
  The event carries ``adapter``, ``out``, ``base``, ``push_to`` and the options the trigger reads
  (``device``, ``dtype``, ``save_method``).
* :class:`Webhook`: a signed POST to ``mergeflow webhook serve``'s ``/hooks/training``, which may
  carry any MergeSpec option.

Both send a fixed id derived from the adapter's files (the event id, the delivery id), so a
resend after a lost answer starts no second merge, and a retrained adapter gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from mergeflow.errors import InputError, MergeError, TransientError
from mergeflow.pipeline import sha256_file
from triggers.events import Target, adapter_ready_event

#: The options the deployments' event trigger reads from the payload.
EVENT_OPTIONS = ("device", "dtype", "save_method")
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}


def adapter_digest(request: dict[str, Any]) -> str:
    """sha256 of the request and the adapter's config and weights: the same finished adapter
    sent twice gives the same id."""
    folder = Path(request["adapter"])
    files = {p.name: sha256_file(p) for p in sorted(folder.glob("adapter_*")) if p.is_file()}
    text = json.dumps({"request": request, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _post(url: str, content: bytes, headers: dict[str, str], timeout: float,
          attempts: int) -> httpx.Response:
    """POST, retrying connection errors and 408/429/5xx answers with a growing pause."""
    for attempt in range(1, attempts + 1):
        try:
            answer = httpx.post(url, content=content, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            problem = f"{url}: {type(exc).__name__}: {exc}"
        else:
            if answer.status_code not in RETRIED_STATUS:
                return answer
            problem = f"{url}: HTTP {answer.status_code} {answer.text[:300]}"
        if attempt < attempts:
            time.sleep(min(2.0 ** attempt, 30))
    raise TransientError(f"{problem} (after {attempts} attempts)")


class PrefectEvent:
    """Announce with the ``mergeflow.adapter.ready`` event.

    Args:
        target: ``"gpu"`` (the merge-adapter deployment) or ``"cpu"`` (merge-adapter-cpu);
            default: from the options' ``device`` (:func:`triggers.events.route_for`).
        api_url: the Prefect API (default ``PREFECT_API_URL``); ``PREFECT_API_KEY`` is sent as
            a bearer token when set.
    """

    def __init__(self, target: Target | None = None, api_url: str | None = None,
                 timeout: float = 30.0, attempts: int = 3) -> None:
        self.target, self.api_url, self.timeout, self.attempts = target, api_url, timeout, attempts

    def announce(self, request: dict[str, Any]) -> dict[str, Any]:
        """Post the event; returns ``{"event_id", "resource"}``.

        Raises:
            InputError: no Prefect API, options the event cannot carry (use :class:`Webhook`),
                or device cuda routed to the CPU deployment.
            TransientError: the API could not be reached; MergeError: it refused the event.
        """
        api = (self.api_url or os.environ.get("PREFECT_API_URL") or "").rstrip("/")
        if not api:
            raise InputError("PrefectEvent: no Prefect API; set PREFECT_API_URL or api_url=")
        options = dict(request.get("options") or {})
        unsent = sorted(set(options) - set(EVENT_OPTIONS))
        if unsent:
            raise InputError(f"PrefectEvent: the event trigger reads only {EVENT_OPTIONS}, not "
                             f"{unsent}; use triggers.training.Webhook to send them")
        event_id = str(uuid.UUID(adapter_digest(request)[:32]))
        try:
            body = adapter_ready_event(request["adapter"], request["out"], request.get("base"),
                                       request.get("push_to"), target=self.target,
                                       event_id=event_id, **options)
        except ValueError as exc:  # a route that cannot run: device cuda to the CPU deployment
            raise InputError(f"PrefectEvent: {exc}") from None
        headers = {"Content-Type": "application/json"}
        if os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
        answer = _post(f"{api}/events", json.dumps(body).encode(), headers, self.timeout,
                       self.attempts)
        if answer.status_code >= 300:
            raise MergeError(f"{api}/events refused the event: HTTP {answer.status_code} "
                             f"{answer.text[:300]}")
        return {"event_id": event_id, "resource": body[0]["resource"]["prefect.resource.id"]}


class Webhook:
    """Announce with a signed POST to ``mergeflow webhook serve``.

    Args:
        url: the receiver's training hook, e.g. ``http://merge-host:8787/hooks/training``.
        secret: the shared secret (default ``MERGEFLOW_WEBHOOK_SECRET``).
    """

    def __init__(self, url: str, secret: str | None = None, timeout: float = 60.0,
                 attempts: int = 3) -> None:
        self.url, self.timeout, self.attempts = url, timeout, attempts
        self._secret = secret

    def announce(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST the request; returns the receiver's answer (``flow_run_id``, ...).

        Raises:
            InputError: no secret, or the receiver refused the request (401/404/413/422).
            TransientError: the receiver could not be reached or answered 5xx.
        """
        from triggers.webhook import (
            SECRET_ENV,
            WEBHOOK_ID,
            WEBHOOK_SIGNATURE,
            WEBHOOK_TIMESTAMP,
            sign_delivery,
        )

        secret = self._secret or os.environ.get(SECRET_ENV)
        if not secret:
            raise InputError(f"Webhook: no secret; pass secret= or set {SECRET_ENV}")
        payload = {k: v for k, v in request.items() if v not in (None, {})}
        payload["delivery_id"] = f"train-end-{adapter_digest(request)}"
        body = json.dumps(payload).encode()
        stamp = int(time.time())  # signed with the id and the body (Standard Webhooks)
        headers = {"Content-Type": "application/json", WEBHOOK_ID: payload["delivery_id"],
                   WEBHOOK_TIMESTAMP: str(stamp),
                   WEBHOOK_SIGNATURE: sign_delivery(payload["delivery_id"], stamp, body, secret)}
        answer = _post(self.url, body, headers, self.timeout, self.attempts)
        if answer.status_code != 202:
            raise InputError(f"{self.url} refused the merge request: HTTP {answer.status_code} "
                             f"{answer.text[:500]}")
        return answer.json()
