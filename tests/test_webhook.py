"""The webhook receiver in-process (issue 7): every answer (202/401/404/413/422/503), idempotent
redelivery, secrets never logged. Runs are created on the session's Prefect server in a
deployment with the merge flow's parameter schema; no worker runs them (test_e2e_prefect does)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from flows.parameters import BatchRequest, MergeRequest
from mergeflow.spec import MergeSpec
from triggers.webhook import (
    HF_SECRET_HEADER,
    SIGNATURE_HEADER,
    WEBHOOK_ID,
    WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP,
    WebhookSettings,
    create_app,
    load_settings,
    sign,
    sign_delivery,
)

SECRET = "mergeflow-webhook-test-secret-5e1f0c"
HF_SECRET = "mergeflow-hf-test-secret-93ab77"


def stand_in_merge_adapter(spec: MergeRequest) -> None:
    """The merge flow's signature (its parameter schema) without its body."""


def _stand_in_deployment(function, flow_name: str, prefix: str, spec: dict) -> str:
    """A deployment of ``function`` (a flow's signature) as ``flow_name``, its parameter schema
    enforced and ``spec`` its default spec; returns ``<flow>/<deployment>``."""
    from prefect import flow

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    flow(function, name=flow_name).to_deployment(
        name=name, parameters={"spec": spec}, enforce_parameter_schema=True).apply()
    return f"{flow_name}/{name}"


@pytest.fixture(scope="module")
def deployment(prefect_server) -> str:
    """A ``merge-adapter`` deployment with the real, enforced parameter schema and defaults."""
    return _stand_in_deployment(stand_in_merge_adapter, "merge-adapter", "webhook-test",
                                {"workers": 3, "device": "cuda"})


def _settings(api_url: str, deployment: str, **kw) -> WebhookSettings:
    values = dict(deployment=deployment, api_url=api_url, max_body_bytes=4096,
                  training_secret=SecretStr(SECRET), hf_secret=SecretStr(HF_SECRET),
                  hf_out_root="/srv/merged", hf_push_root="hf://acme-merged",
                  allowed_roots=["/data", "/srv/merged", "hf://"], allow_overwrite=True)
    values.update(kw)
    return WebhookSettings(**values)


@pytest.fixture
def client(prefect_server, deployment):
    with TestClient(create_app(_settings(prefect_server, deployment))) as test_client:
        yield test_client


def _post(client: TestClient, body: dict | bytes, *, secret: str | None = SECRET,
          headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        sent[SIGNATURE_HEADER] = sign(raw, secret)
    return client.post("/hooks/training", content=raw, headers=sent)


def _payload(**kw) -> dict:
    payload = {"adapter": "/data/adapters/run-7", "out": "/data/merged/run-7",
               "base": "/data/bases/tiny", "options": {"device": "cpu", "dtype": "bfloat16"},
               "delivery_id": f"delivery-{uuid.uuid4().hex}",
               "target": "gpu"}  # without it, device cpu would pick the CPU deployment
    payload.update(kw)
    return payload


def _run(run_id: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as prefect:
            return await prefect.read_flow_run(run_id)

    return asyncio.run(read())


def _runs_with_key(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    async def read():
        async with get_client() as prefect:
            return await prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
                idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])))

    return asyncio.run(read())


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


# --------------------------------------------------------------------------- 202 and redelivery


def test_signed_call_starts_one_run_per_delivery(client, deployment):
    payload = _payload()
    first = _post(client, payload)
    assert first.status_code == 202, first.text
    answer = first.json()
    assert answer["deployment"] == deployment
    assert answer["idempotency_key"] == f"mergeflow-webhook:training:{payload['delivery_id']}"

    again = _post(client, payload)  # a redelivery
    assert again.status_code == 202 and again.json()["flow_run_id"] == answer["flow_run_id"]
    assert len(_runs_with_key(answer["idempotency_key"])) == 1

    spec = _run(answer["flow_run_id"]).parameters["spec"]
    assert spec["adapter"] == payload["adapter"] and spec["out"] == payload["out"]
    assert spec["base"] == payload["base"] and spec["dtype"] == "bfloat16"
    assert spec["device"] == "cpu"  # the payload's option over the deployment's default
    assert spec["workers"] == 3  # the deployment's default
    MergeSpec(**spec)

    other = _post(client, _payload())
    assert other.status_code == 202 and other.json()["flow_run_id"] != answer["flow_run_id"]


