"""The webhook receiver: turns a signed HTTP request into a merge run (``mergeflow webhook serve``).

Endpoints:

* ``POST /hooks/training``: a trainer's "adapter finished" call. JSON body
  ``{"adapter", "out", "base"?, "push_to"?, "options"?: {MergeSpec fields}, "delivery_id"?,
  "target"?: "gpu" | "cpu"}`` (target picks the GPU deployment, the default, or the CPU one;
  without a target, options.device cpu picks the CPU one, as for the ``adapter.ready`` event;
  device cuda with target cpu is refused with 422 before any run starts),
  signed with HMAC-SHA256 over the raw body: ``X-Mergeflow-Signature: sha256=<hex>``.
* ``POST /hooks/huggingface``: a Hugging Face Hub webhook (repo content update of a model repo),
  authenticated by its ``X-Webhook-Secret`` header. The adapter is ``hf://<repo>@<headSha>``, the
  output ``<hf_out_root>/<org>--<name>`` (replaced when the adapter changes), published to
  ``<hf_push_root>/<name>`` when that is set.
* ``GET /healthz``: 200 when the Prefect API answers, else 503.

Each accepted request is recorded durably first, in the receiver's outbox
(:mod:`triggers.outbox`, SQLite), under an idempotency key (the delivery id, else the body's
sha256; for the Hub, repo and commit). Then a run of the merge deployment is created with that
key, so a redelivery answers the same run: ``202 {"flow_run_id": ..., "state": ...}`` (after a
failed run: the next attempt). When the Prefect API is slow or down, or a few launches are
already in flight (a burst), the answer is ``202 {"state": "QUEUED", "flow_run_id": null, ...}``
at once, and the receiver's drainer creates the run at the pace the API allows, retrying with
back-off; a restarted receiver launches what is still queued. With ``window_seconds``, training
deliveries that can share a run (:mod:`triggers.batching`: one base, one output folder, the same
options) are held, answered ``202 {"state": "HELD", "group": ...}``, and merged in one run of
the batch deployment once none of the group arrived for a whole window (every checkpoint a
training run writes, in one sweep over the base); a later call for the same delivery answers
that run. Errors: 401 bad or missing
signature, 403 a location outside the allowed roots, 404 hook not enabled, 413 body too large,
422 invalid payload (with the field errors), 503 deployment missing. Secrets are compared in
constant time and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from mergeflow.spec import MergeSpec
from triggers.batching import batch_request, due_in, group_key
from triggers.events import route_for, route_problem
from triggers.launch import (
    CPU_BATCH_DEPLOYMENT,
    CPU_DEPLOYMENT,
    DEFAULT_BATCH_DEPLOYMENT,
    DEFAULT_DEPLOYMENT,
    DeploymentMissing,
    PrefectUnavailable,
    RunRefused,
    api_healthy,
    batch_parameters,
    ensure_merge,
    ensure_run,
)
from triggers.outbox import HELD, LAUNCHED, REFUSED, Delivery, Outbox

log = logging.getLogger("mergeflow.webhook")

SIGNATURE_HEADER = "X-Mergeflow-Signature"  # HMAC of the body alone (the older scheme)
# Standard Webhooks (standardwebhooks.com): the signature covers the delivery id and timestamp
WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE = "webhook-id", "webhook-timestamp", \
    "webhook-signature"
SIGNATURE_TOLERANCE_S = 300  # a delivery signed longer ago (or ahead) than this is refused
HF_SECRET_HEADER = "X-Webhook-Secret"
SECRET_ENV = "MERGEFLOW_WEBHOOK_SECRET"
HF_SECRET_ENV = "MERGEFLOW_HF_WEBHOOK_SECRET"
ROOTS_ENV = "MERGEFLOW_WEBHOOK_ROOTS"


class WebhookSettings(BaseModel):
    """What the receiver needs; a hook whose secret is None is disabled (404)."""

    deployment: str = DEFAULT_DEPLOYMENT
    cpu_deployment: str = Field(CPU_DEPLOYMENT, description="Where route cpu goes (target cpu, "
                                "or options.device cpu without a target).")
    api_url: str | None = Field(None, description="Prefect API; default PREFECT_API_URL.")
    max_body_bytes: int = Field(65536, ge=1)
    training_secret: SecretStr | None = None
    hf_secret: SecretStr | None = None
    hf_out_root: str | None = Field(None, description="Hub hooks: outputs go under here.")
    hf_push_root: str | None = Field(None, description="Hub hooks: publish to <root>/<name>.")
    api_timeout: float = Field(15.0, gt=0)
    allowed_roots: list[str] = Field(
        default_factory=list, description="Where a delivery's inputs and outputs may be: local "
        "folders (absolute) and s3:// or hf:// prefixes; any other location is refused (403).")
    allow_overwrite: bool = Field(False, description="Accept deliveries asking to overwrite a "
                                  "finished output (refused with 403 otherwise).")
    window_seconds: float = Field(0.0, ge=0, description="0: one run per training delivery. "
                                  "More: deliveries that can share a run (triggers.batching: one "
                                  "base, one output folder, the same options) are held and "
                                  "merged in one batch run once none arrived for this long.")
    batch_deployment: str = Field(DEFAULT_BATCH_DEPLOYMENT, description="Where a held group "
                                  "goes (the merge-adapters flow).")
    cpu_batch_deployment: str = Field(CPU_BATCH_DEPLOYMENT, description="Where a held group of "
                                      "the CPU route goes.")
    outbox: str | None = Field(None, description="The SQLite file accepted deliveries are "
                               "recorded in before they are answered (default for `webhook "
                               "serve`: $XDG_STATE_HOME/mergeflow/webhook-outbox.sqlite; none "
                               "given here: a fresh temporary file, not kept across restarts).")


class HookError(Exception):
    """An error answer: HTTP status and JSON detail."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


