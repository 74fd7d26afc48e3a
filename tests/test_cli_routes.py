"""Which path ``mergeflow merge`` takes (issue 11, item 5): in-process for a plain local run, the
Prefect flow ``merge-adapter`` with ``--prefect`` / ``PREFECT_API_URL`` / ``--dask-address`` /
``--push-to``; both give the same bytes, and the flow does not plan the merge twice."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, cli_command, cli_env, load_json, snapshot

from mergeflow import pipeline as api
from mergeflow.errors import VerificationError
from mergeflow.spec import MergeSpec

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    return base, make_adapter(base, target_modules=TARGETS)


def _cli(args: list[str], env: dict[str, str | None]) -> subprocess.CompletedProcess:
    full = cli_env()
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run(cli_command(*args), cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=600, check=False)


def _merge_args(base: Path, adapter: Path, out: Path, *flags: str) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
            "--max-shard-size", "40KB", *flags]


def _contents(folder: Path) -> dict[str, bytes]:
    return {k: v[2] for k, v in snapshot(folder).items()}


def test_route_choice(monkeypatch):
    from mergeflow.cli.app import flow_reason

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    plain = MergeSpec(adapter="a", out="o")
    assert flow_reason(plain) is None
    assert flow_reason(plain, prefect=True) == "--prefect"
    assert flow_reason(MergeSpec(adapter="a", out="o", dask_address="tcp://x:8786")) == "--dask-address"
    assert flow_reason(MergeSpec(adapter="a", out="o", push_to="s3://b/p")) == "--push-to"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert flow_reason(plain) == "PREFECT_API_URL is set"


def test_local_run_is_in_process_and_byte_identical_to_the_flow(inputs, tmp_path, prefect_server):
    base, adapter = inputs
    local = _cli(_merge_args(base, adapter, tmp_path / "local"), {"PREFECT_API_URL": None})
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip().splitlines()[-1] == "ran in-process"
    assert "prefect" not in (local.stdout + local.stderr).lower().replace("ran in-process", "")

    flow = _cli(_merge_args(base, adapter, tmp_path / "flow", "--prefect"),
                {"PREFECT_API_URL": prefect_server})
    assert flow.returncode == 0, flow.stderr
    line = flow.stdout.strip().splitlines()[-1]
    assert line == (f"ran as Prefect flow run merge-adapter/{adapter.parent.name}/{adapter.name}"
                    " -> flow (--prefect)")
    assert load_json(tmp_path / "local" / "merge-manifest.json")["report"]["shards"] > 1
    assert _contents(tmp_path / "local") == _contents(tmp_path / "flow")

    again = _cli(_merge_args(base, adapter, tmp_path / "flow"), {"PREFECT_API_URL": prefect_server})
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stdout.split())
    assert "already holds this merge" in said and said.endswith(
        "ran in-process (already up to date; no flow run started although PREFECT_API_URL is set)")


def test_prefect_api_url_alone_runs_the_flow(inputs, tmp_path, prefect_server):
    base, adapter = inputs
    result = _cli(_merge_args(base, adapter, tmp_path / "out", "--no-verify"),
                  {"PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("ran as Prefect flow run merge-adapter/")
    assert result.stdout.strip().endswith("(PREFECT_API_URL is set)")


def test_in_process_resume_and_exit_codes(inputs, tmp_path):
    """A plain local run resumes the shards an interrupted run left, with the same bytes."""
    base, adapter = inputs
    out = tmp_path / "out"
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(out), max_shard_size="40KB")
    prepared = api.prepare(spec)
    for index in range(2):  # an interrupted run wrote two groups
        api.run_shard(prepared.plan_path, index)
    result = _cli(_merge_args(base, adapter, out), {"PREFECT_API_URL": None})
    assert result.returncode == 0, result.stderr
    assert f"resumed 2 of {prepared.shard_count} groups" in result.stdout
    assert result.stdout.strip().endswith("ran in-process")
    api.merge(base, adapter, tmp_path / "clean", max_shard_size="40KB")
    assert _contents(out) == _contents(tmp_path / "clean")

    shutil.rmtree(out)
    bad = _cli(_merge_args(base, adapter, out, "--memory-limit", "1KB", "--workers", "2"),
               {"PREFECT_API_URL": None})
    assert bad.returncode == 2 and bad.stderr.startswith("error: --memory-limit"), bad.stderr
    assert not out.exists()


def test_the_flow_reuses_the_cli_plan_and_raises_the_flows_own_errors(inputs, tmp_path,
                                                                       prefect_server,
                                                                       monkeypatch):
    import mergeflow.cli.app as cli

    base, adapter = inputs
    calls = []
    real = api.prepare
    monkeypatch.setattr(api, "prepare",
                        lambda spec, **kw: calls.append((spec, kw)) or real(spec, **kw))
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"))
    report, ran = cli._run(spec, prefect=True)
    assert report.status == "merged" and ran.startswith("ran as Prefect flow run")
    assert len(calls) == 1  # the CLI planned it; the flow's load task reused that plan
    assert calls[0][1] == {"ahead": False}  # the flow's tasks write the shards, not this process

    def failing(*args, **kwargs):
        raise VerificationError("simulated: a merged tensor is off")

    monkeypatch.setattr(api, "verify", failing)
    calls.clear()
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out2"))
    with pytest.raises(VerificationError, match="simulated"):
        cli._run(spec, prefect=True)
    assert len(calls) == 1 and not (tmp_path / "out2").exists()
    assert os.environ.get("PREFECT_API_URL") == prefect_server