def test_a_signed_body_sent_again_under_another_delivery_header_is_the_same_delivery(client):
    body = json.dumps(_payload(delivery_id=None)).encode()
    first = _post(client, body, headers={"X-Mergeflow-Delivery": f"a-{uuid.uuid4().hex}"}).json()
    replay = _post(client, body, headers={"X-Mergeflow-Delivery": f"b-{uuid.uuid4().hex}"}).json()
    assert first["flow_run_id"] == replay["flow_run_id"]  # the unsigned header is not a key
    assert first["idempotency_key"].endswith(hashlib.sha256(body).hexdigest())


def _standard(body: bytes, delivery: str, stamp: int, secret: str = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", WEBHOOK_ID: delivery,
            WEBHOOK_TIMESTAMP: str(stamp),
            WEBHOOK_SIGNATURE: sign_delivery(delivery, stamp, body, secret)}


def test_standard_webhooks_signatures_cover_the_id_and_the_time(client):
    body = json.dumps(_payload(delivery_id=None)).encode()
    delivery, now = f"msg_{uuid.uuid4().hex}", int(time.time())
    first = client.post("/hooks/training", content=body, headers=_standard(body, delivery, now))
    assert first.status_code == 202, first.text
    assert first.json()["idempotency_key"].endswith(delivery)
    again = client.post("/hooks/training", content=body, headers=_standard(body, delivery, now))
    assert again.json()["flow_run_id"] == first.json()["flow_run_id"]

    stale = client.post("/hooks/training", content=body,
                        headers=_standard(body, delivery, now - 3600))
    assert stale.status_code == 401 and "away from now" in stale.text
    forged = _standard(body, delivery, now)
    forged[WEBHOOK_ID] = f"msg_{uuid.uuid4().hex}"  # a new id under the old signature
    assert client.post("/hooks/training", content=body, headers=forged).status_code == 401
    wrong = client.post("/hooks/training", content=body,
                        headers=_standard(body, delivery, now, secret="not-the-secret"))
    assert wrong.status_code == 401


# --------------------------------------------------------------------------- 401 / 404 / 413


@pytest.mark.parametrize("signature", [
    None, "", "sha256=", "sha256=" + "0" * 64, "md5=abc", "sha256=deadbeef",
])
def test_missing_or_bad_signature_is_401(client, signature):
    body = json.dumps(_payload()).encode()
    headers = {} if signature is None else {SIGNATURE_HEADER: signature}
    answer = _post(client, body, secret=None, headers=headers)
    assert answer.status_code == 401
    assert SIGNATURE_HEADER in answer.json()["detail"]


def test_signature_with_another_secret_or_body_is_401(client):
    payload = _payload()
    assert _post(client, payload, secret="not-the-secret").status_code == 401
    raw = json.dumps(payload).encode()
    tampered = raw.replace(b"run-7", b"run-8")
    answer = client.post("/hooks/training", content=tampered,
                         headers={SIGNATURE_HEADER: sign(raw, SECRET)})
    assert answer.status_code == 401
    assert _runs_with_key(f"mergeflow-webhook:training:{payload['delivery_id']}") == []


def test_body_over_the_limit_is_413(client):
    big = _payload(options={"commit_message": "x" * 5000})
    assert _post(client, big).status_code == 413  # by Content-Length

    raw = json.dumps(big).encode()
    chunks = (raw[i:i + 1000] for i in range(0, len(raw), 1000))  # chunked: no Content-Length
    answer = client.post("/hooks/training", content=chunks,
                         headers={SIGNATURE_HEADER: sign(raw, SECRET)})
    assert answer.status_code == 413
    assert client.post("/hooks/huggingface", content=b"x" * 5000).status_code == 413


def test_a_deeply_nested_body_under_the_size_limit_is_422_not_500(client):
    deep = b"[" * 2000 + b"]" * 2000  # 4000 bytes, under the limit; recursion would fail at ~1000
    answer = _post(client, deep)
    assert answer.status_code == 422, answer.text
    assert "nested deeper than" in answer.text
    quoted = json.dumps(_payload(options={"commit_message": "[" * 200})).encode()
    assert _post(client, quoted).status_code != 422  # brackets inside a string do not count