class TrainingPayload(BaseModel):
    """The body of ``POST /hooks/training``."""

    model_config = ConfigDict(extra="forbid")

    adapter: str
    out: str
    base: str | None = None
    push_to: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    delivery_id: str | None = Field(None, min_length=1, max_length=200)
    target: Literal["gpu", "cpu"] | None = Field(
        None, description="The route: the GPU merge deployment or the CPU one; default: the "
        "CPU one for options.device cpu, else the GPU one.")

    def spec_fields(self) -> dict[str, Any]:
        """The MergeSpec fields this payload sets."""
        fields = {**self.options, "adapter": self.adapter, "out": self.out, "base": self.base,
                  "push_to": self.push_to}
        return {k: v for k, v in fields.items() if v is not None}


class HfEvent(BaseModel):
    action: str
    scope: str


class HfRepo(BaseModel):
    type: str
    name: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    headSha: str | None = Field(None, pattern=r"^[0-9a-f]{7,64}$")


class HfPayload(BaseModel):
    """The parts of a Hugging Face Hub webhook payload the receiver reads."""

    event: HfEvent
    repo: HfRepo


# --------------------------------------------------------------------------- request checks


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) more than ``limit`` bytes by Content-Length or as read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HookError(400, "invalid Content-Length")
        if int(declared) > limit:
            raise HookError(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HookError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def sign(body: bytes, secret: str) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_signature(body: bytes, header: str | None, secret: SecretStr) -> None:
    """401 unless ``header`` is the HMAC-SHA256 signature of ``body`` (constant-time compare)."""
    expected = sign(body, secret.get_secret_value())
    if not header or not hmac.compare_digest(header.strip().encode(), expected.encode()):
        raise HookError(401, f"missing or invalid {SIGNATURE_HEADER} signature")


def sign_delivery(delivery_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """The ``webhook-signature`` value of a delivery (Standard Webhooks, ``v1``): the base64
    HMAC-SHA256 of ``<id>.<timestamp>.<body>``, keyed by the shared secret's bytes."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_delivery(headers: Mapping[str, str], body: bytes, secret: SecretStr,
                   now: float | None = None) -> str:
    """The delivery id of a Standard Webhooks delivery whose signature (over id, timestamp and
    body) matches and whose timestamp is within :data:`SIGNATURE_TOLERANCE_S` of ``now``.

    Raises:
        HookError: 401 naming what is missing, stale or wrong.
    """
    delivery, stamp = headers.get(WEBHOOK_ID), headers.get(WEBHOOK_TIMESTAMP)
    if not delivery or not stamp or not stamp.strip().isdigit():
        raise HookError(401, f"a {WEBHOOK_SIGNATURE} needs {WEBHOOK_ID} and a numeric "
                             f"{WEBHOOK_TIMESTAMP}")
    if abs((time.time() if now is None else now) - int(stamp)) > SIGNATURE_TOLERANCE_S:
        raise HookError(401, f"{WEBHOOK_TIMESTAMP} is more than {SIGNATURE_TOLERANCE_S} s "
                             "away from now (a replay, or a clock to fix)")
    expected = sign_delivery(delivery, int(stamp), body, secret.get_secret_value())
    offered = (headers.get(WEBHOOK_SIGNATURE) or "").split()
    if not any(hmac.compare_digest(o.encode(), expected.encode()) for o in offered):
        raise HookError(401, f"invalid {WEBHOOK_SIGNATURE}")
    return delivery


def check_secret(header: str | None, secret: SecretStr) -> None:
    """401 unless ``header`` equals the shared secret (constant-time compare)."""
    if not header or not hmac.compare_digest(header.encode(), secret.get_secret_value().encode()):
        raise HookError(401, f"missing or invalid {HF_SECRET_HEADER}")


def field_errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A pydantic error as FastAPI-style field errors (without echoing input values)."""
    return [{"loc": [*prefix, *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)]


#: The deepest JSON nesting a delivery may have (its payload is a flat object of a few levels);
#: deeper bodies are refused before parsing, which would otherwise recurse until it fails.
MAX_JSON_DEPTH = 32


def json_depth(body: bytes) -> int:
    """How deep ``[`` / ``{`` nest in ``body``, brackets inside strings ignored."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as ``model``; 422 with the field errors otherwise (and for JSON nested deeper
    than :data:`MAX_JSON_DEPTH`)."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise HookError(422, [{"loc": ["body"], "type": "json_too_deep",
                               "msg": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}])
    try:
        return model.model_validate(json.loads(body))
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise HookError(422, field_errors(exc, ("body",))) from None
        raise HookError(422, [{"loc": ["body"], "msg": "not valid JSON", "type": "json_invalid"}]
                        ) from None


def check_spec(fields: dict[str, Any]) -> None:
    """422 unless the fields make a valid MergeSpec on their own."""
    try:
        MergeSpec.model_validate(fields)
    except ValidationError as exc:
        raise HookError(422, field_errors(exc, ("spec",))) from None


# --------------------------------------------------------------------------- payload mapping


def training_request(payload: TrainingPayload, body: bytes,
                     delivery: str | None) -> tuple[dict[str, Any], str]:
    """(spec fields, idempotency key) of a training-completion call. The key comes only from
    what the signature covers: the signed ``webhook-id`` (``delivery``), else the body's
    ``delivery_id``, else the body's sha256; so a signed body sent again under another
    unsigned header is the same delivery."""
    fields = payload.spec_fields()
    check_spec(fields)
    check_route(payload.target, fields.get("device"))
    delivery_id = delivery or payload.delivery_id or hashlib.sha256(body).hexdigest()
    return fields, f"mergeflow-webhook:training:{delivery_id}"


def check_route(target: str | None, device: str | None) -> None:
    """422 for a route that cannot run (:func:`triggers.events.route_problem`: ``device`` cuda
    sent to the CPU deployment)."""
    problem = route_problem(target, device)
    if problem:
        raise HookError(422, [{"loc": ["body", "options", "device"], "type": "route",
                               "msg": problem}])


def deployment_for(settings: WebhookSettings, target: str | None,
                   device: str | None = None) -> str:
    """The deployment a delivery goes to: the CPU one for route ``cpu``, else the GPU one; the
    route is ``target``, or without one follows ``device``, as for the ``adapter.ready`` event
    (:func:`triggers.events.route_for`)."""
    return settings.cpu_deployment if route_for(target, device) == "cpu" else settings.deployment


def hf_ignored(payload: HfPayload) -> str | None:
    """Why a Hub event starts no merge (None: it does)."""
    if payload.repo.type != "model":
        return f"repo type {payload.repo.type!r} is not a model"
    if payload.event.scope != "repo.content" or payload.event.action not in ("create", "update"):
        return f"event {payload.event.scope}/{payload.event.action} is not a content update"
    return None


def hf_request(payload: HfPayload, settings: WebhookSettings) -> tuple[dict[str, Any], str]:
    """(spec fields, idempotency key) of a Hub content update: the repo at its new head."""
    repo, sha = payload.repo.name, payload.repo.headSha
    if not sha:
        raise HookError(422, [{"loc": ["body", "repo", "headSha"], "msg": "Field required",
                               "type": "missing"}])
    fields: dict[str, Any] = {
        "adapter": f"hf://{repo}@{sha}",
        "out": f"{settings.hf_out_root.rstrip('/')}/{repo.replace('/', '--')}",
        "overwrite": True,
    }
    if settings.hf_push_root:
        fields["push_to"] = f"{settings.hf_push_root.rstrip('/')}/{repo.split('/')[1]}"
    check_spec(fields)
    return fields, f"mergeflow-webhook:hf:{repo}@{sha}"


# --------------------------------------------------------------------------- the app


#: The MergeSpec fields that name a location (read from, or written to).
LOCATION_FIELDS = ("adapter", "base", "out", "push_to", "tokenizer", "original_base")


def within(value: str, root: str) -> bool:
    """Whether location ``value`` lies under ``root``: the same scheme-qualified prefix for
    ``s3://`` and ``hf://``; for a local folder, an absolute path under it once ``..`` and
    ``.`` are folded (a relative path would depend on the worker's working directory)."""
    if "://" in root or "://" in value:
        root = root.rstrip("/")
        return value == root or value.startswith(root + "/")
    if not os.path.isabs(value):
        return False
    path, root = os.path.normpath(value), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_confined(settings: WebhookSettings, fields: dict[str, Any]) -> None:
    """403 unless every location the request names lies under an allowed root, and unless
    ``overwrite`` is allowed when asked for."""
    for name in LOCATION_FIELDS:
        value = fields.get(name)
        if value is not None and not any(within(str(value), r) for r in settings.allowed_roots):
            raise HookError(403, f"{name}={value}: outside the locations this receiver allows "
                                 f"({', '.join(settings.allowed_roots) or 'none'})")
    if fields.get("overwrite") and not settings.allow_overwrite:
        raise HookError(403, "overwrite: this receiver does not replace finished outputs "
                             "(start it with --allow-overwrite to allow it)")


#: Launches tried while answering a request at once; a burst beyond these is queued at once.
INLINE_LAUNCHES = 4
#: The drainer's back-off while the Prefect API does not answer (seconds, doubling up to).
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
#: How long the drainer waits for one launch (nobody is waiting on the answer).
DRAIN_TIMEOUT_S = 120.0


class Launcher:
    """Turns accepted deliveries into runs: at once while answering when the API is quick and
    few launches are in flight, else from the outbox by the drainer (:meth:`drain`)."""

    def __init__(self, settings: WebhookSettings, outbox: Outbox) -> None:
        self.settings, self.outbox = settings, outbox
        self.inline = asyncio.Semaphore(INLINE_LAUNCHES)
        self.wake = asyncio.Event()

    async def accept(self, fields: dict[str, Any], key: str, deployment: str | None = None,
                     batchable: bool = False) -> dict[str, Any]:
        """Record the delivery, then start its run or queue it (or, ``batchable`` with a
        window set, hold it for its group's run: ``202 {"state": "HELD"}``); the 202 answer
        body, or a HookError (403 / 422 / 503).

        Locations outside the allowed roots, and ``overwrite`` where it is not allowed, are
        refused (403) before anything is recorded (:func:`check_confined`).

        A redelivery answers the run its key made, unless that run failed, crashed or was
        cancelled: then it starts the next attempt (``<key>#2``, ``#3``; see
        :func:`triggers.launch.ensure_merge`), so a delivery resent after a failure is retried,
        a bounded number of times.
        """
        check_confined(self.settings, fields)
        deployment = deployment or self.settings.deployment
        group = self._group(fields, deployment) if batchable else None
        delivery, _ = self.outbox.add(key, deployment, fields, group)
        if delivery.group is not None:  # held (its group's run starts once the window has
            self.wake.set()             # passed), or merged or refused with its group
            return _answer(delivery)
        if self.inline.locked():  # a burst: answer now, launch from the outbox
            self.wake.set()
            return _answer(delivery)
        async with self.inline:
            return await self._launch_now(delivery)

    def _group(self, fields: dict[str, Any], deployment: str) -> str | None:
        """The delivery's batching group, when there is a window and it can share a run with
        the deliveries held there (a second delivery for the same output starts on its own)."""
        if not self.settings.window_seconds:
            return None
        group = group_key(fields, deployment)
        held = self.outbox.held().get(group, []) if group else []
        return None if any(d.fields["out"] == fields["out"] for d in held) else group

    def _batch_deployment(self, deployment: str) -> str:
        """The batch deployment of a merge deployment's route."""
        cpu = deployment == self.settings.cpu_deployment
        return self.settings.cpu_batch_deployment if cpu else self.settings.batch_deployment

    async def release_groups(self, now: float | None = None) -> float | None:
        """Start the run of every held group whose window has passed: a group of one is
        launched as its own delivery, a larger one as one batch run recorded against each of
        its deliveries. Returns the seconds until the next group is due (None: none held).

        Raises:
            PrefectUnavailable, asyncio.TimeoutError: the API did not answer (the group stays
                held and is tried again).
        """
        now = time.time() if now is None else now
        due: float | None = None
        for deliveries in self.outbox.held().values():
            left = due_in(deliveries, now, self.settings.window_seconds)
            if left > 0:  # an arrival within the window: held on
                due = left if due is None else min(due, left)
                continue
            if len(deliveries) == 1:
                self.outbox.release(deliveries[0].key)
                continue
            await self._start_batch(deliveries)
        return due

    async def _start_batch(self, deliveries: list[Delivery]) -> None:
        """One batch run for a held group, recorded against each of its deliveries (or each
        refused, with the reason; without a batch deployment on the server, each released to
        start its own run)."""
        fields, adapters, names, key = batch_request(deliveries)
        deployment = self._batch_deployment(deliveries[0].deployment)
        try:
            run = await asyncio.wait_for(ensure_run(
                batch_parameters(fields, adapters, names), key, deployment=deployment,
                api_url=self.settings.api_url), DRAIN_TIMEOUT_S)
        except DeploymentMissing as exc:  # no batch deployment: each merged on its own
            for delivery in deliveries:
                self.outbox.release(delivery.key)
            log.warning("%s; the %d held deliveries start their own merge runs", exc,
                        len(deliveries))
            return
        except (ValidationError, RunRefused) as exc:
            detail = " ".join(str(exc).split())
            for delivery in deliveries:
                self.outbox.refused(delivery.key, detail)
            log.warning("held group of %d deliveries refused: %s", len(deliveries), detail)
            return
        for delivery in deliveries:
            self.outbox.launched(delivery.key, str(run.id), run.name)
        log.info("held group: %d adapters -> batch run %s", len(deliveries), run.name)

    async def _launch_now(self, delivery: Delivery) -> dict[str, Any]:
        try:
            run = await self._start(delivery, 3 * self.settings.api_timeout)
        except (ValidationError, RunRefused, DeploymentMissing) as exc:
            self.outbox.forget(delivery.key)  # not accepted: the sender corrects and resends
            if isinstance(exc, ValidationError):
                raise HookError(422, field_errors(exc, ("spec",))) from None
            raise HookError(503 if isinstance(exc, DeploymentMissing) else 422,
                            str(exc)) from None
        except (PrefectUnavailable, asyncio.TimeoutError) as exc:
            self.outbox.retry_later(delivery.key, str(exc) or "the Prefect API timed out")
            self.wake.set()
            return _answer(self.outbox.get(delivery.key) or delivery)
        return {"flow_run_id": str(run.id), "flow_run_name": run.name,
                "deployment": delivery.deployment,
                "idempotency_key": run.idempotency_key or delivery.key,
                "state": run.state.type.value if run.state else None}

    async def _start(self, delivery: Delivery, timeout: float):
        """Create (or find) the delivery's run within ``timeout`` seconds and record it in the
        outbox (a run created after the wait gave up is found again under its key)."""
        run = await asyncio.wait_for(ensure_merge(
            delivery.fields, delivery.key, deployment=delivery.deployment,
            api_url=self.settings.api_url), timeout)
        self.outbox.launched(delivery.key, str(run.id), run.name)
        return run

    async def drain(self) -> None:
        """Launch every queued delivery, oldest first, at the pace the API allows: on an
        unreachable API, wait (doubling, up to RETRY_MAX_S) and try again; a delivery the
        server refuses is marked refused, with the reason logged."""
        delay = RETRY_MIN_S
        while True:
            waiting, due = False, None
            try:
                due = await self.release_groups()
            except (PrefectUnavailable, asyncio.TimeoutError) as exc:
                log.info("held group not started yet: %s", exc or "timeout")
                waiting = True
            for delivery in [] if waiting else self.outbox.pending():
                try:
                    await self._start(delivery, DRAIN_TIMEOUT_S)
                except (ValidationError, RunRefused) as exc:
                    detail = " ".join(str(exc).split())
                    self.outbox.refused(delivery.key, detail)
                    log.warning("queued delivery %s refused: %s", delivery.key, detail)
                except (PrefectUnavailable, asyncio.TimeoutError) as exc:
                    self.outbox.retry_later(delivery.key, str(exc) or "timeout")
                    waiting = True
                    break
            delay = min(delay * 2, RETRY_MAX_S) if waiting else RETRY_MIN_S
            pause = delay if waiting else RETRY_MAX_S
            if due is not None:  # wake when the next held group is due
                pause = min(pause, max(due, 0.05))
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), pause)


def _answer(delivery: Delivery) -> dict[str, Any]:
    """The 202 body for a delivery answered from the outbox (held for its group's run,
    queued, or launched earlier)."""
    state = {LAUNCHED: "LAUNCHED", HELD: "HELD", REFUSED: "REFUSED"}.get(delivery.state,
                                                                          "QUEUED")
    answer = {"flow_run_id": delivery.flow_run_id, "flow_run_name": delivery.flow_run_name,
              "deployment": delivery.deployment, "idempotency_key": delivery.key,
              "state": state}
    if delivery.group is not None:
        answer["group"] = delivery.group
    if delivery.state == REFUSED:
        answer["detail"] = delivery.detail
    return answer


def enabled(secret: SecretStr | None, hook: str) -> SecretStr:
    """The hook's secret; 404 when the hook has none (disabled)."""
    if secret is None:
        raise HookError(404, f"the {hook} hook is not enabled on this server")
    return secret


def create_app(settings: WebhookSettings) -> FastAPI:
    """The receiver as a FastAPI app (serve it with uvicorn, or test it in-process)."""
    outbox = Outbox(settings.outbox or Path(tempfile.mkdtemp(prefix="mergeflow-webhook-"))
                    / "outbox.sqlite")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drainer = asyncio.create_task(app.state.launcher.drain())
        try:
            yield
        finally:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer

    app = FastAPI(title="Mergeflow webhook receiver", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.launcher = Launcher(settings, outbox)
    app.state.outbox = outbox

    @app.exception_handler(HookError)
    async def hook_error(request: Request, exc: HookError) -> JSONResponse:
        log.warning("%s %s -> %d", request.method, request.url.path, exc.status)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.post("/hooks/training", status_code=202)
    async def training(request: Request) -> dict[str, Any]:
        secret = enabled(settings.training_secret, "training")
        body = await read_body(request, settings.max_body_bytes)
        delivery = None
        if WEBHOOK_SIGNATURE in request.headers:  # Standard Webhooks: id and time are signed
            delivery = check_delivery(request.headers, body, secret)
        else:
            check_signature(body, request.headers.get(SIGNATURE_HEADER), secret)
        payload = parse(TrainingPayload, body)
        fields, key = training_request(payload, body, delivery)
        answer = await app.state.launcher.accept(
            fields, key, deployment_for(settings, payload.target, fields.get("device")),
            batchable=True)
        log.info("training hook: adapter %s -> flow run %s", fields["adapter"],
                 answer["flow_run_id"])
        return answer

    @app.post("/hooks/huggingface", status_code=202)
    async def huggingface(request: Request) -> Any:
        secret = enabled(settings.hf_secret, "huggingface")
        body = await read_body(request, settings.max_body_bytes)
        check_secret(request.headers.get(HF_SECRET_HEADER), secret)
        payload = parse(HfPayload, body)
        if reason := hf_ignored(payload):
            return JSONResponse({"ignored": reason}, status_code=200)
        fields, key = hf_request(payload, settings)
        answer = await app.state.launcher.accept(fields, key)
        log.info("huggingface hook: %s -> flow run %s", fields["adapter"], answer["flow_run_id"])
        return answer

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        api = await api_healthy(settings.api_url, timeout=min(settings.api_timeout, 5.0))
        body = {"status": "ok" if api else "degraded", "prefect_api": api,
                "deployment": settings.deployment,
                "hooks": {"training": settings.training_secret is not None,
                          "huggingface": settings.hf_secret is not None}}
        return JSONResponse(body, status_code=200 if api else 503)

    return app


# --------------------------------------------------------------------------- configuration


def block_secret(name: str) -> SecretStr:
    """The value of a Prefect Secret block (a string)."""
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    if not isinstance(value, str) or not value:
        raise ValueError(f"Secret block {name!r} must hold a non-empty string")
    return SecretStr(value)


def env_secret(name: str) -> SecretStr | None:
    """A secret from the environment (None when unset or empty)."""
    value = os.environ.get(name, "")
    return SecretStr(value) if value else None


def load_settings(*, deployment: str = DEFAULT_DEPLOYMENT, max_body_bytes: int = 65536,
                  api_url: str | None = None, secret_block: str | None = None,
                  hf_secret_block: str | None = None, hf_out_root: str | None = None,
                  hf_push_root: str | None = None, allowed_roots: list[str] | None = None,
                  allow_overwrite: bool = False, outbox: str | None = None,
                  window_seconds: float = 0.0,
                  batch_deployment: str = DEFAULT_BATCH_DEPLOYMENT) -> WebhookSettings:
    """Settings from options, the environment and Prefect Secret blocks.

    Secrets: a named block wins over ``MERGEFLOW_WEBHOOK_SECRET`` / ``MERGEFLOW_HF_WEBHOOK_SECRET``.
    Allowed roots: ``allowed_roots``, else ``MERGEFLOW_WEBHOOK_ROOTS`` (comma-separated).
    Outbox: ``outbox``, else ``$XDG_STATE_HOME/mergeflow/webhook-outbox.sqlite`` (XDG's
    default state folder ``~/.local/state`` when unset).

    Raises:
        ValueError: no Prefect API URL, no secret at all, or a Hub secret without an output root.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from triggers.launch import configured_api_url

    api_url = api_url or configured_api_url()
    if not api_url:
        raise ValueError("no Prefect API: set PREFECT_API_URL (or --api-url) to the server's "
                         "API, e.g. http://127.0.0.1:4200/api")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):  # blocks live on that server
        training = block_secret(secret_block) if secret_block else env_secret(SECRET_ENV)
        hf = block_secret(hf_secret_block) if hf_secret_block else env_secret(HF_SECRET_ENV)
    settings = WebhookSettings(
        deployment=deployment, max_body_bytes=max_body_bytes, api_url=api_url,
        training_secret=training, hf_secret=hf,
        hf_out_root=hf_out_root or os.environ.get("MERGEFLOW_HF_OUT_ROOT") or None,
        hf_push_root=hf_push_root or os.environ.get("MERGEFLOW_HF_PUSH_ROOT") or None,
        allowed_roots=allowed_roots or [r.strip() for r in os.environ.get(ROOTS_ENV, "").split(",")
                                        if r.strip()],
        allow_overwrite=allow_overwrite, outbox=outbox or str(default_outbox()),
        window_seconds=window_seconds, batch_deployment=batch_deployment)
    check_settings(settings)
    return settings


def default_outbox() -> Path:
    """Where ``webhook serve`` keeps its outbox unless told otherwise."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mergeflow" / "webhook-outbox.sqlite"


def check_settings(settings: WebhookSettings) -> None:
    """Refuse a receiver that could not work (see :func:`load_settings`)."""
    if not settings.api_url:
        raise ValueError("no Prefect API: set PREFECT_API_URL (or --api-url) to the server's "
                         "API, e.g. http://127.0.0.1:4200/api")
    if settings.training_secret is None and settings.hf_secret is None:
        raise ValueError(f"no webhook secret: set {SECRET_ENV} and/or {HF_SECRET_ENV}, or "
                         "name a Prefect Secret block with --secret-block / --hf-secret-block")
    if not settings.allowed_roots:
        raise ValueError(f"no allowed roots: name the folders and s3:// / hf:// prefixes "
                         f"deliveries may read and write with --allow-root (or {ROOTS_ENV}); "
                         "anything else is refused")
    if settings.hf_secret is not None and not settings.hf_out_root:
        raise ValueError("the Hugging Face hook needs an output root: --hf-out-root or "
                         "MERGEFLOW_HF_OUT_ROOT")


def serve(settings: WebhookSettings, host: str = "127.0.0.1", port: int = 8787,
          log_level: str = "info") -> None:
    """Run the receiver with uvicorn until interrupted."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call
    hooks = [n for n, s in (("training", settings.training_secret),
                            ("huggingface", settings.hf_secret)) if s is not None]
    log.info("mergeflow webhook on http://%s:%d (hooks: %s; deployment %s; Prefect API %s)",
             host, port, ", ".join(hooks), settings.deployment, settings.api_url)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level,
                proxy_headers=False, server_header=False)
