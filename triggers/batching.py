"""Which webhook deliveries may be merged in one batch run, and that run's request.

With a batching window (``mergeflow webhook serve --window-seconds``), the receiver holds each
training delivery under a group key (:func:`group_key`) and, once no delivery of the group has
arrived for a whole window, starts one ``merge-adapters`` run for the group
(:func:`batch_request`): every checkpoint a run writes, merged in one sweep over the base.

Deliveries share a group when one run can merge them as each asked: the same deployment (route),
the same named ``base``, outputs in the same folder, the same options, and a ``push_to`` that is
either absent for all or ``<one prefix>/<the output's folder name>`` for all (the batch's
``{name}`` template). A delivery without a ``base`` (the base named by the adapter's config,
which the receiver does not read), or whose ``push_to`` does not follow its output's name, is
never held: it starts its own run at once, as without a window.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from triggers.outbox import Delivery

#: The spec fields that differ per output of a batch.
PER_OUTPUT = ("adapter", "out", "push_to")


def _push_prefix(fields: dict[str, Any]) -> str | None:
    """``push_to`` without its last part when that part is the output's folder name; "" when
    there is no ``push_to``; None when it is something else (not batchable)."""
    push_to = fields.get("push_to")
    if not push_to:
        return ""
    head, _, tail = str(push_to).rstrip("/").rpartition("/")
    return head if head and tail == PurePosixPath(fields["out"]).name else None


def group_key(fields: dict[str, Any], deployment: str) -> str | None:
    """The batching group of a delivery's spec fields sent to ``deployment``; None when it
    cannot share a run (see the module's text)."""
    prefix = _push_prefix(fields)
    if not fields.get("base") or prefix is None:
        return None
    shared = {k: v for k, v in fields.items() if k not in PER_OUTPUT}
    identity = {"deployment": deployment, "out_parent": str(PurePosixPath(fields["out"]).parent),
                "push_prefix": prefix, "shared": shared}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"batch:{digest[:32]}"


def due_in(deliveries: Sequence[Delivery], now: float, window_seconds: float) -> float:
    """Seconds until the group's window has passed with no new arrival (0 or less: due now)."""
    return max(d.received for d in deliveries) + window_seconds - now


def batch_request(deliveries: Sequence[Delivery]
                  ) -> tuple[dict[str, Any], list[str], list[str], str]:
    """One batch run for a group: the shared spec fields (``out``: the outputs' folder,
    ``push_to``: ``<prefix>/{name}``), the adapters, their output names, and the run's
    idempotency key (the sha256 of the deliveries' keys, so a restarted receiver finds the
    same run)."""
    first = deliveries[0].fields
    shared = {k: v for k, v in first.items() if k not in PER_OUTPUT}
    shared["out"] = str(PurePosixPath(first["out"]).parent)
    prefix = _push_prefix(first)
    if prefix:
        shared["push_to"] = f"{prefix}/{{name}}"
    adapters = [d.fields["adapter"] for d in deliveries]
    names = [PurePosixPath(d.fields["out"]).name for d in deliveries]
    joined = ",".join(sorted(d.key for d in deliveries))
    key = f"mergeflow-webhook-batch:{hashlib.sha256(joined.encode()).hexdigest()}"
    return shared, adapters, names, key