def test_disabled_hooks_are_404(prefect_server, deployment):
    settings = _settings(prefect_server, deployment, training_secret=None, hf_secret=None)
    with TestClient(create_app(settings)) as disabled:
        assert _post(disabled, _payload()).status_code == 404
        assert disabled.post("/hooks/huggingface", json={}).status_code == 404


# --------------------------------------------------------------------------- 422


@pytest.mark.parametrize(("payload", "loc"), [
    ({"adapter": "/a"}, ["body", "out"]),
    ({"out": "/o"}, ["body", "adapter"]),
    (_payload(options={"dtype": "int3"}), ["spec", "dtype"]),
    (_payload(options={"no_such_option": 1}), ["spec", "no_such_option"]),
    (_payload(push_to="ftp://x/y"), ["spec", "push_to"]),
    (_payload(options={"workers": 0}), ["spec", "workers"]),
    (_payload(unexpected=True), ["body", "unexpected"]),
    ([1, 2], ["body"]),
])
def test_invalid_payload_is_422_with_field_errors(client, payload, loc):
    answer = _post(client, payload)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert any(e["loc"] == loc for e in errors), errors


def test_body_that_is_not_json_is_422(client):
    answer = _post(client, b"{not json")
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["type"] == "json_invalid"


def test_spec_refused_with_the_deployment_defaults_is_422(prefect_server):
    from prefect import flow

    name = f"bad-defaults-{uuid.uuid4().hex[:8]}"
    flow(stand_in_merge_adapter, name="merge-adapter").to_deployment(
        name=name, parameters={"spec": {"workers": 9999}}, enforce_parameter_schema=False).apply()
    with TestClient(create_app(_settings(prefect_server, f"merge-adapter/{name}"))) as bad:
        answer = _post(bad, _payload())
    assert answer.status_code == 422
    assert any(e["loc"] == ["spec", "workers"] for e in answer.json()["detail"])


# --------------------------------------------------------------------------- 503 and health


def test_an_unreachable_prefect_api_queues_the_delivery_and_health_is_503(deployment, tmp_path):
    """The delivery is accepted (recorded in the outbox, 202 QUEUED) for the drainer to launch
    when the API answers again (tests/test_webhook_outbox.py); health says the API is down."""
    from triggers.outbox import PENDING, Outbox

    outbox = str(tmp_path / "outbox.sqlite")
    settings = _settings(_dead_url(), deployment, api_timeout=1, outbox=outbox)
    payload = _payload()
    with TestClient(create_app(settings)) as dead:
        answer = _post(dead, payload)
        assert answer.status_code == 202, answer.text
        assert answer.json()["state"] == "QUEUED" and answer.json()["flow_run_id"] is None
        health = dead.get("/healthz")
        assert health.status_code == 503 and health.json()["prefect_api"] is False
    queued = Outbox(outbox).get(answer.json()["idempotency_key"])
    assert queued.state == PENDING and queued.fields["adapter"] == payload["adapter"]
    assert "unreachable" in queued.detail


def test_missing_deployment_is_503(prefect_server):
    with TestClient(create_app(_settings(prefect_server, "merge-adapter/not-deployed"))) as app:
        answer = _post(app, _payload())
    assert answer.status_code == 503
    assert "not found" in answer.json()["detail"]


def test_healthz_reports_the_api_and_hooks(client):
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok" and answer.json()["prefect_api"] is True
    assert answer.json()["hooks"] == {"training": True, "huggingface": True}


# --------------------------------------------------------------------------- Hugging Face


def _hf_payload(name: str = "acme/llama-lora", sha: str | None = None, **event) -> dict:
    return {"event": {"action": "update", "scope": "repo.content", **event},
            "repo": {"type": "model", "name": name, "id": "65f0", "private": False,
                     "headSha": sha or uuid.uuid4().hex[:40].ljust(40, "0")},
            "webhook": {"id": "6a1b", "version": 3}}


def test_huggingface_update_starts_a_merge_of_the_new_head(client):
    payload = _hf_payload()
    sha = payload["repo"]["headSha"]
    answer = client.post("/hooks/huggingface", json=payload, headers={HF_SECRET_HEADER: HF_SECRET})
    assert answer.status_code == 202, answer.text
    again = client.post("/hooks/huggingface", json=payload, headers={HF_SECRET_HEADER: HF_SECRET})
    assert again.json()["flow_run_id"] == answer.json()["flow_run_id"]
    spec = _run(answer.json()["flow_run_id"]).parameters["spec"]
    assert spec["adapter"] == f"hf://acme/llama-lora@{sha}"
    assert spec["out"] == "/srv/merged/acme--llama-lora" and spec["overwrite"] is True
    assert spec["push_to"] == "hf://acme-merged/llama-lora"


