"""Ctrl-C (SIGINT) and SIGTERM during ``mergeflow merge`` (issue 16, item 5): on both routes (the
in-process default and the ``--prefect`` flow run) the real CLI, stopped mid-write, prints one
line naming the staging folder it keeps and saying a rerun resumes, no traceback, exits 130
promptly; the rerun then finishes with the bytes of a clean run.

The merge is held mid-write with ``MERGEFLOW_FAULT_AT=tensor-written:<n>:pause``
(:mod:`mergeflow.faults`): the worker thread that writes the n-th tensor stops there, with its
shard's ``.partial`` file open and half written, until the signal arrives (past the page cache,
the bytes written so far may still sit in the writer's 4 MiB chunk: the file can be empty).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, cli_command, cli_env, snapshot

from mergeflow import pipeline as api
from mergeflow.storage.staging import Staging

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter, tmp_path_factory):
    """A base, its adapter, and the bytes of a clean merge of them (the reference)."""
    base = make_base("llama", max_shard_size="60KB")
    adapter = make_adapter(base, target_modules=TARGETS)
    clean = tmp_path_factory.mktemp("clean") / "out"
    api.merge(base, adapter, clean, max_shard_size="40KB")
    return base, adapter, _contents(clean)


def _contents(folder: Path) -> dict[str, bytes]:
    return {name: entry[2] for name, entry in snapshot(folder).items()}


def _args(base: Path, adapter: Path, out: Path, route: str) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--max-shard-size", "40KB", "--workers", "2",
            *(["--prefect"] if route == "prefect" else [])]


def _env(route: str, prefect_url: str | None, fault: str | None) -> dict[str, str]:
    env = cli_env()
    env.pop("PREFECT_API_URL", None)
    env.pop("MERGEFLOW_FAULT_AT", None)
    if route == "prefect":
        env["PREFECT_API_URL"] = prefect_url
    if fault:
        env["MERGEFLOW_FAULT_AT"] = fault
    return env


def _wait_mid_write(proc: subprocess.Popen, *stagings: Staging, timeout: float = 240) -> None:
    """Until the merge is writing a shard (its ``.partial`` file exists) in one of the staging
    folders - or fail."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            if any(list(staging.folder.glob(".*.partial")) for staging in stagings):
                time.sleep(0.5)  # the pause point: three tensors into the shard
                return
            time.sleep(0.1)
        pytest.fail(f"no shard being written in {[str(s.folder) for s in stagings]} after "
                    f"{timeout} s")
    except BaseException:
        proc.kill()  # a merge paused at its fault point would otherwise outlive the test
        raise


@pytest.fixture
def prefect_url(request):
    """The session's Prefect server for the flow route (none for the in-process one)."""
    if request.node.callspec.params["route"] != "prefect":
        return None
    return request.getfixturevalue("prefect_server")


@pytest.mark.parametrize(("route", "signum"), [
    ("in-process", signal.SIGINT), ("in-process", signal.SIGTERM),
    ("prefect", signal.SIGINT), ("prefect", signal.SIGTERM)])
def test_a_signal_mid_write_keeps_staging_exits_130_and_a_rerun_resumes(
        inputs, tmp_path, route, signum, prefect_url):
    base, adapter, clean = inputs
    out = tmp_path / "out"
    staging = Staging.for_output(out)
    proc = subprocess.Popen(cli_command(*_args(base, adapter, out, route)), cwd=REPO, text=True,
                            env=_env(route, prefect_url, "tensor-written:3:pause"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_mid_write(proc, staging)
    sent = time.monotonic()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent

    assert proc.returncode == 130, (stdout, stderr)
    assert took < 15, f"{took:.1f} s from the signal to the exit"  # workers stop with it
    assert "Traceback" not in stdout + stderr
    expected = f"interrupted: staging kept at {staging.folder}; rerun the same command to resume"
    assert stderr.strip().splitlines() == [expected], stderr
    assert staging.folder.is_dir() and staging.plan_path.is_file() and not out.exists()
    if route == "prefect":
        assert _crashed_run_says(prefect_url, expected)

    rerun = subprocess.run(cli_command(*_args(base, adapter, out, route)), cwd=REPO, text=True,
                           env=_env(route, prefect_url, None), capture_output=True, timeout=600,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert _contents(out) == clean
    assert not staging.folder.exists()


def _crashed_run_says(api_url: str, message: str) -> bool:
    """Whether the Prefect server holds a crashed flow run whose state message is ``message``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=50)
    return any(r.state is not None and r.state.type.value == "CRASHED"
               and r.state.message == message for r in runs)


@pytest.mark.parametrize(("route", "signum"), [
    ("in-process", signal.SIGINT), ("in-process", signal.SIGTERM), ("prefect", signal.SIGINT)])
def test_a_signal_mid_batch_keeps_every_staging_exits_130_and_a_rerun_resumes(
        inputs, tmp_path, route, signum, prefect_url):
    """Route: the real CLI, a batch (two outputs of one adapter, named) in-process or as the
    ``merge-adapters`` flow, held mid-write by the fault point; the signal stops the whole batch
    with one line naming the outputs whose staging is kept, exit 130, no traceback (the flow
    run marked crashed with that line); the rerun finishes both with a clean run's bytes."""
    base, adapter, clean = inputs
    out = tmp_path / "batch"
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--adapter", str(adapter),
            "--out-name", "first", "--out-name", "second", "--out", str(out),
            "--max-shard-size", "40KB", *(["--prefect"] if route == "prefect" else [])]
    proc = subprocess.Popen(cli_command(*args), cwd=REPO, text=True,
                            env=_env(route, prefect_url, "tensor-written:3:pause"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # the paused thread writes one output's shard; the other output may be a shard ahead
    _wait_mid_write(proc, Staging.for_output(out / "first"), Staging.for_output(out / "second"))
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line == ("interrupted: staging kept for 2 of 2 outputs (first, second); rerun the "
                    "same command to resume"), line
    assert not (out / "first").exists() and not (out / "second").exists()
    if route == "prefect":
        assert _crashed_run_says(prefect_url, line)

    rerun = subprocess.run(cli_command(*args), cwd=REPO, text=True, capture_output=True,
                           env=_env(route, prefect_url, None), timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert _contents(out / "first") == clean and _contents(out / "second") == clean
