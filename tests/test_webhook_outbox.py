"""The webhook receiver under a burst, a slow Prefect API and a restart (issue 28).

Route: the real receiver served by uvicorn on a local port, real signed HTTP requests, the
session's real Prefect server behind a proxy that holds every API call (a slow server), or a
dead address (no server). Every accepted delivery is recorded in the receiver's SQLite outbox
before it is answered; the runs are counted on the Prefect server by their idempotency keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from helpers import ServedReceiver
from s3_server import FlakyProxy
from test_webhook import (  # the receiver's settings, payloads and Prefect lookups
    SECRET,
    _dead_url,
    _payload,
    _runs_with_key,
    _settings,
    deployment,  # noqa: F401 (the module's deployment fixture)
)

from triggers.webhook import SIGNATURE_HEADER, sign


def _signed(payload: dict) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    return body, {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, SECRET)}


def _key(payload: dict) -> str:
    return f"mergeflow-webhook:training:{payload['delivery_id']}"


def _wait_for_runs(keys: list[str], seconds: float) -> dict[str, int]:
    """Runs per key on the Prefect server, once every key has one (or the time is up)."""
    deadline = time.monotonic() + seconds
    while True:
        counts = {key: len(_runs_with_key(key)) for key in keys}
        if all(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(1)


def test_a_burst_of_200_requests_over_4_deliveries_is_accepted_and_makes_4_runs(
        prefect_server, deployment, tmp_path):  # noqa: F811
    payloads = [_payload() for _ in range(4)]
    with FlakyProxy(prefect_server, delay=1.0) as proxy, ServedReceiver(_settings(
            f"{proxy.url}/api", deployment, api_timeout=0.5,
            outbox=str(tmp_path / "outbox.sqlite"))) as receiver:

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                sends = [client.post(f"{receiver.url}/hooks/training", content=body,
                                     headers=headers)
                         for body, headers in (_signed(payloads[i % 4]) for i in range(200))]
                return await asyncio.gather(*sends)

        started = time.monotonic()
        answers = asyncio.run(burst())
        answered_in = time.monotonic() - started
        assert sorted({a.status_code for a in answers}) == [202], [a.text for a in answers[:3]]
        assert answered_in < 30  # answered while the API was still slow, not after it
        states = {a.json()["state"] for a in answers}
        assert "QUEUED" in states and states <= {"QUEUED", "LAUNCHED", "SCHEDULED"}, states
        counts = _wait_for_runs([_key(p) for p in payloads], 120)
    assert counts == {_key(p): 1 for p in payloads}


def test_a_restarted_receiver_launches_what_it_accepted_while_the_api_was_down(
        prefect_server, deployment, tmp_path):  # noqa: F811
    outbox = str(Path(tmp_path) / "outbox.sqlite")
    payloads = [_payload() for _ in range(3)]
    with ServedReceiver(_settings(_dead_url(), deployment, api_timeout=0.5, outbox=outbox)) as down:
        answers = [httpx.post(f"{down.url}/hooks/training", content=body, headers=headers,
                              timeout=30) for body, headers in map(_signed, payloads)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert all(a.json()["state"] == "QUEUED" and a.json()["flow_run_id"] is None
               for a in answers)
    assert all(not _runs_with_key(_key(p)) for p in payloads)
    with ServedReceiver(_settings(prefect_server, deployment, outbox=outbox)):
        counts = _wait_for_runs([_key(p) for p in payloads], 60)
    assert counts == {_key(p): 1 for p in payloads}


@pytest.mark.parametrize("hook", ["training"])
def test_a_refused_delivery_is_not_kept(prefect_server, deployment, tmp_path, hook):  # noqa: F811
    """A delivery the server refuses (its spec invalid over the deployment's defaults) is
    answered 422 and left out of the outbox, so a corrected resend is a new delivery."""
    from triggers.outbox import Outbox

    outbox = str(tmp_path / "outbox.sqlite")
    payload = _payload(options={"dtype": "float64"})  # not a dtype a merge writes
    with ServedReceiver(_settings(prefect_server, deployment, outbox=outbox)) as receiver:
        body, headers = _signed(payload)
        answer = httpx.post(f"{receiver.url}/hooks/{hook}", content=body, headers=headers,
                            timeout=30)
    assert answer.status_code == 422, answer.text
    store = Outbox(outbox)
    assert store.get(_key(payload)) is None
    store.close()


def test_an_outbox_written_before_batching_windows_opens_and_keeps_its_rows(tmp_path):
    """Route: the Outbox class on a SQLite file with the older table (no group column), as a
    receiver upgraded in place finds it; its rows stay, and new ones can be held."""
    import sqlite3

    from triggers.outbox import HELD, PENDING, Outbox

    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE deliveries (key TEXT PRIMARY KEY, deployment TEXT NOT NULL, "
                   "fields TEXT NOT NULL, state TEXT NOT NULL, flow_run_id TEXT, flow_run_name "
                   "TEXT, detail TEXT, attempts INTEGER NOT NULL DEFAULT 0, received REAL NOT NULL)")
        db.execute("INSERT INTO deliveries (key, deployment, fields, state, received) VALUES "
                   "('old', 'merge-adapter/x', '{\"adapter\": \"/a\"}', 'pending', 1.0)")
    outbox = Outbox(path)
    try:
        [old] = outbox.pending()
        assert (old.key, old.fields, old.state, old.group) == ("old", {"adapter": "/a"}, PENDING,
                                                               None)
        held, new = outbox.add("new", "merge-adapter/x", {"adapter": "/b"}, group="batch:g")
        assert new and held.state == HELD and list(outbox.held()) == ["batch:g"]
        outbox.release("new")
        assert outbox.get("new").state == PENDING and outbox.get("new").group is None
    finally:
        outbox.close()