@pytest.mark.parametrize("secret", [None, "", "wrong", HF_SECRET + "x", SECRET])
def test_huggingface_without_the_secret_is_401(client, secret):
    headers = {} if secret is None else {HF_SECRET_HEADER: secret}
    assert client.post("/hooks/huggingface", json=_hf_payload(),
                       headers=headers).status_code == 401


@pytest.mark.parametrize("payload", [
    _hf_payload(scope="repo.config"),
    _hf_payload(action="delete", scope="repo"),
    {**_hf_payload(), "repo": {**_hf_payload()["repo"], "type": "dataset"}},
])
def test_huggingface_events_other_than_model_updates_are_ignored(client, payload):
    answer = client.post("/hooks/huggingface", json=payload, headers={HF_SECRET_HEADER: HF_SECRET})
    assert answer.status_code == 200 and "ignored" in answer.json()


def test_huggingface_payload_errors_are_422(client):
    bad_name = _hf_payload(name="no-org; rm -rf /")
    no_sha = _hf_payload()
    del no_sha["repo"]["headSha"]
    for payload in (bad_name, no_sha, {"repo": {}}):
        answer = client.post("/hooks/huggingface", json=payload,
                             headers={HF_SECRET_HEADER: HF_SECRET})
        assert answer.status_code == 422, payload


# --------------------------------------------------------------------------- secrets


def test_secrets_are_never_logged_or_echoed(prefect_server, deployment, caplog):
    caplog.set_level(logging.DEBUG)
    settings = _settings(prefect_server, deployment)
    answers = []
    with TestClient(create_app(settings)) as app:
        answers.append(_post(app, _payload()))
        answers.append(_post(app, _payload(), secret=None, headers={SIGNATURE_HEADER: SECRET}))
        answers.append(_post(app, _payload(options={"dtype": SECRET})))
        answers.append(app.post("/hooks/huggingface", json=_hf_payload(),
                                headers={HF_SECRET_HEADER: HF_SECRET}))
        answers.append(app.post("/hooks/huggingface", json=_hf_payload(),
                                headers={HF_SECRET_HEADER: HF_SECRET[:-1]}))
    assert [a.status_code for a in answers] == [202, 401, 422, 202, 401]
    logging.getLogger("mergeflow.webhook").info("settings: %s", settings)
    for text in [caplog.text, repr(settings), *(a.text for a in answers)]:
        assert SECRET not in text and HF_SECRET not in text


def test_settings_from_env_and_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.setenv("MERGEFLOW_WEBHOOK_SECRET", "from-env")
    monkeypatch.setenv("MERGEFLOW_WEBHOOK_ROOTS", "/data, s3://runs")
    monkeypatch.delenv("MERGEFLOW_HF_WEBHOOK_SECRET", raising=False)
    settings = load_settings(api_url=prefect_server)
    assert settings.training_secret.get_secret_value() == "from-env"
    assert settings.allowed_roots == ["/data", "s3://runs"]
    assert settings.hf_secret is None

    block = f"mergeflow-hf-{uuid.uuid4().hex[:8]}"
    Secret(value="from-block").save(block)
    settings = load_settings(api_url=prefect_server, hf_secret_block=block, hf_out_root="/o")
    assert settings.hf_secret.get_secret_value() == "from-block"
    with pytest.raises(ValueError, match="output root"):
        load_settings(api_url=prefect_server, hf_secret_block=block)
    monkeypatch.delenv("MERGEFLOW_WEBHOOK_SECRET")
    with pytest.raises(ValueError, match="no webhook secret"):
        load_settings(api_url=prefect_server)


