"""End to end with real processes and no mocks (issue 7): a Prefect server, ``deployments/deploy.sh``
(pools, tag limit, every deployment of deployments/prefect.yaml), a process worker on the ``gpu``
pool and ``mergeflow webhook serve``, shared by the tests of this module. Each trigger path (a
signed webhook call, a ``mergeflow.adapter.ready`` event posted to ``/api/events``, the folder
watcher) must end in a Completed merge run whose output's manifest verifies, exactly once.

Every process started here runs in its own session and is stopped at the end (SIGTERM to its
process group, SIGKILL after a grace period, and any descendant left over).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO, cli_command, cli_env

from mergeflow.output.folder import read_manifest
from mergeflow.pipeline.verification import check_files
from triggers.events import adapter_ready_event
from triggers.webhook import SIGNATURE_HEADER, sign

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "mergeflow-e2e-secret-7d2c41"
PREFECT = str(Path(sys.executable).with_name("prefect"))
STARTUP_TIMEOUT = 300  # a cold server migrates its database; busy CI machines are slow
RUN_TIMEOUT = 300
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --------------------------------------------------------------------------- processes


class Processes:
    """Subprocesses started in their own sessions, logging to files, all stopped by :meth:`stop`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def check_alive(self, *names: str) -> None:
        """Fail with its log when one of these processes has exited."""
        for name in names:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited ({self.procs[name].returncode}):\n{self.log(name)}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds, including
        descendants that started their own sessions (the worker's flow-run processes)."""
        import psutil

        leftovers: list[psutil.Process] = []
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                leftovers += psutil.Process(proc.pid).children(recursive=True)
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        for child in leftovers:
            with contextlib.suppress(psutil.Error):
                child.kill()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], what: str, timeout: float, procs: Processes,
               alive: tuple[str, ...] = ()) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive(*alive)
        with contextlib.suppress(httpx.HTTPError):
            if result := check():
                return result
        time.sleep(0.25)
    logs = "\n".join(f"--- {n}\n{procs.log(n)}" for n in procs.procs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    api: str
    webhook: str
    root: Path
    procs: Processes
    timings: dict[str, float]

    def runs(self, **flow_runs_filter) -> list[dict]:
        """Flow runs of the server matching a ``flow_runs`` filter body."""
        body = {"flow_runs": flow_runs_filter} if flow_runs_filter else {}
        answer = httpx.post(f"{self.api}/flow_runs/filter", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def runs_for_out(self, out: Path) -> list[dict]:
        return [r for r in self.runs()
                if (r["parameters"].get("spec") or {}).get("out") == str(out)]

    def wait_for_run(self, run_id: str) -> dict:
        """The run once it is final; fails with the worker's log unless it completed."""
        def final() -> dict | None:
            run = httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()
            return run if run["state_type"] in FINAL else None

        run = wait_until(final, f"flow run {run_id}", RUN_TIMEOUT, self.procs, ("worker",))
        assert run["state_type"] == "COMPLETED", (run["state_name"], self.procs.log("worker"))
        return run


def _env(root: Path, api: str) -> dict[str, str]:
    return {**cli_env(), "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT": PREFECT,
            "MERGEFLOW_WEBHOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1",
            "MERGEFLOW_WEBHOOK_ROOTS": tempfile.gettempdir(),  # where pytest's folders are
            "MERGEFLOW_WATCH_LOCATION": str(root / "scheduled-inbox"),
            "MERGEFLOW_OUT_ROOT": str(root / "scheduled-out")}


def _start_stack(root: Path, procs: Processes) -> Stack:
    start, timings = time.monotonic(), {}
    port, hook_port = free_port(), free_port()
    api, webhook = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{hook_port}"
    env = _env(root, api)
    procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                {k: v for k, v in env.items() if k != "PREFECT_API_URL"})
    wait_until(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200,
               "the Prefect server", STARTUP_TIMEOUT, procs, ("server",))
    timings["server up"] = time.monotonic() - start
    # Pools and deployments, the worker and the webhook receiver start side by side.
    deploy = procs.start("deploy", [str(REPO / "deployments" / "deploy.sh")], env)
    procs.start("worker", [PREFECT, "worker", "start", "--pool", "gpu", "--type", "process"], env)
    procs.start("webhook", cli_command("webhook", "serve", "--host", "127.0.0.1", "--port",
                                       str(hook_port), "--outbox", str(root / "outbox.sqlite")),
                env)
    wait_until(lambda: deploy.poll() is not None, "deployments/deploy.sh", STARTUP_TIMEOUT, procs)
    assert deploy.returncode == 0, procs.log("deploy")
    timings["deployed"] = time.monotonic() - start
    wait_until(lambda: httpx.get(f"{webhook}/healthz", timeout=5).status_code == 200,
               "the webhook receiver", STARTUP_TIMEOUT, procs, ("webhook",))
    timings["webhook up"] = time.monotonic() - start
    return Stack(api, webhook, root, procs, timings)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    procs = Processes(root / "logs")
    try:
        yield _start_stack(root, procs)
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter) -> tuple[Path, Path]:
    base = make_base("llama")
    return base, make_adapter(base)


