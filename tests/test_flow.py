"""The Prefect pipeline (issue 5): flow and tasks against a real (temporary) Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, load_json, logits_of, read_tensors, snapshot

import mergeflow
from mergeflow import pipeline as api
from mergeflow.errors import PlanError, TransientError
from mergeflow.spec import MergeSpec
from mergeflow.storage.staging import Staging

pytestmark = pytest.mark.usefixtures("prefect_server")


def _spec(base: Path, adapter: Path, out: Path, **kw) -> MergeSpec:
    return MergeSpec(base=str(base), adapter=str(adapter), out=str(out), **kw)


@pytest.fixture(scope="module")
def sharded_inputs(make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                           use_dora=True)
    return base, adapter


def _artifacts(flow_run_id) -> dict[str, object]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key or a.type: a for a in asyncio.run(read())}


def test_flow_output_equals_core_output_and_has_artifacts(sharded_inputs, tmp_path, input_ids):
    from flows.merge import merge_adapter

    base, adapter = sharded_inputs
    state = merge_adapter(_spec(base, adapter, tmp_path / "flow", max_shard_size="40KB"),
                          return_state=True)
    assert state.is_completed()
    report = state.result()
    assert report.status == "merged" and report.shards > 3
    mergeflow.merge(base, adapter, tmp_path / "core", max_shard_size="40KB")
    flow_files, core_files = snapshot(tmp_path / "flow"), snapshot(tmp_path / "core")
    assert {k: v[2] for k, v in flow_files.items()} == {k: v[2] for k, v in core_files.items()}
    live = logits_of(base, input_ids, adapter=adapter)
    assert (logits_of(tmp_path / "flow", input_ids) - live).abs().max() < 1e-4

    from flows.merge import artifact_key

    artifacts = _artifacts(state.state_details.flow_run_id)
    out = str(tmp_path / "flow")
    report_key, norms_key = artifact_key("merge-report", out), artifact_key("delta-norms", out)
    assert report_key.startswith("merge-report-flow-") and report_key != artifact_key(
        "merge-report", str(tmp_path / "other" / "flow"))  # one history per output
    assert report_key in artifacts and norms_key in artifacts
    markdown = artifacts[report_key].data
    assert "Verification" in markdown and "passed" in markdown and "untied" not in markdown
    assert f"- base: `{base}`" in markdown  # the base folder read
    table = artifacts[norms_key].data
    assert "q_proj" in str(table) and "DoRA" in str(table)
    progress = [a for a in artifacts.values() if a.type == "progress"]
    assert progress and float(progress[0].data) == 100.0


def test_the_persisted_result_carries_timings_verification_and_manifest(sharded_inputs,
                                                                        tmp_path):
    import hashlib

    from flows.merge import artifact_key, merge_adapter

    base, adapter = sharded_inputs
    spec = _spec(base, adapter, tmp_path / "out", max_shard_size="40KB")
    report = merge_adapter(spec, return_state=True).result()
    digest = hashlib.sha256((tmp_path / "out" / "merge-manifest.json").read_bytes()).hexdigest()
    assert report.manifest_sha256 == digest
    assert {"load", "merge", "finalize", "verify", "publish"} <= set(report.timings)
    assert report.verification.startswith("verification passed:")
    assert "timings" not in load_json(tmp_path / "out" / "merge-manifest.json")["report"]

    again = merge_adapter(spec, return_state=True)  # up to date: a short artifact says so
    assert again.result().status == "up-to-date" and again.result().manifest_sha256 == digest
    note = _artifacts(again.state_details.flow_run_id)[artifact_key("merge-report", spec.out)]
    assert "already holds this merge" in note.data and digest in note.data


def _logs(flow_run_id) -> list[str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the run's logs reach the server in batches

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in asyncio.run(read())]


def test_a_refused_merge_is_one_line_in_the_runs_log_not_a_traceback(sharded_inputs, tmp_path):
    from flows.merge import merge_adapter

    base, _ = sharded_inputs
    missing = tmp_path / "no-such-adapter"
    state = merge_adapter(_spec(base, missing, tmp_path / "out"), return_state=True)
    assert state.is_failed()
    logs = _logs(state.state_details.flow_run_id)
    assert not [m for m in logs if "Traceback" in m], logs
    assert any(f"{missing}: no such local file or folder" in m for m in logs), logs
    assert not any("Engine execution exited" in m for m in logs)


def test_tasks_through_fn(sharded_inputs, tmp_path):
    from tasks import finalize, load, merge_shard, publish, verify

    base, adapter = sharded_inputs
    prepared = load.fn(_spec(base, adapter, tmp_path / "out"))
    assert prepared.shard_count == 1 and not prepared.up_to_date
    result = merge_shard.fn(prepared.plan_path, 0)
    assert (Path(prepared.staging) / result.filename).stat().st_size == result.size
    finalize.fn(prepared, [result])
    assert verify.fn(prepared).ok
    assert publish.fn(prepared) == str(tmp_path / "out")
    assert (tmp_path / "out" / "merge-manifest.json").is_file()


def test_transient_failure_is_retried_and_permanent_is_not(sharded_inputs, tmp_path,
                                                          monkeypatch):
    from flows.merge import merge_adapter

    base, adapter = sharded_inputs
    calls = {"n": 0}
    real = api.run_shard

    def flaky(plan_path, index, device="cpu", *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransientError("simulated: connection reset while reading a shard")
        return real(plan_path, index, device, *args, **kwargs)

    monkeypatch.setattr(api, "run_shard", flaky)
    report = merge_adapter(_spec(base, adapter, tmp_path / "out", workers=1))
    assert report.status == "merged" and calls["n"] == report.shards + 1

    attempts = {"n": 0}

    def broken(*args, **kwargs):
        attempts["n"] += 1
        raise PlanError("simulated: adapter for another base")

    monkeypatch.setattr(api, "prepare", broken)
    state = merge_adapter(_spec(base, adapter, tmp_path / "out2"), return_state=True)
    assert state.is_failed() and attempts["n"] == 1
    assert not (tmp_path / "out2").exists()


def test_dask_runner_on_a_local_process_cluster(sharded_inputs, tmp_path):
    from distributed import LocalCluster

    from flows.merge import merge_adapter

    base, adapter = sharded_inputs
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        report = merge_adapter(_spec(base, adapter, tmp_path / "dask", max_shard_size="40KB",
                                     dask_address=cluster.scheduler_address))
    assert report.status == "merged"
    core = mergeflow.merge(base, adapter, tmp_path / "core", max_shard_size="40KB")
    assert core.shards == report.shards
    assert read_tensors(tmp_path / "dask").keys() == read_tensors(tmp_path / "core").keys()
    assert {k: v[2] for k, v in snapshot(tmp_path / "dask").items()} == \
        {k: v[2] for k, v in snapshot(tmp_path / "core").items()}


def _cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "mergeflow.cli.app", "merge", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_merge_then_rerun_is_byte_identical(make_base, make_adapter, tmp_path):
    base = make_base("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                     vocab_size=512)
    adapter = make_adapter(base, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--max-shard-size", "300KB", "--workers", "1", "--no-verify"]
    done_dir = Staging.for_output(out).done_dir
    proc = _cli(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list(done_dir.glob("*.json")))
    total = load_json(Staging.for_output(out).plan_path)["shards"]
    assert 0 < finished_before < len(total), "the kill must land mid-merge"
    assert not out.exists()  # nothing half-written where the model belongs

    rerun = _cli(args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"resumed {finished_before} of {len(total)} groups" in stdout

    clean = mergeflow.merge(base, adapter, tmp_path / "clean", max_shard_size="300KB")
    assert clean.shards == len(total)
    resumed_files = {k: v[2] for k, v in snapshot(out).items()}
    clean_files = {k: v[2] for k, v in snapshot(tmp_path / "clean").items()}
    assert resumed_files == clean_files


def test_fp8_through_the_flow_is_the_core_route_byte_for_byte(sharded_inputs, tmp_path):
    """``save_method=fp8`` run as the Prefect flow writes the in-process route's files."""
    pytest.importorskip("compressed_tensors")
    from flows.merge import merge_adapter

    base, adapter = sharded_inputs
    state = merge_adapter(_spec(base, adapter, tmp_path / "flow", save_method="fp8"),
                          return_state=True)
    assert state.is_completed() and state.result().save_method == "fp8"
    mergeflow.merge(base, adapter, tmp_path / "core", save_method="fp8")
    flow_files, core_files = snapshot(tmp_path / "flow"), snapshot(tmp_path / "core")
    assert {k: v[2] for k, v in flow_files.items()} == {k: v[2] for k, v in core_files.items()}
    config = load_json(tmp_path / "flow" / "config.json")
    assert config["quantization_config"]["format"] == "float-quantized"