def test_cli_refuses_to_serve_without_a_secret(prefect_server, monkeypatch):
    from typer.testing import CliRunner

    from mergeflow.cli.app import app

    monkeypatch.delenv("MERGEFLOW_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("MERGEFLOW_HF_WEBHOOK_SECRET", raising=False)
    result = CliRunner().invoke(app, ["webhook", "serve", "--port", "1"])
    assert result.exit_code == 2
    assert "no webhook secret" in " ".join(result.output.split())


# --------------------------------------------------------------------------- routes (issue 16)


@pytest.fixture(scope="module")
def cpu_deployment(prefect_server) -> str:
    """A CPU merge deployment with the real parameter schema and its own defaults."""
    return _stand_in_deployment(stand_in_merge_adapter, "merge-adapter", "webhook-cpu",
                                {"workers": 2, "device": "cpu"})


@pytest.fixture
def routed(prefect_server, deployment, cpu_deployment):
    settings = _settings(prefect_server, deployment, cpu_deployment=cpu_deployment)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_target_cpu_routes_to_the_cpu_deployment_with_its_defaults(routed, cpu_deployment):
    answer = _post(routed, _payload(target="cpu", options={}))
    assert answer.status_code == 202, answer.text
    assert answer.json()["deployment"] == cpu_deployment
    spec = _run(answer.json()["flow_run_id"]).parameters["spec"]
    assert (spec["device"], spec["workers"]) == ("cpu", 2)
    gpu = _post(routed, _payload(options={}, target=None))  # no target, no device: the GPU one
    assert gpu.status_code == 202 and gpu.json()["deployment"] != cpu_deployment
    assert _run(gpu.json()["flow_run_id"]).parameters["spec"]["device"] == "cuda"


def test_cuda_on_the_cpu_route_is_422_before_any_run(routed):
    payload = _payload(target="cpu", options={"device": "cuda"})
    answer = _post(routed, payload)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "options", "device"]
    assert "CPU deployment" in answer.json()["detail"][0]["msg"]
    assert _runs_with_key(f"mergeflow-webhook:training:{payload['delivery_id']}") == []
    bad = _post(routed, _payload(target="tpu"))
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "target"]


def test_redelivery_after_a_failed_run_starts_the_next_attempt(client):
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    payload = _payload()
    first = _post(client, payload).json()
    assert first["state"] == "SCHEDULED"
    assert _post(client, payload).json()["flow_run_id"] == first["flow_run_id"]  # still due

    async def fail(run_id):
        async with get_client() as prefect:
            await prefect.set_flow_run_state(run_id, Failed(), force=True)

    asyncio.run(fail(first["flow_run_id"]))
    retry = _post(client, payload)
    assert retry.status_code == 202
    assert retry.json()["flow_run_id"] != first["flow_run_id"]
    assert retry.json()["idempotency_key"] == f"{first['idempotency_key']}#2"
    assert _post(client, payload).json()["flow_run_id"] == retry.json()["flow_run_id"]


def test_without_a_target_the_device_picks_the_route(routed, deployment, cpu_deployment):
    cpu = _post(routed, _payload(target=None, options={"device": "cpu"}))
    assert cpu.status_code == 202, cpu.text
    assert cpu.json()["deployment"] == cpu_deployment
    cuda = _post(routed, _payload(target=None, options={"device": "cuda"}))
    assert cuda.status_code == 202, cuda.text
    assert cuda.json()["deployment"] == deployment
    pinned = _post(routed, _payload(target="gpu", options={"device": "cpu"}))  # target wins
    assert pinned.status_code == 202 and pinned.json()["deployment"] == deployment


ROUTES = [(None, None), (None, "cpu"), (None, "cuda"), ("gpu", "cpu"), ("gpu", "cuda"),
          ("cpu", None), ("cpu", "cpu")]


@pytest.mark.parametrize(("target", "device"), ROUTES)
def test_the_event_routes_as_the_webhook_does(target, device):
    """``adapter_ready_event`` (and ``adapter_ready``) pick the deployment the webhook would
    pick for the same target and device: one rule, :func:`triggers.events.route_for`."""
    from triggers.events import RESOURCE_PREFIX, adapter_ready_event
    from triggers.webhook import deployment_for

    settings = WebhookSettings(deployment="flow/gpu-one", cpu_deployment="flow/cpu-one",
                               training_secret=SecretStr("s"))
    options = {"device": device} if device else {}
    [event] = adapter_ready_event("/a", "/o", target=target, **options)
    via_webhook = deployment_for(settings, target, device)
    route = "cpu" if via_webhook == "flow/cpu-one" else "gpu"
    assert event["resource"]["prefect.resource.id"] == f"{RESOURCE_PREFIX[route]}/a"
    assert route == (target or ("cpu" if device == "cpu" else "gpu"))