def assert_merged(out: Path) -> None:
    """The output exists, and every file its manifest lists has its size and sha256."""
    manifest = read_manifest(out)
    assert manifest is not None, f"{out}: no manifest"
    count, problems = check_files(out)
    assert count > 0 and not problems, problems


# --------------------------------------------------------------------------- the trigger paths


def test_deployments_are_on_the_server(stack):
    print("stack started (s since start):", {k: round(v, 1) for k, v in stack.timings.items()})
    names = {d["name"]: d for d in httpx.post(f"{stack.api}/deployments/filter", json={}).json()}
    assert {"merge-adapter", "merge-adapter-cpu", "watch-adapters"} <= set(names)
    assert names["merge-adapter"]["work_pool_name"] == "gpu"
    assert names["merge-adapter"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    pools = {p["name"]: p["type"] for p in
             httpx.post(f"{stack.api}/work_pools/filter", json={}).json()}
    assert pools["gpu"] == "process" and pools["cpu"] == "process"
    automations = httpx.post(f"{stack.api}/automations/filter", json={}).json()
    assert {"mergeflow-adapter-ready", "mergeflow-cpu-adapter-ready"} <= {
        a["name"] for a in automations}
    limits = httpx.post(f"{stack.api}/concurrency_limits/filter", json={}).json()
    assert [(c["tag"], c["concurrency_limit"]) for c in limits] == [("gpu", 1)]


def test_signed_webhook_call_merges_once(stack, inputs):
    base, adapter = inputs
    out = stack.root / "merged-webhook"
    # target gpu: this stack's one worker serves the gpu pool (the merge itself runs on CPU;
    # without a target, device cpu would pick the CPU deployment)
    payload = {"adapter": str(adapter), "base": str(base), "out": str(out),
               "options": {"device": "cpu"}, "delivery_id": f"train-{uuid.uuid4().hex}",
               "target": "gpu"}
    body = json.dumps(payload).encode()
    url = f"{stack.webhook}/hooks/training"
    assert httpx.post(url, content=body, timeout=60).status_code == 401
    signed = {SIGNATURE_HEADER: sign(body, SECRET), "Content-Type": "application/json"}
    first = httpx.post(url, content=body, headers=signed, timeout=60)
    assert first.status_code == 202, first.text
    again = httpx.post(url, content=body, headers=signed, timeout=60)
    assert again.status_code == 202 and again.json()["flow_run_id"] == first.json()["flow_run_id"]

    stack.wait_for_run(first.json()["flow_run_id"])
    assert_merged(out)
    assert len(stack.runs_for_out(out)) == 1


def test_adapter_ready_event_merges_once(stack, inputs):
    base, adapter = inputs
    out = stack.root / "merged-event"
    event = adapter_ready_event(str(adapter), str(out), base=str(base), device="cpu",
                                target="gpu")  # the stack's worker serves the gpu pool
    for _ in range(2):  # a resent event (same id) is a duplicate
        answer = httpx.post(f"{stack.api}/events", json=event, timeout=30)
        assert answer.status_code == 204, answer.text
    run = wait_until(lambda: stack.runs_for_out(out), "the event's flow run", 60, stack.procs)[0]
    stack.wait_for_run(run["id"])
    assert_merged(out)
    assert len(stack.runs_for_out(out)) == 1


def test_watcher_merges_a_finished_adapter_once(stack, inputs):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.watch import merge_new_adapters

    base, adapter = inputs
    inbox, out_root = stack.root / "inbox", stack.root / "merged-watch"
    shutil.copytree(adapter, inbox / "tiny")
    (inbox / "tiny" / "_COMPLETE").touch()
    kwargs = dict(location=str(inbox), out_root=str(out_root),
                  options={"base": str(base), "device": "cpu"})
    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        first = merge_new_adapters(**kwargs)
        second = merge_new_adapters(**kwargs)
        assert len(first) == 1 and [r["flow_run_id"] for r in second] == [first[0]["flow_run_id"]]
        stack.wait_for_run(first[0]["flow_run_id"])
        assert_merged(out_root / "tiny")
        assert merge_new_adapters(**kwargs) == []  # merged: nothing to start
        _drain_prefect_workers()  # send this process's logs and events while the server is up
    assert len(stack.runs_for_out(out_root / "tiny")) == 1


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