def test_the_event_refuses_cuda_on_the_cpu_route_as_the_webhook_does(routed):
    from triggers.events import adapter_ready, adapter_ready_event

    with pytest.raises(ValueError, match="CPU deployment"):
        adapter_ready_event("/a", "/o", target="cpu", device="cuda")
    with pytest.raises(ValueError, match="CPU deployment"):
        adapter_ready("/a", "/o", target="cpu", device="cuda")
    answer = _post(routed, _payload(target="cpu", options={"device": "cuda"}))
    assert answer.status_code == 422


def test_adapter_ready_emits_on_the_route_its_device_picks(prefect_server):
    from triggers.events import adapter_ready

    event = adapter_ready("/data/adapters/x", "/data/merged/x", device="cpu")
    assert event is not None and event.resource.id == "mergeflow.cpu-adapter./data/adapters/x"
    assert event.payload == {"adapter": "/data/adapters/x", "out": "/data/merged/x",
                             "device": "cpu"}
    event = adapter_ready("/data/adapters/y", "/data/merged/y", device="cuda")
    assert event.resource.id == "mergeflow.adapter./data/adapters/y"


# --------------------------------------------------------------------------- 403: confinement


@pytest.mark.parametrize("fields", [
    {"adapter": "/etc", "out": "/"},  # the attack: read /etc, write /
    {"out": "/data/../etc/merged"},  # .. folded before the check
    {"out": "relative/out"},  # a relative path would depend on the worker's folder
    {"base": "/home/someone/base"},
    {"push_to": "s3://other-bucket/x"},
    {"options": {"tokenizer": "/root/.ssh"}},
])
def test_a_location_outside_the_allowed_roots_is_403_before_any_run(client, fields):
    payload = _payload(**{k: v for k, v in fields.items() if k != "options"})
    payload["options"].update(fields.get("options", {}))
    answer = _post(client, payload)
    assert answer.status_code == 403, answer.text
    assert "outside the locations this receiver allows" in answer.text


def test_overwrite_is_403_unless_the_receiver_allows_it(prefect_server, deployment):
    payload = _payload(options={"device": "cpu", "overwrite": True})
    with TestClient(create_app(_settings(prefect_server, deployment,
                                         allow_overwrite=False))) as strict:
        answer = _post(strict, payload)
        assert answer.status_code == 403 and "overwrite" in answer.text
    with TestClient(create_app(_settings(prefect_server, deployment,
                                         allow_overwrite=True))) as lenient:
        assert _post(lenient, payload).status_code == 202


def test_a_receiver_without_allowed_roots_does_not_start(prefect_server, deployment):
    from triggers.webhook import check_settings

    with pytest.raises(ValueError, match="no allowed roots"):
        check_settings(_settings(prefect_server, deployment, allowed_roots=[]))


# --------------------------------------------------------------------------- batching window


def stand_in_merge_adapters(adapters: list[str], spec: BatchRequest,
                            out_names: list[str] | None = None) -> None:
    """The batch flow's signature (its parameter schema) without its body."""


@pytest.fixture(scope="module")
def batch_deployment(prefect_server) -> str:
    """A ``merge-adapters`` deployment with the real, enforced parameter schema and defaults."""
    return _stand_in_deployment(stand_in_merge_adapters, "merge-adapters", "webhook-batch",
                                {"workers": 3, "device": "cuda"})


def _checkpoint(step: int, **kw) -> dict:
    """A training run's checkpoint ``step``: one base, outputs side by side under one folder."""
    return _payload(adapter=f"/data/adapters/run-9/checkpoint-{step}",
                    out=f"/srv/merged/run-9/checkpoint-{step}",
                    push_to=f"hf://acme/run-9/checkpoint-{step}", **kw)


def _answer_when_launched(client: TestClient, payload: dict, timeout: float = 30) -> dict:
    """Send the same delivery again until its run exists (the drainer starts held groups)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = _post(client, payload).json()
        if answer["state"] != "HELD" or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_checkpoints_within_the_window_are_merged_in_one_batch_run(
        prefect_server, deployment, batch_deployment):
    """Three checkpoints of one training run arrive within the window: each is answered HELD
    (one group, no run yet); once the window has passed with none arriving, one batch run
    merges all three, in the order they arrived, each into its own output, and every delivery
    answers that run. A delivery naming no base is not held: its own run starts at once."""
    settings = _settings(prefect_server, deployment, window_seconds=1.5,
                         batch_deployment=batch_deployment)
    with TestClient(create_app(settings)) as client:
        sent = [_checkpoint(step) for step in (100, 200, 300)]
        held = [_post(client, payload) for payload in sent]
        assert [a.status_code for a in held] == [202] * 3, held[0].text
        assert {a.json()["state"] for a in held} == {"HELD"}
        assert len({a.json()["group"] for a in held}) == 1
        assert all(a.json()["flow_run_id"] is None for a in held)

        alone = _post(client, _payload(base=None, out="/srv/merged/other"))
        assert alone.status_code == 202 and alone.json()["flow_run_id"] is not None

        answers = [_answer_when_launched(client, payload) for payload in sent]
    assert {a["state"] for a in answers} == {"LAUNCHED"}, answers
    assert len({a["flow_run_id"] for a in answers}) == 1
    run = _run(answers[0]["flow_run_id"])
    assert run.deployment_id is not None and run.name
    assert run.parameters["adapters"] == [p["adapter"] for p in sent]
    assert run.parameters["out_names"] == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    spec = run.parameters["spec"]
    assert (spec["out"], spec["base"], spec["push_to"]) == (
        "/srv/merged/run-9", "/data/bases/tiny", "hf://acme/run-9/{name}")
    assert (spec["device"], spec["dtype"], spec["workers"]) == ("cpu", "bfloat16", 3)


def test_a_group_of_one_is_its_own_merge_run(prefect_server, deployment, batch_deployment):
    settings = _settings(prefect_server, deployment, window_seconds=0.5,
                         batch_deployment=batch_deployment)
    with TestClient(create_app(settings)) as client:
        payload = _checkpoint(400)
        assert _post(client, payload).json()["state"] == "HELD"
        answer = _answer_when_launched(client, payload)
    # answered as any launched delivery: its run's state, on the merge deployment
    assert answer["state"] not in ("HELD", "QUEUED") and answer["flow_run_id"], answer
    assert answer["deployment"] == deployment
    spec = _run(answer["flow_run_id"]).parameters["spec"]
    assert (spec["adapter"], spec["out"]) == (payload["adapter"], payload["out"])


def test_only_deliveries_one_run_can_merge_share_a_group():
    from triggers.batching import group_key

    base = _checkpoint(1)
    fields = {**base["options"], "adapter": base["adapter"], "out": base["out"],
              "base": base["base"], "push_to": base["push_to"]}
    key = group_key(fields, "merge-adapter/x")
    assert key and key == group_key({**fields, "adapter": "/data/a/checkpoint-2",
                                     "out": "/srv/merged/run-9/checkpoint-2",
                                     "push_to": "hf://acme/run-9/checkpoint-2"}, "merge-adapter/x")
    assert group_key(fields, "merge-adapter/cpu") != key  # another route
    assert group_key({**fields, "dtype": "float16"}, "merge-adapter/x") != key  # other options
    assert group_key({**fields, "base": "/data/bases/other"}, "merge-adapter/x") != key
    assert group_key({**fields, "out": "/srv/elsewhere/checkpoint-1"},
                     "merge-adapter/x") not in (None, key)  # another output folder
    assert group_key({**fields, "push_to": "hf://acme/run-9/final"},
                     "merge-adapter/x") is None  # no {name} template fits it
    assert group_key({**fields, "base": None}, "merge-adapter/x") is None  # base unknown
    assert group_key({**fields, "push_to": None}, "merge-adapter/x") not in (None, key)


def test_without_a_batch_deployment_held_deliveries_start_their_own_runs(
        prefect_server, deployment):
    """A server that has no batch deployment: the group's deliveries, once due, are merged
    each in its own run (the receiver logs why) instead of waiting for ever."""
    settings = _settings(prefect_server, deployment, window_seconds=0.5,
                         batch_deployment="merge-adapters/not-deployed")
    with TestClient(create_app(settings)) as client:
        sent = [_checkpoint(step) for step in (500, 600)]
        assert {_post(client, payload).json()["state"] for payload in sent} == {"HELD"}
        answers = [_answer_when_launched(client, payload) for payload in sent]
    assert all(a["flow_run_id"] and a["deployment"] == deployment for a in answers), answers
    assert len({a["flow_run_id"] for a in answers}) == 2
    assert [_run(a["flow_run_id"]).parameters["spec"]["adapter"] for a in answers] == \
        [p["adapter"] for p in sent]
